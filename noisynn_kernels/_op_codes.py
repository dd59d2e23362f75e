"""Op-schema codes of the linear mixing kinds and axes: the integers every kernel family (Triton,
C++ CPU, CUDA) takes for ``kind`` and ``axis``.  Dependency-free, so kernel modules can import it."""

#: Mixing kind -> op code: the linear kinds (``quality.LINEAR_KINDS`` is made from it, in this order).
#: ``csrc/op_codes.h`` repeats these values for C++ (tests/test_build.py checks they agree).
KIND_CODES = {"identity": 0, "shift": 1, "optimal": 2, "dense": 3}
#: Mixed axis -> op code.
AXIS_CODES = {"tokens": 0, "rows": 1, "batch": 2}
