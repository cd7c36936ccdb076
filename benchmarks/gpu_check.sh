#!/usr/bin/env bash
# The CUDA path on a real GPU, in one call of at most 9.5 minutes (issue: prove the CUDA path). Writes JSON, logs
# and PNGs into the folder given as its first argument. Runs on the GPU machine's own python3 (torch with CUDA,
# torchvision, pytest, ...), from the repository root, with MNIST carried as gzip files:
#
#   mkdir -p .gpu_data/MNIST/raw && gzip -kc ../shared/data/MNIST/raw/FILE > .gpu_data/MNIST/raw/FILE.gz  (x4)
#   echo /.gpu_data/ >> .git/info/exclude       # then carry .gpu_data to the device
#   bash benchmarks/gpu_check.sh "$OUT"                       # on the GPU
#   bash benchmarks/gpu_check.sh /tmp/out --device cpu --tiny  # dry run on a CPU: the same steps, tiny sizes
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR [--device cpu] [--tiny]}; shift
device=cuda; tiny=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --tiny) tiny=1; shift ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 XDG_CACHE_HOME=/tmp/gan_mnist_cache

# MNIST: the carried .gz files, unpacked where torchvision looks.
data=/tmp/gan_mnist_data
mkdir -p "$data/MNIST/raw"
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
  if [ -f ".gpu_data/MNIST/raw/$f.gz" ]; then gunzip -c ".gpu_data/MNIST/raw/$f.gz" > "$data/MNIST/raw/$f"
  elif [ -f "../shared/data/MNIST/raw/$f" ]; then cp "../shared/data/MNIST/raw/$f" "$data/MNIST/raw/$f"
  else echo "gpu_check.sh: MNIST file $f is missing (.gpu_data/MNIST/raw/$f.gz)" >&2; exit 1; fi
done
[ "$tiny" = 1 ] && data=tests/data

{ "$py" -c "import torch, torchvision, sys; print(sys.version.split()[0], torch.__version__, torchvision.__version__,
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"; nvidia-smi -L 2>/dev/null; } \
  | tee "$out/versions.txt"

status=0
echo "== 1. the test suite, CUDA visible (tests/test_cuda.py runs on the GPU)"
timeout 150 "$py" -m pytest -x -q -p no:cacheprovider 2>&1 | tail -n 30 | tee "$out/pytest.txt" || status=1

echo "== 2. steps/s: gan_mnist eager and with CUDA graphs against the tutorial loop, one process each"
steps=600; [ "$tiny" = 1 ] && steps=6
for graph in "" "--cuda-graph"; do
  timeout 110 "$py" benchmarks/bench_train.py --data-dir "$data" --device "$device" --steps "$steps" \
    --warmup $((steps / 6)) $graph | tail -n 1 | tee -a "$out/bench.jsonl" || status=1
done

echo "== 3. the default run, timed end to end with its evaluations (every 10 epochs), by the project's judge"
epochs=200; [ "$tiny" = 1 ] && epochs=2
graph=--cuda-graph; [ "$device" = cpu ] && graph=""
started=$(date +%s.%N)
timeout 200 "$py" gan_mnist.py --epochs "$epochs" --data-dir "$data" --device "$device" $graph \
  --out-dir "$out/run" --quiet --no-tensorboard > "$out/run.log" 2>&1 || status=1
ended=$(date +%s.%N)
tail -n 4 "$out/run.log"
"$py" - "$out" "$started" "$ended" <<'PY' | tee "$out/run.json"
import csv, json, sys
out, started, ended = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
losses = list(csv.DictReader(open(f"{out}/run/losses.csv")))
metrics = list(csv.DictReader(open(f"{out}/run/metrics.csv")))
best = min(metrics, key=lambda r: float(r["fid"]))
print(json.dumps({"epochs": len(losses), "wall_seconds": round(ended - started, 1),
                  "train_seconds": round(sum(float(r["seconds"]) for r in losses), 1),
                  "final": metrics[-1], "best_epoch": int(best["epoch"]), "best_fid": float(best["fid"])}))
PY
# What comes back: at most 8 files; the run's pictures, not its checkpoints.
cp "$out/run/metrics.png" "$out/run/losses.png" "$out/" 2>/dev/null
last=$(ls "$out/run/samples" | tail -n 1); cp "$out/run/samples/$last" "$out/last_grid.png" 2>/dev/null
rm -rf "$out/run"
exit $status
