"""The CUDA path: on a machine that has CUDA (those tests skip elsewhere; benchmarks/gpu_check.sh runs them on a GPU), a
training step on the GPU, a CUDA checkpoint resumed, and CUDA graphs against eager steps."""

from __future__ import annotations

import copy
import functools
import types
from pathlib import Path

import pytest
import torch
from conftest import load

import gan_mnist

CUDA = ["--device", "cuda"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_the_ema_update_reads_nothing_back_to_the_host() -> None:
    """On CUDA a value read back is a sync in every step, and inside a CUDA graph's capture an error; a meta tensor
    (no data, on any machine) refuses every read-back, so the update runs there only if it reads none."""
    G = gan_mnist.Generator(arch="dcgan").to("meta")
    ema, zeros = copy.deepcopy(G).requires_grad_(False), functools.partial(torch.zeros, device="meta")
    with torch.no_grad():  # as train_step calls it
        gan_mnist.Nets(G, None, None, None, ema, 0.999, zeros(4), zeros(())).update_ema()


def test_a_capturable_learning_rate_lives_on_the_parameters_device() -> None:
    """A resumed optimiser's capturable lr is the tensor the checkpoint saved, loaded to the CPU, where a CUDA graph
    bakes in its value at capture and --lr-decay stops; each epoch's schedule puts it on the parameters' device,
    then changes it in place, at the address a graph reads."""
    groups = [{"params": [torch.zeros(1, device="meta")], "capturable": True, "lr": torch.tensor(1.0)}]
    opt = types.SimpleNamespace(param_groups=groups)
    nets = types.SimpleNamespace(opt_g=opt, opt_d=types.SimpleNamespace(param_groups=[]))
    cfg = gan_mnist.Config(lr_decay="linear", epochs=10)
    gan_mnist.set_schedule(nets, cfg, 1)
    lr = groups[0]["lr"]
    assert lr.device.type == "meta"
    gan_mnist.set_schedule(nets, cfg, 2)
    assert groups[0]["lr"] is lr


@needs_cuda
def test_a_cuda_run_trains_evaluates_and_samples(train, tmp_path: Path) -> None:
    result = train("run", "--epochs", "2", *CUDA, "--eval-every", "1", "--eval-num", "64")
    assert result.exit_code == 0
    ckpt = load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["rng"]["cuda"] is not None and ckpt["invocations"][0]["device"].startswith("cuda")
    assert all(torch.isfinite(t).all() for t in ckpt["generator"].values())
    argv = ["generate", "--checkpoint", str(tmp_path / "run" / "generator.pt"), "--out", str(tmp_path / "d.npy")]
    assert gan_mnist.main([*argv, *CUDA]).exit_code == 0


@needs_cuda
def test_a_cuda_checkpoint_resumes_exactly_or_within_float_noise(train, tmp_path: Path) -> None:
    """Bit for bit where cuBLAS picks the same kernels; the stated tolerance covers atomics in backward passes."""
    assert train("straight", "--epochs", "2", *CUDA).exit_code == 0
    assert train("split", "--epochs", "1", *CUDA).exit_code == 0
    last = tmp_path / "split" / "checkpoints" / "last.pt"
    assert gan_mnist.main(["--resume", str(last), "--epochs", "2", "--quiet"]).exit_code == 0
    a, b = load(tmp_path / "straight" / "checkpoints" / "last.pt"), load(last)
    for key in ("generator", "discriminator"):
        for name, tensor in a[key].items():
            torch.testing.assert_close(tensor, b[key][name], rtol=1e-5, atol=1e-6, msg=f"{key}.{name}")


@needs_cuda
@pytest.mark.parametrize(
    "flags",
    [
        {},
        {"r1_gamma": 1.0, "r1_every": 1},
        {"arch": "dcgan"},
        {"loss": "wgan-gp"},
        {"arch": "dcgan", "loss": "wgan-gp"},
    ],
)
def test_cuda_graph_steps_match_eager_steps(data_dir: Path, flags: dict) -> None:
    """Three eager warm-up steps of each kind, then graph replays: the weights after 16 steps match 16 eager steps
    (batch norm's statistics, the gradient penalty's random alphas and the critic's schedule included)."""
    images, _ = gan_mnist.load_mnist(data_dir)
    device = torch.device("cuda")
    real = gan_mnist.to_model_range(images[:64], device)
    weights = []
    for graph in (False, True):
        torch.manual_seed(0)
        cfg = gan_mnist.recipe_config({"precision": "fp32", **flags})
        nets = gan_mnist.build_nets(cfg, device, capturable=graph)
        gan_mnist.set_schedule(nets, cfg, 1)
        step = (
            gan_mnist.CudaGraphStep(nets, 64, False, device) if graph else functools.partial(gan_mnist.train_step, nets)
        )
        for i in range(16):
            step(real, None, cfg.r1_gamma > 0 and i % cfg.r1_every == 0, i % cfg.n_critic == 0)
        torch.cuda.synchronize()
        weights.append([t.detach().clone() for t in [*nets.G.state_dict().values(), *nets.D.parameters()]])
    for eager, captured in zip(*weights):
        torch.testing.assert_close(captured, eager, rtol=1e-4, atol=1e-5)
