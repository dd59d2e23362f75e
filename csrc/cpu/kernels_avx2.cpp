// The CPU kernels (mix_add_layernorm_kernels.h) compiled for AVX2 + FMA.  The op calls them only
// where cpu_isa() says "avx2".
//
// Every header is included first, under the build's baseline target; only the kernels themselves
// (namespace isa_avx2), after the target pragma, are compiled for AVX2.  So no inline function shared
// with other translation units is emitted here with AVX2 instructions, and a machine without AVX2
// never runs any.
#include "mix_add_layernorm.h"

#if NOISYNN_CPU_AVX2

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

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace noisynn {
namespace cpu {
namespace isa_avx2 {

#include "mix_add_layernorm_kernels.h"

}  // namespace isa_avx2
}  // namespace cpu
}  // namespace noisynn

#pragma GCC pop_options

#endif  // NOISYNN_CPU_AVX2
