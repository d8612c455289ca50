"""One MoE layer at a preset's real sizes: BEAM against transformers, and against the hardware floor.

Per token count T, in one process and interleaved call by call (see `timing.interleaved_medians`):
- transformers' own experts implementations (eager, grouped_mm, batched_mm) at Top-K: the block's
  forward (router + experts) as a user runs it today; the fastest is the baseline;
- BEAM at Top-K with every expert kept (the mask head, masked routing and the BEAM backend);
- BEAM with masks that keep exactly round(avg_k * T) pairs.
Each draw is fresh random hidden states (so fresh routing) and a fresh mask; calls rotate over the
draws, so back-to-back calls read different experts and caches do not flatter anyone. The mask is
the draw's mask head's own decision: each draw gets a head fitted to its random mask (`fit_head`),
so BEAM runs exactly the path it serves with (a head, its decision, the masked experts).

The floor for a draw is the larger of (bytes of the expert weights that must be read, plus the
activations) / copy bandwidth and (FLOPs of the kept pairs) / GEMM rate. Both ceilings are
measured in the same rounds as the methods (`machine.LimitProbes`: a large copy, a large read,
GEMMs in the dtype and in float32, interleaved call by call), so that on a shared machine the floor sees the same load. Decode is memory-bound, so its floor follows
the number of distinct experts the kept pairs touch.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from beam_moe.bench.machine import LimitProbes, MachineLimits, default_sizes, describe_machine
from beam_moe.bench.synthetic import (
    INIT_STD,
    block_sharing_weights,
    preset_config,
    random_block,
    with_experts_implementation,
)
from beam_moe.bench.timing import interleaved_medians
from beam_moe.config import BeamConfig
from beam_moe.errors import BeamError
from beam_moe.experts import get_backend
from beam_moe.families import family_for
from beam_moe.layer import BeamMoELayer
from beam_moe.mask import MaskHead
from beam_moe.presets import MoEPreset
from beam_moe.stats import BeamStats

HF_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")


@dataclass
class Draw:
    """One random input: hidden states [1, T, H] (on the device), the router's Top-K ids and a mask
    over them (on the CPU, for the floor), and a mask head whose decision on this input is that mask."""

    hidden: Tensor
    ids: Tensor
    keep: Tensor
    head: MaskHead


FIT_MARGIN = 4.0
"""|z| of a fitted head's logits at the Top-K slots: sigmoid(4) = 0.98, far from the threshold."""


def fit_head(head: MaskHead, hidden: Tensor, ids: Tensor, keep: Tensor) -> None:
    """Set `head` (float32 [E, H], fresh) so that its decision on hidden [T, H] at ids [T, K] is `keep`:
    for each expert, the least-norm row w with x_t . w = +margin where a token keeps it and -margin
    where it drops it (exact while an expert has fewer routed tokens than H, i.e. any T * K < E * H).
    Rows of experts no token routes to stay 0."""
    x = hidden.reshape(-1, head.in_features).to(torch.float64).cpu()
    ids, keep = ids.cpu(), keep.cpu()
    weight = torch.zeros(head.out_features, head.in_features, dtype=torch.float64)
    for expert in torch.unique(ids).tolist():
        tokens, slots = (ids == expert).nonzero(as_tuple=True)
        if tokens.numel() >= head.in_features:
            raise BeamError(
                f"{tokens.numel()} tokens route to expert {expert}, too many to fit a mask head of width "
                f"{head.in_features} to a random mask; bench fewer --tokens"
            )
        target = torch.where(keep[tokens, slots], FIT_MARGIN, -FIT_MARGIN).to(torch.float64)
        rows = x[tokens]
        weight[expert] = rows.T @ torch.linalg.solve(rows @ rows.T, target)
    with torch.no_grad():
        head.weight.copy_(weight.to(head.weight.dtype))


def exact_keep(num_tokens: int, top_k: int, kept: int, generator: torch.Generator) -> Tensor:
    """A [T, K] mask with exactly `kept` True entries, at uniformly random (token, slot) positions."""
    flat = torch.zeros(num_tokens * top_k, dtype=torch.bool)
    flat[torch.randperm(num_tokens * top_k, generator=generator)[:kept]] = True
    return flat.view(num_tokens, top_k)


