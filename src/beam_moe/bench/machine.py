"""The machine's two ceilings, measured in the same run as the benchmark: memory bandwidth (a large
copy) and the matrix-multiply rate (a large GEMM), plus a description for the result file."""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from beam_moe.bench.timing import time_call


@dataclass
class MachineLimits:
    """copy_gbs: bytes read + written per second by a large copy (the bandwidth of the floor).
    read_gbs: bytes read per second by a large sum (a streaming read; CPUs often read faster than
    they copy, because a copy also reads the destination before writing it).
    gemm_tflops: a large matrix product's rate in the benchmark's dtype."""

    copy_gbs: float
    read_gbs: float
    gemm_tflops: float
    gemm_shape: list[int]

    def to_dict(self) -> dict:
        return asdict(self)


class LimitProbes:
    """The three measurements as callables, so that a benchmark can interleave them with the
    methods it times: on a shared machine the ceilings move with the load, and a floor is only
    comparable with times taken under the same load."""

    def __init__(self, device: torch.device, dtype: torch.dtype, nbytes: int, gemm_size: int) -> None:
        self.nbytes, self.gemm_size = nbytes, gemm_size
        self.src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
        self.dst = torch.empty_like(self.src)
        generator = torch.Generator(device=device).manual_seed(0)
        self.a = torch.randn(gemm_size, gemm_size, device=device, generator=generator).to(dtype)
        self.b = torch.randn(gemm_size, gemm_size, device=device, generator=generator).to(dtype)

    def methods(self) -> dict[str, Callable[[int], object]]:
        return {
            "limit_copy": lambda _: self.dst.copy_(self.src),
            "limit_read": lambda _: self.src.sum(),
            "limit_gemm": lambda _: self.a @ self.b,
        }

    def limits(self, seconds: dict[str, float]) -> MachineLimits:
        n = self.gemm_size
        return MachineLimits(
            copy_gbs=2 * self.nbytes / seconds["limit_copy"] / 1e9,
            read_gbs=self.nbytes / seconds["limit_read"] / 1e9,
            gemm_tflops=2 * n**3 / seconds["limit_gemm"] / 1e12,
            gemm_shape=[n, n, n],
        )


def default_sizes(device: torch.device) -> tuple[int, int]:
    """A 512 MiB copy and a 2048^3 GEMM on the CPU, 1 GiB and 8192^3 on a GPU: far larger than
    any cache, and long enough to time."""
    return ((1 << 30), 8192) if device.type == "cuda" else ((512 << 20), 2048)


def measure_limits(
    device: torch.device,
    dtype: torch.dtype,
    repeats: int = 7,
    nbytes: int | None = None,
    gemm_size: int | None = None,
) -> MachineLimits:
    """Both ceilings, medians of `repeats` (after one warm-up call each)."""
    default_bytes, default_n = default_sizes(device)
    probes = LimitProbes(device, dtype, nbytes or default_bytes, gemm_size or default_n)
    seconds = {}
    for name, fn in probes.methods().items():
        fn(0)
        seconds[name] = statistics.median(time_call(lambda fn=fn: fn(0), device) for _ in range(repeats))
    return probes.limits(seconds)


def describe_machine(device: torch.device) -> dict:
    """What ran the benchmark: enough to tell two result files' machines apart."""
    import transformers

    from beam_moe.native import decode_keep_available

    info = {
        "beam_moe_commit": _commit(),
        "device": str(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_name(),
        "cpu_flags": cpu_flags(),
        "torch_cpu": torch_cpu_support(),
        "beam_native_decode_op": decode_keep_available(),
        "platform": platform.platform(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gb"] = round(props.total_memory / 1e9, 1)
        info["cuda"] = torch.version.cuda
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    return info


GEMM_FLAGS: dict[str, tuple[str, ...]] = {
    "x86_64": (
        "avx2",
        "fma",
        "avx512f",
        "avx512_vnni",
        "avx512_bf16",
        "avx512_fp16",
        "amx_tile",
        "amx_bf16",
        "amx_int8",
        "amx_fp16",
    ),
    "aarch64": ("asimd", "sve", "sve2", "bf16", "i8mm", "sme"),
}
"""CPU flags that change a CPU's GEMM ceiling, by architecture (/proc/cpuinfo names: x86 `flags`,
Arm `Features`): fp32 runs on AVX2/FMA or AVX-512; bf16 on AVX-512 BF16 (VDPBF16PS) or AMX tiles,
several times faster; int8 and fp16 likewise. Two result files are comparable on the same flags."""


def cpu_flags(cpuinfo: str = "/proc/cpuinfo", machine: str | None = None) -> dict[str, bool] | None:
    """Which of this architecture's GEMM_FLAGS the first CPU in `cpuinfo` lists; None where the
    file or the architecture's list is missing."""
    names = GEMM_FLAGS.get(machine or platform.machine())
    if names is None:
        return None
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    present = set(value.split())
                    return {name: name in present for name in names}
    except OSError:
        pass
    return None


def torch_cpu_support() -> dict[str, str | bool]:
    """What torch itself detects (its choice of CPU kernels, and vLLM's choice of AMX kernels,
    follow these): the capability its kernels were dispatched for, and its feature probes."""
    support: dict[str, str | bool] = {"capability": torch.backends.cpu.get_cpu_capability()}
    for name in ("avx2", "avx512", "avx512_bf16", "vnni", "amx_tile", "amx_fp16"):
        probe = getattr(torch.cpu, f"_is_{name}_supported", None)
        if probe is not None:
            support[name] = bool(probe())
    return support


def _commit() -> str | None:
    """The git commit of the beam_moe source that ran (None outside a git checkout)."""
    import subprocess
    from pathlib import Path

    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
