"""Serving BEAM models in inference engines (vLLM: `beam_moe.serving.vllm`)."""
