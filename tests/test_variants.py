"""The GANs the tutorial names next, in the same loop: --arch dcgan and --loss wgan-gp. Each trains, resumes bit for
bit (also mid-epoch), keeps its record in its files, and is rebuilt by the commands from the file alone; the
gradient penalty is checked against its formula computed one sample at a time."""

from __future__ import annotations

import copy
import csv
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import load
from test_maths import make_nets, real_batch

import gan_mnist

VARIANTS = pytest.mark.parametrize("flags", [["--arch", "dcgan"], ["--loss", "wgan-gp"],
                                             ["--arch", "dcgan", "--loss", "wgan-gp"]])  # fmt: skip


@pytest.mark.parametrize(
    "flags", [["--arch", "dcgan"], ["--loss", "wgan-gp"], ["--arch", "dcgan", "--loss", "wgan-gp", "--conditional"]]
)
def test_each_variant_trains_records_itself_and_is_rebuilt_by_generate(train, tmp_path: Path, flags) -> None:
    assert train("run", "--epochs", "2", *flags).exit_code == 0
    arch = "dcgan" if "dcgan" in flags else "mlp"
    critic = "wgan-gp" in flags
    with open(tmp_path / "run/losses.csv") as f:
        rows = list(csv.DictReader(f))
    # A critic's outputs are scores, not probabilities: the columns say so, and real scores above fake ones.
    assert (
        list(rows[0]) == ["epoch", "d_loss", "g_loss", "critic_real", "critic_fake", "seconds"]
        if critic
        else (list(rows[0]) == ["epoch", "d_loss", "g_loss", "d_x", "d_g_z", "seconds"])
    )
    if critic:
        assert float(rows[-1]["critic_real"]) > float(rows[-1]["critic_fake"])
    saved = load(tmp_path / "run/generator.pt")
    assert saved["arch"] == arch and load(tmp_path / "run/checkpoints/last.pt")["config"]["arch"] == arch
    for source in ("generator.pt", "checkpoints/last.pt"):
        G, _ = gan_mnist.load_generator(tmp_path / "run" / source, torch.device("cpu"))
        assert G.arch == arch and any(isinstance(m, torch.nn.ConvTranspose2d) for m in G.modules()) == (arch == "dcgan")
    out = tmp_path / "digits.png"
    assert (
        gan_mnist.main(["generate", "--checkpoint", str(tmp_path / "run/generator.pt"), "--out", str(out)]).exit_code
        == 0
    )
    assert out.stat().st_size > 0
    walk = tmp_path / "walk.gif"
    result = gan_mnist.main(["interpolate", "--checkpoint", str(tmp_path / "run/generator.pt"), "--out", str(walk),
                             "--paths", "2", "--points", "2", "--frames", "3"])  # fmt: skip
    assert result.exit_code == 0 and walk.stat().st_size > 0


def weights(path: Path) -> dict[str, torch.Tensor]:
    ckpt = load(path)
    return {f"{net}.{k}": v for net in ("generator", "discriminator", "ema") for k, v in ckpt[net].items()}


@VARIANTS
def test_variants_resume_bit_for_bit_at_an_epoch_and_mid_epoch(train, tmp_path: Path, monkeypatch, flags) -> None:
    flags = [*flags, "--subset", "256"]  # 4 steps an epoch
    assert train("straight", "--epochs", "3", *flags).exit_code == 0
    assert train("split", "--epochs", "1", *flags).exit_code == 0
    last = tmp_path / "split/checkpoints/last.pt"
    calls = {"n": 0}
    real_step = gan_mnist.train_step

    def step_then_ctrl_c(*args):
        real_step(*args)
        calls["n"] += 1
        if calls["n"] == 3:  # epoch 2, step 3 of 4: between two G steps of WGAN-GP's 5 critic steps
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(gan_mnist, "train_step", step_then_ctrl_c)
    assert gan_mnist.main(["--resume", str(last), "--epochs", "3", "--threads", "1", "--quiet"]).exit_code == 130
    monkeypatch.undo()
    assert (load(last)["epoch"], load(last)["step"]) == (1, 3)
    assert gan_mnist.main(["--resume", str(last), "--threads", "1", "--quiet"]).exit_code == 0
    a, b = weights(tmp_path / "straight/checkpoints/last.pt"), weights(last)
    assert a.keys() == b.keys()
    for name in a:  # batch norm's running statistics included
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"


