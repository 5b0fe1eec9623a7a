#!/usr/bin/env bash
# GPU throughput benchmark: one short run (under 5 minutes), no downloads. Needs torch with CUDA, transformers,
# safetensors, av and this package importable (PYTHONPATH=src works without installing).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src:benchmarks:${PYTHONPATH:-}" HF_HUB_OFFLINE=1
python benchmarks/bench_gpu.py
