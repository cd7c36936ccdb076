#!/usr/bin/env python3
"""What each design choice of --conditional buys: trains variants for the same epochs and seed on the full
training set and prints, per variant, one JSON line with the judge's per-digit accuracy and FID.

    python benchmarks/conditional_ablation.py --data-dir ../shared/data --epochs 10 --judge judge.pt

Variants (G's label input / how D sees the label):
  concat         10-d embedding joined to z / 10-d embedding joined to the image (the plain version)
  projection     10-d embedding joined to z / projection term <embed(y), features(x)> (Miyato & Koyama
                 2018): what gan_mnist --conditional trains
  projection-50  50-d embedding joined to z / projection term
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gan_mnist  # noqa: E402


class ConcatDiscriminator(gan_mnist.Discriminator):
    """The plain version: a 10-d label embedding joined to the flattened image, no projection."""

    def __init__(self, num_classes: int = 0) -> None:
        nn.Module.__init__(self)
        self.embed = nn.Embedding(num_classes, 10)
        self.features = nn.Sequential(*gan_mnist._mlp([784 + 10, 512, 256]), nn.LeakyReLU(0.2, inplace=True))
        self.head = nn.Linear(256, 1)
        self.label_projection = None

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.head(self.features(torch.cat([x.flatten(1), self.embed(labels)], dim=1))).squeeze(1)


VARIANTS = {
    "concat": (10, ConcatDiscriminator),
    "projection": (10, gan_mnist.Discriminator),
    "projection-50": (50, gan_mnist.Discriminator),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="./data")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--judge", default="")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    shipped = (gan_mnist.LABEL_DIM, gan_mnist.Discriminator)
    for name in args.variants:
        gan_mnist.LABEL_DIM, gan_mnist.Discriminator = VARIANTS[name]
        with tempfile.TemporaryDirectory() as tmp:
            result = gan_mnist.main(
                [
                    "--conditional",
                    "--data-dir",
                    args.data_dir,
                    "--epochs",
                    str(args.epochs),
                    "--eval-every",
                    str(args.epochs),
                    "--judge",
                    args.judge,
                    "--out-dir",
                    f"{tmp}/run",
                    "--threads",
                    str(args.threads),
                    "--quiet",
                ]
            )
            metrics = json.loads((Path(tmp) / "run" / "metrics.json").read_text())
        gan_mnist.LABEL_DIM, gan_mnist.Discriminator = shipped
        if result.exit_code:
            raise SystemExit(f"variant {name} failed")
        accuracy = [round(a, 3) for a in metrics["digit_accuracy"]]
        print(
            json.dumps(
                {
                    "variant": name,
                    "epochs": args.epochs,
                    "digit_accuracy": accuracy,
                    "min": min(accuracy),
                    "fid": round(metrics["fid"], 2),
                    "recall": round(metrics["recall"], 3),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
