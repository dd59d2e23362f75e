// The CPU kernels (mix_add_layernorm_kernels.h) compiled for the compiler's baseline instruction set.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "mix_add_layernorm.h"

namespace noisynn {
namespace cpu {
namespace isa_default {

// The kernels' 32-byte vector helpers are internal to this file, so the AVX calling-convention note
// GCC may give for them without AVX does not concern any interface.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#include "mix_add_layernorm_kernels.h"
#pragma GCC diagnostic pop

}  // namespace isa_default
}  // namespace cpu
}  // namespace noisynn
