"""evaluate: the judge network, the metrics' floors and ceilings, the command and training-time evaluation.
On the tiny subset the judge is a small one (trained in about a second); the full-MNIST judge is `slow`."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT, load
from test_trainer import one_line_error
from torch import nn

import gan_mnist

SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="module")
def evaluator(data_dir: Path) -> gan_mnist.Evaluator:
    return gan_mnist.Evaluator(data_dir, "", num=256, quiet=True)


def test_real_digits_score_near_the_floor_and_noise_far_from_it(evaluator, data_dir: Path) -> None:
    images, _ = gan_mnist.load_mnist(data_dir)
    real = evaluator.score(gan_mnist.to_model_range(images[256:512]))  # not the digits the floor used
    floor = evaluator.floor
    noise = evaluator.score(torch.rand(256, 1, 28, 28) * 2 - 1)

    assert real["fid"] < 2 * floor["fid"] + 1
    assert noise["fid"] > 10 * real["fid"]
    assert real["inception_score"] > 0.7 * floor["inception_score"] and real["inception_score"] <= 10
    assert noise["inception_score"] < 0.5 * real["inception_score"]
    assert real["modes_covered"] >= 9 and sum(real["class_histogram"]) == pytest.approx(1, abs=1e-3)
    assert real["precision"] > 0.5 and real["recall"] > 0.5
    assert noise["recall"] < 0.05  # (k-NN precision alone is fooled by outlying real digits: see README)


class OneDigit(nn.Module):
    """A collapsed generator: the same digit whatever the noise."""

    latent_dim, num_classes = 100, 0

    def __init__(self, digit: torch.Tensor) -> None:
        super().__init__()
        self.digit = nn.Parameter(digit, requires_grad=False)

    def forward(self, z: torch.Tensor, labels=None) -> torch.Tensor:
        return self.digit.expand(len(z), 1, 28, 28)


def test_a_collapsed_generator_covers_one_mode(evaluator, data_dir: Path) -> None:
    images, _ = gan_mnist.load_mnist(data_dir, train=False)
    metrics = evaluator(OneDigit(gan_mnist.to_model_range(images[:1])[0]))
    assert metrics["modes_covered"] == 1
    assert max(metrics["class_histogram"]) == 1.0
    assert metrics["kl_to_uniform"] == pytest.approx(math.log(10), abs=1e-6)
    assert metrics["recall"] < 0.05


@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "conditional"])
def test_training_evaluation_scores_the_digits_evaluate_draws(evaluator, conditional: bool) -> None:
    """A run's evaluation judges G's digits chunk by chunk as they are drawn; `evaluate` draws them all first
    (it also saves them). Both must score the same digits the same, across a chunk boundary (256 = 250 + 6)."""
    torch.manual_seed(0)
    G = gan_mnist.Generator(num_classes=10 if conditional else 0).train()
    streamed = evaluator(G, seed=5)
    images, labels = evaluator.sample(G, seed=5)
    assert G.training, "evaluation leaves G in training mode"
    whole = evaluator.score(images, labels)
    for key in ("fid", "inception_score", "class_histogram", "precision", "recall", "digit_accuracy"):
        assert streamed.get(key) == whole.get(key), key
    assert ("digit_accuracy" in streamed) == conditional
    assert evaluator(G, seed=6)["fid"] != streamed["fid"], "another seed, other digits"


def test_judge_is_cached_outside_the_data_folder(evaluator, data_dir: Path) -> None:
    images, _ = gan_mnist.load_mnist(data_dir)
    path = gan_mnist.default_judge_path(images)
    assert path.is_file() and Path(os.environ["XDG_CACHE_HOME"]) in path.parents
    assert not list(data_dir.rglob("*.pt")), "nothing is written into the data folder"
    assert gan_mnist.default_judge_path(images[:100]) != path, "another training set, another judge"


def test_judge_cache_is_reused_and_retrained_when_corrupt(data_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    images, _ = gan_mnist.load_mnist(data_dir)
    shared = gan_mnist.default_judge_path(images)
    gan_mnist.load_or_train_judge(shared, data_dir, quiet=True)  # the session's judge (trained once, if not yet)
    path = tmp_path / "judge.pt"
    shutil.copy(shared, path)
    judge, first = gan_mnist.load_or_train_judge(path, data_dir, quiet=True)
    _, again = gan_mnist.load_or_train_judge(path, data_dir, quiet=True)
    assert again == first, "a valid cache is loaded, not retrained"
    saved = load(path)
    assert saved["sha256"] == first["sha256"] == gan_mnist.weights_sha256(saved["state_dict"])

    saved["state_dict"]["classifier.bias"] += 1.0  # tampered weights, stale hash
    torch.save(saved, path)
    capsys.readouterr()
    _, retrained = gan_mnist.load_or_train_judge(path, data_dir, quiet=True)
    assert "do not match their recorded hash" in capsys.readouterr().err
    assert retrained["sha256"] == first["sha256"], "retraining is seeded: the same judge again"

    path.write_bytes(path.read_bytes()[:1000])  # truncated
    trained: list[bool] = []  # the seeded retraining is checked above: here only that a truncated cache causes it
    monkeypatch.setattr(gan_mnist, "train_judge", lambda *a, **k: (trained.append(True), (judge, 0.95, 512))[1])
    _, retrained = gan_mnist.load_or_train_judge(path, data_dir, quiet=True)
    assert "retraining the judge" in capsys.readouterr().err and trained and retrained["sha256"] == first["sha256"]
    assert load(path)["sha256"] == first["sha256"], "the retrained judge replaces the truncated file"


def test_evaluate_command_prints_json_and_writes_metrics(train, data_dir: Path, tmp_path: Path, capsys) -> None:
    assert train("run", "--epochs", "1", "--eval-every", "0", "--eval-num", "64").exit_code == 0
    run_metrics = (tmp_path / "run" / "metrics.json").read_bytes()
    capsys.readouterr()
    ckpt = tmp_path / "run" / "generator.pt"
    args = ["evaluate", "--checkpoint", str(ckpt), "--num", "256", "--data-dir", str(data_dir)]
    result = gan_mnist.main(args)
    assert result.exit_code == 0
    out = capsys.readouterr().out.strip().splitlines()
    saved = json.loads((tmp_path / "run" / "generator.eval.json").read_text())
    # A short summary for people, the file named; the run's own training record is left alone.
    assert len(out) == 3 and f"FID {saved['fid']:.2f}" in out[0] and out[2].endswith("generator.eval.json")
    assert out[1].startswith("memorisation: ") and "memorisation" in saved
    assert (tmp_path / "run" / "metrics.json").read_bytes() == run_metrics
    assert json.loads(json.dumps(result.metrics)) == saved
    again = gan_mnist.main([*args, "--json"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads((tmp_path / "run" / "generator.eval.json").read_text())
    assert printed == json.loads(json.dumps(again.metrics))
    for key in (
        "fid",
        "inception_score",
        "modes_covered",
        "class_histogram",
        "kl_to_uniform",
        "precision",
        "recall",
        "real_floor",
        "judge",
        "epoch",
        "weights",
    ):
        assert key in saved, key
    assert saved["weights"] == "ema" and saved["epoch"] == 1 and saved["num_samples"] == 256
    assert 1 <= saved["inception_score"] <= 10 and saved["fid"] > saved["real_floor"]["fid"]

    raw = gan_mnist.main(
        [
            "evaluate",
            "--checkpoint",
            str(tmp_path / "run/checkpoints/last.pt"),
            "--raw",
            "--num",
            "256",
            "--data-dir",
            str(data_dir),
        ]
    )
    assert raw.metrics["weights"] == "raw" and raw.metrics["fid"] != saved["fid"]


@pytest.mark.parametrize("num", ["0", "-5", "3", "many"])
def test_evaluate_with_too_few_samples_is_a_usage_error(tmp_path: Path, num: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        gan_mnist.main(["evaluate", "--checkpoint", str(tmp_path / "g.pt"), "--num", num])
    assert exit_info.value.code == 2 and "usage:" in capsys.readouterr().err


def test_evaluate_on_a_corrupt_checkpoint_is_a_clear_error(tmp_path: Path, data_dir: Path, capsys) -> None:
    bad = tmp_path / "generator.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    assert gan_mnist.main(["evaluate", "--checkpoint", str(bad), "--data-dir", str(data_dir)]).exit_code == 1
    assert "cannot read checkpoint" in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "metrics.json").exists()


def test_eval_every_writes_metrics_csv_and_plot(train, tmp_path: Path) -> None:
    result = train("run", "--epochs", "2", "--eval-every", "1", "--eval-num", "256")
    assert result.exit_code == 0
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").read_text().splitlines()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(float(r["fid"]) > 0 and 1 <= float(r["inception_score"]) <= 10 for r in rows)
    assert (tmp_path / "run" / "metrics.png").stat().st_size > 1000
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["epoch"] == 2
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    assert gan_mnist.main(["--resume", str(last), "--epochs", "3", "--threads", "1", "--quiet"]).exit_code == 0
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").read_text().splitlines()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"], "the metrics history carries on after a resume"


def test_ema_weights_are_what_samples_and_generator_use(train, tmp_path: Path) -> None:
    assert train("ema", "--epochs", "1").exit_code == 0
    assert train("plain", "--epochs", "1", "--ema-decay", "0").exit_code == 0
    ema_ckpt, ema_gen = load(tmp_path / "ema/checkpoints/last.pt"), load(tmp_path / "ema/generator.pt")
    assert ema_gen["ema"] and all(torch.equal(ema_ckpt["ema"][k], v) for k, v in ema_gen["state_dict"].items())
    assert not all(torch.equal(ema_ckpt["generator"][k], v) for k, v in ema_gen["state_dict"].items())
    plain_ckpt, plain_gen = load(tmp_path / "plain/checkpoints/last.pt"), load(tmp_path / "plain/generator.pt")
    assert plain_ckpt["ema"] is None and not plain_gen["ema"]
    assert all(torch.equal(plain_ckpt["generator"][k], v) for k, v in plain_gen["state_dict"].items())
    # the raw G trains identically with or without the EMA beside it
    assert all(torch.equal(plain_ckpt["generator"][k], v) for k, v in ema_ckpt["generator"].items())


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "MNIST" / "raw").is_dir(), reason="needs the full MNIST in ../shared/data")
def test_full_mnist_judge_reaches_99_percent_and_separates_noise(tmp_path: Path) -> None:
    evaluator = gan_mnist.Evaluator(SHARED, tmp_path / "judge.pt", num=10000, quiet=True)
    assert evaluator.judge_info["test_accuracy"] >= 0.99 and evaluator.judge_info["train_images"] == 60000
    floor = evaluator.floor
    assert floor["fid"] < 5 and floor["inception_score"] > 9.5 and floor["modes_covered"] == 10
    noise = evaluator.score(torch.rand(10000, 1, 28, 28) * 2 - 1)
    assert noise["fid"] > 100 * floor["fid"] and noise["inception_score"] < 1.5 and noise["recall"] < 0.01
    assert noise["precision"] < 0.5 * floor["precision"]


def test_best_generator_tracks_the_lowest_fid_and_survives_resume(train, tmp_path: Path, monkeypatch, capsys) -> None:
    fids = iter([50.0, 30.0, 40.0, 35.0, 20.0])  # scripted scores for epochs 1..5
    real_call = gan_mnist.Evaluator.__call__
    monkeypatch.setattr(
        gan_mnist.Evaluator, "__call__", lambda self, G, seed=0: {**real_call(self, G, seed), "fid": next(fids)}
    )
    run = tmp_path / "run"
    assert (
        train("run", "--epochs", "3", "--eval-every", "1", "--eval-num", "64", "--checkpoint-every", "1").exit_code == 0
    )
    best = load(run / "generator_best.pt")
    assert (best["epoch"], best["fid"]) == (2, 30.0)
    epoch2 = load(run / "checkpoints" / "epoch_0002.pt")
    assert all(torch.equal(epoch2["ema"][k], v) for k, v in best["state_dict"].items()), "the EMA G of epoch 2"
    assert load(run / "checkpoints" / "last.pt")["best"] == {"epoch": 2, "fid": 30.0}
    assert f"best: epoch 2 (FID 30.00) -> {run / 'generator_best.pt'}" in capsys.readouterr().out

    last = str(run / "checkpoints" / "last.pt")
    assert gan_mnist.main(["--resume", last, "--epochs", "4", "--quiet"]).exit_code == 0
    assert load(run / "generator_best.pt")["epoch"] == 2, "35 at epoch 4 does not beat the carried-on 30"
    assert gan_mnist.main(["--resume", last, "--epochs", "5", "--quiet"]).exit_code == 0
    assert (load(run / "generator_best.pt")["epoch"], load(run / "generator_best.pt")["fid"]) == (5, 20.0)
    # generate and evaluate take it like any generator.pt
    assert (
        gan_mnist.main(
            ["generate", "--checkpoint", str(run / "generator_best.pt"), "--out", str(tmp_path / "b.npy")]
        ).exit_code
        == 0
    )


def test_metrics_json_records_the_best_evaluation(train, tmp_path: Path) -> None:
    assert train("run", "--epochs", "2", "--eval-every", "1", "--eval-num", "64").exit_code == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").read_text().splitlines()))
    best_row = min(rows, key=lambda r: float(r["fid"]))
    assert metrics["best"]["epoch"] == int(best_row["epoch"])
    assert metrics["best"]["fid"] == pytest.approx(float(best_row["fid"]), rel=1e-5)
    assert load(tmp_path / "run" / "generator_best.pt")["epoch"] == int(best_row["epoch"])


def test_evaluating_never_changes_the_training(train, tmp_path: Path) -> None:
    """Evaluation at any schedule leaves the weights as a run that never evaluates."""
    assert train("off", "--epochs", "2").exit_code == 0
    assert train("every", "--epochs", "2", "--eval-every", "1", "--eval-num", "64").exit_code == 0
    assert train("half", "--epochs", "1", "--eval-every", "0", "--eval-num", "64").exit_code == 0
    last = str(tmp_path / "half" / "checkpoints" / "last.pt")
    assert gan_mnist.main(["--resume", last, "--epochs", "2", "--quiet"]).exit_code == 0
    prints = {
        name: gan_mnist.weights_sha256(load(tmp_path / name / "checkpoints" / "last.pt")["generator"])
        for name in ("off", "every", "half")
    }
    assert len(set(prints.values())) == 1, prints


def test_real_data_floor_is_cached_beside_the_judge(data_dir: Path, monkeypatch) -> None:
    first = gan_mnist.Evaluator(data_dir, "", num=128, quiet=True)
    calls = []
    real = gan_mnist.sample_metrics
    monkeypatch.setattr(gan_mnist, "sample_metrics", lambda *a: calls.append(1) or real(*a))
    second = gan_mnist.Evaluator(data_dir, "", num=128, quiet=True)
    assert calls == [] and second.floor == json.loads(json.dumps(first.floor))
    cache = gan_mnist.default_judge_path(first.train_images)
    floor_file = cache.with_name(f"{cache.stem}.floor-128.json")
    floor_file.write_text(json.dumps({"judge_sha256": "another judge", "floor": {"fid": -1}}))
    third = gan_mnist.Evaluator(data_dir, "", num=128, quiet=True)
    assert calls == [1] and third.floor["fid"] == pytest.approx(first.floor["fid"]), "a stale cache is recomputed"
