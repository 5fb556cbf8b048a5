// Optional CUDA C++ extension of mova-rt (mova_rt._C). It starts minimal: it reports how it was
// built, so `mova-rt info` and the build system can be exercised before kernels land here.
#include <pybind11/pybind11.h>

#include <string>

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
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mova-rt CUDA C++ extension (optional)";
  m.def("build_info", &build_info, "How this extension was built");
}
