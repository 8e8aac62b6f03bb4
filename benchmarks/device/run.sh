#!/usr/bin/env bash
# The prepared GPU check (one CUDA machine, a few minutes): the Chamfer metric at 1,000 x 1,000 clouds on the GPU,
# then generation_quality.py on MNIST (two NefGPT / autoencoder sizes) and on the ModelNet10 chairs, side by side.
#
#   MODE=smoke bash benchmarks/device/run.sh OUT    # tiny versions of every job (~1 min): shakes out GPU-only bugs
#   MODE=full  bash benchmarks/device/run.sh OUT    # the measured run (7 min on an H200, 2026-11-28)
#
# On a machine without this package's dependencies (the lent H200 had torch 2.11, transformers 5.17 and no
# `datasets`), carry wheels for Python 3.12 (datasets 5.2.0, dill, multiprocess, mlxtend, trimesh, pyarrow 26) in
# .whl/, the chair file and benchmarks/device/sitecustomize.py in .gpudata/, and run from the repository root:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=$PWD/.gpudata:/tmp/site:$PWD MODE=full CHAIRS=.gpudata/modelnet10_chair_32.npz bash benchmarks/device/run.sh $OUT
# (sitecustomize.py works around a dill / pyarrow pickling failure of datasets' fingerprints on that Python.)
#
# CHAIRS: the chair voxel file (default ../shared/data/shapes/modelnet10_chair_32.npz). Logs, tables and JSON go to
# OUT (logs are written as the jobs run, so a run stopped at its time limit still leaves them).
set -u
OUT=${1:?usage: MODE=smoke|full bash benchmarks/device/run.sh OUT}
MODE=${MODE:-smoke}
CHAIRS=${CHAIRS:-../shared/data/shapes/modelnet10_chair_32.npz}
WORK=${WORK:-/tmp/nef_device_runs}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu MODE=smoke: the same script on a CPU machine, to test it before a lease
mkdir -p "$OUT" "$WORK"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
START=$(date +%s)
stamp() { echo "[$(( $(date +%s) - START )) s] $*"; }

stamp "device: $(nvidia-smi -L 2>&1 | head -1)"
python3 -c "import torch, transformers, datasets; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'datasets', datasets.__version__)"

if [ "$MODE" = smoke ]; then
  CLOUDS=50; MNIST_ITEMS="--num-items 80"; CHAIR_ITEMS="--num-items 40"; E=1; AE=2; CE=2; CAE=2; LIMIT=150
else
  CLOUDS=1000; MNIST_ITEMS=""; CHAIR_ITEMS=""; E=60; AE=150; CE=200; CAE=300; LIMIT=450
fi

# 1. the metric alone on the GPU: S-R, S-S and R-R Chamfer matrices and MMD / COV / 1-NNA
stamp "metric, $CLOUDS x $CLOUDS clouds of 2,048 points"
timeout 120 python3 - "$CLOUDS" "$DEVICE" > "$OUT/metric_gpu.log" 2>&1 <<'EOF'
import json, sys, time
import torch
from nef_transformers.metrics import chamfer_distance_matrix, generation_metrics
n, device = int(sys.argv[1]), sys.argv[2]
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
g = torch.Generator().manual_seed(0)
s, r = torch.randn(n, 2048, 3, generator=g), torch.randn(n, 2048, 3, generator=g)
chamfer_distance_matrix(s[:8], r[:8], device=device)  # warm-up
sync()
t0 = time.perf_counter()
m = generation_metrics(s.numpy(), r.numpy(), modality="points", device=device, progress=False)
sync()
total = time.perf_counter() - t0
print(json.dumps({"bench": "metric_speed", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "num_clouds": n,
                  "num_points": 2048, "total_s": round(total, 2), "mmd": m["mmd"], "cov": m["cov"],
                  "one_nna": m["one_nna"]}))
EOF
stamp "metric done: $(tail -1 "$OUT/metric_gpu.log")"

# 2. three generation_quality runs at once on the one GPU (each is small; they share it)
common="--strategies learned --device $DEVICE --threads 4"
stamp "generation_quality jobs start"
timeout $LIMIT python3 benchmarks/generation_quality.py --out "$WORK/mnist_big" $MNIST_ITEMS $common \
  --top-k 3 5 --temperature 0.5 0.8 1.0 --epochs $E --hidden-size 256 --num-layers 8 --heads 8 --batch-size 64 \
  --lr 5e-4 --ae-epochs $AE --ae-hidden-size 128 --ae-layers 2 > "$OUT/mnist_big.log" 2>&1 &
timeout $LIMIT python3 benchmarks/generation_quality.py --out "$WORK/mnist_gpt" $MNIST_ITEMS $common \
  --top-k 3 --temperature 0.5 0.8 --epochs $E --hidden-size 256 --num-layers 8 --heads 8 --batch-size 64 \
  --lr 5e-4 --ae-epochs 30 > "$OUT/mnist_gpt.log" 2>&1 &
timeout $LIMIT python3 benchmarks/generation_quality.py --source "$CHAIRS" --out "$WORK/chairs" $CHAIR_ITEMS $common \
  --top-k 3 5 --temperature 0.5 0.8 --epochs $CE --hidden-size 256 --num-layers 6 --heads 8 --batch-size 32 \
  --lr 5e-4 --ae-epochs $CAE --ae-hidden-size 64 --ae-layers 2 > "$OUT/chairs.log" 2>&1 &
wait
stamp "jobs done"
for job in mnist_big mnist_gpt chairs; do
  echo "== $job"; grep -E '^\{"bench"|Traceback|Error' "$OUT/$job.log" | tail -12
done
tar -czf "$OUT/results.tar.gz" -C "$WORK" --exclude='fields' --exclude='tokenization' --exclude='checkpoints' \
  --exclude='*.safetensors' --exclude='dataset' . 2>/dev/null
stamp "packed $(du -h "$OUT/results.tar.gz" | cut -f1)"
