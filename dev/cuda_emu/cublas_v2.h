/* dev/cuda_emu/cublas_v2.h - the cuBLAS calls mhc_cuda.cuh makes, as plain loops (see cuda_runtime.h).
   TF32 compute rounds both operands to 10-bit mantissas, like the tensor cores. A and B may be bf16
   (CUDA_R_16BF, read exactly as stored); C is always fp32. */
#pragma once
#include "cuda_runtime.h"
#include "cuda_bf16.h"

typedef int cublasStatus_t;
enum { CUBLAS_STATUS_SUCCESS = 0 };
typedef struct emu_blas *cublasHandle_t;
typedef enum { CUBLAS_OP_N, CUBLAS_OP_T } cublasOperation_t;
typedef enum { CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_TF32 } cublasComputeType_t;
typedef enum { CUDA_R_32F, CUDA_R_16BF } cudaDataType;
enum { CUBLAS_GEMM_DEFAULT };
enum { CUBLAS_ATOMICS_NOT_ALLOWED };
static inline const char *cublasGetStatusString(cublasStatus_t) { return "emulated cuBLAS error"; }
cublasStatus_t cublasCreate(cublasHandle_t *h);
cublasStatus_t cublasDestroy(cublasHandle_t h);
static inline cublasStatus_t cublasSetAtomicsMode(cublasHandle_t, int) { return CUBLAS_STATUS_SUCCESS; }
static inline cublasStatus_t cublasSetStream(cublasHandle_t, cudaStream_t) { return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                                          int k, const float *alpha, const void *A, cudaDataType typeA, int lda, long long strideA,
                                          const void *B, cudaDataType typeB, int ldb, long long strideB, const float *beta, void *C,
                                          cudaDataType typeC, int ldc, long long strideC, int batch, cublasComputeType_t compute, int);
