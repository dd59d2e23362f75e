"""Timing that holds up on noisy machines: warm-up, device sync, interleaved rounds, medians, and
speed-up ratios taken round by round (each competitor is timed right next to the baseline).

On CUDA each call is timed with CUDA events around the call alone (no host round trip in the
measurement), after the L2 cache has been flushed by writing a buffer twice its size, so that a
memory-bound kernel of ~50 us reads its inputs from HBM as it would inside a model step; on CPU with
``time.perf_counter``."""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Timing", "measure_interleaved"]


@dataclass
class Timing:
    """Per-call times of one competitor, in seconds."""

    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def quartiles(self) -> tuple[float, float]:
        """First and third quartile of the times (the minimum and maximum for fewer than 4 times): the
        interquartile range that the plots draw as error bars."""
        if len(self.times) < 4:
            return min(self.times), max(self.times)
        q = statistics.quantiles(self.times, n=4)
        return q[0], q[2]

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median (0.05 = 5%)."""
        q1, q3 = self.quartiles
        return (q3 - q1) / self.median

    def ratio_to(self, baseline: Timing) -> float:
        """Median over rounds of ``baseline / self``: the speed-up of this competitor over ``baseline``."""
        return statistics.median(b / s for b, s in zip(baseline.times, self.times))


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def l2_flush_buffer(device: torch.device) -> torch.Tensor:
    """A CUDA buffer twice the device's L2 cache (at least 64 MiB): zero-filling it evicts the L2."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (50 << 20)
    return torch.empty(max(2 * l2, 64 << 20) // 4, dtype=torch.float32, device=device)


def measure_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int = 2, iters: int = 10,
                        device: torch.device | None = None, flush_l2: bool = True) -> dict[str, Timing]:
    """Time each callable ``iters`` times, interleaved: every round calls each once, in an order shuffled
    every round (seeded, so a run is repeatable), so that machine noise hits all competitors alike and
    each follows each other about equally often; ``warmup`` untimed rounds first.  (A call that follows
    one which evicted the caches runs slower at cache-resident sizes: with the order only rotated, the
    competitor listed after the eager dense path followed it in all but one round of ``len(fns)``, and
    the one listed after it always found the inputs just read.)

    On a CUDA ``device`` the time of a call is the CUDA-event time of the call alone, with the L2 flushed
    before it (``flush_l2``; turn it off for callables that are not memory-bound or that span many
    kernels whose inputs would be cached in a real step)."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    _sync(device)
    cuda = device is not None and device.type == "cuda"
    flush = l2_flush_buffer(device) if cuda and flush_l2 else None
    times: dict[str, list[float]] = {n: [] for n in names}
    rng = random.Random(0)
    for _ in range(iters):
        order = rng.sample(names, len(names))
        events = []
        for n in order:
            if cuda:
                if flush is not None:
                    flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[n]()
                end.record()
                events.append((n, start, end))
                continue
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
        if cuda:
            torch.cuda.synchronize(device)
            for n, start, end in events:
                times[n].append(start.elapsed_time(end) / 1e3)
    return {n: Timing(t) for n, t in times.items()}
