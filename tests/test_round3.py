"""Hardening, round 3, and the behaviours the last round's tests did not pin: a checkpoint never takes over another
run, no command replaces the user's files, every I/O failure is one line, a stop signal acts within seconds, bounds
on what is allocated, commands that paste; when a run evaluates, the judge trained on the way, the near-copy share,
the page's escaping, the schema part by part, own-file matching, the floor's sample size, per-digit accuracy, one
row per digit, the EMA's cap and the guard against an older checkpoint."""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import load
from PIL import Image
from test_contracts import constant_generator
from test_hardening import usage_error
from test_trainer import one_line_error

import gan_mnist


def files_of(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# -- a checkpoint never takes over another run; no command replaces the user's files ---------------------


def test_a_backup_checkpoint_never_resumes_into_another_run(train, tmp_path: Path, capsys) -> None:
    assert train("run", "--epochs", "2").exit_code == 0
    backup = tmp_path / "backup.pt"  # a copy of run A's last.pt kept outside checkpoints/
    shutil.copy(tmp_path / "run" / "checkpoints" / "last.pt", backup)
    shutil.rmtree(tmp_path / "run")  # the folder is deleted, and reused by run B: fewer epochs, another seed
    assert train("run", "--epochs", "1", "--seed", "7").exit_code == 0
    config = (tmp_path / "run" / "config.json").read_text()
    for remove in ("config.json", "checkpoints"):  # either one says whose the folder is
        (tmp_path / "run" / "config.json").write_text(config)
        (tmp_path / "run" / remove).unlink() if remove == "config.json" else shutil.rmtree(tmp_path / "run" / remove)
        before = files_of(tmp_path / "run")
        capsys.readouterr()
        assert gan_mnist.main(["--resume", str(backup), "--epochs", "3", "--quiet"]).exit_code == 1
        assert "now holds another run" in one_line_error(capsys.readouterr().err)
        assert files_of(tmp_path / "run") == before
    branch = gan_mnist.main(["--resume", str(backup), "--epochs", "3", "--quiet", "--out-dir", str(tmp_path / "b")])
    assert branch.exit_code == 0, "--out-dir NEW branches it, as the refusal says"
    assert load(tmp_path / "b" / "checkpoints" / "last.pt")["run_id"] != load(backup)["run_id"], "a run of its own"


def test_an_older_checkpoint_never_overwrites_a_run_that_trained_past_it(train, tmp_path: Path, capsys) -> None:
    assert train("run", "--epochs", "3", "--checkpoint-every", "1", "--keep-checkpoints", "0").exit_code == 0
    before = files_of(tmp_path / "run")
    older = tmp_path / "run" / "checkpoints" / "epoch_0001.pt"
    capsys.readouterr()
    assert gan_mnist.main(["--resume", str(older), "--epochs", "5", "--quiet"]).exit_code == 1
    assert "has trained past this checkpoint (to epoch 3)" in one_line_error(capsys.readouterr().err)
    assert files_of(tmp_path / "run") == before


@pytest.mark.parametrize("target", ["generator.pt", "metrics.json", "config.json", "the checkpoint"])
def test_evaluate_never_writes_over_its_input_or_a_runs_file(one_epoch_run, data_dir, target, capsys) -> None:
    ckpt = one_epoch_run / "generator.pt"
    if target == "the checkpoint":  # a generator saved under a .json name, given as both input and output
        ckpt = one_epoch_run / "g.json"
        shutil.copy(one_epoch_run / "generator.pt", ckpt)
    out = ckpt if target == "the checkpoint" else one_epoch_run / target
    before = files_of(one_epoch_run)
    argv = ["evaluate", "--checkpoint", str(ckpt), "--num", "64", "--data-dir", str(data_dir), "--out", str(out)]
    if target == "generator.pt":
        assert "--out must name a .json file" in usage_error(argv, capsys)
    else:
        capsys.readouterr()
        assert gan_mnist.main(argv).exit_code == 1
        assert "is an input or a file of a training run" in one_line_error(capsys.readouterr().err)
    assert files_of(one_epoch_run) == before


@pytest.mark.parametrize("target", ["losses.png", "samples/epoch_0001.png", "progress.gif", "samples/new/",
                                    "checkpoints/m.json"])  # fmt: skip
def test_no_command_writes_over_or_among_a_runs_files(one_epoch_run, data_dir, tmp_path, target, capsys) -> None:
    before, ckpt, out = files_of(one_epoch_run), str(one_epoch_run / "generator.pt"), f"{one_epoch_run}/{target}"
    commands = {".png": ["generate", "--out", out], "/": ["generate", "--out", out],
                ".gif": ["interpolate", "--out", out, "--frames", "3"],
                ".json": ["evaluate", "--out", out, "--num", "64", "--data-dir", str(data_dir)]}  # fmt: skip
    argv = [*commands[next(k for k in commands if target.endswith(k))], "--checkpoint", ckpt]
    if target.endswith(".png"):  # evaluate's picture of nearest training digits, too
        argv_nearest = ["evaluate", "--checkpoint", ckpt, "--num", "64", "--data-dir", str(data_dir), "--out",
                        str(tmp_path / "m.json"), "--nearest", out]  # fmt: skip
        assert gan_mnist.main(argv_nearest).exit_code == 1
        assert "a file of a training run" in one_line_error(capsys.readouterr().err)
    capsys.readouterr()
    assert gan_mnist.main(argv).exit_code == 1
    assert "is an input or a file of a training run; name a new file" in one_line_error(capsys.readouterr().err)
    assert files_of(one_epoch_run) == before
    argv[argv.index(out)] = str(one_epoch_run / "mine") + ("/" if target.endswith("/") else Path(target).suffix)
    assert gan_mnist.main(argv).exit_code == 0, "a new file of the user's in the run folder is theirs to write"
    if target.endswith(".json"):  # evaluate's own default name, beside a checkpoint in checkpoints/, is no run file
        last = one_epoch_run / "checkpoints" / "last.pt"
        assert gan_mnist.main([*argv[:1], *argv[3:-2], "--checkpoint", str(last)]).exit_code == 0
        assert json.loads(last.with_suffix(".eval.json").read_text())["num_samples"] == 64


def test_a_run_whose_checkpoints_were_deleted_is_still_protected(one_epoch_run, data_dir, monkeypatch, capsys) -> None:
    shutil.rmtree(one_epoch_run / "checkpoints")  # the user frees the disk and keeps generator.pt and the rest
    before, ckpt = files_of(one_epoch_run), str(one_epoch_run / "generator.pt")
    run = str(one_epoch_run)
    for argv in (["generate", "--out", f"{run}/losses.png"], ["generate", "--out", f"{run}/samples/"],
                 ["interpolate", "--out", f"{run}/progress.gif", "--frames", "3"],
                 ["evaluate", "--out", f"{run}/metrics.json", "--data-dir", str(data_dir), "--num", "64"]):  # fmt: skip
        assert gan_mnist.main([*argv, "--checkpoint", ckpt]).exit_code == 1, argv
        assert "a file of a training run" in one_line_error(capsys.readouterr().err)
    judge = ["--judge", f"{run}/samples/judge.pt", "--data-dir", str(data_dir)]  # the judge cache: nor there
    assert gan_mnist.main(["evaluate", "--checkpoint", ckpt, "--out", "e.json", "--num", "64", *judge]).exit_code == 1
    assert "is among the files of a training run" in one_line_error(capsys.readouterr().err)
    assert gan_mnist.main([*judge, "--out-dir", str(one_epoch_run.parent / "b"), "--epochs", "1"]).exit_code == 1
    assert "is among the files of a training run" in one_line_error(capsys.readouterr().err)
    argv = ["--data-dir", str(data_dir), "--epochs", "1", "--eval-every", "-1", "--no-tensorboard", "--quiet"]
    assert gan_mnist.main([*argv, "--out-dir", str(one_epoch_run / "samples" / "new")]).exit_code == 1
    assert "is inside samples/ of the run" in one_line_error(capsys.readouterr().err)
    monkeypatch.chdir(one_epoch_run / "samples")  # the default outputs/ would be made inside the run's samples/
    assert gan_mnist.main(argv).exit_code == 1
    assert "would be inside samples/ of the run" in one_line_error(capsys.readouterr().err)
    assert files_of(one_epoch_run) == before and not (one_epoch_run / "samples" / "outputs").exists()


@pytest.mark.parametrize("argv, folder", [
    (["evaluate", "--out", "m.json", "--num", "64"], "m.json"),
    (["evaluate", "--out", "ok.json", "--nearest", "n.png", "--num", "64"], "n.png"),
    (["interpolate", "--out", "w.gif", "--frames", "3"], "w.gif"),
    (["interpolate", "--out", "w.png"], "w.png"),
])  # fmt: skip
def test_an_output_that_is_a_folder_is_refused_before_the_work(one_epoch_run, data_dir, tmp_path, argv, folder,
                                                               capsys) -> None:  # fmt: skip
    (tmp_path / folder).mkdir()
    argv = [str(tmp_path / a) if a.endswith((".json", ".png", ".gif")) else a for a in argv]
    data = ["--data-dir", str(data_dir)] if argv[0] == "evaluate" else []
    assert gan_mnist.main([*argv, *data, "--checkpoint", str(one_epoch_run / "generator.pt")]).exit_code == 1
    out = capsys.readouterr()
    assert "is a folder; name a file to write" in one_line_error(out.err) and not out.out  # before the work
    assert not any((tmp_path / folder).iterdir()) and not (tmp_path / "ok.json").exists()


def test_evaluate_creates_missing_folders_first_and_prints_the_metrics_whatever_fails_to_write(
    one_epoch_run, data_dir, tmp_path, monkeypatch, capsys
) -> None:
    argv = ["evaluate", "--checkpoint", str(one_epoch_run / "generator.pt"), "--num", "64", "--data-dir", str(data_dir)]
    out, near = tmp_path / "new" / "m.json", tmp_path / "pics" / "near.png"
    assert gan_mnist.main([*argv, "--out", str(out), "--nearest", str(near)]).exit_code == 0
    assert json.loads(out.read_text())["num_samples"] == 64 and near.is_file()
    real_write = gan_mnist.write_json

    def failing(path, obj):
        raise gan_mnist.GanError(f"could not write {path}: Read-only file system; the previous version is intact")

    monkeypatch.setattr(gan_mnist, "write_json", failing)
    capsys.readouterr()
    assert gan_mnist.main([*argv, "--out", str(tmp_path / "x.json")]).exit_code == 1
    captured = capsys.readouterr()
    assert "FID " in captured.out, "the finished work is shown" and "Read-only" in one_line_error(captured.err)
    monkeypatch.setattr(gan_mnist, "write_json", real_write)


def test_generate_into_a_folder_never_replaces_the_users_files(one_epoch_run, tmp_path, capsys) -> None:
    folder = tmp_path / "digits"
    folder.mkdir()
    (folder / "digit_00000.png").write_bytes(b"mine")
    argv = ["generate", "--checkpoint", str(one_epoch_run / "generator.pt"), "--num", "3", "--out", str(folder) + "/"]
    assert gan_mnist.main(argv).exit_code == 1
    assert "already holds files" in one_line_error(capsys.readouterr().err)
    assert [p.name for p in folder.iterdir()] == ["digit_00000.png"] and (
        folder / "digit_00000.png"
    ).read_bytes() == b"mine"


@pytest.mark.parametrize("linked", ["samples", "checkpoints"])
def test_a_linked_subfolder_is_refused_and_its_target_untouched(one_epoch_run, tmp_path, linked, capsys) -> None:
    outside = tmp_path / "mine"
    shutil.copytree(one_epoch_run / linked, outside)
    (outside / "epoch_0009.png").write_bytes(b"mine")
    (outside / ".last.pt.tmp5").write_bytes(b"mine")
    shutil.rmtree(one_epoch_run / linked)
    (one_epoch_run / linked).symlink_to(outside)
    before = files_of(outside)
    last = one_epoch_run / "checkpoints" / "last.pt"
    assert gan_mnist.main(["--resume", str(last), "--epochs", "2", "--quiet"]).exit_code == 1
    assert "is a link" in one_line_error(capsys.readouterr().err)
    assert files_of(outside) == before


def test_a_failed_start_in_a_users_folder_removes_exactly_what_it_made(train, tmp_path, capsys) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("mine")
    (project / ".lock").write_text("my lock")
    capsys.readouterr()
    assert train("project", "--epochs", "1", "--lr", "1e30", "--tensorboard").exit_code == 1  # diverges
    assert "diverged" in one_line_error(capsys.readouterr().err)
    assert sorted(p.name for p in project.iterdir()) == [".lock", "README.md"]
    assert (project / ".lock").read_text() == "my lock" and (project / "README.md").read_text() == "mine"
    assert train("project", "--epochs", "1").exit_code == 0, "the retry is not refused"


# -- every I/O failure is one line --------------------------------------------------------------------------


def test_writes_to_a_read_only_folder_are_one_line(one_epoch_run, tmp_path, monkeypatch, capsys) -> None:
    """A read-only filesystem refuses the temporary file and its removal alike (root ignores chmod, so the
    refusals are injected)."""
    locked = tmp_path / "ro"
    locked.mkdir()
    real_open, real_unlink = open, Path.unlink

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(locked)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only)
    monkeypatch.setattr(Path, "unlink", lambda p, *a, **k: read_only(p) if str(p).startswith(str(locked)) else
                        real_unlink(p, *a, **k))  # fmt: skip
    ckpt = str(one_epoch_run / "generator.pt")
    (locked / "w.gif").write_bytes(b"the user's")  # before the refusals begin
    for argv in (["generate", "--checkpoint", ckpt, "--out", str(locked / "d.npy")],
                 ["interpolate", "--checkpoint", ckpt, "--out", str(locked / "w.gif"), "--frames", "4"]):  # fmt: skip
        capsys.readouterr()
        assert gan_mnist.main(argv).exit_code == 1
        line = one_line_error(capsys.readouterr().err)
        kept = "the previous version is intact" if argv[0] == "interpolate" else "nothing was written"
        assert "Read-only file system" in line and line.endswith(kept), line  # it says what is there now
    assert (locked / "w.gif").read_bytes() == b"the user's" and not (locked / "d.npy").exists()


