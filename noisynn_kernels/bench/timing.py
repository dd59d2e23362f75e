"""Timing that holds up on noisy machines: warm-up, device sync, interleaved rounds, medians, and
speed-up ratios taken round by round (each competitor is timed right next to the baseline)."""

from __future__ import annotations

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
    def spread(self) -> float:
        """Interquartile range relative to the median (0.05 = 5%)."""
        if len(self.times) < 4:
            return (max(self.times) - min(self.times)) / self.median
        q = statistics.quantiles(self.times, n=4)
        return (q[2] - q[0]) / self.median

    def ratio_to(self, baseline: Timing) -> float:
        """Median over rounds of ``baseline / self``: the speed-up of this competitor over ``baseline``."""
        return statistics.median(b / s for b, s in zip(baseline.times, self.times))


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int = 2, iters: int = 10,
                        device: torch.device | None = None) -> dict[str, Timing]:
    """Time each callable ``iters`` times, interleaved round-robin (order rotated every round) so that
    machine noise hits all competitors alike; ``warmup`` untimed rounds first."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    _sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(iters):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            _sync(device)
            t0 = time.perf_counter()
            fns[n]()
            _sync(device)
            times[n].append(time.perf_counter() - t0)
    return {n: Timing(t) for n, t in times.items()}
