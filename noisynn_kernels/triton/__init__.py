"""Triton kernels (``@triton.jit`` functions only).

Launchers, ``torch.library`` registration and autograd live in :mod:`noisynn_kernels.ops`.  To run
these kernels on CPU through Triton's interpreter, set ``TRITON_INTERPRET=1`` before triton is
imported (no bf16 there).
"""
