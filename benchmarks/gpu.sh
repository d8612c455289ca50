#!/usr/bin/env bash
# On a machine with a CUDA GPU: the Triton kernel's tests natively (no interpreter), then the layer
# benchmark with the grouped and Triton backends side by side. Writes results under $OUT (default
# benchmarks/results). Nothing here has been run yet: no GPU was lent while this was written.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
GPU=$($PY -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
$PY -m pytest -q tests/unit/test_triton.py tests/unit/test_grouped.py tests/unit/test_experts.py
$PY -m beam_moe.cli bench layer --preset qwen3-30b-a3b --tokens 1,8,64,512 --avg-k 1.23 \
    --device cuda --compare-backends grouped,triton --json --overwrite \
    --output "$OUT/layer-qwen3-30b-a3b-$GPU.json"
