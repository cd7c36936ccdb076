#!/usr/bin/env python3
"""gan_mnist: train a GAN on MNIST, watch it learn, sample from it, measure it.

    python gan_mnist.py --epochs 200                       # train; everything lands in outputs/<run>/
    python gan_mnist.py --resume outputs/<run>/checkpoints/last.pt --epochs 300
    python gan_mnist.py generate --checkpoint outputs/<run>/generator.pt --out digits.png
    python gan_mnist.py evaluate --checkpoint outputs/<run>/generator.pt
    python gan_mnist.py interpolate --checkpoint outputs/<run>/generator.pt --out walk.gif

The recipe is the classic tutorial's: an MLP generator (z 100 -> 256 -> 512 -> 1024 -> 784, LeakyReLU 0.2,
Tanh) against an MLP discriminator (784 -> 512 -> 256 -> 1, LeakyReLU 0.2), alternating binary cross-entropy
updates with Adam (lr 2e-4, betas 0.5/0.999), batch 64, images in [-1, 1]. The default adds a lazy R1 penalty.

Read it top to bottom: 1 config, 2 data, 3 models, 4 the training step, 5 the epoch loop. That is the whole GAN.
Below the line "support code" come the checkpoints, evaluation, outputs, run-folder safety and the commands.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import hashlib
import html
import io
import json
import math
import os
import pickle
import re
import shlex
import shutil
import signal
import string
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 28, 28)

# ============================================================================================ 1. config


def _f(default: Any, help: str, **extra: Any) -> Any:
    """A Config field with its --help text; `defining=True` marks what a resume may not change."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class Config:
    # the recipe
    epochs: int = _f(200, "total number of epochs; with --resume, the total to continue up to")
    batch_size: int = _f(64, "images per training step", defining=True)
    lr: float = _f(2e-4, "Adam learning rate of both networks")
    b1: float = _f(0.5, "Adam beta1 of both networks")
    b2: float = _f(0.999, "Adam beta2 of both networks")
    latent_dim: int = _f(100, "size of the noise vector z", defining=True)
    conditional: bool = _f(False, "train a class-conditional GAN (G and D both see the digit label)", defining=True)
    ema_decay: float = _f(
        0.999,
        "decay of an exponential moving average of G's weights used for "
        "samples, generator.pt, generate and evaluate (0 = off)",
        defining=True,
    )
    # the stabilisers: --recipe presets them (RECIPES below); a flag given beside it wins
    recipe: str = _f(
        "stable",
        "stable: the tutorial's maths plus measured stabilisers; tutorial: the maths as published",
        defining=True,
    )
    r1_gamma: float = _f(1.0, "weight of the R1 penalty on D's gradient at real digits (0 = off)")
    r1_every: int = _f(8, "apply the R1 penalty every N D steps, its weight scaled by N (lazy R1)", metavar="N")
    lr_decay: str = _f("none", "learning-rate schedule over the run's --epochs: linear (to 0), or none")
    d_lr: float = _f(0.0, "D's Adam learning rate, if not --lr (two time-scale update rule, TTUR)")
    spectral_norm: bool = _f(False, "spectral normalisation of each of D's linear layers", defining=True)
    # data and run
    data_dir: str = _f("./data", "folder holding MNIST/raw/ (downloaded there when absent)")
    out_dir: str = _f("", "run folder (default: a new outputs/run-YYYYmmdd-HHMMSS)", metavar="DIR")
    subset: int = _f(0, "train on the first N training images only (0 = all 60000)", metavar="N", defining=True)
    seed: int = _f(1, "random seed for weights, noise and data order", defining=True)
    device: str = _f("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    threads: int = _f(0, "CPU threads for torch (0 = auto: one fewer than the CPUs available, at most 4)")
    precision: str = _f(
        "auto",
        "matmul precision: auto (bf16 on CPUs with native bf16, TF32 on CUDA, "
        "else fp32), fp32, bf16; weights, optimiser and losses stay fp32",
    )
    cuda_graph: bool = _f(False, "on CUDA, capture each training step as one CUDA graph (eager elsewhere)")
    # outputs
    sample_every: int = _f(1, "save a sample grid every N epochs", metavar="N")
    checkpoint_every: int = _f(10, "keep a checkpoints/epoch_NNNN.pt every N epochs", metavar="N")
    keep_checkpoints: int = _f(5, "keep only the newest N periodic checkpoints (0 = keep all)", metavar="N")
    eval_every: int = _f(
        10,
        "evaluate every N epochs and at the end, keeping generator_best.pt (0 = at the end only, -1 = never)",
        metavar="N",
    )
    eval_num: int = _f(10000, "generated digits per evaluation", metavar="N")
    judge: str = _f(
        "", "judge network cache (default: ~/.cache/gan_mnist/judge-<hash of the training digits>.pt)", metavar="PATH"
    )
    resume: str = _f(
        "", "continue the run saved in this checkpoint (e.g. outputs/run/checkpoints/last.pt)", metavar="PATH"
    )
    tensorboard: bool = _f(
        True, "write TensorBoard event files to <run>/tensorboard (tensorboard --logdir outputs); --no-tensorboard: off"
    )
    quiet: bool = _f(False, "no progress bar; print only the per-epoch summaries")
    debug: bool = _f(False, "show the full traceback of an error")


# A resumed run must keep these: they define the model or the data stream that the checkpoint continues.
RUN_DEFINING = tuple(f.name for f in dataclasses.fields(Config) if f.metadata.get("defining"))

# What --recipe sets before the flags the user typed: "tutorial" is the blog post's maths exactly, "stable" is
# Config's defaults (README, 'The default recipe').
RECIPES: dict[str, dict[str, Any]] = {"stable": {}, "tutorial": {"r1_gamma": 0.0, "lr_decay": "none"}}
# A conditional GAN trains best without R1: the penalty also smooths D's label term (README, 'Conditional GAN').
CONDITIONAL_RECIPES: dict[str, dict[str, Any]] = {"stable": {"r1_gamma": 0.0}, "tutorial": {}}


def recipe_config(flags: dict[str, Any]) -> Config:
    """Config's defaults, then the recipe's presets (a conditional GAN's own), then the flags the user typed."""
    recipe = flags.get("recipe", Config.recipe)
    conditional = CONDITIONAL_RECIPES[recipe] if flags.get("conditional", Config.conditional) else {}
    return Config(**{**RECIPES[recipe], **conditional, **flags})


# ============================================================================================== 2. data
# MNIST is read once by torchvision (load_mnist, in the support code) as uint8 tensors, and stays on the device.


def to_model_range(images: Tensor, device: torch.device | str = "cpu") -> Tensor:
    """uint8 N x 28 x 28 -> float N x 1 x 28 x 28 in [-1, 1], what ToTensor + Normalize(0.5, 0.5) give."""
    return images.to(device).unsqueeze(1).float().div_(127.5).sub_(1.0)


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] -> uint8 in MNIST's convention (0 = black background, 255 = white stroke)."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def epoch_batches(num_images: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """One epoch's index batches: a seeded permutation, so each image is seen exactly once. The last batch
    keeps the remainder (smaller), as the tutorial's DataLoader(shuffle=True) does."""
    return list(torch.randperm(num_images, generator=generator).split(batch_size))


# ============================================================================================ 3. models


LABEL_DIM = 10  # G's label embedding (50 measured worse: benchmarks/conditional_ablation.py)


def _mlp(sizes: list[int], last_activation: bool = False) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or last_activation:
            layers.append(nn.LeakyReLU(0.2, inplace=True))
    return layers


class Generator(nn.Module):
    """z (+ digit label) -> 1 x 28 x 28 image in [-1, 1]."""

    def __init__(self, latent_dim: int = 100, num_classes: int = 0) -> None:
        super().__init__()
        self.latent_dim, self.num_classes = latent_dim, num_classes
        # Conditional: the label enters as a learned embedding joined to z.
        self.label_embedding = nn.Embedding(num_classes, LABEL_DIM) if num_classes else None
        in_dim = latent_dim + (LABEL_DIM if num_classes else 0)
        self.net = nn.Sequential(*_mlp([in_dim, 256, 512, 1024, 784]), nn.Tanh())

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.decode(z, None if self.label_embedding is None else self.label_embedding(labels))

    def decode(self, z: Tensor, label_vectors: Tensor | None = None) -> Tensor:
        """From z and (conditional) label embedding vectors: what `interpolate` walks between digits with."""
        if label_vectors is not None:
            z = torch.cat([z, label_vectors], dim=1)
        return self.net(z).view(-1, *IMAGE_SHAPE)


class Discriminator(nn.Module):
    """Image (+ digit label) -> one logit: > 0 means 'real'. The sigmoid lives in the loss."""

    def __init__(self, num_classes: int = 0, spectral_norm: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), *_mlp([784, 512, 256], last_activation=True))
        self.head = nn.Linear(256, 1)
        # Conditional: a projection term <embed(y), features(x)> (Miyato & Koyama 2018).
        self.label_projection = nn.Embedding(num_classes, 256) if num_classes else None
        if spectral_norm:  # Miyato et al. 2018: each linear map scaled to spectral norm 1
            for layer in [m for m in self.modules() if isinstance(m, nn.Linear)]:
                nn.utils.parametrizations.spectral_norm(layer)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        h = self.features(x)
        logits = self.head(h).squeeze(1)
        if self.label_projection is not None:
            logits = logits + (self.label_projection(labels) * h).sum(dim=1)
        return logits


# ================================================================================= 4. the training step


@dataclass
class Nets:
    """The two networks, their optimisers and the EMA generator, with what the step keeps on the device."""

    G: Generator
    D: Discriminator
    opt_g: torch.optim.Adam
    opt_d: torch.optim.Adam
    ema: Generator | None
    ema_decay: float
    stats: Tensor  # running sums of d_loss, g_loss, D(x), D(G(z)) over this epoch's steps
    ema_updates: Tensor  # on the device: the EMA warm-up needs no host value (and can be graph-captured)
    bf16: bool = False  # bf16 matmuls under autocast
    r1_weight: float = 0.0  # gamma / 2 * every: lazy R1 applies the whole penalty on one step in `every`
    _targets: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def targets(self, batch: int) -> tuple[Tensor, Tensor]:
        """D's targets (real then fake) and G's, made once per batch size: no allocations in the step."""
        if batch not in self._targets:
            device = self.stats.device
            d = torch.cat([torch.ones(batch), torch.zeros(batch)]).to(device)
            self._targets[batch] = d, torch.ones(batch, device=device)
        return self._targets[batch]

    def sampler(self) -> Generator:
        return self.ema if self.ema is not None else self.G


def make_adam(params: Any, cfg: Config, lr: float, capturable: bool = False) -> torch.optim.Adam:
    params = list(params)
    kwargs: dict[str, Any] = {"lr": lr, "betas": (cfg.b1, cfg.b2)}
    if capturable:  # lr as a device tensor: a captured CUDA graph then sees the schedule change it
        kwargs.update(capturable=True, lr=torch.tensor(lr, device=params[0].device))
    try:  # one fused kernel for all parameters where the device has it
        return torch.optim.Adam(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, foreach=True, **kwargs)


def build_nets(cfg: Config, device: torch.device, capturable: bool = False) -> Nets:
    num_classes = NUM_CLASSES if cfg.conditional else 0
    G = Generator(cfg.latent_dim, num_classes).to(device)
    D = Discriminator(num_classes, cfg.spectral_norm).to(device)
    # The EMA is a copy, not a new Generator: a new one's init would draw from the RNG and shift training.
    ema = copy.deepcopy(G).requires_grad_(False) if cfg.ema_decay > 0 else None
    return Nets(
        G,
        D,
        make_adam(G.parameters(), cfg, cfg.lr, capturable),
        make_adam(D.parameters(), cfg, cfg.d_lr or cfg.lr, capturable),
        ema,
        cfg.ema_decay,
        stats=torch.zeros(4, device=device),
        ema_updates=torch.zeros((), device=device),
        bf16=use_bf16(cfg.precision, device),
        r1_weight=cfg.r1_gamma / 2 * cfg.r1_every,
    )


def set_schedule(nets: Nets, cfg: Config, epoch: int) -> None:
    """The learning rates of this epoch (1-based) under --lr-decay, set at the start of each epoch, also a resumed
    one, so a resume is exact."""
    decay = 1.0 - (epoch - 1) / cfg.epochs if cfg.lr_decay == "linear" else 1.0  # linear: 1/epochs in the last
    for opt, lr in ((nets.opt_g, cfg.lr), (nets.opt_d, cfg.d_lr or cfg.lr)):
        for group in opt.param_groups:
            if not group.get("capturable"):
                group["lr"] = lr * decay
            elif isinstance(group["lr"], Tensor):  # in place: a captured graph reads it at this address
                group["lr"].fill_(lr * decay)
            else:
                group["lr"] = torch.tensor(lr * decay, device=group["params"][0].device)
            group["betas"] = (cfg.b1, cfg.b2)  # flags given at a resume win over the saved optimiser settings


