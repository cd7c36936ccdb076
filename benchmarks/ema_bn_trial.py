#!/usr/bin/env python3
"""Does the EMA generator's batch norm hold the DCGAN back? Scores each periodic checkpoint of a run with the
project's judge on the same 10,000 samples (those of the run's own evaluation), three ways: the EMA weights with
G's running statistics copied in (what gan_mnist did before it re-estimated them), with statistics re-estimated
for them as gan_mnist now does (`fit_batch_norm`: a cumulative average over 16 fresh batches of 256 in train
mode, as SWA's update_bn does), and re-estimated as the first trial did (200 batches of 64). Prints one JSON line.

    python benchmarks/ema_bn_trial.py --data-dir ../shared/data --run outputs/exp/dcgan-s1 --epochs 30,40,50
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gan_mnist  # noqa: E402

METRICS = ("fid", "inception_score", "precision", "recall", "kl_to_uniform")


def with_statistics(G: gan_mnist.Generator, source: dict[str, torch.Tensor]) -> gan_mnist.Generator:
    """A copy of G with the batch-norm buffers of `source` (a state dict), its weights kept."""
    G = copy.deepcopy(G)
    G.load_state_dict({k: source[k] if "running" in k or "num_batches" in k else v for k, v in G.state_dict().items()})
    return G.eval()


def refit(G: gan_mnist.Generator, batches: int, batch_size: int) -> gan_mnist.Generator:
    G = copy.deepcopy(G)
    gan_mnist.fit_batch_norm(G, batches, batch_size)
    return G.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--run", type=Path, action="append", required=True, help="a run folder (repeatable)")
    p.add_argument("--epochs", default="", help="comma-separated checkpoint epochs (default: all)")
    p.add_argument("--num", type=int, default=10000)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    evaluator = gan_mnist.Evaluator(args.data_dir, None, args.num, quiet=True)
    wanted = {int(e) for e in args.epochs.split(",") if e}
    out: dict[str, dict[int, dict[str, float]]] = {}
    for run in args.run:
        seed = json.loads((run / "config.json").read_text())["seed"]
        for epoch, path in gan_mnist.own_files(run / "checkpoints", "epoch_", ".pt"):
            if wanted and epoch not in wanted:
                continue
            G, _ = gan_mnist.load_generator(path, torch.device("cpu"))
            ckpt = gan_mnist.load_checkpoint(path, gan_mnist.CHECKPOINT_FORMAT)
            arms = {"copied": with_statistics(G, ckpt["generator"]), "refit": refit(G, 16, 256),
                    "refit_200x64": refit(G, 200, 64)}  # fmt: skip
            row = {}
            for name, gen in arms.items():
                m = evaluator(gen, seed=seed)
                row.update({f"{k}_{name}": round(m[k], 4) for k in METRICS})
            out.setdefault(run.name, {})[epoch] = row
            print(run.name, epoch, row, file=sys.stderr, flush=True)
    print(json.dumps({"num": args.num, "runs": out}))


if __name__ == "__main__":
    main()
