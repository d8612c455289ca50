"""The machine's two ceilings, measured in the same run as the benchmark: memory bandwidth (a large
copy) and the matrix-multiply rate (a large GEMM), plus a description for the result file."""

from __future__ import annotations

import os
import platform
import statistics
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


def _median_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()
    return statistics.median(time_call(fn, device) for _ in range(repeats))


def measure_limits(
    device: torch.device,
    dtype: torch.dtype,
    repeats: int = 7,
    nbytes: int | None = None,
    gemm_size: int | None = None,
) -> MachineLimits:
    """Both ceilings; the defaults (a 512 MiB copy and a 2048^3 GEMM on the CPU, 1 GiB and 8192^3
    on a GPU) are far larger than any cache and long enough to time."""
    nbytes = nbytes or ((1 << 30) if device.type == "cuda" else (512 << 20))
    copy_s, read_s = _stream_seconds(nbytes, device, repeats)
    n = gemm_size or (8192 if device.type == "cuda" else 2048)
    gemm_s = _gemm_seconds(n, device, dtype, repeats)
    return MachineLimits(
        copy_gbs=2 * nbytes / copy_s / 1e9,
        read_gbs=nbytes / read_s / 1e9,
        gemm_tflops=2 * n**3 / gemm_s / 1e12,
        gemm_shape=[n, n, n],
    )


def _stream_seconds(nbytes: int, device: torch.device, repeats: int) -> tuple[float, float]:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return (
        _median_seconds(lambda: dst.copy_(src), device, repeats),
        _median_seconds(lambda: src.sum(), device, repeats),
    )


def _gemm_seconds(n: int, device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=generator).to(dtype)
    b = torch.randn(n, n, device=device, generator=generator).to(dtype)
    return _median_seconds(lambda: a @ b, device, repeats)


def describe_machine(device: torch.device) -> dict:
    """What ran the benchmark: enough to tell two result files' machines apart."""
    import transformers

    info = {
        "device": str(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_name(),
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


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