def train_step(nets: Nets, real: Tensor, labels: Tensor | None, r1: bool = False) -> None:
    """One alternating GAN step, with the R1 penalty when `r1`. Nothing here reads a value back to the host."""
    G, D, batch = nets.G, nets.D, real.size(0)
    # cache_enabled=False: D's weights change between the two regions, and CUDA graphs need it off.
    autocast = functools.partial(torch.autocast, real.device.type, torch.bfloat16, nets.bf16, False)
    d_targets, g_targets = nets.targets(batch)

    # (1) Update D: maximise log D(x) + log(1 - D(G(z))). Real and fake go through D as one batch: D has no
    # batch statistics, so this is the mean of the two BCE terms, in one pass instead of two.
    with autocast():
        z = torch.randn(batch, G.latent_dim, device=real.device)
        fake = G(z, labels)
        both_labels = None if labels is None else torch.cat([labels, labels])
        d_in = torch.cat([real, fake.detach()]).requires_grad_(r1)
        d_logits = D(d_in, both_labels).float()
    d_loss = F.binary_cross_entropy_with_logits(d_logits, d_targets)
    penalty = d_loss
    if r1:  # R1 (Mescheder et al. 2018): gamma/2 * |grad_x D(x)|^2 at real digits keeps D smooth where data is
        (grad,) = torch.autograd.grad(d_logits[:batch].sum(), d_in, create_graph=True)
        penalty = d_loss + nets.r1_weight * grad[:batch].float().square().sum(dim=(1, 2, 3)).mean()
    nets.opt_d.zero_grad(set_to_none=True)
    penalty.backward()
    nets.opt_d.step()

    # (2) Update G: non-saturating loss, maximise log D(G(z)). D's weights collect no gradients here.
    D.requires_grad_(False)
    with autocast():
        g_logits = D(fake, labels).float()
    g_loss = F.binary_cross_entropy_with_logits(g_logits, g_targets)
    nets.opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    nets.opt_g.step()
    D.requires_grad_(True)

    with torch.no_grad():
        if nets.ema is not None:  # warm-up: decay (1+t)/(10+t) up to ema_decay, so early grids are not init noise
            nets.ema_updates += 1
            decay = ((1 + nets.ema_updates) / (10 + nets.ema_updates)).clamp(max=nets.ema_decay)
            torch._foreach_lerp_(list(nets.ema.parameters()), list(G.parameters()), 1 - decay)
        probs = torch.sigmoid(d_logits)
        nets.stats += torch.stack([d_loss, g_loss, probs[:batch].mean(), probs[batch:].mean()])


# ================================================================================== 5. the epoch loop


@dataclass
class RunState:
    """The loop's state between steps, on the CPU: everything a checkpoint saves besides the networks. These
    fields are the checkpoint's fields, and their types are what loading a checkpoint checks."""

    fixed_noise: Tensor  # the noise behind every sample grid, drawn once from the seed
    fixed_labels: Tensor | None  # conditional: row k of each grid is digit k
    rng: dict  # random states: "torch" and "cuda" as saved, "data" as at the start of the epoch in progress
    epoch: int = 0  # epochs completed
    step: int = 0  # steps done in the next epoch (non-zero after an interruption)
    epoch_steps: int = 0
    epoch_seconds: float = 0.0
    epoch_stats: Tensor = field(default_factory=lambda: torch.zeros(4))  # Nets.stats of a part-done epoch
    history: list = field(default_factory=list)  # a row per epoch: losses.csv
    metrics: list = field(default_factory=list)  # a row per evaluation: metrics.csv
    best: dict | None = None  # {"epoch", "fid"} of the lowest-FID evaluation so far: generator_best.pt
    invocations: list = field(default_factory=list)  # what really ran, at the start and at each resume

    @classmethod
    def new(cls, cfg: Config, data_rng: torch.Generator) -> RunState:
        gen = torch.Generator().manual_seed(cfg.seed)  # its own stream: it does not shift the training noise
        if cfg.conditional:
            noise, labels = torch.randn(100, cfg.latent_dim, generator=gen), torch.arange(10).repeat_interleave(10)
        else:
            noise, labels = torch.randn(64, cfg.latent_dim, generator=gen), None
        return cls(noise, labels, {"torch": torch.get_rng_state(), "cuda": None, "data": data_rng.get_state()})


@dataclass
class Run:
    """A training run in progress: config and folder, networks, the data on the device, the loop state, outputs."""

    cfg: Config
    dir: Path
    device: torch.device
    nets: Nets
    data: Tensor  # the training digits, uint8 on the device (a quarter of their size as floats)
    labels: Tensor
    data_rng: torch.Generator  # the data order
    state: RunState
    step_fn: Callable[[Tensor, Tensor | None, bool], None]  # train_step, or its CUDA graphs
    fixed: tuple[Tensor, Tensor | None]  # the fixed noise and labels, on the device
    train_images: Tensor  # all training digits: the judge's cache key, the memorisation reference
    test_images: Tensor | None = None  # read at the start when the run evaluates: a bad file fails at once
    evaluator: Evaluator | None = None
    tb: Any = None  # torch.utils.tensorboard.SummaryWriter
    last_plot: float = field(default_factory=time.monotonic)
    last_gif: float = field(default_factory=time.monotonic)

    @property
    def ckpt_dir(self) -> Path:
        return self.dir / "checkpoints"

    def log(self, scalars: dict[str, float | None], epoch: int) -> None:
        """Scalars to TensorBoard, when it is on."""
        for tag, value in scalars.items():
            if self.tb is not None and value is not None:
                self.tb.add_scalar(tag, value, epoch)


def train(cfg: Config, given: set[str]) -> Result:
    """Trains a new run, or resumes one, up to cfg.epochs. `given`: the flags the user typed (a resume takes
    the rest from the checkpoint)."""
    with open_run(cfg, given) as run, StopSignal() as stop:  # held to the end: the last outputs always finish
        cfg = run.cfg
        while run.state.epoch < cfg.epochs:
            epoch = run.state.epoch + 1
            if not train_epoch(run, epoch, stop):
                break  # stopped by a signal, saved mid-epoch
            record_epoch(run, epoch)
            final = epoch == cfg.epochs
            if epoch % cfg.sample_every == 0 or final:
                sample_epoch(run, epoch)
            if evaluates(cfg, epoch) and not stop.signum:  # after a signal, save and stop: no new work
                evaluate_epoch(run, epoch)
            write_logs(run, final)
            save_epoch_checkpoint(run, epoch)
        return finish_run(run, stop.signum)


def evaluates(cfg: Config, epoch: int) -> bool:
    """Whether the run evaluates after this epoch: every --eval-every epochs, and after the last one."""
    return cfg.eval_every >= 0 and (epoch == cfg.epochs or cfg.eval_every > 0 and epoch % cfg.eval_every == 0)


def train_epoch(run: Run, epoch: int, stop: StopSignal) -> bool:
    """The steps of one epoch (from the saved step, after a mid-epoch resume). False if a signal stopped it:
    the partial epoch is then saved to last.pt, so a resume continues from the very next step."""
    cfg, state, nets = run.cfg, run.state, run.nets
    set_schedule(nets, cfg, epoch)
    state.rng["data"] = run.data_rng.get_state()  # what a resume needs to redraw this epoch's order
    batches = epoch_batches(len(run.data), cfg.batch_size, run.data_rng)
    started = time.perf_counter() - state.epoch_seconds
    bar = tqdm(
        total=len(batches),
        initial=state.step,
        desc=f"epoch {epoch}/{cfg.epochs}",
        unit="step",
        leave=False,
        disable=True if cfg.quiet else None,
        dynamic_ncols=True,
    )
    next_refresh = time.monotonic() + 0.5
    for i in range(state.step, len(batches)):
        if stop.signum:
            break
        idx = batches[i].to(run.device, non_blocking=True)
        r1 = cfg.r1_gamma > 0 and ((epoch - 1) * len(batches) + i) % cfg.r1_every == 0
        run.step_fn(to_model_range(run.data[idx]), run.labels[idx] if cfg.conditional else None, r1)
        state.epoch_steps += 1
        state.step = i + 1
        bar.update(1)
        if not bar.disable and time.monotonic() > next_refresh:  # the only host sync: twice a second
            d_loss, g_loss, _, _ = (nets.stats / state.epoch_steps).tolist()
            bar.set_postfix_str(f"D {d_loss:.3f} G {g_loss:.3f}", refresh=False)
            next_refresh = time.monotonic() + 0.5
    bar.close()
    state.epoch_seconds = time.perf_counter() - started
    if not stop.signum:
        return True
    check_finite((nets.stats / max(1, state.epoch_steps)).tolist(), epoch, cfg, run.ckpt_dir)
    state.epoch_stats = nets.stats.detach().cpu()
    save_run_checkpoint(run, run.ckpt_dir / "last.pt")
    return False


LOSS_COLUMNS = ("epoch", "d_loss", "g_loss", "d_x", "d_g_z", "seconds")


def record_epoch(run: Run, epoch: int) -> None:
    """The epoch's mean losses and D outputs (one read from the device): a history row and the console line."""
    state = run.state
    means = (run.nets.stats / state.epoch_steps).tolist()
    check_finite(means, epoch, run.cfg, run.ckpt_dir)
    row = dict(zip(LOSS_COLUMNS, [epoch, *means, state.epoch_seconds]))
    state.history.append(row)
    tags = ("loss/D", "loss/G", "D_output/real", "D_output/fake", "speed/seconds_per_epoch")
    run.log(dict(zip(tags, [*means, state.epoch_seconds])), epoch)
    print(
        f"epoch {epoch:>4}/{run.cfg.epochs}  d_loss {means[0]:.4f}  g_loss {means[1]:.4f}  "
        f"D(x) {means[2]:.3f}  D(G(z)) {means[3]:.3f}  {state.epoch_seconds:.1f}s "
        f"({state.epoch_steps / state.epoch_seconds:.0f} steps/s)",
        flush=True,
    )
    state.epoch, state.step, state.epoch_steps, state.epoch_seconds = epoch, 0, 0, 0.0
    state.rng["data"] = run.data_rng.get_state()
    state.epoch_stats = torch.zeros(4)
    run.nets.stats.zero_()


# ###########################################################################################################
# Support code below: starting and resuming a run, checkpoint files, evaluation, outputs, run-folder safety,
# and the commands. The GAN itself is all above.
# ###########################################################################################################


