"""Mixing kind and axis codes as Triton constexprs, shared by the Triton kernels: ``IDENTITY``,
``SHIFT``, ``OPTIMAL``, ``DENSE`` (one per kind) and ``AXIS_TOKENS``, ``AXIS_ROWS``, ``AXIS_BATCH``,
made from the op-schema codes of :mod:`noisynn_kernels._op_codes` (the C++ and CUDA kernels use the
same values), so a new kind needs no edit here."""

import triton.language as tl

from .._op_codes import AXIS_CODES, KIND_CODES

globals().update({kind.upper(): tl.constexpr(code) for kind, code in KIND_CODES.items()})
globals().update({f"AXIS_{axis.upper()}": tl.constexpr(code) for axis, code in AXIS_CODES.items()})
