// noisynn_kernels._C: the compiled part of the package.
//
// Fused CPU and CUDA kernels register here as noisynn:: ops; the pybind11 module carries what is not
// an op: the build's own description, so backend_info() can say exactly what was compiled.
#include <pybind11/pybind11.h>  // only build_info is bound here: the kernels register as torch ops
#include <torch/version.h>

#include <string>

#include "cpu/mix_add_layernorm.h"

#if defined(WITH_CUDA)
#include "cuda/build_info.h"
#endif

namespace noisynn {

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) +
                          "." + std::to_string(TORCH_VERSION_PATCH);
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = std::string("unknown");
#endif
#if defined(_OPENMP)
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  pybind11::list cpu_kernels;
  cpu_kernels.append("mix_add_layernorm");
  info["cpu_kernels"] = cpu_kernels;
  // cpu_isas: the instruction sets the CPU kernels were compiled for; cpu_isa: the one they run here
  pybind11::list cpu_isas;
  cpu_isas.append("default");
#if NOISYNN_CPU_AVX2
  cpu_isas.append("avx2");
#endif
  info["cpu_isas"] = cpu_isas;
  info["cpu_isa"] = std::string(cpu::cpu_isa());
  info["cpu_hugepage_outputs"] = cpu::hugepage_outputs();
  // cuda: whether CUDA kernels were compiled in; cuda_arch_list / cuda_version: the GPU architectures
  // (TORCH_CUDA_ARCH_LIST syntax) and the toolkit they were compiled for / with (None without CUDA)
  pybind11::list cuda_kernels;
#if defined(WITH_CUDA)
  info["cuda"] = true;
  cuda_kernels.append("mix_add_layernorm");
  info["cuda_arch_list"] = cuda::compiled_arch_list();
  info["cuda_version"] = cuda::compiled_cuda_version();
#else
  info["cuda"] = false;
  info["cuda_arch_list"] = pybind11::none();
  info["cuda_version"] = pybind11::none();
#endif
  info["cuda_kernels"] = cuda_kernels;
  return info;
}

}  // namespace noisynn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "noisynn_kernels compiled extension";
  m.def("build_info", &noisynn::build_info, "What this build of the extension contains.");
#if defined(WITH_CUDA)
  m.def(
      "cuda_kernel_image",
      [] {
        const auto image = noisynn::cuda::kernel_image();
        pybind11::dict d;
        d["loadable"] = image.loadable;
        d["binary_version"] = image.binary_version;
        d["ptx_version"] = image.ptx_version;
        d["error"] = image.error;
        return d;
      },
      "Whether the CUDA kernels can run on the current GPU (creates the CUDA context).");
#endif
}