# ================================================================================ devices and threads


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def auto_threads() -> int:
    """One CPU fewer than this process may use, at most 4: torch's threads spin-wait for each other, so one busy
    core stalls them all (README, 'CPU threads')."""
    return max(1, min(4, _cpus() - 1))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GanError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise GanError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise GanError(f"--device {name}: MPS is not available on this machine (use --device cpu)")
    return device


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 matmuls (fp32 weights and accumulation) where they are the fast path: CPUs with native bf16
    (README, 'Speed'). On CUDA, TF32 plays that part."""
    if precision != "auto":
        return precision == "bf16"
    return (
        device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


class CudaGraphStep:
    """train_step captured as CUDA graphs, one per kind of step (with and without the lazy R1 penalty): a few
    eager warm-up steps of each kind on a side stream (real training steps), then capture; every later full
    batch is one graph replay. Noise is drawn inside the graph. A smaller last batch of an epoch runs eagerly
    (capturable Adam works both ways)."""

    warmup_steps = 3

    def __init__(self, nets: Nets, batch_size: int, conditional: bool, device: torch.device) -> None:
        self.nets, self.batch_size = nets, batch_size
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        self.warmup_left = {False: self.warmup_steps, True: self.warmup_steps}
        self.real = torch.zeros(batch_size, *IMAGE_SHAPE, device=device)
        self.labels = torch.zeros(batch_size, dtype=torch.long, device=device) if conditional else None
        self.side_stream = torch.cuda.Stream(device)

    def __call__(self, real: Tensor, labels: Tensor | None, r1: bool = False) -> None:
        if real.size(0) != self.batch_size:
            train_step(self.nets, real, labels, r1)
            return
        self.real.copy_(real)
        if labels is not None:
            self.labels.copy_(labels)
        if r1 in self.graphs:
            self.graphs[r1].replay()
        elif self.warmup_left[r1] > 0:
            self.warmup_left[r1] -= 1
            self.side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side_stream):
                train_step(self.nets, self.real, self.labels, r1)
            torch.cuda.current_stream().wait_stream(self.side_stream)
        else:
            # Gradients must be allocated from the graph's private pool, so they start as None.
            self.nets.opt_d.zero_grad(set_to_none=True)
            self.nets.opt_g.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                train_step(self.nets, self.real, self.labels, r1)
            self.graphs[r1] = graph
            graph.replay()  # capture records without running: this batch still has to be trained on


# ======================================================================== starting and resuming a run


@contextlib.contextmanager
def open_run(cfg: Config, given: set[str]) -> Iterator[Run]:
    """The run to train, its folder locked against a second process: a new one, or the checkpoint's on a resume.
    A start that fails before anything was saved removes the folder it created."""
    checkpoint = None
    if cfg.resume:  # resolved now: `--resume last.pt` from inside checkpoints/ names that run, from anywhere
        cfg = dataclasses.replace(cfg, resume=str(Path(cfg.resume).resolve()))
        checkpoint = load_checkpoint(cfg.resume, CHECKPOINT_FORMAT)
        cfg, run_dir = resume_config(cfg, given, checkpoint)
    else:
        run_dir = Path(cfg.out_dir) if cfg.out_dir else None
        if run_dir is not None:
            check_new_run_dir(run_dir)
    device = resolve_device(cfg.device)
    created = run_dir is None or not run_dir.exists()
    run_dir = run_dir or new_run_dir()
    make_folder(run_dir, f"--out-dir {run_dir}")
    # Absolute paths in config.json and the checkpoint: a resume from another working directory finds all.
    judge = str(Path(cfg.judge).resolve()) if cfg.judge else ""
    cfg = dataclasses.replace(
        cfg, out_dir=str(run_dir.resolve()), data_dir=str(Path(cfg.data_dir).resolve()), judge=judge
    )
    try:
        with RunLock(run_dir):
            yield start_run(cfg, run_dir, device, checkpoint)
    except BaseException:
        if created and not holds_run(run_dir):  # a start that failed before saving anything leaves no litter
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def start_run(cfg: Config, run_dir: Path, device: torch.device, checkpoint: dict | None) -> Run:
    """Seeds, reads the data, builds the networks (restored on a resume) and the loop state, tidies the folder."""
    torch.set_num_threads(cfg.threads or auto_threads())
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the MLP's matmuls; well inside GAN noise
    use_graph = cfg.cuda_graph and device.type == "cuda"
    if cfg.cuda_graph and not use_graph:
        print(f"note: --cuda-graph needs a CUDA device; training eagerly on {device}", file=sys.stderr)
    all_images, images, labels, test_images = read_run_data(cfg)
    nets = build_nets(cfg, device, capturable=use_graph)
    data_rng = torch.Generator().manual_seed(cfg.seed)
    state = RunState.new(cfg, data_rng) if checkpoint is None else restore(nets, checkpoint, cfg, device, data_rng)
    nets.stats.copy_(state.epoch_stats)
    state.invocations = [*state.invocations, invocation(cfg, state, device, nets)]
    step = CudaGraphStep(nets, cfg.batch_size, cfg.conditional, device) if use_graph else None
    fixed = state.fixed_noise.to(device), None if state.fixed_labels is None else state.fixed_labels.to(device)
    data = images.to(device), labels.to(device)
    step_fn = step or functools.partial(train_step, nets)
    run = Run(cfg, run_dir, device, nets, *data, data_rng, state, step_fn, fixed, all_images, test_images)
    prepare_run_folder(run, resumed=checkpoint is not None)
    print(
        f"gan_mnist: training on {device} ({torch.get_num_threads()} CPU threads), {len(run.data)} images, "
        f"{math.ceil(len(run.data) / cfg.batch_size)} steps/epoch, epochs {state.epoch + 1}..{cfg.epochs} "
        f"-> {run_dir}",
        flush=True,
    )
    if checkpoint is not None:
        print(f"resumed from {cfg.resume} at epoch {state.epoch}" + (f" step {state.step}" if state.step else ""))
    if cfg.tensorboard:
        open_tensorboard(run)
    return run


def read_run_data(cfg: Config) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """All training digits, the ones trained on (--subset) with their labels, and the test digits when the run
    evaluates: every file the run will need is read before the first step, not found bad after the last."""
    all_images, labels = load_mnist(cfg.data_dir, train=True)
    images = all_images
    if cfg.subset:
        if cfg.subset > len(images):
            raise GanError(f"--subset {cfg.subset} is more than the {len(images)} training images")
        images, labels = images[: cfg.subset], labels[: cfg.subset]
    test_images = None
    if cfg.eval_every >= 0:
        test_images, _ = load_mnist(cfg.data_dir, train=False)
        if cfg.judge:
            check_judge_path(Path(cfg.judge))
    return all_images, images, labels, test_images


def invocation(cfg: Config, state: RunState, device: torch.device, nets: Nets) -> dict[str, Any]:
    """What this start or resume really runs with: the resolved device, threads and precision (config.json)."""
    return {
        "started": datetime.now().isoformat(timespec="seconds"),
        "from_epoch": state.epoch,
        "epochs": cfg.epochs,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "precision": "bf16" if nets.bf16 else "tf32" if device.type == "cuda" else "fp32",
        "torch": str(torch.__version__),
        "resume": cfg.resume or None,
    }


def resume_config(cfg: Config, given: set[str], checkpoint: dict[str, Any]) -> tuple[Config, Path]:
    """The checkpoint's config with the flags the user typed (never a run-defining one changed), and the folder
    the resumed run writes to."""
    known = {f.name for f in dataclasses.fields(Config)}
    saved = Config(**{k: v for k, v in checkpoint["config"].items() if k in known})
    for name in RUN_DEFINING:
        was, now = getattr(saved, name), getattr(cfg, name)
        if name in given and now != was:
            trained = (
                f"{'with' if was else 'without'} {_flag(name)}"
                if isinstance(was, bool)
                else f"with {_flag(name)} {was}, not {now}"
            )
            raise GanError(f"checkpoint {cfg.resume} was trained {trained}; drop the flag to continue that run")
    merged = dataclasses.replace(saved, **{name: getattr(cfg, name) for name in given})
    done = checkpoint["epoch"]
    if checkpoint["step"] == 0 and done >= merged.epochs:
        raise GanError(
            f"checkpoint {cfg.resume} has already trained {done} epochs; "
            f"pass --epochs N with N > {done} to train further"
        )
    resume_path = Path(cfg.resume)
    own_dir = resume_path.parent.parent if resume_path.parent.name == "checkpoints" else Path(saved.out_dir)
    if "out_dir" in given and Path(cfg.out_dir).resolve() != own_dir.resolve():
        run_dir = Path(cfg.out_dir)  # branching the run into a new folder
        check_new_run_dir(run_dir)
        return merged, run_dir
    last = own_dir / "checkpoints" / "last.pt"
    if last.exists() and last.resolve() != resume_path.resolve():
        latest = load_checkpoint(last, CHECKPOINT_FORMAT)
        if (latest["epoch"], latest["step"]) > (done, checkpoint["step"]):
            raise GanError(
                f"{own_dir} has trained past this checkpoint (to epoch {latest['epoch']}); "
                "resuming from it there would overwrite that: pass --out-dir NEW to branch into a new folder"
            )
    return merged, own_dir


def restore(nets: Nets, ckpt: dict[str, Any], cfg: Config, device: torch.device, data_rng: torch.Generator) -> RunState:
    """Loads the networks, optimisers and random states of a checkpoint; returns its loop state."""
    try:
        nets.G.load_state_dict(ckpt["generator"])
        nets.D.load_state_dict(ckpt["discriminator"])
        if nets.ema is not None:
            nets.ema.load_state_dict(ckpt["ema"] if ckpt["ema"] is not None else ckpt["generator"])
            nets.ema_updates.copy_(ckpt["ema_updates"])
        nets.opt_g.load_state_dict(ckpt["opt_g"])
        nets.opt_d.load_state_dict(ckpt["opt_d"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise GanError(f"checkpoint {cfg.resume} does not fit this model: {str(exc).splitlines()[0]}") from exc
    state = RunState(**{f.name: ckpt[f.name] for f in dataclasses.fields(RunState)})
    torch.set_rng_state(state.rng["torch"])
    if device.type == "cuda" and state.rng["cuda"] is not None:
        torch.cuda.set_rng_state(state.rng["cuda"], device)
    data_rng.set_state(state.rng["data"])
    return state


def check_finite(means: list[float], epoch: int, cfg: Config, ckpt_dir: Path) -> None:
    if not all(math.isfinite(v) for v in means):
        kept = ckpt_dir / "last.pt"
        kept_note = f"the last good checkpoint {kept} is kept" if kept.exists() else "no checkpoint was written"
        raise GanError(
            f"training diverged in epoch {epoch} (d_loss {means[0]}, g_loss {means[1]}); "
            f"{kept_note}; try a lower --lr than {cfg.lr:g}"
        )


# ================================================================================== checkpoint files


CHECKPOINT_FORMAT = "gan_mnist.checkpoint"
GENERATOR_FORMAT = "gan_mnist.generator"
JUDGE_FORMAT = "gan_mnist.judge"
FORMAT_VERSION = 1

# The fields of each file format and their types (as annotations are written): a file with the right tag but a
# missing or mistyped field is refused in one line, before anything is built from it.
NETS_FIELDS = {"generator": "dict", "discriminator": "dict", "ema": "dict | None", "ema_updates": "Tensor",
               "opt_g": "dict", "opt_d": "dict"}  # fmt: skip
SCHEMAS: dict[str, dict[str, str]] = {
    CHECKPOINT_FORMAT: {"config": "dict", **{f.name: f.type for f in dataclasses.fields(RunState)}, **NETS_FIELDS},
    GENERATOR_FORMAT: {"epoch": "int", "ema": "bool", "latent_dim": "int", "num_classes": "int", "state_dict": "dict"},
    JUDGE_FORMAT: {"state_dict": "dict", "sha256": "str", "test_accuracy": "float", "train_images": "int"},
}
RNG_PARTS = {"torch": "Tensor", "cuda": "Tensor | None", "data": "Tensor"}
KINDS = {"int": int, "float": (int, float), "str": str, "bool": bool, "list": list, "dict": dict, "Tensor": Tensor,
         "None": type(None)}  # fmt: skip


def type_problem(obj: dict[str, Any], types: dict[str, str], what: str = "field", required: bool = True) -> str | None:
    """What is missing or of the wrong type in `obj`, given the type (as written in an annotation) of each key."""
    for key, written in types.items():
        if key not in obj:
            if required:
                return f"its {what} {key!r} is missing"
            continue
        kinds = [KINDS[name.strip()] for name in written.split("|")]
        allowed = tuple(k for kind in kinds for k in (kind if isinstance(kind, tuple) else (kind,)))
        if not isinstance(obj[key], allowed) or isinstance(obj[key], bool) and bool not in allowed:
            return f"its {what} {key!r} is {obj[key]!r:.40}, not {written}"
    return None


def schema_problem(obj: dict[str, Any]) -> str | None:
    problem = type_problem(obj, SCHEMAS[obj["format"]])
    if problem or obj["format"] == JUDGE_FORMAT:
        return problem
    if obj["format"] == GENERATOR_FORMAT:
        if not 0 < obj["latent_dim"] <= 4096:
            return f"latent_dim {obj['latent_dim']} is outside 1..4096"
        if obj["num_classes"] not in (0, NUM_CLASSES):
            return f"num_classes {obj['num_classes']} is neither 0 nor {NUM_CLASSES}"
        return None
    if obj["epoch"] < 0 or obj["step"] < 0:
        return f"epoch {obj['epoch']} / step {obj['step']} is negative"
    problem = type_problem(obj["rng"], RNG_PARTS, "random-number state")
    if problem or any(obj["rng"][k].dtype != torch.uint8 for k in ("torch", "data")):
        return problem or "its random-number state is not a byte tensor"
    return config_problem(obj["config"])


def config_problem(saved: dict[str, Any]) -> str | None:
    """What is wrong with a config read from a file: a mistyped value, a setting this gan_mnist does not have,
    or a value check_config refuses."""
    types = {f.name: f.type for f in dataclasses.fields(Config)}
    problem = type_problem(saved, types, "config value", required=False)
    if problem:
        return problem
    unknown = [f"{k}={v!r}" for k, v in saved.items() if k not in types and v not in (0, 0.0, False, "", None)]
    if unknown:  # e.g. a stabiliser removed since: resuming without it would change the maths silently
        return f"it was trained with {', '.join(unknown)}, which this version of gan_mnist does not have"
    known = {k: v for k, v in saved.items() if k in types and k != "threads"}  # threads: another machine's CPUs
    problem = check_config(dataclasses.replace(Config(), **known))
    return f"its config is invalid ({problem})" if problem else None


def checkpoint_dict(run: Run) -> dict[str, Any]:
    nets, state = run.nets, run.state
    state.rng["torch"] = torch.get_rng_state()
    state.rng["cuda"] = torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None
    return {
        "format": CHECKPOINT_FORMAT,
        "version": FORMAT_VERSION,
        "torch_version": str(torch.__version__),
        "config": dataclasses.asdict(run.cfg),
        **{f.name: getattr(state, f.name) for f in dataclasses.fields(RunState)},
        "generator": nets.G.state_dict(),
        "discriminator": nets.D.state_dict(),
        "ema": None if nets.ema is None else nets.ema.state_dict(),
        "ema_updates": nets.ema_updates.cpu(),
        "opt_g": nets.opt_g.state_dict(),
        "opt_d": nets.opt_d.state_dict(),
    }


def save_run_checkpoint(run: Run, *paths: Path) -> None:
    save_checkpoint(checkpoint_dict(run), *paths)


def save_checkpoint(obj: dict[str, Any], *paths: Path) -> None:
    """Serialised once, in memory, then written to each path: torch's zip writer turns a failed file write
    (disk full) into an unrelated RuntimeError, while one plain write reports the OSError itself."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    for path in paths:
        atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def load_checkpoint(path: str | Path, *formats: str) -> dict[str, Any]:
    """torch.load(weights_only=True): tensors and plain containers only, so a crafted file cannot run code."""
    path = Path(path)
    if not path.is_file():
        raise GanError(f"checkpoint not found: {path}" if not path.exists() else f"{path} is a folder, not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Weights only" in str(exc):
            raise GanError(
                f"refusing to load {path}: it holds Python objects that could run code, "
                "not just weights; gan_mnist never loads such files"
            ) from None
        raise GanError(f"cannot read checkpoint {path}: not a PyTorch checkpoint file") from None
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise GanError(f"cannot read checkpoint {path}: truncated or not a PyTorch file ({first})") from None
    if not isinstance(obj, dict) or obj.get("format") not in formats:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise GanError(f"{path} is not a {' or '.join(formats)} file (found {found!r})")
    problem = schema_problem(obj)
    if problem:
        raise GanError(f"{path} is damaged: {problem}")
    return obj


def save_generator(path: Path, nets: Nets, epoch: int, **extra: Any) -> None:
    G = nets.sampler()
    meta = {"epoch": epoch, "ema": nets.ema is not None, "latent_dim": G.latent_dim, "num_classes": G.num_classes}
    save_checkpoint(
        {"format": GENERATOR_FORMAT, "version": FORMAT_VERSION, **meta, "state_dict": G.state_dict(), **extra}, path
    )


def load_generator(path: str | Path, device: torch.device, raw: bool = False) -> tuple[Generator, dict[str, Any]]:
    """A Generator from generator.pt or from a full checkpoint (its EMA weights when it has them, unless
    `raw`)."""
    obj = load_checkpoint(path, GENERATOR_FORMAT, CHECKPOINT_FORMAT)
    if obj["format"] == CHECKPOINT_FORMAT:
        cfg = obj["config"]
        latent_dim, num_classes = cfg.get("latent_dim", 100), NUM_CLASSES if cfg.get("conditional") else 0
        state_dict = obj["ema"] if obj["ema"] is not None and not raw else obj["generator"]
        obj["ema"] = obj["ema"] is not None and not raw  # what evaluate reports: which weights these are
    else:
        latent_dim, num_classes, state_dict = obj["latent_dim"], obj["num_classes"], obj["state_dict"]
    G = Generator(latent_dim, num_classes)
    try:
        G.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise GanError(
            f"{path}: generator weights do not fit the recorded shapes "
            f"(latent_dim {latent_dim}, {num_classes} classes): {str(exc).splitlines()[-1].strip()}"
        ) from None
    return G.to(device).eval(), obj


# ======================================================================================== evaluation


EVAL_CHUNK = 250  # images (or feature rows) at a time: bounds the memory evaluation adds to a run
JUDGE_FEATURES = 128  # the judge's penultimate layer: FID's feature space


class Judge(nn.Module):
    """A small MNIST classifier: its 128-d penultimate layer is the feature space for FID and
    precision/recall (MNIST-native, unlike Inception), its softmax gives IS, mode coverage and accuracy."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, JUDGE_FEATURES),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(JUDGE_FEATURES, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def weights_sha256(state_dict: dict[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for name, tensor in state_dict.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def train_judge(data_dir: str | Path, quiet: bool = False) -> tuple[Judge, float, int]:
    """Seeded; 4 epochs with a one-cycle schedule on full MNIST (>= 99% test accuracy, README), and at
    least 150 steps on a small data folder. Returns the judge, its test accuracy and its training-set size."""
    images, labels = load_mnist(data_dir, train=True)
    test_images, test_labels = load_mnist(data_dir, train=False)
    x = to_model_range(images)
    batches_per_epoch = math.ceil(len(x) / 128)
    epochs = max(4, math.ceil(150 / batches_per_epoch))
    with torch.random.fork_rng(devices=[]):  # the judge's seed must not shift a training run's noise
        torch.manual_seed(0)
        judge = Judge()
        opt = torch.optim.Adam(judge.parameters(), lr=1e-3)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * batches_per_epoch)
        order = torch.Generator().manual_seed(0)
        judge.train()
        for _ in tqdm(range(epochs), desc="training the judge network", leave=False, disable=True if quiet else None):
            for idx in torch.randperm(len(x), generator=order).split(128):
                loss = F.cross_entropy(judge(x[idx]), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
    judge.eval()
    _, probs = judge_outputs(judge, (to_model_range(c) for c in test_images.split(EVAL_CHUNK)), len(test_images))
    return judge, float((probs.argmax(1) == test_labels.numpy()).mean()), len(x)


def default_judge_path(train_images: Tensor) -> Path:
    """The user's cache (like torch hub's), not the data folder, which may be read-only or shared; keyed by
    the training digits, so a judge trained on a subset is never taken for the full set's."""
    digest = hashlib.sha256(train_images.cpu().numpy().tobytes()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "gan_mnist" / f"judge-{digest}.pt"


def check_judge_path(path: Path) -> dict[str, Any] | None:
    """A --judge path the user named may be written only if it does not exist or holds a judge: returns the
    saved judge (None if there is none yet), or raises a GanError that leaves the file alone."""
    if not path.exists():
        return None
    try:
        return load_checkpoint(path, JUDGE_FORMAT)
    except GanError as exc:
        raise GanError(f"--judge {path}: {exc}; it is not a gan_mnist judge cache, so it is left as it is") from None


def load_or_train_judge(
    path: Path, data_dir: str | Path, quiet: bool = False, owned: bool = True
) -> tuple[Judge, dict[str, Any]]:
    """The judge cached at `path`; trained (about 30 s on 2 CPU cores) when missing, corrupt or tampered. A path
    not `owned` (one the user named) is only written if it is new or already holds a judge."""
    if not owned:
        check_judge_path(path)
    if path.exists():
        try:
            saved = load_checkpoint(path, JUDGE_FORMAT)
            with torch.random.fork_rng(devices=[]):  # its throwaway init must not shift a training run's noise
                judge = Judge()
            judge.load_state_dict(saved["state_dict"])
            if weights_sha256(judge.state_dict()) == saved["sha256"]:
                return judge.eval(), {k: saved[k] for k in ("sha256", "test_accuracy", "train_images")}
            reason = "its weights do not match their recorded hash"
        except (GanError, RuntimeError, KeyError, TypeError, ValueError) as exc:
            reason = str(exc)
        print(f"note: retraining the judge network, the cached one is unusable: {reason}", file=sys.stderr)
    elif not quiet:
        print(f"training the judge network for evaluation once (cached at {path})", file=sys.stderr)
    judge, accuracy, num_train = train_judge(data_dir, quiet=quiet)
    state_dict = judge.state_dict()
    info = {"sha256": weights_sha256(state_dict), "test_accuracy": accuracy, "train_images": num_train}
    if accuracy < 0.99:
        print(
            f"warning: the judge network reaches only {accuracy:.2%} test accuracy (< 99%): metrics from it are rough",
            file=sys.stderr,
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint({"format": JUDGE_FORMAT, "version": FORMAT_VERSION, "state_dict": state_dict, **info}, path)
    except (GanError, OSError) as exc:  # a read-only cache costs a retrain next time, nothing more
        hint = "" if not owned else "; pass --judge PATH to cache it elsewhere"
        print(f"note: the judge network is not cached ({exc}){hint}", file=sys.stderr)
    return judge, info


@torch.no_grad()
def judge_outputs(judge: Judge, images: Tensor | Iterable[Tensor], num: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """float64 penultimate features (N x 128) and class probabilities (N x 10) for images in [-1, 1]: one tensor,
    or its chunks in order (`num` images in all), so that the images need never be held at once."""
    chunks = images.split(EVAL_CHUNK) if isinstance(images, Tensor) else images
    num = len(images) if isinstance(images, Tensor) else num
    feats, probs = (torch.empty(num, n, dtype=torch.float64) for n in (JUDGE_FEATURES, NUM_CLASSES))
    start = 0
    for x in chunks:  # filled in place: no second copy for a concatenation
        h = judge.features(x.float().cpu())
        feats[start : start + len(h)] = h
        probs[start : start + len(h)] = F.softmax(judge.classifier(h).double(), dim=1)
        start += len(h)
    return feats.numpy(), probs.numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two feature sets (float64; scipy's matrix square root, as pytorch-fid does)."""
    import scipy.linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # a singular product is handled just below, as pytorch-fid does
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # near-singular product: regularise as pytorch-fid does
        offset = np.eye(len(s1)) * 1e-6
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def distances(queries: Tensor, bank: Tensor, chunk: int = EVAL_CHUNK) -> Iterator[Tensor]:
    """Euclidean distances from each chunk of query rows to every bank row, by matrix products
    (|q|^2 + |b|^2 - 2 q.b): 10,000 x 60,000 digits in a few seconds, about 60 MB at a time."""
    bank_sq = bank.square().sum(1)
    for q in queries.split(chunk):
        yield (q.square().sum(1, keepdim=True) + bank_sq[None] - 2 * q @ bank.T).clamp_min_(0).sqrt_()


def nearest(queries: Tensor, bank: Tensor, k: int = 1, chunk: int = EVAL_CHUNK) -> tuple[Tensor, Tensor]:
    """The distances from each query row to its k nearest bank rows, and their indices."""
    found = [d.topk(k, dim=1, largest=False) for d in distances(queries, bank, chunk)]
    return torch.cat([f.values for f in found]), torch.cat([f.indices for f in found])


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019: precision = share of fakes inside the real k-NN manifold, recall = share of
    reals inside the fake one."""
    r, f = torch.from_numpy(real).float(), torch.from_numpy(fake).float()
    r_radii, f_radii = (nearest(x, x, k + 1)[0][:, k] for x in (r, f))  # the k-th neighbour other than itself
    inside_real = torch.cat([(d <= r_radii).any(1) for d in distances(f, r)])
    inside_fake = torch.cat([(d <= f_radii).any(1) for d in distances(r, f)])
    return inside_real.double().mean().item(), inside_fake.double().mean().item()


def sample_metrics(feats: np.ndarray, probs: np.ndarray, ref_feats: np.ndarray) -> dict[str, Any]:
    eps = 1e-12
    p_y = probs.mean(0)
    inception = float(np.exp((probs * (np.log(probs + eps) - np.log(p_y + eps))).sum(1).mean()))
    hist = np.bincount(probs.argmax(1), minlength=NUM_CLASSES) / len(probs)
    nonzero = hist > 0
    enough = min(len(feats), len(ref_feats)) > 3  # k-NN radii need k + 1 = 4 points
    precision, recall = precision_recall(ref_feats, feats) if enough else (None, None)
    return {
        "fid": frechet_distance(feats, ref_feats),
        "inception_score": inception,
        "modes_covered": int((hist >= 0.02).sum()),
        "class_histogram": [round(float(h), 4) for h in hist],
        "kl_to_uniform": float((hist[nonzero] * np.log(hist[nonzero] * NUM_CLASSES)).sum()),
        "precision": precision,
        "recall": recall,
    }


def memorisation(evaluator: Evaluator, images: Tensor, feats: np.ndarray | None = None) -> dict[str, Any]:
    """Does G copy its training digits? For each generated digit, the distance to its nearest training digit
    (in pixels and in judge features), against the same for real test digits, which G never saw. A ratio near 1:
    samples sit no closer to the training set than new real digits do; far below 1: copying. A near-copy is a
    sample closer (in pixels) than 99% of test digits are to their nearest training digit: about 1% of samples
    for a generator that does not copy. `feats`: the images' judge features, if already computed."""
    started = time.perf_counter()
    train = to_model_range(evaluator.train_images).flatten(1)
    test = to_model_range(evaluator.test_images[: len(images)]).flatten(1)
    fake_px, _ = nearest(images.float().flatten(1), train)
    test_px, _ = nearest(test, train)
    train_feats = torch.from_numpy(judge_outputs(evaluator.judge, train.view(-1, *IMAGE_SHAPE))[0]).float()
    feats = judge_outputs(evaluator.judge, images)[0] if feats is None else feats
    fake_ft, _ = nearest(torch.from_numpy(feats).float(), train_feats)
    test_ft, _ = nearest(torch.from_numpy(evaluator.test_feats[: len(images)]).float(), train_feats)
    threshold = torch.quantile(test_px[:, 0], 0.01).item()
    return {
        "pixel_nearest_median": fake_px.median().item(),
        "pixel_nearest_median_test": test_px.median().item(),
        "pixel_ratio": fake_px.median().item() / test_px.median().item(),
        "feature_nearest_median": fake_ft.median().item(),
        "feature_nearest_median_test": test_ft.median().item(),
        "feature_ratio": fake_ft.median().item() / test_ft.median().item(),
        "near_copy_threshold": threshold,
        "near_copy_share": (fake_px[:, 0] < threshold).float().mean().item(),
        "num_samples": len(images),
        "num_test": len(test),
        "seconds": round(time.perf_counter() - started, 2),
    }


def nearest_picture(path: Path, images: Tensor, train_images: Tensor, rows: int = 8, k: int = 5) -> None:
    """Generated digits in the first column, their k nearest training digits (pixels) beside them."""
    queries = images[:rows].float()
    _, idx = nearest(queries.flatten(1), to_model_range(train_images).flatten(1), k=k)
    neighbours = to_model_range(train_images[idx.flatten()]).view(len(queries), k, *IMAGE_SHAPE)
    grid = torch.cat([queries[:, None], neighbours], dim=1).reshape(-1, *IMAGE_SHAPE)
    atomic_write(path, lambda f: grid_image(grid, 1 + k, 2).save(f, "PNG"))


class Evaluator:
    """Everything evaluation needs that does not depend on the generator, computed once: the judge, the
    test digits' features, and the real-data floor (training digits scored against test digits)."""

    def __init__(
        self,
        data_dir: str | Path,
        judge_path: str | Path | None,
        num: int,
        quiet: bool = False,
        train_images: Tensor | None = None,  # the trainer's copies (uint8), saving a second read of MNIST
        test_images: Tensor | None = None,
    ) -> None:
        self.num = num
        self.train_images = load_mnist(data_dir, train=True)[0] if train_images is None else train_images
        path = Path(judge_path) if judge_path else default_judge_path(self.train_images)
        self.judge, self.judge_info = load_or_train_judge(path, data_dir, quiet, owned=not judge_path)
        self.test_images = load_mnist(data_dir, train=False)[0] if test_images is None else test_images
        self.test_feats, _ = self._judge_digits(self.test_images)
        # The floor takes longer than an evaluation (k-NN radii of 2 x 10,000 points): cached beside a judge in
        # gan_mnist's own cache, never beside a --judge the user named.
        self.floor = self._floor(None if judge_path else path.with_name(f"{path.stem}.floor-{num}.json"))

    def _floor(self, cache: Path | None) -> dict[str, Any]:
        with contextlib.suppress(OSError, ValueError):
            cached = json.loads(cache.read_text()) if cache else None
            if isinstance(cached, dict) and cached.get("judge_sha256") == self.judge_info["sha256"]:
                floor = cached.get("floor")
                numbers = ("fid", "inception_score", "kl_to_uniform", "modes_covered")
                if isinstance(floor, dict) and not type_problem(floor, dict.fromkeys(numbers, "float")):
                    return floor
        floor = sample_metrics(*self._judge_digits(self.train_images[: self.num].cpu()), self.test_feats)
        if cache is not None:
            with contextlib.suppress(GanError):  # an unwritable cache costs the computation next time, no more
                write_json(cache, {"judge_sha256": self.judge_info["sha256"], "floor": floor})
        return floor

    def _judge_digits(self, images: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Judge outputs of uint8 MNIST digits, brought to [-1, 1] a chunk at a time (never all as floats)."""
        return judge_outputs(self.judge, (to_model_range(chunk) for chunk in images.split(EVAL_CHUNK)), len(images))

    @torch.no_grad()
    def __call__(self, G: nn.Module, seed: int = 0) -> dict[str, Any]:
        """Scores `num` digits drawn from G (for a conditional G, an equal share of each digit). Each chunk is
        judged as it is drawn: a training run never holds all `num` images."""
        started = time.perf_counter()
        return self._metrics(*judge_outputs(self.judge, self._draw(G, seed), self.num), self._labels(G), started)

    def sample(self, G: nn.Module, seed: int = 0) -> tuple[Tensor, Tensor | None]:
        """The `num` digits that __call__ scores, as one tensor (for `evaluate`, which also saves them)."""
        images = torch.empty(self.num, *IMAGE_SHAPE)
        for start, chunk in zip(range(0, self.num, EVAL_CHUNK), self._draw(G, seed)):
            images[start : start + len(chunk)] = chunk
        return images, self._labels(G)

    def _labels(self, G: nn.Module) -> Tensor | None:
        return torch.arange(self.num) % NUM_CLASSES if G.num_classes else None

    @torch.no_grad()
    def _draw(self, G: nn.Module, seed: int) -> Iterator[Tensor]:
        device = next(G.parameters()).device
        noise_rng = torch.Generator().manual_seed(seed)  # its own stream: never shifts a training run's noise
        z, labels = torch.randn(self.num, G.latent_dim, generator=noise_rng), self._labels(G)
        was_training = G.training
        G.eval()
        try:
            for start in range(0, self.num, EVAL_CHUNK):
                zc = z[start : start + EVAL_CHUNK].to(device)
                yield G(zc, None if labels is None else labels[start : start + EVAL_CHUNK].to(device)).float().cpu()
        finally:
            G.train(was_training)

    def score(self, images: Tensor, labels: Tensor | None = None, memorise: bool = False) -> dict[str, Any]:
        """Metrics of any images in [-1, 1] against the test digits; per-digit accuracy if labels are given, and
        the memorisation check if asked."""
        started = time.perf_counter()
        feats, probs = judge_outputs(self.judge, images)
        metrics = self._metrics(feats, probs, labels, started)
        if memorise:
            metrics["memorisation"] = memorisation(self, images, feats)
        return metrics

    def _metrics(self, feats: np.ndarray, probs: np.ndarray, labels: Tensor | None, started: float) -> dict[str, Any]:
        metrics = sample_metrics(feats, probs, self.test_feats)
        if labels is not None:
            read = probs.argmax(1)
            metrics["digit_accuracy"] = [float((read[labels.numpy() == k] == k).mean()) for k in range(NUM_CLASSES)]
        metrics.update(num_samples=len(feats), real_floor=self.floor, judge=self.judge_info)
        metrics["seconds"] = round(time.perf_counter() - started, 2)
        return metrics


METRIC_COLUMNS = ("epoch", "fid", "inception_score", "modes_covered", "kl_to_uniform", "precision", "recall")
METRIC_PANELS = [
    ("FID on judge features (lower is better)", [("fid", "FID")]),
    ("score", [("inception_score", "Inception Score (max 10)")]),
]


def metrics_line(m: dict[str, Any]) -> str:
    digits = f", weakest digit read as asked {min(m['digit_accuracy']):.3f}" if "digit_accuracy" in m else ""
    return (
        f"FID {m['fid']:.2f} (real digits {m['real_floor']['fid']:.2f}), IS {m['inception_score']:.2f} "
        f"(real {m['real_floor']['inception_score']:.2f}), modes {m['modes_covered']}/10, KL to uniform "
        f"{m['kl_to_uniform']:.3f}, precision {m['precision']:.3f}, recall {m['recall']:.3f}{digits}"
    )


def evaluate_epoch(run: Run, epoch: int) -> None:
    """Scores the sampling generator now: a row of metrics.csv (kept in the checkpoint, like the loss history),
    metrics.json and metrics.png; a new lowest FID is kept as generator_best.pt."""
    cfg, state = run.cfg, run.state
    if run.evaluator is None:
        run.evaluator = Evaluator(cfg.data_dir, cfg.judge, cfg.eval_num, cfg.quiet, run.train_images, run.test_images)
    metrics = run.evaluator(run.nets.sampler(), seed=cfg.seed)
    row = {"epoch": epoch, **{c: metrics[c] for c in METRIC_COLUMNS[1:]}}
    if "digit_accuracy" in metrics:
        accuracy = metrics["digit_accuracy"]
        row.update(digit_accuracy_min=min(accuracy), digit_accuracy_mean=float(np.mean(accuracy)))
    state.metrics.append(row)
    if state.best is None or metrics["fid"] < state.best["fid"]:
        state.best = {"epoch": epoch, "fid": metrics["fid"]}
        save_generator(run.dir / "generator_best.pt", run.nets, epoch, fid=metrics["fid"])
    write_metrics_csv(run.dir, state.metrics)
    write_json(run.dir / "metrics.json", {"epoch": epoch, **metrics, "best": state.best})
    # FID falls from hundreds to a few units: on a log scale the late epochs, where a run gains or decays, show.
    plot_curves(run.dir / "metrics.png", state.metrics, METRIC_PANELS, log_y=(METRIC_PANELS[0][0],))
    run.log({f"metrics/{k}": v for k, v in row.items() if k != "epoch"}, epoch)
    early = epoch <= 10 and metrics["fid"] > 50
    print(
        f"           {metrics_line(metrics)}  ({metrics['seconds']:.1f}s)"
        + ("  [early FIDs in the hundreds are normal: watch the trend]" if early else ""),
        flush=True,
    )


def write_metrics_csv(run_dir: Path, rows: list[dict[str, float]]) -> None:
    columns = [c for c in (*METRIC_COLUMNS, "digit_accuracy_min", "digit_accuracy_mean") if c in rows[0]]
    text = ",".join(columns) + "\n" + "".join(",".join(f"{r[c]:.6g}" for c in columns) + "\n" for r in rows)
    atomic_write(run_dir / "metrics.csv", lambda f: f.write(text.encode()))


# =========================================================================================== outputs


def _torchvision() -> Any:
    """torchvision, imported on first use: its import takes about 3 s, which --help or a usage error need not."""
    import torchvision

    return torchvision


def save_grid(images: Tensor, f: IO[bytes], nrow: int) -> None:
    """A PNG grid of images in [-1, 1]: -1 is black (0), +1 white (255), as MNIST's own digits."""
    _torchvision().utils.save_image(images, f, format="png", nrow=nrow, normalize=True, value_range=(-1, 1))


def grid_image(images: Tensor, nrow: int, scale: int = 1) -> Image.Image:
    """A grid as a PIL image, each digit scaled up K times by nearest neighbour (no blur)."""
    if scale > 1:
        images = F.interpolate(images.float(), scale_factor=scale, mode="nearest")
    grid = _torchvision().utils.make_grid(images, nrow=nrow, normalize=True, value_range=(-1, 1), padding=2 * scale)
    return Image.fromarray(grid.mul(255).round().clamp(0, 255).byte()[0].numpy(), mode="L")


@torch.no_grad()
def save_samples(G: Generator, noise: Tensor, labels: Tensor | None, path: Path) -> Tensor:
    """A grid of G's images for fixed noise, in eval mode: 8 x 8, or one row per digit if conditional."""
    was_training = G.training
    G.eval()
    images = G(noise, labels)
    G.train(was_training)
    atomic_write(path, lambda f: save_grid(images, f, 10 if labels is not None else 8))
    return images


def sample_epoch(run: Run, epoch: int) -> None:
    """The fixed-noise grid of this epoch, to samples/ and TensorBoard."""
    images = save_samples(run.nets.sampler(), *run.fixed, run.dir / "samples" / f"epoch_{epoch:04d}.png")
    if run.tb is not None:
        nrow = 10 if run.cfg.conditional else 8
        grid = _torchvision().utils.make_grid(images, nrow=nrow, normalize=True, value_range=(-1, 1))
        run.tb.add_image("samples/fixed_noise", grid, epoch)


def open_tensorboard(run: Run) -> None:
    """Event files in <run>/tensorboard. A resume purges events of the epochs it redoes (purge_step), so the
    view carries on without duplicate steps; a new run also records its config as hyperparameters."""
    try:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams
    except ImportError:
        raise GanError(
            "TensorBoard logging needs the tensorboard package: pip install tensorboard "
            "(or train with --no-tensorboard)"
        ) from None
    epoch, config = run.state.epoch, dataclasses.asdict(run.cfg)
    run.tb = SummaryWriter(str(run.dir / "tensorboard"), purge_step=epoch + 1 if epoch else None)
    if epoch == 0 and run.state.step == 0:
        shown = {k: v for k, v in config.items() if not k.endswith("dir") and k != "resume"}
        for summary in hparams(shown, {"metrics/fid": 0.0, "metrics/inception_score": 0.0}):
            run.tb.file_writer.add_summary(summary)
        run.tb.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)


def write_losses(run_dir: Path, history: list[dict[str, float]], plot: bool) -> None:
    lines = [",".join(LOSS_COLUMNS)]
    lines += [",".join(str(int(r[c])) if c == "epoch" else f"{r[c]:.6f}" for c in LOSS_COLUMNS) for r in history]
    atomic_write(run_dir / "losses.csv", lambda f: f.write(("\n".join(lines) + "\n").encode()))
    if plot and history:
        panels = [
            ("loss", [("d_loss", "D loss"), ("g_loss", "G loss")]),
            ("mean D output", [("d_x", "D(x), real"), ("d_g_z", "D(G(z)), fake")]),
        ]
        plot_curves(run_dir / "losses.png", history, panels)


def plot_curves(
    path: Path, rows: list[dict[str, Any]], panels: list[tuple[str, list[tuple[str, str]]]], log_y: tuple[str, ...] = ()
) -> None:
    """One panel per (y label, series); the panels named in `log_y` on a log scale."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    epochs = [r["epoch"] for r in rows]
    for ax, (ylabel, series) in zip(axes[0], panels):
        for key, label in series:
            ax.plot(epochs, [r[key] for r in rows], marker="o" if len(rows) < 30 else None, ms=3, label=label)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        if ylabel in log_y:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def save_gif(path: Path, frames: list[Image.Image], duration: int) -> None:
    atomic_write(path, lambda f: frames[0].save(f, "GIF", save_all=True, append_images=frames[1:], duration=duration,
                                                loop=0))  # fmt: skip


def read_frame(path: Path) -> Image.Image | None:
    """A sample grid as a GIF frame; None if it is unreadable (truncated by a crash, damaged by hand)."""
    try:
        with Image.open(path) as image:
            return image.convert("P")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def write_gif(run_dir: Path) -> None:
    grids = own_files(run_dir / "samples", "epoch_", ".png")
    frames = [frame for _, path in grids if (frame := read_frame(path)) is not None]
    if frames:
        save_gif(run_dir / "progress.gif", frames, duration=150)


def write_logs(run: Run, final: bool) -> None:
    """losses.csv every epoch; the plot and the GIF at most every 10 and 30 s (they take a while), and at the end."""
    now = time.monotonic()
    plot = final or now - run.last_plot > 10
    write_losses(run.dir, run.state.history, plot=plot)
    run.last_plot = now if plot else run.last_plot
    if final or now - run.last_gif > 30:
        write_gif(run.dir)
        run.last_gif = now


def save_epoch_checkpoint(run: Run, epoch: int) -> None:
    """last.pt every epoch (an epoch_NNNN.pt copy every --checkpoint-every), and generator.pt."""
    periodic = epoch % run.cfg.checkpoint_every == 0 or epoch == run.cfg.epochs
    save_run_checkpoint(run, run.ckpt_dir / "last.pt", *([run.ckpt_dir / f"epoch_{epoch:04d}.pt"] if periodic else []))
    if periodic:
        prune_checkpoints(run.ckpt_dir, run.cfg.keep_checkpoints)
    save_generator(run.dir / "generator.pt", run.nets, epoch)


SUMMARY_PAGE = string.Template("""<!doctype html>
<html><head><meta charset="utf-8"><title>gan_mnist run $name</title>
<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
figure{display:inline-block;margin:0 1em 1em 0;vertical-align:top} img{image-rendering:pixelated;max-width:520px}
figure img[src$$=".png"][src^="samples"],figure img[src$$=".gif"]{width:260px}
table{border-collapse:collapse;margin-bottom:1em} td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
pre{background:#f4f4f4;padding:.6em;overflow-x:auto}</style></head><body>
<h1>gan_mnist run <code>$name</code></h1>
<p>$status</p>
$figures
<h2>Metrics</h2>
<table><tr>$header</tr>$metrics</table>
<h2>Commands</h2>
<pre>$commands</pre>
<h2>Config</h2>
<table>$config</table>
</body></html>
""")


def write_summary(run: Run, status: str) -> Path:
    """summary.html in the run folder: one self-contained page (relative links only) with the config, the last
    and best grids, the GIF, the curves, the metrics table and the commands that resume or sample the run."""
    state, cfg, esc = run.state, run.cfg, html.escape
    grids = own_files(run.dir / "samples", "epoch_", ".png")
    best = state.best
    pictures = [
        (grids[-1][1].relative_to(run.dir).as_posix() if grids else "", f"fixed-noise samples, epoch {state.epoch}"),
        (f"samples/epoch_{best['epoch']:04d}.png" if best else "", "the best FID: generator_best.pt"),
        ("progress.gif", "every epoch's grid, same noise"),
        ("losses.png", "losses and mean D outputs"),
        ("metrics.png", "FID and Inception Score"),
    ]
    figure = '<figure><img src="{0}" alt="{1}"><figcaption>{1}</figcaption></figure>'
    figures = "".join(figure.format(esc(src), esc(cap)) for src, cap in pictures if src and (run.dir / src).is_file())
    columns = [c for c in METRIC_COLUMNS if state.metrics and c in state.metrics[0]]
    rows = "".join("<tr>" + "".join(f"<td>{row[c]:.4g}</td>" for c in columns) + "</tr>" for row in state.metrics)
    more = cfg.epochs + 100 if state.epoch == cfg.epochs else cfg.epochs  # a stopped run first finishes
    generator = run.dir / ("generator_best.pt" if best else "generator.pt")
    commands = [
        ["python", "gan_mnist.py", "--resume", run.ckpt_dir / "last.pt", "--epochs", more],
        ["python", "gan_mnist.py", "generate", "--checkpoint", generator, "--out", "digits.png", "--scale", 2],
        ["python", "gan_mnist.py", "evaluate", "--checkpoint", run.dir / "generator.pt", "--data-dir", cfg.data_dir],
        ["python", "gan_mnist.py", "interpolate", "--checkpoint", run.dir / "generator.pt", "--out", "walk.gif"],
    ] + ([["tensorboard", "--logdir", run.dir.parent]] if cfg.tensorboard else [])
    line = f"{status}. Recipe {cfg.recipe}, seed {cfg.seed}, {state.epoch} of {cfg.epochs} epochs."
    if best:
        line += f" Best FID {best['fid']:.2f} at epoch {best['epoch']} (judge reference: MNIST test digits)."
    page = SUMMARY_PAGE.substitute(
        name=esc(run.dir.name),
        status=esc(line),
        figures=figures,
        header="".join(f"<th>{c}</th>" for c in columns),
        metrics=rows,
        commands=esc("\n".join(shell_command(c) for c in commands)),
        config="".join(f"<tr><td>{esc(k)}</td><td>{esc(str(v))}</td></tr>" for k, v in dataclasses.asdict(cfg).items()),
    )
    path = run.dir / "summary.html"
    atomic_write(path, lambda f: f.write(page.encode()))
    return path


def shell_command(words: list[Any]) -> str:
    """A command line that pastes into a shell as it is: every word quoted where it needs to be."""
    return " ".join(shlex.quote(str(w)) for w in words)


def finish_run(run: Run, interrupted: int) -> Result:
    """The last plot and GIF, the summary page, and what to do next: resume after a signal, or the results."""
    state, ckpt = run.state, run.ckpt_dir / "last.pt"
    write_losses(run.dir, state.history, plot=True)
    write_gif(run.dir)
    if run.tb is not None:
        run.tb.close()
    finished = state.epoch == run.cfg.epochs
    summary = write_summary(run, f"finished {state.epoch} epochs" if finished else f"stopped at epoch {state.epoch}")
    if interrupted:
        name = signal.Signals(interrupted).name
        if finished:  # the signal came after the last step (while writing outputs)
            print(f"\n{name}: the run had finished all {state.epoch} epochs; saved {ckpt}", file=sys.stderr)
        else:
            resume = shell_command(["python", "gan_mnist.py", "--resume", ckpt.resolve(), "--epochs", run.cfg.epochs])
            print(
                f"\n{name}: stopped at epoch {state.epoch + 1} step {state.step}; saved {ckpt}. Resume with: {resume}",
                file=sys.stderr,
                flush=True,
            )
        return Result(128 + interrupted, run.dir, state.history)
    total = sum(row["seconds"] for row in state.history)
    print(
        f"done: {state.epoch} epochs ({total:.0f}s of training) -> {run.dir}/ "
        "(samples/, progress.gif, losses.png, generator.pt, checkpoints/)",
        flush=True,
    )
    if state.best is not None:
        best = state.best
        print(f"best: epoch {best['epoch']} (FID {best['fid']:.2f}) -> {run.dir / 'generator_best.pt'}", flush=True)
    print(f"summary: {summary}", flush=True)
    return Result(0, run.dir, state.history)


# ================================================================================= run-folder safety


class GanError(Exception):
    """A problem the user can fix: reported as one line on stderr with a non-zero exit, no traceback."""


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Writes a temporary file beside `path`, syncs it, then renames it over `path`: a crash or a full disk
    mid-write leaves the previous file untouched and no half-written file under the final name."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # on a read-only folder there is nothing to remove
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise GanError(f"could not write {path}: {exc.strerror or exc}; the previous version is intact") from exc
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def make_folder(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GanError(f"cannot create {what}: {exc.strerror or exc}") from exc
    if not folder.is_dir():
        raise GanError(f"cannot create {what}: a file of that name is in the way")


class StopSignal:
    """Turns Ctrl-C / SIGTERM / SIGHUP into a flag the loop checks between steps, so the run stops at a clean
    point and saves. Held until the run's last output is written: a second signal is ignored, the save
    finishes. A signal ignored at the start (nohup) stays ignored."""

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = self.signum or signum

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
                if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


try:  # advisory file locks; absent on Windows, where a second run on one folder is not detected
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None


class RunLock:
    """An exclusive lock on <run>/.lock held while training: a second process on the same folder is refused.
    The OS drops the lock when the process dies, so a crashed run never leaves it stuck."""

    def __init__(self, run_dir: Path) -> None:
        self.path, self.file = run_dir / ".lock", None

    def __enter__(self) -> RunLock:
        try:
            self.file = open(self.path, "a+")
        except OSError as exc:
            raise GanError(f"cannot write to the run folder {self.path.parent}: {exc.strerror}") from exc
        if fcntl is not None:
            try:
                fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self.file.seek(0)
                owner = self.file.read().strip() or "another process"
                self.file.close()
                raise GanError(
                    f"{self.path.parent} is in use by a training run ({owner}); wait for it or choose another --out-dir"
                ) from None
        try:
            self.file.seek(0)
            self.file.truncate()
            self.file.write(f"pid {os.getpid()}")
            self.file.flush()
        except OSError as exc:  # a full disk
            self.file.close()
            raise GanError(f"cannot write to the run folder {self.path.parent}: {exc.strerror or exc}") from None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.file is not None:
            self.file.close()  # closing releases the lock; the file stays, harmless


def holds_run(folder: Path) -> bool:
    """A folder holds a resumable run once it has a checkpoint."""
    return (folder / "checkpoints" / "last.pt").exists()


# Every name gan_mnist writes in a run folder. A new run starts only where none of them exists, so it never
# writes over results (a finished run whose checkpoints were deleted, `--out-dir .` in a project folder).
RUN_OUTPUTS = ("config.json", "losses.csv", "losses.png", "metrics.csv", "metrics.json", "metrics.png",
               "progress.gif", "generator.pt", "generator_best.pt", "samples", "checkpoints", "tensorboard",
               "summary.html")  # fmt: skip


def check_new_run_dir(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise GanError(f"--out-dir {folder} is a file, not a folder")
    if holds_run(folder):
        raise GanError(
            f"{folder} already holds a run; resume it with --resume "
            f"{folder / 'checkpoints' / 'last.pt'}, or choose another --out-dir"
        )
    found = [name for name in RUN_OUTPUTS if (folder / name).exists()]
    if found:
        raise GanError(
            f"{folder} already holds results of gan_mnist ({', '.join(found[:4])}); choose another --out-dir "
            "(a new run starts only in a new or empty folder, or one without gan_mnist's outputs)"
        )


def new_run_dir() -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        candidate = Path("outputs") / (f"run-{stamp}" if n == 1 else f"run-{stamp}-{n}")
        try:
            candidate.mkdir(parents=True, exist_ok=False)  # exist_ok=False: two starts never share a folder
            return candidate
        except FileExistsError:
            continue
        except OSError as exc:
            raise GanError(f"cannot create {candidate}: {exc.strerror}") from exc
    raise GanError("cannot find a free folder name under outputs/")


def prepare_run_folder(run: Run, resumed: bool) -> None:
    """Makes the sub-folders, removes a killed writer's temporaries, writes config.json; on a resume, cuts the
    loss and metric files and the sample grids back to the checkpoint, which is the truth."""
    for folder in (run.ckpt_dir, run.dir / "samples"):
        if folder.is_symlink():  # pruning there would delete files outside the run
            raise GanError(f"{folder} is a link; gan_mnist keeps a run's files in real folders inside the run folder")
        make_folder(folder, f"the folder {folder}")
    remove_stale_temporaries(run.dir)
    write_json(run.dir / "config.json", {**dataclasses.asdict(run.cfg), "invocations": run.state.invocations})
    if resumed:
        write_losses(run.dir, run.state.history, plot=False)
        prune_samples(run.dir / "samples", after_epoch=run.state.epoch)
        if run.state.metrics:
            write_metrics_csv(run.dir, run.state.metrics)


def own_files(folder: Path, prefix: str, suffix: str) -> list[tuple[int, Path]]:
    """gan_mnist's numbered files in `folder` (prefix + 4 or more digits + suffix, nothing else), by number:
    a user's `epoch_0002-best.pt` or `epoch_0002 (copy).png` is neither counted nor deleted."""
    pattern = re.compile(re.escape(prefix) + r"(\d{4,})" + re.escape(suffix))
    found = [(int(m.group(1)), p) for p in folder.glob(f"{prefix}*{suffix}") if (m := pattern.fullmatch(p.name))]
    return sorted(found)


def prune_samples(samples_dir: Path, after_epoch: int) -> None:
    for epoch, png in own_files(samples_dir, "epoch_", ".png"):
        if epoch > after_epoch:
            png.unlink()


def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    if keep > 0:
        for _, old in own_files(ckpt_dir, "epoch_", ".pt")[:-keep]:
            old.unlink()


def remove_stale_temporaries(run_dir: Path) -> None:
    """Temporary files of a process killed mid-write (atomic_write's `.NAME.tmpPID`), for gan_mnist's own
    names only; the real files beside them are intact."""
    pattern = re.compile(r"\.(.+)\.tmp\d+")
    for folder in (run_dir, run_dir / "checkpoints", run_dir / "samples"):
        for tmp in folder.glob(".*.tmp*"):
            m = pattern.fullmatch(tmp.name)
            name = m.group(1) if m else ""
            if name in RUN_OUTPUTS or re.fullmatch(r"(epoch_\d{4,}|last)\.(pt|png)", name):
                tmp.unlink(missing_ok=True)


MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")  # fmt: skip


def load_mnist(data_dir: str | Path, train: bool = True) -> tuple[Tensor, Tensor]:
    """MNIST through torchvision: (uint8 images N x 28 x 28, int64 labels N). Downloads when absent."""
    root = Path(data_dir)
    if root.exists() and not root.is_dir():
        raise GanError(f"--data-dir {root} is a file, not a folder")
    raw = root / "MNIST" / "raw"
    if not all((raw / name).is_file() for name in MNIST_FILES):
        new_folders = [d for d in (raw, raw.parent, root) if not d.exists()]
        try:  # torchvision prints each failed mirror; the one line below says it all
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                _torchvision().datasets.MNIST(root, train=train, download=True)
        except Exception as exc:
            for folder in new_folders:  # a failed download leaves no empty folders behind
                with contextlib.suppress(OSError):
                    folder.rmdir()
            reason = str(exc).strip().splitlines()[-1].strip(" <>") if str(exc).strip() else type(exc).__name__
            raise GanError(
                f"MNIST is not in {raw} (--data-dir {root}) and could not be downloaded ({reason}); put the four "
                f"files {', '.join(MNIST_FILES)} (or their .gz) in {raw}, e.g. from "
                "https://ossci-datasets.s3.amazonaws.com/mnist/, or pass --data-dir DIR where DIR/MNIST/raw holds them"
            ) from exc
    try:
        dataset = _torchvision().datasets.MNIST(root, train=train, download=False)
        images, labels = dataset.data, dataset.targets
    except Exception as exc:
        prefix = "train" if train else "t10k"
        for name in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
            try:
                _torchvision().datasets.mnist.read_sn3_pascalvincent_tensor(str(raw / name))
            except Exception:
                raise GanError(f"corrupt MNIST file {raw / name}: truncated or not an IDX file") from exc
        raise GanError(f"cannot read MNIST in {raw}: {exc}") from exc
    if images.shape[1:] != (28, 28) or len(images) != len(labels) or labels.min() < 0 or labels.max() >= 10:
        raise GanError(f"corrupt MNIST files in {raw}: images {tuple(images.shape)}, labels {tuple(labels.shape)}")
    return images, labels


# ========================================================================================== commands


@dataclass
class Result:
    """What a command returns to a caller of main(): exit code, run folder, per-epoch history, metrics."""

    exit_code: int
    out_dir: Path | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, Any] | None = None


MAX_SEED = 2**63 - 1  # torch.manual_seed takes a signed 64-bit integer
MAX_EVAL_NUM = 50_000  # digits per evaluation: images and features stay under about 250 MB
MAX_GRID = 10_000  # digits in one .png grid (a 100 x 100 grid is already 3,000 pixels wide)
MAX_NPY = 10_000_000  # digits in one .npy (7.8 GB on disk; written in chunks, memory stays small)
GENERATE_CHUNK = 10_000


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _device_arg(text: str) -> str:
    if text != "auto":
        try:
            kind = torch.device(text).type
        except RuntimeError:
            kind = None
        if kind not in ("cpu", "cuda", "mps"):
            raise argparse.ArgumentTypeError(f"unknown device {text!r} (auto, cpu, cuda, cuda:N, mps)")
    return text


def _seed_arg(text: str) -> int:
    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if not 0 <= seed <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"--seed must be in 0..{MAX_SEED}")
    return seed


def build_train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gan_mnist.py",
        description="Train a GAN on MNIST. Other commands: generate, evaluate, interpolate "
        "(see gan_mnist.py generate --help).",
    )
    for f in dataclasses.fields(Config):
        help_text = f.metadata["help"]
        if "default" not in help_text:
            help_text += f" (default: {f.default!r})"
        # SUPPRESS keeps flags the user did not type out of the namespace, which is how --resume knows
        # which settings to take from the command line and which from the checkpoint.
        if f.type == "bool":  # a flag that is on by default also gets its --no- form
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            parser.add_argument(_flag(f.name), action=action, default=argparse.SUPPRESS, help=help_text)
        else:
            kind = _device_arg if f.name == "device" else {"int": int, "float": float, "str": str}[f.type]
            parser.add_argument(
                _flag(f.name), type=kind, default=argparse.SUPPRESS, help=help_text, metavar=f.metadata.get("metavar")
            )
    return parser


def check_config(cfg: Config) -> str | None:
    """Returns what is wrong with a configuration, or None."""
    rules = [
        (cfg.epochs > 0, "--epochs must be a positive integer"),
        (cfg.batch_size > 0, "--batch-size must be a positive integer"),
        (cfg.lr > 0 and math.isfinite(cfg.lr), "--lr must be a positive number"),
        (0 <= cfg.b1 < 1, "--b1 must be in [0, 1)"),
        (0 <= cfg.b2 < 1, "--b2 must be in [0, 1)"),
        (cfg.latent_dim > 0, "--latent-dim must be a positive integer"),
        (0 <= cfg.ema_decay < 1, "--ema-decay must be in [0, 1)"),
        (cfg.subset >= 0, "--subset must be >= 0"),
        (
            cfg.subset == 0 or cfg.subset >= cfg.batch_size,
            f"--subset {cfg.subset} is smaller than one batch (--batch-size {cfg.batch_size})",
        ),
        (0 <= cfg.threads <= _cpus(), f"--threads must be 0 (auto) to {_cpus()}, the CPUs this process may use"),
        (0 <= cfg.seed <= MAX_SEED, f"--seed must be in 0..{MAX_SEED}"),
        (cfg.sample_every > 0, "--sample-every must be a positive integer"),
        (cfg.checkpoint_every > 0, "--checkpoint-every must be a positive integer"),
        (cfg.keep_checkpoints >= 0, "--keep-checkpoints must be >= 0"),
        (cfg.eval_every >= -1, "--eval-every must be a positive integer, 0 or -1"),
        (10 <= cfg.eval_num <= MAX_EVAL_NUM, f"--eval-num must be 10 to {MAX_EVAL_NUM}"),
        (cfg.precision in ("auto", "fp32", "bf16"), "--precision must be auto, fp32 or bf16"),
        (cfg.recipe in RECIPES, f"--recipe must be one of {', '.join(RECIPES)}"),
        (cfg.r1_gamma >= 0 and math.isfinite(cfg.r1_gamma), "--r1-gamma must be >= 0"),
        (cfg.r1_every > 0, "--r1-every must be a positive integer"),
        (cfg.lr_decay in ("none", "linear"), "--lr-decay must be none or linear"),
        (cfg.d_lr >= 0 and math.isfinite(cfg.d_lr), "--d-lr must be >= 0"),
    ]
    return next((message for ok, message in rules if not ok), None)


def command_parser(name: str, description: str, out_help: str) -> argparse.ArgumentParser:
    """The flags every command besides training shares."""
    p = argparse.ArgumentParser(prog=f"gan_mnist.py {name}", description=description)
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="generator.pt or a checkpoint .pt")
    p.add_argument("--out", required=name != "evaluate", default="", metavar="FILE", help=out_help)
    p.add_argument("--seed", type=_seed_arg, default=0, help="noise seed (default: 0)")
    p.add_argument("--device", type=_device_arg, default="auto", help="default: auto")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return p


def command_generator(args: argparse.Namespace, raw: bool = False) -> tuple[Generator, dict[str, Any], torch.device]:
    """The commands' prologue: the device, the CPU threads, the generator of --checkpoint."""
    device = resolve_device(args.device)
    torch.set_num_threads(auto_threads())
    G, obj = load_generator(args.checkpoint, device, raw=raw)
    return G, obj, device


def build_generate_parser() -> argparse.ArgumentParser:
    out_help = "FILE.png: a grid image; FILE.npy: uint8 N x 28 x 28; DIR/: one digit_NNNNN.png per digit"
    p = command_parser("generate", "Draw digits from a trained generator.", out_help)
    p.add_argument("--num", type=int, default=64, help="how many digits (default: 64)")
    p.add_argument("--digit", default=None, help="conditional models: 0-9, or 'all' for one row per digit")
    p.add_argument("--scale", type=int, default=1, help="enlarge each digit K times, nearest neighbour (default: 1)")
    return p


def generate_problem(args: argparse.Namespace) -> str | None:
    limit = MAX_NPY if args.out.lower().endswith(".npy") else MAX_GRID
    if not 1 <= args.scale <= 32:
        return "--scale must be 1 to 32"
    if not 0 < args.num <= limit:
        return f"--num must be 1 to {limit} for a {Path(args.out).suffix or 'grid'} file"
    return None


def generate_labels(args: argparse.Namespace, G: Generator) -> tuple[Tensor | None, int]:
    """The digit of each image (None: unconditional) and the grid's row width."""
    digit = args.digit
    if digit is not None and not G.num_classes:
        raise GanError(f"--digit needs a conditional generator; {args.checkpoint} is unconditional")
    if digit is None and G.num_classes:
        digit = "all"  # a conditional model draws one row per digit unless asked for one
    if digit == "all":
        per_row = math.ceil(args.num / 10)
        return torch.arange(10).repeat_interleave(per_row), per_row
    if digit is not None:
        if digit not in tuple("0123456789"):  # not isdigit(): it accepts '²', which int() refuses
            raise GanError(f"--digit {digit}: choose a digit 0-9 or 'all'")
        return torch.full((args.num,), int(digit)), max(1, int(math.sqrt(args.num)))
    return None, max(1, int(math.sqrt(args.num)))


def generate(args: argparse.Namespace) -> Result:
    out = Path(args.out)
    to_folder = args.out.endswith(("/", os.sep)) or out.is_dir()  # one PNG file per digit
    if not to_folder and out.suffix.lower() not in (".png", ".npy"):
        raise GanError(f"--out {out}: the file must end in .png or .npy, or be a folder (ending in /)")
    if to_folder and out.is_dir() and any(out.iterdir()):
        raise GanError(f"--out {out} already holds files; give a new or empty folder for one file per digit")
    G, _, device = command_generator(args)
    torch.manual_seed(args.seed)
    labels, nrow = generate_labels(args, G)
    num = len(labels) if labels is not None else args.num

    @torch.no_grad()
    def draw(start: int, count: int) -> Tensor:
        z = torch.randn(count, G.latent_dim).to(device)
        return G(z, None if labels is None else labels[start : start + count].to(device))

    make_folder(out if to_folder else out.parent, f"the folder of --out {out}")
    if to_folder:
        for i, image in enumerate(draw(0, num)):
            name = f"digit_{i:05d}" + ("" if labels is None else f"_{int(labels[i])}") + ".png"
            atomic_write(out / name, lambda f, image=image: grid_image(image[None], 1, args.scale).save(f, "PNG"))
    elif out.suffix.lower() == ".npy":  # streamed in chunks: a million digits need no more memory than 10,000

        def write_npy(f: IO[bytes]) -> None:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (num, 28, 28)})
            for start in range(0, num, GENERATE_CHUNK):
                f.write(to_uint8(draw(start, min(GENERATE_CHUNK, num - start))).numpy().tobytes())

        atomic_write(out, write_npy)
    else:
        images = draw(0, num)
        atomic_write(out, lambda f: grid_image(images, nrow, args.scale).save(f, "PNG"))
    print(f"wrote {num} digits to {out}" + (f" (digit_00000.png ... digit_{num - 1:05d}*.png)" if to_folder else ""))
    return Result(0, out.parent)


