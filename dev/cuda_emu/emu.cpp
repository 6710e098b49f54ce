/* dev/cuda_emu/emu.cpp - the scheduler and cuBLAS loops behind cuda_runtime.h / cublas_v2.h. */
#include <setjmp.h>
#include <ucontext.h>
#include <map>
#include <vector>
#include "cublas_v2.h"

emu_uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
uint64_t emu_exchange[32][32];
char *emu_dynamic_smem;
const int emu_launch_log = getenv("EMU_LAUNCH_LOG") != NULL;

/* A thread starts on its own stack through makecontext/swapcontext; after that, switches between it and
   the scheduler are _setjmp/_longjmp, which (unlike swapcontext) make no system call for the signal mask:
   the switch count is what bounds the emulator's speed. */
struct EmuThread { ucontext_t context; jmp_buf resume; char *stack; int state, started; };
enum { EMU_MAX_THREADS = 1024, EMU_STACK_BYTES = 256 * 1024 };
static EmuThread emu_threads[EMU_MAX_THREADS];
static ucontext_t emu_scheduler;
static jmp_buf emu_scheduler_resume;
static int emu_current;
static std::function<void()> *emu_body;

void emu_yield(int state) {
    emu_threads[emu_current].state = state;
    if (!_setjmp(emu_threads[emu_current].resume)) _longjmp(emu_scheduler_resume, 1);
}

static void emu_thread_entry() {
    (*emu_body)();
    emu_yield(EMU_DONE);
}

static void emu_fail(const char *what, const char *kernel) {
    fprintf(stderr, "cuda_emu: %s in kernel %s\n", what, kernel);
    abort();
}

/* releases warp w's barrier when every lane of the warp waits at it; returns 1 if it was released */
static int emu_release_warp(int w, int n, const char *name) {
    int waiting = 0, all_there = 1;
    for (int i = w * 32; i < w * 32 + 32 && i < n; i++) {
        if (emu_threads[i].state == EMU_WAIT_WARP) waiting = 1;
        else all_there = 0;
    }
    if (waiting && !all_there) {
        for (int i = w * 32; i < w * 32 + 32 && i < n; i++)
            if (emu_threads[i].state == EMU_DONE) emu_fail("warp barrier with exited lanes", name);
    }
    if (!waiting || !all_there) return 0;
    for (int i = w * 32; i < w * 32 + 32 && i < n; i++) emu_threads[i].state = EMU_RUN;
    return 1;
}

/* runs thread i until it waits or ends */
static void emu_run_thread(int i) {
    emu_current = i;
    threadIdx.x = i; threadIdx.y = 0; threadIdx.z = 0;
    if (_setjmp(emu_scheduler_resume)) return;                  /* the thread yielded back here */
    if (emu_threads[i].started) _longjmp(emu_threads[i].resume, 1);
    emu_threads[i].started = 1;
    swapcontext(&emu_scheduler, &emu_threads[i].context);
}

/* Runs one block to completion, one warp at a time: a warp runs through its warp barriers until every
   lane waits at the block barrier (or has ended) before the next warp starts, warps in order (reversed
   with EMU_REVERSE). That is the most skewed schedule a GPU may take between two __syncthreads, so a
   barrier missing between one warp's write and another's read (or the other way round) shows. */
static void emu_run_block(int n, int reverse, const char *name) {
    for (int i = 0; i < n; i++) {
        if (!emu_threads[i].stack && !(emu_threads[i].stack = (char *)malloc(EMU_STACK_BYTES))) emu_fail("out of memory", name);
        getcontext(&emu_threads[i].context);
        emu_threads[i].context.uc_stack.ss_sp = emu_threads[i].stack;
        emu_threads[i].context.uc_stack.ss_size = EMU_STACK_BYTES;
        emu_threads[i].context.uc_link = NULL;
        makecontext(&emu_threads[i].context, emu_thread_entry, 0);
        emu_threads[i].state = EMU_RUN;
        emu_threads[i].started = 0;
    }
    int warps = (n + 31) / 32;
    for (;;) {
        for (int k = 0; k < warps; k++) {
            int w = reverse ? warps - 1 - k : k, lanes = std::min(32, n - 32 * w);
            do {
                for (int j = 0; j < lanes; j++) {
                    int i = 32 * w + (reverse ? lanes - 1 - j : j);
                    if (emu_threads[i].state == EMU_RUN) emu_run_thread(i);
                }
            } while (emu_release_warp(w, n, name));
        }
        int done = 1, at_block_barrier = 1;
        for (int i = 0; i < n; i++) {
            done &= emu_threads[i].state == EMU_DONE;
            at_block_barrier &= emu_threads[i].state == EMU_WAIT_BLOCK || emu_threads[i].state == EMU_DONE;
        }
        if (done) return;
        if (!at_block_barrier) emu_fail("deadlock (threads wait at different barriers)", name);
        for (int i = 0; i < n; i++)
            if (emu_threads[i].state == EMU_WAIT_BLOCK) emu_threads[i].state = EMU_RUN;
    }
}

