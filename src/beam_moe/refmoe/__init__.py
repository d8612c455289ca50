"""The reference MoE: a small Qwen3-MoE model pretrained by the project on offline text, shipped in the package.

    from beam_moe.refmoe import load_reference_model, load_reference_tokenizer
    model = load_reference_model()          # Qwen3MoeForCausalLM, 32 experts, Top-8, eval mode
    tokenizer = load_reference_tokenizer()

The weights (bf16 safetensors), config, tokenizer and training record live in `beam_moe/refmoe/model/`;
`python -m beam_moe.experiments.refmoe.pretrain` rebuilds them (docs/reference-moe.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from beam_moe.errors import BeamError

PACKAGED_MODEL_DIR = Path(__file__).resolve().parent / "model"


def reference_model_path() -> Path:
    """The folder of the packaged reference model (a transformers model folder)."""
    if not (PACKAGED_MODEL_DIR / "config.json").is_file():
        raise BeamError(
            f"the reference model is missing from {PACKAGED_MODEL_DIR}; rebuild it with "
            "`python -m beam_moe.experiments.refmoe.pretrain --output runs/refmoe --install` (docs/reference-moe.md)"
        )
    return PACKAGED_MODEL_DIR


def load_reference_model(dtype: str = "float32", device: str = "cpu"):
    """The reference MoE in eval mode (bf16 weights on disk, upcast to `dtype`)."""
    from beam_moe.base_models import load_base_model

    return load_base_model(reference_model_path(), dtype=dtype, device=device)


def load_reference_tokenizer():
    from beam_moe.base_models import load_tokenizer

    return load_tokenizer(reference_model_path())


def training_record() -> dict[str, Any]:
    """How the packaged model was made: command, seed, data sizes, held-out perplexity."""
    return json.loads((reference_model_path() / "training.json").read_text())