def build_evaluate_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "evaluate",
        "Score a generator with an MNIST judge network: prints a summary and writes every metric "
        "to CHECKPOINT.eval.json beside it (generator.pt -> generator.eval.json).",
        "metrics file (default: CHECKPOINT with .eval.json)",
    )
    p.add_argument("--num", type=int, default=10000, help="generated digits to score (default: 10000)")
    p.add_argument("--data-dir", default="./data", help="folder holding MNIST/raw/ (default: ./data)")
    p.add_argument("--judge", default="", metavar="PATH", help=Config.__dataclass_fields__["judge"].metadata["help"])
    p.add_argument("--raw", action="store_true", help="score the raw generator of a checkpoint, not its EMA")
    p.add_argument("--json", action="store_true", help="print the full metrics as one JSON line")
    p.add_argument(
        "--nearest", default="", metavar="FILE.png", help="picture: samples beside their nearest training digits"
    )
    return p


def evaluate_problem(args: argparse.Namespace) -> str | None:
    if not 10 <= args.num <= MAX_EVAL_NUM:  # as --eval-num: FID and the k-NN radii need a sample
        return f"--num must be 10 to {MAX_EVAL_NUM}"
    if args.nearest and not args.nearest.lower().endswith(".png"):
        return "--nearest must name a .png file"
    if args.out and not args.out.lower().endswith(".json"):
        return "--out must name a .json file"
    return None