@pytest.mark.parametrize("named", [False, True], ids=["own-cache", "--judge"])
def test_a_read_only_judge_cache_costs_a_recomputation_not_the_run(data_dir, tmp_path, monkeypatch, capsys, named):
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    real_open = open

    def read_only(path, mode="r", *args, **kwargs):
        if str(path).startswith(str(tmp_path)) and "w" in mode:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only)
    monkeypatch.setattr(gan_mnist, "train_judge", lambda *a, **k: (gan_mnist.Judge().eval(), 0.995, 512))  # fast
    evaluator = gan_mnist.Evaluator(data_dir, tmp_path / "judge.pt" if named else "", num=80, quiet=True)
    assert evaluator.floor["fid"] > 0 and evaluator.judge_info["train_images"] == 512
    err = capsys.readouterr().err
    assert "the judge network is not cached" in err and "Traceback" not in err
    assert ("pass --judge PATH" in err) == (not named), "the hint only where --judge was not given"


def test_a_tensorboard_path_that_is_a_file_is_one_line(one_epoch_run, capsys) -> None:
    shutil.rmtree(one_epoch_run / "tensorboard", ignore_errors=True)
    (one_epoch_run / "tensorboard").write_text("a file")
    last = one_epoch_run / "checkpoints" / "last.pt"
    assert gan_mnist.main(["--resume", str(last), "--epochs", "2", "--quiet", "--tensorboard"]).exit_code == 1
    assert "cannot write TensorBoard logs" in one_line_error(capsys.readouterr().err)


