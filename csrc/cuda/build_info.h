// What the CUDA part of the extension was compiled for (defined in mix_add_layernorm.cu), for build_info().
#pragma once

#include <string>

namespace noisynn {
namespace cuda {

// The GPU architectures the kernels were compiled for, as TORCH_CUDA_ARCH_LIST writes them ("8.0;9.0").
std::string compiled_arch_list();
// The CUDA toolkit version the kernels were compiled with ("13.0").
std::string compiled_cuda_version();

// Whether the kernels can run on the current GPU: `loadable`, the architecture of the binary that was
// loaded (`binary_version`, 90 for sm_90; below the GPU's own when it was JIT-compiled from PTX) and
// of its PTX, or the CUDA error when there is no image for this GPU.  Creates the CUDA context.
struct KernelImage {
  bool loadable;
  int binary_version;
  int ptx_version;
  std::string error;
};
KernelImage kernel_image();

}  // namespace cuda
}  // namespace noisynn