def evaluate_command(args: argparse.Namespace) -> Result:
    # Beside the checkpoint, named after it: never the run's own metrics.json, which training writes.
    out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix(".eval.json")
    in_a_run = out.name in RUN_OUTPUTS and (out.parent / "checkpoints").is_dir()
    if out.resolve() == Path(args.checkpoint).resolve() or in_a_run:
        raise GanError(f"--out {out} is a file of the run or the checkpoint itself; name a new .json file")
    for path in (out, *([Path(args.nearest)] if args.nearest else [])):  # outputs checked before the work
        make_folder(path.parent, f"the folder of {path}")
    G, obj, _ = command_generator(args, raw=args.raw)  # a bad checkpoint fails before any work
    evaluator = Evaluator(args.data_dir, args.judge, args.num)
    images, labels = evaluator.sample(G, seed=args.seed)
    scores = evaluator.score(images, labels, memorise=True)
    weights = "ema" if obj["ema"] else "raw"
    metrics = {"checkpoint": str(args.checkpoint), "epoch": obj.get("epoch"), "weights": weights, **scores}
    copying = metrics["memorisation"]
    if args.json:
        print(json.dumps(metrics))
    else:
        print(f"{args.checkpoint} (epoch {metrics['epoch']}, {weights} weights), {len(images)} digits: "
              + metrics_line(metrics))  # fmt: skip
        print(
            f"memorisation: nearest training digit {copying['pixel_nearest_median']:.2f} px-distance (median) for "
            f"samples vs {copying['pixel_nearest_median_test']:.2f} for unseen test digits (ratio "
            f"{copying['pixel_ratio']:.2f}; judge features {copying['feature_ratio']:.2f}); near-copies "
            f"{copying['near_copy_share']:.1%} (test digits: 1% by construction)"
        )
    write_json(out, metrics)  # after the summary: a failed write never hides what was measured
    if args.nearest:
        nearest_picture(Path(args.nearest), images, evaluator.train_images)
    if not args.json:
        print(f"wrote all metrics to {out}" + (f", nearest training digits to {args.nearest}" if args.nearest else ""))
    return Result(0, out.parent, metrics=metrics)


