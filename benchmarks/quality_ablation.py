#!/usr/bin/env python3
"""Which stabilisers make the default run end at its best: trains recipe variants on the full training set
(one run per variant per seed, each a plain `gan_mnist.py` run evaluated every 10 epochs by the project's
judge on 10,000 samples) and prints FID / IS / KL to uniform / recall at the report epochs.

    python benchmarks/quality_ablation.py --data-dir ../shared/data --variants tutorial,stable --seeds 1,2
    python benchmarks/quality_ablation.py --data-dir ../shared/data --epochs 30 --variants r1,dropout,...

Runs land in --root/<variant>-s<seed>/ and are reused: a finished run is only read, an unfinished one is
resumed, so the table can be built up over several sessions. Two runs at a time (--jobs 2, --threads 1 each)
is what a 2-core machine affords. Prints a Markdown table on stderr and one JSON line on stdout.

Variants with a schedule over the run (lr-decay, instance-noise) depend on --epochs: compare them at the
same --epochs.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TUTORIAL = ["--recipe", "tutorial"]
VARIANTS: dict[str, list[str]] = {
    "tutorial": TUTORIAL,  # the blog post's recipe
    "stable": [],  # the shipped default
    "r1": [*TUTORIAL, "--r1-gamma", "1", "--r1-every", "1"],
    "r1-lazy": [*TUTORIAL, "--r1-gamma", "1", "--r1-every", "8"],
    "lr-decay": [*TUTORIAL, "--lr-decay", "linear"],
    "dropout": [*TUTORIAL, "--d-dropout", "0.3"],
    "spectral-norm": [*TUTORIAL, "--spectral-norm"],
    "label-smoothing": [*TUTORIAL, "--label-smoothing", "0.1"],
    "instance-noise": [*TUTORIAL, "--instance-noise", "0.1"],
    "ttur": [*TUTORIAL, "--lr", "1e-4", "--d-lr", "4e-4"],
    "top-k": [*TUTORIAL, "--top-k", "0.5"],
    "r1-lazy+lr-decay": [*TUTORIAL, "--r1-gamma", "1", "--r1-every", "8", "--lr-decay", "linear"],
    "r1-lazy+dropout": [*TUTORIAL, "--r1-gamma", "1", "--r1-every", "8", "--d-dropout", "0.3"],
    "r1-lazy-gamma0.3": [*TUTORIAL, "--r1-gamma", "0.3", "--r1-every", "8"],
    "r1-lazy-gamma3": [*TUTORIAL, "--r1-gamma", "3", "--r1-every", "8"],
}
COLUMNS = (("fid", "FID"), ("inception_score", "IS"), ("kl_to_uniform", "KL"), ("recall", "recall"))


def metrics_rows(run: Path) -> dict[int, dict[str, float]]:
    path = run / "metrics.csv"
    if not path.is_file():
        return {}
    with open(path) as f:
        return {int(row["epoch"]): {k: float(v) for k, v in row.items()} for row in csv.DictReader(f)}


def train(variant: str, seed: int, args: argparse.Namespace) -> Path:
    run = args.root / f"{variant}-s{seed}"
    rows = metrics_rows(run)
    if rows and max(rows) >= args.epochs:
        return run
    last = run / "checkpoints" / "last.pt"
    command = [sys.executable, str(ROOT / "gan_mnist.py"), "--epochs", str(args.epochs), "--threads", str(args.threads)]
    if last.is_file():  # a resume keeps the run's own recipe, seed and schedule
        command += ["--resume", str(last), "--quiet"]
    else:
        command += ["--out-dir", str(run), "--seed", str(seed), "--data-dir", str(args.data_dir), *VARIANTS[variant]]
        command += ["--eval-every", "10", "--checkpoint-every", "10", "--keep-checkpoints", "0", "--quiet"]
    args.root.mkdir(parents=True, exist_ok=True)
    with open(args.root / f"{variant}-s{seed}.log", "a") as log:
        print("+", " ".join(command), file=log, flush=True)
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=ROOT / "data")
    p.add_argument("--root", type=Path, default=ROOT / "outputs" / "ablation")
    p.add_argument("--variants", default="tutorial,stable", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="1", help="comma-separated seeds (default: 1)")
    p.add_argument("--epochs", type=int, default=200, help="train each run to this epoch (default: 200)")
    p.add_argument("--report", default="30,100,200", help="epochs to tabulate (default: 30,100,200)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default: 1; 2 on 2 cores with --threads 1)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run (default: 1)")
    p.add_argument("--table-only", action="store_true", help="train nothing; tabulate the runs already in --root")
    args = p.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    report = [int(e) for e in args.report.split(",")]
    jobs = [(v, s) for v in variants for s in seeds]
    if not args.table_only:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(lambda job: train(*job, args), jobs))

    results: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    lines = [
        "| variant | seed | "
        + " | ".join(f"{label} @{e}" for e in report for _, label in COLUMNS)
        + " | best FID (epoch) |"
    ]
    lines.append("|---" * (3 + len(report) * len(COLUMNS)) + "|")
    for variant, seed in jobs:
        rows = metrics_rows(args.root / f"{variant}-s{seed}")
        if not rows:
            continue  # not trained (yet)
        results.setdefault(variant, {})[str(seed)] = {str(e): rows[e] for e in report if e in rows}
        cells = [f"{rows[e][key]:.3g}" if e in rows else "" for e in report for key, _ in COLUMNS]
        best = min(rows.values(), key=lambda r: r["fid"]) if rows else None
        best_cell = f"{best['fid']:.3g} ({int(best['epoch'])})" if best else ""
        lines.append(f"| {variant} | {seed} | " + " | ".join(cells) + f" | {best_cell} |")
    print("\n".join(lines), file=sys.stderr)
    print(json.dumps({"report_epochs": report, "results": results}))


if __name__ == "__main__":
    main()
