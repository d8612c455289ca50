"""vLLM serving speed of a BEAM checkpoint against its base, at the paper's setting (input 128, output 32).

The model has Qwen3-30B-A3B layer sizes (hidden 2048, 128 experts of 768, top-8, 32 query / 4 KV
heads of 128) with random weights, only `--layers` decoder layers and the byte vocabulary (261), so
the time goes to the layers whose cost BEAM changes. Its mask heads are calibrated (a bias per
layer) to keep about `--avg-k` of 8 experts per token, the paper's 1.23. Both checkpoints are
served by vLLM (CPU build) in this one process, one after the other:

- TTFT: one request of 128 prompt tokens and 1 output token;
- TPOT: one request of 32 output tokens, (latency - TTFT) / 31;
- throughput: `--batch` concurrent requests of 128 in / 32 out, output tokens per second.

Every prompt is new (no prefix-cache hits); values are medians over `--repeats`. Variants: `base`
(vLLM's fused-MoE kernel on all Top-K pairs), `beam` (the plugin, vLLM's kernel on the kept pairs
only) and `beam-grouped` (the plugin with beam-moe's grouped backend). The memory-bound floor of a
decode step (bytes of the weights it must read / the copy bandwidth measured here) is reported next
to TPOT. Run it alone:

    .venv/bin/python benchmarks/serving_vllm.py
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("BEAM_MOE_LOG_INTERVAL", "0")

import torch

PRESET = "qwen3-30b-a3b"
ROOT = Path(__file__).resolve().parent


def build_checkpoints(work: Path, layers: int, avg_k: float, seed: int) -> tuple[Path, Path]:
    """The base folder and the merged BEAM folder (built once, reused when present)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from beam_moe import BeamConfig, attach, beam_stats, get_attachment, save_beam
    from beam_moe.merged import export_merged
    from beam_moe.presets import get_preset
    from beam_moe.tiny_models import BYTE_VOCAB_SIZE, byte_tokenizer

    base, merged = work / f"base-{layers}l", work / f"beam-{layers}l-k{avg_k}"
    if (merged / "config.json").is_file():
        return base, merged
    preset = get_preset(PRESET)
    if not (base / "config.json").is_file():
        config = AutoConfig.for_model(
            "qwen3_moe",
            hidden_size=preset.hidden_size,
            intermediate_size=6144,
            moe_intermediate_size=preset.expert_intermediate,
            num_experts=preset.num_experts,
            num_experts_per_tok=preset.top_k,
            norm_topk_prob=True,
            num_hidden_layers=layers,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            vocab_size=BYTE_VOCAB_SIZE,
            max_position_embeddings=512,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(base)
        byte_tokenizer().save_pretrained(base)
        del model
        gc.collect()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).eval()
    attach(model, BeamConfig(bias=True, head="linear"))  # a bias per layer sets the budget
    generator = torch.Generator().manual_seed(seed + 1)
    layers_ = get_attachment(model).layers
    with torch.no_grad():
        for layer in layers_:
            layer.head.weight.normal_(0.0, layer.hidden_size**-0.5, generator=generator)
        tokens = torch.randint(5, BYTE_VOCAB_SIZE, (2, 128), generator=generator)
        with beam_stats(model, record=True) as stats:
            model(tokens)
        keep_fraction = avg_k / preset.top_k
        for layer, records in zip(layers_, stats.records, strict=True):
            z = torch.logit(torch.cat([r.soft.flatten() for r in records]).double())
            layer.head.bias.fill_(-float(torch.quantile(z, 1.0 - keep_fraction)))
        with beam_stats(model) as check:
            model(tokens)
    print(f"calibrated mask heads: Avg-K {check.avg_k:.3f} of {preset.top_k} on the calibration tokens")
    save_beam(model, work / f"adapter-{layers}l-k{avg_k}")
    del model
    gc.collect()
    export_merged(work / f"adapter-{layers}l-k{avg_k}", merged)
    return base, merged