@dataclass(frozen=True)
class LayerShape:
    """What a floor needs: bytes per routed expert and per token, FLOPs per pair and per token."""

    hidden_size: int
    expert_bytes: int
    expert_flops: int
    shared_bytes: int
    shared_flops: int
    element_size: int

    @classmethod
    def of(cls, preset: MoEPreset, dtype: torch.dtype) -> LayerShape:
        size = torch.empty((), dtype=dtype).element_size()
        h, i, s = preset.hidden_size, preset.expert_intermediate, preset.shared_intermediate
        return cls(
            hidden_size=h,
            expert_bytes=3 * h * i * size,
            expert_flops=2 * 3 * h * i,
            shared_bytes=3 * h * s * size,
            shared_flops=2 * 3 * h * s,
            element_size=size,
        )

    def floor(self, tokens: int, pairs: int, experts: int, limits: MachineLimits) -> dict[str, float]:
        """Seconds: bytes over the copy bandwidth (and over the read bandwidth), FLOPs over the GEMM rate."""
        moved = (
            experts * self.expert_bytes
            + self.shared_bytes
            + 2 * tokens * self.hidden_size * self.element_size
        )
        flops = pairs * self.expert_flops + tokens * self.shared_flops
        bytes_s = moved / (limits.copy_gbs * 1e9)
        flops_s = flops / (limits.gemm_tflops * 1e12)
        return {
            "floor": max(bytes_s, flops_s),
            "bytes": bytes_s,
            "flops": flops_s,
            "read_floor": max(moved / (limits.read_gbs * 1e9), flops_s),
        }


@dataclass
class Slot:
    """The blocks of one draw: transformers' (one per experts implementation) and BEAM's."""

    hf_blocks: dict[str, nn.Module]
    beam_block: nn.Module
    layer: BeamMoELayer
    fresh_head: MaskHead


class LayerBench:
    """The blocks under test. All share one set of random expert weights; each of the `slots`
    draws has its own router and mask head, as each layer of a real model has, so that a router
    or a head is not still in the cache from the previous call."""

    def __init__(
        self, preset: MoEPreset, dtype: torch.dtype, device: torch.device, backend: str, seed: int, slots: int
    ) -> None:
        self.preset = preset
        self.device = device
        config = preset_config(preset, num_layers=1)
        skeleton, self.source = random_block(config, dtype, device, seed)
        self.family = family_for(skeleton)
        router_weight = f"{self.family.router_attr}.weight"
        generator = torch.Generator(device=device).manual_seed(seed + 1)
        self.slots: list[Slot] = []
        for _ in range(slots):
            router = torch.empty_like(self.source.get_parameter(router_weight))
            own = {router_weight: nn.Parameter(router.normal_(0.0, INIT_STD, generator=generator), False)}
            hf_blocks = {
                name: block_sharing_weights(
                    self.source, with_experts_implementation(config, name), own
                ).eval()
                for name in HF_IMPLEMENTATIONS
            }
            beam_block = block_sharing_weights(self.source, config, own).eval()
            layer = BeamMoELayer(0, "moe", beam_block, self.family, BeamConfig(backend=backend), [])
            fresh_head = MaskHead(preset.hidden_size, preset.num_experts, device=device).eval()
            layer.install(fresh_head)
            self.slots.append(Slot(hf_blocks, beam_block, layer, fresh_head))

    def draw(self, slot: int, tokens: int, kept: int, generator: torch.Generator, dtype: torch.dtype) -> Draw:
        hidden = (
            torch.randn(1, tokens, self.preset.hidden_size, generator=generator).to(dtype).to(self.device)
        )
        router = self.family.router(self.slots[slot].hf_blocks["eager"])  # same weights, no BEAM hook
        with torch.inference_mode():
            ids = router(hidden.view(tokens, -1))[2].cpu()
        keep = exact_keep(tokens, self.preset.top_k, kept, generator)
        head = MaskHead(self.preset.hidden_size, self.preset.num_experts, device=self.device).eval()
        fit_head(head, hidden, ids, keep)
        return Draw(hidden, ids, keep, head)

    def run_hf(self, name: str, slot: int, draw: Draw) -> Tensor:
        return self.slots[slot].hf_blocks[name](draw.hidden)

    def run_beam(self, slot: int, draw: Draw, masked: bool = True) -> Tensor:
        """The BEAM block on `draw`: with `masked`, under the draw's fitted head (its decision is the
        draw's mask); otherwise under the slot's fresh head, which keeps every expert."""
        self.slots[slot].layer.head = draw.head if masked else self.slots[slot].fresh_head
        return self.slots[slot].beam_block(draw.hidden)

    def rows_computed(self, slot: int, draw: Draw) -> int:
        layer = self.slots[slot].layer
        stats = BeamStats(["moe"], [self.preset.top_k])
        layer.sinks.append(stats)
        try:
            with torch.inference_mode():
                self.run_beam(slot, draw)
        finally:
            layer.sinks.remove(stats)
        return stats.computed_rows

    def set_backend(self, name: str) -> None:
        for slot in self.slots:
            slot.layer.config = BeamConfig(backend=name)


