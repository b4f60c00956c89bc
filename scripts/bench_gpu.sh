#!/usr/bin/env bash
# make bench-gpu: the GPU figures (README, "Real time"). On a machine with an NVIDIA GPU:
# per-frame p50 / p95 of every method for the tiny and xmuda networks in fp32 and bf16
# (tta_benchmark), then the node on cuda at 1x replay of the demo bag (node_benchmark).
# Output also goes to runs/bench_gpu/. Refuses, in one line, where there is no CUDA.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${VENV:-$repo/.venv}/bin/python"
cd "$repo"
if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "bench-gpu: torch sees no CUDA device here; run it on a machine with an NVIDIA GPU" >&2
  exit 2
fi
out=runs/bench_gpu
mkdir -p "$out"
export PYTHONUNBUFFERED=1
"$py" -c 'import torch, spconv; print("GPU:", torch.cuda.get_device_name(0), "| torch",
  torch.__version__, "| spconv", spconv.__version__)' | tee "$out/device.txt"
# ~30k LiDAR points a sweep and 400x225 images: what the 2D branch sees of nuScenes.
"$py" -m mmtta_ros.tools.tta_benchmark --device cuda --sizes tiny xmuda \
  --precision fp32 bf16 --frames "${FRAMES:-50}" --warmup 5 | tee "$out/tta_benchmark.txt"
# bn_stats with config/adapt.yaml's parts is the node's default configuration.
for method in source bn_stats mmtta; do
  "$py" -m mmtta_ros.tools.node_benchmark --method "$method" --param device=cuda \
    --out-dir "$out/node_$method" | tee "$out/node_benchmark_$method.txt"
done
