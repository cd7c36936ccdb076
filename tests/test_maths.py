"""The GAN's maths, tested directly: which way each update moves D and G, the EMA blend, each stabiliser of
the stable recipe against its formula, and the tutorial recipe against a fingerprint of the weights it gave
before recipes existed."""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import load

import gan_mnist

# weights_sha256 of G, D and EMA after `--epochs 2` on tests/data with conftest.FAST, made by gan_mnist itself at
# commit a95538e (before --recipe existed; "" and "--conditional": --recipe tutorial must give the tutorial's maths
# bit for bit) and at 682f331 ("default", before the readability refactor: the refactor changed no number).
# Bit patterns depend on the CPU's kernels, so each set is keyed by what picks them (cpu_kernels): made on an
# AVX-512 CPU with native bf16 (AMD EPYC), on one whose oneDNN also runs bf16 on AMX tiles (Intel Xeon), and on
# an AVX2 CPU without bf16 (AMD EPYC of 2019, fp32). The vendor is part of the key: MKL picks its own kernels.
FINGERPRINTS = {
    ("AuthenticAMD", "AVX512", True, False): {
        "": ("a44c35c421a54cc4f23a37e3d4c8e3a583aa6d25da068ef9637e67b3ee348e92",
             "cca5ef98b64a82f3535755a81278f0b4ee7d2588118ba22a4f41c27d90d79c64",
             "e7e8defea0506a5f7b6b647d46b4c6795de7821e93c75df1a123541ee1861871"),
        "--conditional": ("5cb209694dcf4aadad722c9fba42b2bcf01af3b71d5d58da7e7b94bfa456283d",
                          "5ac0f3f4d88c4da4a5de5444253821a3bcbf77026148b03e876eef0b9eb27a50",
                          "637a97e708ed22ac9d47d82d86712ee0d2789a2d5ccbcc39737b1a0a698062ba"),
        "default": ("d309e64608196af6587604d13fb160e5b390aaa42ff2f94fb9d6641971ff5278",
                    "b8b284650caa9bd290318d15a2746969cd3fc24361b977c3ec69e0b338fe4b79",
                    "a8bb411fed1396af15ec3d3785b0ea0829d413c4f0202bbcc4115c00aa2a31f2"),
    },
    ("GenuineIntel", "AVX512", True, True): {
        "": ("de4e2b90ba129c3b262acf66ef1b77cdca7a845f1e21b4bb47c1c2ad29175535",
             "e118ee431176a378f509adf4e3cbaaa478c6e550ed474efa8f4d2a4840618a9d",
             "9b48edfd1841eec5f3ed38af925a9b464727a86bfda5c268a7b876b1b23748ad"),
        "--conditional": ("e3827f10562f1cebcd12964c4eb9b14765059bc565f533d16cc9c81b503bc986",
                          "d1ba41a7b5176b7e076d164e1d0a972aaf63cd308105ed2069da935200908f28",
                          "d66db9cf7e1c14d3a90b672ca1399dd7aa46cc8210a93ad222bbe595748a22b0"),
        "default": ("ff4965a80eb408f55cf43eb3c46196e17fe19ffeb7be69085d7b8e112ba556f4",
                    "f75632dd3391bc17a04b3631d09958c7677486afd6d9578ff5c7bda4c2752729",
                    "8c378dc14432f1ec7ef8335fd0a83d1b2ac1d03da58dcd4095630d0e83e7e442"),
    },
    ("AuthenticAMD", "AVX2", False, False): {
        "": ("ace0ebeee46ab484ad7b75b1016a71e8015ac348ccfb7598de6a93c6c34aafaa",
             "45ed82ec03c3fc8ae63a38dc60bd0c56cf71d35699f5fad13cba00edfb0c4a00",
             "6c283b5bdc55f139d1012718be4becabc3c9d2d6a2a3999c56efb22d3197dcd3"),
        "--conditional": ("4cb9f97dbe8fbf384beaf6f7af5bbf3ea61555ed6ac832c339666cd1ffd61640",
                          "69bb3739ace15c039f8dbec12a97c2bde2908e1f5362f3c1cb222ddd83237c9b",
                          "3bba7239b220f910dce8a853df3bfa8cc61f423f865e60e04f3f8da1838bf5bb"),
        "default": ("6ae365bc4fcbc8e3bb20adb1f3ec9cb98b809460b5a1b0f036fcb78586afb315",
                    "de404c099320acee97772013243906e15bba3a784bcde62ee509fe1ab0963b87",
                    "dc386a64e5194a3edaa408c3175dec77f623d57329355fb60ae6a35fdaf95390"),
    },
}  # fmt: skip


