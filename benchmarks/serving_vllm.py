"""vLLM serving speed of BEAM checkpoints against their base, at real depth, measured against the floor.

The model has Qwen3-30B-A3B layer sizes (hidden 2048, 128 experts of 768, top-8, 32 query / 4 KV
heads of 128) with random weights, `--layers` decoder layers (8 fit 24 GiB: 1.2 GB of bf16 experts
each) and the byte vocabulary (261), so the time goes to the layers whose cost BEAM changes. Mask
heads are calibrated (a bias per layer) to keep about each `--avg-k` of 8 experts per token (the
paper's 1.23, and 2.0). The variants, each served by vLLM (CPU build) in this one process:

- `base`: vLLM's fused-MoE kernel on all Top-K pairs;
- `keep-all`: the plugin with fresh (zero) mask heads, which keep every expert: what BEAM costs;
- `beam-k<avg-k>`: the plugin with calibrated heads, vLLM's kernel on the kept pairs only;
- `beam-grouped-k<avg-k>`, `beam-native-k<avg-k>` (on request): the same with beam-moe's grouped
  or native expert backend (on vLLM's w13/w2 in checkpoint layout) instead of vLLM's kernel.

For each batch size B of `--batches` (B concurrent requests of `--input-len` tokens): the time of
B requests of 1 output token (TTFT) and of `--output-len` tokens; TPOT = (the difference) /
(output-len - 1), the time of one decode step of B sequences; throughput = output tokens / second.
Rounds interleave the variants (`--rounds`: each round starts every engine in turn), and values are
medians over rounds x `--repeats`. Every prompt is new (no prefix-cache hits).

The floor of a decode step is the weight bytes it must read over the copy bandwidth measured in the
same run: per layer attention, router, mask head and every expert that at least one of the B tokens
keeps. That count is measured in transformers on the same checkpoint (random 128-token texts, groups
of B tokens drawn from them), then scaled by the Avg-K the engine itself served over the one seen
there. Reported per variant and B: TPOT / floor, and for BEAM the ideal
speed-up (base floor / BEAM floor) next to the measured one (base TPOT / BEAM TPOT).

The roofline is the same step when the dense projections and the experts each also take at least
their FLOPs over the GEMM rate measured in the run (the faster of bf16 and float32, `gemm_rate`):
whether the hardware's compute, not only its bandwidth, bounds a step. Both ideals and shares are
reported. (On an AVX2-only EPYC the float32 rate keeps the dense part nearly bytes-bound, so there
the distance at batch 8 is torch's bf16 kernels in vLLM's projections, not the hardware.)

Separate engines differ by more than BEAM on a shared machine (two rounds moved the base TPOT by
10-30%), so `--paired N` also measures what the BEAM step costs inside the keep-all engine: N pairs
of consecutive decode steps per batch size, one with its BEAM runners switched off (vLLM's own
runner, the base model's path) and one on, in a random order per pair. Run it alone, and without
OMP_WAIT_POLICY=PASSIVE (the machine records it): with it, vLLM's second OpenMP thread sleeps between
ops, and every small multi-threaded op pays the wake-up (a 10 x 2048 index_add_ took 0.56 ms
against 0.02 ms by default on a 2-core EPYC), which a serving machine does not pay:

    .venv/bin/python benchmarks/serving_vllm.py --layers 8 --avg-k 1.23,2.0 --batches 1,8,32
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("BEAM_MOE_LOG_INTERVAL", "0")

import torch

PRESET = "qwen3-30b-a3b"
ROOT = Path(__file__).resolve().parent


def _experts_read(records: list, batches: list[int], keep: bool, draws: int = 64) -> dict[str, float]:
    """Mean over layers of the experts at least one of B tokens routes to (`keep`: and keeps), B in
    `batches`, from `draws` random groups of B tokens of one forward pass."""
    generator = torch.Generator().manual_seed(7)
    read = {}
    for b in batches:
        per_layer = []
        for layer_records in records:
            ids = torch.cat([r.ids for r in layer_records])
            kept = (
                torch.cat([r.keep for r in layer_records]) if keep else torch.ones_like(ids, dtype=torch.bool)
            )
            counts = []
            for _ in range(draws):
                rows = torch.randperm(ids.shape[0], generator=generator)[:b]
                counts.append(ids[rows][kept[rows]].unique().numel())
            per_layer.append(statistics.mean(counts))
        read[str(b)] = statistics.mean(per_layer)
    return read


def build_checkpoints(
    work: Path, layers: int, avg_ks: list[float], batches: list[int], seed: int
) -> tuple[dict[str, Path], dict[str, dict[str, float]]]:
    """The served folders by variant (base, keep-all, beam-k<avg-k>), built once and reused when
    present, and the experts a decode step of B tokens reads in each (`experts_read.json`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from beam_moe import BeamConfig, attach, beam_stats, detach, get_attachment, save_beam
    from beam_moe.merged import export_merged
    from beam_moe.presets import get_preset
    from beam_moe.tiny_models import BYTE_VOCAB_SIZE, byte_tokenizer

    preset = get_preset(PRESET)
    base = work / f"base-{layers}l"
    folders = {"base": base, "keep-all": work / f"keep-all-{layers}l"}
    folders.update({f"beam-k{k}": work / f"beam-{layers}l-k{k}" for k in avg_ks})
    read_file = work / f"experts_read-{layers}l.json"
    read = json.loads(read_file.read_text()) if read_file.is_file() else {}
    wanted = [name for name in folders if name != "base"]
    if all((folders[n] / "config.json").is_file() for n in wanted) and all(
        set(read.get(n, {})) >= {str(b) for b in batches} for n in folders
    ):
        return folders, read
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
    generator = torch.Generator().manual_seed(seed + 1)
    calibration = torch.randint(5, BYTE_VOCAB_SIZE, (2, 128), generator=generator)
    texts = torch.randint(5, BYTE_VOCAB_SIZE, (4, 128), generator=generator)
    attach(model, BeamConfig(bias=True, head="linear"))  # fresh heads keep every expert
    with torch.no_grad(), beam_stats(model, record=True) as stats:
        model(texts)
    read["base"] = read["keep-all"] = _experts_read(stats.records, batches, keep=False)
    adapters = {"keep-all": work / f"adapter-keep-all-{layers}l"}
    save_beam(model, adapters["keep-all"])
    heads = get_attachment(model).layers
    with torch.no_grad():
        for layer in heads:  # a bias per layer sets the budget
            layer.head.weight.normal_(0.0, layer.hidden_size**-0.5, generator=generator)
        with beam_stats(model, record=True) as stats:
            model(calibration)
        logits = [
            torch.logit(torch.cat([r.soft.flatten() for r in records]).double()) for records in stats.records
        ]
        for avg_k in avg_ks:
            for layer, z in zip(heads, logits, strict=True):
                layer.head.bias.fill_(-float(torch.quantile(z, 1.0 - avg_k / preset.top_k)))
            with beam_stats(model, record=True) as check:
                model(texts)
            name = f"beam-k{avg_k}"
            read[name] = _experts_read(check.records, batches, keep=True)
            print(f"{name}: Avg-K {check.avg_k:.3f} of {preset.top_k} on held-out random text", flush=True)
            adapters[name] = work / f"adapter-{layers}l-k{avg_k}"
            save_beam(model, adapters[name])
    detach(model)
    del model
    gc.collect()
    for name, adapter in adapters.items():  # each export loads the base again: one model at a time
        if not (folders[name] / "config.json").is_file():
            export_merged(adapter, folders[name])
    read_file.write_text(json.dumps(read, indent=2) + "\n")
    return folders, read


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


def gemm_rate() -> float:
    """FLOP/s of the faster of a bf16 and a float32 GEMM (about 50 ms each): the compute ceiling a
    kernel that widens bf16 as it loads can reach on a CPU without bf16 arithmetic."""
    from beam_moe.bench.machine import measure_limits

    return measure_limits(torch.device("cpu"), torch.bfloat16, repeats=5, nbytes=64 << 20).gemm_tflops * 1e12


def _layer_parameters(mask_head: bool) -> tuple[int, int]:
    """(dense, one expert) parameters of a layer: attention and router (and mask head), and 3HI."""
    from beam_moe.presets import get_preset

    p = get_preset(PRESET)
    attention = p.hidden_size * (32 * 128 + 2 * 4 * 128) + 32 * 128 * p.hidden_size
    router = p.num_experts * p.hidden_size * (2 if mask_head else 1)
    return attention + router, 3 * p.hidden_size * p.expert_intermediate


def decode_bytes(layers: int, experts_read: float, mask_head: bool) -> float:
    """Weight bytes (bf16) one decode step must read: attention, router, mask head, the experts read."""
    dense, expert = _layer_parameters(mask_head)
    return layers * 2 * (dense + experts_read * expert)


def decode_roofline_s(
    layers: int,
    batch: int,
    experts_read: float,
    pairs_per_token: float,
    mask_head: bool,
    bandwidth: float,
    rate: float,
) -> float:
    """Seconds of one decode step when the dense projections (attention, router, mask head) and the
    experts each take the longer of reading their weights and computing their FLOPs (the mask
    head's few rows per token are left out of the FLOPs: a stricter floor)."""
    dense, expert = _layer_parameters(mask_head)
    dense_flops, _ = _layer_parameters(mask_head=False)
    dense_s = max(2 * dense / bandwidth, 2 * batch * dense_flops / rate)
    experts_s = max(2 * experts_read * expert / bandwidth, 2 * batch * pairs_per_token * expert / rate)
    return layers * (dense_s + experts_s)


BEAM_BACKENDS = ("grouped", "native")
"""beam-moe expert backends a `beam-<backend>-k<avg-k>` variant serves with (on the `beam-k<avg-k>` checkpoint)."""


def checkpoint_of(variant: str) -> str:
    for backend in BEAM_BACKENDS:
        variant = variant.replace(f"beam-{backend}-", "beam-")
    return variant


def start_engine(model: Path, variant: str, args: argparse.Namespace):
    from vllm import LLM

    from beam_moe.serving.vllm import WORKER_EXTENSION

    beam = variant != "base"
    backend = next((b for b in BEAM_BACKENDS if variant.startswith(f"beam-{b}-")), None)
    overrides = {"beam": {"backend": backend}} if backend else {}
    return LLM(
        model=str(model),
        dtype="bfloat16",
        max_model_len=args.input_len + max(args.output_len, 2 * args.paired + 1) + 8,
        max_num_seqs=max(args.batches),
        enforce_eager=not args.compile,
        enable_prefix_caching=False,
        distributed_executor_backend="uni",
        worker_extension_cls=WORKER_EXTENSION if beam else "",
        hf_overrides=overrides,
        seed=0,
    )


def time_generate(
    llm, batch: int, max_tokens: int, args: argparse.Namespace, generator: torch.Generator
) -> float:
    """Seconds for B new random prompts of `--input-len` tokens to each produce `max_tokens`."""
    from vllm import SamplingParams

    requests = [
        {"prompt_token_ids": torch.randint(5, 261, (args.input_len,), generator=generator).tolist()}
        for _ in range(batch)
    ]
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    begin = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    elapsed = time.perf_counter() - begin
    assert all(len(o.outputs[0].token_ids) == max_tokens for o in outputs)
    return elapsed


def measure_round(llm, variant: str, args: argparse.Namespace, generator: torch.Generator) -> dict:
    """One round of one engine: per batch size, `--repeats` times B requests of 1 and of
    `--output-len` tokens (seconds each), and the BEAM counters over the round."""
    from beam_moe.serving.vllm import engine_stats, reset_engine_stats

    def run(batch: int, max_tokens: int) -> float:
        return time_generate(llm, batch, max_tokens, args, generator)

    run(max(args.batches), args.output_len)  # warm-up
    if variant != "base":
        reset_engine_stats(llm)
    samples = {}
    for batch in args.batches:
        first = [run(batch, 1) for _ in range(args.repeats)]
        whole = [run(batch, args.output_len) for _ in range(args.repeats)]
        samples[str(batch)] = {"first_s": first, "whole_s": whole}
    if variant != "base":
        stats = engine_stats(llm)
        samples["beam"] = {k: stats[k] for k in ("avg_k", "kept_fraction", "computed_rows", "routed_pairs")}
    return samples


def alternate_beam_steps(llm, args: argparse.Namespace, generator: torch.Generator) -> dict:
    """What the BEAM step costs, measured inside one engine: the keep-all engine's decode steps
    with its BEAM runners switched off (vLLM's own `MoERunner`, the base model's path) and on, the
    two in a random order within each pair of consecutive steps, so a pair shares its requests,
    context length (within one token), memory and machine state. Per batch size: `--paired` pairs
    from one generation of 2 x `--paired` + 1 tokens; each step's forward pass is timed.

    Benchmark only: it wraps the model runner's `execute_model` and switches the runners' class and
    vLLM's forward entry (private) directly; the engine runs in this process (uni executor)."""
    import random

    order = random.Random(args.seed)
    timing: dict = {"active": False, "plan": [], "steps": []}

    def install(worker) -> int:
        from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

        from beam_moe.serving.vllm.runner import BeamMoERunner

        runner = worker.model_runner
        beam = [m for m in runner.model.modules() if isinstance(m, MoERunner) and hasattr(m, "beam_mask")]
        entries = [m._forward_entry for m in beam]  # as the plugin set them

        def switch(on: bool) -> None:
            for module, entry in zip(beam, entries, strict=True):
                module.__class__ = BeamMoERunner if on else MoERunner
                module._forward_entry = entry if on else module._select_forward()

        original = runner.execute_model

        def execute_model(scheduler_output, *rest, **options):
            counts = scheduler_output.num_scheduled_tokens
            decode = timing["active"] and bool(counts) and all(n == 1 for n in counts.values())
            if not decode:
                return original(scheduler_output, *rest, **options)
            if not timing["plan"]:
                timing["plan"] = order.sample([True, False], 2)
            on = timing["plan"].pop()
            switch(on)
            begin = time.perf_counter()
            output = original(scheduler_output, *rest, **options)
            timing["steps"].append((on, len(counts), 1e3 * (time.perf_counter() - begin)))
            switch(True)
            return output

        runner.execute_model = execute_model
        return len(beam)

    if llm.collective_rpc(install)[0] == 0:
        raise SystemExit("--paired: the keep-all engine has no BEAM runner to switch")
    result = {}
    for batch in args.batches:
        timing.update(active=True, plan=[], steps=[])
        time_generate(llm, batch, 2 * args.paired + 1, args, generator)
        timing["active"] = False
        steps = [s for s in timing["steps"] if s[1] == batch]
        pairs = [(a, b) for a, b in zip(steps[::2], steps[1::2], strict=False) if a[0] != b[0]]
        on = [a[2] if a[0] else b[2] for a, b in pairs]
        off = [b[2] if a[0] else a[2] for a, b in pairs]
        result[str(batch)] = {
            "step_ms_beam_on": on,
            "step_ms_beam_off": off,
            "ratio_on_over_off": [x / y for x, y in zip(on, off, strict=True)],
        }
    return result


def summarise(samples: list[dict], args: argparse.Namespace) -> dict:
    """Medians over rounds x repeats, per batch size."""
    result = {}
    for batch in args.batches:
        first = [s for round_ in samples for s in round_[str(batch)]["first_s"]]
        whole = [s for round_ in samples for s in round_[str(batch)]["whole_s"]]
        ttft = statistics.median(first)
        result[str(batch)] = {
            "ttft_ms": 1e3 * ttft,
            "tpot_ms": 1e3 * statistics.median([(w - ttft) / (args.output_len - 1) for w in whole]),
            "throughput_tok_s": batch * args.output_len / statistics.median(whole),
            "first_s": first,
            "whole_s": whole,
        }
    if "beam" in samples[-1]:
        result["beam_counters_last_round"] = samples[-1]["beam"]
    return result


def cli_options(args: argparse.Namespace) -> list[str]:
    """The options that reproduce this run (paths left out)."""
    options = []
    for key, value in vars(args).items():
        flag = f"--{key.replace('_', '-')}"
        if key in ("resume", "report") or (key == "paired" and not value):
            continue
        if isinstance(value, bool):
            options += [flag] if value else []
        elif isinstance(value, list):
            options += [flag, ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)]
        elif key not in ("work", "output"):
            options += [flag, str(value)]
    return options


