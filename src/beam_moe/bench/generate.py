"""A BEAM model against its base in transformers `generate`: the paper's setting (input 128, output 32).

One model is loaded. BEAM runs with its adapter attached; the base is the same model with the
adapter detached (`detach` restores the exact base model) running transformers' own experts
implementations; the adapter is loaded again for the next BEAM round. Variants alternate round
by round so that load from other processes hits them alike; medians over rounds.

Per variant and batch size: time to first token (prefill plus one token), time per output token
after the first, and throughput (generated tokens per second over the whole call), measured in a
single `generate` call by a streamer that stamps every token.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from beam_moe.adapter import load_beam
from beam_moe.attach import beam_stats, detach, get_attachment
from beam_moe.bench.machine import describe_machine
from beam_moe.bench.timing import synchronize
from beam_moe.errors import BeamError
from beam_moe.loading import load_beam_model


class TokenClock:
    """A `generate` streamer that records when each generated token arrives (the first `put` is the prompt)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: list[float] = []
        self.started = time.perf_counter()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        synchronize(self.device)
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def timed_generate(model: nn.Module, input_ids: torch.Tensor, output_len: int) -> dict[str, float]:
    """One greedy generation of exactly `output_len` tokens; seconds to first token, per later token, total."""
    device = input_ids.device
    clock = TokenClock(device)
    synchronize(device)
    clock.started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=output_len,
            min_new_tokens=output_len,
            do_sample=False,
            streamer=clock,
            pad_token_id=0,
        )
    synchronize(device)
    total = time.perf_counter() - clock.started
    generated = out.shape[1] - input_ids.shape[1]
    if generated != output_len or len(clock.stamps) != output_len:
        raise BeamError(
            f"generate produced {generated} tokens ({len(clock.stamps)} stamps), expected {output_len}"
        )
    first = clock.stamps[0] - clock.started
    per_token = (clock.stamps[-1] - clock.stamps[0]) / (output_len - 1) if output_len > 1 else float("nan")
    return {"ttft": first, "tpot": per_token, "total": total}


def bench_generate(
    adapter: str | Path,
    *,
    base: str | Path | None = None,
    input_len: int = 128,
    output_len: int = 32,
    batch_sizes: list[int] | None = None,
    repeats: int = 3,
    base_impls: list[str] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time BEAM and its base in `generate`; returns the result document."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    device = torch.device(device)
    batch_sizes = batch_sizes or [1, 8]
    base_impls = base_impls or ["eager", "grouped_mm"]
    if input_len < 1 or output_len < 2 or repeats < 1:
        raise BeamError("--input-len must be >= 1, --output-len >= 2 and --repeats >= 1")
    unknown = sorted(set(base_impls) - {"eager", "grouped_mm", "batched_mm"})
    if unknown:
        raise BeamError(f"unknown experts implementations {unknown}; use eager, grouped_mm or batched_mm")
    log(f"loading {adapter} ...")
    model = load_beam_model(adapter, base=base, dtype=dtype, device=str(device))
    vocab = model.config.vocab_size
    backend = get_attachment(model).config.backend
    generator = torch.Generator().manual_seed(seed)
    results = []
    for batch in batch_sizes:
        prompts = [
            torch.randint(5, vocab, (batch, input_len), generator=generator).to(device)
            for _ in range(repeats)
        ]
        runs: dict[str, list[dict[str, float]]] = {"beam": [], **{f"base_{impl}": [] for impl in base_impls}}
        avg_k: list[float] = []
        for name in runs:  # warm-up: one short generation per variant
            _variant(model, adapter, name)
            timed_generate(model, prompts[0][:, : min(8, input_len)], 2)
        for r in range(repeats):
            for name in runs:
                _variant(model, adapter, name)
                if name == "beam":
                    with beam_stats(model) as stats:
                        runs[name].append(timed_generate(model, prompts[r], output_len))
                    avg_k.append(stats.avg_k)
                else:
                    runs[name].append(timed_generate(model, prompts[r], output_len))
        _variant(model, adapter, "beam")
        models = {name: _summary(values, batch, output_len) for name, values in runs.items()}
        fastest_base = min((n for n in models if n != "beam"), key=lambda n: models[n]["tpot_ms"])
        b, f = models["beam"], models[fastest_base]
        row = {
            "batch_size": batch,
            "models": models,
            "base": fastest_base,
            "beam_avg_k": round(statistics.mean(avg_k), 4),
            "ttft_speedup": round(f["ttft_ms"] / b["ttft_ms"], 3),
            "tpot_speedup": round(f["tpot_ms"] / b["tpot_ms"], 3),
            "throughput_speedup": round(b["throughput_tok_s"] / f["throughput_tok_s"], 3),
        }
        results.append(row)
        log(
            f"batch {batch}: BEAM TTFT {b['ttft_ms']:.1f} ms, {b['tpot_ms']:.2f} ms/token; {fastest_base} "
            f"TTFT {f['ttft_ms']:.1f} ms, {f['tpot_ms']:.2f} ms/token; per-token speed-up {row['tpot_speedup']:.2f}x"
        )
    machine = describe_machine(device)
    return {
        "adapter": str(adapter),
        "base_model": model.config._name_or_path,
        "model_type": model.config.model_type,
        "moe_layers": len(get_attachment(model).layers),
        "input_len": input_len,
        "output_len": output_len,
        "repeats": repeats,
        "dtype": str(dtype).replace("torch.", ""),
        "backend": backend,
        "device": machine["cpu"] if device.type == "cpu" else machine["gpu"],
        "machine": machine,
        "results": results,
    }


def _variant(model: nn.Module, adapter: str | Path, name: str) -> None:
    """Put the model in the state of variant `name`: "beam" (adapter attached) or "base_<impl>"."""
    from beam_moe.attach import is_attached

    if name == "beam":
        if not is_attached(model):
            load_beam(model, adapter)
        return
    if is_attached(model):
        detach(model)
    model.set_experts_implementation(name.removeprefix("base_"))


def _summary(runs: list[dict[str, float]], batch: int, output_len: int) -> dict[str, float]:
    ttft = statistics.median(r["ttft"] for r in runs)
    tpot = statistics.median(r["tpot"] for r in runs)
    total = statistics.median(r["total"] for r in runs)
    return {
        "ttft_ms": round(ttft * 1e3, 3),
        "tpot_ms": round(tpot * 1e3, 3),
        "total_ms": round(total * 1e3, 3),
        "throughput_tok_s": round(batch * output_len / total, 3),
    }
