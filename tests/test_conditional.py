"""--conditional: one row per digit in the grids, generate --digit, its errors, resume, per-digit accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load
from PIL import Image
from test_trainer import one_line_error

import gan_mnist

GRID_10x10 = 10 * 28 + 11 * 2


@pytest.fixture()
def conditional_run(train, tmp_path: Path) -> Path:
    assert train("cond", "--epochs", "2", "--conditional").exit_code == 0
    return tmp_path / "cond"


def test_conditional_run_records_it_and_draws_one_row_per_digit(conditional_run: Path) -> None:
    with Image.open(conditional_run / "samples" / "epoch_0002.png") as png:
        assert png.size == (GRID_10x10, GRID_10x10)
    ckpt = load(conditional_run / "checkpoints" / "last.pt")
    assert ckpt["config"]["conditional"] is True
    assert torch.equal(ckpt["fixed_labels"], torch.arange(10).repeat_interleave(10)), "row k is digit k"
    gen = load(conditional_run / "generator.pt")
    assert gen["num_classes"] == 10


def test_generate_a_digit_and_all_digits(conditional_run: Path, tmp_path: Path) -> None:
    ckpt = str(conditional_run / "generator.pt")
    npy = tmp_path / "sevens.npy"
    assert (
        gan_mnist.main(["generate", "--checkpoint", ckpt, "--digit", "7", "--num", "12", "--out", str(npy)]).exit_code
        == 0
    )
    assert np.load(npy).shape == (12, 28, 28) and np.load(npy).dtype == np.uint8
    for flags in (["--digit", "all"], []):  # no --digit on a conditional model: one row per digit
        png = tmp_path / "grid.png"
        assert (
            gan_mnist.main(["generate", "--checkpoint", ckpt, "--num", "100", "--out", str(png), *flags]).exit_code == 0
        )
        with Image.open(png) as image:
            assert image.size == (GRID_10x10, GRID_10x10)


def test_generate_digit_errors(conditional_run: Path, train, tmp_path: Path, capsys) -> None:
    ckpt = str(conditional_run / "generator.pt")
    for digit in ("10", "-1", "seven"):
        assert (
            gan_mnist.main(
                ["generate", "--checkpoint", ckpt, "--digit", digit, "--out", str(tmp_path / "x.png")]
            ).exit_code
            == 1
        )
        assert "choose a digit 0-9" in one_line_error(capsys.readouterr().err)
    assert train("plain", "--epochs", "1").exit_code == 0
    plain = str(tmp_path / "plain" / "generator.pt")
    capsys.readouterr()
    assert (
        gan_mnist.main(["generate", "--checkpoint", plain, "--digit", "3", "--out", str(tmp_path / "x.png")]).exit_code
        == 1
    )
    assert "needs a conditional generator" in one_line_error(capsys.readouterr().err)


def test_conditional_resume_is_bit_identical(train, tmp_path: Path) -> None:
    assert train("straight", "--epochs", "2", "--conditional").exit_code == 0
    assert train("split", "--epochs", "1", "--conditional").exit_code == 0
    last = tmp_path / "split" / "checkpoints" / "last.pt"
    assert gan_mnist.main(["--resume", str(last), "--epochs", "2", "--threads", "1", "--quiet"]).exit_code == 0
    a, b = load(tmp_path / "straight/checkpoints/last.pt"), load(last)
    for key in ("generator", "discriminator", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name}"


@pytest.mark.slow  # per-digit accuracy is counted in the test below, and read as asked in test_contracts
def test_evaluate_reports_per_digit_accuracy(conditional_run: Path, data_dir: Path) -> None:
    result = gan_mnist.main(
        ["evaluate", "--checkpoint", str(conditional_run / "generator.pt"), "--num", "200", "--data-dir", str(data_dir)]
    )
    accuracy = result.metrics["digit_accuracy"]
    assert len(accuracy) == 10 and all(0 <= a <= 1 for a in accuracy)


class AlwaysThisDigit(torch.nn.Module):
    """A 'conditional generator' that ignores the label and draws one fixed real digit."""

    latent_dim, num_classes = 100, 10

    def __init__(self, digit: torch.Tensor) -> None:
        super().__init__()
        self.digit = torch.nn.Parameter(digit, requires_grad=False)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.digit.expand(len(z), 1, 28, 28)


@pytest.mark.slow  # test_round3's conditional evaluate test counts one digit read for all in the default run
def test_per_digit_accuracy_counts_what_the_judge_reads(data_dir: Path) -> None:
    evaluator = gan_mnist.Evaluator(data_dir, "", num=200, quiet=True)
    images, labels = gan_mnist.load_mnist(data_dir, train=False)
    x = gan_mnist.to_model_range(images)
    read_as = int(evaluator.judge(x[:1]).argmax())  # what the judge calls this one digit
    accuracy = evaluator(AlwaysThisDigit(x[0]))["digit_accuracy"]
    assert accuracy[read_as] == 1.0 and sum(accuracy) == 1.0


def test_generate_draws_exactly_the_digit_asked(conditional_run: Path, tmp_path: Path) -> None:
    """generate --digit K is G(z, K) for the seeded noise: not another label, not another noise."""
    G, _ = gan_mnist.load_generator(conditional_run / "generator.pt", torch.device("cpu"))
    argv = ["generate", "--checkpoint", str(conditional_run / "generator.pt"), "--seed", "5"]
    for digit in (3, 7):
        out = tmp_path / f"d{digit}.npy"
        assert gan_mnist.main([*argv, "--digit", str(digit), "--num", "4", "--out", str(out)]).exit_code == 0
        torch.manual_seed(5)
        with torch.no_grad():
            expected = gan_mnist.to_uint8(G(torch.randn(4, 100), torch.full((4,), digit))).squeeze(1).numpy()
        assert np.array_equal(np.load(out), expected)
    out = tmp_path / "all.npy"
    assert gan_mnist.main([*argv, "--digit", "all", "--num", "20", "--out", str(out)]).exit_code == 0
    torch.manual_seed(5)
    with torch.no_grad():
        expected = gan_mnist.to_uint8(G(torch.randn(20, 100), torch.arange(10).repeat_interleave(2))).squeeze(1)
    assert np.array_equal(np.load(out), expected.numpy()), "two of each digit, in order"