def machine() -> dict:
    import vllm

    from beam_moe.bench.machine import describe_machine

    memory = next(
        (
            line.split()[1]
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        ),
        "0",
    )
    return {
        **describe_machine(torch.device("cpu")),
        "memory_gib": round(int(memory) / 2**20, 1),
        "python": platform.python_version(),
        "vllm": vllm.__version__,
        "vllm_cpu_omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
        "vllm_cpu_kvcache_space_gib": os.environ["VLLM_CPU_KVCACHE_SPACE"],
    }


def paired_summary(pairs: list[dict]) -> dict:
    """The keep-all engine's on/off step pairs of every round at one batch size."""
    ratios = [r for p in pairs for r in p["ratio_on_over_off"]]
    off = [t for p in pairs for t in p["step_ms_beam_off"]]
    on = [t for p in pairs for t in p["step_ms_beam_on"]]
    return {
        "pairs": len(ratios),
        "median_ratio": statistics.median(ratios),
        "ratios": ratios,
        "step_ms_beam_off_median": statistics.median(off),
        "step_ms_beam_on_median": statistics.median(on),
    }


def markdown_table(document: dict) -> str:
    """The result file as the table the docs show (`--report FILE` prints it)."""
    lines = [
        "| variant | batch | TTFT | TPOT | throughput | TPOT / floor | vs base: TPOT (ideal, share) | throughput "
        "| TPOT / roofline | roofline ideal, share |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, per_batch in document["results"].items():
        for batch, row in per_batch.items():
            if not batch.isdigit():
                continue
            ratio = document["summary"].get(variant, {}).get(batch)
            versus = (
                f"{ratio['tpot_speedup']:.2f}x ({ratio['ideal_tpot_speedup']:.2f}x, {ratio['share_of_ideal']:.0%}) "
                f"| {ratio['throughput_speedup']:.2f}x"
                if ratio
                else "— | —"
            )
            if "tpot_over_roofline" not in row:  # files from before the roofline have none
                roofline = "— | —"
            elif ratio:
                roofline = (
                    f"{row['tpot_over_roofline']:.2f} | "
                    f"{ratio['roofline_ideal_tpot_speedup']:.2f}x, {ratio['share_of_roofline_ideal']:.0%}"
                )
            else:
                roofline = f"{row['tpot_over_roofline']:.2f} | —"
            lines.append(
                f"| {variant} | {batch} | {row['ttft_ms'] / 1000:.2f} s | {row['tpot_ms']:.0f} ms "
                f"| {row['throughput_tok_s']:.1f} tok/s | {row['tpot_over_floor']:.2f} | {versus} | {roofline} |"
            )
    paired = document.get("keep_all_paired")
    if paired:
        lines += [
            "",
            "| batch | decode step, BEAM runners off | on | on / off (median of pairs) | pairs |",
            "|---|---|---|---|---|",
        ]
        for batch, row in paired.items():
            lines.append(
                f"| {batch} | {row['step_ms_beam_off_median']:.1f} ms | {row['step_ms_beam_on_median']:.1f} ms "
                f"| {row['median_ratio']:.3f} | {row['pairs']} |"
            )
    return "\n".join(lines)


def ratios(results: dict, read: dict, bandwidth: float, rate: float, args: argparse.Namespace) -> dict:
    """Floors (bytes, and the roofline) per variant and batch size, and each BEAM variant against the base."""
    from beam_moe.presets import get_preset

    floors, rooflines = {}, {}
    for variant in results:
        counted = dict(read[checkpoint_of(variant)])
        served = results[variant].get("beam_counters_last_round", {}).get("avg_k")
        pairs_per_token = served if served is not None else float(get_preset(PRESET).top_k)
        if served is not None and variant != "keep-all":
            # The engine's own Avg-K replaces the estimate from transformers' random text; the
            # distinct experts of B tokens scale with it (linearly: a lower, stricter floor).
            scale = served / counted["1"]
            counted = {b: n * scale for b, n in counted.items()}
        floors[variant] = {
            str(b): 1e3 * decode_bytes(args.layers, counted[str(b)], variant != "base") / bandwidth
            for b in args.batches
        }
        rooflines[variant] = {
            str(b): 1e3
            * decode_roofline_s(
                args.layers, b, counted[str(b)], pairs_per_token, variant != "base", bandwidth, rate
            )
            for b in args.batches
        }
        for b in args.batches:
            row = results[variant][str(b)]
            row["decode_floor_ms"] = floors[variant][str(b)]
            row["decode_roofline_ms"] = rooflines[variant][str(b)]
            row["experts_read_per_layer"] = counted[str(b)]
            row["tpot_over_floor"] = row["tpot_ms"] / row["decode_floor_ms"]
            row["tpot_over_roofline"] = row["tpot_ms"] / row["decode_roofline_ms"]
    summary = {}
    if "base" not in results:
        return summary
    for variant in results:
        if variant == "base":
            continue
        summary[variant] = {}
        for b in args.batches:
            base, row = results["base"][str(b)], results[variant][str(b)]
            measured = base["tpot_ms"] / row["tpot_ms"]
            ideal = floors["base"][str(b)] / floors[variant][str(b)]
            roofline_ideal = rooflines["base"][str(b)] / rooflines[variant][str(b)]
            summary[variant][str(b)] = {
                "tpot_speedup": measured,
                "ideal_tpot_speedup": ideal,
                "share_of_ideal": measured / ideal,
                "roofline_ideal_tpot_speedup": roofline_ideal,
                "share_of_roofline_ideal": measured / roofline_ideal,
                "throughput_speedup": row["throughput_tok_s"] / base["throughput_tok_s"],
                "ttft_speedup": base["ttft_ms"] / row["ttft_ms"],
                "tpot_over_floor": row["tpot_over_floor"],
            }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (each 1.2 GB of bf16 experts)")
    parser.add_argument(
        "--avg-k",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[1.23, 2.0],
        help="kept experts per token the masks aim at, one BEAM checkpoint each (comma-separated)",
    )
    parser.add_argument(
        "--batches",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 8, 32],
        help="concurrent requests (comma-separated)",
    )
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the variants, interleaved")
    parser.add_argument("--repeats", type=int, default=2, help="repeats per batch size within a round")
    parser.add_argument("--compile", action="store_true", help="let vLLM torch.compile (default: eager)")
    parser.add_argument(
        "--variants",
        default="base,keep-all,beam",
        help="base, keep-all, beam (one per --avg-k), beam-grouped, beam-native (the same with beam-moe's "
        "grouped or native expert backend)",
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/beam-moe-bench-serving"))
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "serving_vllm.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the engine rounds an interrupted run with the same settings wrote to --output",
    )
    parser.add_argument(
        "--paired",
        type=int,
        default=0,
        help="also, in each keep-all engine, this many pairs of decode steps per batch size with its "
        "BEAM runners switched off and on (what BEAM costs, measured in one engine)",
    )
    parser.add_argument(
        "--report", type=Path, help="print a finished result file as a markdown table and exit"
    )
    args = parser.parse_args()
    if args.report is not None:
        print(markdown_table(json.loads(args.report.read_text())))
        return
    if args.output_len < 2:
        parser.error("--output-len must be at least 2 (TPOT is the time after the first token)")
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        print(
            "warning: OMP_WAIT_POLICY=PASSIVE makes every small multi-threaded op in vLLM wait for its "
            "sleeping second thread (~0.3-0.5 ms each on 2 cores); unset it to measure serving",
            file=sys.stderr,
        )

    folders, read = build_checkpoints(args.work, args.layers, args.avg_k, args.batches, args.seed)
    variants = []
    for name in args.variants.split(","):
        if name == "beam" or name in (f"beam-{b}" for b in BEAM_BACKENDS):
            variants += [f"{name}-k{k}" for k in args.avg_k]
        elif name in ("base", "keep-all"):
            variants.append(name)
        else:
            parser.error(f"unknown variant {name!r}; use base, keep-all, beam, beam-grouped, beam-native")
    bandwidth, rates = [copy_bandwidth()], [gemm_rate()]
    generator = torch.Generator().manual_seed(1234)
    samples: dict[str, list] = {v: [] for v in variants}
    startup: dict[str, list] = {v: [] for v in variants}
    document = {
        "benchmark": "vLLM serving at real depth, BEAM vs base and the floor (benchmarks/serving_vllm.py)",
        "command": " ".join([".venv/bin/python benchmarks/serving_vllm.py", *cli_options(args)]),
        "machine": machine(),
        "model": {
            "preset": PRESET,
            "layers": args.layers,
            "vocab": 261,
            "dtype": "bfloat16",
            "note": "real layer sizes, random weights, mask heads calibrated to each target Avg-K",
        },
        "settings": {
            "input_len": args.input_len,
            "output_len": args.output_len,
            "batches": args.batches,
            "repeats": args.repeats,
            "enforce_eager": not args.compile,
            "target_avg_k": args.avg_k,
        },
    }
    if args.resume and args.output.is_file():
        earlier = json.loads(args.output.read_text())
        same = ("input_len", "output_len", "batches", "repeats", "enforce_eager")  # variants go by name
        if any(earlier.get("settings", {}).get(k) != document["settings"][k] for k in same):
            parser.error(f"{args.output} holds a run with other settings; --resume needs the same ones")
        for variant in variants:
            samples[variant] = earlier.get("samples", {}).get(variant, [])[: args.rounds]
            startup[variant] = earlier.get("startup_s", {}).get(variant, [])[: args.rounds]
        bandwidth = [b * 1e9 for b in earlier.get("copy_bandwidth_gb_s", [])] + bandwidth
        rates = [r * 1e9 for r in earlier.get("gemm_gflop_s", [])] + rates
        print(
            f"resuming: {sum(map(len, samples.values()))} engine rounds kept from {args.output}", flush=True
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for round_ in range(args.rounds):
        for variant in variants:
            if len(samples[variant]) > round_:
                continue
            begin = time.perf_counter()
            llm = start_engine(folders[checkpoint_of(variant)], variant, args)
            startup[variant].append(time.perf_counter() - begin)
            try:
                samples[variant].append(measure_round(llm, variant, args, generator))
                if variant == "keep-all" and args.paired:
                    samples[variant][-1]["paired"] = alternate_beam_steps(llm, args, generator)
            finally:
                llm.llm_engine.engine_core.shutdown()
                del llm
                gc.collect()
            print(f"round {round_ + 1}/{args.rounds} {variant}: done", flush=True)
            partial = {
                **document,
                "partial": True,
                "copy_bandwidth_gb_s": [b / 1e9 for b in bandwidth],
                "gemm_gflop_s": [r / 1e9 for r in rates],
                "samples": samples,
                "startup_s": startup,
            }
            args.output.write_text(json.dumps(partial, indent=2) + "\n")
    bandwidth.append(copy_bandwidth())
    rates.append(gemm_rate())
    results = {v: {**summarise(samples[v], args), "startup_s": startup[v]} for v in variants}
    best = max(bandwidth)  # the faster copy gives the lower floor: the stricter comparison
    summary = ratios(results, read, best, max(rates), args)
    paired = [r["paired"] for r in samples.get("keep-all", []) if "paired" in r]
    if paired:
        document["keep_all_paired"] = {
            str(batch): paired_summary([p[str(batch)] for p in paired]) for batch in args.batches
        }
    document.update(
        {
            "copy_bandwidth_gb_s": [b / 1e9 for b in bandwidth],
            "floor_bandwidth_gb_s": best / 1e9,
            "gemm_gflop_s": [r / 1e9 for r in rates],
            "roofline_gemm_gflop_s": max(rates) / 1e9,
            "rounds": args.rounds,
            "summary": summary,
            "results": results,
            "samples": samples,
        }
    )
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(markdown_table(document))


if __name__ == "__main__":
    main()