def test_dcgan_weights_are_channels_last_and_older_row_major_moments_resume_exactly(train, tmp_path: Path) -> None:
    """Channels-last convolution weights run the DCGAN's step faster; fused Adam reads a weight and its moments as flat
    memory, so moments saved row-major (before channels-last) must be laid out as their weights on loading."""
    nets = make_nets("--arch", "dcgan")[0]
    convs = [w for net in (nets.G, nets.D, nets.ema) for w in net.parameters() if w.dim() == 4]
    assert len(convs) == 6 and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    flags = ["--arch", "dcgan", "--subset", "256"]
    assert train("straight", "--epochs", "2", *flags).exit_code == 0
    assert train("split", "--epochs", "1", *flags).exit_code == 0
    last = tmp_path / "split/checkpoints/last.pt"
    ckpt = load(last)
    moments = [
        s[k] for opt in ("opt_g", "opt_d") for s in ckpt[opt]["state"].values() for k in ("exp_avg", "exp_avg_sq")
    ]
    for v in moments:
        if v.dim() == 4:
            v.set_(v.contiguous())  # row-major, as a checkpoint of the older version holds them
    assert not all(v.is_contiguous(memory_format=torch.channels_last) for v in moments if v.dim() == 4)
    torch.save(ckpt, last)
    assert gan_mnist.main(["--resume", str(last), "--epochs", "2", "--threads", "1", "--quiet"]).exit_code == 0
    a, b = weights(tmp_path / "straight/checkpoints/last.pt"), weights(last)
    assert all(torch.equal(a[name], b[name]) for name in a)


@VARIANTS
def test_resume_refuses_another_arch_or_loss_by_name(train, tmp_path: Path, flags, capsys) -> None:
    assert train("run", "--epochs", "1", *flags).exit_code == 0
    other = ["--arch", "mlp"] if "dcgan" in flags else ["--loss", "bce"]
    last = str(tmp_path / "run/checkpoints/last.pt")
    assert gan_mnist.main(["--resume", last, "--epochs", "2", *other]).exit_code == 1
    assert f"was trained with {other[0]} " in capsys.readouterr().err


def test_tutorial_recipe_is_the_blogs_mlp_with_bce(train, capsys) -> None:
    for flags in (["--arch", "dcgan"], ["--loss", "wgan-gp"]):
        with pytest.raises(SystemExit) as exit_info:
            train("run", "--recipe", "tutorial", *flags)
        assert exit_info.value.code == 2 and "--recipe tutorial is the blog's MLP with BCE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train("run", "--arch", "resnet")
    assert "--arch must be one of mlp, dcgan" in capsys.readouterr().err


def test_wgan_gp_presets_the_papers_settings_and_flags_win() -> None:
    cfg = make_nets("--loss", "wgan-gp")[1]
    assert (cfg.lr, cfg.b1, cfg.b2, cfg.n_critic, cfg.gp_weight, cfg.r1_gamma) == (1e-4, 0.5, 0.9, 5, 10.0, 0.0)
    cfg = make_nets("--loss", "wgan-gp", "--lr", "2e-4", "--n-critic", "3")[1]
    assert (cfg.lr, cfg.n_critic) == (2e-4, 3)


def critic_gradients(nets: gan_mnist.Nets, real: torch.Tensor, seed: int = 3) -> list[torch.Tensor]:
    """D's gradient in one critic-only train_step (D held still by a zero learning rate)."""
    for g in nets.opt_d.param_groups:
        g["lr"] = 0.0
    torch.manual_seed(seed)
    gan_mnist.train_step(nets, real, None, False, update_g=False)
    return [p.grad.clone() for p in nets.D.parameters()]


