// Optional CUDA C++ extension of mova-rt (mova_rt._C): the bindings. Kernels take raw device
// pointers and a stream handle from Python (torch's CUDAExtension cannot build against the CPU
// torch of our CI machine); mova_rt/fp8/cuda_ext.py wraps them for tensors. Built without nvcc it
// holds build_info only.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#ifdef MOVA_RT_WITH_CUDA
#include "fp8_quant.h"
#endif

namespace {

std::string build_info() {
  std::string info = "mova_rt._C built with ";
#if defined(__clang__)
  info += "clang";
#elif defined(__GNUC__)
  info += "gcc " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__);
#else
  info += "an unknown compiler";
#endif
#ifdef MOVA_RT_WITH_CUDA
  info += ", with CUDA kernels";
#else
  info += ", without CUDA";
#endif
  return info;
}

#ifdef MOVA_RT_WITH_CUDA
void check(const char* error, const char* what) {
  if (error != nullptr) throw std::runtime_error(std::string(what) + ": " + error);
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mova-rt CUDA C++ extension (optional)";
  m.def("build_info", &build_info, "How this extension was built");
#ifdef MOVA_RT_WITH_CUDA
  m.attr("has_cuda") = true;
  m.def(
      "quantize_rows_fp8",
      [](std::uintptr_t x, int64_t stride_x, std::uintptr_t q, std::uintptr_t scale, int64_t rows,
         int64_t cols, std::uintptr_t stream) {
        check(mova_rt::quantize_rows_fp8(reinterpret_cast<const void*>(x), stride_x,
                                         reinterpret_cast<void*>(q),
                                         reinterpret_cast<float*>(scale), rows, cols,
                                         reinterpret_cast<void*>(stream)),
              "quantize_rows_fp8");
      },
      "bf16 [rows, cols] (row stride stride_x) -> e4m3 [rows, cols] + fp32 scale [rows], per row",
      pybind11::arg("x"), pybind11::arg("stride_x"), pybind11::arg("q"), pybind11::arg("scale"),
      pybind11::arg("rows"), pybind11::arg("cols"), pybind11::arg("stream"));
#else
  m.attr("has_cuda") = false;
#endif
}