def test_a_floor_cache_with_the_right_hash_but_bad_fields_is_recomputed(data_dir) -> None:
    first = gan_mnist.Evaluator(data_dir, "", num=64, quiet=True)
    cache = gan_mnist.default_judge_path(first.train_images)
    floor_file = cache.with_name(f"{cache.stem}.floor-64.json")
    for floor in (None, {"fid": "low"}, [1, 2], "x"):
        floor_file.write_text(json.dumps({"judge_sha256": first.judge_info["sha256"], "floor": floor}))
        assert gan_mnist.Evaluator(data_dir, "", num=64, quiet=True).floor["fid"] == pytest.approx(first.floor["fid"])


@pytest.mark.parametrize("command", ["generate", "evaluate", "interpolate"])
def test_a_generator_file_without_its_ema_field_is_refused_by_every_command(one_epoch_run, data_dir, command, capsys):
    gen = load(one_epoch_run / "generator.pt")
    del gen["ema"]
    torch.save(gen, one_epoch_run / "generator.pt")
    argv = [command, "--checkpoint", str(one_epoch_run / "generator.pt")]
    argv += {
        "generate": ["--out", "x.png"],
        "evaluate": ["--data-dir", str(data_dir)],
        "interpolate": ["--out", "w.gif"],
    }[command]
    assert gan_mnist.main(argv).exit_code == 1
    assert "its field 'ema' is missing" in one_line_error(capsys.readouterr().err)


