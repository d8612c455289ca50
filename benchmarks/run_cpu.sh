#!/usr/bin/env bash
# Reproduce the CPU result files in benchmarks/results/: the layer benchmark (qwen3-30b-a3b,
# Avg-K 1.23, 1/8/64/512 tokens) and generation on a 4-layer real-size test model. On a shared
# machine run it with nothing else on the CPU: benchmarks/run_cpu.sh
#   THREADS  torch CPU threads (default 2, the machine's cores)
#   TAG      result file suffix (default cpu-${THREADS}t)
#   MODEL    where the test model is built, once (default /tmp/beam-bench-qwen3-30b-a3b-4l)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
THREADS=${THREADS:-2}
TAG=${TAG:-cpu-${THREADS}t}
OUT=${OUT:-benchmarks/results}
MODEL=${MODEL:-/tmp/beam-bench-qwen3-30b-a3b-4l}
mkdir -p "$OUT"

$PY -m beam_moe.cli bench layer --preset qwen3-30b-a3b --tokens 1,8,64,512 --avg-k 1.23 \
    --threads "$THREADS" --rounds 40 --budget 90 --json --output "$OUT/layer-qwen3-30b-a3b-$TAG.json" --overwrite > /dev/null

[ -f "$MODEL/adapter/beam_config.json" ] || \
    $PY -m beam_moe.cli bench make-model --output "$MODEL" --preset qwen3-30b-a3b --layers 4 --avg-k 1.23
$PY -m beam_moe.cli bench generate "$MODEL/adapter" --input-len 128 --output-len 32 --batch-sizes 1,8 \
    --repeats 3 --threads "$THREADS" --json --overwrite \
    --output "$OUT/generate-qwen3-30b-a3b-4layers-$TAG.json" > /dev/null