def cpu_vendor() -> str:
    """x86's vendor id from /proc/cpuinfo (Linux); elsewhere, or on CPUs without one (ARM), what platform says."""
    with contextlib.suppress(OSError):
        if found := re.search(r"vendor_id\s*:\s*(\S+)", Path("/proc/cpuinfo").read_text()):
            return found.group(1)
    return platform.processor() or "unknown"


def cpu_kernels() -> tuple[str, str, bool, bool]:
    """The vendor, ATen's vector ISA, oneDNN's native bf16, and whether oneDNN may use AMX (ONEDNN_MAX_CPU_ISA caps)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "ALL")).upper()
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)() and (cap in ("ALL", "DEFAULT") or "AMX" in cap)
    bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return cpu_vendor(), torch.backends.cpu.get_cpu_capability(), bf16, amx


THIS_CPU = cpu_kernels()
FINGERPRINT_CASES = pytest.mark.parametrize(
    ("flags", "before"),
    [
        ([], "default"),
        (["--recipe", "tutorial"], ""),
        (["--recipe", "tutorial", "--conditional"], "--conditional"),
        # The default recipe trains a conditional MLP GAN with the tutorial's maths (PRESETS), so the
        # conditional GAN keeps the figures it had before recipes existed, bit for bit.
        (["--conditional"], "--conditional"),
    ],
    ids=["default", "tutorial", "tutorial-conditional", "default-conditional"],
)


@FINGERPRINT_CASES
@pytest.mark.skipif(THIS_CPU not in FINGERPRINTS, reason=f"fingerprints made on {list(FINGERPRINTS)}, not {THIS_CPU}")
def test_tutorial_maths_reproduce_the_weights_of_before(train, tmp_path: Path, flags: list[str], before: str) -> None:
    assert train("run", "--epochs", "2", *flags).exit_code == 0
    ckpt = load(tmp_path / "run" / "checkpoints" / "last.pt")
    got = tuple(gan_mnist.weights_sha256(ckpt[k]) for k in ("generator", "discriminator", "ema"))
    assert got == FINGERPRINTS[THIS_CPU][before]


# The mean losses and D outputs of epochs 1 and 2 in fp32 for the same runs: the same on AVX-512 and AVX2.
FP32_LOSSES = {
    "default": [0.5312, 0.6061, 0.7834, 0.5488, 0.5794, 0.5615, 0.8579, 0.6311],
    "": [0.5308, 0.6051, 0.7855, 0.5496, 0.5832, 0.5593, 0.8663, 0.6366],
    "--conditional": [0.6341, 0.5589, 0.8698, 0.5977, 0.5749, 0.5814, 0.9815, 0.669],
}


@FINGERPRINT_CASES
def test_the_recipes_train_the_same_on_any_cpu_within_a_tolerance(train, tmp_path: Path, flags, before) -> None:
    """Where the fingerprints cannot hold (another instruction set), the same recipes in fp32 log the same losses
    within a tolerance that a changed recipe misses by far. The default conditional recipe is the tutorial's."""
    assert train("run", "--epochs", "2", "--precision", "fp32", *flags).exit_code == 0
    history = load(tmp_path / "run" / "checkpoints" / "last.pt")["history"]
    got = [row[key] for row in history for key in ("d_loss", "g_loss", "d_x", "d_g_z")]
    assert got == pytest.approx(FP32_LOSSES[before], abs=1e-3)


def make_nets(*flags: str, seed: int = 0) -> tuple[gan_mnist.Nets, gan_mnist.Config]:
    """Networks as the trainer builds them, in fp32 (exact comparisons), for the given recipe flags."""
    namespace = vars(gan_mnist.build_train_parser().parse_args(["--precision", "fp32", *flags]))
    cfg = gan_mnist.recipe_config(namespace)
    torch.manual_seed(seed)
    nets = gan_mnist.build_nets(cfg, torch.device("cpu"))
    gan_mnist.set_schedule(nets, cfg, 1)
    return nets, cfg


def real_batch(data_dir: Path, n: int = 64) -> torch.Tensor:
    images, _ = gan_mnist.load_mnist(data_dir)
    return gan_mnist.to_model_range(images[:n])


