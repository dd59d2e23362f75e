// Op-schema codes of the mixing kinds and axes, the integers every noisynn::mix_add_layernorm* op takes
// for `kind` and `axis` (Python: noisynn_kernels/_op_codes.py).  One definition for the CPU kernels,
// the CUDA kernels and the shared argument checks.  No dependencies: included by host and device code.
#pragma once

#include <cstdint>

namespace noisynn {

constexpr int64_t KIND_IDENTITY = 0, KIND_SHIFT = 1, KIND_OPTIMAL = 2, KIND_DENSE = 3;
constexpr int64_t AXIS_TOKENS = 0, AXIS_ROWS = 1, AXIS_BATCH = 2;

}  // namespace noisynn
