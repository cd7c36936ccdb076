#!/usr/bin/env python3
"""Which stabilisers make the default run end at its best: trains recipe variants on the full training set
(one run per variant per seed, each a plain `gan_mnist.py` run evaluated every 10 epochs by the project's
judge on 10,000 samples) and prints FID / IS / KL to uniform / recall at the report epochs.

    python benchmarks/quality_ablation.py --data-dir ../shared/data --variants tutorial,stable --seeds 1,2
    python benchmarks/quality_ablation.py --data-dir ../shared/data --epochs 30 --variants r1,spectral-norm,...
    python benchmarks/quality_ablation.py --epochs 50 --eval-every 5 --variants dcgan,wgan-gp,dcgan-wgan-gp \
        --seeds 1,2 --report 10,20,30,50 --plot docs/which_gan_fid.png        # README, 'Which GAN?'

Runs land in --root/<variant>-s<seed>/ and are reused: a finished run is only read, an unfinished one is
resumed, so the table can be built up over several sessions. Two runs at a time (--jobs 2, --threads 1 each)
is what a 2-core machine affords. Prints a Markdown table on stderr and one JSON line on stdout.

Variants with a schedule over the run (lr-decay) depend on --epochs: compare them at the same --epochs. Each
run's summary also gives its training seconds per epoch (the median, from losses.csv: evaluation excluded),
the training minutes until FID first fell to 5 and to 3 (the first evaluated epoch there, times the median),
its best FID, and its last FID over its best (late decay).
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
PLAIN_DCGAN = ["--arch", "dcgan", "--clusters", "0"]
VARIANTS: dict[str, list[str]] = {
    "tutorial": TUTORIAL,  # the blog post's recipe
    "stable": [],  # the shipped default
    "r1": [*TUTORIAL, "--r1-gamma", "1", "--r1-every", "1"],
    "r1-lazy": [*TUTORIAL, "--r1-gamma", "1", "--r1-every", "8"],
    "lr-decay": [*TUTORIAL, "--lr-decay", "linear"],
    "spectral-norm": [*TUTORIAL, "--spectral-norm"],
    "ttur": [*TUTORIAL, "--lr", "1e-4", "--d-lr", "4e-4"],
    "r1-lazy+lr-decay": [*TUTORIAL, "--r1-gamma", "1", "--r1-every", "8", "--lr-decay", "linear"],
    "r1-lazy-gamma0.3": [*TUTORIAL, "--r1-gamma", "0.3", "--r1-every", "8"],
    "r1-lazy-gamma3": [*TUTORIAL, "--r1-gamma", "3", "--r1-every", "8"],
    # the GANs the tutorial names next (README, 'Which GAN?'): each preset by its flags
    "dcgan": ["--arch", "dcgan"],  # its preset: self-conditioned on 40 clusters, R1 gamma 1
    "dcgan-plain": PLAIN_DCGAN,  # without clusters: R1 gamma 8, the trials below (measured before --clusters)
    "dcgan-r1": [*PLAIN_DCGAN, "--r1-gamma", "1"],
    "dcgan-r1-gamma0.1": [*PLAIN_DCGAN, "--r1-gamma", "0.1"],
    "dcgan-r1-gamma2": [*PLAIN_DCGAN, "--r1-gamma", "2"],
    "dcgan-r1-gamma4": [*PLAIN_DCGAN, "--r1-gamma", "4"],
    "dcgan-r1-gamma8": [*PLAIN_DCGAN, "--r1-gamma", "8"],
    "dcgan-r1-gamma16": [*PLAIN_DCGAN, "--r1-gamma", "16"],
    "dcgan-r1-gamma5": [*PLAIN_DCGAN, "--r1-gamma", "5"],
    "dcgan-no-r1": [*PLAIN_DCGAN, "--r1-gamma", "0"],
    "dcgan-fp32": [*PLAIN_DCGAN, "--r1-gamma", "1", "--precision", "fp32"],
    "dcgan-ttur": [*PLAIN_DCGAN, "--r1-gamma", "1", "--d-lr", "4e-4"],
    "dcgan-lr-decay": [*PLAIN_DCGAN, "--r1-gamma", "1", "--lr-decay", "linear"],
    "dcgan-adam-0-0.99": [*PLAIN_DCGAN, "--b1", "0", "--b2", "0.99"],  # StyleGAN2's Adam beside lazy R1
    "wgan-gp": ["--loss", "wgan-gp"],
    "dcgan-wgan-gp": ["--arch", "dcgan", "--loss", "wgan-gp"],
    "conditional-dcgan": ["--arch", "dcgan", "--conditional"],
    "conditional-dcgan-no-r1": ["--arch", "dcgan", "--conditional", "--r1-gamma", "0"],
}
COLUMNS = (("fid", "FID"), ("inception_score", "IS"), ("kl_to_uniform", "KL"), ("recall", "recall"))


def metrics_rows(run: Path) -> dict[int, dict[str, float]]:
    path = run / "metrics.csv"
    if not path.is_file():
        return {}
    with open(path) as f:
        return {int(row["epoch"]): {k: float(v) for k, v in row.items()} for row in csv.DictReader(f)}


def run_summary(run: Path, rows: dict[int, dict[str, float]]) -> dict[str, float | None]:
    with open(run / "losses.csv") as f:
        seconds = [float(row["seconds"]) for row in csv.DictReader(f)]
    best = min(rows.values(), key=lambda r: r["fid"])

    per_epoch = sorted(seconds)[len(seconds) // 2]  # the median: robust to an epoch slowed by another job

    def minutes_to(fid: float) -> float | None:
        epoch = next((e for e in sorted(rows) if rows[e]["fid"] <= fid), None)
        return None if epoch is None else round(epoch * per_epoch / 60, 1)

    return {"seconds_per_epoch": round(per_epoch, 1), "minutes_to_fid_5": minutes_to(5),
            "minutes_to_fid_3": minutes_to(3), "best_fid": round(best["fid"], 2), "best_epoch": int(best["epoch"]),
            "last_over_best": round(rows[max(rows)]["fid"] / best["fid"], 3), "epochs": len(seconds)}  # fmt: skip


def plot(path: Path, runs: dict[str, dict[int, dict[str, float]]], root: Path, epoch_seconds: dict[str, float]) -> None:
    """FID against epochs and against training minutes, one colour per variant, one line style per seed: README,
    'Which GAN?'. Minutes are epochs times --epoch-seconds where given (a quiet machine's figure), else the run's
    own seconds from losses.csv."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    variants = list(dict.fromkeys(name.rsplit("-s", 1)[0] for name in runs))
    for name, rows in runs.items():
        variant, seed = name.rsplit("-s", 1)
        with open(root / name / "losses.csv") as f:
            elapsed = [0.0]
            for row in csv.DictReader(f):
                elapsed.append(elapsed[-1] + epoch_seconds.get(variant, float(row["seconds"])) / 60)
        epochs = sorted(rows)
        style = {"color": f"C{variants.index(variant)}", "linestyle": "-" if seed == "1" else "--", "label": name}
        axes[0].plot(epochs, [rows[e]["fid"] for e in epochs], **style)
        axes[1].plot([elapsed[e] for e in epochs], [rows[e]["fid"] for e in epochs], **style)
    for ax, label in zip(axes, ("epoch", "training minutes (1 CPU thread)")):
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("FID (project judge, 10,000 samples)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


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
        command += ["--eval-every", str(args.eval_every), "--checkpoint-every", "10", "--keep-checkpoints", "0"]
        command += ["--quiet"]
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
    p.add_argument("--eval-every", type=int, default=10, help="judge a new run every N epochs (default: 10)")
    p.add_argument("--report", default="30,100,200", help="epochs to tabulate (default: 30,100,200)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default: 1; 2 on 2 cores with --threads 1)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run (default: 1)")
    p.add_argument("--table-only", action="store_true", help="train nothing; tabulate the runs already in --root")
    p.add_argument("--plot", type=Path, help="also draw the runs' FID curves into this PNG")
    p.add_argument("--epoch-seconds", default="", help="for the plot: variant=seconds per epoch,... (quiet machine)")
    args = p.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown and not args.table_only:  # a table may also read runs of an earlier version (README: "earlier D")
        p.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    report = [int(e) for e in args.report.split(",")]
    jobs = [(v, s) for v in variants for s in seeds]
    if not args.table_only:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(lambda job: train(*job, args), jobs))

    results: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    summaries: dict[str, dict[str, float | None]] = {}
    curves: dict[str, dict[int, dict[str, float]]] = {}
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
        summaries[f"{variant}-s{seed}"] = run_summary(args.root / f"{variant}-s{seed}", rows)
        curves[f"{variant}-s{seed}"] = rows
        cells = [f"{rows[e][key]:.3g}" if e in rows else "" for e in report for key, _ in COLUMNS]
        best = min(rows.values(), key=lambda r: r["fid"]) if rows else None
        best_cell = f"{best['fid']:.3g} ({int(best['epoch'])})" if best else ""
        lines.append(f"| {variant} | {seed} | " + " | ".join(cells) + f" | {best_cell} |")
    print("\n".join(lines), file=sys.stderr)
    if args.plot and curves:
        seconds = {k: float(v) for k, v in (item.split("=") for item in args.epoch_seconds.split(",") if item)}
        plot(args.plot, curves, args.root, seconds)
    print(json.dumps({"report_epochs": report, "results": results, "runs": summaries}))


if __name__ == "__main__":
    main()