/* ---- stream capture and graphs ---- */
struct EmuGraph { std::vector<std::function<void()>> work; };
static EmuGraph *emu_open_capture;

int emu_capture(std::function<void()> work) {
    if (!emu_open_capture) return 0;
    emu_open_capture->work.push_back(work);
    return 1;
}

void emu_not_capturing(const char *call) {
    if (!emu_open_capture) return;
    fprintf(stderr, "cuda_emu: %s during a stream capture (a GPU cannot capture it)\n", call);
    abort();
}

cudaError_t cudaStreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode) {
    if (stream != cudaStreamPerThread || emu_open_capture) {
        fprintf(stderr, "cuda_emu: a capture begins on cudaStreamPerThread, one at a time\n");
        abort();
    }
    emu_open_capture = new EmuGraph;
    return cudaSuccess;
}

cudaError_t cudaStreamEndCapture(cudaStream_t, cudaGraph_t *graph) {
    *graph = emu_open_capture;
    emu_open_capture = NULL;
    return cudaSuccess;
}

cudaError_t cudaGraphInstantiate(cudaGraphExec_t *exec, cudaGraph_t graph, unsigned long long) {
    *exec = new EmuGraph(*graph);
    return cudaSuccess;
}

cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t) {
    if (emu_launch_log) fprintf(stderr, "launch cudaGraphLaunch of %zu nodes\n", exec->work.size());
    for (auto &work : exec->work) work();
    return cudaSuccess;
}

cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) { delete exec; return cudaSuccess; }
cudaError_t cudaGraphDestroy(cudaGraph_t graph) { delete graph; return cudaSuccess; }

static void emu_run_launch(const char *name, dim3 grid, dim3 block, size_t smem, std::function<void()> body) {
    int n = (int)(block.x * block.y * block.z);
    static const int reverse = getenv("EMU_REVERSE") != NULL;
    if (emu_launch_log) fprintf(stderr, "launch %s\n", name);
    gridDim = grid;
    blockDim = block;
    emu_body = &body;
    char *smem_buffer = (char *)aligned_alloc(128, (smem + 127) / 128 * 128 + 128);    /* 128-byte aligned, like the GPU's */
    if (!smem_buffer) emu_fail("out of memory", name);
    memset(smem_buffer, 0x7F, smem ? smem : 1);
    emu_dynamic_smem = smem_buffer;
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                blockIdx.x = reverse ? grid.x - 1 - x : x;
                blockIdx.y = reverse ? grid.y - 1 - y : y;
                blockIdx.z = reverse ? grid.z - 1 - z : z;
                emu_run_block(n, reverse, name);
            }
    free(smem_buffer);
}

/* each kernel's dynamic shared memory limit set by cudaFuncSetAttribute; without it a GPU allows 48 KiB */
static std::map<const void *, int> emu_smem_optin;

/* checks the launch's shape now, as a GPU does, then runs it, or records it into the open capture */
void emu_launch(const char *name, const void *func, dim3 grid, dim3 block, size_t smem, std::function<void()> body) {
    int n = (int)(block.x * block.y * block.z);
    if (n < 1 || n > EMU_MAX_THREADS || block.y != 1 || block.z != 1) emu_fail("bad block shape (1 to 1024 threads in x)", name);
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) emu_fail("bad grid shape", name);
    if (smem > EMU_SMEM_OPTIN) emu_fail("too much dynamic shared memory", name);
    if (smem > 48 * 1024 && (!emu_smem_optin.count(func) || (size_t)emu_smem_optin[func] < smem))
        emu_fail("dynamic shared memory over 48 KiB without cudaFuncSetAttribute for it", name);
    if (!emu_capture([=]() { emu_run_launch(name, grid, block, smem, body); })) emu_run_launch(name, grid, block, smem, body);
}

cudaError_t cudaMalloc(void **p, size_t bytes) {
    emu_not_capturing("cudaMalloc");
    *p = malloc(bytes ? bytes : 1);
    if (!*p) return cudaErrorMemoryAllocation;
    memset(*p, 0xFF, bytes);
    return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void *func, int attribute, int value) {
    if (value > EMU_SMEM_OPTIN) {
        fprintf(stderr, "cuda_emu: %d bytes of shared memory asked for, the device has %d\n", value, (int)EMU_SMEM_OPTIN);
        abort();
    }
    if (attribute == cudaFuncAttributeMaxDynamicSharedMemorySize) emu_smem_optin[func] = value;
    return cudaSuccess;
}