# -- signals ----------------------------------------------------------------------------------------------


def test_a_signal_ignored_at_the_start_stays_ignored() -> None:
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        with gan_mnist.StopSignal():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_stop_signal_ends_the_judges_training_and_an_evaluation_at_once(data_dir) -> None:
    with gan_mnist.StopSignal() as stop:
        stop.signum = signal.SIGTERM
        with pytest.raises(gan_mnist.Interrupted):
            gan_mnist.train_judge(data_dir, quiet=True)
        with pytest.raises(gan_mnist.Interrupted):
            gan_mnist.judge_outputs(gan_mnist.Judge(), torch.zeros(300, 1, 28, 28))
        with pytest.raises(gan_mnist.Interrupted):
            next(gan_mnist.distances(torch.zeros(3, 4), torch.zeros(5, 4)))
    gan_mnist.judge_outputs(gan_mnist.Judge(), torch.zeros(3, 1, 28, 28))  # without a signal: no stop


def test_sigterm_while_generating_leaves_no_temporary_file(one_epoch_run, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(gan_mnist, "GENERATE_CHUNK", 7)
    real, calls = gan_mnist.to_uint8, []

    def terminated_on_the_second_chunk(images):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(images)

    monkeypatch.setattr(gan_mnist, "to_uint8", terminated_on_the_second_chunk)
    out = tmp_path / "digits.npy"
    argv = ["generate", "--checkpoint", str(one_epoch_run / "generator.pt"), "--num", "30", "--out", str(out)]
    assert gan_mnist.main(argv).exit_code == 128 + signal.SIGTERM
    assert capsys.readouterr().err == "gan_mnist: interrupted\n"
    assert list(tmp_path.iterdir()) == [one_epoch_run], "neither the file nor its temporary"


# -- bounded work, right answers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--out", "a.npy/", "--num", "12000"], "--num must be 1 to 10000 for a folder"),
        (["generate", "--out", ""], "name a .png or .npy file, or a folder"),
        (["generate", "--out", "x.png", "--num", "10000", "--scale", "32"], "million pixels"),
        (["interpolate", "--out", "w.gif", "--paths", "100", "--frames", "1000", "--scale", "32"], "million pixels"),
        (["interpolate", "--out", "w.gif", "--digits", "0123456789" * 10, "--paths", "100"], "million pixels"),
    ],
)  # fmt: skip
def test_what_is_allocated_is_bounded_not_each_flag_alone(argv, message, capsys) -> None:
    assert message in usage_error([argv[0], "--checkpoint", "g.pt", *argv[1:]], capsys)