@pytest.mark.parametrize("arch", ["mlp", "dcgan"])
def test_gradient_penalty_is_lambda_times_squared_distance_of_each_samples_gradient_norm_from_1(
    data_dir: Path, arch: str
) -> None:
    nets, cfg = make_nets("--loss", "wgan-gp", "--arch", arch, "--gp-weight", "7")
    real = real_batch(data_dir, 8)
    G, D = copy.deepcopy(nets.G), copy.deepcopy(nets.D)
    got = critic_gradients(nets, real)
    # By hand, in the step's order of random draws: z, then one alpha per sample.
    torch.manual_seed(3)
    fake = G(torch.randn(8, cfg.latent_dim)).detach()
    alpha = torch.rand(8)
    loss = D(fake).mean() - D(real).mean()
    for i in range(8):  # each sample alone: its gradient's norm over all of its pixels
        x_hat = (real[i] + alpha[i] * (fake[i] - real[i])).unsqueeze(0).requires_grad_(True)
        (grad,) = torch.autograd.grad(D(x_hat).sum(), x_hat, create_graph=True)
        loss = loss + 7 / 8 * (grad.flatten().norm() - 1) ** 2
    expected = torch.autograd.grad(loss, list(D.parameters()))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_critic_steps_leave_g_and_its_ema_alone_and_g_trains_on_every_nth_batch(train, monkeypatch) -> None:
    nets, _ = make_nets("--loss", "wgan-gp")
    gan_mnist.train_step(nets, torch.zeros(8, 1, 28, 28), None, False, update_g=True)  # now the EMA is not G
    before = copy.deepcopy(nets)
    gan_mnist.train_step(nets, torch.zeros(8, 1, 28, 28), None, False, update_g=False)
    for old, new in ((before.G, nets.G), (before.ema, nets.ema)):
        assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values()))
    assert torch.equal(before.ema_updates, nets.ema_updates)  # the EMA's warm-up counts G's steps only
    assert not all(torch.equal(a, b) for a, b in zip(before.D.parameters(), nets.D.parameters()))
    # The logs' critic statistics are raw scores: D's loss is the mean fake score less the mean real one.
    nets, _ = make_nets("--loss", "wgan-gp", "--gp-weight", "0")
    gan_mnist.train_step(nets, torch.rand(8, 1, 28, 28) * 2 - 1, None, False, update_g=False)
    d_loss, g_loss, real_score, fake_score = nets.stats.tolist()
    assert d_loss == pytest.approx(fake_score - real_score, abs=1e-6) and g_loss == pytest.approx(-fake_score)
    g_steps: list[bool] = []
    real_step = gan_mnist.train_step
    monkeypatch.setattr(gan_mnist, "train_step", lambda n, x, y, r1, g: (g_steps.append(g), real_step(n, x, y, r1, g)))
    assert train("run", "--epochs", "2", "--loss", "wgan-gp").exit_code == 0  # 8 steps an epoch
    assert [i for i, g in enumerate(g_steps) if g] == [0, 5, 10, 15]


def batch_norms(G: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in G.modules() if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d))]


def population_gap(G: gan_mnist.Generator) -> list[float]:
    """How far G's running statistics are from those of its own activations over 4,096 fresh digits: each
    channel's mean gap in its standard deviations, and its |log| variance ratio, the worst over all layers."""
    inputs: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].transpose(0, 1).flatten(1)))
             for m in batch_norms(G)]  # fmt: skip
    with torch.no_grad():
        G.train()(torch.randn(4096, G.latent_dim, generator=torch.Generator().manual_seed(9)))
    for h in hooks:
        h.remove()
    G.eval()
    means = [((m.running_mean - x.mean(1)).abs() / x.std(1)).max() for m, x in zip(batch_norms(G), inputs)]
    return [float(max(means)), max(float((m.running_var / x.var(1)).log().abs().max())
                                   for m, x in zip(batch_norms(G), inputs))]  # fmt: skip