cublasStatus_t cublasCreate(cublasHandle_t *h) { *h = (cublasHandle_t)malloc(1); return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasDestroy(cublasHandle_t h) { free(h); return CUBLAS_STATUS_SUCCESS; }

static float emu_tf32(float x) {     /* round to nearest (ties away) at 10 mantissa bits */
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
    memcpy(&x, &u, 4);
    return x;
}

/* element i of a GEMM operand stored as `type` (fp32, or bf16 widened exactly) */
static float emu_operand(const void *X, cudaDataType type, size_t i) {
    return type == CUDA_R_16BF ? __bfloat162float(((const __nv_bfloat16 *)X)[i]) : ((const float *)X)[i];
}

/* column-major C = alpha op(A) op(B) + beta C, per batch entry, as cuBLAS defines it. op(A) and op(B)
   are first copied into rows of k contiguous floats (from fp32 or bf16 storage; rounded to TF32 when
   asked) so every entry of C is one sequential fp32 dot product. Strides and leading dimensions count
   elements of the operand's own type. C must be fp32. */
static void emu_gemm(cublasOperation_t transa, cublasOperation_t transb, int m, int n, int k, const float *alpha, const void *A_,
                     cudaDataType typeA, int lda, long long strideA, const void *B_, cudaDataType typeB, int ldb,
                     long long strideB, const float *beta, void *C_, cudaDataType typeC, int ldc, long long strideC, int batch,
                     cublasComputeType_t compute) {
    if (emu_launch_log) fprintf(stderr, "launch cublasGemmStridedBatchedEx %d x %d x %d\n", m, n, k);
    if (ldc < m || lda < (transa == CUBLAS_OP_N ? m : k) || ldb < (transb == CUBLAS_OP_N ? k : n) || lda < 1 || ldb < 1) {
        fprintf(stderr, "cuda_emu: bad leading dimension in a GEMM (m %d n %d k %d lda %d ldb %d ldc %d)\n", m, n, k, lda, ldb, ldc);
        abort();
    }
    if (typeC != CUDA_R_32F) { fprintf(stderr, "cuda_emu: a GEMM's C must be fp32\n"); abort(); }
    float *rowsA = (float *)malloc(sizeof(float) * ((size_t)m * k + 1)), *rowsB = (float *)malloc(sizeof(float) * ((size_t)n * k + 1));
    if (!rowsA || !rowsB) { fprintf(stderr, "cuda_emu: out of memory in a GEMM\n"); abort(); }
    int tf32 = compute == CUBLAS_COMPUTE_32F_FAST_TF32;
    for (int b = 0; b < batch; b++) {
        size_t a0 = (size_t)(b * strideA), b0 = (size_t)(b * strideB);
        float *C = (float *)C_ + b * strideC;
        for (int i = 0; i < m; i++)
            for (int l = 0; l < k; l++) {
                float a = emu_operand(A_, typeA, a0 + (transa == CUBLAS_OP_N ? i + (size_t)l * lda : l + (size_t)i * lda));
                rowsA[(size_t)i * k + l] = tf32 ? emu_tf32(a) : a;
            }
        for (int j = 0; j < n; j++)
            for (int l = 0; l < k; l++) {
                float x = emu_operand(B_, typeB, b0 + (transb == CUBLAS_OP_N ? l + (size_t)j * ldb : j + (size_t)l * ldb));
                rowsB[(size_t)j * k + l] = tf32 ? emu_tf32(x) : x;
            }
        for (int j = 0; j < n; j++)
            for (int i = 0; i < m; i++) {
                const float *ra = rowsA + (size_t)i * k, *rb = rowsB + (size_t)j * k;
                float acc = 0;
                for (int l = 0; l < k; l++) acc += ra[l] * rb[l];
                float *c = C + i + (size_t)j * ldc;
                *c = *beta == 0 ? *alpha * acc : *alpha * acc + *beta * *c;
            }
    }
    free(rowsA);
    free(rowsB);
}

/* alpha and beta are host pointers: read at the call, as cuBLAS does in host pointer mode (a captured
   GEMM keeps their values) */
cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                                          int k, const float *alpha, const void *A, cudaDataType typeA, int lda, long long strideA,
                                          const void *B, cudaDataType typeB, int ldb, long long strideB, const float *beta, void *C,
                                          cudaDataType typeC, int ldc, long long strideC, int batch, cublasComputeType_t compute, int) {
    float a = *alpha, b = *beta;
    auto gemm = [=]() {
        emu_gemm(transa, transb, m, n, k, &a, A, typeA, lda, strideA, B, typeB, ldb, strideB, &b, C, typeC, ldc, strideC, batch,
                 compute);
    };
    if (!emu_capture(gemm)) gemm();
    return CUBLAS_STATUS_SUCCESS;
}
