"""Hardening, round 2: gan_mnist never writes over or deletes what it did not create, a run survives what lies
in its folder and every way it is stopped, resume is path-proof, memory stays bounded, and every bad input is
one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, ROOT, load
from test_trainer import one_line_error

import gan_mnist


def usage_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        gan_mnist.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


# -- never write over or delete what gan_mnist did not create ---------------------------------------------


@pytest.mark.parametrize("victim", ["last.pt", "notes.txt"])
def test_evaluate_never_replaces_a_file_that_is_not_a_judge(train, one_epoch_run, tmp_path, data_dir, victim, capsys):
    path = tmp_path / "run" / "checkpoints" / "last.pt" if victim == "last.pt" else tmp_path / victim
    if victim == "notes.txt":
        path.write_text("my notes")
    before = path.read_bytes()
    capsys.readouterr()
    argv = ["evaluate", "--checkpoint", str(tmp_path / "run" / "generator.pt"), "--num", "64"]
    result = gan_mnist.main([*argv, "--data-dir", str(data_dir), "--judge", str(path)])
    assert result.exit_code == 1 and "not a gan_mnist judge cache" in one_line_error(capsys.readouterr().err)
    assert path.read_bytes() == before
    # The same refusal before a training run's first step, not after its last.
    assert train("run2", "--epochs", "1", "--eval-every", "0", "--judge", str(path)).exit_code == 1
    assert path.read_bytes() == before and not (tmp_path / "run2").exists()


@pytest.mark.parametrize("leftover", ["generator.pt", "losses.csv", "samples", "config.json"])
def test_new_run_never_writes_over_saved_results(train, one_epoch_run, tmp_path: Path, leftover: str, capsys) -> None:
    run = one_epoch_run
    shutil.rmtree(run / "checkpoints")  # a finished run whose checkpoints were deleted to save space
    for name in gan_mnist.RUN_OUTPUTS:
        if name != leftover and (run / name).exists():
            shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert train("run", "--epochs", "1").exit_code == 1
    assert "already holds results of gan_mnist" in one_line_error(capsys.readouterr().err)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("inside", ["samples", "checkpoints/new", "tensorboard/a/b"])
def test_no_run_starts_inside_the_folders_of_another_run(train, one_epoch_run, tmp_path, inside, capsys) -> None:
    before = {p: p.read_bytes() for p in one_epoch_run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert train(f"run/{inside}", "--epochs", "1").exit_code == 1
    assert f"is inside {inside.split('/')[0]}/ of the run" in one_line_error(capsys.readouterr().err)
    last = str(one_epoch_run / "checkpoints" / "last.pt")  # nor a branch of it
    assert train(f"run/{inside}", "--resume", last, "--epochs", "2").exit_code == 1
    assert "of the run" in one_line_error(capsys.readouterr().err)
    assert {p: p.read_bytes() for p in one_epoch_run.rglob("*") if p.is_file()} == before
    (tmp_path / "link").symlink_to(one_epoch_run / inside.split("/")[0])  # nor through a link to the folder
    assert train("link/new", "--epochs", "1").exit_code == 1
    assert f"is inside {inside.split('/')[0]}/ of the run" in one_line_error(capsys.readouterr().err)
    assert {p: p.read_bytes() for p in one_epoch_run.rglob("*") if p.is_file()} == before
    assert train("run/mine", "--epochs", "1").exit_code == 0, "a folder of the user's inside a run is theirs"


def test_new_run_may_start_in_a_folder_of_other_things(train, tmp_path: Path) -> None:
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "README.md").write_text("mine")
    assert train("project", "--epochs", "1").exit_code == 0
    assert (tmp_path / "project" / "README.md").read_text() == "mine"


def test_pruning_matches_own_files_exactly_and_orders_them_by_number(tmp_path: Path) -> None:
    for epoch in (9998, 9999, 10000, 10001):
        (tmp_path / f"epoch_{epoch:04d}.pt").write_bytes(b"x")
    (tmp_path / "epoch_0002-best.pt").write_bytes(b"user's")
    (tmp_path / "epoch_12.pt").write_bytes(b"user's, too short a number")
    gan_mnist.prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "epoch_0002-best.pt",
        "epoch_10000.pt",
        "epoch_10001.pt",
        "epoch_12.pt",
    ]
    assert [n for n, _ in gan_mnist.own_files(tmp_path, "epoch_", ".pt")] == [10000, 10001]


def test_gif_frames_follow_epoch_numbers_past_9999(tmp_path: Path) -> None:
    samples = tmp_path / "samples"
    samples.mkdir()
    for epoch, shade in ((9999, 50), (10000, 150), (10001, 250)):
        gan_mnist.Image.new("L", (8, 8), shade).save(samples / f"epoch_{epoch:04d}.png")
    gan_mnist.write_gif(tmp_path)
    with gan_mnist.Image.open(tmp_path / "progress.gif") as gif:
        shades = []
        for i in range(gif.n_frames):
            gif.seek(i)
            shades.append(gif.convert("L").getpixel((0, 0)))
    assert shades == [50, 150, 250]


# -- a run survives what lies in its folder, and every way it is stopped ----------------------------------


def test_resume_survives_damaged_and_foreign_sample_files_and_removes_stale_temporaries(train, tmp_path: Path) -> None:
    assert train("run", "--epochs", "2").exit_code == 0
    run = tmp_path / "run"
    (run / "samples" / "epoch_0001.png").write_bytes((run / "samples" / "epoch_0001.png").read_bytes()[:50])
    (run / "samples" / "epoch_0002 (copy).png").write_bytes(b"not even a png")
    own_temporaries = [
        run / ".generator.pt.tmp123",
        run / ".progress.gif.tmp77",
        run / ".metrics.json.tmp9",
        run / "samples" / ".epoch_0002.png.tmp5",
        run / "checkpoints" / ".last.pt.tmp4",
    ]
    users = [run / ".notes.tmp1", run / "samples" / ".mine.png.tmp3"]
    for path in own_temporaries + users:
        path.write_bytes(b"half")
    assert gan_mnist.main(["--resume", str(run / "checkpoints" / "last.pt"), "--epochs", "3", "--quiet"]).exit_code == 0
    assert not any(p.exists() for p in own_temporaries)
    assert all(p.read_bytes() == b"half" for p in users), "what gan_mnist did not write stays"
    assert (run / "samples" / "epoch_0002 (copy).png").read_bytes() == b"not even a png"
    with gan_mnist.Image.open(run / "progress.gif") as gif:
        assert gif.n_frames == 2, "the damaged grid of epoch 1 is left out of the GIF, not fatal"


def test_a_file_where_the_samples_folder_goes_is_one_line(train, tmp_path: Path, capsys) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "samples").write_text("a file")
    assert train("run", "--epochs", "1").exit_code == 1
    assert "samples" in one_line_error(capsys.readouterr().err)


SIGNAL_RUN = """
import os, signal, sys
sys.path.insert(0, {root!r})
import gan_mnist
real = gan_mnist.{target}
def twice(*args, **kwargs):
    os.kill(os.getpid(), signal.{sig})
    os.kill(os.getpid(), signal.{sig})  # a second one, a moment after the first
    return real(*args, **kwargs)