def build_interpolate_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "interpolate",
        "Walk smoothly through the generator's noise space (spherical interpolation between seeded "
        "random points): an animated GIF of several walks side by side, or a PNG with one walk per row. For a "
        "conditional generator, --digits morphs through digits with the noise held fixed.",
        "walk.gif (animated) or walk.png (one walk per row)",
    )
    p.add_argument("--paths", type=int, default=8, help="walks side by side / rows (default: 8)")
    p.add_argument("--points", type=int, default=0, help="random points each walk passes (default: 4 GIF, 2 PNG)")
    p.add_argument("--frames", type=int, default=0, help="GIF frames / PNG columns (default: 48 GIF, 10 PNG)")
    p.add_argument("--digits", default=None, help="conditional models: digits to morph through, e.g. 0123456789")
    p.add_argument("--scale", type=int, default=0, help="enlarge each digit K times (default: 2 GIF, 1 PNG)")
    return p


def interpolate_problem(args: argparse.Namespace) -> str | None:
    rules = [
        (Path(args.out).suffix.lower() in (".gif", ".png"), "--out must end in .gif or .png"),
        (1 <= args.paths <= 100, "--paths must be 1 to 100"),
        (args.frames == 0 or 2 <= args.frames <= 1000, "--frames must be 2 to 1000"),
        (args.points == 0 or 2 <= args.points <= 100, "--points must be 2 to 100"),
        (0 <= args.scale <= 32, "--scale must be 1 to 32"),
        (
            args.digits is None or (len(args.digits) >= 2 and set(args.digits) <= set("0123456789")),
            "--digits must be two or more of 0-9, e.g. 0123456789",
        ),
    ]
    return next((message for ok, message in rules if not ok), None)


def slerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """Spherical interpolation between rows of a and b at fractions t (T): T x N x d. Gaussian z of this size
    lie near a sphere, so a straight line between two would pass through unlikely, low-norm noise."""
    cos = F.cosine_similarity(a, b, dim=-1).clamp(-1, 1)
    omega = torch.acos(cos)[None, :, None]
    t = t[:, None, None]
    sin = torch.sin(omega).clamp_min(1e-6)
    return torch.sin((1 - t) * omega) / sin * a + torch.sin(t * omega) / sin * b


def walk_fractions(points: int, frames: int, loop: bool) -> tuple[Tensor, Tensor]:
    """For each frame: which segment of the walk it is on, and how far along it (0 to 1)."""
    segments = points if loop else points - 1
    position = torch.linspace(0, segments, frames + (1 if loop else 0))[: frames if loop else None]
    segment = position.floor().long().clamp(max=segments - 1)
    return segment, position - segment


@torch.no_grad()
def walk(args: argparse.Namespace, G: Generator, device: torch.device, frames: int, gif: bool) -> Tensor:
    """frames x paths x 1 x 28 x 28 images along the walks (through --digits, or random points)."""
    rng = torch.Generator().manual_seed(args.seed)
    if args.digits:  # z held fixed per walk; the label embedding moves from digit to digit
        z = torch.randn(args.paths, G.latent_dim, generator=rng).to(device)
        waypoints = G.label_embedding(torch.tensor([int(d) for d in args.digits], device=device))
        segment, t = walk_fractions(len(args.digits), frames, loop=gif)
        vectors = torch.lerp(waypoints[segment], waypoints[(segment + 1) % len(waypoints)], t[:, None].to(device))
        return torch.stack([G.decode(z, v.expand(args.paths, -1)) for v in vectors])
    points = args.points or (4 if gif else 2)
    waypoints = torch.randn(points, args.paths, G.latent_dim, generator=rng).to(device)
    segment, t = walk_fractions(points, frames, loop=gif)
    t = t.to(device)
    z = torch.stack([slerp(waypoints[s], waypoints[(s + 1) % points], t[i : i + 1])[0] for i, s in enumerate(segment)])
    labels = (torch.arange(args.paths, device=device) % NUM_CLASSES) if G.num_classes else None
    return torch.stack([G(zf, labels) for zf in z])