def test_one_step_moves_d_and_g_the_right_way(data_dir: Path) -> None:
    """(1) D's step raises its logit on real digits and lowers it on fakes; (2) G's step raises D(G(z))."""
    nets, _ = make_nets("--recipe", "tutorial")
    real = real_batch(data_dir)
    for _ in range(20):  # at initialisation real and fake look alike to D: one step lifts both
        gan_mnist.train_step(nets, real, None)
    # Then plain gradient steps: Adam moves every weight by about lr whatever its gradient; the loss's own
    # direction is what this test is about.
    nets.opt_d = torch.optim.SGD(nets.D.parameters(), lr=0.05)
    nets.opt_g = torch.optim.SGD(nets.G.parameters(), lr=0.05)
    torch.manual_seed(5)
    z = torch.randn(64, 100)  # the noise the step will draw
    g0, d0 = copy.deepcopy(nets.G), copy.deepcopy(nets.D)
    with torch.no_grad():
        fake = g0(z)
        before_real, before_fake = d0(real).mean(), d0(fake).mean()
    torch.manual_seed(5)
    gan_mnist.train_step(nets, real, None)
    with torch.no_grad():
        assert nets.D(real).mean() > before_real
        assert nets.D(fake).mean() < before_fake
        # G against the D it was trained on (D after step 1): its fakes now look more real to that D.
        assert nets.D(nets.G(z)).mean() > nets.D(fake).mean()
    assert any(not torch.equal(a, b) for a, b in zip(nets.G.parameters(), g0.parameters())), "G must step"


def test_ema_is_the_expected_blend_of_its_previous_value_and_g(data_dir: Path) -> None:
    nets, cfg = make_nets("--recipe", "tutorial")
    real = real_batch(data_dir)
    for _ in range(30):  # past the warm-up: decay (1+t)/(10+t) reaches 0.9 at t = 80, so still warming
        gan_mnist.train_step(nets, real, None)
    t = nets.ema_updates.item()
    before = [p.clone() for p in nets.ema.parameters()]
    gan_mnist.train_step(nets, real, None)
    decay = min((1 + t + 1) / (10 + t + 1), cfg.ema_decay)
    for ema, old, g in zip(nets.ema.parameters(), before, nets.G.parameters()):
        torch.testing.assert_close(ema, decay * old + (1 - decay) * g, rtol=1e-5, atol=1e-6)
        assert not torch.equal(ema, old)


def d_gradients(nets: gan_mnist.Nets, real: torch.Tensor, r1: bool, seed: int = 3) -> list[torch.Tensor]:
    """D's gradient of the D step train_step takes (D's .grad after a step: G's step leaves it alone)."""
    lrs = [g["lr"] for g in nets.opt_d.param_groups]
    for g in nets.opt_d.param_groups:
        g["lr"] = 0.0  # read the gradient without moving D
    torch.manual_seed(seed)
    gan_mnist.train_step(nets, real, None, r1)
    for g, lr in zip(nets.opt_d.param_groups, lrs):
        g["lr"] = lr
    return [p.grad.clone() for p in nets.D.parameters()]


def test_r1_penalty_is_gamma_over_2_times_the_squared_gradient_at_real_digits(data_dir: Path) -> None:
    nets, cfg = make_nets("--r1-gamma", "2.5", "--r1-every", "4")
    real = real_batch(data_dir, 16)
    got = d_gradients(copy.deepcopy(nets), real, r1=True)
    # The same D step by hand: BCE on real and fake, plus (gamma / 2) * every * E|grad_x D(x)|^2 on real.
    torch.manual_seed(3)
    fake = nets.G(torch.randn(16, 100)).detach()
    x = real.clone().requires_grad_(True)
    logits = nets.D(torch.cat([x, fake]))
    bce = F.binary_cross_entropy_with_logits(logits, torch.cat([torch.ones(16), torch.zeros(16)]))
    (grad_x,) = torch.autograd.grad(logits[:16].sum(), x, create_graph=True)
    loss = bce + 2.5 / 2 * 4 * grad_x.square().sum(dim=(1, 2, 3)).mean()
    expected = torch.autograd.grad(loss, list(nets.D.parameters()))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # And without the penalty the gradient is BCE's alone: the penalty really is applied only on R1 steps.
    plain = d_gradients(copy.deepcopy(nets), real, r1=False)
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(plain, got))


def test_r1_is_applied_every_nth_step_of_the_run(train, monkeypatch) -> None:
    flags: list[bool] = []
    real_step = gan_mnist.train_step
    monkeypatch.setattr(gan_mnist, "train_step", lambda n, x, y, r1, g: (flags.append(r1), real_step(n, x, y, r1, g)))
    assert train("run", "--epochs", "2", "--r1-every", "3").exit_code == 0  # 8 steps an epoch
    assert [i for i, on in enumerate(flags) if on] == [0, 3, 6, 9, 12, 15]
    flags.clear()
    assert train("tut", "--epochs", "1", "--recipe", "tutorial").exit_code == 0
    assert flags and not any(flags)


