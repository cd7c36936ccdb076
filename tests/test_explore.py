"""Watching and exploring a run: TensorBoard event files read back with TensorBoard's own reader, latent walks,
the memorisation check against a brute-force answer, the run summary page, bigger pictures."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, load
from PIL import Image
from test_trainer import one_line_error

import gan_mnist

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def read_events(run: Path):
    acc = event_accumulator.EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_tensorboard_logs_losses_metrics_grids_and_config(train, tmp_path: Path) -> None:
    assert train("run", "--epochs", "2", "--tensorboard", "--eval-every", "1", "--eval-num", "64").exit_code == 0
    acc = read_events(tmp_path / "run")
    history = load(tmp_path / "run" / "checkpoints" / "last.pt")["history"]
    for tag, key in (("loss/D", "d_loss"), ("loss/G", "g_loss"), ("D_output/real", "d_x"), ("D_output/fake", "d_g_z")):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [1, 2]
        assert [e.value for e in events] == pytest.approx([row[key] for row in history], rel=1e-5)
    metrics = load(tmp_path / "run" / "checkpoints" / "last.pt")["metrics"]
    for key in ("fid", "inception_score", "recall", "precision", "kl_to_uniform", "modes_covered"):
        assert [e.value for e in acc.Scalars(f"metrics/{key}")] == pytest.approx([m[key] for m in metrics], rel=1e-5)
    images = acc.Images("samples/fixed_noise")
    assert [i.step for i in images] == [1, 2] and images[0].width == images[0].height == 8 * 28 + 9 * 2
    assert "config/text_summary" in acc.Tags()["tensors"], "the config as text"
    plugins = acc.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in plugins and "_hparams_/session_start_info" in plugins
    assert b"r1_gamma" in plugins["_hparams_/session_start_info"], "the recipe is among the hyperparameters"


def test_a_resumed_run_appends_to_the_same_view_without_duplicate_steps(train, tmp_path: Path) -> None:
    assert (
        train("run", "--epochs", "3", "--tensorboard", "--checkpoint-every", "1", "--keep-checkpoints", "0").exit_code
        == 0
    )
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "epoch_0003.pt").unlink()
    (ckpts / "epoch_0002.pt").replace(ckpts / "last.pt")  # back to epoch 2: epoch 3 is redone
    assert gan_mnist.main(["--resume", str(ckpts / "last.pt"), "--epochs", "4", "--quiet"]).exit_code == 0
    acc = read_events(tmp_path / "run")
    assert [e.step for e in acc.Scalars("loss/D")] == [1, 2, 3, 4]
    assert [i.step for i in acc.Images("samples/fixed_noise")] == [1, 2, 3, 4]
    history = load(ckpts / "last.pt")["history"]
    assert [e.value for e in acc.Scalars("loss/D")] == pytest.approx([r["d_loss"] for r in history], rel=1e-5)


def test_missing_tensorboard_package_is_one_line(train, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert train("run", "--epochs", "1", "--tensorboard").exit_code == 1
    assert "pip install tensorboard" in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


# -- latent walks ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir: Path) -> Path:
    """An unconditional and a conditional generator, a few epochs on the tiny subset."""
    root = tmp_path_factory.mktemp("trained")
    for name, extra in (("u", []), ("c", ["--conditional"])):
        argv = ["--data-dir", str(data_dir), "--out-dir", str(root / name), *FAST, "--epochs", "3", *extra]
        assert gan_mnist.main(argv).exit_code == 0
    return root


def gif_frames(path: Path) -> np.ndarray:
    with Image.open(path) as gif:
        frames = []
        for i in range(gif.n_frames):
            gif.seek(i)
            frames.append(np.asarray(gif.convert("L"), dtype=np.float64))
    return np.stack(frames)


def test_interpolate_gif_is_a_smooth_walk(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "walk.gif"
    argv = ["interpolate", "--checkpoint", str(trained / "u" / "generator.pt"), "--out", str(out), "--frames", "24"]
    assert gan_mnist.main([*argv, "--paths", "4"]).exit_code == 0
    frames = gif_frames(out)
    assert len(frames) == 24 and frames.shape[1:] == (2 * 56 + 3 * 4,) * 2  # 2 x 2 walks at scale 2
    step = np.abs(np.diff(frames, axis=0)).mean()
    rng = np.random.default_rng(0)
    pairs = [rng.choice(24, 2, replace=False) for _ in range(50)]
    random_pair = np.mean([np.abs(frames[a] - frames[b]).mean() for a, b in pairs])
    assert 0 < step < 0.5 * random_pair, "neighbouring frames are closer than random pairs: a walk, not a shuffle"
    # seeded: the same walk again
    again = tmp_path / "again.gif"
    assert gan_mnist.main([*argv[:4], str(again), "--frames", "24", "--paths", "4"]).exit_code == 0
    assert np.array_equal(gif_frames(again), frames)


def test_interpolate_png_has_one_walk_per_row_and_digits_morph(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "walk.png"
    argv = ["interpolate", "--checkpoint", str(trained / "u" / "generator.pt"), "--out", str(out)]
    assert gan_mnist.main([*argv, "--paths", "3", "--frames", "7"]).exit_code == 0
    assert Image.open(out).size == (7 * 30 + 2, 3 * 30 + 2)
    morph = tmp_path / "morph.png"
    argv = ["interpolate", "--checkpoint", str(trained / "c" / "generator.pt"), "--out", str(morph)]
    assert gan_mnist.main([*argv, "--digits", "07", "--paths", "1", "--frames", "5"]).exit_code == 0
    row = np.asarray(Image.open(morph).convert("L"), dtype=np.float64)
    cells = [row[2:30, 2 + 30 * i : 30 + 30 * i] for i in range(5)]
    # The ends are G's own 0 and 7 for that noise; the middle moves from one to the other.
    G, _ = gan_mnist.load_generator(trained / "c" / "generator.pt", torch.device("cpu"))
    z = torch.randn(1, 100, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ends = [gan_mnist.to_uint8(G(z, torch.tensor([d])))[0, 0].numpy() for d in (0, 7)]
    assert np.abs(cells[0] - ends[0]).max() <= 1 and np.abs(cells[-1] - ends[1]).max() <= 1
    d = [np.abs(cells[i + 1] - cells[i]).mean() for i in range(4)]
    assert all(x > 0 for x in d)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--digits", "01"], "needs a conditional generator"),
        (["--out-suffix", ".jpg"], "--out must end in .gif or .png"),
        (["--frames", "1"], "--frames must be 2 to 1000"),
        (["--digits", "0a"], "--digits must be"),
    ],
)
def test_interpolate_errors(trained: Path, tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    out = str(tmp_path / ("walk.jpg" if "--out-suffix" in extra else "walk.png"))
    extra = [] if "--out-suffix" in extra else extra
    argv = ["interpolate", "--checkpoint", str(trained / "u" / "generator.pt"), "--out", out, *extra]
    if message == "needs a conditional generator":
        assert gan_mnist.main(argv).exit_code == 1
        assert message in one_line_error(capsys.readouterr().err)
    else:
        with pytest.raises(SystemExit):
            gan_mnist.main(argv)
        assert message in capsys.readouterr().err
    bad = ["interpolate", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "w.png")]
    assert gan_mnist.main(bad).exit_code == 1
    assert "checkpoint not found" in one_line_error(capsys.readouterr().err)


# -- memorisation ------------------------------------------------------------------------------------------


def test_nearest_matches_brute_force() -> None:
    rng = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(37, 784, generator=rng), torch.randn(301, 784, generator=rng)
    dists, idx = gan_mnist.nearest(queries, bank, k=3, chunk=8)
    brute = torch.cdist(queries.double(), bank.double())
    expected, expected_idx = brute.topk(3, dim=1, largest=False)
    assert torch.equal(idx, expected_idx)
    torch.testing.assert_close(dists.double(), expected, rtol=1e-4, atol=1e-4)


class Copier(torch.nn.Module):
    """A 'generator' that returns training digits: the memorisation check must call this copying."""

    latent_dim, num_classes = 100, 0

    def __init__(self, digits: torch.Tensor) -> None:
        super().__init__()
        self.digits = torch.nn.Parameter(digits, requires_grad=False)

    def forward(self, z: torch.Tensor, labels=None) -> torch.Tensor:
        return self.digits[: len(z)]


def test_memorisation_tells_copies_from_new_digits(data_dir: Path, tmp_path: Path) -> None:
    evaluator = gan_mnist.Evaluator(data_dir, "", num=200, quiet=True)
    train = gan_mnist.to_model_range(evaluator.train_images)
    copies, _ = evaluator.sample(Copier(train[:200]))
    copying = gan_mnist.memorisation(evaluator, copies)
    assert copying["near_copy_share"] == 1.0 and copying["pixel_ratio"] < 0.01 and copying["feature_ratio"] < 0.01
    unseen = gan_mnist.to_model_range(evaluator.test_images[56:256])  # real digits G never saw
    fresh = gan_mnist.memorisation(evaluator, unseen)
    assert 0.8 < fresh["pixel_ratio"] < 1.25 and fresh["near_copy_share"] < 0.1
    gan_mnist.nearest_picture(tmp_path / "near.png", copies, evaluator.train_images, rows=4, k=3)
    grid = np.asarray(Image.open(tmp_path / "near.png").convert("L"))
    assert grid.shape == (4 * 60 + 4, 4 * 60 + 4)
    # a copy's nearest training digit is itself: columns 1 and 2 of each row are equal
    assert np.array_equal(grid[4:60, 4:60], grid[4:60, 64:120])


# -- the summary page, bigger pictures -----------------------------------------------------------------


def test_summary_page_links_resolve_and_show_the_run(train, tmp_path: Path, capsys) -> None:
    assert train("run", "--epochs", "2", "--eval-every", "1", "--eval-num", "64").exit_code == 0
    page = (tmp_path / "run" / "summary.html").read_text()
    assert f"summary: {tmp_path / 'run' / 'summary.html'}" in capsys.readouterr().out.strip().splitlines()[-1]
    links = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert {"samples/epoch_0002.png", "progress.gif", "losses.png", "metrics.png"} <= set(links)
    assert all((tmp_path / "run" / link).is_file() for link in links)
    assert "--resume" in page and "generate --checkpoint" in page and "r1_gamma" in page


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs Debian's chromium")
def test_summary_page_renders_in_headless_chromium(train, tmp_path: Path) -> None:
    assert train("run", "--epochs", "2", "--eval-every", "1", "--eval-num", "64").exit_code == 0
    shot = tmp_path / "summary.png"
    subprocess.run(
        [
            "/usr/bin/chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1100,1400",
            f"--screenshot={shot}",
            (tmp_path / "run" / "summary.html").as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    image = np.asarray(Image.open(shot).convert("L"))
    assert image.shape == (1400, 1100) and image.std() > 20, "a page with pictures, not a blank"


def test_generate_scale_and_one_file_per_digit(trained: Path, tmp_path: Path) -> None:
    ckpt = str(trained / "u" / "generator.pt")
    assert (
        gan_mnist.main(["generate", "--checkpoint", ckpt, "--num", "4", "--out", str(tmp_path / "x.png")]).exit_code
        == 0
    )
    argv = ["generate", "--checkpoint", ckpt, "--num", "4", "--scale", "3", "--out", str(tmp_path / "big.png")]
    assert gan_mnist.main(argv).exit_code == 0
    small, big = Image.open(tmp_path / "x.png").convert("L"), Image.open(tmp_path / "big.png").convert("L")
    assert big.size == (3 * small.size[0], 3 * small.size[1])
    # nearest neighbour: every pixel of the small grid becomes a 3 x 3 block of the same value
    assert np.array_equal(np.asarray(big), np.asarray(small).repeat(3, 0).repeat(3, 1))
    folder = tmp_path / "digits"
    argv = ["generate", "--checkpoint", ckpt, "--num", "5", "--scale", "2", "--out", str(folder) + "/"]
    assert gan_mnist.main(argv).exit_code == 0
    files = sorted(p.name for p in folder.iterdir())
    assert files == [f"digit_{i:05d}.png" for i in range(5)]
    assert all(Image.open(folder / f).size == (56, 56) for f in files)


def test_loss_plot_epochs_are_whole_numbers(monkeypatch, tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig))
    rows = [{"epoch": e, "d_loss": 1.0, "g_loss": 1.0, "d_x": 0.5, "d_g_z": 0.5} for e in (1, 2, 3)]
    gan_mnist.plot_curves(tmp_path / "p.png", rows, [("loss", [("d_loss", "D")])])
    ticks = [t for t in figures[0].axes[0].get_xticks() if 1 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks)