def _sig(value: float, digits: int = 5) -> float:
    """`value` to `digits` significant digits (times span microseconds to seconds)."""
    return float(f"{value:.{digits}g}")


def _max_relative_error(out: Tensor, ref: Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def bench_layer(
    preset: MoEPreset,
    tokens: list[int],
    avg_k: float,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    backend: str = "auto",
    compare_backends: list[str] | None = None,
    draws: int = 8,
    rounds: int = 30,
    budget_s: float = 30.0,
    max_gather_gb: float = 2.0,
    seed: int = 0,
    probe_sizes: tuple[int, int] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure one MoE layer of `preset` at each token count; returns the result document.

    `probe_sizes` (copy bytes, GEMM size) of the ceiling measurements default to
    `machine.default_sizes` (tests pass small ones)."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    device = torch.device(device)
    if not 0 < avg_k <= preset.top_k:
        raise BeamError(
            f"--avg-k must lie in (0, {preset.top_k}] for {preset.name} (Top-{preset.top_k}), got {avg_k}"
        )
    if not tokens or any(t < 1 for t in tokens):
        raise BeamError(f"--tokens must be positive integers, got {tokens}")
    if draws < 1 or rounds < 1:
        raise BeamError("--draws and --rounds must be at least 1")
    get_backend(backend, device)
    for name in compare_backends or []:
        get_backend(name, device)
    machine = describe_machine(device)
    probes = LimitProbes(device, dtype, *(probe_sizes or default_sizes(device)))
    log(f"building {preset.name} layer with random weights ...")
    bench = LayerBench(preset, dtype, device, backend, seed, slots=draws)
    shape = LayerShape.of(preset, dtype)
    generator = torch.Generator().manual_seed(seed + 2)
    results = []
    for t in tokens:
        kept = round(avg_k * t)
        samples = [bench.draw(d, t, kept, generator, dtype) for d in range(draws)]
        results.append(
            _bench_tokens(
                bench,
                shape,
                probes,
                samples,
                t,
                kept,
                compare_backends or [],
                rounds,
                budget_s,
                max_gather_gb,
            )
        )
        row = results[-1]
        log(
            f"T={t:4d} kept={kept:4d}  hf {row['hf_topk_ms']:.3f} ms ({row['hf_impl']})  beam keep-all "
            f"{row['beam_keepall_ms']:.3f}  beam {row['beam_ms']:.3f}  floor {row['floor_ms']:.3f}  "
            f"speed-up {row['speedup_vs_hf']:.2f}x (ideal {row['ideal_speedup']:.2f}x)  "
            f"[copy {row['limits']['copy_gbs']:.1f} GB/s, GEMM {row['limits']['gemm_tflops'] * 1e3:.0f} GFLOP/s]"
        )
    machine["load_average_end"] = describe_machine(device).get("load_average")
    return {
        "preset": preset.name,
        "avg_k": avg_k,
        "device": machine["cpu"] if device.type == "cpu" else machine["gpu"],
        "dtype": str(dtype).replace("torch.", ""),
        "backend": backend,
        "draws": draws,
        "machine": machine,
        "limits": {
            key: statistics.median(r["limits"][key] for r in results)
            for key in ("copy_gbs", "read_gbs", "gemm_tflops")
        },
        "layer": preset.to_dict(),
        "results": results,
    }


def _bench_tokens(
    bench: LayerBench,
    shape: LayerShape,
    probes: LimitProbes,
    samples: list[Draw],
    tokens: int,
    kept: int,
    compare_backends: list[str],
    rounds: int,
    budget_s: float,
    max_gather_gb: float,
) -> dict[str, Any]:
    top_k = bench.preset.top_k
    skipped: dict[str, str] = {}
    methods: dict[str, Callable[[int], object]] = {}
    for name in HF_IMPLEMENTATIONS:
        gathered = tokens * top_k * shape.expert_bytes / 1e9
        if name == "batched_mm" and gathered > max_gather_gb:
            skipped[name] = (
                f"gathers {gathered:.1f} GB of expert weights (over --max-gather-gb {max_gather_gb})"
            )
            continue
        methods[f"hf_{name}"] = lambda d, name=name: bench.run_hf(name, d, samples[d])
    methods["beam_keepall"] = lambda d: bench.run_beam(d, samples[d], masked=False)
    methods["beam"] = lambda d: bench.run_beam(d, samples[d])
    main_backend = bench.slots[0].layer.config.backend
    for name in compare_backends:

        def run(d: int, name: str = name) -> Tensor:
            bench.set_backend(name)
            try:
                return bench.run_beam(d, samples[d])
            finally:
                bench.set_backend(main_backend)

        methods[f"beam_{name}"] = run
    methods.update(probes.methods())

    with torch.inference_mode():
        for d, sample in enumerate(samples):
            bench.run_beam(d, sample)
            if not torch.equal(bench.slots[d].layer.last_keep.cpu(), sample.keep):
                raise BeamError(f"the mask head fitted to draw {d} does not decide the draw's mask")
        reference = bench.run_hf("eager", 0, samples[0])
        checks = {
            "keepall_rel_err_vs_hf": _max_relative_error(
                bench.run_beam(0, samples[0], masked=False), reference
            ),
            "rows_computed": bench.rows_computed(0, samples[0]),
        }
        medians = interleaved_medians(
            methods, bench.device, draws=len(samples), rounds=rounds, budget_s=budget_s
        )
    if checks["rows_computed"] != kept:
        raise BeamError(f"BEAM computed {checks['rows_computed']} rows for {kept} kept pairs")
    limits = probes.limits(medians)
    hf_ms = {name: medians[f"hf_{name}"] * 1e3 for name in HF_IMPLEMENTATIONS if f"hf_{name}" in medians}
    hf_impl = min(hf_ms, key=hf_ms.__getitem__)
    floors = [shape.floor(tokens, kept, int(torch.unique(s.ids[s.keep]).numel()), limits) for s in samples]
    topk_floors = [
        shape.floor(tokens, tokens * top_k, int(torch.unique(s.ids).numel()), limits) for s in samples
    ]
    floor_ms = statistics.median(f["floor"] for f in floors) * 1e3
    floor_topk_ms = statistics.median(f["floor"] for f in topk_floors) * 1e3
    beam_ms = medians["beam"] * 1e3
    row: dict[str, Any] = {
        "tokens": tokens,
        "kept_pairs": kept,
        "hf_topk_ms": _sig(hf_ms[hf_impl]),
        "hf_impl": hf_impl,
        "beam_keepall_ms": _sig(medians["beam_keepall"] * 1e3),
        "beam_ms": _sig(beam_ms),
        "floor_ms": _sig(floor_ms),
        "speedup_vs_hf": _sig(hf_ms[hf_impl] / beam_ms),
        "ideal_speedup": _sig(floor_topk_ms / floor_ms),
        "fraction_of_floor": _sig(beam_ms / floor_ms),
        "keepall_vs_hf": _sig(medians["beam_keepall"] * 1e3 / hf_ms[hf_impl]),
        "hf_ms": {name: _sig(v) for name, v in hf_ms.items()},
        "hf_skipped": skipped,
        "floor_topk_ms": _sig(floor_topk_ms),
        "floor_bytes_ms": _sig(statistics.median(f["bytes"] for f in floors) * 1e3),
        "floor_flops_ms": _sig(statistics.median(f["flops"] for f in floors) * 1e3),
        "floor_read_bw_ms": _sig(statistics.median(f["read_floor"] for f in floors) * 1e3),
        "experts_read_topk": statistics.median(int(torch.unique(s.ids).numel()) for s in samples),
        "experts_read_beam": statistics.median(int(torch.unique(s.ids[s.keep]).numel()) for s in samples),
        "limits": limits.to_dict(),
        **checks,
    }
    for name in compare_backends:
        row[f"beam_{name}_ms"] = _sig(medians[f"beam_{name}"] * 1e3)
    return row


def parse_tokens(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BeamError(f"--tokens must be a comma-separated list of integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise BeamError(f"--tokens must be positive integers, got {text!r}")
    return values


__all__ = ["HF_IMPLEMENTATIONS", "LayerBench", "LayerShape", "bench_layer", "exact_keep", "parse_tokens"]