def copy_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes moved per second by a large tensor copy (read + write), median of `repeats`."""
    source = torch.ones(megabytes << 18, dtype=torch.float32)
    target = torch.empty_like(source)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        times.append(time.perf_counter() - start)
    return 2 * source.numel() * 4 / statistics.median(times)


def decode_bytes(layers: int, experts_read: float) -> float:
    """Weight bytes (bf16) one decode step must read: attention, router, mask head (fp32), experts."""
    from beam_moe.presets import get_preset

    p = get_preset(PRESET)
    attention = p.hidden_size * (32 * 128 + 2 * 4 * 128) + 32 * 128 * p.hidden_size
    expert = 3 * p.hidden_size * p.expert_intermediate
    per_layer = 2 * (attention + p.num_experts * p.hidden_size + experts_read * expert)
    return layers * per_layer


def measure(model: Path, name: str, args: argparse.Namespace, overrides: dict | None) -> dict:
    from vllm import LLM, SamplingParams

    from beam_moe.serving.vllm import WORKER_EXTENSION, engine_stats, reset_engine_stats

    beam = overrides is not None
    start = time.perf_counter()
    llm = LLM(
        model=str(model),
        dtype="bfloat16",
        max_model_len=256,
        max_num_seqs=args.batch,
        enforce_eager=not args.compile,
        enable_prefix_caching=False,
        distributed_executor_backend="uni",
        worker_extension_cls=WORKER_EXTENSION if beam else "",
        hf_overrides=overrides or {},
        seed=0,
    )
    startup = time.perf_counter() - start
    generator = torch.Generator().manual_seed(1234)

    def prompts(n: int) -> list[dict]:
        return [
            {"prompt_token_ids": torch.randint(5, 261, (args.input_len,), generator=generator).tolist()}
            for _ in range(n)
        ]

    def run(requests: list[dict], max_tokens: int) -> float:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        begin = time.perf_counter()
        outputs = llm.generate(requests, params, use_tqdm=False)
        elapsed = time.perf_counter() - begin
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outputs)
        return elapsed

    try:
        run(prompts(args.batch), args.output_len)  # warm-up
        if beam:
            reset_engine_stats(llm)
        ttft = [run(prompts(1), 1) for _ in range(args.repeats)]
        latency = [run(prompts(1), args.output_len) for _ in range(args.repeats)]
        batch = [run(prompts(args.batch), args.output_len) for _ in range(args.repeats)]
        stats = engine_stats(llm) if beam else None
    finally:
        llm.llm_engine.engine_core.shutdown()
    ttft_s = statistics.median(ttft)
    result = {
        "variant": name,
        "startup_s": startup,
        "ttft_ms": 1e3 * ttft_s,
        "tpot_ms": 1e3 * statistics.median([(t - ttft_s) / (args.output_len - 1) for t in latency]),
        "latency_32_ms": 1e3 * statistics.median(latency),
        "throughput_tok_s": args.batch * args.output_len / statistics.median(batch),
        "batch_s": batch,
        "ttft_s": ttft,
        "latency_s": latency,
    }
    if stats is not None:
        result["avg_k"] = stats["avg_k"]
        result["kept_fraction"] = stats["kept_fraction"]
        result["computed_rows"] = stats["computed_rows"]
        result["routed_pairs"] = stats["routed_pairs"]
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}), flush=True)
    return result


def cli_options(args: argparse.Namespace) -> list[str]:
    """The options that reproduce this run (paths left out)."""
    options = []
    for key, value in vars(args).items():
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, bool):
            options += [flag] if value else []
        elif key not in ("work", "output"):
            options += [flag, str(value)]
    return options


def machine() -> dict:
    import transformers
    import vllm

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    flags = next((line for line in cpuinfo if line.startswith("flags")), "")
    memory = next((line.split()[1] for line in meminfo if line.startswith("MemTotal")), "0")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(int(memory) / 2**20, 1),
        "isa": [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f" {f}" in flags],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "vllm": vllm.__version__,
        "load_average_at_start": os.getloadavg(),
        "vllm_cpu_omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
        "vllm_cpu_kvcache_space_gib": os.environ["VLLM_CPU_KVCACHE_SPACE"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (each 1.2 GB of bf16 experts)")
    parser.add_argument("--avg-k", type=float, default=1.23, help="kept experts per token the masks aim at")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="concurrent requests for the throughput run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="let vLLM torch.compile (default: eager)")
    parser.add_argument("--variants", default="base,beam,beam-grouped")
    parser.add_argument("--work", type=Path, default=Path("/tmp/beam-moe-bench-serving"))
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "serving_vllm.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    base, merged = build_checkpoints(args.work, args.layers, args.avg_k, args.seed)
    bandwidth = copy_bandwidth()
    variants = {
        "base": (base, None),
        "beam": (merged, {}),
        "beam-grouped": (merged, {"beam": {"backend": "grouped"}}),
    }
    results = {}
    for name in args.variants.split(","):
        path, overrides = variants[name]
        results[name] = measure(path, name, args, overrides)
        gc.collect()
    top_k = 8
    summary = {}
    for name, result in results.items():
        experts = result.get("avg_k", top_k)
        floor = decode_bytes(args.layers, experts) / bandwidth
        result["decode_floor_ms"] = 1e3 * floor
        result["tpot_over_floor"] = result["tpot_ms"] / result["decode_floor_ms"]
        if name != "base" and "base" in results:
            summary[name] = {
                key: results["base"][key] / result[key]
                if key != "throughput_tok_s"
                else result[key] / results["base"][key]
                for key in ("ttft_ms", "tpot_ms", "throughput_tok_s")
            }
    document = {
        "benchmark": "vLLM serving, BEAM vs base (benchmarks/serving_vllm.py)",
        "command": " ".join([".venv/bin/python benchmarks/serving_vllm.py", *cli_options(args)]),
        "machine": machine(),
        "model": {
            "preset": PRESET,
            "layers": args.layers,
            "vocab": 261,
            "dtype": "bfloat16",
            "note": "real layer sizes, random weights, mask heads calibrated to the target Avg-K",
        },
        "settings": {
            "input_len": args.input_len,
            "output_len": args.output_len,
            "batch": args.batch,
            "repeats": args.repeats,
            "enforce_eager": not args.compile,
            "target_avg_k": args.avg_k,
        },
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "speedup_over_base": summary,
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
