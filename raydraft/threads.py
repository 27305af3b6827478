"""Torch threads that follow the cores this process can actually use.

On a machine shared with other work (a laptop), intra-op threads that outnumber the free
cores wait for each other at every parallel region: with one of two cores kept busy by
another program, two torch threads ran the default's iteration 3.6× slower than on an idle
machine, where one thread alone costs about 1.5×. `CoreShare` measures, while this process
computes, how much of its cores everything else kept busy (other programs, and this run's
other roles when they compute at the same time), and sets torch's thread count for the
next piece of work to the cores left over.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

# A core counts as free when the others leave at least this much of it: two threads on a
# core that another busy process takes half of are slower than one thread.
FREE_CORE_SHARE = 0.6
FIRST_SAMPLE_S = 0.1  # the measurement before the first piece of work


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def threads_for(free_cores: float, limit: int) -> int:
    """The thread count for `free_cores` (fractional: what the others left): one per core
    of which at least FREE_CORE_SHARE is free, at least 1, at most `limit`."""
    return max(1, min(limit, int(free_cores + 1 - FREE_CORE_SHARE)))


def _busy_ticks(cores: set[int]) -> tuple[int, int] | None:
    """(busy, total) clock ticks of `cores` since boot, from /proc/stat; None off Linux."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    busy = total = 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cores:
            continue
        ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
        idle = ticks[3] + ticks[4]
        busy += sum(ticks) - idle
        total += sum(ticks)
    return busy, total


def own_stat() -> list[str]:
    """This process's /proc/self/stat fields from the third (state) on: the command name
    before them may hold spaces. Linux only (OSError elsewhere)."""
    return Path("/proc/self/stat").read_text().rpartition(")")[2].split()


def _own_ticks() -> int:
    """Clock ticks this process (all its threads) has run, user and system."""
    fields = own_stat()
    return int(fields[11]) + int(fields[12])  # utime, stime


class CoreShare:
    """Sets torch's intra-op threads, before each piece of work, to the cores that the
    others left free during the previous one: at least 1, at most `limit` (default all
    usable cores). `limit` alone without `adapt`, or where /proc is not there to measure."""

    @classmethod
    def for_setting(cls, torch_threads: int | None) -> CoreShare:
        """The config's `torch_threads`: a fixed count, or None to follow the free cores."""
        return cls(torch_threads, adapt=torch_threads is None)

    def __init__(self, limit: int | None = None, adapt: bool = True) -> None:
        self.cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.limit = min(limit or usable_cores(), usable_cores())
        self.measurable = adapt and bool(self.cores) and _busy_ticks(set(self.cores)) is not None
        self.threads = self.limit
        self.others = 0.0  # cores the others kept busy during the last measurement
        if self.measurable:
            start = self._sample()
            time.sleep(FIRST_SAMPLE_S)
            self._settle(start)
        torch.set_num_threads(self.threads)

    def _sample(self) -> tuple[int, int, int]:
        busy, total = _busy_ticks(set(self.cores))  # type: ignore[misc]
        return busy, total, _own_ticks()

    def _settle(self, start: tuple[int, int, int]) -> None:
        busy, total, own = (b - a for a, b in zip(start, self._sample(), strict=True))
        if total <= 0:
            return
        wall = total / len(self.cores)  # ticks of one core over the interval
        self.others = max(0.0, (busy - own) / wall)
        self.threads = threads_for(len(self.cores) - self.others, self.limit)

    @contextmanager
    def working(self) -> Iterator[int]:
        """Run a piece of work at the current thread count (yielded) and measure the
        others meanwhile, for the next one."""
        torch.set_num_threads(self.threads)
        if not self.measurable:
            yield self.threads
            return
        start = self._sample()
        try:
            yield self.threads
        finally:
            self._settle(start)
