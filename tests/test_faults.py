"""Fault injection: each test breaks something the way the world does and checks that no saved run is lost,
no foreign code runs, and the user gets one clear line."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, ROOT, load
from test_trainer import one_line_error

import gan_mnist


def spawn(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )


def wait_for_line(proc: subprocess.Popen, prefix: str) -> None:
    for line in proc.stdout:
        if line.startswith(prefix):
            return
    raise AssertionError(f"process ended before printing {prefix!r}: {proc.stderr.read()}")


def finite(state_dict: dict) -> bool:
    return all(torch.isfinite(t).all() for t in state_dict.values() if t.is_floating_point())


# 1. Killed while saving ---------------------------------------------------------------------------------
SLOW_SAVE = """
import os, sys, time
sys.path.insert(0, {root!r})
import gan_mnist
real_fsync, saves = os.fsync, []
def stalling_fsync(fd):
    if ".last.pt.tmp" in os.readlink(f"/proc/self/fd/{{fd}}"):
        saves.append(1)
        if len(saves) == 2:  # epoch 2's last.pt: the write got halfway, then the process is killed
            os.ftruncate(fd, os.fstat(fd).st_size // 2)
            print("stalled mid-save", flush=True)
            time.sleep(120)
    real_fsync(fd)
os.fsync = stalling_fsync
sys.exit(gan_mnist.main(sys.argv[1:]).exit_code)
"""


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds the file being saved through /proc")
def test_sigkill_while_saving_keeps_the_previous_checkpoint(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    script = tmp_path / "slow_save.py"
    script.write_text(SLOW_SAVE.format(root=str(ROOT)))
    proc = spawn([str(script), "--data-dir", str(data_dir), "--out-dir", str(out), "--epochs", "5", *FAST])
    try:
        wait_for_line(proc, "stalled mid-save")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.communicate()
    ckpt_dir = out / "checkpoints"
    assert list(ckpt_dir.glob(".last.pt.tmp*")), "the half-written file went to a temporary name"
    assert load(ckpt_dir / "last.pt")["epoch"] == 1, "last.pt is the intact epoch-1 checkpoint"

    result = gan_mnist.main(["--resume", str(ckpt_dir / "last.pt"), "--epochs", "3", "--threads", "1", "--quiet"])
    assert result.exit_code == 0 and load(ckpt_dir / "last.pt")["epoch"] == 3
    assert not list(ckpt_dir.glob(".*.tmp*")), "the stale temporary file is cleared on resume"


# 2. Disk full / write error -----------------------------------------------------------------------------
def test_write_error_on_checkpoint_keeps_the_previous_one(train, tmp_path: Path) -> None:
    assert train("run", "--epochs", "1").exit_code == 0
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    before = last.read_bytes()

    def small_file_limit() -> None:  # the OS refuses any file over 8 MB: a real write error, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 * 2**20, 8 * 2**20))

    proc = spawn(
        [str(ROOT / "gan_mnist.py"), "--resume", str(last), "--epochs", "2", "--threads", "1", "--quiet"],
        preexec_fn=small_file_limit,
    )
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    line = one_line_error(err)
    assert "could not write" in line and "last.pt" in line and "previous version is intact" in line
    assert last.read_bytes() == before
    assert not list((tmp_path / "run").rglob(".*.tmp*")), "no half-written file left behind"


def test_write_error_on_sample_keeps_the_previous_checkpoint(
    train, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    assert train("run", "--epochs", "1").exit_code == 0
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    before = last.read_bytes()

    class FullDisk:  # a grid whose saving gets halfway, then meets a full disk
        def save(self, fp, format):
            fp.write(b"\x89PNG half")
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gan_mnist, "grid_image", lambda *args, **kwargs: FullDisk())
    capsys.readouterr()
    assert gan_mnist.main(["--resume", str(last), "--epochs", "2", "--threads", "1", "--quiet"]).exit_code == 1
    line = one_line_error(capsys.readouterr().err)
    assert "epoch_0002.png" in line and "No space left on device" in line
    assert last.read_bytes() == before
    assert not (tmp_path / "run" / "samples" / "epoch_0002.png").exists()
    assert not list((tmp_path / "run").rglob(".*.tmp*"))


# 3. Unwritable --out-dir, a data dir that is a file -----------------------------------------------------
def test_unwritable_out_dir_is_refused_before_training(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = gan_mnist.main(["--data-dir", str(data_dir), "--out-dir", str(blocker / "run"), "--epochs", "1", *FAST])
    captured = capsys.readouterr()
    assert result.exit_code == 1 and "epoch" not in captured.out
    assert "cannot create --out-dir" in one_line_error(captured.err)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_out_dir_is_refused(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result = gan_mnist.main(["--data-dir", str(data_dir), "--out-dir", str(locked), "--epochs", "1", *FAST])
    assert result.exit_code == 1
    assert str(locked) in one_line_error(capsys.readouterr().err)


def test_data_dir_that_is_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    not_a_dir = tmp_path / "data.txt"
    not_a_dir.write_text("x")
    result = gan_mnist.main(["--data-dir", str(not_a_dir), "--out-dir", str(tmp_path / "run"), *FAST])
    captured = capsys.readouterr()
    assert result.exit_code == 1 and "epoch" not in captured.out
    assert "is a file, not a folder" in one_line_error(captured.err)
    assert not (tmp_path / "run").exists()


# 4. Diverging training ----------------------------------------------------------------------------------
def test_divergence_stops_and_keeps_the_last_good_checkpoint(
    train, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert train("run", "--epochs", "1").exit_code == 0
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    before = last.read_bytes()
    capsys.readouterr()
    result = gan_mnist.main(["--resume", str(last), "--epochs", "5", "--lr", "1e30", "--threads", "1", "--quiet"])
    assert result.exit_code == 1
    line = one_line_error(capsys.readouterr().err)
    assert "diverged in epoch 2" in line and "lower --lr" in line
    assert last.read_bytes() == before and finite(load(last)["generator"])
    assert finite(load(tmp_path / "run" / "generator.pt")["state_dict"])


# 5. Hostile checkpoint ----------------------------------------------------------------------------------
class RunsCodeOnLoad:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # unpickling would create the marker file


@pytest.mark.parametrize("command", ["resume", "generate", "evaluate"])
def test_hostile_checkpoint_is_refused_and_its_code_never_runs(
    tmp_path: Path, command: str, capsys: pytest.CaptureFixture
) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "gan_mnist.checkpoint", "payload": RunsCodeOnLoad(marker)}, evil)
    argv = {
        "resume": ["--resume", str(evil)],
        "generate": ["generate", "--checkpoint", str(evil), "--out", str(tmp_path / "x.png")],
        "evaluate": ["evaluate", "--checkpoint", str(evil), "--data-dir", str(tmp_path)],
    }[command]
    assert gan_mnist.main(argv).exit_code == 1
    assert "could run code" in one_line_error(capsys.readouterr().err)
    assert not marker.exists(), "the payload ran"


# 6. Mismatched checkpoint -------------------------------------------------------------------------------
def test_mismatched_checkpoint_names_the_mismatch(train, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert train("run", "--epochs", "1", "--latent-dim", "64").exit_code == 0
    last = str(tmp_path / "run" / "checkpoints" / "last.pt")
    capsys.readouterr()
    assert gan_mnist.main(["--resume", last, "--epochs", "2", "--latent-dim", "100"]).exit_code == 1
    assert "--latent-dim 64, not 100" in one_line_error(capsys.readouterr().err)
    assert gan_mnist.main(["--resume", last, "--epochs", "2", "--conditional"]).exit_code == 1
    assert "trained without --conditional" in one_line_error(capsys.readouterr().err)
    # a generator file whose recorded shape disagrees with its weights
    gen = load(tmp_path / "run" / "generator.pt")
    gen["latent_dim"] = 100
    torch.save(gen, tmp_path / "tampered.pt")
    assert (
        gan_mnist.main(
            ["generate", "--checkpoint", str(tmp_path / "tampered.pt"), "--out", str(tmp_path / "x.png")]
        ).exit_code
        == 1
    )
    assert "latent_dim 100" in one_line_error(capsys.readouterr().err)


def test_files_of_other_networks_are_named_not_loaded(train, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A checkpoint or generator.pt whose layers are not this version's (a DCGAN saved before G's hidden layer):
    one line naming the first layer that does not fit, for resume and for each command."""
    assert train("run", "--epochs", "1", "--arch", "dcgan", "--clusters", "0").exit_code == 0  # with its hidden layer
    last, gen = load(tmp_path / "run/checkpoints/last.pt"), load(tmp_path / "run/generator.pt")
    for sd in (last["generator"], last["ema"], gen["state_dict"]):
        sd["net.3.weight"] = sd["net.3.weight"][:, :100]  # the layer after the hidden one, fed from z directly
    torch.save(last, tmp_path / "old_last.pt")
    torch.save(gen, tmp_path / "old_generator.pt")
    capsys.readouterr()
    for argv in (["--resume", str(tmp_path / "old_last.pt"), "--epochs", "2"],
                 ["generate", "--checkpoint", str(tmp_path / "old_generator.pt"), "--out", str(tmp_path / "x.png")],
                 ["evaluate", "--checkpoint", str(tmp_path / "old_last.pt")]):  # fmt: skip
        assert gan_mnist.main(argv).exit_code == 1
        line = one_line_error(capsys.readouterr().err)
        assert "dcgan" in line and "another version" in line and "net.3.weight" in line, line
    assert not (tmp_path / "x.png").exists()


# 7. Corrupt data ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated images", "wrong magic labels"])
def test_corrupt_mnist_file_is_named(data_dir: Path, tmp_path: Path, damage: str, capsys) -> None:
    broken = tmp_path / "data"
    shutil.copytree(data_dir / "MNIST" / "raw", broken / "MNIST" / "raw")
    raw = broken / "MNIST" / "raw"
    if damage == "truncated images":
        victim = raw / "train-images-idx3-ubyte"
        victim.write_bytes(victim.read_bytes()[:5000])
    else:
        victim = raw / "train-labels-idx1-ubyte"
        victim.write_bytes(b"\x12\x34\x56\x78" + victim.read_bytes()[4:])
    result = gan_mnist.main(["--data-dir", str(broken), "--out-dir", str(tmp_path / "run"), *FAST])
    assert result.exit_code == 1
    assert f"corrupt MNIST file {victim}" in one_line_error(capsys.readouterr().err)


# 8. Two runs, one folder --------------------------------------------------------------------------------
def test_second_process_on_a_training_folder_is_refused(data_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    first = spawn(
        [str(ROOT / "gan_mnist.py"), "--data-dir", str(data_dir), "--out-dir", str(out), "--epochs", "100000", *FAST]
    )
    try:
        wait_for_line(first, "epoch ")
        last = str(out / "checkpoints" / "last.pt")
        for _ in range(200):  # the summary line comes just before the checkpoint is written
            if Path(last).exists():
                break
            time.sleep(0.05)
        capsys.readouterr()
        assert gan_mnist.main(["--resume", last, "--epochs", "100001", "--quiet"]).exit_code == 1
        assert "is in use by a training run (pid" in one_line_error(capsys.readouterr().err)
        assert gan_mnist.main(["--data-dir", str(data_dir), "--out-dir", str(out), *FAST]).exit_code == 1
        assert "already holds a run" in one_line_error(capsys.readouterr().err)
    finally:
        first.send_signal(signal.SIGKILL)  # a crash: no clean-up of the lock file
        first.communicate(timeout=30)
    epoch = load(out / "checkpoints" / "last.pt")["epoch"]
    result = gan_mnist.main(["--resume", last, "--epochs", str(epoch + 1), "--threads", "1", "--quiet"])
    assert result.exit_code == 0, "a crashed run's lock does not block its resume"


# 9. Long run: bounded disk use, and it still resumes ------------------------------------------------------
def test_long_run_keeps_disk_use_bounded_and_resumes(train, tmp_path: Path) -> None:
    flags = ["--subset", "128", "--checkpoint-every", "1", "--keep-checkpoints", "3", "--ema-decay", "0"]
    assert train("run", "--epochs", "12", *flags).exit_code == 0
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.glob("*.pt")) == [
        "epoch_0010.pt",
        "epoch_0011.pt",
        "epoch_0012.pt",
        "last.pt",
    ]
    one = (ckpt_dir / "last.pt").stat().st_size
    assert sum(p.stat().st_size for p in ckpt_dir.iterdir()) <= 4 * one + 4096
    assert len(list((tmp_path / "run" / "samples").glob("*.png"))) == 12
    result = gan_mnist.main(["--resume", str(ckpt_dir / "last.pt"), "--epochs", "14", "--threads", "1", "--quiet"])
    assert result.exit_code == 0 and len(result.history) == 14
    assert sorted(p.name for p in ckpt_dir.glob("epoch_*.pt")) == ["epoch_0012.pt", "epoch_0013.pt", "epoch_0014.pt"]


def test_debug_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nope.pt"
    assert gan_mnist.main(["generate", "--checkpoint", str(missing), "--out", "x.png", "--debug"]).exit_code == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and f"checkpoint not found: {missing}" in err


def test_output_piped_into_a_reader_that_leaves_early_stops_quietly(train, tmp_path: Path) -> None:
    """`gan_mnist.py generate ... | head -0`: no traceback and no 'Exception ignored' report, exit 141 or 0."""
    assert train("run", "--epochs", "1").exit_code == 0
    argv = ["generate", "--checkpoint", str(tmp_path / "run/generator.pt"), "--out", str(tmp_path / "x.png")]
    read, write = os.pipe()
    os.close(read)  # the reader has gone before the first line
    proc = subprocess.run([sys.executable, str(ROOT / "gan_mnist.py"), *argv], stdout=write, stderr=subprocess.PIPE,
                          text=True, check=False)  # fmt: skip
    os.close(write)
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    assert proc.returncode in (0, 141), (proc.returncode, proc.stderr)
    assert (tmp_path / "x.png").is_file()  # the work was done before the line that could not be written


def test_training_piped_into_a_reader_that_leaves_early_saves_and_stops(data_dir: Path, tmp_path: Path) -> None:
    """`gan_mnist.py --epochs 3 | head -1`: the reader goes after the first line; the run stops as at a signal, saved,
    says how to resume on stderr (no traceback), exits 141, and resumes to the end."""
    out = tmp_path / "run"
    args = [str(ROOT / "gan_mnist.py"), "--data-dir", str(data_dir), "--out-dir", str(out), *FAST, "--epochs", "3"]
    proc = spawn(args)
    assert proc.stdout.readline().startswith("gan_mnist: training on")
    proc.stdout.close()  # `head -1` has its line and leaves
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGPIPE, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert "SIGPIPE: stopped at epoch" in err and "Resume with:" in err, err
    saved = load(out / "checkpoints" / "last.pt")
    assert saved["epoch"] < 3 and saved["epoch"] * 8 + saved["step"] >= 1, "stopped early, not before a step"
    resumed = gan_mnist.main(["--resume", str(out / "checkpoints" / "last.pt"), "--epochs", "3"])
    assert resumed.exit_code == 0 and [row["epoch"] for row in resumed.history] == [1, 2, 3]


class FullAfter:
    """A stdout on a disk that fills up after `lines` lines."""

    def __init__(self, lines: int) -> None:
        self.left = lines

    def write(self, text: str) -> int:
        if self.left <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.left -= text.count("\n")
        return len(text)

    def flush(self) -> None:
        pass


def test_stdout_that_cannot_be_written_fails_a_command_in_one_line_and_training_goes_on(
    train, data_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """`> /dev/full`, a log on a full disk: a command says so in one line (its file is still written); a training
    run that loses its stdout midway says so and trains to the end."""
    monkeypatch.setattr(sys, "stdout", FullAfter(1))
    result = train("run", "--epochs", "2")
    assert result.exit_code == 0 and [row["epoch"] for row in result.history] == [1, 2]
    assert (
        "note: cannot write to standard output (No space left on device); training goes on" in capsys.readouterr().err
    )
    assert load(tmp_path / "run" / "checkpoints" / "last.pt")["epoch"] == 2
    out = tmp_path / "digits.png"
    argv = [
        str(ROOT / "gan_mnist.py"),
        "generate",
        "--checkpoint",
        str(tmp_path / "run/generator.pt"),
        "--out",
        str(out),
    ]
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, *argv], stdout=full, stderr=subprocess.PIPE, text=True, check=False)
    assert proc.returncode == 1 and one_line_error(proc.stderr) == (
        "gan_mnist: error: cannot write to standard output: No space left on device"
    ), proc.stderr
    assert out.is_file()
    monkeypatch.setattr(sys, "stdout", FullAfter(0))
    metrics = tmp_path / "scores.json"
    argv = ["evaluate", "--checkpoint", str(tmp_path / "run/generator.pt"), "--num", "64", "--out", str(metrics)]
    assert gan_mnist.main([*argv, "--data-dir", str(data_dir)]).exit_code == 1
    assert "cannot write to standard output" in capsys.readouterr().err
    assert json.loads(metrics.read_text())["num_samples"] == 64, "what was measured is kept"
