"""Run greedy generation in real vLLM engines, one after another in this process; write the results as JSON.

Usage: python vllm_generate.py SPEC.json OUT.json, where SPEC holds
{"cases": [{"name", "model", "prompts": [[ids]], "max_tokens", "hf_overrides"?, "dtype"?, "env"?}]}.
`dtype` is the engine's dtype (float32 unless given); `env` holds environment variables set for
that case only (e.g. TRITON_INTERPRET=1, read when the Triton kernels are built).
Each case gets tokens, logprobs of the chosen tokens, the attention backends vLLM picked and the
plugin's Avg-K counters (reset after start-up, so they cover exactly the prompts and generated
tokens of the case).
"""

import gc
import json
import os
import sys
import time
import traceback

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def attention_backends(worker) -> list[str]:
    """The attention backends the worker's model runner uses (e.g. CPU_ATTN, CPU_MLA, AMX_MLA)."""
    return sorted(
        {group.backend.get_name() for groups in worker.model_runner.attn_groups for group in groups}
    )


def run_case(case: dict) -> dict:
    from vllm import LLM, SamplingParams

    from beam_moe.serving.vllm import WORKER_EXTENSION, engine_stats, reset_engine_stats

    start = time.monotonic()
    llm = LLM(
        model=case["model"],
        dtype=case.get("dtype", "float32"),
        max_model_len=256,
        max_num_seqs=4,
        enforce_eager=True,
        distributed_executor_backend="uni",
        worker_extension_cls=WORKER_EXTENSION,
        hf_overrides=case.get("hf_overrides") or {},
        seed=0,
    )
    try:
        beam = case.get("beam", True)
        if beam:
            reset_engine_stats(llm)
        params = SamplingParams(max_tokens=case["max_tokens"], temperature=0, ignore_eos=True, logprobs=0)
        outputs = llm.generate([{"prompt_token_ids": p} for p in case["prompts"]], params, use_tqdm=False)
        result = {
            "tokens": [list(o.outputs[0].token_ids) for o in outputs],
            "logprobs": [
                [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)]
                for o in outputs
            ],
            "stats": engine_stats(llm) if beam else None,
            "attention": llm.collective_rpc(attention_backends)[0],
            "seconds": time.monotonic() - start,
        }
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return result


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    results = {}
    for case in spec["cases"]:
        saved = {key: os.environ.get(key) for key in case.get("env", {})}
        os.environ.update(case.get("env", {}))
        try:
            results[case["name"]] = run_case(case)
        except Exception:
            results[case["name"]] = {"error": traceback.format_exc()}
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)