def test_a_folder_named_like_a_file_gets_the_folders_limit(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits.npy").mkdir()
    assert "for a folder" in usage_error(["generate", "--checkpoint", "g.pt", "--out", "digits.npy", "--num", "12000"],
                                         capsys)  # fmt: skip


def ctrl_c_after(monkeypatch: pytest.MonkeyPatch, steps: int) -> None:
    """Ctrl-C arrives right after the given number of training steps."""
    real_step, calls = gan_mnist.train_step, []

    def step(*args):
        real_step(*args)
        calls.append(1)
        if len(calls) == steps:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(gan_mnist, "train_step", step)


def test_a_mid_epoch_checkpoint_needs_more_epochs_than_it_finished(train, tmp_path, monkeypatch, capsys) -> None:
    ctrl_c_after(monkeypatch, 12)  # epoch 2, step 4 of 8
    assert train("run", "--epochs", "3").exit_code == 130
    monkeypatch.undo()
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    before = files_of(tmp_path / "run")
    capsys.readouterr()
    assert gan_mnist.main(["--resume", str(last), "--epochs", "1", "--quiet"]).exit_code == 1
    assert "already trained 1 epoch;" in one_line_error(capsys.readouterr().err)
    assert files_of(tmp_path / "run") == before


def test_printed_commands_paste_into_a_shell(train, tmp_path, monkeypatch, capsys) -> None:
    name = "my run $(touch pwned); echo"
    ctrl_c_after(monkeypatch, 3)
    monkeypatch.chdir(tmp_path)
    assert train(name, "--epochs", "2").exit_code == 130
    hint = capsys.readouterr().err.split("Resume with: ")[1].strip()
    words = shlex.split(hint)
    assert words[:3] == ["python", "gan_mnist.py", "--resume"] and words[3] == str(tmp_path / name / "checkpoints" /
                                                                                  "last.pt")  # fmt: skip
    page = (tmp_path / name / "summary.html").read_text()
    commands = __import__("html").unescape(page.split("<pre>")[1].split("</pre>")[0]).splitlines()
    assert shlex.split(commands[0])[3] == str(tmp_path / name / "checkpoints" / "last.pt")
    assert all(Path(shlex.split(c)[4]).is_absolute() for c in commands[1:3])
    assert train(name, "--epochs", "1").exit_code == 1  # a new run refused there names the resume, quoted too
    hint = one_line_error(capsys.readouterr().err).split("resume it with ")[1].split(", or choose")[0]
    assert shlex.split(hint) == ["--resume", str(tmp_path / name / "checkpoints" / "last.pt")]


def test_messages_say_what_is_there(one_epoch_run, tmp_path, data_dir, capsys) -> None:
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "m.json").write_text('{"a": 1}')
    argv = ["evaluate", "--checkpoint", str(one_epoch_run / "generator.pt"), "--data-dir", str(data_dir), "--num", "64"]
    assert gan_mnist.main([*argv, "--judge", str(tmp_path / "a_dir")]).exit_code == 1
    assert "is a folder, not a file" in one_line_error(capsys.readouterr().err)
    assert gan_mnist.main(["generate", "--checkpoint", os.devnull, "--out", "x.png"]).exit_code == 1
    assert "is not a regular file" in one_line_error(capsys.readouterr().err)  # a device is not called a folder
    assert gan_mnist.main(["generate", "--checkpoint", str(tmp_path / "m.json"), "--out", "x.png"]).exit_code == 1
    line = one_line_error(capsys.readouterr().err)
    assert "not a PyTorch file" in line and "could run code" not in line
    assert gan_mnist.main(["interpolate", "--checkpoint", str(one_epoch_run / "generator.pt"), "--paths", "1",
                           "--out", str(tmp_path / "w.png"), "--frames", "3"]).exit_code == 0  # fmt: skip
    assert "wrote 1 walk of 3 frames" in capsys.readouterr().out
    assert "finished 1 epoch." in (one_epoch_run / "summary.html").read_text()


