#!/usr/bin/env bash
# GPU benchmark for issue 11's ratios and throughput: one short run (under 6 minutes on one recent GPU), no
# downloads. Needs torch with CUDA, transformers, datasets, safetensors, av and this package importable
# (PYTHONPATH=src works without installing). Prints the card's name first: record the figures with it in BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src:benchmarks:${PYTHONPATH:-}" HF_HUB_OFFLINE=1
python benchmarks/bench_gpu.py
# Issue 11, target 4 where it matters most: real-sized clips decoded in DataLoader workers (0, 4 and 8) while the
# bf16 model runs on the GPU, against the model alone on the same clips already decoded (target >= 0.85).
python benchmarks/bench_throughput.py --device cuda --backbone_dtype bfloat16 --clips 32 --batch_size 16 \
    --workers 0 4 8 --repeats 2
