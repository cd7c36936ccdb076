#!/usr/bin/env python3
"""Why an unconditional generator's IS stays below the real digits': how sure the judge is of each digit.

    python benchmarks/sample_entropy.py outputs/exp/dcgan-s1/generator.pt --data-dir ../shared/data \
        --psi 1,0.9,0.8,0.7 --grid ambiguous.png

IS = exp(H(mean p(y|x)) - mean H(p(y|x))): with all ten digits equally often (the first term near log 10), what
lowers it is the judge's entropy H(p(y|x)) on single digits. For each generator (a generator.pt or a checkpoint,
its EMA) and each psi (z scaled by psi towards 0, the truncation trick in z), 10,000 digits from one noise seed
are judged as gan_mnist's evaluation judges them; the same for 10,000 real training digits. Prints one JSON line:
FID, IS, precision, recall, the mean entropy, and the share of digits the judge is unsure of (entropy > 0.5 nats,
about a 15 % second guess). --grid draws the 64 least certain digits of the first generator at psi 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gan_mnist  # noqa: E402

UNSURE = 0.5  # nats


def entropy(probs: np.ndarray) -> np.ndarray:
    return -(probs * np.log(probs + 1e-12)).sum(1)


def scores(evaluator: gan_mnist.Evaluator, images: torch.Tensor) -> tuple[dict, np.ndarray]:
    feats, probs = gan_mnist.judge_outputs(evaluator.judge, images)
    m = gan_mnist.sample_metrics(feats, probs, evaluator.test_feats)
    h = entropy(probs)
    keys = ("fid", "inception_score", "precision", "recall", "kl_to_uniform")
    row = {k: round(m[k], 4) for k in keys} | {"mean_entropy": round(float(h.mean()), 4),
                                                "unsure_share": round(float((h > UNSURE).mean()), 4)}  # fmt: skip
    return row, h


class Truncated(torch.nn.Module):
    """G with its noise scaled by psi, for the Evaluator's own sampler (the evaluation's noise and labels)."""

    def __init__(self, G: gan_mnist.Generator, psi: float) -> None:
        super().__init__()
        self.G, self.psi, self.latent_dim, self.num_classes = G, psi, G.latent_dim, G.num_classes

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.G(z * self.psi, labels)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("generators", nargs="+", help="generator.pt files or checkpoints (their EMA)")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--num", type=int, default=10000)
    p.add_argument("--psi", default="1", help="comma-separated scales of z (1 = the generator as trained)")
    p.add_argument("--grid", type=Path, help="PNG of the first generator's 64 least certain digits at psi 1")
    args = p.parse_args()
    torch.set_num_threads(1)
    evaluator = gan_mnist.Evaluator(args.data_dir, None, args.num, quiet=True)
    result = {"num": args.num, "real": scores(evaluator, evaluator.train_images[: args.num].cpu())[0], "runs": {}}
    for i, path in enumerate(args.generators):
        G, _ = gan_mnist.load_generator(path, torch.device("cpu"))
        result["runs"][path] = {}
        for psi in (float(x) for x in args.psi.split(",")):
            images = evaluator.sample(Truncated(G, psi))[0]
            result["runs"][path][str(psi)], h = scores(evaluator, images)
            if args.grid and i == 0 and psi == 1:
                gan_mnist.save_png(args.grid, gan_mnist.grid_image(images[np.argsort(-h)[:64].copy()], 8, 3))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
