// Launchers of the CUDA kernels of mova_rt._C: raw device pointers and a cudaStream_t (as void*),
// so the extension needs no torch headers. Each returns nullptr, or the CUDA error's text.
#pragma once

#include <cstdint>

namespace mova_rt {

// x bf16 [m, k] (rows stride_x elements apart) -> q e4m3 [m, k] contiguous, scale fp32 [m].
const char* quantize_rows_fp8(const void* x, int64_t stride_x, void* q, float* scale, int64_t m,
                              int64_t k, void* stream);

}  // namespace mova_rt
