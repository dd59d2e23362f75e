"""Benchmarks: eager baselines as public code writes them, interleaved timing, the bench runner."""

from .eager import EagerNoiseInjection, eager_add_noise_layernorm, eager_linear_noise, make_eager
from .environment import environment
from .runner import BenchOptions, format_table, run
from .timing import Timing, measure_interleaved

__all__ = ["BenchOptions", "run", "format_table", "environment", "Timing", "measure_interleaved",
           "eager_linear_noise", "eager_add_noise_layernorm", "EagerNoiseInjection", "make_eager"]