def interpolate(args: argparse.Namespace) -> Result:
    out, gif = Path(args.out), Path(args.out).suffix.lower() == ".gif"
    per_digit = 12 if gif else 3  # frames from one digit to the next with --digits
    default_frames = (len(args.digits) - (0 if gif else 1)) * per_digit + (0 if gif else 1) if args.digits else 0
    frames = args.frames or default_frames or (48 if gif else 10)
    scale = args.scale or (2 if gif else 1)
    G, _, device = command_generator(args)
    if args.digits and not G.num_classes:
        raise GanError(f"--digits needs a conditional generator; {args.checkpoint} is unconditional")
    images = walk(args, G, device, frames, gif)
    make_folder(out.parent, f"the folder of --out {out}")
    if gif:
        nrow = math.ceil(math.sqrt(args.paths))
        save_gif(out, [grid_image(frame, nrow, scale).convert("P") for frame in images], duration=80)
    else:  # one walk per row
        rows = images.transpose(0, 1).reshape(-1, *IMAGE_SHAPE)
        atomic_write(out, lambda f: grid_image(rows, frames, scale).save(f, "PNG"))
    print(f"wrote {args.paths} walk{'s' if args.paths > 1 else ''} of {frames} frames to {out}")
    return Result(0, out.parent)


# Each command besides training: its parser, what is wrong with its arguments, and what runs it.
COMMANDS: dict[str, tuple[Callable[[], argparse.ArgumentParser], Callable, Callable[[argparse.Namespace], Result]]] = {
    "generate": (build_generate_parser, generate_problem, generate),
    "evaluate": (build_evaluate_parser, evaluate_problem, evaluate_command),
    "interpolate": (build_interpolate_parser, interpolate_problem, interpolate),
}


def main(argv: list[str] | None = None) -> Result:
    """Entry point: `main(["--epochs", "2"])` trains, `main(["generate", ...])` samples. Returns a Result;
    usage errors raise SystemExit(2) as argparse does."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        build, problem_of, command = COMMANDS[argv[0]]
        parser = build()
        args = parser.parse_args(argv[1:])
        problem = problem_of(args)
        if problem:
            parser.error(problem)
        run, debug = functools.partial(command, args), args.debug
    else:
        parser = build_train_parser()
        namespace = vars(parser.parse_args(argv))
        if namespace.get("recipe", Config.recipe) not in RECIPES:
            parser.error(f"--recipe must be one of {', '.join(RECIPES)}")
        cfg = recipe_config(namespace)
        problem = check_config(cfg)
        if problem:
            parser.error(problem)
        run, debug = functools.partial(train, cfg, set(namespace)), cfg.debug
    try:
        return run()
    except GanError as exc:
        if debug:
            traceback.print_exc()
        print(f"gan_mnist: error: {exc}", file=sys.stderr, flush=True)
        return Result(1)
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (start-up, generate, evaluate): nothing to save
        if debug:
            traceback.print_exc()
        print("gan_mnist: interrupted", file=sys.stderr, flush=True)
        return Result(128 + signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main().exit_code)