def test_schedules_follow_their_formulas() -> None:
    nets, cfg = make_nets("--epochs", "10", "--lr-decay", "linear", "--d-lr", "4e-4")
    for epoch, remaining in ((1, 1.0), (6, 0.5), (10, 0.1)):
        gan_mnist.set_schedule(nets, cfg, epoch)
        assert nets.opt_g.param_groups[0]["lr"] == pytest.approx(2e-4 * remaining)
        assert nets.opt_d.param_groups[0]["lr"] == pytest.approx(4e-4 * remaining)  # TTUR: D's own rate
    nets, cfg = make_nets("--epochs", "10", "--lr-decay", "none")
    gan_mnist.set_schedule(nets, cfg, 10)
    assert nets.opt_g.param_groups[0]["lr"] == 2e-4


def test_recipes_preset_what_the_readme_says_and_typed_flags_win() -> None:
    def settings(*flags: str) -> tuple[float, int, str]:
        cfg = make_nets("--epochs", "200", *flags)[1]
        return cfg.r1_gamma, cfg.r1_every, cfg.lr_decay

    assert settings() == (1.0, 8, "none")  # lazy R1 at a constant learning rate
    assert settings("--conditional") == (0.0, 8, "none")  # without R1, D keeps the digits apart best
    clusters = lambda *flags: make_nets(*flags)[1].clusters  # noqa: E731
    assert clusters("--arch", "dcgan") == 40 and settings("--arch", "dcgan") == (1.0, 8, "none")  # its best (README)
    assert (
        clusters()
        == clusters("--arch", "dcgan", "--conditional")
        == clusters("--arch", "dcgan", "--loss", "wgan-gp")
        == 0
    )
    assert settings("--arch", "dcgan", "--clusters", "0") == (8.0, 8, "none")  # without: 8 times the default's R1
    assert settings("--arch", "dcgan", "--clusters", "0", "--r1-gamma", "1")[0] == 1.0
    assert settings("--arch", "dcgan", "--clusters", "20", "--r1-gamma", "2")[0] == 2.0
    assert settings("--arch", "dcgan", "--loss", "wgan-gp")[0] == 0.0  # the gradient penalty replaces R1
    assert settings("--conditional", "--arch", "dcgan") == (1.0, 8, "none")  # its stronger D needs R1 (README)
    assert settings("--conditional", "--arch", "dcgan", "--loss", "wgan-gp")[0] == 0.0  # the penalty instead
    assert settings("--recipe", "tutorial") == settings("--recipe", "tutorial", "--conditional") == (0.0, 8, "none")
    assert settings("--conditional", "--r1-gamma", "2") == (2.0, 8, "none")
    assert settings("--recipe", "tutorial", "--lr-decay", "linear")[2] == "linear"
    nets, cfg = make_nets("--epochs", "200")
    gan_mnist.set_schedule(nets, cfg, 200)
    assert nets.opt_g.param_groups[0]["lr"] == nets.opt_d.param_groups[0]["lr"] == 2e-4


def test_spectral_norm_changes_d_as_documented(data_dir: Path) -> None:
    x = real_batch(data_dir, 8)
    nets, _ = make_nets("--spectral-norm")
    for _ in range(30):  # the power iteration converges over forward passes in training mode
        nets.D(x)
    layers = [m for m in nets.D.modules() if isinstance(m, torch.nn.Linear)]
    assert len(layers) == 3
    for layer in layers:
        assert torch.linalg.matrix_norm(layer.weight.detach(), 2).item() == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize(
    "flags",
    [  # those whose state crosses a resume run by default; the others' maths is tested above
        pytest.param(["--lr-decay", "linear"], id="lr-decay"),
        pytest.param(["--r1-every", "1"], id="r1-every"),
        pytest.param(["--spectral-norm"], id="spectral-norm", marks=pytest.mark.slow),
        pytest.param(["--d-lr", "4e-4", "--lr", "1e-4"], id="ttur", marks=pytest.mark.slow),
    ],
)
def test_each_stabiliser_trains_and_resumes_exactly(train, tmp_path: Path, flags: list[str]) -> None:
    assert train("straight", "--epochs", "2", *flags).exit_code == 0
    assert train("half", "--epochs", "1", *flags).exit_code == 0
    resumed = gan_mnist.main(["--resume", str(tmp_path / "half" / "checkpoints" / "last.pt"), "--epochs", "2"])
    assert resumed.exit_code == 0
    a, b = load(tmp_path / "straight" / "checkpoints" / "last.pt"), load(tmp_path / "half" / "checkpoints" / "last.pt")
    assert gan_mnist.weights_sha256(a["generator"]) == gan_mnist.weights_sha256(b["generator"])
    assert gan_mnist.weights_sha256(a["discriminator"]) == gan_mnist.weights_sha256(b["discriminator"])
    recorded = a["config"]
    for name, value in zip(flags, [*flags[1:], None]):
        if name.startswith("--"):  # the run records the stabiliser it used
            key = name[2:].replace("-", "_")
            assert recorded[key] == (True if value is None or value.startswith("--") else type(recorded[key])(value))
