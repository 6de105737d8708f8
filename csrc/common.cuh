// Shared helpers for qlfast's CUDA ops: checks, packed 16-byte loads, warp reductions, one cuBLAS GEMM entry point.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cublas_compat.h"

namespace qlfast {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

#define QLFAST_CUBLAS_CHECK(expr)                                                                  \
  do {                                                                                             \
    cublasStatus_t _st = (expr);                                                                   \
    TORCH_CHECK(_st == CUBLAS_STATUS_SUCCESS, "qlfast: cuBLAS call failed with status ", int(_st), \
                ": " #expr);                                                                       \
  } while (0)

// N elements of T in one aligned register pack: a 16-byte load/store when sizeof(T) * N == 16.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

inline cudaDataType cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return CUDA_R_32F;
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    default: TORCH_CHECK(false, "qlfast: unsupported dtype for cuBLAS: ", t);
  }
  return CUDA_R_32F;
}

// Column-major C (m, n) = op(A) op(B) + beta * C with fp32 accumulation (CUBLAS_COMPUTE_32F): bf16/fp16 operands
// may write an fp32 C, which is how dhidden accumulates across vocabulary chunks without bf16 rounding.
inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const void* a, at::ScalarType a_t,
                 int64_t lda, const void* b, at::ScalarType b_t, int64_t ldb, void* c, at::ScalarType c_t,
                 int64_t ldc, float beta) {
  TORCH_CHECK(m <= INT32_MAX && n <= INT32_MAX && k <= INT32_MAX && lda <= INT32_MAX && ldb <= INT32_MAX &&
                  ldc <= INT32_MAX,
              "qlfast: GEMM dimension exceeds int32");
  const float alpha = 1.0f;
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  QLFAST_CUBLAS_CHECK(cublasGemmEx(handle, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                                   int(m), int(n), int(k), &alpha, a, cuda_dtype(a_t), int(lda), b, cuda_dtype(b_t),
                                   int(ldb), &beta, c, cuda_dtype(c_t), int(ldc), CUBLAS_COMPUTE_32F,
                                   CUBLAS_GEMM_DEFAULT));
}

}  // namespace qlfast
