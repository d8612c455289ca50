"""Timing that is fair on a shared machine: methods interleaved call by call, medians, device sync."""

from __future__ import annotations

import functools
import random
import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call takes, the device's queued work included."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def interleaved_medians(
    methods: dict[str, Callable[[int], object]],
    device: torch.device,
    *,
    draws: int,
    rounds: int,
    min_rounds: int = 3,
    budget_s: float | None = None,
) -> dict[str, float]:
    """Median seconds per method. Each round calls every method once, in a fresh random order (so
    that no method always follows the same other one), method i on draw (round + i) % draws: calls
    in a round use different inputs (no cache reuse between them), every method cycles through
    every draw, and a burst of load from other processes hits all methods alike. Every method is
    warmed up on every draw first (compilation, caches). Stops early after `min_rounds` once
    `budget_s` seconds are spent."""
    names = list(methods)
    for name in names:
        for draw in range(draws):
            methods[name](draw)
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    shuffle = random.Random(0)
    for r in range(rounds):
        for i in shuffle.sample(range(len(names)), len(names)):
            name, draw = names[i], (r + i) % draws
            times[name].append(time_call(functools.partial(methods[name], draw), device))
        if budget_s is not None and r + 1 >= min_rounds and time.perf_counter() - started > budget_s:
            break
    return {name: statistics.median(values) for name, values in times.items()}
