"""Shared fixtures: a copy of the tiny real-MNIST subset (512 training and 256 test digits, sliced from the
genuine files, in torchvision's layout) and a helper that trains through main() in-process."""

from __future__ import annotations

import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gan_mnist  # noqa: E402

TEST_DATA = Path(__file__).resolve().parent / "data"

# Small, fast and deterministic: 8 steps of 64 per epoch, one thread, no judge network.
FAST = ["--batch-size", "64", "--threads", "1", "--eval-every", "-1", "--no-tensorboard", "--quiet"]


@pytest.fixture(scope="session", autouse=True)
def ctrl_c_reaches_the_tests():
    """A suite started in the background (`pytest &`, nohup, xargs) inherits an ignored SIGINT, and gan_mnist keeps
    a signal that was ignored at the start ignored: the Ctrl-C tests would then fail. Ctrl-C acts as at a prompt."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="session", autouse=True)
def judge_cache(tmp_path_factory: pytest.TempPathFactory):
    """The judge network's cache goes to a temporary folder, never the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide copy of tests/data: tests that damage data work on copies of their own."""
    target = tmp_path_factory.mktemp("mnist") / "data"
    shutil.copytree(TEST_DATA, target)
    return target


@pytest.fixture()
def train(data_dir: Path, tmp_path: Path):
    """train(out_name, *flags) -> Result: trains in-process on the tiny subset into tmp_path/out_name."""

    def run(out: str, *flags: str) -> gan_mnist.Result:
        return gan_mnist.main(["--data-dir", str(data_dir), "--out-dir", str(tmp_path / out), *FAST, *flags])

    return run


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def _one_epoch_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("template") / "run"
    assert gan_mnist.main(["--data-dir", str(data_dir), "--out-dir", str(out), *FAST, "--epochs", "1"]).exit_code == 0
    return out


@pytest.fixture()
def one_epoch_run(_one_epoch_run: Path, tmp_path: Path) -> Path:
    """tmp_path/run: a copy of a finished 1-epoch run (trained once per session), the test's own to damage."""
    return Path(shutil.copytree(_one_epoch_run, tmp_path / "run"))
