"""How many CPU threads torch uses when other work shares the machine.

torch starts one OpenMP thread per core, and OpenMP's default wait policy keeps idle threads
spinning. Beside one other busy process, every parallel region then waits for a descheduled thread:
a 2-thread training step of the reference MoE took 70 s instead of 1.5-5 s on 2 cores
(benchmarks/results/contention/). The `beam-moe` command therefore

1. sets `OMP_WAIT_POLICY=PASSIVE` before torch is imported, unless the environment already sets it
   (`prepare_environment`): waiting threads sleep instead of taking a core from the other process;
2. uses the cores the other processes leave free (`govern`), and looks again every few seconds
   while a long loop runs (`tick`, called once per step): one thread beside a busy neighbour, all
   of them when it has gone. `--threads N` fixes the count instead.

Only the command does this; `import beam_moe` leaves the process's threads alone.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

WAIT_POLICY = "OMP_WAIT_POLICY"
PROBE_S = 0.1
RECHECK_S = 5.0


_policy_set_here = False


def prepare_environment() -> None:
    """OpenMP reads its wait policy once, when torch loads it: call this before importing torch."""
    global _policy_set_here
    if WAIT_POLICY not in os.environ:
        os.environ[WAIT_POLICY] = "PASSIVE"
        _policy_set_here = True


def leave_to_the_engine() -> None:
    """For a command whose engine places its own threads (`beam-moe serve`: vLLM binds one per
    core): its processes do not inherit the wait policy set here."""
    global _policy_set_here
    if _policy_set_here:
        os.environ.pop(WAIT_POLICY, None)
        _policy_set_here = False


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (containers)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


class CpuLoad:
    """How many of this process's cores other processes kept busy since the last look.

    From the per-core counters of /proc/stat (only the cores this process may use) minus this
    process's own CPU time; None where /proc/stat is not readable (not Linux).
    """

    def __init__(self) -> None:
        self._cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._last = self._read()

    def _read(self) -> tuple[float, float, float] | None:
        try:
            lines = Path("/proc/stat").read_text().splitlines()
        except OSError:
            return None
        wanted = {f"cpu{c}" for c in self._cores}
        busy = 0
        for line in lines:
            fields = line.split()
            if fields and fields[0] in wanted:
                user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
                busy += user + nice + system + irq + softirq + steal
        return busy / self._tick, time.process_time(), time.monotonic()

    def others_busy(self) -> float | None:
        now = self._read()
        last, self._last = self._last, now
        if now is None or last is None or now[2] - last[2] <= 0:
            return None
        busy, own, wall = (a - b for a, b in zip(now, last, strict=True))
        return max(0.0, (busy - own) / wall)


def threads_for(cores: int, others_busy: float) -> int:
    """All the cores the others leave free, at least one."""
    return min(cores, max(1, round(cores - others_busy)))


class ThreadGovernor:
    """Sets torch's thread count from the free cores, now and at most every `recheck_s` seconds.

    A count below all the cores, and any later change, is said on stderr, but only once a long
    loop runs (`tick`): a command that stops at a bad argument prints its one-line error alone.
    """

    def __init__(self, cores: int | None = None, recheck_s: float = RECHECK_S, verbose: bool = True) -> None:
        import torch

        self._torch = torch
        self.cores = cores or usable_cores()
        self.recheck_s = recheck_s
        self.verbose = verbose
        self.load = CpuLoad()
        time.sleep(PROBE_S)
        self.threads = torch.get_num_threads()
        self._pending: str | None = None
        self._started = False
        self._update()
        self._started = True

    def tick(self) -> None:
        if time.monotonic() >= self._next:
            self._update()
        if self._pending is not None:
            if self.verbose:
                print(self._pending, file=sys.stderr)
            self._pending = None

    def _update(self) -> None:
        self._next = time.monotonic() + self.recheck_s
        others = self.load.others_busy()
        threads = self.cores if others is None else threads_for(self.cores, others)
        if threads == self.threads:
            return
        self._torch.set_num_threads(threads)
        self.threads = threads
        if self._started or threads < self.cores:
            busy = "" if others is None else f"other processes busy on {others:.1f} of {self.cores} cores: "
            self._pending = f"beam-moe: {busy}{threads} torch thread(s) (--threads N fixes the count)"


_governor: ThreadGovernor | None = None
_before: int | None = None


def govern(threads: int | None) -> None:
    """`threads` fixed, or None: follow the free cores (see the module docstring)."""
    global _governor, _before
    import torch

    _before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
        _governor = None
    else:
        _governor = ThreadGovernor()


def tick() -> None:
    """Called once per step by long loops; a no-op unless the command follows the free cores."""
    if _governor is not None:
        _governor.tick()


def release() -> None:
    """Stop following the free cores and restore the thread count from before `govern`."""
    global _governor, _before
    _governor = None
    if _before is not None:
        import torch

        torch.set_num_threads(_before)
        _before = None
