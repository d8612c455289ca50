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
    gemm_tflops: the faster of a large matrix product's rate in the benchmark's dtype and in
    float32. A CPU without bf16 arithmetic (AVX2 only) runs torch's bf16 GEMM 30-50x below its
    float32 GEMM, while a kernel that widens bf16 to float32 as it loads reaches the float32 rate:
    the ceiling is what the hardware allows, not what one library kernel does.
    gemm_shape: the square size of the dtype's probe (float32's is in fp32_gemm_shape)."""

    copy_gbs: float
    read_gbs: float
    gemm_tflops: float
    gemm_shape: list[int]
    dtype_gemm_tflops: float | None = None
    fp32_gemm_shape: list[int] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class LimitProbes:
    """The three measurements as callables, so that a benchmark can interleave them with the
    methods it times: on a shared machine the ceilings move with the load, and a floor is only
    comparable with times taken under the same load."""

    def __init__(self, device: torch.device, dtype: torch.dtype, nbytes: int, gemm_size: int) -> None:
        self.nbytes = nbytes
        self.src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
        self.dst = torch.empty_like(self.src)
        generator = torch.Generator(device=device).manual_seed(0)
        self.gemms = {"limit_gemm": _gemm_operands(gemm_size, dtype, device, generator)}
        if dtype != torch.float32:
            self.gemms["limit_gemm_fp32"] = _gemm_operands(gemm_size, torch.float32, device, generator)

    def methods(self) -> dict[str, Callable[[int], object]]:
        probes: dict[str, Callable[[int], object]] = {
            "limit_copy": lambda _: self.dst.copy_(self.src),
            "limit_read": lambda _: self.src.sum(),
        }
        for name, (a, b) in self.gemms.items():
            probes[name] = lambda _, a=a, b=b: a @ b
        return probes

    def limits(self, seconds: dict[str, float]) -> MachineLimits:
        rates = {name: 2 * a.shape[0] ** 3 / seconds[name] / 1e12 for name, (a, _) in self.gemms.items()}
        n = self.gemms["limit_gemm"][0].shape[0]
        fp32 = self.gemms.get("limit_gemm_fp32")
        return MachineLimits(
            copy_gbs=2 * self.nbytes / seconds["limit_copy"] / 1e9,
            read_gbs=self.nbytes / seconds["limit_read"] / 1e9,
            gemm_tflops=max(rates.values()),
            gemm_shape=[n, n, n],
            dtype_gemm_tflops=rates["limit_gemm"],
            fp32_gemm_shape=[fp32[0].shape[0]] * 3 if fp32 is not None else None,
        )


GEMM_PROBE_SECONDS = 0.05
"""A GEMM probe call lasts about this long: long enough to time, and short enough that a dtype the
CPU has no arithmetic for (torch's bf16 GEMM on AVX2: about 1 GFLOP/s, 15 s at 2048^3) does not
stall the benchmark for minutes."""


def _gemm_operands(
    largest: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two square matrices of the largest size up to `largest` (a multiple of 128, at least 128)
    whose product takes about GEMM_PROBE_SECONDS here, from a trial product at 128."""
    n = min(largest, 128)
    a = torch.randn(n, n, device=device, generator=generator).to(dtype)
    a @ a
    trial = statistics.median(time_call(lambda: a @ a, device) for _ in range(3))
    scale = (GEMM_PROBE_SECONDS / max(trial, 1e-9)) ** (1 / 3)
    n = max(n, min(largest, int(n * scale) // 128 * 128))
    a = torch.randn(n, n, device=device, generator=generator).to(dtype)
    b = torch.randn(n, n, device=device, generator=generator).to(dtype)
    return a, b


def default_sizes(device: torch.device) -> tuple[int, int]:
    """A 512 MiB copy and GEMMs of up to 2048^3 on the CPU, 1 GiB and up to 8192^3 on a GPU: far
    larger than any cache, and long enough to time (each GEMM sized to about GEMM_PROBE_SECONDS)."""
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

    from beam_moe.native import available as native_available

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
        "beam_native_ops": native_available(),
        "platform": platform.platform(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
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
