// Per-token e4m3 quantization of bf16 activations (the fp8 path's input to every fp8 GEMM whose
// producer does not emit fp8 itself): one block per row,
//   scale[m] = max_k |x[m, k]| / 448   (1 for an all-zero row)
//   q[m, k]  = e4m3_rn_satfinite(float(x[m, k]) / scale[m])
// the same fp32 division and round-to-nearest-even as the PyTorch reference
// (mova_rt.quantize.quantize_rows), so the results are bit-identical.
#include "fp8_quant.h"

#include <cuda_bf16.h>
#include <cuda_fp8.h>

namespace mova_rt {
namespace {

constexpr int kThreads = 256;
constexpr float kFp8Max = 448.0f;

__device__ float block_max(float v) {
  __shared__ float warp_max[kThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_max[warp] = v;
  __syncthreads();
  v = lane < kThreads / 32 ? warp_max[lane] : 0.0f;
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset /= 2) {
      v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    }
    if (lane == 0) warp_max[0] = v;
  }
  __syncthreads();
  return warp_max[0];
}

__global__ void quantize_rows_kernel(const __nv_bfloat16* __restrict__ x, int64_t stride_x,
                                     __nv_fp8_e4m3* __restrict__ q, float* __restrict__ scale,
                                     int k) {
  const int64_t row = blockIdx.x;
  const __nv_bfloat16* xr = x + row * stride_x;
  float amax = 0.0f;
  for (int i = threadIdx.x; i < k; i += kThreads) amax = fmaxf(amax, fabsf(__bfloat162float(xr[i])));
  amax = block_max(amax);
  const float s = amax > 0.0f ? amax / kFp8Max : 1.0f;
  if (threadIdx.x == 0) scale[row] = s;
  __nv_fp8_e4m3* qr = q + row * static_cast<int64_t>(k);
  for (int i = threadIdx.x; i < k; i += kThreads) {   // the row is in L1 from the first pass
    const float v = fminf(fmaxf(__bfloat162float(xr[i]) / s, -kFp8Max), kFp8Max);
    qr[i] = __nv_fp8_e4m3(v);                           // RN, saturating
  }
}

}  // namespace

const char* quantize_rows_fp8(const void* x, int64_t stride_x, void* q, float* scale, int64_t m,
                              int64_t k, void* stream) {
  if (m == 0 || k == 0) return nullptr;
  quantize_rows_kernel<<<static_cast<unsigned>(m), kThreads, 0,
                         static_cast<cudaStream_t>(stream)>>>(
      static_cast<const __nv_bfloat16*>(x), stride_x, static_cast<__nv_fp8_e4m3*>(q), scale,
      static_cast<int>(k));
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace mova_rt
