"""Test-wide set-up.

Triton kernels run on CPU only through the Triton interpreter, which has to be chosen before any
kernel is defined; on a machine with CUDA the real compiler is used.  Set TRITON_INTERPRET yourself
to override.
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