def test_a_conditional_grid_says_when_it_rounds_the_number_up(train, tmp_path, capsys) -> None:
    assert train("c", "--epochs", "1", "--conditional").exit_code == 0
    capsys.readouterr()
    out = tmp_path / "g.png"
    assert gan_mnist.main(["generate", "--checkpoint", str(tmp_path / "c" / "generator.pt"), "--num", "11",
                           "--out", str(out)]).exit_code == 0  # fmt: skip
    assert "2 digits of each kind, 20 in all" in capsys.readouterr().out
    assert Image.open(out).size == (2 * 30 + 2, 10 * 30 + 2), "one row per digit, two columns"


# -- issue 20: what the newest code does, pinned ------------------------------------------------------------


def test_a_run_evaluates_every_nth_epoch_and_after_the_last(train, tmp_path, monkeypatch) -> None:
    seen: list[int] = []
    monkeypatch.setattr(gan_mnist, "evaluate_epoch", lambda run, epoch: seen.append(epoch))
    assert train("run", "--epochs", "7", "--eval-every", "3", "--subset", "64").exit_code == 0
    assert seen == [3, 6, 7]
    seen.clear()
    assert train("end", "--epochs", "4", "--eval-every", "0", "--subset", "64").exit_code == 0
    assert seen == [4]
    assert [e for e in range(1, 21) if gan_mnist.evaluates(gan_mnist.Config(epochs=20), e)] == [10, 20]


