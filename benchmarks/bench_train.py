#!/usr/bin/env python3
"""Training speed of gan_mnist against a faithful copy of the tutorial's loop, measured side by side.

    python benchmarks/bench_train.py --data-dir ../shared/data                 # steps/s, both loops, one JSON line
    python benchmarks/bench_train.py --data-dir ../shared/data --threads 1
    python benchmarks/bench_train.py --data-dir ../shared/data --mode run --epochs 2   # a whole run, end to end

Threads: by default each loop runs as its own program would, the baseline with torch's default thread count
(what the tutorial gets) and gan_mnist with its automatic choice; --threads N puts both on N.

Step mode: for each variant (--variants: mlp-bce, dcgan-bce, mlp-wgan-gp, dcgan-wgan-gp), the loop written the
way the tutorial writes it (torchvision DataLoader with per-image ToTensor + Normalize; Sigmoid + BCELoss, or
the plain WGAN-GP critic loop of PyTorch-GAN's wgan_gp.py; default Adam; the losses read back with .item()
every step) and gan_mnist's own train_step (with the batch gather it does in training) run the same networks,
batch size, data and device, after a warm-up, in alternating rounds so that a slow moment of a shared machine
hits both. For mlp-bce, gan_mnist is also timed with --recipe tutorial: stable_vs_tutorial is what the lazy R1
costs. Ratios are the figure to trust, not absolute times.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision import transforms  # noqa: E402

import gan_mnist  # noqa: E402

DEFAULT_THREADS = torch.get_num_threads()  # what a plain script gets


class SeedLoop:
    """The tutorial's training loop, faithfully: what gan_mnist is measured against. For WGAN-GP, the plain critic
    loop of the reference implementations (PyTorch-GAN's wgan_gp.py): a separate pass for the interpolates, the
    penalty through autograd.grad, G on every n_critic-th batch, the losses read back each step."""

    def __init__(self, data_dir: str, batch_size: int, device: torch.device, arch: str, loss: str) -> None:
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
        dataset = torchvision.datasets.MNIST(data_dir, train=True, transform=transform, download=True)
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=True)
        self.batches = iter(self.loader)
        self.device, self.wgan, self.steps = device, loss == "wgan-gp", 0
        # The same networks as gan_mnist's (its own definitions), with the tutorial's Sigmoid + BCELoss for BCE.
        self.G = gan_mnist.generator_body(arch, 100).to(device)
        features, width = gan_mnist.discriminator_body(arch)
        self.D = nn.Sequential(features, nn.Linear(width, 1), *([] if self.wgan else [nn.Sigmoid()])).to(device)
        self.criterion = nn.BCELoss()
        lr, betas = (1e-4, (0.5, 0.9)) if self.wgan else (2e-4, (0.5, 0.999))
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=lr, betas=betas)
        self.losses: list[tuple[float, float]] = []

    def next_batch(self) -> torch.Tensor:
        try:
            real_images, _ = next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            real_images, _ = next(self.batches)
        return real_images.to(self.device)

    def step(self) -> None:
        (self.wgan_step if self.wgan else self.bce_step)(self.next_batch())
        self.steps += 1

    def bce_step(self, real_images: torch.Tensor) -> None:
        batch_size = real_images.size(0)
        real_labels = torch.ones(batch_size, 1).to(self.device)
        fake_labels = torch.zeros(batch_size, 1).to(self.device)
        # Train the discriminator
        d_loss_real = self.criterion(self.D(real_images), real_labels)
        z = torch.randn(batch_size, 100).to(self.device)
        fake_images = self.G(z).view(-1, 1, 28, 28)
        d_loss_fake = self.criterion(self.D(fake_images.detach()), fake_labels)
        d_loss = d_loss_real + d_loss_fake
        self.opt_d.zero_grad()
        d_loss.backward()
        self.opt_d.step()
        # Train the generator
        g_loss = self.criterion(self.D(fake_images), real_labels)
        self.opt_g.zero_grad()
        g_loss.backward()
        self.opt_g.step()
        self.losses.append((d_loss.item(), g_loss.item()))

    def wgan_step(self, real_images: torch.Tensor) -> None:
        batch_size = real_images.size(0)
        z = torch.randn(batch_size, 100).to(self.device)
        fake_images = self.G(z).view(-1, 1, 28, 28)
        # Train the critic: E[D(fake)] - E[D(real)] + lambda * gradient penalty at random interpolates
        alpha = torch.rand(batch_size, 1, 1, 1).to(self.device)
        interpolates = (alpha * real_images + (1 - alpha) * fake_images.detach()).requires_grad_(True)
        d_interpolates = self.D(interpolates)
        gradients = torch.autograd.grad(
            d_interpolates, interpolates, torch.ones_like(d_interpolates), create_graph=True, retain_graph=True
        )[0]
        gradient_penalty = ((gradients.view(batch_size, -1).norm(2, dim=1) - 1) ** 2).mean()
        d_loss = -self.D(real_images).mean() + self.D(fake_images.detach()).mean() + 10 * gradient_penalty
        self.opt_d.zero_grad()
        d_loss.backward()
        self.opt_d.step()
        g_loss = torch.zeros(())
        if self.steps % 5 == 0:  # Train the generator every n_critic steps
            g_loss = -self.D(self.G(z).view(-1, 1, 28, 28)).mean()
            self.opt_g.zero_grad()
            g_loss.backward()
            self.opt_g.step()
        self.losses.append((d_loss.item(), g_loss.item()))


class GanMnistLoop:
    """gan_mnist's training step exactly as its trainer drives it, for one --recipe and variant: data on the
    device, index batches, the R1 penalty on every --r1-every-th step, G on every --n-critic-th."""

    def __init__(
        self, data_dir: str, batch_size: int, device: torch.device, cuda_graph: bool, precision: str, recipe: str,
        arch: str = "mlp", loss: str = "bce",
    ) -> None:  # fmt: skip
        flags = {"recipe": recipe, "batch_size": batch_size, "precision": precision, "arch": arch, "loss": loss}
        cfg = gan_mnist.recipe_config(flags)
        images, _ = gan_mnist.load_mnist(data_dir, train=True)
        self.data = images.to(device)
        # --arch dcgan presets --clusters 40: the step sees each digit's cluster (random ids: the cost is the same)
        self.labels = torch.randint(cfg.clusters, (len(images),), device=device) if cfg.clusters else None
        self.nets = gan_mnist.build_nets(cfg, device, capturable=cuda_graph)
        gan_mnist.set_schedule(self.nets, cfg, 1)
        self.step_fn = (
            gan_mnist.CudaGraphStep(self.nets, batch_size, cfg.labelled, device)
            if cuda_graph
            else functools.partial(gan_mnist.train_step, self.nets)
        )
        self.rng = torch.Generator().manual_seed(0)
        self.batch_size, self.device, self.batches, self.steps = batch_size, device, [], 0
        self.r1_every = cfg.r1_every if cfg.r1_gamma > 0 else 0
        self.n_critic = cfg.n_critic

    def step(self) -> None:
        if not self.batches:
            self.batches = gan_mnist.epoch_batches(len(self.data), self.batch_size, self.rng)[::-1]
        idx = self.batches.pop().to(self.device, non_blocking=True)
        r1 = bool(self.r1_every) and self.steps % self.r1_every == 0
        labels = None if self.labels is None else self.labels[idx]
        self.step_fn(gan_mnist.to_model_range(self.data[idx]), labels, r1, self.steps % self.n_critic == 0)
        self.steps += 1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(loop: SeedLoop | GanMnistLoop, steps: int, device: torch.device) -> float:
    torch.set_num_threads(loop.threads)
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        loop.step()
    if isinstance(loop, GanMnistLoop):
        loop.nets.stats.sum().item()  # the trainer reads its statistics once per epoch; count one read
    sync(device)
    return time.perf_counter() - started


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine()


VARIANTS = ("mlp-bce", "dcgan-bce", "mlp-wgan-gp", "dcgan-wgan-gp")


def bench_steps(args: argparse.Namespace, device: torch.device) -> dict:
    """Each variant: the tutorial-style loop against gan_mnist's, same networks, in alternating rounds."""
    graph = args.cuda_graph and device.type == "cuda"
    loops: dict[str, SeedLoop | GanMnistLoop] = {}
    for variant in args.variants.split(","):
        arch, loss = variant.split("-", 1)
        loops[f"baseline/{variant}"] = SeedLoop(args.data_dir, args.batch_size, device, arch, loss)
        loops[f"gan_mnist/{variant}"] = GanMnistLoop(
            args.data_dir, args.batch_size, device, graph, args.precision, "stable", arch, loss
        )
        if variant == "mlp-bce":  # what the stable recipe's lazy R1 costs against the blog's maths
            loops["tutorial_recipe/mlp-bce"] = GanMnistLoop(
                args.data_dir, args.batch_size, device, graph, args.precision, "tutorial"
            )
    for name, loop in loops.items():
        loop.threads = args.threads or (DEFAULT_THREADS if name.startswith("baseline") else gan_mnist.auto_threads())
        timed(loop, args.warmup, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    per_round = max(1, args.steps // args.rounds)
    seconds = dict.fromkeys(loops, 0.0)
    for _ in range(args.rounds):
        for name, loop in loops.items():
            seconds[name] += timed(loop, per_round, device)
    steps = per_round * args.rounds
    result: dict = {"mode": "step", "steps": steps, "cuda_graph": graph, "variants": {}}
    for variant in args.variants.split(","):
        base, ours = seconds[f"baseline/{variant}"], seconds[f"gan_mnist/{variant}"]
        result["variants"][variant] = {
            "baseline_steps_per_s": round(steps / base, 2),
            "gan_mnist_steps_per_s": round(steps / ours, 2),
            "ratio": round(base / ours, 2),
        }
    if "tutorial_recipe/mlp-bce" in seconds:
        result["stable_vs_tutorial"] = round(seconds["tutorial_recipe/mlp-bce"] / seconds["gan_mnist/mlp-bce"], 3)
    result.update(
        baseline_threads=args.threads or DEFAULT_THREADS,
        gan_mnist_threads=args.threads or gan_mnist.auto_threads(),
        gan_mnist_bf16=next(loop for loop in loops.values() if isinstance(loop, GanMnistLoop)).nets.bf16,
    )
    return result


def bench_run(args: argparse.Namespace, device: torch.device) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        argv = [
            "--data-dir",
            args.data_dir,
            "--out-dir",
            f"{tmp}/run",
            "--epochs",
            str(args.epochs),
            "--batch-size",
            str(args.batch_size),
            "--device",
            str(device),
            "--threads",
            str(args.threads),
            "--precision",
            args.precision,
            "--eval-every",
            "-1",
            "--quiet",
        ]
        if args.cuda_graph:
            argv.append("--cuda-graph")
        started = time.perf_counter()
        result = gan_mnist.main(argv)
        wall = time.perf_counter() - started
    if result.exit_code:
        raise SystemExit(f"the run failed with exit code {result.exit_code}")
    train_seconds = sum(row["seconds"] for row in result.history)
    return {
        "mode": "run",
        "epochs": args.epochs,
        "wall_seconds": round(wall, 2),
        "train_seconds": round(train_seconds, 2),
        "seconds_per_epoch": round(train_seconds / args.epochs, 2),
        "projected_200_epochs_minutes": round(200 * wall / args.epochs / 60, 1),
        "cuda_graph": bool(args.cuda_graph and device.type == "cuda"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["step", "run"], default="step")
    parser.add_argument("--data-dir", default="./data")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=600, help="timed steps per loop (step mode)")
    parser.add_argument("--warmup", type=int, default=50, help="untimed steps per loop first (step mode)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds (step mode)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"step mode, comma-separated: {VARIANTS}")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of a whole run (run mode)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for both loops (0 = each its default)")
    parser.add_argument("--precision", default="auto", help="gan_mnist's --precision (auto, fp32, bf16)")
    parser.add_argument("--cuda-graph", action="store_true", help="gan_mnist side captures CUDA graphs")
    args = parser.parse_args()

    device = gan_mnist.resolve_device(args.device)
    torch.manual_seed(0)
    result = bench_steps(args, device) if args.mode == "step" else bench_run(args, device)
    peak = (
        torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    result.update(
        {
            "device": str(device),
            "device_name": device_name(device),
            "torch": str(torch.__version__),
            "batch_size": args.batch_size,
            ("peak_gpu_memory_mib" if device.type == "cuda" else "peak_rss_mib"): round(peak / 2**20, 1),
        }
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
