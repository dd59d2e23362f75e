// What the CUDA part of the extension was compiled for (defined in mix_add_layernorm.cu), for build_info().
#pragma once

#include <string>

namespace noisynn {
namespace cuda {

// The GPU architectures the kernels were compiled for, as TORCH_CUDA_ARCH_LIST writes them ("8.0;9.0").
std::string compiled_arch_list();
// The CUDA toolkit version the kernels were compiled with ("13.0").
std::string compiled_cuda_version();

}  // namespace cuda
}  // namespace noisynn