def test_a_run_that_trains_the_judge_on_its_way_trains_the_same_weights(train, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    flags = ["--epochs", "2", "--eval-every", "1", "--eval-num", "64", "--subset", "128"]
    assert train("first", *flags).exit_code == 0  # trains the judge in epoch 1's evaluation
    assert list((tmp_path / "empty-cache" / "gan_mnist").glob("judge-*.pt")), "the judge was trained on the way"
    assert train("cached", *flags).exit_code == 0
    a, b = (load(tmp_path / name / "checkpoints" / "last.pt") for name in ("first", "cached"))
    for key in ("generator", "discriminator", "ema"):
        assert gan_mnist.weights_sha256(a[key]) == gan_mnist.weights_sha256(b[key]), key


def test_a_generator_that_does_not_copy_reads_about_one_percent_near_copies(data_dir) -> None:
    evaluator = gan_mnist.Evaluator(data_dir, "", num=256, quiet=True)
    unseen = gan_mnist.to_model_range(evaluator.test_images)  # the digits the threshold is measured on
    share = gan_mnist.memorisation(evaluator, unseen)["near_copy_share"]
    assert share == pytest.approx(0.01, abs=0.005)


def test_the_summary_page_escapes_every_value(train, tmp_path) -> None:
    tricky = "a<b&c>"
    assert train(tricky, "--epochs", "1", "--judge", str(tmp_path / f"{tricky}.pt")).exit_code == 0
    page = (tmp_path / tricky / "summary.html").read_text()
    assert tricky not in page, "a raw '<' or '&' would be markup"
    assert page.count("a&lt;b&amp;c&gt;") >= 4  # title, heading, the config's out_dir and judge, the commands


@pytest.mark.parametrize("part", ["torch", "cuda", "data"])
def test_a_checkpoint_missing_a_part_of_its_random_state_is_one_line(one_epoch_run, part, capsys) -> None:
    last = one_epoch_run / "checkpoints" / "last.pt"
    saved = load(last)
    del saved["rng"][part]
    torch.save(saved, last)
    for argv in (["--resume", str(last), "--epochs", "2"], ["generate", "--checkpoint", str(last), "--out", "x.png"]):
        assert gan_mnist.main(argv).exit_code == 1
        assert f"its random-number state {part!r} is missing" in one_line_error(capsys.readouterr().err)


def test_a_users_file_that_merely_starts_like_one_of_ours_stays(one_epoch_run) -> None:
    ckpts, samples = one_epoch_run / "checkpoints", one_epoch_run / "samples"
    users = [ckpts / "epoch_0001.pt.bak", ckpts / "epoch_0000.pt~", samples / "epoch_0009.png.orig"]
    users += [ckpts / ".last.pt.tmp12.keep", samples / ".epoch_0009.png.tmp3x", one_epoch_run / ".config.json.tmp1-me"]
    for path in users:
        path.write_bytes(b"mine")
    last = ckpts / "last.pt"
    assert gan_mnist.main(["--resume", str(last), "--epochs", "3", "--quiet", "--keep-checkpoints", "1",
                           "--checkpoint-every", "1"]).exit_code == 0  # fmt: skip
    assert all(p.read_bytes() == b"mine" for p in users)
    assert [n for n, _ in gan_mnist.own_files(samples, "epoch_", ".png")] == [1, 2, 3]


def test_the_real_data_floor_uses_as_many_digits_as_an_evaluation(data_dir, monkeypatch) -> None:
    sizes, real = [], gan_mnist.sample_metrics  # 96 digits: no other test caches a floor of that size
    monkeypatch.setattr(gan_mnist, "sample_metrics", lambda f, p, r: sizes.append(len(f)) or real(f, p, r))
    gan_mnist.Evaluator(data_dir, "", num=96, quiet=True)
    assert sizes == [96]


def test_evaluate_on_a_conditional_generator_reports_each_digit(tmp_path, data_dir) -> None:
    constant_generator(tmp_path / "g.pt", conditional=True)
    argv = ["evaluate", "--checkpoint", str(tmp_path / "g.pt"), "--num", "50", "--data-dir", str(data_dir)]
    accuracy = gan_mnist.main(argv).metrics["digit_accuracy"]
    assert len(accuracy) == 10 and sorted(accuracy)[-2:] == [0.0, 1.0], "one image for all: read as one digit, once"


@pytest.mark.parametrize("num, columns", [(10, 1), (13, 2), (30, 3)])
def test_generate_all_digits_draws_one_row_per_digit(tmp_path, num, columns) -> None:
    constant_generator(tmp_path / "g.pt", conditional=True)
    out = tmp_path / "all.png"
    argv = ["generate", "--checkpoint", str(tmp_path / "g.pt"), "--digit", "all", "--num", str(num), "--out", str(out)]
    assert gan_mnist.main(argv).exit_code == 0
    assert Image.open(out).size == (columns * 30 + 2, 10 * 30 + 2)


def test_the_ema_decay_warms_up_then_stays_at_ema_decay(data_dir) -> None:
    nets = gan_mnist.build_nets(gan_mnist.Config(precision="fp32", ema_decay=0.99), torch.device("cpu"))
    real = gan_mnist.to_model_range(gan_mnist.load_mnist(data_dir)[0][:8])
    nets.ema_updates.fill_(10_000)  # far past the warm-up, where (1+t)/(10+t) would be 0.9991
    before = [p.clone() for p in nets.ema.parameters()]
    gan_mnist.train_step(nets, real, None)
    for ema, old, g in zip(nets.ema.parameters(), before, nets.G.parameters()):
        torch.testing.assert_close(ema, 0.99 * old + 0.01 * g, rtol=1e-5, atol=1e-7)
