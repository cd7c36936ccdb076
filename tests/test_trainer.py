"""The trainer: what a run leaves, exact resume, generate, refusals and clear errors."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import FAST, ROOT, load
from PIL import Image

import gan_mnist


def one_line_error(err: str) -> str:
    """The stderr of a refusal: exactly one line, no traceback."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("gan_mnist: error: ")
    return lines[0]


def test_short_run_leaves_every_output(train, tmp_path: Path) -> None:
    result = train("run", "--epochs", "2", "--checkpoint-every", "1")
    assert result.exit_code == 0
    run = tmp_path / "run"

    config = json.loads((run / "config.json").read_text())
    assert config["epochs"] == 2 and config["batch_size"] == 64 and config["lr"] == 2e-4
    assert config["out_dir"] == str(run)

    for epoch in (1, 2):  # 8 x 8 grid of 28-px digits with 2-px padding
        with Image.open(run / "samples" / f"epoch_{epoch:04d}.png") as png:
            assert png.size == (242, 242)
    with Image.open(run / "progress.gif") as gif:
        assert gif.n_frames == 2 and gif.size == (242, 242)
    with Image.open(run / "losses.png") as plot:
        assert plot.size[0] > 400

    rows = list(csv.DictReader((run / "losses.csv").read_text().splitlines()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert list(rows[0]) == ["epoch", "d_loss", "g_loss", "d_x", "d_g_z", "seconds"]
    for row in rows:
        assert 0 < float(row["d_loss"]) < 5 and 0 < float(row["g_loss"]) < 10
        assert 0 < float(row["d_x"]) < 1 and 0 < float(row["d_g_z"]) < 1 and float(row["seconds"]) > 0
    assert [r["epoch"] for r in result.history] == [1, 2]

    ckpt = load(run / "checkpoints" / "last.pt")
    assert ckpt["format"] == "gan_mnist.checkpoint" and ckpt["epoch"] == 2 and ckpt["step"] == 0
    for key in ("generator", "discriminator", "ema", "opt_g", "opt_d", "fixed_noise", "config", "rng"):
        assert ckpt[key] is not None, key
    assert ckpt["fixed_noise"].shape == (64, 100)
    assert set(ckpt["rng"]) == {"torch", "cuda", "data"}
    assert ckpt["opt_g"]["state"], "optimiser state is saved"
    assert (run / "checkpoints" / "epoch_0001.pt").exists() and (run / "checkpoints" / "epoch_0002.pt").exists()

    gen = load(run / "generator.pt")
    assert gen["format"] == "gan_mnist.generator" and gen["latent_dim"] == 100 and gen["num_classes"] == 0
    assert not list(run.rglob(".*.tmp*")), "no temporary files left behind"


def test_default_out_dir_is_new_each_run(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["--data-dir", str(data_dir), "--epochs", "1", *FAST]
    first, second = gan_mnist.main(args), gan_mnist.main(args)
    assert first.exit_code == second.exit_code == 0
    assert first.out_dir != second.out_dir
    assert first.out_dir.parent.resolve() == second.out_dir.parent.resolve() == (tmp_path / "outputs").resolve()
    assert (first.out_dir / "checkpoints" / "last.pt").exists() and (
        second.out_dir / "checkpoints" / "last.pt"
    ).exists()


def test_resume_is_bit_identical(train, tmp_path: Path) -> None:
    assert train("straight", "--epochs", "2").exit_code == 0
    assert train("split", "--epochs", "1").exit_code == 0
    last = tmp_path / "split" / "checkpoints" / "last.pt"
    result = gan_mnist.main(["--resume", str(last), "--epochs", "2", "--threads", "1", "--quiet"])
    assert result.exit_code == 0 and result.out_dir == tmp_path / "split"

    a, b = load(tmp_path / "straight" / "generator.pt"), load(tmp_path / "split" / "generator.pt")
    a_ckpt, b_ckpt = load(tmp_path / "straight/checkpoints/last.pt"), load(last)
    for key in ("generator", "discriminator"):
        for name, tensor in a_ckpt[key].items():
            assert torch.equal(tensor, b_ckpt[key][name]), f"{key}.{name} differs after resume"
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name])
    # the run's record carries on: same CSV numbers, both sample grids, a 2-frame GIF
    straight_rows = list(csv.reader((tmp_path / "straight/losses.csv").read_text().splitlines()))
    split_rows = list(csv.reader((tmp_path / "split/losses.csv").read_text().splitlines()))
    assert [r[:5] for r in straight_rows] == [r[:5] for r in split_rows]
    assert (tmp_path / "split/samples/epoch_0001.png").exists() and (tmp_path / "split/samples/epoch_0002.png").exists()
    with Image.open(tmp_path / "split/progress.gif") as gif:
        assert gif.n_frames == 2


def test_interrupt_mid_epoch_saves_and_resumes_exactly(train, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert train("straight", "--epochs", "3").exit_code == 0
    calls = {"n": 0}
    real_step = gan_mnist.train_step

    def step_then_ctrl_c(*args):
        real_step(*args)
        calls["n"] += 1
        if calls["n"] == 12:  # epoch 2, step 4 of 8
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(gan_mnist, "train_step", step_then_ctrl_c)
    result = train("interrupted", "--epochs", "3")
    monkeypatch.undo()
    assert result.exit_code == 130
    last = tmp_path / "interrupted" / "checkpoints" / "last.pt"
    saved = load(last)
    assert (saved["epoch"], saved["step"]) == (1, 4)

    # Interrupted again two steps into the resumed epoch: the data order of epoch 2 must survive both.
    calls["n"] = 10
    monkeypatch.setattr(gan_mnist, "train_step", step_then_ctrl_c)
    assert gan_mnist.main(["--resume", str(last), "--threads", "1", "--quiet"]).exit_code == 130
    monkeypatch.undo()
    assert (load(last)["epoch"], load(last)["step"]) == (1, 6)

    assert gan_mnist.main(["--resume", str(last), "--threads", "1", "--quiet"]).exit_code == 0
    a, b = load(tmp_path / "straight/checkpoints/last.pt"), load(last)
    assert b["epoch"] == 3
    for name, tensor in a["generator"].items():
        assert torch.equal(tensor, b["generator"][name]), name
    assert [r["d_loss"] for r in a["history"]] == pytest.approx([r["d_loss"] for r in b["history"]], rel=1e-6)


# Slow: test_hardening's stop-signal tests cover both signals in the default run (SIGINT twice, SIGTERM during the
# last evaluation); these send them from outside to a process with its progress bar on.
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_checkpoint_and_says_how_to_resume(data_dir: Path, tmp_path: Path, sig: int) -> None:
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        str(ROOT / "gan_mnist.py"),
        "--data-dir",
        str(data_dir),
        "--out-dir",
        str(out),
        "--epochs",
        "100000",
        *FAST[:-1],
    ]  # not --quiet: the progress bar must not get in the way
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # wait for the first finished epoch
            if line.startswith("epoch "):
                break
        time.sleep(0.3)
        proc.send_signal(sig)
        out_text, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == 128 + sig
    assert "Traceback" not in err
    assert "Resume with: python gan_mnist.py --resume" in err and str(out / "checkpoints" / "last.pt") in err
    saved = load(out / "checkpoints" / "last.pt")
    assert saved["epoch"] >= 1


def test_generate_png_and_npy(train, tmp_path: Path) -> None:
    assert train("run", "--epochs", "1").exit_code == 0
    for source in ("generator.pt", "checkpoints/last.pt"):
        ckpt = str(tmp_path / "run" / source)
        png, npy = tmp_path / "grid.png", tmp_path / "digits.npy"
        assert gan_mnist.main(["generate", "--checkpoint", ckpt, "--num", "16", "--out", str(png)]).exit_code == 0
        with Image.open(png) as image:
            assert image.size == (4 * 28 + 5 * 2, 4 * 28 + 5 * 2)
        assert gan_mnist.main(["generate", "--checkpoint", ckpt, "--num", "10", "--out", str(npy)]).exit_code == 0
        array = np.load(npy)
        assert array.shape == (10, 28, 28) and array.dtype == np.uint8
        # MNIST's convention: a dark background (low values at the borders)
        assert array[:, 0, :].mean() < 128


def test_generate_errors_are_one_line(train, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert train("run", "--epochs", "1").exit_code == 0
    ckpt = str(tmp_path / "run" / "generator.pt")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    capsys.readouterr()
    assert gan_mnist.main(["generate", "--checkpoint", ckpt, "--out", str(blocker / "x.png")]).exit_code == 1
    assert "cannot create the folder" in one_line_error(capsys.readouterr().err)
    with pytest.raises(SystemExit) as exit_info:  # a name that is no output kind is a usage error
        gan_mnist.main(["generate", "--checkpoint", ckpt, "--out", str(tmp_path / "x.jpg")])
    assert exit_info.value.code == 2 and "name a .png or .npy file, or a folder" in capsys.readouterr().err


def test_generate_is_seeded(train, tmp_path: Path) -> None:
    assert train("run", "--epochs", "1").exit_code == 0
    ckpt = str(tmp_path / "run" / "generator.pt")
    outs = []
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        path = tmp_path / f"{name}.npy"
        gan_mnist.main(["generate", "--checkpoint", ckpt, "--num", "8", "--seed", seed, "--out", str(path)])
        outs.append(np.load(path))
    assert np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[0], outs[2])


def test_refuses_to_overwrite_a_run(train, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert train("run", "--epochs", "1").exit_code == 0
    run = tmp_path / "run"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    result = train("run", "--epochs", "1")
    assert result.exit_code == 1
    assert "already holds a run" in one_line_error(capsys.readouterr().err)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    "flags",
    [
        ["--epochs", "0"],
        ["--epochs", "-3"],
        ["--epochs", "two"],
        ["--batch-size", "0"],
        ["--lr", "0"],
        ["--lr", "-1e-3"],
        ["--subset", "10"],
        ["--b1", "1.5"],
        ["--latent-dim", "0"],
        ["--device", "gpu0"],
        ["--sample-every", "0"],
        ["--no-such-flag"],
        ["--threads", "-1"],
        ["--precision", "fp8"],
    ],
)
def test_bad_flags_are_usage_errors(data_dir: Path, flags: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        gan_mnist.main(["--data-dir", str(data_dir), *flags])
    assert exit_info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_help_documents_every_flag_with_its_default(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        gan_mnist.main(["--help"])
    text = capsys.readouterr().out
    blocks = re.split(r"\n  (?=--)", text)[1:]  # one block per option, as argparse lays them out
    help_of = {block.split()[0]: " ".join(block.split()) for block in blocks}
    for flag, default in [
        ("--epochs", "200"),
        ("--batch-size", "64"),
        ("--lr", "0.0002"),
        ("--b1", "0.5"),
        ("--b2", "0.999"),
        ("--latent-dim", "100"),
        ("--data-dir", "'./data'"),
        ("--sample-every", "1"),
        ("--checkpoint-every", "10"),
        ("--device", "'auto'"),
    ]:
        assert f"(default: {default})" in help_of[flag], (flag, help_of[flag])
    for flag in ("--out-dir", "--seed", "--subset", "--resume", "--quiet", "--threads"):
        assert flag in text


def test_missing_data_without_network_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # Force a failing download even where the network works: nothing listens on port 9.
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    started = time.monotonic()
    result = gan_mnist.main(["--data-dir", str(tmp_path / "empty"), "--out-dir", str(tmp_path / "run"), *FAST])
    assert result.exit_code == 1 and time.monotonic() - started < 10
    line = one_line_error(capsys.readouterr().err)
    for name in gan_mnist.MNIST_FILES:
        assert name in line
    assert str(tmp_path / "empty" / "MNIST" / "raw") in line and "--data-dir" in line
    assert not (tmp_path / "run").exists(), "a failed start leaves no empty run folder"
    assert not (tmp_path / "empty").exists(), "nor empty MNIST/raw folders"


@pytest.mark.parametrize("damage", ["truncate", "garbage", "foreign"])
def test_corrupt_checkpoint_is_a_clear_error(train, tmp_path: Path, damage: str, capsys: pytest.CaptureFixture) -> None:
    assert train("run", "--epochs", "1").exit_code == 0
    bad = tmp_path / "bad.pt"
    good = (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes()
    if damage == "truncate":
        bad.write_bytes(good[: len(good) // 2])
    elif damage == "garbage":
        bad.write_bytes(os.urandom(4096))
    else:
        torch.save({"model": torch.zeros(3)}, bad)
    capsys.readouterr()
    for argv in (["--resume", str(bad)], ["generate", "--checkpoint", str(bad), "--out", str(tmp_path / "x.png")]):
        assert gan_mnist.main(argv).exit_code == 1
        line = one_line_error(capsys.readouterr().err)
        assert str(bad) in line


def test_resume_with_other_shapes_names_the_mismatch(train, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert train("run", "--epochs", "1").exit_code == 0
    last = str(tmp_path / "run" / "checkpoints" / "last.pt")
    capsys.readouterr()
    assert gan_mnist.main(["--resume", last, "--epochs", "2", "--latent-dim", "64"]).exit_code == 1
    assert "--latent-dim 100, not 64" in one_line_error(capsys.readouterr().err)
    assert gan_mnist.main(["--resume", last, "--epochs", "1"]).exit_code == 1
    assert "already trained 1 epoch;" in one_line_error(capsys.readouterr().err)


def test_one_epoch_visits_each_training_image_exactly_once(train, data_dir: Path, monkeypatch) -> None:
    seen: list[torch.Tensor] = []
    real_step = gan_mnist.train_step

    def recording_step(nets, real, labels, r1=False, update_g=True):
        seen.append(real.clone())
        real_step(nets, real, labels, r1, update_g)

    monkeypatch.setattr(gan_mnist, "train_step", recording_step)
    assert train("run", "--epochs", "1", "--batch-size", "96", "--subset", "500").exit_code == 0
    assert [len(b) for b in seen] == [96] * 5 + [20], "the last, smaller batch is kept"
    images, _ = gan_mnist.load_mnist(data_dir)
    expected = Counter(x.numpy().tobytes() for x in gan_mnist.to_model_range(images[:500]))
    assert Counter(x.numpy().tobytes() for x in torch.cat(seen)) == expected
    # What reaches the step is in the tutorial's range: strokes at +1, the black background at -1.
    pixels = torch.cat(seen)
    assert pixels.min() == -1.0 and pixels.max() == 1.0
    assert (pixels == -1.0).float().mean() > 0.7, "MNIST's background must map to -1"


def test_epoch_batches_are_a_seeded_permutation() -> None:
    a = gan_mnist.epoch_batches(1000, 64, torch.Generator().manual_seed(3))
    b = gan_mnist.epoch_batches(1000, 64, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert torch.equal(torch.cat(a).sort().values, torch.arange(1000))
    assert len(a[-1]) == 1000 % 64
    # A remainder of one digit sits its epoch out (G's batch norm cannot train on one); a batch size of 1 keeps all.
    c = gan_mnist.epoch_batches(129, 64, torch.Generator().manual_seed(3))
    assert torch.equal(torch.cat(c), torch.randperm(129, generator=torch.Generator().manual_seed(3))[:128])
    assert [len(x) for x in c] == [64, 64]
    assert len(gan_mnist.epoch_batches(5, 1, torch.Generator().manual_seed(3))) == 5


def test_dcgan_trains_where_the_last_batch_would_be_one_digit(train, capsys: pytest.CaptureFixture) -> None:
    """512 digits in batches of 73 leave one over: batch norm in G failed on it, mid-epoch, with a traceback."""
    result = train("odd", "--arch", "dcgan", "--epochs", "1", "--batch-size", "73", "--ema-decay", "0")
    assert result.exit_code == 0 and len(result.history) == 1
    assert "7 steps/epoch" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:  # every batch one digit: refused as the flags are read
        train("one", "--arch", "dcgan", "--batch-size", "1")
    assert refused.value.code == 2
    assert "--arch dcgan needs --batch-size 2 or more" in capsys.readouterr().err


def test_cuda_graph_falls_back_to_eager_without_cuda(train, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    if torch.cuda.is_available():
        pytest.skip("this checks the fallback on machines without CUDA")
    assert train("eager", "--epochs", "1").exit_code == 0
    capsys.readouterr()
    assert train("graph", "--epochs", "1", "--cuda-graph").exit_code == 0
    assert "--cuda-graph needs a CUDA device; training eagerly on cpu" in capsys.readouterr().err
    a, b = load(tmp_path / "eager/checkpoints/last.pt"), load(tmp_path / "graph/checkpoints/last.pt")
    assert all(torch.equal(t, b["generator"][k]) for k, t in a["generator"].items())


@pytest.mark.slow
def test_benchmark_prints_one_json_line_with_both_loops_of_each_variant(data_dir: Path) -> None:
    out = (
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "benchmarks" / "bench_train.py"),
                "--data-dir",
                str(data_dir),
                "--steps",
                "6",
                "--warmup",
                "2",
                "--rounds",
                "2",
                "--threads",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        .stdout.strip()
        .splitlines()
    )
    result = json.loads(out[-1])
    for key in ("variants", "stable_vs_tutorial", "device", "device_name", "torch", "baseline_threads",
                "gan_mnist_threads", "batch_size", "peak_rss_mib"):  # fmt: skip
        assert key in result, key
    assert list(result["variants"]) == ["mlp-bce", "dcgan-bce", "mlp-wgan-gp", "dcgan-wgan-gp"]
    for figures in result["variants"].values():
        assert figures["ratio"] > 0 and figures["baseline_steps_per_s"] > 0 and figures["gan_mnist_steps_per_s"] > 0
    assert result["steps"] == 6 and result["batch_size"] == 64
