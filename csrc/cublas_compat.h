// cuBLAS for qlfast._C, and torch's per-stream cuBLAS handle.
//
// A real build (CUDA torch, full toolkit) includes <cublas_v2.h> and ATen's CUDAContext.h. CPU-only CI machines have
// nvcc and the CPU torch wheel but neither the cuBLAS headers nor a loadable libtorch_cuda; there the sources must
// still compile (tests/test_csrc.py), so this header declares the handful of cuBLAS symbols qlfast uses, with the
// values and signatures of cublas_api.h (CUDA 12/13). That branch is compiled, never linked or run.
#pragma once

#include <cuda_runtime.h>
#include <library_types.h>

#if __has_include(<cublas_v2.h>)
#include <ATen/cuda/CUDAContext.h>
#include <cublas_v2.h>
#else
extern "C" {
struct cublasContext;
typedef struct cublasContext* cublasHandle_t;
typedef enum { CUBLAS_STATUS_SUCCESS = 0 } cublasStatus_t;
typedef enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, CUBLAS_OP_C = 2 } cublasOperation_t;
typedef enum { CUBLAS_COMPUTE_32F = 68, CUBLAS_COMPUTE_32F_PEDANTIC = 69 } cublasComputeType_t;
typedef enum { CUBLAS_GEMM_DEFAULT = -1 } cublasGemmAlgo_t;
cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                            int k, const void* alpha, const void* A, cudaDataType Atype, int lda, const void* B,
                            cudaDataType Btype, int ldb, const void* beta, void* C, cudaDataType Ctype, int ldc,
                            cublasComputeType_t computeType, cublasGemmAlgo_t algo);
}
namespace at::cuda {
// Exported by libtorch_cuda (ATen/cuda/CUDAContextLight.h): the handle bound to the current stream, with torch's
// workspace and math mode.
cublasHandle_t getCurrentCUDABlasHandle();
}  // namespace at::cuda
#endif
