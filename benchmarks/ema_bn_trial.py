#!/usr/bin/env python3
"""Does the EMA generator's batch norm hold the DCGAN back? Scores each periodic checkpoint of a run twice with the
project's judge on the same 10,000 samples: the EMA generator as gan_mnist samples it (G's running statistics,
copied at every EMA update) and the same EMA weights with statistics re-estimated for them (a cumulative average
over fresh batches in train mode, as SWA's update_bn does). Prints one JSON line.

    python benchmarks/ema_bn_trial.py --data-dir ../shared/data --run outputs/exp/dcgan-s1 --epochs 25,30,35,40
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


@torch.no_grad()
def recalibrated(G: gan_mnist.Generator, batches: int, batch_size: int, seed: int) -> gan_mnist.Generator:
    """A copy of G whose batch-norm running statistics are re-estimated for its own weights."""
    G = copy.deepcopy(G)
    norms = [m for m in G.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over all the batches
    rng = torch.Generator().manual_seed(seed)
    G.train()
    for i in range(batches):
        z = torch.randn(batch_size, G.latent_dim, generator=rng)
        G(z, torch.arange(i, i + batch_size) % gan_mnist.NUM_CLASSES if G.num_classes else None)
    return G.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--run", type=Path, action="append", required=True, help="a run folder (repeatable)")
    p.add_argument("--epochs", default="", help="comma-separated checkpoint epochs (default: all)")
    p.add_argument("--num", type=int, default=10000)
    p.add_argument("--batches", type=int, default=200, help="batches of the training batch size to re-estimate")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    evaluator = gan_mnist.Evaluator(args.data_dir, None, args.num, quiet=True)
    wanted = {int(e) for e in args.epochs.split(",") if e}
    out: dict[str, dict[int, dict[str, float]]] = {}
    for run in args.run:
        config = json.loads((run / "config.json").read_text())
        logged = {int(float(r.split(",")[0])): r for r in (run / "metrics.csv").read_text().splitlines()[1:]}
        for epoch, path in gan_mnist.own_files(run / "checkpoints", "epoch_", ".pt"):
            if wanted and epoch not in wanted:
                continue
            G, _ = gan_mnist.load_generator(path, torch.device("cpu"))
            row = {}
            for name, gen in (("copied", G), ("recalibrated", recalibrated(G, args.batches, config["batch_size"], 0))):
                m = evaluator(gen, seed=config["seed"])  # the samples of the run's own evaluation
                row.update({f"{k}_{name}": round(m[k], 4) for k in METRICS})
            row["fid_logged"] = float(logged[epoch].split(",")[1]) if epoch in logged else None
            out.setdefault(run.name, {})[epoch] = row
            print(run.name, epoch, row, file=sys.stderr, flush=True)
    print(json.dumps({"num": args.num, "batches": args.batches, "runs": out}))


if __name__ == "__main__":
    main()
