"""Mixing kind and axis codes as Triton constexprs, shared by the Triton kernels; the values are the
op-schema codes of :mod:`noisynn_kernels._op_codes` (the C++ and CUDA kernels use the same)."""

import triton.language as tl

from .._op_codes import AXIS_CODES, KIND_CODES

# Mixing kinds.
IDENTITY = tl.constexpr(KIND_CODES["identity"])
SHIFT = tl.constexpr(KIND_CODES["shift"])
OPTIMAL = tl.constexpr(KIND_CODES["optimal"])
DENSE = tl.constexpr(KIND_CODES["dense"])

# Mixed axes.
AXIS_TOKENS = tl.constexpr(AXIS_CODES["tokens"])
AXIS_ROWS = tl.constexpr(AXIS_CODES["rows"])
AXIS_BATCH = tl.constexpr(AXIS_CODES["batch"])