gan_mnist.{target} = twice
sys.exit(gan_mnist.main(sys.argv[1:]).exit_code)
"""


@pytest.mark.parametrize(
    "sig, target, epochs",
    [
        ("SIGINT", "record_epoch", "5"),  # twice in a row during training
        pytest.param("SIGHUP", "record_epoch", "5", marks=pytest.mark.slow),
        ("SIGTERM", "evaluate_epoch", "1"),  # during the end-of-run evaluation
    ],
)
def test_every_stop_signal_saves_and_exits_128_plus_its_number(data_dir: Path, tmp_path: Path, sig, target, epochs):
    script = tmp_path / "run_with_signal.py"
    script.write_text(SIGNAL_RUN.format(root=str(ROOT), target=target, sig=sig))
    argv = [str(script), "--data-dir", str(data_dir), "--out-dir", str(tmp_path / "run"), *FAST, "--epochs", epochs]
    if target == "evaluate_epoch":
        argv += ["--eval-every", "0", "--eval-num", "64"]
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
    number = getattr(signal, sig)
    assert proc.returncode == 128 + number, proc.stderr
    assert "Traceback" not in proc.stderr
    assert load(tmp_path / "run" / "checkpoints" / "last.pt")["epoch"] >= 1
    assert "Resume with: python gan_mnist.py --resume" in proc.stderr
    if target == "evaluate_epoch":  # stopped within seconds: the end-of-run evaluation is done at the resume
        assert "stopped in epoch 1's evaluation" in proc.stderr and not (tmp_path / "run" / "metrics.csv").exists()
        last = tmp_path / "run" / "checkpoints" / "last.pt"
        assert gan_mnist.main(["--resume", str(last), "--quiet", "--threads", "1"]).exit_code == 0
        assert (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1].startswith("1,")
        assert load(last)["metrics"][0]["epoch"] == 1, "the checkpoint records the evaluation done at the resume"


@pytest.mark.parametrize("where", ["generate", "evaluate"])
def test_ctrl_c_outside_training_is_one_line_and_exit_130(
    one_epoch_run, tmp_path, data_dir, monkeypatch, capsys, where
):

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gan_mnist, "load_generator", interrupted)
    capsys.readouterr()
    argv = [where, "--checkpoint", str(tmp_path / "run" / "generator.pt")]
    argv += ["--out", str(tmp_path / "x.png")] if where == "generate" else ["--data-dir", str(data_dir)]
    assert gan_mnist.main(argv).exit_code == 130
    err = capsys.readouterr().err
    assert err == "gan_mnist: interrupted\n", err


def test_a_bad_test_set_file_is_found_before_the_first_step(train, data_dir: Path, tmp_path: Path, capsys) -> None:
    broken = tmp_path / "data"
    shutil.copytree(data_dir, broken)
    raw = broken / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    raw.write_bytes(raw.read_bytes()[:1000])
    result = gan_mnist.main(["--data-dir", str(broken), "--out-dir", str(tmp_path / "run"), *FAST, "--eval-every", "0"])
    assert result.exit_code == 1 and result.history == []
    assert "t10k-images-idx3-ubyte" in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


# -- resume is path-proof ---------------------------------------------------------------------------------


def test_resume_from_inside_checkpoints_with_relative_paths(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copytree(data_dir, tmp_path / "mydata")
    argv = ["--data-dir", "mydata", "--out-dir", "runs/a", *FAST, "--epochs", "1"]
    assert gan_mnist.main(argv).exit_code == 0
    config = json.loads((tmp_path / "runs" / "a" / "config.json").read_text())
    assert config["data_dir"] == str(tmp_path / "mydata") and config["out_dir"] == str(tmp_path / "runs" / "a")
    monkeypatch.chdir(tmp_path / "runs" / "a" / "checkpoints")
    result = gan_mnist.main(["--resume", "last.pt", "--epochs", "2", "--quiet"])
    assert result.exit_code == 0 and result.out_dir == tmp_path / "runs" / "a"
    assert load(tmp_path / "runs" / "a" / "checkpoints" / "last.pt")["epoch"] == 2
    assert sorted(p.name for p in Path.cwd().iterdir()) == ["epoch_0001.pt", "epoch_0002.pt", "last.pt"]


def test_config_json_records_what_really_ran_at_every_invocation(train, tmp_path: Path) -> None:
    assert train("run", "--epochs", "1").exit_code == 0
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    assert gan_mnist.main(["--resume", str(last), "--epochs", "2", "--quiet", "--threads", "1"]).exit_code == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    runs = config["invocations"]
    assert [r["from_epoch"] for r in runs] == [0, 1] and runs[1]["resume"] == str(last)
    for r in runs:
        assert r["device"] == "cpu" and r["threads"] == 1 and r["precision"] in ("bf16", "fp32")
        assert r["torch"] == torch.__version__


# -- bounded memory and one-line errors -------------------------------------------------------------------


def test_npy_output_is_written_in_chunks(one_epoch_run, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(gan_mnist, "GENERATE_CHUNK", 7)
    argv = ["generate", "--checkpoint", str(tmp_path / "run" / "generator.pt"), "--num", "20"]
    assert gan_mnist.main([*argv, "--out", str(tmp_path / "d.npy")]).exit_code == 0
    array = np.load(tmp_path / "d.npy")
    assert array.shape == (20, 28, 28) and array.dtype == np.uint8
    assert len({a.tobytes() for a in array}) == 20, "every chunk draws new noise"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--checkpoint", "g.pt", "--out", "x.png", "--num", "10001"], "--num must be 1 to 10000"),
        (["generate", "--checkpoint", "g.pt", "--out", "x.npy", "--num", "1000000000"], "--num must be 1 to"),
        (["generate", "--checkpoint", "g.pt", "--out", "x.png", "--seed", str(2**64)], "--seed must be in"),
        (["evaluate", "--checkpoint", "g.pt", "--num", "1000000"], "--num must be 10 to 50000"),
        (["--eval-num", "60000"], "--eval-num must be 10 to 50000"),
        (["--seed", str(2**64)], "--seed must be in"),
        (["--seed", "-1"], "--seed must be in"),
        (["--threads", "1000"], "--threads must be 0 (auto) to"),
        (["--device", "meta"], "unknown device"),
        (["--device", "xpu"], "unknown device"),
        (["generate", "--checkpoint", "g.pt", "--out", "x.png", "--device", "meta"], "unknown device"),
        (["--recipe", "fancy"], "--recipe must be one of"),
        (["--r1-every", "0"], "--r1-every must be"),
        (["--lr-decay", "cosine"], "--lr-decay must be"),
        (["--latent-dim", "5000"], "--latent-dim must be 1 to 4096"),  # its generator.pt would not load
    ],
)
def test_out_of_range_inputs_are_usage_errors(argv, message, capsys) -> None:
    assert message in usage_error(argv, capsys)


def test_out_of_memory_is_one_line_and_a_bug_keeps_its_traceback(train, tmp_path, monkeypatch, capsys) -> None:
    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 1024000000000 bytes. Error code 12")  # fmt: skip

    monkeypatch.setattr(gan_mnist, "build_nets", no_memory)
    assert train("run", "--epochs", "1").exit_code == 1
    line = one_line_error(capsys.readouterr().err)
    assert "out of memory (tried to allocate 1024000000000 bytes)" in line and "--batch-size" in line
    assert not (tmp_path / "run").exists(), "a failed start leaves nothing"
    monkeypatch.undo()
    assert train("run", "--epochs", "1").exit_code == 0
    argv = ["generate", "--checkpoint", str(tmp_path / "run" / "generator.pt"), "--out", str(tmp_path / "x.png")]
    monkeypatch.setattr(gan_mnist, "load_generator", lambda *a, **k: (_ for _ in ()).throw(MemoryError()))
    capsys.readouterr()
    assert gan_mnist.main(argv).exit_code == 1
    assert "out of memory" in one_line_error(capsys.readouterr().err)
    monkeypatch.setattr(gan_mnist, "load_generator", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # not disguised as a user's error
        gan_mnist.main(argv)


def test_a_superscript_digit_is_one_line(tmp_path: Path, train, capsys) -> None:
    assert train("run", "--epochs", "1", "--conditional").exit_code == 0
    capsys.readouterr()
    argv = ["generate", "--checkpoint", str(tmp_path / "run" / "generator.pt"), "--out", str(tmp_path / "x.png")]
    assert gan_mnist.main([*argv, "--digit", "²"]).exit_code == 1
    assert "choose a digit 0-9" in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize(
    "which, field, value",
    [
        ("generator.pt", "latent_dim", -1),
        ("generator.pt", "latent_dim", "100"),
        ("generator.pt", "latent_dim", 10**9),
        ("generator.pt", "num_classes", 7),
        ("generator.pt", "state_dict", None),
        ("checkpoints/last.pt", "rng", None),
        ("checkpoints/last.pt", "epoch", "3"),
        ("checkpoints/last.pt", "config", {"latent_dim": -5}),
        ("checkpoints/last.pt", "config", {"lr": "fast"}),
    ],
)
def test_files_with_the_right_tag_but_bad_fields_are_one_line(one_epoch_run, tmp_path, capsys, which, field, value):
    path = one_epoch_run / which
    obj = load(path)
    if value is None:
        del obj[field]
    elif isinstance(value, dict):
        obj[field] = {**obj[field], **value}
    else:
        obj[field] = value
    torch.save(obj, path)
    capsys.readouterr()
    if which == "generator.pt":
        result = gan_mnist.main(["generate", "--checkpoint", str(path), "--out", str(tmp_path / "x.png")])
    else:
        result = gan_mnist.main(["--resume", str(path), "--epochs", "3", "--quiet"])
    assert result.exit_code == 1
    assert "is damaged" in one_line_error(capsys.readouterr().err)


def test_a_full_disk_at_the_lock_file_is_one_line(train, tmp_path: Path, monkeypatch, capsys) -> None:
    real_open = open

    def full_disk_open(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        if str(path).endswith(".lock"):

            class Full:
                def __getattr__(self, name):
                    return getattr(handle, name)

                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    handle.close()

                def write(self, text):
                    raise OSError(28, os.strerror(28))

            return Full()
        return handle

    monkeypatch.setattr("builtins.open", full_disk_open)
    assert train("run", "--epochs", "1").exit_code == 1
    assert "No space left on device" in one_line_error(capsys.readouterr().err)


def test_ctrl_c_during_start_up_is_one_line_and_leaves_no_folder(data_dir, tmp_path, monkeypatch, capsys) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gan_mnist, "build_nets", interrupted)  # after the data is read, before the first step
    argv = ["--data-dir", str(data_dir), "--out-dir", str(tmp_path / "run"), *FAST, "--epochs", "1"]
    assert gan_mnist.main(argv).exit_code == 130
    assert capsys.readouterr().err == "gan_mnist: interrupted\n"
    assert not (tmp_path / "run").exists()
