"""Watching and exploring a run: TensorBoard event files read back with TensorBoard's own reader, latent walks,
the memorisation check against a brute-force answer, the run summary page, bigger pictures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import load
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