def test_dcgan_batch_norm_normalises_and_the_ema_samples_with_statistics_of_its_own_weights(
    train, tmp_path: Path
) -> None:
    nets, _ = make_nets("--arch", "dcgan", "--clusters", "0")  # unconditional: with the hidden layer's batch norm
    outputs: list[torch.Tensor] = []
    for m in batch_norms(nets.G):
        m.register_forward_hook(lambda mod, args, out: outputs.append(out.detach().clone()))  # before the ReLU
    nets.G(torch.randn(64, 100))
    assert len(outputs) == 3
    for out in outputs:  # fresh affine parameters: each channel at mean 0 and variance 1 over the batch
        dims = (0, 2, 3) if out.dim() == 4 else (0,)
        torch.testing.assert_close(out.mean(dim=dims), torch.zeros(out.size(1)), atol=1e-4, rtol=0)
        torch.testing.assert_close(out.var(dim=dims, unbiased=False), torch.ones(out.size(1)), atol=1e-2, rtol=0)
    assert (
        train("run", "--epochs", "2", "--arch", "dcgan", "--clusters", "0", "--sample-every", "5",
              "--checkpoint-every", "1").exit_code == 0
    )  # fmt: skip
    ckpt, saved = load(tmp_path / "run/checkpoints/last.pt"), load(tmp_path / "run/generator.pt")
    for path in ("generator.pt", "checkpoints/epoch_0001.pt"):  # epoch 1: no grid, no evaluation sampled from it
        G, _ = gan_mnist.load_generator(tmp_path / "run" / path, torch.device("cpu"))
        mean_gap, var_gap = population_gap(G)  # G's own statistics (those G's weights give) are far from these
        assert mean_gap < 0.15 and var_gap < 0.2, (path, mean_gap, var_gap)
    stats = [k for k in ckpt["generator"] if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 6
    for key in stats:  # the checkpoint's EMA is the one generator.pt samples with, not G's statistics
        assert torch.equal(ckpt["ema"][key], saved["state_dict"][key])
        assert not torch.equal(ckpt["ema"][key], ckpt["generator"][key])


def test_ema_statistics_are_refit_whenever_its_weights_move_and_never_shift_training(data_dir: Path) -> None:
    nets, _ = make_nets("--arch", "dcgan", "--clusters", "0")
    real = real_batch(data_dir)
    for _ in range(2):
        gan_mnist.train_step(nets, real, None)
        rng = torch.get_rng_state()
        sampler = nets.sampler()
        assert sampler is nets.ema and torch.equal(torch.get_rng_state(), rng)  # its own random stream
        fresh = copy.deepcopy(nets.ema)
        gan_mnist.fit_batch_norm(fresh)  # from any statistics: a refit starts over
        for (key, a), b in zip(sampler.state_dict().items(), fresh.state_dict().values()):
            assert torch.equal(a, b), f"{key}: the EMA's statistics are not those of its present weights"
    assert all(m.momentum == 0.1 for m in batch_norms(nets.ema))
    nets_without_ema, _ = make_nets("--arch", "dcgan", "--clusters", "0", "--ema-decay", "0")
    assert nets_without_ema.sampler() is nets_without_ema.G  # G samples with its own running statistics


def test_dcgan_generator_is_the_measured_one() -> None:
    """The DCGAN's G: a hidden layer of 256 (unconditional only), a linear map to 64 x 7 x 7, two transposed
    convolutions, batch norm and ReLU after each but the last (README, 'Which GAN?': the hidden layer halved the
    unconditional FID at epoch 10, and made the conditional one worse)."""
    G, conditional = gan_mnist.Generator(arch="dcgan"), gan_mnist.Generator(num_classes=10, arch="dcgan")
    body = ["Linear", "Unflatten", "BatchNorm2d", "ReLU", "ConvTranspose2d", "BatchNorm2d", "ReLU", "ConvTranspose2d",
            "Tanh"]  # fmt: skip
    assert [type(m).__name__ for m in G.net] == ["Linear", "BatchNorm1d", "ReLU", *body]
    assert G.net[0].out_features == 256 and G.net[3].in_features == 256
    assert [type(m).__name__ for m in conditional.net] == body
    assert conditional.net[0].in_features == 100 + gan_mnist.LABEL_DIM
    assert G.net[3].out_features == conditional.net[0].out_features == 2 * gan_mnist.DCGAN_WIDTH * 49


def test_spectral_norm_reaches_every_layer_of_the_dcgan_critic() -> None:
    nets, _ = make_nets("--arch", "dcgan", "--spectral-norm")
    layers = [m for m in nets.D.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert len(layers) == 4 and all(torch.nn.utils.parametrize.is_parametrized(m, "weight") for m in layers)


def test_dcgan_critic_is_the_measured_one() -> None:
    """The DCGAN's D: two strided convolutions, then one hidden fully connected layer (README, 'Which GAN?': it
    took FID at epoch 10 from 44 to 17), and no batch norm anywhere (the gradient penalties are per sample)."""
    D = gan_mnist.Discriminator(10, arch="dcgan")
    kinds = [type(m).__name__ for m in D.modules() if not isinstance(m, (torch.nn.LeakyReLU, torch.nn.Sequential))]
    assert kinds == ["Discriminator", "Conv2d", "Conv2d", "Flatten", "Linear", "Linear", "Embedding"]
    assert D.head.in_features == D.label_projection.embedding_dim == 256


# -- --clusters: the self-conditioned DCGAN (the DCGAN's preset), unconditional to its user --------------------------
def test_clusters_are_found_without_labels_the_same_each_time_and_purer_than_pixel_kmeans(data_dir: Path) -> None:
    images, labels = gan_mnist.load_mnist(data_dir)
    rng = torch.get_rng_state()
    ids = gan_mnist.digit_clusters(images, 10)
    assert torch.equal(torch.get_rng_state(), rng)  # streams of its own: training's noise does not move
    assert torch.equal(gan_mnist.digit_clusters(images, 10), ids) and sorted(ids.unique().tolist()) == list(range(10))
    purity = sum(int(torch.bincount(labels[ids == k]).max()) for k in range(10)) / len(ids)
    assert purity > 0.59, purity  # k-means of the pixels: 0.555 here (full MNIST, 40 clusters: 0.95 against 0.785)


def test_a_clustered_generator_draws_each_cluster_by_its_share_from_z_alone() -> None:
    G = gan_mnist.Generator(arch="dcgan", clusters=3).eval()
    G.cluster_cdf.copy_(torch.tensor([0.5, 0.8, 1.0]))
    z = torch.randn(200_000, 100, generator=torch.Generator().manual_seed(0))
    spread, k = G.pick_clusters(z)
    torch.testing.assert_close(torch.bincount(k) / len(k), torch.tensor([0.5, 0.3, 0.2]), atol=0.005, rtol=0)
    for j in range(3):  # within a cluster z_0 is again N(0, 1): cluster and noise independent, as in training
        assert abs(float(spread[k == j, 0].mean())) < 0.02 and abs(float(spread[k == j, 0].std()) - 1) < 0.02
    assert torch.equal(spread[:, 1:], z[:, 1:]) and G.num_classes == 0  # the commands see an unconditional G
    torch.testing.assert_close(G(z[:8]), G(spread[:8], k[:8]))


def test_a_clustered_run_keeps_its_clusters_and_its_files_sample_by_their_shares(
    train, tmp_path: Path, monkeypatch, capsys
) -> None:
    assert train("run", "--epochs", "1", "--arch", "dcgan", "--subset", "256").exit_code == 0  # --clusters 40 preset
    last = tmp_path / "run/checkpoints/last.pt"
    ckpt, saved = load(last), load(tmp_path / "run/generator.pt")
    ids = ckpt["cluster_ids"]
    assert ids.dtype == torch.uint8 and len(ids) == 256 and ckpt["config"]["clusters"] == saved["clusters"] == 40
    shares = torch.bincount(ids.long(), minlength=40).cumsum(0) / 256
    for state_dict in (ckpt["generator"], ckpt["ema"], saved["state_dict"]):
        torch.testing.assert_close(state_dict["cluster_cdf"], shares)
    assert gan_mnist.main(["--resume", str(last), "--epochs", "2", "--clusters", "20", "--quiet"]).exit_code == 1
    assert "was trained with --clusters 40, not 20" in capsys.readouterr().err  # the clusters define the model
    monkeypatch.setattr(gan_mnist, "digit_clusters", lambda *args: pytest.fail("a resume found the clusters again"))
    assert gan_mnist.main(["--resume", str(last), "--epochs", "2", "--threads", "1", "--quiet"]).exit_code == 0
    assert torch.equal(load(last)["cluster_ids"], ids)
    damaged = load(last)
    damaged["cluster_ids"] = ids[:100]
    torch.save(damaged, tmp_path / "damaged.pt")
    capsys.readouterr()
    assert gan_mnist.main(["--resume", str(tmp_path / "damaged.pt"), "--epochs", "3", "--quiet"]).exit_code == 1
    assert "cluster ids do not fit its 256 training digits" in capsys.readouterr().err


def test_files_from_before_clusters_still_load_and_resume(one_epoch_run: Path, tmp_path: Path) -> None:
    ckpt, saved = load(one_epoch_run / "checkpoints/last.pt"), load(one_epoch_run / "generator.pt")
    del ckpt["cluster_ids"], ckpt["config"]["clusters"], saved["clusters"]
    torch.save(ckpt, one_epoch_run / "checkpoints/last.pt")
    torch.save(saved, one_epoch_run / "generator.pt")
    out = tmp_path / "digits.png"
    assert (
        gan_mnist.main(["generate", "--checkpoint", str(one_epoch_run / "generator.pt"), "--out", str(out)]).exit_code
        == 0
    )
    argv = ["--resume", str(one_epoch_run / "checkpoints/last.pt"), "--epochs", "2", "--threads", "1", "--quiet"]
    assert gan_mnist.main(argv).exit_code == 0 and load(one_epoch_run / "checkpoints/last.pt")["cluster_ids"] is None
