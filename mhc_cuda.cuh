/* mhc_cuda.cuh - the CUDA path of mhc.h: the same model on one GPU, every forward and backward op a
   kernel or a cuBLAS call (SPEC §2-§12), and absorbed decode with a latent cache (SPEC §10).

   Use:   #define MHC_IMPLEMENTATION
          #include "mhc.h"
          #include "mhc_cuda.cuh"        in the one file compiled by nvcc (-x cu), linked with -lcublas.

   The GPU model mirrors MhcModel: one parameter slab in the CPU's layout (upload and download are plain
   copies), the CPU's activation buffers (mhc.h's mhc_acts_table) on the device plus GPU-only scratch, and
   the CPU's order of operations, so every kernel has a CPU function to be tested against. Where a kernel
   does the work of several CPU functions (mHC's per-token pre-stage: the RMS statistic, coefficients,
   Sinkhorn and pre-mix, and its backward), the test compares it with the chain it replaces.

   Precision (SPEC §0): fp32 storage for parameters (the master weights), gradients, activations and
   optimizer state. mhc_gpu_set_precision picks how the MHC_GEMM_FAST GEMMs (every MLA, FFN, shared-expert
   and head projection, forward and backward) run on cuBLAS:
     MHC_PREC_TF32 (default)  CUBLAS_COMPUTE_32F_FAST_TF32 on fp32 operands;
     MHC_PREC_FP32            CUBLAS_COMPUTE_32F, exact (the tests);
     MHC_PREC_BF16            A and B in bf16 (CUDA_R_16BF), C in fp32, CUBLAS_COMPUTE_32F: the weight
                              operands come from params_bf16, a bf16 copy of the whole parameter slab that
                              upload and the AdamW kernel rewrite from the fp32 master (round to nearest
                              even); activation and gradient operands are rounded into scratch by one
                              conversion kernel just before their GEMM. Outputs, weight gradients and the
                              accumulation stay fp32.
   Our own tensor-core kernels, the routed-expert GEMMs and the flash-attention tile products, follow the
   setting too: exact fp32, or TF32 or bf16 operands on tensor cores (mma.sync), fp32 accumulate (sections
   1 and 4). A decoded token's products (matvec, the FFN kernels, absorbed attention's W_uk and W_uv) read
   fp32 weights exactly, or in BF16 the weights' bf16 copy (decode_bf16_weight), with fp32 activations and
   sums. Always fp32 whatever the setting: the mHC/HC coefficient products (mHC's h, dX and dphi
   GEMMs, HC's and the router's: MHC_GEMM_FP32), the attention softmax statistics, and every elementwise
   kernel. Norm statistics, softmaxes, Sinkhorn, routing, losses and AdamW are fp32 or wider.

   Memory: mhc_gpu_set_recompute trades compute for activation memory. The forward then keeps only the
   residual streams X_s of every sublayer, the attention outputs o and their lse of every layer, and the
   losses; each sublayer's backward first reruns its branch from X_s into one shared set of buffers (all
   but the attention kernel, the costliest piece and the one whose output is kept), and the head's logits
   live MHC_LOGIT_CHUNK_ROWS rows at a time, recomputed chunk by chunk in the backward. The kernels are
   deterministic, so the rerun rebuilds the very bits the backward would have read.

   Determinism: no float atomics. A reduction is a warp's butterfly, a block's fixed tree, or per-block
   partials summed in a fixed order; the scatters (embedding gradient, expert outputs) loop over a
   precomputed order. Two runs with the same inputs on the same GPU give identical bits.

   Sections: types and interface   0 checks, memory, reductions   1 GEMMs   2 primitives
             3 residual streams   4 MLA   5 FFN and MoE   6 the model   7 optimizer   8 absorbed decode   */
#ifndef MHC_CUDA_CUH
#define MHC_CUDA_CUH

#ifndef MHC_H
#error "include mhc.h before mhc_cuda.cuh"
#endif
#ifndef MHC_IMPLEMENTATION
#error "mhc_cuda.cuh uses mhc.h's implementation (parameter layout, activation table): define MHC_IMPLEMENTATION"
#endif
#ifdef MHC_DOUBLE
#error "the CUDA path is fp32: build it without MHC_DOUBLE"
#endif

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>

/* ---------------------------------------------------------------------------------------------
   Types and interface                                                                            */
/* Every device buffer of one owner, freed together; a failed cudaMalloc is remembered for the caller. */
#define MHC_GPU_MAX_ALLOCS 128
typedef struct {
    void *ptr[MHC_GPU_MAX_ALLOCS];
    int n, failed;
    int measure;                          /* 1: only add up the bytes asked for, allocate nothing (NULLs) */
    size_t bytes;
} MhcGpuArena;

/* With recompute, the rows of logits held at once (the head and cross-entropy run in chunks of this many
   rows). 1024 rows of a 129k vocabulary are 0.5 GiB. */
#ifndef MHC_LOGIT_CHUNK_ROWS
#define MHC_LOGIT_CHUNK_ROWS 1024
#endif

/* Precision of the MHC_GEMM_FAST GEMMs (mhc_gpu_set_precision). TF32 is the default; BF16: bf16 operands,
   fp32 accumulate and output, fp32 master weights. */
enum { MHC_PREC_FP32, MHC_PREC_TF32, MHC_PREC_BF16 };

/* the cuBLAS handle, the precision of the MHC_GEMM_FAST GEMMs, and what BF16 needs: the parameter slab
   and its bf16 twin (weight operands are read from the twin, see gemm_bf16_weight) and two scratch
   buffers the other operands are converted into just before their GEMM */
typedef struct {
    cublasHandle_t handle;
    int precision;                        /* MHC_PREC_*                                                  */
    const float *params;                  /* BF16: the fp32 parameter slab [n_params] (NULL: no twin)    */
    const __nv_bfloat16 *params_bf16;     /* BF16: its bf16 copy, same layout                           */
    size_t n_params;
    __nv_bfloat16 *scratch[2];            /* BF16: converted A and B operands, scratch_count each        */
    size_t scratch_count;
    int wgmma;                            /* BF16: which of our kernels run on wgmma (MHC_WGMMA_*, mhc_gpu_set_wgmma) */
} MhcBlas;

/* what the blocks of a lone token's pre-stage leave for the last of them (mhc_pre_lone_kernel) */
typedef struct {
    float *part;                     /* [ceil(C / 32)][m + 1]: each block's part of h [m], then of |x|^2 */
    unsigned *done;                  /* blocks finished; 0 between launches (the last block resets it)  */
} MhcLoneScratch;

/* Scratch of the many-token mhc pre-stage backward at n = MHC_SK_N (gpu_mhc_pre_backward) */
typedef struct {
    float *dS2;                      /* [N] 2 dS: the gradient of each token's |x|^2, twice            */
    float *dphi_part;                /* [MHC_PG_SPLITS, m, n C] dphi of each token split                */
} MhcPreGradScratch;

/* Everything one forward (and backward) of B x T tokens needs: the CPU's activation buffers plus
   GPU-only scratch. */
typedef struct {
    int B, T;
    int flags;                       /* GPU_ACTS_*: what they were allocated for (0: nothing allocated) */
    int logit_rows;                  /* rows the logits buffer holds: B*T, or with recompute a chunk  */
    MhcActs a;                       /* mhc.h's buffers (mhc_acts_table), on the device; with recompute
                                        the per-layer ones but o hold one layer (see gpu_layer_slot)   */
    int *tokens, *targets;           /* [N]                                                           */
    float *att_lse;                  /* [L,B,H,T] log-sum-exp of each attention row (in place of a.att) */
    float *att_rowdot;               /* [B,H,T] sum_c dO O per row (backward)                          */
    int *moe_count;                  /* [E] assignments per expert                                     */
    double *moe_ssum, *moe_f;        /* [N] sum_j s_j, [B,E] f_i of the balance loss                   */
    double *moe_bal;                 /* [L,B,E] per layer, sequence and expert: alpha f_i P_i / B      */
    float *coef_alpha;               /* [N,3] per-token alpha-gradient terms (backward)                */
    float *expert_split;             /* row-split partials of the expert weight gradients (backward; may be NULL) */
    __nv_bfloat16 *gemm_bf16[2];     /* BF16 GEMM operand scratch, gemm_bf16_count each (bf16 only)    */
    size_t gemm_bf16_count;
    float *colsum_part;              /* [MHC_COLSUM_CHUNKS, max(C, d_c, d_q, m)] (backward)            */
    int *emb_rows, *emb_start, *emb_order;   /* embedding-gradient groups: [U], [U+1], [N] (backward)   */
    int n_emb_rows;                  /* U, distinct tokens of the last forward                         */
    MhcLoneScratch lone;             /* the lone-token pre-stage's (B*T = 1: decode)                    */
    unsigned *route_done;            /* the lone-token router's blocks finished (moe_route_lone_kernel);
                                        0 between launches (the last block resets it)                  */
    MhcPreGradScratch pre_grad;      /* the mhc pre-stage backward's at n = MHC_SK_N (backward)          */
    MhcGpuArena arena;
} MhcGpuActs;

/* The model on the GPU: MhcModel's state plus the buffers of one training step */
typedef struct {
    MhcConfig cfg;
    int n_tensors;
    MhcTensor *tensors;                /* host copy of the tensor table (offset, size, decay)          */
    size_t n_params;
    float *params, *grads, *adam_m, *adam_v;   /* device [n_params] each, the CPU's layout           */
    __nv_bfloat16 *params_bf16;        /* [n_params] bf16 copy of params, kept current by upload and AdamW
                                          once mhc_gpu_set_precision(BF16) allocated it (else NULL)    */
    MhcParams p, g;                    /* named views (device pointers) into params and grads          */
    float *expert_bias;                /* [L,E] selection bias (dense layers unused)                  */
    int *expert_load;                  /* [L,E] assignments counted by the last forward               */
    int *step_load;                    /* [L,E] summed by each backward since zero_grad: bias update's  */
    int step;                          /* optimizer steps taken                                        */
    double ce, aux;                    /* of the last forward                                          */
    int has_targets;                   /* the last forward had targets and left its dlogits for the
                                          backward                                                     */
    int dlogits16;                     /* the last cross-entropy wrote its rows' dlogits rounded to bf16
                                          into blas.scratch[0] (BF16: the head backward's A operand),
                                          not over the logits                                          */
    int recompute;                     /* mhc_gpu_set_recompute                                        */
    double *reduce_part, *reduce_out;  /* [MHC_REDUCE_BLOCKS], [2] scratch of the loss and norm sums   */
    MhcBlas blas;
    MhcGpuActs acts;
    MhcGpuArena arena;                 /* parameters, optimizer state, bias, loads                    */
} MhcGpu;

/* Decode as a CUDA graph (section 8): 1 where nvcc puts launches on the per-thread default stream
   (--default-stream per-thread, as the Makefile builds), which can be captured; the legacy default stream
   cannot, so without the flag decode runs launch by launch. */
#ifndef MHC_DECODE_GRAPH
#ifdef CUDA_API_PER_THREAD_DEFAULT_STREAM
#define MHC_DECODE_GRAPH 1
#else
#define MHC_DECODE_GRAPH 0
#endif
#endif

/* Decode's kernels launched overlapped (programmatic dependent launch, section 0): 1, or 0 for plain
   launches (the same kernels and results; dev/gpu_check.sh times both) */
#ifndef MHC_OVERLAPPED_LAUNCH
#define MHC_OVERLAPPED_LAUNCH 1
#endif

#define MHC_LOGIT_BLOCKS 64      /* blocks of a pass over the V logits: the argmax's keys, the softmax denominator's parts */
#define MHC_TOP_K_MAX 256        /* the most candidates mhc_gpu_decode_top_k finds (a larger top-k samples on the host) */
#define MHC_TOP_K_TILE 2048      /* keys a block of the top-k sorts at once, in shared memory (16 KB)                  */

/* what mhc_gpu_decode_top_k brings back from the device, in one copy */
typedef struct {
    unsigned long long keys[MHC_TOP_K_MAX];   /* the k largest logits' keys (logit_key), largest first        */
    double sum_parts[MHC_LOGIT_BLOCKS];       /* each block's share of the softmax denominator                */
} MhcTopK;

/* the latent KV cache of absorbed decode (SPEC §10) and the buffers of one decoded token */
typedef struct {
    int max_len, len;
    float *ckv, *kpe;                  /* [L, max_len, d_c] latent after RMSNorm, [L, max_len, d_r] after RoPE */
    float *scores;                     /* [H, max_len] attention scores of the token                          */
    float *lat_raw;                    /* [d_c + d_r] W_dkv u of the token                                    */
    int *pos;                          /* [1] the token's position, len, in device memory                     */
    int *next;                         /* [1] mhc_gpu_decode_argmax's answer                                  */
    unsigned long long *argmax_keys;   /* [MHC_LOGIT_BLOCKS] its scratch                                      */
    unsigned long long *top_k_keys[2]; /* [ceil(V / MHC_TOP_K_TILE) * MHC_TOP_K_MAX] each: the top-k's passes */
    MhcTopK *top_k;                    /* [1] mhc_gpu_decode_top_k's answer                                   */
    MhcGpuActs acts;                   /* one token (B = T = 1), forward buffers only                         */
    MhcGpuArena arena;
    int use_graph;                     /* 1 (MHC_DECODE_GRAPH): replay the decode step as one CUDA graph      */
    int graph_captures;                /* captures so far                                                     */
    cudaGraphExec_t graph;             /* the captured step (NULL: none yet), for graph_gpu with graph_blas   */
    const MhcGpu *graph_gpu;
    MhcBlas graph_blas;
} MhcGpuCache;

/* B x T: the batch shape to expect. The activation buffers are allocated by the first forward (for its
   shape and the settings below; a forward with another shape or after a setting changed reallocates them),
   and running out of memory there is fatal. 0 ok; -1 with a message on stderr (unsupported config, out of
   GPU memory for the parameters and optimizer state). */
int mhc_gpu_init(MhcGpu *g, const MhcModel *host, int B, int T);
void mhc_gpu_free(MhcGpu *g);
/* MHC_PREC_TF32 (default), MHC_PREC_FP32 (exact, tests) or MHC_PREC_BF16 (first use allocates the bf16
   parameter copy, and the next forward the operand scratch); call it between steps, not between a forward
   and its backward */
void mhc_gpu_set_precision(MhcGpu *g, int precision);
void mhc_gpu_set_tf32(MhcGpu *g, int enable);        /* 1: MHC_PREC_TF32, 0: MHC_PREC_FP32 (kept for old callers) */
/* 1: keep the residual streams and attention outputs, recompute the rest in the backward (see Memory
   above): the forward's FLOPs once more, less attention's, for much less activation memory. Then a
   forward without targets keeps logits only when B*T <= MHC_LOGIT_CHUNK_ROWS. Call it between steps,
   like mhc_gpu_set_precision. */
void mhc_gpu_set_recompute(MhcGpu *g, int enable);
/* With MHC_PREC_BF16, which of our own tensor-core kernels run on Hopper's wgmma (needs the sm_90a build)
   in place of mma.sync, the same sums in another order: MHC_WGMMA_EXPERTS the routed-expert GEMMs
   (expert_wgmma_kernel), MHC_WGMMA_ATTENTION the training attention's three kernels (forward, dK/dV, dQ:
   the *_wgmma_kernel, heads with d_qk <= 192, d_v <= 128). 0 (default): none. Returns -1 (with a message) when asked for on a GPU that is not
   a Hopper (compute capability 9.x), and changes nothing. */
enum { MHC_WGMMA_EXPERTS = 1, MHC_WGMMA_ATTENTION = 2 };
int mhc_gpu_set_wgmma(MhcGpu *g, int kernels);
/* 1 when the current GPU runs wgmma (compute capability 9.x) */
int mhc_gpu_has_wgmma(void);
/* device bytes of the activation buffers of a B x T training forward with that precision and recompute
   setting (what the first forward allocates); touches no GPU */
size_t mhc_gpu_acts_bytes(const MhcConfig *c, int B, int T, int precision, int recompute);
void mhc_gpu_upload(MhcGpu *g, const MhcModel *host);                 /* params, Adam m/v, expert bias, step */
void mhc_gpu_download(MhcGpu *g, MhcModel *host);    /* the same plus expert loads, and ce/aux of the last forward */
void mhc_gpu_download_grads(MhcGpu *g, MhcModel *host);               /* into host->grads                     */
void mhc_gpu_download_logits(MhcGpu *g, float *logits);  /* [B*T, V] raw logits of the last forward without targets */
/* tokens, targets: host arrays [B*T]; returns ce + aux like mhc_forward (targets NULL: ce = 0, raw logits kept) */
double mhc_gpu_forward(MhcGpu *g, const int *tokens, const int *targets, int B, int T);
void mhc_gpu_zero_grad(MhcGpu *g);                   /* grads and step_load                              */
void mhc_gpu_backward(MhcGpu *g);                    /* of the last forward, which must have had targets */
void mhc_gpu_scale_grads(MhcGpu *g, double scale);   /* K micro-batches: the mean is scale 1/K           */
double mhc_gpu_clip_grad(MhcGpu *g, double max_norm);                 /* returns the pre-clip global norm     */
void mhc_gpu_adamw_step(MhcGpu *g, double lr);                        /* step counter is g->step              */
void mhc_gpu_update_expert_bias(MhcGpu *g);          /* SPEC §11, after the optimizer step                  */
int mhc_gpu_cache_init(MhcGpuCache *c, const MhcGpu *g, int max_len);   /* 0 ok */
void mhc_gpu_cache_free(MhcGpuCache *c);
/* feeds one token at position c->len (absorbed MLA); writes logits [V] to a host array (NULL: leaves them
   on the device); 0 ok, -1 when the cache is full or the token is out of range. With c->use_graph (the
   default where MHC_DECODE_GRAPH) the steps after the first replay one captured CUDA graph; 0 runs every
   step launch by launch. */
int mhc_gpu_decode_step(MhcGpu *g, MhcGpuCache *c, int token, float *logits_host);
/* the most probable next token after the last decode step (the lowest id among equal logits, as a loop
   on the host finds it), found on the GPU: greedy decoding moves one int per token instead of V floats */
int mhc_gpu_decode_argmax(const MhcGpu *g, MhcGpuCache *c);
/* for sampling: the k (1..MHC_TOP_K_MAX, at most V) most probable next tokens after the last decode step,
   found on the GPU, so that k ids cross to the host instead of V floats. ids [k] and their logits [k],
   most probable first (equal logits: the lower id first, as for the argmax), and *denominator, the softmax
   denominator over all V at that temperature: sum_v exp((logit_v - logits[0]) / temperature), so token
   ids[i] has probability exp((logits[i] - logits[0]) / temperature) / *denominator. Returns how many it
   found: k, fewer only where NaN logits (never candidates) leave fewer numbers; -1 for a bad k or
   temperature (> 0). */
int mhc_gpu_decode_top_k(const MhcGpu *g, MhcGpuCache *c, int k, double temperature, int *ids, float *logits,
                         double *denominator);
size_t mhc_gpu_memory_bytes(const MhcGpu *g);        /* device bytes of g now (not of caches)               */

/* ---------------------------------------------------------------------------------------------
   0. Checks, device memory, reductions                                                          */
static void mhc_cuda_check(cudaError_t err, const char *file, int line) {
    if (err == cudaSuccess) return;
    fprintf(stderr, "mhc_cuda: CUDA error at %s:%d: %s\n", file, line, cudaGetErrorString(err));
    exit(1);
}
static void mhc_cublas_check(cublasStatus_t st, const char *file, int line) {
    if (st == CUBLAS_STATUS_SUCCESS) return;
    fprintf(stderr, "mhc_cuda: cuBLAS error at %s:%d: %s\n", file, line, cublasGetStatusString(st));
    exit(1);
}
#define CUDA_CHECK(call) mhc_cuda_check((call), __FILE__, __LINE__)
#define CUBLAS_CHECK(call) mhc_cublas_check((call), __FILE__, __LINE__)
#define LAUNCH_CHECK() CUDA_CHECK(cudaGetLastError())

/* a cuBLAS handle as the model uses it: deterministic (no atomics), on the stream the kernels use (with
   nvcc --default-stream per-thread, the thread's own, which decode's graph captures) */
static cublasHandle_t gpu_blas_handle(void) {
    cublasHandle_t h;
    CUBLAS_CHECK(cublasCreate(&h));
    CUBLAS_CHECK(cublasSetAtomicsMode(h, CUBLAS_ATOMICS_NOT_ALLOWED));
#ifdef CUDA_API_PER_THREAD_DEFAULT_STREAM
    CUBLAS_CHECK(cublasSetStream(h, cudaStreamPerThread));
#endif
    return h;
}

#define MHC_BLOCK 256            /* threads of the elementwise kernels                       */
#define MHC_ROW_WARPS 4          /* warps per block of the one-warp-per-row kernels          */
static unsigned mhc_blocks(size_t count, int per_block) { return (unsigned)((count + per_block - 1) / per_block); }

/* Programmatic dependent launch (sm_90): decode's kernels are each a few microseconds, and between two of
   them a GPU otherwise drains the first grid before it launches the next. A kernel launched with
   overlapped_launch may be launched while the kernel before it in the stream still runs, once that kernel
   has called grid_dependents_launch; it then first calls grid_dependency_wait, which returns once every
   grid it depends on has finished and its writes are visible. Such a kernel may do only what depends on
   no earlier kernel before its wait: compute indices and pull its weights toward L2 (prefetch_l2), or
   load them (the lone pre-stage's first rows of phi): before its wait only the kernel just before it may
   still run (that one passed its own wait first), and in decode no kernel writes a weight. It calls
   grid_dependents_launch right after the wait, not before: the kernel after it then starts while this one
   runs, never while the one before does. A kernel launched the plain way, or after a memory copy, returns
   from the wait at once. The host pass (dev/cuda_emu) runs kernels one after another, so there both calls
   do nothing. */
__device__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__)
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ void grid_dependents_launch() {
#if defined(__CUDA_ARCH__)
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

/* a line of 128 bytes per lane from p [n elements] toward L2, every lane of the warp calling */
template <typename T> __device__ void prefetch_l2(const T *p, size_t n) {
#if defined(__CUDA_ARCH__)
    constexpr size_t line = 128 / sizeof(T);
    for (size_t k = (threadIdx.x % 32) * line; k < n; k += 32 * line) asm volatile("prefetch.global.L2 [%0];" ::"l"(p + k));
#else
    (void)p;
    (void)n;
#endif
}

/* the configuration of a launch of grid x block threads with smem bytes of dynamic shared memory, on
   stream 0 (the default stream the build picked, as a plain launch uses), with programmatic dependent
   launch allowed (above) unless MHC_OVERLAPPED_LAUNCH is 0; launched by cudaLaunchKernelEx with the kernel
   and its arguments */
static cudaLaunchConfig_t overlapped_launch(dim3 grid, dim3 block, size_t smem) {
    static cudaLaunchAttribute overlap;          /* the same for every launch; configs point at it */
    overlap.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    overlap.val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem;
    config.stream = 0;
    config.attrs = &overlap;
    config.numAttrs = MHC_OVERLAPPED_LAUNCH ? 1 : 0;
    return config;
}

static void *arena_alloc(MhcGpuArena *ar, size_t bytes) {
    void *p = NULL;
    if (ar->measure) {
        ar->bytes += bytes;
        return NULL;
    }
    if (ar->failed) return NULL;
    if (ar->n == MHC_GPU_MAX_ALLOCS || cudaMalloc(&p, bytes ? bytes : 1) != cudaSuccess) {
        cudaGetLastError();                 /* clear it: the owner reports the failure */
        ar->failed = 1;
        return NULL;
    }
    ar->ptr[ar->n++] = p;
    ar->bytes += bytes;
    return p;
}
template <typename T> static T *arena_new(MhcGpuArena *ar, size_t count) { return (T *)arena_alloc(ar, count * sizeof(T)); }

static void arena_free(MhcGpuArena *ar) {
    for (int k = 0; k < ar->n; k++) CUDA_CHECK(cudaFree(ar->ptr[k]));
    memset(ar, 0, sizeof *ar);
}

struct SumOp { template <typename T> __device__ T operator()(T a, T b) const { return a + b; } };
struct MaxOp { template <typename T> __device__ T operator()(T a, T b) const { return a > b ? a : b; } };

/* butterfly over the 32 lanes: every lane ends with the same bits (a+b == b+a at every stage) */
template <typename T, typename Op> __device__ T warp_reduce(T v, Op op) {
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* an element of a weight as a float: fp32 as it is, or bf16 (decode's bf16 weights) exactly widened */
__device__ float weight_value(float w) { return w; }
__device__ float weight_value(__nv_bfloat16 w) { return __bfloat162float(w); }

/* a [16 bytes] . b: 4 fp32 weights, or 8 bf16 ones (a bf16 is the top half of an fp32) */
__device__ float chunk_dot(const float *a, const float *b) {
    float4 x = *(const float4 *)a, y = *(const float4 *)b;
    return x.x * y.x + x.y * y.y + x.z * y.z + x.w * y.w;
}
__device__ float chunk_dot(const __nv_bfloat16 *a, const float *b) {
    uint4 x = *(const uint4 *)a;
    float4 y = *(const float4 *)b, z = *(const float4 *)(b + 4);
    return __uint_as_float(x.x << 16) * y.x + __uint_as_float(x.x & 0xffff0000u) * y.y + __uint_as_float(x.y << 16) * y.z +
           __uint_as_float(x.y & 0xffff0000u) * y.w + __uint_as_float(x.z << 16) * z.x + __uint_as_float(x.z & 0xffff0000u) * z.y +
           __uint_as_float(x.w << 16) * z.z + __uint_as_float(x.w & 0xffff0000u) * z.w;
}

/* a . b over n elements by one warp, a of fp32 or bf16 (W), b fp32: lanes stride over 16-byte chunks
   (chunk_dot, where both rows start on 16 bytes and n is a multiple of a chunk), else over elements; then
   the butterfly; every lane gets the sum */
template <typename W> __device__ float warp_dot(const W *a, const float *b, int n) {
    constexpr int v = 16 / sizeof(W);              /* elements of a chunk */
    int lane = threadIdx.x % 32;
    float s = 0;
    if (n % v == 0 && (uintptr_t)a % 16 == 0 && (uintptr_t)b % 16 == 0) {
#pragma unroll 4                                   /* four loads in flight: a lone warp waits on memory */
        for (int k = v * lane; k < n; k += 32 * v) s += chunk_dot(a + k, b + k);
    } else {
#pragma unroll 4
        for (int k = lane; k < n; k += 32) s += weight_value(a[k]) * b[k];
    }
    return warp_reduce(s, SumOp());
}

/* whole block (blockDim a multiple of 32, every thread calling): warps reduce, then every thread
   combines the per-warp values in warp order, so all get the same result */
template <typename T, typename Op> __device__ T block_reduce(T v, Op op) {
    __shared__ T partial[32];
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
    v = warp_reduce(v, op);
    __syncthreads();                       /* the previous call's readers are done with partial */
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    T r = partial[0];
    for (int w = 1; w < n_warps; w++) r = op(r, partial[w]);
    return r;
}

__device__ float mhc_sigmoidf(float z) { return 1.0f / (1.0f + expf(-z)); }

/* ---------------------------------------------------------------------------------------------
   1. GEMMs                                                                                      */
enum { MHC_GEMM_FAST, MHC_GEMM_FP32 };   /* FAST follows MhcBlas.precision; FP32 always exact (coefficients, router) */

/* two floats as two bf16s in one word, rounded to nearest even (__float2bfloat16; NaN stays NaN), lo at
   the lower address */
__device__ unsigned bf16_pair(float lo, float hi) {
    return (unsigned)__bfloat16_as_ushort(__float2bfloat16(lo)) | (unsigned)__bfloat16_as_ushort(__float2bfloat16(hi)) << 16;
}

/* fp32 -> bf16, MHC_BF16_PER_THREAD elements a thread. Moving 6 bytes an element, it is bound by memory:
   where both pointers are 16-byte aligned (vec) a thread's 8 elements are two 16-byte loads and one
   16-byte store, else (and in the last, partial group) it converts them one at a time. */
#define MHC_BF16_PER_THREAD 8
__global__ void to_bf16_kernel(__nv_bfloat16 *dst, const float *src, size_t count, int vec) {
    size_t i = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) * MHC_BF16_PER_THREAD;
    if (vec && i + MHC_BF16_PER_THREAD <= count) {
        float4 a = *(const float4 *)(src + i), b = *(const float4 *)(src + i + 4);
        *(uint4 *)(dst + i) = make_uint4(bf16_pair(a.x, a.y), bf16_pair(a.z, a.w), bf16_pair(b.x, b.y), bf16_pair(b.z, b.w));
        return;
    }
    for (size_t j = i; j < i + MHC_BF16_PER_THREAD && j < count; j++) dst[j] = __float2bfloat16(src[j]);
}

static void gpu_to_bf16(__nv_bfloat16 *dst, const float *src, size_t count) {
    if (count == 0) return;
    int vec = (uintptr_t)dst % 16 == 0 && (uintptr_t)src % 16 == 0;
    to_bf16_kernel<<<mhc_blocks(mhc_blocks(count, MHC_BF16_PER_THREAD), MHC_BLOCK), MHC_BLOCK>>>(dst, src, count, vec);
    LAUNCH_CHECK();
}

/* The one map from a weight to its bf16 twin: a pointer inside the fp32 parameter slab bl->params maps to
   the same offset in bl->params_bf16 (which upload and AdamW keep equal to the RNE rounding of the slab).
   Any other pointer (an activation, a gradient) gives NULL: gemm converts that operand itself. */
static const __nv_bfloat16 *gemm_bf16_weight(const MhcBlas *bl, const float *p) {
    uintptr_t at = (uintptr_t)p, lo = (uintptr_t)bl->params;
    if (!bl->params || at < lo || at >= lo + bl->n_params * sizeof(float)) return NULL;
    return bl->params_bf16 + (p - bl->params);
}

/* A bf16 operand of gemm: the weight twin, or X rounded into scratch[which]. The operand is `batch` items
   `stride` apart of `rows` rows, `ld` apart, of `cols` used elements: the converted span is exactly
   (batch-1) stride + (rows-1) ld + cols elements, so the same strides and ld address the copy. */
static const __nv_bfloat16 *gemm_bf16_operand(const MhcBlas *bl, int which, const float *X, int rows, int cols, int ld,
                                              long long stride, int batch) {
    const __nv_bfloat16 *w = gemm_bf16_weight(bl, X);
    if (w) return w;
    size_t span = (size_t)(batch - 1) * (size_t)stride + (size_t)(rows - 1) * ld + cols;
    if (!bl->scratch[which] || span > bl->scratch_count) {
        fprintf(stderr, "mhc_cuda gemm: a bf16 operand of %zu elements does not fit the scratch of %zu (a bug)\n", span,
                bl->scratch[which] ? bl->scratch_count : 0);
        exit(1);
    }
    gpu_to_bf16(bl->scratch[which], X, span);
    return bl->scratch[which];
}

/* Every cuBLAS GEMM of the model goes through here.
   Row-major C[M,N] = alpha * op(A) @ op(B) + beta * C with A [M,K] ([K,M] when transA), B [K,N] ([N,K]
   when transB), and batch items strideA/strideB/strideC elements apart. cuBLAS is column-major and sees
   the transposes, so it computes C^T = op(B)^T @ op(A)^T: the operands swap.
   Precision of the MHC_GEMM_FAST class: FP32 exact, TF32 tensor cores (operands rounded to 10-bit
   mantissas), BF16 tensor cores (A and B in bf16: weights from the bf16 twin, everything else rounded
   into scratch here; fp32 accumulate, C stays fp32). MHC_GEMM_FP32 GEMMs are always exact fp32.
   rounded (BF16 only; MHC_A_ROUNDED | MHC_B_ROUNDED, or 0): scratch[0] holds A's rounded copy already,
   scratch[1] B's, from the caller's previous gemm with the same operand in the same place and span (an
   input shared by two products, gpu_matmul_backward's dout) or from the cross-entropy (dlogits16).      */
enum { MHC_A_ROUNDED = 1, MHC_B_ROUNDED = 2 };
static void gemm_core(const MhcBlas *bl, int prec, int rounded, int transA, int transB, int M, int N, int K, float alpha,
                      const float *A, long long strideA, const float *B, long long strideB, float beta, float *C,
                      long long strideC, int batch) {
    int lda = transA ? M : K, ldb = transB ? K : N;
    int fast = prec == MHC_GEMM_FAST;
    cublasComputeType_t compute = fast && bl->precision == MHC_PREC_TF32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    cudaDataType type = CUDA_R_32F;                 /* of A and B */
    const void *a = A, *b = B;
    if (fast && bl->precision == MHC_PREC_BF16) {
        type = CUDA_R_16BF;
        a = rounded & MHC_A_ROUNDED ? bl->scratch[0] : gemm_bf16_operand(bl, 0, A, transA ? K : M, transA ? M : K, lda, strideA, batch);
        b = rounded & MHC_B_ROUNDED ? bl->scratch[1] : gemm_bf16_operand(bl, 1, B, transB ? N : K, transB ? K : N, ldb, strideB, batch);
    }
    CUBLAS_CHECK(cublasGemmStridedBatchedEx(bl->handle, transB ? CUBLAS_OP_T : CUBLAS_OP_N, transA ? CUBLAS_OP_T : CUBLAS_OP_N,
                                            N, M, K, &alpha, b, type, ldb, strideB, a, type, lda, strideA,
                                            &beta, C, CUDA_R_32F, N, strideC, batch, compute, CUBLAS_GEMM_DEFAULT));
}

static void gemm(const MhcBlas *bl, int prec, int transA, int transB, int M, int N, int K, float alpha, const float *A,
                 long long strideA, const float *B, long long strideB, float beta, float *C, long long strideC, int batch) {
    gemm_core(bl, prec, 0, transA, transB, M, N, K, alpha, A, strideA, B, strideB, beta, C, strideC, batch);
}

/* out[O] = W[O,Ci] @ in[Ci], one warp per output: the product of a lone row (decode), a GEMV that only
   reads W once. cuBLAS took 5.0 us on average for decode's, this 4.4 (small, H100, 2026-11-23). W is fp32
   (exact), or in BF16 the weight's bf16 twin (MW = __nv_bfloat16: half the bytes, products and sums in
   fp32), see gpu_matvec. With W2 given, outputs [O, O + O2) are out2 = W2 @ in in the same launch: two
   products of one vector, one launch fewer where a launch costs more than the work. Launched overlapped:
   the warp's row of W heads for L2 while the kernel before still runs. */
template <typename MW>
__global__ void matvec_kernel(float *out, const MW *W, int O, float *out2, const MW *W2, int O2, const float *in, int Ci) {
    int o = blockIdx.x * MHC_ROW_WARPS + threadIdx.x / 32;
    const MW *row = o < O ? W + (size_t)o * Ci : o < O + O2 ? W2 + (size_t)(o - O) * Ci : NULL;
    if (row) prefetch_l2(row, Ci);
    grid_dependency_wait();
    grid_dependents_launch();
    if (!row) return;
    float s = warp_dot(row, in, Ci);
    if (threadIdx.x % 32 == 0) *(o < O ? out + o : out2 + (o - O)) = s;
}

/* Decode's weights: with prec MHC_GEMM_FAST in BF16 a decoded token reads every weight of the slab as its
   bf16 twin (gemm_bf16_weight), as the GEMMs of a longer forward do, at half the bytes; its activations
   stay fp32. Else (MHC_GEMM_FP32: the coefficient projections and the router; TF32, FP32) it reads the
   fp32 weight, exactly. NULL: read W itself. */
static const __nv_bfloat16 *decode_bf16_weight(const MhcBlas *bl, int prec, const float *W) {
    return prec == MHC_GEMM_FAST && bl->precision == MHC_PREC_BF16 ? gemm_bf16_weight(bl, W) : NULL;
}

/* out [O] = W in, and where W2 is given (else NULL, O2 0) out2 [O2] = W2 in, in one launch; the weights
   as decode_bf16_weight picks them */
static void gpu_matvec(const MhcBlas *bl, int prec, float *out, const float *W, int O, float *out2, const float *W2, int O2,
                       const float *in, int Ci) {
    cudaLaunchConfig_t config = overlapped_launch(mhc_blocks((size_t)O + O2, MHC_ROW_WARPS), 32 * MHC_ROW_WARPS, 0);
    const __nv_bfloat16 *W16 = decode_bf16_weight(bl, prec, W), *W2_16 = W2 ? decode_bf16_weight(bl, prec, W2) : NULL;
    if (W16 && (!W2 || W2_16))
        CUDA_CHECK(cudaLaunchKernelEx(&config, matvec_kernel<__nv_bfloat16>, out, W16, O, out2, W2_16, O2, in, Ci));
    else
        CUDA_CHECK(cudaLaunchKernelEx(&config, matvec_kernel<float>, out, W, O, out2, W2, O2, in, Ci));
}

/* out[N,O] = in[N,Ci] @ W[O,Ci]^T   (y = W @ x for each row; mhc.h matmul_forward); N = 1 by matvec_kernel.
   In BF16 `in` is A, rounded into scratch[0]; in_rounded = 1 says it is there already, from the previous
   product of the same `in` (two weights over one input: the FFN's W1 and W3, MLA's down-projections). */
static void gpu_matmul_forward_core(const MhcBlas *bl, int prec, int in_rounded, float *out, const float *in, const float *W,
                                    int N, int Ci, int O) {
    if (N == 1) {
        gpu_matvec(bl, prec, out, W, O, NULL, NULL, 0, in, Ci);
        return;
    }
    gemm_core(bl, prec, in_rounded ? MHC_A_ROUNDED : 0, 0, 1, N, O, Ci, 1.0f, in, 0, W, 0, 0.0f, out, 0, 1);
}

static void gpu_matmul_forward(const MhcBlas *bl, int prec, float *out, const float *in, const float *W, int N, int Ci, int O) {
    gpu_matmul_forward_core(bl, prec, 0, out, in, W, N, Ci, O);
}

/* din[N,Ci] += dout[N,O] @ W[O,Ci] (din may be NULL);  dW[O,Ci] += dout^T @ in (dW may be NULL).
   In BF16 both GEMMs read dout [N,O] as their A, the same span: it is rounded once, or not at all where
   dout_rounded says scratch[0] holds it rounded already (the head's dlogits, from the cross-entropy).
   `in` is dW's B, rounded into scratch[1]; in_rounded says it is there already, from the previous
   backward of a product of the same `in`. */
static void gpu_matmul_backward_core(const MhcBlas *bl, int prec, int dout_rounded, int in_rounded, float *din, float *dW,
                                     const float *dout, const float *in, const float *W, int N, int Ci, int O) {
    if (din) gemm_core(bl, prec, dout_rounded ? MHC_A_ROUNDED : 0, 0, 0, N, Ci, O, 1.0f, dout, 0, W, 0, 1.0f, din, 0, 1);
    if (dW)
        gemm_core(bl, prec, (dout_rounded || din != NULL ? MHC_A_ROUNDED : 0) | (in_rounded ? MHC_B_ROUNDED : 0), 1, 0, O, Ci, N,
                  1.0f, dout, 0, in, 0, 1.0f, dW, 0, 1);
}

static void gpu_matmul_backward(const MhcBlas *bl, int prec, float *din, float *dW, const float *dout, const float *in,
                                const float *W, int N, int Ci, int O) {
    gpu_matmul_backward_core(bl, prec, 0, 0, din, dW, dout, in, W, N, Ci, O);
}

/* Tensor-core fragments, for our own kernels (the routed-expert GEMMs below, attention in section 4).
   Every product is a warp's step D[16x8] += A[16x16] B[16x8] (PTX mma.sync, m16n8k16) on register
   fragments whose lane layout the PTX ISA fixes: with g = lane / 4 and t = lane % 4, a lane holds
     A: rows g and g+8, columns 2t, 2t+1, 2t+8, 2t+9   (four pairs of adjacent columns)
     B: column g, rows 2t, 2t+1, 2t+8, 2t+9            (two pairs of adjacent rows)
     D: rows g and g+8, columns 2t, 2t+1               (four floats)
   The template parameter P is the precision (mhc_gpu_set_precision):
     MHC_PREC_BF16  bf16 operands, one m16n8k16 step;
     MHC_PREC_TF32  TF32 operands, two m16n8k8 steps: a lane's column pair (2t, 2t+1) becomes those
                    steps' k = t and t+4 (a sum over k in any order, as long as A and B agree);
     MHC_PREC_FP32  exact fp32 FMAs, the operands gathered with warp shuffles: the tests' mode.
   The CPU emulation (dev/cuda_emu) makes every precision's products exactly from the rounded operands
   (mma_host), and emulates ldmatrix with its lanes' addresses shuffled, so it checks the layouts.
   Accumulators are fp32 in every mode. Operands wait in shared memory, rounded to P as they are stored. */

/* How precision P keeps an operand element in shared memory (elem) and a fragment's pair of elements
   adjacent along k in one register (pair). */
template <int P> struct MmaOperand {                  /* MHC_PREC_FP32, MHC_PREC_TF32: fp32 words */
    typedef float elem;
    typedef float2 pair;
    static __device__ elem round(float x) { return P == MHC_PREC_TF32 ? nvcuda::wmma::__float_to_tf32(x) : x; }
    static __device__ pair make(elem lo, elem hi) { return make_float2(lo, hi); }
    static __device__ float lo(pair p) { return p.x; }
    static __device__ float hi(pair p) { return p.y; }
};
template <> struct MmaOperand<MHC_PREC_BF16> {        /* bf16 bits, two to a 32-bit register, low first */
    typedef unsigned short elem;
    typedef unsigned pair;
    static __device__ elem round(float x) { return __bfloat16_as_ushort(__float2bfloat16(x)); }
    static __device__ pair make(elem lo, elem hi) { return (unsigned)lo | (unsigned)hi << 16; }
    static __device__ float lo(pair p) { return __uint_as_float(p << 16); }
    static __device__ float hi(pair p) { return __uint_as_float(p & 0xffff0000u); }
};

template <int P> using MmaElem = typename MmaOperand<P>::elem;

template <int P> struct MmaFragA { typename MmaOperand<P>::pair x[4]; };   /* (g|g+8, 2t|2t+8): x[0..3] */
template <int P> struct MmaFragB { typename MmaOperand<P>::pair x[2]; };   /* (2t|2t+8, g): x[0..1]      */

/* the elements at p and p + stride as a pair: stride 1 is one aligned load */
template <int P> __device__ typename MmaOperand<P>::pair mma_pair(const typename MmaOperand<P>::elem *p, int stride) {
    if (stride == 1) return *(const typename MmaOperand<P>::pair *)p;
    return MmaOperand<P>::make(p[0], p[stride]);
}

/* bf16 fragments come out of shared memory by ldmatrix: N 8x8 blocks of 16-bit elements in one
   instruction, lane l giving the address of row l % 8 of block l / 8 (base + offset, 16 rows of 8
   elements); a lane then holds the pair at row l / 4, columns 2 (l % 4), +1 of each block, or with Trans
   the pair at rows 2 (l % 4), +1, column l / 4. The host pass (dev/cuda_emu) does the same with the
   offsets shuffled between lanes. */
template <int N, bool Trans> __device__ void mma_ldmatrix(unsigned (&r)[N], const unsigned short *base, int offset) {
#if defined(__CUDA_ARCH__)
    unsigned addr = (unsigned)__cvta_generic_to_shared(base + offset);
    if constexpr (N == 4 && Trans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr) : "memory");
    else if constexpr (N == 4)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr) : "memory");
    else if constexpr (Trans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(addr) : "memory");
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(addr) : "memory");
#else
    int lane = threadIdx.x % 32;
    for (int m = 0; m < N; m++) {
        if (Trans) {
            int row0 = __shfl_sync(0xffffffffu, offset, 8 * m + 2 * (lane % 4));
            int row1 = __shfl_sync(0xffffffffu, offset, 8 * m + 2 * (lane % 4) + 1);
            r[m] = (unsigned)base[row0 + lane / 4] | (unsigned)base[row1 + lane / 4] << 16;
        } else {
            int row = __shfl_sync(0xffffffffu, offset, 8 * m + lane / 4) + 2 * (lane % 4);
            r[m] = (unsigned)base[row] | (unsigned)base[row + 1] << 16;
        }
    }
#endif
}

/* the A fragment of rows r0 .. r0+15, columns k0 .. k0+15 of an operand kept in shared memory as rows
   (element (r, k) at A[r ld + k]) or, KMajor, as rows of k (element (r, k) at A[k ld + r]; ldmatrix's
   Trans): blocks (rows, columns) at (0, 0), (8, 0), (0, 8), (8, 8) are x[0..3] */
template <int P, bool KMajor>
__device__ MmaFragA<P> mma_load_a(const typename MmaOperand<P>::elem *A, int ld, int r0, int k0) {
    int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    MmaFragA<P> a;
    if constexpr (P == MHC_PREC_BF16) {
        if (KMajor) mma_ldmatrix<4, true>(a.x, A, (k0 + lane / 16 * 8 + lane % 8) * ld + r0 + lane / 8 % 2 * 8);
        else mma_ldmatrix<4, false>(a.x, A, (r0 + lane % 16) * ld + k0 + lane / 16 * 8);
    } else if (KMajor) {
        const typename MmaOperand<P>::elem *p = A + (k0 + 2 * t) * ld + r0 + g;
        a = {{mma_pair<P>(p, ld), mma_pair<P>(p + 8, ld), mma_pair<P>(p + 8 * ld, ld), mma_pair<P>(p + 8 * ld + 8, ld)}};
    } else {
        const typename MmaOperand<P>::elem *p = A + (r0 + g) * ld + k0 + 2 * t;
        a = {{mma_pair<P>(p, 1), mma_pair<P>(p + 8 * ld, 1), mma_pair<P>(p + 8, 1), mma_pair<P>(p + 8 * ld + 8, 1)}};
    }
    return a;
}

/* the B fragment of rows k0 .. k0+15, columns n0 .. n0+7 of an operand kept in shared memory as rows of
   its columns (NMajor: element (k, n) at B[n ld + k], K for S = Q K^T) or as rows of k (element (k, n)
   at B[k ld + n], V for O = P V; ldmatrix's Trans) */
template <int P, bool NMajor>
__device__ MmaFragB<P> mma_load_b(const typename MmaOperand<P>::elem *B, int ld, int k0, int n0) {
    int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    MmaFragB<P> b;
    if constexpr (P == MHC_PREC_BF16) {
        if (NMajor) mma_ldmatrix<2, false>(b.x, B, (n0 + lane % 8) * ld + k0 + lane / 8 % 2 * 8);
        else mma_ldmatrix<2, true>(b.x, B, (k0 + lane % 16) * ld + n0);
    } else if (NMajor) {
        const typename MmaOperand<P>::elem *p = B + (n0 + g) * ld + k0 + 2 * t;
        b = {{mma_pair<P>(p, 1), mma_pair<P>(p + 8, 1)}};
    } else {
        const typename MmaOperand<P>::elem *p = B + (k0 + 2 * t) * ld + n0 + g;
        b = {{mma_pair<P>(p, ld), mma_pair<P>(p + 8 * ld, ld)}};
    }
    return b;
}

/* two accumulator tiles side by side (columns 8j .. 8j+15 of a warp's 16 rows) as the A fragment of those
   16 columns, rounded to the operand precision */
template <int P> __device__ MmaFragA<P> mma_acc_to_a(const float (&d0)[4], const float (&d1)[4]) {
    typedef MmaOperand<P> Op;
    MmaFragA<P> a = {{Op::make(Op::round(d0[0]), Op::round(d0[1])), Op::make(Op::round(d0[2]), Op::round(d0[3])),
                      Op::make(Op::round(d1[0]), Op::round(d1[1])), Op::make(Op::round(d1[2]), Op::round(d1[3]))}};
    return a;
}

/* the element of a fragment register pair that column (A) or row (B) k of its block selects */
template <int P> __device__ float mma_elem(typename MmaOperand<P>::pair p, int k) {
    return k % 2 ? MmaOperand<P>::hi(p) : MmaOperand<P>::lo(p);
}

/* d += a b on one 16x8 tile, k = 16, exactly: fp32 FMAs in k order. A(r, k) is in lane 4 (r % 8) + k % 8 / 2,
   B(k, n) in lane 4 n + k % 8 / 2; each k fetches this lane's A(g, k), A(g+8, k), B(k, 2t), B(k, 2t+1). */
template <int P> __device__ void mma_exact(float (&d)[4], const MmaFragA<P> &a, const MmaFragB<P> &b) {
    int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int k = 0; k < 16; k++) {
        int src = k % 8 / 2, hi = k / 8;
        float a_g = __shfl_sync(0xffffffffu, mma_elem<P>(a.x[2 * hi], k), 4 * g + src);
        float a_g8 = __shfl_sync(0xffffffffu, mma_elem<P>(a.x[2 * hi + 1], k), 4 * g + src);
        float b_k = mma_elem<P>(b.x[hi], k);
        float b0 = __shfl_sync(0xffffffffu, b_k, 8 * t + src), b1 = __shfl_sync(0xffffffffu, b_k, 8 * t + 4 + src);
        d[0] += a_g * b0;
        d[1] += a_g * b1;
        d[2] += a_g8 * b0;
        d[3] += a_g8 * b1;
    }
}

#if !defined(__CUDA_ARCH__)
/* The host pass (dev/cuda_emu) runs the warp's instruction as one step: every lane's fragments go through
   memory between two warp barriers, then each lane makes mma_exact's sums from the same lanes' elements.
   The emulation pays for a shuffle in fiber switches; this is 2 barriers per tile instead of 128. */
template <int P> __device__ void mma_host(float (&d)[4], const MmaFragA<P> &a, const MmaFragB<P> &b) {
    static MmaFragA<P> warp_a[32][32];             /* [warp][lane] */
    static MmaFragB<P> warp_b[32][32];
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
    warp_a[warp][lane] = a;
    warp_b[warp][lane] = b;
    __syncwarp();
    for (int k = 0; k < 16; k++) {
        int src = k % 8 / 2, hi = k / 8;
        const MmaFragA<P> &ag = warp_a[warp][4 * g + src];
        float a_g = mma_elem<P>(ag.x[2 * hi], k), a_g8 = mma_elem<P>(ag.x[2 * hi + 1], k);
        float b0 = mma_elem<P>(warp_b[warp][8 * t + src].x[hi], k), b1 = mma_elem<P>(warp_b[warp][8 * t + 4 + src].x[hi], k);
        d[0] += a_g * b0;
        d[1] += a_g * b1;
        d[2] += a_g8 * b0;
        d[3] += a_g8 * b1;
    }
    __syncwarp();                                  /* every lane has read before the next tile's writes */
}
#endif

/* d += a b on one 16x8 tile, k = 16: on tensor cores for BF16 and TF32 (one m16n8k16 step; two m16n8k8
   steps, k pairs 0 and 1 of the fragments, then 2 and 3), exactly for FP32 and in the host pass (which
   is what dev/cuda_emu runs, for every P) */
template <int P> __device__ void mma_tile(float (&d)[4], const MmaFragA<P> &a, const MmaFragB<P> &b) {
#if defined(__CUDA_ARCH__)
    if constexpr (P == MHC_PREC_BF16) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "r"(b.x[0]), "r"(b.x[1]));
    } else if constexpr (P == MHC_PREC_TF32) {
#pragma unroll
        for (int s = 0; s < 2; s++)
            asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                : "r"(__float_as_uint(a.x[2 * s].x)), "r"(__float_as_uint(a.x[2 * s + 1].x)),
                  "r"(__float_as_uint(a.x[2 * s].y)), "r"(__float_as_uint(a.x[2 * s + 1].y)),
                  "r"(__float_as_uint(b.x[s].x)), "r"(__float_as_uint(b.x[s].y)));
    } else {
        mma_exact<P>(d, a, b);
    }
#else
    mma_host<P>(d, a, b);
#endif
}

template <int NF> __device__ void mma_zero(float (&acc)[NF][4]) {
#pragma unroll
    for (int j = 0; j < NF; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) acc[j][e] = 0.0f;
}

/* acc[j] += a B[k0 .. k0+15, columns n0 + j nstep .. +7] for the warp's tiles j < n. NF is the array's
   size: the loop is unrolled over it so that acc stays in registers. */
template <int P, bool NMajor, int NF>
__device__ void mma_row(float (&acc)[NF][4], const MmaFragA<P> &a, const typename MmaOperand<P>::elem *B, int ld, int k0,
                        int n0, int nstep, int n) {
#pragma unroll
    for (int j = 0; j < NF; j++)
        if (j < n) mma_tile<P>(acc[j], a, mma_load_b<P, NMajor>(B, ld, k0, n0 + j * nstep));
}

/* acc[j] += A[r0 .. r0+15, 0 .. K) B[0 .. K, tile j) with A a row-major shared tile, K a multiple of 16 */
template <int P, bool NMajor, int NF>
__device__ void mma_smem(float (&acc)[NF][4], const typename MmaOperand<P>::elem *A, int lda, int r0,
                         const typename MmaOperand<P>::elem *B, int ldb, int K, int n0, int nstep, int n) {
#pragma unroll
    for (int k0 = 0; k0 < K; k0 += 16) mma_row<P, NMajor>(acc, mma_load_a<P, false>(A, lda, r0, k0), B, ldb, k0, n0, nstep, n);
}

/* cp.async (sm_80 on): BYTES (4 or 16) from global to shared memory without passing through registers,
   so the loads are in flight while the thread goes on (the expert GEMMs and attention: a tile's while
   the warps compute on another; a lone token's pre-stage: parameters only one block will use). With
   real = false the bytes are zero (source size 0: nothing is read). The copies a thread issues between
   two commits form a group; cp_async_wait<N>() returns once at most the N groups committed last are
   still in flight, and a __syncthreads after it makes every thread's arrived copies visible to the block.
   The host pass (dev/cuda_emu) keeps each thread's copies queued until its wait lets them land, so a
   read of a tile that no wait covered sees the old contents and a test fails. */
#if !defined(__CUDA_ARCH__)
enum { CP_ASYNC_HOST_MAX = 64 };                 /* queued copies per thread */
typedef struct {
    void *dst;
    const void *src;                             /* NULL: zeros */
    int bytes, group;
} CpAsyncHostCopy;
typedef struct {
    CpAsyncHostCopy copy[CP_ASYNC_HOST_MAX];
    int count, committed;                        /* copies queued; groups committed so far */
} CpAsyncHostQueue;
static CpAsyncHostQueue cp_async_host[1024];     /* [threadIdx.x]: one block runs at a time there */
#endif

template <int BYTES> __device__ void cp_async(void *dst, const void *src, bool real) {
#if defined(__CUDA_ARCH__)
    unsigned addr = (unsigned)__cvta_generic_to_shared(dst);
    if constexpr (BYTES == 16)                   /* .cg: 16-byte tiles skip L1 */
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(addr), "l"(src), "r"(real ? 16 : 0) : "memory");
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;" ::"r"(addr), "l"(src), "n"(BYTES), "r"(real ? BYTES : 0)
                     : "memory");
#else
    CpAsyncHostQueue *q = &cp_async_host[threadIdx.x];
    if (q->count == CP_ASYNC_HOST_MAX) {
        fprintf(stderr, "cp_async (host pass): more than %d copies in flight in one thread\n", CP_ASYNC_HOST_MAX);
        abort();
    }
    CpAsyncHostCopy c = {dst, real ? src : NULL, BYTES, q->committed};
    q->copy[q->count++] = c;
#endif
}

__device__ void cp_async_commit() {
#if defined(__CUDA_ARCH__)
    asm volatile("cp.async.commit_group;" ::: "memory");
#else
    cp_async_host[threadIdx.x].committed++;
#endif
}

template <int N> __device__ void cp_async_wait() {
#if defined(__CUDA_ARCH__)
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#else
    CpAsyncHostQueue *q = &cp_async_host[threadIdx.x];
    int kept = 0;
    for (int k = 0; k < q->count; k++) {
        CpAsyncHostCopy c = q->copy[k];
        if (c.group >= q->committed - N) q->copy[kept++] = c;   /* still in flight */
        else if (c.src) memcpy(c.dst, c.src, c.bytes);          /* an older group: it lands now */
        else memset(c.dst, 0, c.bytes);
    }
    q->count = kept;
#endif
}

/* Hopper's warpgroup products (wgmma, sm_90a only: the Makefile builds for it). A warpgroup, 4 warps from
   a warp index divisible by 4, makes D[64 x N] += A[64 x 16] B[16 x N]^T-as-stored (N 128 or 64), both operands read
   from shared memory through descriptors while the threads go on. Operand tiles are bf16 in the 128-byte
   swizzle: every line of 64 elements in 128 bytes, its eight 16-byte chunks XORed with the line's index
   mod 8, tiles 1024-byte aligned (wg_offset, in elements):
     K-major (lines are rows of the operand, k along them: A [M][K], B [N][K]): element (r, k) at
        64 r + 8 ((k / 8) ^ (r % 8)) + k % 8; the stride between groups of 8 rows (SBO) is 1024 bytes,
        and a K step of 16 starts 32 bytes further along the lines;
     MN-major (lines of k, r along them: an operand stored [K][M] or [K][N], read with trans-a / trans-b):
        atoms of 64 r x 64 k, 4096 elements, one after another along r (LBO 8192 bytes); element (r, k) at
        4096 (r / 64) + 64 k + 8 ((r % 64 / 8) ^ (k % 8)) + r % 8; SBO 1024 bytes between groups of 8
        lines, and a K step of 16 starts 16 lines further.
   The accumulator: thread l of warp w of the warpgroup holds D[16 w + l / 4 + 8 h][8 j + 2 (l % 4) + b] in
   d[j][2 h + b]. dev/wgmma_probe checks these readings on a GPU against exact sums; the host pass
   (dev/cuda_emu) makes each thread's sums from the tiles through wg_offset, in k order, so it checks
   everything around the instruction but not the readings themselves. */
__host__ __device__ int wg_offset(bool mn_major, int r, int k) {
    if (mn_major) return 4096 * (r / 64) + 64 * k + 8 * ((r % 64 / 8) ^ (k % 8)) + r % 8;
    return 64 * r + 8 * ((k / 8) ^ (r % 8)) + k % 8;
}

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
/* the descriptor of a tile's K step from k0: start address, LBO and SBO (each in 16 bytes) at bits 0, 16
   and 32, the 128-byte swizzle (1) at bit 62; K-major tiles leave LBO unused (1 by convention) */
__device__ uint64_t wg_descriptor(const unsigned short *tile, bool mn_major, int k0) {
    uint32_t start = (uint32_t)__cvta_generic_to_shared(tile + (mn_major ? 64 * k0 : k0));
    uint64_t lbo = mn_major ? 8192 : 16, sbo = 1024;
    return (uint64_t)((start & 0x3FFFF) >> 4) | (lbo >> 4) << 16 | (sbo >> 4) << 32 | 1ull << 62;
}
#endif

/* d (+)= A[64 rows from A, k0 .. k0+15] B[N rows, k0 .. k0+15]^T, issued (not yet complete: wg_wait); N is 128
   or 64 (m64n128k16, m64n64k16). A_MN, B_MN: the tiles' orders (MN-major: trans-a, trans-b). d holds the
   thread's accumulators as N / 8 tiles of 8 columns, d[j][2 h + b] (above): mma.sync's D tiles, so code
   written for those reads them as they are. */
template <bool A_MN, bool B_MN, int N = 128>
__device__ void wg_product(float (&d)[N / 8][4], const unsigned short *A, const unsigned short *B, int k0) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    uint64_t da = wg_descriptor(A, A_MN, k0), db = wg_descriptor(B, B_MN, k0);
    if constexpr (N == 128) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
                     "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                     "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
                     "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
                     "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
                     "%64, %65, p, 1, 1, %67, %68;\n}\n"
                     : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
                       "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
                       "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
                       "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),
                       "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),
                       "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),
                       "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),
                       "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
                     : "l"(da), "l"(db), "r"(1), "n"(A_MN ? 1 : 0), "n"(B_MN ? 1 : 0));
    } else {
        static_assert(N == 64, "wg_product: N is 128 or 64");
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
                     "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                     "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
                     "%32, %33, p, 1, 1, %35, %36;\n}\n"
                     : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
                       "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
                       "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
                       "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
                     : "l"(da), "l"(db), "r"(1), "n"(A_MN ? 1 : 0), "n"(B_MN ? 1 : 0));
    }
#elif defined(__CUDA_ARCH__)
    (void)d, (void)A, (void)B, (void)k0;
    printf("mhc_cuda: the wgmma kernels need an sm_90a build (make gpu builds one)\n");
    __trap();
#else
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32 % 4;
    for (int j = 0; j < N / 8; j++)
        for (int e = 0; e < 4; e++) {
            int r = 16 * warp + lane / 4 + 8 * (e / 2), c = 8 * j + 2 * (lane % 4) + e % 2;
            float s = d[j][e];
            for (int k = k0; k < k0 + 16; k++)
                s += __uint_as_float((unsigned)A[wg_offset(A_MN, r, k)] << 16) *
                     __uint_as_float((unsigned)B[wg_offset(B_MN, c, k)] << 16);
            d[j][e] = s;
        }
#endif
}

/* d (+)= A[the warpgroup's 64 rows, 16 columns] B[N rows, k0 .. k0+15]^T (N 128 or 64) with A from registers:
   each warp's 16 rows as mma.sync's m16n8k16 A fragment (a, the layout of section 1, which wgmma's register
   operand shares: CUTLASS's ALayout_64x16), B from shared memory as in wg_product. Attention takes P and dS
   this way, straight from the softmax's accumulators (mma_acc_to_a), as FlashAttention-3 does. a must not
   change until wg_wait. */
template <bool B_MN, int N = 128>
__device__ void wg_product_regs(float (&d)[N / 8][4], const MmaFragA<MHC_PREC_BF16> &a, const unsigned short *B, int k0) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    uint64_t db = wg_descriptor(B, B_MN, k0);
    if constexpr (N == 128) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
                     "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                     "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
                     "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
                     "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
                     "{%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
                     : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
                       "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
                       "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
                       "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),
                       "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),
                       "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),
                       "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),
                       "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
                     : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "l"(db), "r"(1), "n"(B_MN ? 1 : 0));
    } else {
        static_assert(N == 64, "wg_product_regs: N is 128 or 64");
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
                     "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                     "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
                     "{%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
                     : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
                       "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
                       "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
                       "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
                     : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "l"(db), "r"(1), "n"(B_MN ? 1 : 0));
    }
#elif defined(__CUDA_ARCH__)
    (void)d, (void)a, (void)B, (void)k0;
    printf("mhc_cuda: the wgmma kernels need an sm_90a build (make gpu builds one)\n");
    __trap();
#else
    /* as mma_host: the warp's fragments through memory between two warp barriers; row g (+8) of the warp's
       16 is in lanes 4 g .. 4 g + 3, columns 2 t, 2 t + 1 (+8) in lane 4 g + t */
    typedef MmaOperand<MHC_PREC_BF16> Op;
    static MmaFragA<MHC_PREC_BF16> warp_a[32][32];   /* [warp][lane] */
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4;
    warp_a[warp][lane] = a;
    __syncwarp();
    for (int j = 0; j < N / 8; j++)
        for (int e = 0; e < 4; e++) {
            int h = e / 2, c = 8 * j + 2 * (lane % 4) + e % 2;
            float s = d[j][e];
            for (int k = 0; k < 16; k++) {
                unsigned pair = warp_a[warp][4 * g + k % 8 / 2].x[2 * (k / 8) + h];
                s += (k % 2 ? Op::hi(pair) : Op::lo(pair)) * __uint_as_float((unsigned)B[wg_offset(B_MN, c, k0 + k)] << 16);
            }
            d[j][e] = s;
        }
    __syncwarp();                                    /* every lane has read before the next product's writes */
#endif
}

/* the warpgroup's ordering around its products: wg_fence before the first of a batch (the accumulators'
   registers, and shared memory that cp.async or ordinary stores wrote, become the tensor cores' to read),
   wg_commit after the batch, wg_wait<N> until all but the N latest committed batches have completed (the
   shared memory the others read may then be rewritten; N = 0: all, and the accumulators may be read).
   The host pass runs the products at once: there they are empty. */
__device__ void wg_fence() {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ void wg_commit() {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N = 0> __device__ void wg_wait() {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
/* The accumulators as operands of an empty instruction, just before wg_fence and just after wg_wait: the
   fence and the wait name no registers, so without it the compiler could move the accumulators' zeroing
   past the fence or their first read before the wait (CUTLASS's warpgroup_fence_operand does the same). */
template <int NF> __device__ void wg_hold(float (&d)[NF][4]) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#pragma unroll
    for (int v = 0; v < 4 * NF; v++) asm volatile("" : "+f"(d[v / 4][v % 4])::"memory");
#else
    (void)d;
#endif
}
/* the first 1024-byte boundary of a kernel's dynamic shared memory, where its wgmma tiles start (the
   128-byte swizzle repeats every 1024 bytes, and the descriptors assume tiles start on one); the kernel
   asks for 1024 bytes more than its tiles take */
__device__ unsigned short *wg_tiles(uint8_t *smem) {
#if defined(__CUDA_ARCH__)
    unsigned misalign = (unsigned)__cvta_generic_to_shared(smem) % 1024;
#else
    unsigned misalign = (unsigned)((uintptr_t)smem % 1024);
#endif
    return (unsigned short *)(smem + (1024 - misalign) % 1024);
}

/* shared memory written by the threads (cp.async included) and read next by the tensor cores through a
   descriptor: each writer's fence, then the block's barrier */
__device__ void wg_fence_shared() {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

/* Routed-expert GEMMs (SPEC §11) over token rows grouped by expert: rows seg[e] .. seg[e+1]-1 belong to
   expert e, whose weight is W_e = W + e * w_stride. The row counts live on the GPU (no host round trip),
   so these are our own tiled kernels rather than cuBLAS. Row-major, fixed summation order.
     kseg = 0:  C[rows] = A[rows] @ op(W_e) + beta * C[rows]     (B = W, op = ^T when transB; M = rows of e)
     kseg = 1:  W_e    += A[rows]^T @ B[rows]                   (C = W; K = rows of e, M and N fixed; no transB)
   One block computes a 128 x 128 tile of one expert's output with 256 threads. For kseg = 0 the row tiles
   of all experts are packed into gridDim.x (expert e's tiles follow expert e-1's, and eg_tile finds its
   expert by walking seg), so no block is launched for rows an expert does not have.
   The operands are in memory as the precision P multiplies them (MmaElem<P>: fp32 words, or in BF16 the
   bf16 copies gpu_expert_gemm makes), so K goes in 32-deep slabs straight from memory into shared memory
   by cp.async, through eg_stages(P) stages: the next stages' slabs are in flight while the block
   multiplies one, as in CUTLASS's multistage GEMMs. Each operand is copied in its own memory order (no
   transpose on the way in); the fragment loads read it in that order (ldmatrix's Trans where k is the
   line), TF32's rounding the words as they load. The multiply is mma.sync (tensor-core fragments above):
   8 warps, each a 64 x 32 part of the tile as 4 x 4 m16n8 accumulators, stored from registers straight
   to C.
   kseg = 1 has only E x (M/128) x (N/128) tiles, too few blocks to fill the GPU on small models, so there
   each expert's rows are split into S parts (eg_splits: from the shapes alone); split s writes its partial
   product to scratch [S][E][M][N] and expert_gemm_reduce_kernel adds the partials to W_e in split order,
   so the result does not depend on timing.                                                             */
#define EG_TILE 128
#define EG_K 32                            /* K slab per shared-memory stage                            */
#define EG_THREADS 256
#define EG_LD_I (EG_K + 8)                 /* line stride of an i-major slab [128][32]                   */
#define EG_OPERAND (EG_TILE * EG_LD_I)     /* elements of one operand slab, the larger of the two orders  */
static_assert(EG_OPERAND >= EG_K * (EG_TILE + 8), "a k-major slab [32][eg_ld_k] fits EG_OPERAND");
#define EG_TARGET_BLOCKS 512               /* kseg = 1: split rows until about this many blocks          */
#define EG_MAX_SPLITS 8
#define EG_MIN_SPLIT_ROWS 256              /* ... keeping at least this many rows per split on average   */

/* shared-memory stages of the pipeline: 4 of 20 KB in BF16, 3 of 40 KB in fp32 words */
static constexpr __host__ __device__ int eg_stages(int P) { return P == MHC_PREC_BF16 ? 4 : 3; }

/* blocks of 256 threads an SM should hold at once (__launch_bounds__): in BF16 two, for twice the warps
   to hide the loads' latency; its 80 KB of stages fit twice in an SM's shared memory, and the bound holds
   the kernel to 128 registers (ptxas, nvcc 13.0, takes 122-128 unbounded; one more and only one block
   would fit). fp32 words' 120 KB of stages fit once: 0, no minimum asked */
static constexpr __host__ __device__ int eg_min_blocks(int P) { return P == MHC_PREC_BF16 ? 2 : 0; }

/* A and B hold MmaElem<P> of the launch's precision P (fp32 words, or bf16 copies); C is fp32 */
typedef struct {
    float *C;
    const void *A, *B;
    int ldc, lda, ldb, transB, kseg;
    size_t w_stride;
    const int *seg;
    int E, Mfix, N, Kfix;
    float beta;
    int splits;                            /* kseg = 1: S; partial [S][E][M][N] when S > 1               */
    float *partial;
} MhcExpertGemm;

/* this block's problem: expert e, output tile (i0, j0), M x K, into C (row stride ldc, C = tile + beta C);
   M = 0 when the block has no tile */
template <int P> struct MhcExpertTile {
    int M, K, i0, j0, ldc;
    float beta;
    const MmaElem<P> *A, *B;
    float *C;
};

template <int P> __device__ MhcExpertTile<P> eg_tile(const MhcExpertGemm &g) {
    MhcExpertTile<P> t = {0, 0, 0, (int)blockIdx.y * EG_TILE, g.ldc, g.beta, NULL, NULL, NULL};
    int e = g.kseg ? blockIdx.z / g.splits : 0, split = g.kseg ? blockIdx.z % g.splits : 0, tile = blockIdx.x;
    if (!g.kseg)                                   /* walk the experts' packed row tiles */
        for (e = 0; e < g.E; e++) {
            int tiles = (g.seg[e + 1] - g.seg[e] + EG_TILE - 1) / EG_TILE;
            if (tile < tiles) break;
            tile -= tiles;
        }
    if (e >= g.E) return t;
    int r0 = g.seg[e], rows = g.seg[e + 1] - r0;
    if (g.kseg && g.splits > 1) {                  /* this split's share of the rows (maybe none: then zeros) */
        int per = (rows + g.splits - 1) / g.splits, lo = min(rows, split * per);
        r0 += lo;
        rows = min(rows - lo, per);
    }
    const MmaElem<P> *A = (const MmaElem<P> *)g.A, *B = (const MmaElem<P> *)g.B;
    t.M = g.kseg ? g.Mfix : rows;
    t.K = g.kseg ? rows : g.Kfix;
    t.i0 = tile * EG_TILE;
    if (t.i0 >= t.M) t.M = 0;
    t.A = A + (size_t)r0 * g.lda;
    t.B = g.kseg ? B + (size_t)r0 * g.ldb : B + e * g.w_stride;
    t.C = g.kseg ? g.C + e * g.w_stride : g.C + (size_t)r0 * g.ldc;
    if (g.kseg && g.splits > 1) {
        t.C = g.partial + ((size_t)split * g.E + e) * g.Mfix * g.N;
        t.ldc = g.N;
        t.beta = 0.0f;
    }
    return t;
}

/* One operand slab of depth KD in its memory order: `outer` lines of `inner` contiguous elements, line o
   at src + o ld; elements past (outer_n, inner_n) read as zero. i-major (rows of the tile outer, k inner):
   [128][KD]; k-major: [KD][128]. */
template <int P> struct MhcEgSlab {
    const MmaElem<P> *src;
    int ld, kmajor, inner, outer_n, inner_n;
};

template <int P, int KD>
__device__ MhcEgSlab<P> eg_slab(const MmaElem<P> *base, int ld, int kmajor, int r0, int rows, int k0, int K) {
    MhcEgSlab<P> s;
    s.ld = ld;
    s.kmajor = kmajor;
    if (kmajor) { s.src = base + (size_t)k0 * ld + r0; s.inner = EG_TILE; s.outer_n = K - k0; s.inner_n = rows - r0; }
    else        { s.src = base + (size_t)r0 * ld + k0; s.inner = KD;      s.outer_n = rows - r0; s.inner_n = K - k0; }
    return s;
}

/* Line stride of a k-major slab [32][128]. A fragment's 8 rows x 4 pairs fall in distinct banks: fp32
   words read a pair as two loads ld apart (132: 8t + g), bf16 rows go to ldmatrix and must start on 16
   bytes (136: rows 4 words apart). The i-major stride EG_LD_I serves both. */
static constexpr __host__ __device__ int eg_ld_k(int P) { return P == MHC_PREC_BF16 ? EG_TILE + 8 : EG_TILE + 4; }

/* slab s (depth KD) into shared memory at line stride ld, or with SWIZZLED in the layout wgmma reads
   (wg_offset: a chunk stays 8 contiguous elements), as 16-byte chunks (4 fp32 words or 8 bf16)
   EG_THREADS apart: each of this thread's chunks by one cp.async (zeros where it lies past the slab's
   lines or elements) when the rows are 16-byte aligned and the chunk whole or empty, else element by
   element at once (the tests' odd shapes; a partial last chunk). The copies land at the caller's
   cp_async_wait that covers this group. */
template <int P, int KD, bool SWIZZLED> __device__ void eg_load(MmaElem<P> *dst, MhcEgSlab<P> s, int ld) {
    constexpr int w = 16 / sizeof(MmaElem<P>), chunks = EG_TILE * KD / w / EG_THREADS;
    bool aligned = (uintptr_t)s.src % 16 == 0 && s.ld % w == 0;
#pragma unroll
    for (int q = 0; q < chunks; q++) {
        int at = threadIdx.x + q * EG_THREADS, o = at / (s.inner / w), c = at % (s.inner / w) * w;
        const MmaElem<P> *p = s.src + (size_t)o * s.ld + c;
        MmaElem<P> *out = dst + (!SWIZZLED ? o * ld + c : s.kmajor ? wg_offset(true, c, o) : wg_offset(false, o, c));
        int have = o < s.outer_n ? min(max(s.inner_n - c, 0), w) : 0;     /* real elements of the chunk */
        if (aligned && (have == w || have == 0)) {
            cp_async<16>(out, have ? p : s.src, have == w);
        } else {
            for (int x = 0; x < w; x++) out[x] = x < have ? p[x] : (MmaElem<P>)0;
        }
    }
}

/* TF32: a fragment's fp32 words rounded as the tensor cores take them. The expert GEMM's stages hold the
   words as cp.async brought them, so it rounds in registers, once per fragment load: rounding in shared
   memory would read and write every element once more. FP32 and BF16 fragments stay as they are. */
template <int P, int N> __device__ void mma_round_pairs(typename MmaOperand<P>::pair (&x)[N]) {
    if constexpr (P == MHC_PREC_TF32) {
#pragma unroll
        for (int i = 0; i < N; i++) x[i] = MmaOperand<P>::make(MmaOperand<P>::round(x[i].x), MmaOperand<P>::round(x[i].y));
    }
}

/* acc += this slab's product for the warp's 64 x 32 part of the tile (rows wi + 16x, columns wj + 8y) */
template <int P, bool A_KMAJOR, bool B_KMAJOR>
__device__ void eg_multiply(float (&acc)[4][4][4], const typename MmaOperand<P>::elem *As, const typename MmaOperand<P>::elem *Bs) {
    int warp = threadIdx.x / 32, wi = warp / 4 * 64, wj = warp % 4 * 32;
    int lda = A_KMAJOR ? eg_ld_k(P) : EG_LD_I, ldb = B_KMAJOR ? eg_ld_k(P) : EG_LD_I;
#pragma unroll
    for (int k = 0; k < EG_K; k += 16) {
        MmaFragA<P> a[4];
        MmaFragB<P> b[4];
#pragma unroll
        for (int x = 0; x < 4; x++) {
            a[x] = mma_load_a<P, A_KMAJOR>(As, lda, wi + 16 * x, k);
            mma_round_pairs<P>(a[x].x);
        }
#pragma unroll
        for (int y = 0; y < 4; y++) {
            b[y] = mma_load_b<P, !B_KMAJOR>(Bs, ldb, k, wj + 8 * y);
            mma_round_pairs<P>(b[y].x);
        }
#pragma unroll
        for (int x = 0; x < 4; x++)
#pragma unroll
            for (int y = 0; y < 4; y++) mma_tile<P>(acc[x][y], a[x], b[y]);
    }
}

/* slab `slab` of both operands (K from slab * EG_K) into its stage, slab mod S of the ring */
template <int P, bool A_KMAJOR, bool B_KMAJOR>
__device__ void eg_load_slab(MmaElem<P> *stages, const MhcExpertTile<P> &t, const MhcExpertGemm &g, int slab) {
    MmaElem<P> *As = stages + slab % eg_stages(P) * 2 * EG_OPERAND, *Bs = As + EG_OPERAND;
    eg_load<P, EG_K, false>(As, eg_slab<P, EG_K>(t.A, g.lda, A_KMAJOR, t.i0, t.M, slab * EG_K, t.K),
                            A_KMAJOR ? eg_ld_k(P) : EG_LD_I);
    eg_load<P, EG_K, false>(Bs, eg_slab<P, EG_K>(t.B, g.ldb, B_KMAJOR, t.j0, g.N, slab * EG_K, t.K),
                            B_KMAJOR ? eg_ld_k(P) : EG_LD_I);
}

/* C[i][j] = v (+ beta C) for an element (i, j) of the tile's problem; outside it, nothing */
template <int P> __device__ void eg_store(const MhcExpertTile<P> &t, int N, int i, int j, float v) {
    if (i >= t.M || j >= N) return;
    float *c = t.C + (size_t)i * t.ldc + j;
    *c = t.beta == 0.0f ? v : v + t.beta * *c;
}

/* A_KMAJOR = kseg (op(A) = A^T), B_KMAJOR = !transB; P: the operand precision. The first S - 1 slabs go
   in flight, then at each step the block waits for slab kt, issues slab kt + S - 1 into the stage that
   slab kt - 1 left (every warp being past it), and multiplies slab kt. */
template <int P, bool A_KMAJOR, bool B_KMAJOR>
__global__ void __launch_bounds__(EG_THREADS, eg_min_blocks(P)) expert_gemm_kernel(MhcExpertGemm g) {
    constexpr int S = eg_stages(P);
    extern __shared__ __align__(32) float smem[];
    MhcExpertTile<P> t = eg_tile<P>(g);
    if (!t.M) return;
    float acc[4][4][4];
    for (int x = 0; x < 4; x++) mma_zero(acc[x]);
    int slabs = (t.K + EG_K - 1) / EG_K;
    MmaElem<P> *stages = (MmaElem<P> *)smem;       /* [S stages][A, B][EG_OPERAND] */
    for (int s = 0; s < S - 1; s++) {
        if (s < slabs) eg_load_slab<P, A_KMAJOR, B_KMAJOR>(stages, t, g, s);
        cp_async_commit();                         /* (empty past the last slab: the count stays) */
    }
    for (int kt = 0; kt < slabs; kt++) {
        cp_async_wait<S - 2>();                    /* this thread's copies of slab kt have landed */
        __syncthreads();                           /* everyone's; and every warp is past slab kt - 1 */
        if (kt + S - 1 < slabs) eg_load_slab<P, A_KMAJOR, B_KMAJOR>(stages, t, g, kt + S - 1);
        cp_async_commit();
        const MmaElem<P> *As = stages + kt % S * 2 * EG_OPERAND;
        eg_multiply<P, A_KMAJOR, B_KMAJOR>(acc, As, As + EG_OPERAND);
    }
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    int i_0 = t.i0 + warp / 4 * 64 + lane / 4, j_0 = t.j0 + warp % 4 * 32 + 2 * (lane % 4);
    for (int x = 0; x < 4; x++)
        for (int y = 0; y < 4; y++)
            for (int e = 0; e < 4; e++) eg_store<P>(t, g.N, i_0 + 16 * x + 8 * (e / 2), j_0 + 8 * y + e % 2, acc[x][y][e]);
}

/* The BF16 tile kernel on wgmma (mhc_gpu_set_wgmma, MHC_WGMMA_EXPERTS): the same problems, tiles and cp.async ring,
   with slabs 64 deep laid out as wgmma reads them (wg_offset) and each warpgroup's 64 x 128 half of the
   tile made by four m64n128k16 products a slab, 64 accumulators a thread in place of mma.sync's 4 x 4
   tiles. A stage is refilled only once the products that read it are complete: each slab's products end
   in wg_wait<MHC_EXPERT_WGMMA_INFLIGHT>, before the next barrier, and the refill comes after that barrier.
   With INFLIGHT 0 a warpgroup waits for its slab's products before the next slab's, and EGW_STAGES - 1
   slabs load meanwhile. With 1 the next slab's products are issued while the last ones still run (as
   CUTLASS's Hopper mainloop keeps one batch in flight), so a stage stays busy one slab longer and
   EGW_STAGES - 2 slabs load ahead. Which is faster is for a GPU to say (dev/gpu_check.sh builds
   bench_expert both ways); the build knobs are MHC_EXPERT_WGMMA_INFLIGHT (0, 1) and
   MHC_EXPERT_WGMMA_STAGES (3: two blocks fit an SM's shared memory; 4: one). */
#ifndef MHC_EXPERT_WGMMA_INFLIGHT
#define MHC_EXPERT_WGMMA_INFLIGHT 0
#endif
#ifndef MHC_EXPERT_WGMMA_STAGES
#define MHC_EXPERT_WGMMA_STAGES 3
#endif
#define EGW_K 64                           /* K slab: one 128-byte line of bf16 per row             */
#define EGW_STAGES MHC_EXPERT_WGMMA_STAGES /* of 32 KB each                                        */
#define EGW_AHEAD (EGW_STAGES - 1 - MHC_EXPERT_WGMMA_INFLIGHT)   /* slabs loading while one is multiplied */
#define EGW_OPERAND (EG_TILE * EGW_K)      /* bf16 elements of one operand's slab                  */
#define EGW_SMEM_BYTES (EGW_STAGES * 2 * EGW_OPERAND * 2 + 1024)   /* the stages, and room to align them */
static_assert(MHC_EXPERT_WGMMA_INFLIGHT == 0 || MHC_EXPERT_WGMMA_INFLIGHT == 1, "MHC_EXPERT_WGMMA_INFLIGHT is 0 or 1");
static_assert(EGW_AHEAD >= 1 && EGW_SMEM_BYTES <= 227 * 1024, "MHC_EXPERT_WGMMA_STAGES: from 2 + INFLIGHT to 7");

template <bool A_KMAJOR, bool B_KMAJOR>
__device__ void egw_load_slab(unsigned short *stages, const MhcExpertTile<MHC_PREC_BF16> &t, const MhcExpertGemm &g, int slab) {
    unsigned short *As = stages + slab % EGW_STAGES * 2 * EGW_OPERAND, *Bs = As + EGW_OPERAND;
    eg_load<MHC_PREC_BF16, EGW_K, true>(As, eg_slab<MHC_PREC_BF16, EGW_K>(t.A, g.lda, A_KMAJOR, t.i0, t.M, slab * EGW_K, t.K), 0);
    eg_load<MHC_PREC_BF16, EGW_K, true>(Bs, eg_slab<MHC_PREC_BF16, EGW_K>(t.B, g.ldb, B_KMAJOR, t.j0, g.N, slab * EGW_K, t.K), 0);
}

template <bool A_KMAJOR, bool B_KMAJOR>
__global__ void __launch_bounds__(EG_THREADS, 2 * EGW_SMEM_BYTES <= 227 * 1024 ? 2 : 1) expert_wgmma_kernel(MhcExpertGemm g) {
    extern __shared__ uint8_t egw_smem[];
    MhcExpertTile<MHC_PREC_BF16> t = eg_tile<MHC_PREC_BF16>(g);
    if (!t.M) return;
    unsigned short *stages = wg_tiles(egw_smem);  /* [S][A, B][EGW_OPERAND] */
    int wg = threadIdx.x / 128;                    /* this warpgroup's rows of the tile: 64 wg .. 64 wg + 63 */
    float acc[16][4];
    mma_zero(acc);
    int slabs = (t.K + EGW_K - 1) / EGW_K;
    for (int s = 0; s < EGW_AHEAD; s++) {
        if (s < slabs) egw_load_slab<A_KMAJOR, B_KMAJOR>(stages, t, g, s);
        cp_async_commit();                         /* (empty past the last slab: the count stays) */
    }
    for (int kt = 0; kt < slabs; kt++) {
        cp_async_wait<EGW_AHEAD - 1>();            /* this thread's copies of slab kt have landed */
        wg_fence_shared();                         /* the landed copies, for the tensor cores */
        __syncthreads();                           /* everyone's; both warpgroups' products of slab kt - 1 - INFLIGHT are
                                                      complete, so its stage, the one refilled here, is free */
        if (kt + EGW_AHEAD < slabs) egw_load_slab<A_KMAJOR, B_KMAJOR>(stages, t, g, kt + EGW_AHEAD);
        cp_async_commit();
        const unsigned short *As = stages + kt % EGW_STAGES * 2 * EGW_OPERAND, *Bs = As + EGW_OPERAND;
        wg_hold(acc);
        wg_fence();
#pragma unroll
        for (int k0 = 0; k0 < EGW_K; k0 += 16) wg_product<A_KMAJOR, B_KMAJOR>(acc, As + 4096 * wg, Bs, k0);
        wg_commit();
        wg_wait<MHC_EXPERT_WGMMA_INFLIGHT>();
    }
    wg_wait<0>();
    wg_hold(acc);
    int lane = threadIdx.x % 32, i_0 = t.i0 + 64 * wg + 16 * (threadIdx.x / 32 % 4) + lane / 4, j_0 = t.j0 + 2 * (lane % 4);
#pragma unroll
    for (int j = 0; j < 16; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) eg_store<MHC_PREC_BF16>(t, g.N, i_0 + 8 * (e / 2), j_0 + 8 * j + e % 2, acc[j][e]);
}

/* W_e (contiguous [M][N] at e * w_stride) = sum_s partial[s][e] + beta W_e, the splits added in order */
__global__ void expert_gemm_reduce_kernel(float *C, const float *partial, int splits, int E, size_t MN, size_t w_stride,
                                          float beta) {
    size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (idx >= (size_t)E * MN) return;
    float v = 0;
    for (int s = 0; s < splits; s++) v += partial[(size_t)s * E * MN + idx];
    float *c = C + idx / MN * w_stride + idx % MN;
    *c = beta == 0.0f ? v : v + beta * *c;
}

/* S for kseg = 1 over rows_total rows (all experts): enough splits to reach about EG_TARGET_BLOCKS
   blocks, at most EG_MAX_SPLITS and no more than the rows allow; 1 means no split */
static int eg_splits(int E, int M, int N, int rows_total) {
    int blocks = E * (int)mhc_blocks((size_t)M, EG_TILE) * (int)mhc_blocks((size_t)N, EG_TILE);
    int s = (EG_TARGET_BLOCKS + blocks - 1) / blocks, by_rows = rows_total / E / EG_MIN_SPLIT_ROWS;
    s = s < by_rows ? s : by_rows;
    s = s < EG_MAX_SPLITS ? s : EG_MAX_SPLITS;
    return s > 1 ? s : 1;
}

template <int P, bool A_KMAJOR, bool B_KMAJOR> static void eg_launch(dim3 grid, const MhcExpertGemm &g) {
    size_t bytes = (size_t)eg_stages(P) * 2 * EG_OPERAND * sizeof(MmaElem<P>);   /* the stages of A and B */
    CUDA_CHECK(cudaFuncSetAttribute((const void *)expert_gemm_kernel<P, A_KMAJOR, B_KMAJOR>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
    expert_gemm_kernel<P, A_KMAJOR, B_KMAJOR><<<grid, EG_THREADS, bytes>>>(g);
    LAUNCH_CHECK();
}

template <bool A_KMAJOR, bool B_KMAJOR> static void egw_launch(dim3 grid, const MhcExpertGemm &g) {
    CUDA_CHECK(cudaFuncSetAttribute((const void *)expert_wgmma_kernel<A_KMAJOR, B_KMAJOR>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, EGW_SMEM_BYTES));
    expert_wgmma_kernel<A_KMAJOR, B_KMAJOR><<<grid, EG_THREADS, EGW_SMEM_BYTES>>>(g);
    LAUNCH_CHECK();
}

/* P: the tile kernel's precision; wgmma (BF16 only): the wgmma kernel */
template <int P> static void eg_launch_layout(dim3 grid, const MhcExpertGemm &g, int wgmma) {
    if (wgmma && g.kseg) egw_launch<true, true>(grid, g);
    else if (wgmma && g.transB) egw_launch<false, false>(grid, g);
    else if (wgmma) egw_launch<false, true>(grid, g);
    else if (g.kseg) eg_launch<P, true, true>(grid, g);
    else if (g.transB) eg_launch<P, false, false>(grid, g);
    else eg_launch<P, false, true>(grid, g);
}

/* Few rows (decode: one token's K experts): there a tile kernel spends its time in one block's K loop,
   so each warp makes one output, C[r][j] = A[r] . W_e[j] (+ beta C) by warp_dot (exact fp32, a fixed
   order). The forward's layout only (transB, W_e [N][K]); 8 outputs of one row per block. */
#define EG_GEMV_ROWS 16

__global__ void expert_gemv_kernel(MhcExpertGemm g) {
    int r = blockIdx.x, j = blockIdx.y * 8 + threadIdx.x / 32, e = 0;
    if (j >= g.N) return;
    while (e < g.E && g.seg[e + 1] <= r) e++;      /* row r belongs to expert e */
    if (e >= g.E) return;
    const float *a = (const float *)g.A + (size_t)r * g.lda, *w = (const float *)g.B + e * g.w_stride + (size_t)j * g.ldb;
    float s = warp_dot(a, w, g.Kfix);
    if (threadIdx.x % 32 == 0) {
        float *c = g.C + (size_t)r * g.ldc + j;
        *c = g.beta == 0.0f ? s : s + g.beta * *c;
    }
}

/* floats of the split scratch gpu_expert_gemm needs for kseg = 1 at (E, M, N, rows_total); 0: no split */
static size_t gpu_expert_split_floats(int E, int M, int N, int rows_total) {
    int S = eg_splits(E, M, N, rows_total);
    return S > 1 ? (size_t)S * E * M * N : 0;
}

/* M (kseg = 0): the rows of all experts together, seg[E]; kseg = 1: M = the rows of W_e, K = the rows of
   all experts together, W_e contiguous (ldc = N, w_stride = M N), no transB; scratch: NULL, or
   gpu_expert_split_floats floats for the row splits. bl->precision is the tile kernel's (MHC_PREC_*: exact
   fp32, TF32 or bf16); the few-row forward (M <= EG_GEMV_ROWS) is always exact. In BF16 the kernel reads
   bf16 copies: a weight's twin, anything else rounded into bl->scratch (A into [0], B into [1]) unless
   rounded says that the caller's previous product left it there (MHC_A_ROUNDED, MHC_B_ROUNDED: the
   same operand at the same place). */
static void gpu_expert_gemm(const MhcBlas *bl, int rounded, float *C, int ldc, const float *A, int lda, const float *B, int ldb,
                            int transB, size_t w_stride, const int *seg, int E, int M, int N, int K, int kseg, float beta,
                            float *scratch) {
    if (M <= 0 || N <= 0 || E <= 0) return;
    if (kseg && (transB || ldc != N || w_stride != (size_t)M * N)) {
        fprintf(stderr, "mhc_cuda gpu_expert_gemm: kseg = 1 takes no transB and a contiguous W (a bug)\n");
        exit(1);
    }
    int splits = kseg && scratch ? eg_splits(E, M, N, K) : 1;
    MhcExpertGemm g = {C, A, B, ldc, lda, ldb, transB, kseg, w_stride, seg, E, M, N, K, beta, splits, scratch};
    if (!kseg && transB && M <= EG_GEMV_ROWS) {
        expert_gemv_kernel<<<dim3(M, mhc_blocks((size_t)N, 8)), 256>>>(g);
        LAUNCH_CHECK();
        return;
    }
    if (bl->precision == MHC_PREC_BF16) {         /* A [M][K] (kseg: [K][M]); B per expert or [K][N] rows */
        g.A = rounded & MHC_A_ROUNDED ? bl->scratch[0] : gemm_bf16_operand(bl, 0, A, kseg ? K : M, kseg ? M : K, lda, 0, 1);
        if (rounded & MHC_B_ROUNDED) g.B = bl->scratch[1];
        else if (kseg) g.B = gemm_bf16_operand(bl, 1, B, K, N, ldb, 0, 1);
        else g.B = gemm_bf16_operand(bl, 1, B, transB ? N : K, transB ? K : N, ldb, (long long)w_stride, E);
    }
    /* kseg = 0: every expert's row tiles, at most ceil(M / 128) + E of them, packed along x */
    dim3 grid(kseg ? mhc_blocks((size_t)M, EG_TILE) : mhc_blocks((size_t)M, EG_TILE) + E, mhc_blocks((size_t)N, EG_TILE),
              kseg ? E * splits : 1);
    if (bl->precision == MHC_PREC_BF16) eg_launch_layout<MHC_PREC_BF16>(grid, g, bl->wgmma & MHC_WGMMA_EXPERTS);
    else if (bl->precision == MHC_PREC_TF32) eg_launch_layout<MHC_PREC_TF32>(grid, g, 0);
    else eg_launch_layout<MHC_PREC_FP32>(grid, g, 0);
    if (splits > 1) {
        size_t count = (size_t)E * M * N;
        expert_gemm_reduce_kernel<<<mhc_blocks(count, MHC_BLOCK), MHC_BLOCK>>>(C, scratch, splits, E, (size_t)M * N, w_stride, beta);
        LAUNCH_CHECK();
    }
}

/* ---------------------------------------------------------------------------------------------
   2. Primitives                                                                                 */
__global__ void fill_kernel(float *x, float value, size_t count) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < count) x[i] = value;
}
static void gpu_fill(float *x, float value, size_t count) {
    if (!count) return;
    fill_kernel<<<mhc_blocks(count, MHC_BLOCK), MHC_BLOCK>>>(x, value, count);
    LAUNCH_CHECK();
}

__global__ void scale_kernel(float *x, float scale, size_t count) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < count) x[i] *= scale;
}

/* Column sums, deterministic: out[d] += sum_n a[n][d] * b[n][d] * r[n] (b, r optional; NULL means 1), for
   d < D over N rows. Each block column sums one chunk of rows into part [P, D]; a second pass adds the
   P partials in chunk order. part holds MHC_COLSUM_CHUNKS * D floats.                                    */
#define MHC_COLSUM_CHUNKS 256
__global__ void colsum_partial_kernel(float *part, const float *a, int lda, const float *b, int ldb, const float *r,
                                      int N, int D, int rows_per) {
    int d = blockIdx.x * blockDim.x + threadIdx.x, p = blockIdx.y;
    if (d >= D) return;
    int n1 = min(N, (p + 1) * rows_per);
    float sum = 0;
    for (int n = p * rows_per; n < n1; n++) {
        float v = a[(size_t)n * lda + d];
        if (b) v *= b[(size_t)n * ldb + d];
        if (r) v *= r[n];
        sum += v;
    }
    part[(size_t)p * D + d] = sum;
}

__global__ void colsum_final_kernel(float *out, const float *part, int P, int D) {
    int d = blockIdx.x * blockDim.x + threadIdx.x;
    if (d >= D) return;
    float sum = 0;
    for (int p = 0; p < P; p++) sum += part[(size_t)p * D + d];
    out[d] += sum;
}

static void gpu_colsum(float *out, const float *a, int lda, const float *b, int ldb, const float *r, int N, int D, float *part) {
    if (N <= 0 || D <= 0) return;
    int rows_per = (N + MHC_COLSUM_CHUNKS - 1) / MHC_COLSUM_CHUNKS;
    rows_per = rows_per < 64 ? 64 : rows_per;
    int P = (N + rows_per - 1) / rows_per;
    colsum_partial_kernel<<<dim3(mhc_blocks((size_t)D, 128), P), 128>>>(part, a, lda, b, ldb, r, N, D, rows_per);
    LAUNCH_CHECK();
    colsum_final_kernel<<<mhc_blocks((size_t)D, 128), 128>>>(out, part, P, D);
    LAUNCH_CHECK();
}

/* Sum (square = 1: sum of squares) in double, deterministic: out[block] = the block's grid-strided sum */
#define MHC_REDUCE_BLOCKS 256
template <typename T> __global__ void reduce_sum_kernel(double *out, const T *x, size_t count, int square) {
    double sum = 0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count; i += (size_t)gridDim.x * blockDim.x) {
        double v = (double)x[i];
        sum += square ? v * v : v;
    }
    sum = block_reduce(sum, SumOp());
    if (threadIdx.x == 0) out[blockIdx.x] = sum;
}

/* *out (device) = the sum over x[0..count); part holds MHC_REDUCE_BLOCKS doubles */
template <typename T> static void gpu_reduce_sum(double *out, const T *x, size_t count, int square, double *part) {
    reduce_sum_kernel<T><<<MHC_REDUCE_BLOCKS, MHC_BLOCK>>>(part, x, count, square);
    LAUNCH_CHECK();
    reduce_sum_kernel<double><<<1, MHC_BLOCK>>>(out, part, MHC_REDUCE_BLOCKS, 0);
    LAUNCH_CHECK();
}

/* SPEC §8 RMSNorm, one warp per row: out = g * x * r, r = (mean(x^2) + eps)^(-1/2); g NULL means 1.
   in, out [N,D], rstd [N]. Its pointers and the backward's are __restrict__ (no caller normalises in
   place), so the unrolled loops issue their loads before their stores: with one row (decode) the warp's
   round trips to memory are the kernel's time. */
__global__ void rmsnorm_forward_kernel(float *__restrict__ out, float *__restrict__ rstd, const float *__restrict__ in,
                                       const float *__restrict__ g, int N, int D, float eps) {
    int row = blockIdx.x * MHC_ROW_WARPS + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= N) return;
    const float *x = in + (size_t)row * D;
    float ss = 0;
#pragma unroll 4
    for (int i = lane; i < D; i += 32) ss += x[i] * x[i];
    ss = warp_reduce(ss, SumOp());
    float r = 1.0f / sqrtf(ss / D + eps);
    if (lane == 0) rstd[row] = r;
#pragma unroll 4
    for (int i = lane; i < D; i += 32) out[(size_t)row * D + i] = (g ? g[i] * x[i] : x[i]) * r;
}

/* din += r * (g * dy) - (r^3 / D) * x * sum(g * dy * x), one warp per row (dg: gpu_rmsnorm_backward) */
__global__ void rmsnorm_backward_kernel(float *__restrict__ din, const float *__restrict__ dout, const float *__restrict__ in,
                                        const float *__restrict__ g, const float *__restrict__ rstd, int N, int D) {
    int row = blockIdx.x * MHC_ROW_WARPS + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= N) return;
    const float *x = in + (size_t)row * D, *dy = dout + (size_t)row * D;
    float r = rstd[row], dot = 0;
#pragma unroll 4
    for (int i = lane; i < D; i += 32) dot += (g ? g[i] * dy[i] : dy[i]) * x[i];
    dot = warp_reduce(dot, SumOp());
    float k = dot * r * r * r / D;
#pragma unroll 4
    for (int i = lane; i < D; i += 32) din[(size_t)row * D + i] += r * (g ? g[i] : 1.0f) * dy[i] - k * x[i];
}

static void gpu_rmsnorm_forward(float *out, float *rstd, const float *in, const float *g, int N, int D, double eps) {
    if (N <= 0) return;
    rmsnorm_forward_kernel<<<mhc_blocks((size_t)N, MHC_ROW_WARPS), 32 * MHC_ROW_WARPS>>>(out, rstd, in, g, N, D, (float)eps);
    LAUNCH_CHECK();
}

/* din += dx; dg += sum over rows of dy * x * r (dg may be NULL, g NULL means 1); part: gpu_colsum scratch */
static void gpu_rmsnorm_backward(float *din, float *dg, const float *dout, const float *in, const float *g, const float *rstd,
                                 int N, int D, float *part) {
    if (N <= 0) return;
    rmsnorm_backward_kernel<<<mhc_blocks((size_t)N, MHC_ROW_WARPS), 32 * MHC_ROW_WARPS>>>(din, dout, in, g, rstd, N, D);
    LAUNCH_CHECK();
    if (dg) gpu_colsum(dg, dout, D, in, D, rstd, N, D, part);
}

/* SPEC §9 RoPE of one pair (2i, 2i+1) of a d_r vector at position pos: out = R(pos) in (R^T with
   transpose = 1, the backward). The angle is computed in double, as on the CPU. out may be in. */
__device__ void rope_pair(float *out, const float *in, int pos, int i, int d_r, double theta, int transpose) {
    double ang = pos * pow(theta, -2.0 * i / d_r);
    double cs = cos(ang), sn = transpose ? -sin(ang) : sin(ang);
    double a = in[2 * i], b = in[2 * i + 1];
    out[2 * i] = (float)(a * cs - b * sn);
    out[2 * i + 1] = (float)(a * sn + b * cs);
}

/* RoPE in place at position pos0 + (t mod T). Row t holds n_vec vectors of d_r values at
   x + t*row_stride + offset + v*vec_stride. One thread per pair. */
__global__ void rope_kernel(float *x, int N, int T, int pos0, int n_vec, int row_stride, int offset, int vec_stride,
                            int d_r, double theta, int transpose) {
    size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x, half = d_r / 2;
    if (idx >= (size_t)N * n_vec * half) return;
    int i = (int)(idx % half), v = (int)(idx / half % n_vec), t = (int)(idx / half / n_vec);
    float *p = x + (size_t)t * row_stride + offset + (size_t)v * vec_stride;
    rope_pair(p, p, pos0 + t % T, i, d_r, theta, transpose);
}

static void gpu_rope(float *x, int N, int T, int pos0, int n_vec, int row_stride, int offset, int vec_stride, int d_r,
                     double theta, int transpose) {
    size_t count = (size_t)N * n_vec * (d_r / 2);
    if (!count) return;
    rope_kernel<<<mhc_blocks(count, MHC_BLOCK), MHC_BLOCK>>>(x, N, T, pos0, n_vec, row_stride, offset, vec_stride, d_r,
                                                              theta, transpose);
    LAUNCH_CHECK();
}

/* SPEC §8 SwiGLU middle: h = silu(a) * g */
__global__ void swiglu_forward_kernel(float *h, const float *a, const float *g, size_t count) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < count) h[i] = a[i] * mhc_sigmoidf(a[i]) * g[i];
}

/* da = dh * g * sig(a) * (1 + a (1 - sig(a))),  dg = dh * silu(a)   (overwrite) */
__global__ void swiglu_backward_kernel(float *da, float *dg, const float *dh, const float *a, const float *g, size_t count) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= count) return;
    float s = mhc_sigmoidf(a[i]);
    da[i] = dh[i] * g[i] * s * (1 + a[i] * (1 - s));
    dg[i] = dh[i] * a[i] * s;
}

static void gpu_swiglu_forward(float *h, const float *a, const float *g, size_t count) {
    if (!count) return;
    swiglu_forward_kernel<<<mhc_blocks(count, MHC_BLOCK), MHC_BLOCK>>>(h, a, g, count);
    LAUNCH_CHECK();
}
static void gpu_swiglu_backward(float *da, float *dg, const float *dh, const float *a, const float *g, size_t count) {
    if (!count) return;
    swiglu_backward_kernel<<<mhc_blocks(count, MHC_BLOCK), MHC_BLOCK>>>(da, dg, dh, a, g, count);
    LAUNCH_CHECK();
}

/* SPEC §8 cross-entropy fused with its backward, one block per row: losses[t] = log sum exp - logit[tgt]
   (max-subtracted), and the row becomes dlogits = (softmax - onehot(tgt)) * scale, scale = 1/N_tok.
   Two passes over the row (it is too long to stay in cache): the first keeps each thread's running max
   and its sum of exp rescaled to it (online softmax), the block combines those; the second writes. With
   d16 given the dlogits go there instead, rounded to bf16 (the same bits as rounding them afterwards), and
   the logits stay: the BF16 head backward reads them so, without a pass of its own that reads 4 bytes a
   logit to write 2 (over V = 129280 logits a row, the largest conversion of a step). */
__global__ void crossentropy_kernel(float *losses, float *logits, __nv_bfloat16 *d16, const int *targets, int V, float scale) {
    float *x = logits + (size_t)blockIdx.x * V;
    __nv_bfloat16 *x16 = d16 ? d16 + (size_t)blockIdx.x * V : NULL;
    int tgt = targets[blockIdx.x];
    float x_tgt = x[tgt], m = -INFINITY, s = 0;
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        float m_new = fmaxf(m, x[v]);
        s = s * expf(m - m_new) + expf(x[v] - m_new);    /* expf(-inf) = 0 on the first element */
        m = m_new;
    }
    float mx = block_reduce(m, MaxOp());
    /* each thread's sum rescaled to the row max; block_reduce's barriers also order every read of x before the writes */
    float sum = block_reduce(m == -INFINITY ? 0.0f : s * expf(m - mx), SumOp());
    if (threadIdx.x == 0) losses[blockIdx.x] = logf(sum) - (x_tgt - mx);
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        float d = expf(x[v] - mx) / sum * scale;
        if (v == tgt) d -= scale;
        if (x16) x16[v] = __float2bfloat16(d);
        else x[v] = d;
    }
}

/* rows of logits [rows, V]; scale is 1 / (the number of tokens the loss averages over); d16 NULL or [rows, V] */
static void gpu_crossentropy(float *losses, float *logits, __nv_bfloat16 *d16, const int *targets, int rows, int V, float scale) {
    if (rows <= 0) return;
    crossentropy_kernel<<<rows, 1024>>>(losses, logits, d16, targets, V, scale);
    LAUNCH_CHECK();
}

/* ---------------------------------------------------------------------------------------------
   3. Residual streams. Per token X [n,C], coefficients H [m] = [pre | post | res] (SPEC §3-§6).    */

/* SPEC §2 expand: X[t][i] = src[row] for every stream i, row = tokens ? tokens[t] : t (the embedding
   lookup, or the backward of the final sum). X [N,n,C], src [rows,C] */
__global__ void stream_expand_kernel(float *X, const float *src, const int *tokens, int N, int n, int C) {
    size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * C) return;
    int t = (int)(idx / C), c = (int)(idx % C);
    float v = src[(size_t)(tokens ? tokens[t] : t) * C + c];
    for (int i = 0; i < n; i++) X[((size_t)t * n + i) * C + c] = v;
}

/* SPEC §2 reduce once: z[t] = sum_i X[t][i] */
__global__ void stream_reduce_kernel(float *z, const float *X, int N, int n, int C) {
    size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * C) return;
    size_t t = idx / C, c = idx % C;
    float sum = 0;
    for (int i = 0; i < n; i++) sum += X[(t * n + i) * C + c];
    z[idx] = sum;
}

/* SPEC §2 embedding backward without atomics: dEmb[rows[u]] += sum_i dX_0[t][i] over the positions t =
   order[start[u] .. start[u+1]) of distinct token u, ascending (the CPU's order). One thread per (u, c). */
__global__ void embedding_backward_kernel(float *dEmb, const float *dX, const int *rows, const int *start, const int *order,
                                          int U, int n, int C) {
    size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (idx >= (size_t)U * C) return;
    int u = (int)(idx / C), c = (int)(idx % C);
    float *d = dEmb + (size_t)rows[u] * C + c, acc = *d;
    for (int p = start[u]; p < start[u + 1]; p++)
        for (int i = 0; i < n; i++) acc += dX[((size_t)order[p] * n + i) * C + c];
    *d = acc;
}

/* SPEC §3 y = H_pre @ X: y[t][c] = sum_j H_pre[j] X[t][j][c]. X [N,n,C], H [N,m], y [N,C] */
__global__ void stream_pre_forward_kernel(float *y, const float *H, const float *X, int N, int n, int C, int m) {
    size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * C) return;
    size_t t = idx / C, c = idx % C;
    float sum = 0;
    for (int j = 0; j < n; j++) sum += H[t * m + j] * X[(t * n + j) * C + c];
    y[idx] = sum;
}

/* SPEC §5.3, one block per token: dX[j] += H_pre[j] dy (PATH 2, threads over c); dH_pre[j] = dy . X[j]
   (one warp per j) */
__global__ void stream_pre_backward_kernel(float *dX, float *dH, const float *dy, const float *H, const float *X, int n,
                                           int C, int m) {
    size_t t = blockIdx.x;
    const float *Xt = X + t * n * C, *dyt = dy + t * C, *Ht = H + t * m;
    float *dXt = dX + t * n * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x)
        for (int j = 0; j < n; j++) dXt[j * C + c] += Ht[j] * dyt[c];
    int lane = threadIdx.x % 32;
    for (int j = threadIdx.x / 32; j < n; j += blockDim.x / 32) {
        float d = 0;
        for (int c = lane; c < C; c += 32) d += dyt[c] * Xt[j * C + c];
        d = warp_reduce(d, SumOp());
        if (lane == 0) dH[t * m + j] = d;
    }
}

#define MHC_MAX_STREAMS 16       /* hc_mult's upper bound (mhc.h checks 1..16) */
#define MHC_SK_N 4               /* the n (every preset's hc_mult) that the Sinkhorn kernels and the merge's
                                    forward (float4s) and backward (one pass) are compiled for; other n take
                                    the generic ones */

/* SPEC §3 merge, output stream i of one channel: H_post[i] f + sum_j H_res[i][j] x[j] over the n streams,
   x [n] the channel's inputs (in registers), H the token's coefficients [m] */
__device__ float stream_merge_one(const float *H, const float *x, float f, int n, int i) {
    float xo = H[n + i] * f;
#pragma unroll
    for (int j = 0; j < MHC_MAX_STREAMS; j++)
        if (j < n) xo += H[2 * n + i * n + j] * x[j];
    return xo;
}

/* W consecutive floats at p into v, and v back to p: one 16-byte access where W = 4 (p 16-byte aligned) */
template <int W> __device__ void load_floats(float (&v)[W], const float *p) {
    if constexpr (W == 4) {
        float4 q = *(const float4 *)p;
        v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
    } else {
#pragma unroll
        for (int w = 0; w < W; w++) v[w] = p[w];
    }
}
template <int W> __device__ void store_floats(float *p, const float (&v)[W]) {
    if constexpr (W == 4) {
        *(float4 *)p = make_float4(v[0], v[1], v[2], v[3]);
    } else {
#pragma unroll
        for (int w = 0; w < W; w++) p[w] = v[w];
    }
}

/* The merge of one token's channels c .. c+W-1: Xo[i][c ..] for the n streams. Xo, X: the token's streams
   [n, C]; H: its coefficients [m]; f: its branch output [C]. The n W inputs are read once, into registers
   (loops over NS or MHC_MAX_STREAMS unroll fully), and each coefficient once for the W channels: W = 4
   moves 4 channels of a stream as one float4, a quarter of the load instructions of one channel at a
   time. NS: n fixed at compile time (MHC_SK_N), so that the W n inputs fit in registers; 0: n as given. */
template <int W, int NS>
__device__ void stream_merge_channels(float *Xo, const float *H, const float *X, const float *f, int n, int C, int c) {
    constexpr int NMAX = NS ? NS : MHC_MAX_STREAMS;
    if (NS) n = NS;
    float x[W][NMAX], ft[W];
    load_floats<W>(ft, f + c);
#pragma unroll
    for (int j = 0; j < NMAX; j++) {
        float v[W];
#pragma unroll
        for (int w = 0; w < W; w++) v[w] = 0.0f;
        if (j < n) load_floats<W>(v, X + (size_t)j * C + c);
#pragma unroll
        for (int w = 0; w < W; w++) x[w][j] = v[w];
    }
    for (int i = 0; i < n; i++) {
        float out[W];
#pragma unroll
        for (int w = 0; w < W; w++) out[w] = stream_merge_one(H, x[w], ft[w], n, i);
        store_floats<W>(Xo + (size_t)i * C + c, out);
    }
}

/* the merge of every token, one thread per (token, W channels) for all n output streams */
template <int W, int NS>
__global__ void stream_merge_forward_kernel(float *Xo, const float *H, const float *X, const float *f, int N, int n, int C, int m) {
    int groups = C / W;
    size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * groups) return;
    size_t t = idx / groups;
    stream_merge_channels<W, NS>(Xo + t * n * C, H + t * m, X + t * n * C, f + t * C, n, C, (int)(idx - t * groups) * W);
}

/* SPEC §5.1, one warp per token: df = H_post^T dX' and dX = H_res^T dX' (PATH 1, overwrite; lanes over
   c), dH_post[i] = dX'[i] . f and dH_res[i][j] = dX'[i] . X[j]. NS = MHC_SK_N (n fixed at compile time):
   one pass over the token's channels, the n + n^2 coefficients' dot products kept in registers as the
   lane goes, then summed over the warp (a butterfly: a fixed order); every input is read once. NS = 0
   (any n): a second pass makes the coefficients one after another, reading the streams again from cache.
   dX NULL: no dX (the one-pass pre-stage backward makes H_res^T dX' itself, mhc_pre_grad_streams_kernel). */
template <int NS>
__global__ void stream_merge_backward_kernel(float *dX, float *df, float *dH, const float *dXo, const float *H, const float *X,
                                             const float *f, int N, int n, int C, int m) {
    constexpr int NMAX = NS ? NS : MHC_MAX_STREAMS, NDOT = NS ? NS + NS * NS : 1;
    if (NS) n = NS;
    size_t t = blockIdx.x * (size_t)(blockDim.x / 32) + threadIdx.x / 32;
    if (t >= (size_t)N) return;                     /* the warp's lanes leave together */
    int lane = threadIdx.x % 32;
    const float *dXot = dXo + t * n * C, *Xt = X + t * n * C, *ft = f + t * C, *Ht = H + t * m;
    float *dXt = dX ? dX + t * n * C : NULL, dot[NDOT];   /* dot[i]: dH_post[i]; dot[n + i n + j]: dH_res[i][j] */
#pragma unroll
    for (int q = 0; q < NDOT; q++) dot[q] = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float d[NMAX], fc = ft[c], dfc = 0;
#pragma unroll
        for (int i = 0; i < NMAX; i++) d[i] = i < n ? dXot[(size_t)i * C + c] : 0.0f;
#pragma unroll
        for (int i = 0; i < NMAX; i++)
            if (i < n) dfc += Ht[n + i] * d[i];
        df[t * C + c] = dfc;
        for (int j = 0; j < n; j++) {
            if (dXt) {
                float dx = 0;
#pragma unroll
                for (int i = 0; i < NMAX; i++)
                    if (i < n) dx += Ht[2 * n + i * n + j] * d[i];
                dXt[(size_t)j * C + c] = dx;
            }
            if constexpr (NS != 0) {
                float xj = Xt[(size_t)j * C + c];
#pragma unroll
                for (int i = 0; i < NS; i++) dot[NS + i * NS + j] += d[i] * xj;
            }
        }
        if constexpr (NS != 0) {
#pragma unroll
            for (int i = 0; i < NS; i++) dot[i] += d[i] * fc;
        }
    }
    if constexpr (NS != 0) {
#pragma unroll
        for (int q = 0; q < NDOT; q++) {
            float sum = warp_reduce(dot[q], SumOp());
            if (lane == 0) dH[t * m + n + q] = sum;
        }
    } else {
        for (int k = n; k < m; k++) {
            int i = k < 2 * n ? k - n : (k - 2 * n) / n;
            const float *other = k < 2 * n ? ft : Xt + (size_t)((k - 2 * n) % n) * C;
            float sum = 0;
            for (int c = lane; c < C; c += 32) sum += dXot[(size_t)i * C + c] * other[c];
            sum = warp_reduce(sum, SumOp());
            if (lane == 0) dH[t * m + k] = sum;
        }
    }
}

static void gpu_stream_expand(float *X, const float *src, const int *tokens, int N, int n, int C) {
    stream_expand_kernel<<<mhc_blocks((size_t)N * C, MHC_BLOCK), MHC_BLOCK>>>(X, src, tokens, N, n, C);
    LAUNCH_CHECK();
}
static void gpu_stream_reduce(float *z, const float *X, int N, int n, int C) {
    stream_reduce_kernel<<<mhc_blocks((size_t)N * C, MHC_BLOCK), MHC_BLOCK>>>(z, X, N, n, C);
    LAUNCH_CHECK();
}
static void gpu_stream_pre_forward(float *y, const float *H, const float *X, int N, int n, int C, int m) {
    stream_pre_forward_kernel<<<mhc_blocks((size_t)N * C, MHC_BLOCK), MHC_BLOCK>>>(y, H, X, N, n, C, m);
    LAUNCH_CHECK();
}
static void gpu_stream_pre_backward(float *dX, float *dH, const float *dy, const float *H, const float *X, int N, int n, int C, int m) {
    stream_pre_backward_kernel<<<N, 128>>>(dX, dH, dy, H, X, n, C, m);
    LAUNCH_CHECK();
}
/* float4 channels at n = MHC_SK_N where C and the buffers allow (every preset), else one at a time */
static void gpu_stream_merge_forward(float *Xo, const float *H, const float *X, const float *f, int N, int n, int C, int m) {
    if (n == MHC_SK_N && C % 4 == 0 && ((uintptr_t)Xo | (uintptr_t)X | (uintptr_t)f) % 16 == 0)
        stream_merge_forward_kernel<4, MHC_SK_N><<<mhc_blocks((size_t)N * C / 4, MHC_BLOCK), MHC_BLOCK>>>(Xo, H, X, f, N, n, C, m);
    else
        stream_merge_forward_kernel<1, 0><<<mhc_blocks((size_t)N * C, MHC_BLOCK), MHC_BLOCK>>>(Xo, H, X, f, N, n, C, m);
    LAUNCH_CHECK();
}
static void gpu_stream_merge_backward(float *dX, float *df, float *dH, const float *dXo, const float *H, const float *X,
                                      const float *f, int N, int n, int C, int m) {
    unsigned blocks = mhc_blocks((size_t)N, MHC_ROW_WARPS);   /* a warp per token */
    if (n == MHC_SK_N) stream_merge_backward_kernel<MHC_SK_N><<<blocks, 32 * MHC_ROW_WARPS>>>(dX, df, dH, dXo, H, X, f, N, n, C, m);
    else stream_merge_backward_kernel<0><<<blocks, 32 * MHC_ROW_WARPS>>>(dX, df, dH, dXo, H, X, f, N, n, C, m);
    LAUNCH_CHECK();
}

/* mHC coefficients (SPEC §4, §5.4, §5.6) in two kinds of kernel. The streaming kernels run one block per
   token over its n C stream values: |x|^2, the coefficients and the pre-mix y forward; dH_pre and the dX
   terms backward. The Sinkhorn kernels give each token a team of n lanes of one warp (32/n teams per
   warp): few values but 2 t_max dependent steps, and lane l of a team makes line l of every step (its
   column in a column step, its row in a row step), summing it in order as mhc_sinkhorn_forward does.
   A step is then n loads and adds, a reciprocal and n multiplies per lane, the lanes meet at a
   __syncwarp between steps (which lane owns an entry changes), and a warp still carries 32/n tokens.
   Kept apart, the stream values are read twice in quick succession (the second time from L2), and no
   thread that moves them waits on a Sinkhorn.

   The Sinkhorn functions take n as a template parameter NS where it is known when compiling: NS =
   MHC_SK_N, every preset's hc_mult, unrolls the loops and keeps a line in registers (the kernels took
   about half the time on an H100); NS = 0 takes any n (loops to MHC_MAX_STREAMS, guarded).

   A team keeps its token's matrices in shared memory, entry (i, j) at [i n + j]. Scratch per token, in
   floats: M [n*n] forward (a step scales it in place); backward the tape Y [steps+1][n*n] (Y[0] = M_0,
   Y[k] after step k) and G [n*n], steps = 2 t_max. The tokens' scratch is spaced 5 floats past a multiple
   of 32 (sk_token_floats): every lane of a warp reads entry (b, line) or (line, b) of its team's token at
   once, and at a spacing that is a multiple of 32 floats (the tape at n = 4 and 20 iterations: 672) the
   warp's 8 teams meet in the same banks, 8 accesses where there would be one; at 5 past a multiple of 32
   at most 2 of a warp's lanes share a bank, in row and column steps alike (counted at n = 4 for every
   spacing mod 32: 8 at 0, 4 at 16, the forward's 16 floats). */
#define MHC_SK_WARPS 4           /* warps per Sinkhorn block, fewer where their scratch passes 48 KB */
#define MHC_TOKEN_THREADS 256    /* threads of a streaming block (one token)                       */
#define MHC_LONE_SLICE 32        /* channels of each stream per block of a lone token's pre-stage: a lane each */

static __host__ __device__ size_t sk_token_floats(int n, int iters, int tape) {
    size_t nn = (size_t)n * n, steps = 2 * (size_t)iters, floats = tape ? (steps + 1) * nn + nn : nn;
    return floats + (32 + 5 - floats % 32) % 32;     /* 5 past a multiple of 32: no bank shared 8 ways */
}

/* Element b of line a of an n x n matrix (a column when column = 1, else a row) is at a * across + b * along */
__device__ int sk_along(int n, int column) { return column ? n : 1; }
__device__ int sk_across(int n, int column) { return column ? 1 : n; }

/* SPEC §4 column j of M_0 [n,n] = exp(Lam - column max) */
template <int NS>
__device__ void sinkhorn_start(float *M, const float *Lam, int j, int n) {
    if (NS) n = NS;
    float mu = Lam[j];
    for (int i = 1; i < n; i++) mu = fmaxf(mu, Lam[i * n + j]);
    for (int i = 0; i < n; i++) M[i * n + j] = expf(Lam[i * n + j] - mu);
}

/* One step for line a, as mhc_sinkhorn_forward: line a of in times 1/(its sum + eps), into out (may be in) */
template <int NS>
__device__ void sinkhorn_step(float *out, const float *in, int a, int n, int column, float eps) {
    constexpr int NMAX = NS ? NS : MHC_MAX_STREAMS;
    if (NS) n = NS;
    int along = sk_along(n, column), first = a * sk_across(n, column);
    float v[NMAX], s = 0;
#pragma unroll
    for (int b = 0; b < NMAX; b++)
        if (b < n) {
            v[b] = in[first + b * along];
            s += v[b];
        }
    float inv = 1.0f / (s + eps);
#pragma unroll
    for (int b = 0; b < NMAX; b++)
        if (b < n) out[first + b * along] = v[b] * inv;
}

/* SPEC §5.6 its backward for line a, G in place: out = in/(s+eps) along the line gives
   dL/din = (G - sum(G * out))/(s+eps), s the line's sum of in */
template <int NS>
__device__ void sinkhorn_step_backward(float *G, const float *out, const float *in, int a, int n, int column, float eps) {
    constexpr int NMAX = NS ? NS : MHC_MAX_STREAMS;
    if (NS) n = NS;
    int along = sk_along(n, column), first = a * sk_across(n, column);
    float g[NMAX], s = 0, dot = 0;
#pragma unroll
    for (int b = 0; b < NMAX; b++)
        if (b < n) {
            g[b] = G[first + b * along];
            s += in[first + b * along];
            dot += g[b] * out[first + b * along];
        }
    float inv = 1.0f / (s + eps);
#pragma unroll
    for (int b = 0; b < NMAX; b++)
        if (b < n) G[first + b * along] = (g[b] - dot) * inv;
}

/* through the shifted exp, column j: dLam = G * M_0, less the column's sum at its argmax row of Lam
   (the lowest row on ties) */
template <int NS>
__device__ void sinkhorn_start_backward(float *dLam, const float *G, const float *M0, const float *Lam, int j, int n) {
    if (NS) n = NS;
    int arg = 0;
    float shift = 0;
    for (int i = 0; i < n; i++) {
        float d = G[i * n + j] * M0[i * n + j];
        dLam[i * n + j] = d;
        shift += d;
        if (Lam[i * n + j] > Lam[arg * n + j]) arg = i;
    }
    dLam[arg * n + j] -= shift;
}

/* SPEC §4's iteration for one token by a team of n lanes of one warp, lane `line` of it (-1: a lane with
   no token, which only meets the others at the barriers): M_0 from Lam, then 2 t_max steps, step k from
   M + k stride into M + (k+1) stride. stride 0 scales M in place (the forward); n*n keeps every matrix
   (the backward's tape, [steps+1][n*n]). */
template <int NS>
__device__ void sinkhorn_iterate(float *M, size_t stride, const float *Lam, int line, int n, int iters, float eps) {
    if (NS) n = NS;
    if (line >= 0) sinkhorn_start<NS>(M, Lam, line, n);
    for (int k = 0; k < 2 * iters; k++) {
        __syncwarp();                                  /* the previous step's lines are this one's crossings */
        if (line >= 0) sinkhorn_step<NS>(M + (k + 1) * stride, M + k * stride, line, n, k % 2 == 0, eps);
    }
}

/* SPEC §4 for one token by a team (as sinkhorn_iterate): H_res [n*n] = Sinkhorn(Lam), M [n*n] its scratch */
template <int NS>
__device__ void sinkhorn_forward_token(float *H_res, float *M, const float *Lam, int line, int n, int iters, float eps) {
    if (NS) n = NS;
    sinkhorn_iterate<NS>(M, 0, Lam, line, n, iters, eps);
    if (line >= 0)                                     /* the last step is a row step: this lane's row */
        for (int b = 0; b < n; b++) H_res[line * n + b] = M[line * n + b];
}

/* This lane in a Sinkhorn kernel: a team of n lanes per token, 32/n teams per warp. first is the warp's
   first token, t this lane's, line its line (-1: a lane with no token), scratch its token's */
typedef struct {
    size_t first, t;
    int line;
    float *scratch;
} SkLane;

__device__ SkLane sk_lane(float *smem, size_t token_floats, int N, int n) {
    int teams = 32 / n, lane = threadIdx.x % 32, team = lane / n;
    SkLane l;
    l.first = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / 32 * teams;
    l.t = l.first + team;
    l.line = team < teams && l.t < (size_t)N ? lane % n : -1;
    l.scratch = smem + (threadIdx.x / 32 * teams + team) * token_floats;
    return l;
}

/* SPEC §4 for every token: H_res = H[t][2n..m) = Sinkhorn(Lam), Lam = a[t][2n..m) */
template <int NS>
__global__ void sinkhorn_forward_kernel(float *H, const float *a, int N, int n, int iters, float eps) {
    extern __shared__ float smem[];
    if (NS) n = NS;
    SkLane l = sk_lane(smem, sk_token_floats(n, iters, 0), N, n);
    if (l.first >= (size_t)N) return;                                 /* a warp with no token */
    int m = n * n + 2 * n;
    sinkhorn_forward_token<NS>(H + l.t * m + 2 * n, l.scratch, a + l.t * m + 2 * n, l.line, n, iters, eps);
}

/* SPEC §5.6 for every token: replays the forward into the tape, then walks it back from
   G = dH_res = dH[t][2n..m); writes dLam into da[t][2n..m) */
template <int NS>
__global__ void sinkhorn_backward_kernel(float *da, const float *dH, const float *a, int N, int n, int iters, float eps) {
    extern __shared__ float smem[];
    if (NS) n = NS;
    SkLane l = sk_lane(smem, sk_token_floats(n, iters, 1), N, n);
    if (l.first >= (size_t)N) return;                                 /* a warp with no token */
    int m = n * n + 2 * n, nn = n * n, steps = 2 * iters, line = l.line;
    float *Y = l.scratch, *G = Y + (size_t)(steps + 1) * nn;
    const float *Lam = a + l.t * m + 2 * n;
    sinkhorn_iterate<NS>(Y, nn, Lam, line, n, iters, eps);
    if (line >= 0)                                     /* G = dH_res, by rows as the last step's */
        for (int b = 0; b < n; b++) G[line * n + b] = dH[l.t * m + 2 * n + line * n + b];
    for (int k = steps - 1; k >= 0; k--) {
        __syncwarp();
        if (line >= 0) sinkhorn_step_backward<NS>(G, Y + (size_t)(k + 1) * nn, Y + (size_t)k * nn, line, n, k % 2 == 0, eps);
    }
    __syncwarp();
    if (line >= 0) sinkhorn_start_backward<NS>(da + l.t * m + 2 * n, G, Y, Lam, line, n);
}

/* threads per Sinkhorn block for the kernel's scratch (tape or not), and the block's shared bytes
   (asking for more than 48 KB where one warp's tokens alone need it; mhc_gpu_init checks it fits the
   device) */
static size_t sk_warp_bytes(int n, int iters, int tape) { return 32 / n * sk_token_floats(n, iters, tape) * sizeof(float); }

static int sk_block_threads(const void *kernel, int n, int iters, int tape, size_t *bytes) {
    size_t per = sk_warp_bytes(n, iters, tape);
    int warps = (int)(48 * 1024 / per);
    warps = warps < 1 ? 1 : warps > MHC_SK_WARPS ? MHC_SK_WARPS : warps;
    *bytes = warps * per;
    if (*bytes > 48 * 1024) CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)*bytes));
    return 32 * warps;
}

/* blocks for N tokens, 32/n per warp */
static unsigned sk_blocks(int N, int n, int threads) { return mhc_blocks(((size_t)N + 32 / n - 1) / (32 / n) * 32, threads); }

static void gpu_sinkhorn_forward(float *H, const float *a, int N, int n, int iters, double eps) {
    void (*kernel)(float *, const float *, int, int, int, float) =
        n == MHC_SK_N ? sinkhorn_forward_kernel<MHC_SK_N> : sinkhorn_forward_kernel<0>;
    size_t bytes;
    int threads = sk_block_threads((const void *)kernel, n, iters, 0, &bytes);
    kernel<<<sk_blocks(N, n, threads), threads, bytes>>>(H, a, N, n, iters, (float)eps);
    LAUNCH_CHECK();
}

static void gpu_sinkhorn_backward(float *da, const float *dH, const float *a, int N, int n, int iters, double eps) {
    void (*kernel)(float *, const float *, const float *, int, int, int, float) =
        n == MHC_SK_N ? sinkhorn_backward_kernel<MHC_SK_N> : sinkhorn_backward_kernel<0>;
    size_t bytes;
    int threads = sk_block_threads((const void *)kernel, n, iters, 1, &bytes);
    kernel<<<sk_blocks(N, n, threads), threads, bytes>>>(da, dH, a, N, n, iters, (float)eps);
    LAUNCH_CHECK();
}

/* The mHC pre-stage (SPEC §4 then §3): cuBLAS, one block per token, then the Sinkhorn. The projection
   h [N,m] = X phi^T is a skinny GEMM (m = n^2 + 2n outputs over nC inputs) that cuBLAS runs near the
   copy bandwidth in exact fp32 (h feeds the Sinkhorn exponent, so it stays exact). RMSNorm commutes
   with the projection, a = alpha r (phi x) + b, so the norm's statistic |x|^2 needs no second GEMM: the
   block (mhc_pre_tokens_kernel, below) reads the token's streams once for it, keeping them in registers,
   makes r, a, H_pre = sigma(a), H_post = 2 sigma(a), the pre-mix y [N,C] = sum_j H_pre[j] X[j] from the
   registers, and the sublayer's norm u = RMSNorm(y). Writes h, a, H [N,m] (H_res by
   sinkhorn_forward_kernel) and r [N,n] (in [0]).
   A lone token (decode), where a launch costs more than the work, has one launch do the rest as well
   (MhcPreToken, mhc_pre_lone_kernel), over ceil(C / MHC_LONE_SLICE) blocks. Block s takes channels
   [32 s, 32 s + 32) of every stream, a lane each (lone_token_slice): with merged given, first the previous
   sublayer's merge of those channels into X (merged is X: the token's streams are made here, then read),
   then its part of h = X phi^T (a warp per output, MHC_LONE_OUTS outputs' loads at once) and of |x|^2 into
   lone.part. The block that finishes last (a count of finished blocks: the classic last-block reduction)
   sums the parts, a warp per sum in a fixed order (the same bits on every run), and goes on as the
   many-token kernel does, reading the other blocks' streams from L2 (__ldcg: its L1 may hold lines of them
   from before they were merged). Then the Sinkhorn by n lanes of warp 0 while the other warps make y, and
   with u given the sublayer's norm u [N,C] = RMSNorm(y) with gain g, u_rstd [N]. A lone token's time is a
   chain of waits on memory, so every block issues all the loads it will need before it waits on the first:
   phi's rows, the merge's inputs, and by cp.async the parameters only the last block uses (alpha, b, g: into
   dynamic shared memory, lone_params_floats). Launched overlapped (section 0): phi's first rows are loading
   before the wait. */
typedef struct {
    const float *phi;
    int iters;
    float eps_sk;
    float *u, *u_rstd;
    const float *g;
    float *merged;                           /* NULL, or X, made as stream_merge_channels(prev_H, prev_X, prev_f) */
    const float *prev_H, *prev_X, *prev_f;
    MhcLoneScratch lone;
} MhcPreToken;

static unsigned lone_blocks(int C) { return mhc_blocks((size_t)C, MHC_LONE_SLICE); }

/* the lone kernel's dynamic shared memory: alpha [3], b [m], then g [C] where u is made */
static __host__ __device__ size_t lone_params_floats(int n, int C) { return 3 + (size_t)n * n + 2 * (size_t)n + (size_t)C; }

/* a lone token's warp's next round of h's outputs k = k0 + q warps (q < MHC_LONE_OUTS, k < m): phi[k] at
   channel c of every stream, all the round's loads issued before any is used */
#define MHC_LONE_OUTS 4
__device__ void lone_phi_round(float (&ph)[MHC_LONE_OUTS][MHC_MAX_STREAMS], const float *phi, int k0, int warps, int m, int n,
                               int C, int c) {
#pragma unroll
    for (int q = 0; q < MHC_LONE_OUTS; q++)
#pragma unroll
        for (int j = 0; j < MHC_MAX_STREAMS; j++) {
            int k = k0 + q * warps;
            ph[q][j] = k < m && j < n && c < C ? phi[((size_t)k * n + j) * C + c] : 0.0f;
        }
}

/* Whether this block is the last of the grid to arrive at done (every thread gets the answer): each block's
   writes so far are fenced before it counts itself, so the last block then sees every block's (reading
   them past L1, __ldcg). done is 0 between launches: the last block resets it when it is through. */
__device__ bool grid_last_block(unsigned *done) {
    __shared__ int last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(done, 1u) == gridDim.x - 1;
    __syncthreads();
    if (last) __threadfence();
    return last;
}

/* A lone token's block blockIdx.x: its slice's merge and parts (above). Returns 1 in the block that
   finished last, which then has h [m] in h and h_shared, |x|^2 in *sumsq and alpha, b, g in params (from
   alpha, b and one->g); 0 in the others, which are done. */
__device__ int lone_token_slice(float *h, float *h_shared, float *sumsq, float *params, const float *alpha, const float *b,
                                const float *x, int n, int C, const MhcPreToken *one) {
    constexpr int MMAX = MHC_MAX_STREAMS * MHC_MAX_STREAMS + 2 * MHC_MAX_STREAMS;
    __shared__ float prev_H[MMAX], merged[MHC_MAX_STREAMS][MHC_LONE_SLICE];   /* the merge's coefficients; its slice */
    int m = n * n + 2 * n, lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    int c = blockIdx.x * MHC_LONE_SLICE + lane;
    float ph[MHC_LONE_OUTS][MHC_MAX_STREAMS], xc[MHC_MAX_STREAMS], f = 0;   /* xc: x[j][c], j < n */
    lone_phi_round(ph, one->phi, warp, warps, m, n, C, c);   /* phi, a weight: loading across the wait */
    grid_dependency_wait();
    grid_dependents_launch();
#pragma unroll
    for (int j = 0; j < MHC_MAX_STREAMS; j++) {     /* merging: warp 0's inputs; else the streams themselves */
        const float *src = one->merged ? one->prev_X : x;
        xc[j] = j < n && c < C && (!one->merged || warp == 0) ? src[(size_t)j * C + c] : 0.0f;
    }
    if (one->merged && warp == 0 && c < C) f = one->prev_f[c];
    if (one->merged)
        for (int k = threadIdx.x; k < m; k += blockDim.x) cp_async<4>(prev_H + k, one->prev_H + k, true);
    cp_async_commit();
    int count = (int)lone_params_floats(n, one->g ? C : 0);
    for (int k = threadIdx.x; k < count; k += blockDim.x)
        cp_async<4>(params + k, k < 3 ? alpha + k : k < 3 + m ? b + (k - 3) : one->g + (k - 3 - m), true);
    cp_async_commit();
    if (one->merged) {                              /* SPEC §3 of the previous sublayer, into X and merged */
        cp_async_wait<1>();
        __syncthreads();                            /* prev_H has landed */
        if (warp == 0)
            for (int i = 0; i < n; i++) {
                float xo = stream_merge_one(prev_H, xc, f, n, i);
                if (c < C) one->merged[(size_t)i * C + c] = xo;
                merged[i][lane] = xo;
            }
        __syncthreads();
#pragma unroll
        for (int j = 0; j < MHC_MAX_STREAMS; j++) xc[j] = j < n && c < C ? merged[j][lane] : 0.0f;
    }
    float *part = one->lone.part + (size_t)blockIdx.x * (m + 1);
    for (int k0 = warp; k0 < m; k0 += MHC_LONE_OUTS * warps) {
        if (k0 != warp) lone_phi_round(ph, one->phi, k0, warps, m, n, C, c);
        float s[MHC_LONE_OUTS];
#pragma unroll
        for (int q = 0; q < MHC_LONE_OUTS; q++) {
            s[q] = 0;
#pragma unroll
            for (int j = 0; j < MHC_MAX_STREAMS; j++) s[q] += ph[q][j] * xc[j];
        }
#pragma unroll
        for (int q = 0; q < MHC_LONE_OUTS; q++) {
            s[q] = warp_reduce(s[q], SumOp());
            if (lane == 0 && k0 + q * warps < m) part[k0 + q * warps] = s[q];
        }
    }
    if (warp == 0) {
        float s = 0;
#pragma unroll
        for (int j = 0; j < MHC_MAX_STREAMS; j++) s += xc[j] * xc[j];
        s = warp_reduce(s, SumOp());
        if (lane == 0) part[m] = s;
    }
    bool last = grid_last_block(one->lone.done);    /* this block's parts and streams fenced first */
    cp_async_wait<0>();                             /* params have landed (a block leaves none in flight) */
    if (!last) return 0;
    for (int k0 = warp; k0 <= m; k0 += MHC_LONE_OUTS * warps) {   /* a warp per sum, a lane per block */
        float s[MHC_LONE_OUTS] = {0};
        for (unsigned bk = lane; bk < gridDim.x; bk += 32) {
            float v[MHC_LONE_OUTS];                 /* the round's loads at once, then their sums */
#pragma unroll
            for (int q = 0; q < MHC_LONE_OUTS; q++)
                v[q] = k0 + q * warps <= m ? __ldcg(one->lone.part + (size_t)bk * (m + 1) + k0 + q * warps) : 0.0f;
#pragma unroll
            for (int q = 0; q < MHC_LONE_OUTS; q++) s[q] += v[q];
        }
#pragma unroll
        for (int q = 0; q < MHC_LONE_OUTS; q++) {
            int k = k0 + q * warps;
            s[q] = warp_reduce(s[q], SumOp());
            if (lane == 0 && k < m) h[k] = h_shared[k] = s[q];
            else if (lane == 0 && k == m) *sumsq = s[q];
        }
    }
    if (threadIdx.x == 0) *one->lone.done = 0;
    __syncthreads();                                /* h, *sumsq and params are complete */
    return 1;
}

/* The rest of a lone token's pre-stage, in the block that lone_token_slice found finished last: the
   coefficients from h and |x|^2, the Sinkhorn by n lanes of warp 0 while the other warps make y (the
   streams by __ldcg: they were merged by other blocks), then with one.u given u = RMSNorm(y), gain one.g. */
__global__ void __launch_bounds__(MHC_TOKEN_THREADS) mhc_pre_lone_kernel(float *y, float *H, float *a, float *r_out, float *h,
                                                                         const float *X, const float *alpha, const float *b,
                                                                         int n, int C, float eps_rms, MhcPreToken one) {
    constexpr int MMAX = MHC_MAX_STREAMS * MHC_MAX_STREAMS + 2 * MHC_MAX_STREAMS;
    extern __shared__ float lone_params[];          /* alpha, b, g (lone_params_floats) */
    __shared__ float h_pre[MHC_MAX_STREAMS], sk_scratch[MHC_MAX_STREAMS * MHC_MAX_STREAMS], sumsq;
    __shared__ float h_kept[MMAX], a_kept[MMAX];    /* h and a, kept at hand */
    if (!lone_token_slice(h, h_kept, &sumsq, lone_params, alpha, b, X, n, C, &one)) return;
    int m = n * n + 2 * n, nC = n * C;
    const float *p_alpha = lone_params, *p_b = lone_params + 3, *g = lone_params + 3 + m;   /* the same values, at hand */
    float r = 1.0f / sqrtf(sumsq / nC + eps_rms);
    for (int k = threadIdx.x; k < m; k += blockDim.x) {
        float ak = p_alpha[k < n ? 0 : k < 2 * n ? 1 : 2] * r * h_kept[k] + p_b[k];
        a[k] = ak;
        if (k < n) H[k] = h_pre[k] = mhc_sigmoidf(ak);
        else if (k < 2 * n) H[k] = 2 * mhc_sigmoidf(ak);
        else a_kept[k] = ak;
    }
    if (threadIdx.x == 0) r_out[0] = r;
    __syncthreads();                                /* h_pre and a are complete */
    if (threadIdx.x < 32) {                         /* a team of n lanes of warp 0 */
        int line = threadIdx.x < n ? (int)threadIdx.x : -1;
        if (n == MHC_SK_N) sinkhorn_forward_token<MHC_SK_N>(H + 2 * n, sk_scratch, a_kept + 2 * n, line, n, one.iters, one.eps_sk);
        else sinkhorn_forward_token<0>(H + 2 * n, sk_scratch, a_kept + 2 * n, line, n, one.iters, one.eps_sk);
    }
    int first = threadIdx.x < 32 ? C : threadIdx.x - 32, stride = blockDim.x - 32;   /* the warps beside the Sinkhorn's */
    for (int c = first; c < C; c += stride) {
        float sum = 0.0f;
        for (int j = 0; j < n; j++) sum += h_pre[j] * __ldcg(X + (size_t)j * C + c);
        y[c] = sum;
    }
    if (!one.u) return;
    float yy = 0;                                   /* each thread reads back the y it wrote */
    for (int c = first; c < C; c += stride) yy += y[c] * y[c];
    float ur = 1.0f / sqrtf(block_reduce(yy, SumOp()) / C + eps_rms);
    for (int c = first; c < C; c += stride) one.u[c] = g[c] * y[c] * ur;
    if (threadIdx.x == 0) one.u_rstd[0] = ur;
}

/* The streaming kernel of many tokens: a block per token, thread i owning channel groups i, i + T, ...
   (T = blockDim.x, mhc_pre_threads; a group is W channels of every stream, float4s where W = 4), so
   that each thread has at most MHC_PRE_GROUPS of them a stream. Thread k < m loads its h, b and alpha
   first, so that they wait beside the stream loads, not after the reduction that needs them. The block
   sums |x|^2, makes r, a [m], H_pre = sigma(a), H_post = 2 sigma(a) (H_res: sinkhorn_forward_kernel,
   next), and y = sum_j H_pre[j] X[j]; with u given also u = RMSNorm(y), gain g (NULL: 1), and u_rstd.
   With NS (the presets' n) a thread's stream values stay in registers from the |x|^2 pass to the pre-mix
   (n W MHC_PRE_GROUPS = 64 floats at n = 4, W = 4), and its y for the norm: the token's streams are read
   once and y is not read back, with no barrier but the two reductions' and one for H_pre. NS = 0 (any
   n; the tests' others) reads the streams again for y (from L1 or L2) and loops over as many groups as C
   needs. */
#define MHC_PRE_GROUPS 4
static unsigned mhc_pre_threads(int groups) {
    unsigned warps = mhc_blocks((size_t)groups, 32 * MHC_PRE_GROUPS);
    return 32 * (warps < MHC_TOKEN_THREADS / 32 ? warps : MHC_TOKEN_THREADS / 32);
}

template <int NS, int W>
__global__ void __launch_bounds__(MHC_TOKEN_THREADS) mhc_pre_tokens_kernel(
    float *y, float *u, float *u_rstd, float *H, float *a, float *r_out, const float *h, const float *X, const float *alpha,
    const float *b, const float *g, int n, int C, float eps_rms) {
    constexpr int KEPT = NS ? NS : 1, GMAX = NS ? MHC_PRE_GROUPS : 1;   /* the register arrays' extents */
    __shared__ float h_pre[MHC_MAX_STREAMS];
    if (NS) n = NS;
    int m = n * n + 2 * n, nC = n * C, T = blockDim.x;
    int groups = NS ? MHC_PRE_GROUPS : (C / W + T - 1) / T;   /* a thread's groups a stream, at most */
    size_t t = blockIdx.x;
    const float *x = X + t * nC;
    float h_first = 0.0f, b_first = 0.0f, alpha_first = 0.0f;   /* k = threadIdx.x's h, b, alpha */
    if ((int)threadIdx.x < m) {
        h_first = h[t * m + threadIdx.x];
        b_first = b[threadIdx.x];
        alpha_first = alpha[threadIdx.x < n ? 0 : threadIdx.x < 2 * n ? 1 : 2];
    }
    float xv[KEPT][GMAX][W] = {}, ss = 0;           /* NS: x[j][c .. c+W-1] of the thread's groups */
#pragma unroll
    for (int q = 0; q < groups; q++) {
        int c = (threadIdx.x + q * T) * W;
        if (c >= C) continue;
        if constexpr (NS > 0) {
#pragma unroll
            for (int j = 0; j < NS; j++) load_floats<W>(xv[j][q], x + (size_t)j * C + c);
#pragma unroll
            for (int j = 0; j < NS; j++)
#pragma unroll
                for (int w = 0; w < W; w++) ss += xv[j][q][w] * xv[j][q][w];
        } else {
            for (int j = 0; j < n; j++) {
                float v[W];
                load_floats<W>(v, x + (size_t)j * C + c);
#pragma unroll
                for (int w = 0; w < W; w++) ss += v[w] * v[w];
            }
        }
    }
    float r = 1.0f / sqrtf(block_reduce(ss, SumOp()) / nC + eps_rms);
    for (int k = threadIdx.x; k < m; k += T) {
        int grp = k < n ? 0 : k < 2 * n ? 1 : 2, first = k == (int)threadIdx.x;   /* its h, b, alpha came first */
        float ak = (first ? alpha_first : alpha[grp]) * r * (first ? h_first : h[t * m + k]) + (first ? b_first : b[k]);
        a[t * m + k] = ak;
        if (k < n) H[t * m + k] = h_pre[k] = mhc_sigmoidf(ak);
        else if (k < 2 * n) H[t * m + k] = 2 * mhc_sigmoidf(ak);
    }
    if (threadIdx.x == 0) r_out[t * n] = r;
    __syncthreads();                                /* h_pre is complete */
    float yv[GMAX][W] = {}, yy = 0;                 /* NS: the thread's y, for the norm */
#pragma unroll
    for (int q = 0; q < groups; q++) {
        int c = (threadIdx.x + q * T) * W;
        if (c >= C) continue;
        float sum[W] = {};
        for (int j = 0; j < (NS ? NS : n); j++) {
            float v[W];
            if constexpr (NS > 0) {
#pragma unroll
                for (int w = 0; w < W; w++) v[w] = xv[j][q][w];
            } else {
                load_floats<W>(v, x + (size_t)j * C + c);
            }
#pragma unroll
            for (int w = 0; w < W; w++) sum[w] += h_pre[j] * v[w];
        }
        store_floats<W>(y + t * C + c, sum);
#pragma unroll
        for (int w = 0; w < W; w++) {
            yy += sum[w] * sum[w];
            if constexpr (NS > 0) yv[q][w] = sum[w];
        }
    }
    if (!u) return;
    float ur = 1.0f / sqrtf(block_reduce(yy, SumOp()) / C + eps_rms);
#pragma unroll
    for (int q = 0; q < groups; q++) {
        int c = (threadIdx.x + q * T) * W;
        if (c >= C) continue;
        float yc[W], gc[W], out[W];
        if constexpr (NS > 0) {
#pragma unroll
            for (int w = 0; w < W; w++) yc[w] = yv[q][w];
        } else {
            load_floats<W>(yc, y + t * C + c);      /* this thread's own stores */
        }
        if (g) load_floats<W>(gc, g + c);
#pragma unroll
        for (int w = 0; w < W; w++) out[w] = (g ? gc[w] * yc[w] : yc[w]) * ur;
        store_floats<W>(u + t * C + c, out);
    }
    if (threadIdx.x == 0) u_rstd[t] = ur;
}

/* The pre-stage of N tokens: h = X phi^T (cuBLAS), the streaming kernel, the Sinkhorn kernel; with u
   given (may be NULL) the streaming kernel also makes the sublayer's norm u [N,C] = RMSNorm(y), gain
   norm_g, u_rstd [N]. A lone token has all of it done by one launch of lone_blocks(C) blocks, in lone (its
   scratch; NULL for N > 1), and with prev (else NULL: prev[0..2] = the previous sublayer's H, X and f)
   first that sublayer's merge into X. */
static void gpu_mhc_pre_forward(const MhcBlas *bl, float *y, float *u, float *u_rstd, float *H, float *a, float *h, float *r,
                                float *X, const float *phi, const float *alpha, const float *b, const float *norm_g,
                                const float *const *prev, const MhcLoneScratch *lone, int N, int n, int C, int iters,
                                double eps_sk, double eps_rms) {
    if (prev && N != 1) {
        fprintf(stderr, "gpu_mhc_pre_forward: the merge goes first for a lone token only (a bug)\n");
        exit(1);
    }
    if (N == 1) {
        if (!lone) {
            fprintf(stderr, "gpu_mhc_pre_forward: a lone token needs its scratch (a bug)\n");
            exit(1);
        }
        MhcPreToken one = {phi, iters, (float)eps_sk, u, u_rstd, norm_g, NULL, NULL, NULL, NULL, *lone};
        if (prev) {
            one.merged = X;
            one.prev_H = prev[0];
            one.prev_X = prev[1];
            one.prev_f = prev[2];
        }
        size_t smem = sizeof(float) * lone_params_floats(n, C);
        if (smem > 48 * 1024)                        /* C past about 12,000: more than a launch gets unasked */
            CUDA_CHECK(cudaFuncSetAttribute((const void *)mhc_pre_lone_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            (int)smem));
        cudaLaunchConfig_t config = overlapped_launch(lone_blocks(C), MHC_TOKEN_THREADS, smem);
        CUDA_CHECK(cudaLaunchKernelEx(&config, mhc_pre_lone_kernel, y, H, a, r, h, X, alpha, b, n, C, (float)eps_rms, one));
        return;
    }
    gpu_matmul_forward(bl, MHC_GEMM_FP32, h, X, phi, N, n * C, n * n + 2 * n);
    int W = C % 4 == 0 && ((uintptr_t)X | (uintptr_t)y | (uintptr_t)u | (uintptr_t)norm_g) % 16 == 0 ? 4 : 1;
    unsigned threads = mhc_pre_threads(C / W);
    int kept = n == MHC_SK_N && (size_t)threads * MHC_PRE_GROUPS * W >= (size_t)C;   /* every group in registers */
    void (*kernel)(float *, float *, float *, float *, float *, float *, const float *, const float *, const float *,
                   const float *, const float *, int, int, float) =
        W == 4 ? (kept ? mhc_pre_tokens_kernel<MHC_SK_N, 4> : mhc_pre_tokens_kernel<0, 4>)
               : (kept ? mhc_pre_tokens_kernel<MHC_SK_N, 1> : mhc_pre_tokens_kernel<0, 1>);
    kernel<<<N, threads>>>(y, u, u_rstd, H, a, r, h, X, alpha, b, norm_g, n, C, (float)eps_rms);
    LAUNCH_CHECK();
    gpu_sinkhorn_forward(H, a, N, n, iters, eps_sk);
}

/* Its backward (SPEC §5.3 PATH 2, §5.4 + §5.6 PATH 3): the Sinkhorn, one block per token, then cuBLAS.
   In: dy [N,C], the gradient of y; dH [N,m] with its post and res parts from the merge backward.
   sinkhorn_backward_kernel puts da_res in da first. The block makes dH_pre[j] = dy . X[j] (all j in one
   pass over the streams); its first warp takes da through the sigmoids and writes da [N,m] (the b
   gradient's column sums), dh = da alpha[grp] r over dH, dalpha_t [N,3] = sum_{k in grp} da r h and dS,
   the gradient of |x|^2 through r. With dS2_out given, 2 dS goes there, [N], for mhc_pre_grad_streams_kernel
   to apply; else the block adds dX[j][c] += H_pre[j] dy[c] + 2 x[j][c] dS itself, and the GEMMs dX += dh phi
   and dphi += dh^T X follow in cuBLAS (fp32). Blocks are sized as the forward's (mhc_pre_threads: 32
   threads for every 512 channels at W = 4), a thread's channels read W at a time (float4s at W = 4), n
   compiled in as NS where it is the presets' (0: any n, the loops to MHC_MAX_STREAMS, guarded).        */
template <int NS, int W>
__global__ void __launch_bounds__(MHC_TOKEN_THREADS) mhc_coeffs_pre_backward_kernel(
    float *dX, float *dS2_out, float *dH, float *da, float *dalpha_t, const float *dy, const float *X, const float *H,
    const float *h, const float *r_in, const float *alpha, int n, int C) {
    constexpr int JMAX = NS ? NS : MHC_MAX_STREAMS;
    __shared__ float dpre_part[MHC_TOKEN_THREADS / 32][MHC_MAX_STREAMS];   /* per warp */
    __shared__ float dS2_shared;
    if (NS) n = NS;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, m = n * n + 2 * n, nC = n * C;
    size_t t = blockIdx.x;
    const float *x = X + t * nC, *dyt = dy + t * C, *Ht = H + t * m, *ht = h + t * m;
    float *dHt = dH + t * m, *dat = da + t * m, r = r_in[t * n];
    float dpre[JMAX] = {0};
#pragma unroll 4
    for (int c = threadIdx.x * W; c < C; c += blockDim.x * W) {   /* §5.3: dH_pre[j] = dy . X[j] */
        float d[W];
        load_floats<W>(d, dyt + c);
#pragma unroll
        for (int j = 0; j < JMAX; j++)
            if (j < n) {
                float v[W];
                load_floats<W>(v, x + (size_t)j * C + c);
#pragma unroll
                for (int w = 0; w < W; w++) dpre[j] += d[w] * v[w];
            }
    }
#pragma unroll
    for (int j = 0; j < JMAX; j++)
        if (j < n) {
            float d = warp_reduce(dpre[j], SumOp());
            if (lane == 0) dpre_part[warp][j] = d;
        }
    __syncthreads();
    if (warp == 0) {
        float dr = 0, ga0 = 0, ga1 = 0, ga2 = 0;
        for (int k = lane; k < m; k += 32) {
            int grp = k < n ? 0 : k < 2 * n ? 1 : 2;
            float d;
            if (k < n) {                            /* through sigma */
                float dpre_k = 0;
                for (int w = 0; w < (int)blockDim.x / 32; w++) dpre_k += dpre_part[w][k];
                d = dpre_k * Ht[k] * (1 - Ht[k]);
            } else if (k < 2 * n) {
                d = dHt[k] * Ht[k] * (1 - Ht[k] / 2);   /* derivative of 2 sigma */
            } else {
                d = dat[k];                         /* from sinkhorn_backward_kernel */
            }
            float term = d * r * ht[k];
            dr += d * alpha[grp] * ht[k];
            ga0 += grp == 0 ? term : 0;
            ga1 += grp == 1 ? term : 0;
            ga2 += grp == 2 ? term : 0;
            dat[k] = d;
            dHt[k] = d * (alpha[grp] * r);
        }
        dr = warp_reduce(dr, SumOp());
        ga0 = warp_reduce(ga0, SumOp());
        ga1 = warp_reduce(ga1, SumOp());
        ga2 = warp_reduce(ga2, SumOp());
        if (lane == 0) {
            dalpha_t[t * 3] = ga0;
            dalpha_t[t * 3 + 1] = ga1;
            dalpha_t[t * 3 + 2] = ga2;
            dS2_shared = 2 * dr * (-r * r * r / (2.0f * nC));   /* 2 dS: |x|^2 -> r = (|x|^2/nC + eps)^(-1/2) */
            if (dS2_out) dS2_out[t] = dS2_shared;
        }
    }
    if (dS2_out) return;
    __syncthreads();
    float dS2 = dS2_shared, *dXt = dX + t * nC;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float d = dyt[c];
        for (int j0 = 0; j0 < n; j0 += 4) {         /* four streams' loads before their stores */
            float hj[4], xj[4], dxj[4];
#pragma unroll
            for (int q = 0; q < 4; q++) {
                bool real = j0 + q < n;
                hj[q] = real ? Ht[j0 + q] : 0.0f;
                xj[q] = real ? x[(size_t)(j0 + q) * C + c] : 0.0f;
                dxj[q] = real ? dXt[(size_t)(j0 + q) * C + c] : 0.0f;
            }
#pragma unroll
            for (int q = 0; q < 4; q++)
                if (j0 + q < n) dXt[(size_t)(j0 + q) * C + c] = dxj[q] + hj[q] * d + dS2 * xj[q];
        }
    }
}

/* The rest of the pre-stage backward at n = NS, in one pass over the streams of N tokens, after
   mhc_coeffs_pre_backward_kernel has made dh (in dH) and 2 dS [N] (SPEC §5.3 PATH 2, §5.4 PATH 3):
     dX[t][j][c] += H_pre[t][j] dy[t][c] + 2 dS[t] X[t][j][c] + sum_q dh[t][q] phi[q][j C + c]
     dphi[q][j C + c] += sum_t dh[t][q] X[t][j][c]
   With dXo (the sublayer's dX') given, dX's old value is not read: PATH 1, sum_i H_res[t][i][j] dX'[t][i][c],
   takes its place, so the merge backward need not write dX for this pass to read back.
   Block (g, p) owns channels 64 g .. 64 g + 63 of every stream (thread (j, c), j = the warp pair) over the
   tokens of split p. A thread keeps its column of phi and its column of dphi (m floats each) in registers
   as it walks the tokens, so the two products that cuBLAS made (each one more pass over the streams, and
   dX's twice) ride on the pass that reads X and dX once. The split's dphi goes to dphi_part [splits, m, nC]
   and colsum_final_kernel adds the splits in order (no atomics: the same bits every run). The tokens' dh,
   H_pre, 2 dS (and H_res) wait in shared memory, MHC_PG_TILE tokens at a time. A channel's NS values of dX'
   are loads of the block's NS warp pairs, so three of a thread's four come from L1.                      */
#define MHC_PG_CHANNELS 64          /* channels of a block, for each of the NS streams                  */
#define MHC_PG_TILE 16              /* tokens whose coefficients wait in shared memory at once          */
#define MHC_PG_SPLITS 64            /* token splits: the grid's second dimension, dphi_part's first     */
template <int NS>                                  /* 3 blocks, 24 warps an SM: 80 registers (ptxas, sm_90), a token
                                                      at a time (two at a time spill) */
__global__ void __launch_bounds__(NS * MHC_PG_CHANNELS, 3) mhc_pre_grad_streams_kernel(
    float *__restrict__ dX, float *__restrict__ dphi_part, const float *__restrict__ dXo, const float *__restrict__ dy,
    const float *__restrict__ X, const float *__restrict__ H, const float *__restrict__ dh, const float *__restrict__ dS2,
    const float *__restrict__ phi, int N, int C, int per_split) {
    constexpr int M = NS * NS + 2 * NS;
    __shared__ float tile_dh[MHC_PG_TILE][M], tile_pre[MHC_PG_TILE][NS], tile_res[MHC_PG_TILE][NS * NS];
    __shared__ float tile_ds[MHC_PG_TILE];
    int j = threadIdx.x / MHC_PG_CHANNELS, c = blockIdx.x * MHC_PG_CHANNELS + threadIdx.x % MHC_PG_CHANNELS;
    int nC = NS * C, t_end = min(N, (int)(blockIdx.y + 1) * per_split);
    bool real = c < C;                              /* the last group's threads past C only help load */
    size_t k = (size_t)j * C + c;
    float phi_k[M], dphi[M];
#pragma unroll
    for (int q = 0; q < M; q++) {
        phi_k[q] = real ? phi[(size_t)q * nC + k] : 0.0f;
        dphi[q] = 0.0f;
    }
    for (int t0 = blockIdx.y * per_split; t0 < t_end; t0 += MHC_PG_TILE) {
        int tokens = min(MHC_PG_TILE, t_end - t0);
        __syncthreads();                            /* the previous tile's coefficients are used */
        for (int e = threadIdx.x; e < tokens * M; e += blockDim.x) tile_dh[e / M][e % M] = dh[(size_t)t0 * M + e];
        for (int e = threadIdx.x; e < tokens * NS; e += blockDim.x)
            tile_pre[e / NS][e % NS] = H[(size_t)(t0 + e / NS) * M + e % NS];
        if (dXo)
            for (int e = threadIdx.x; e < tokens * NS * NS; e += blockDim.x)
                tile_res[e / (NS * NS)][e % (NS * NS)] = H[(size_t)(t0 + e / (NS * NS)) * M + 2 * NS + e % (NS * NS)];
        if (threadIdx.x < tokens) tile_ds[threadIdx.x] = dS2[t0 + threadIdx.x];
        __syncthreads();
        if (!real) continue;
#pragma unroll 1
        for (int u = 0; u < tokens; u++) {
            size_t t = (size_t)t0 + u;
            float x = X[t * nC + k], acc = 0.0f;
            if (dXo) {
#pragma unroll
                for (int i = 0; i < NS; i++) acc += tile_res[u][i * NS + j] * dXo[t * nC + (size_t)i * C + c];
            } else {
                acc = dX[t * nC + k];
            }
            acc += tile_pre[u][j] * dy[t * C + c] + tile_ds[u] * x;
#pragma unroll
            for (int q = 0; q < M; q++) {
                acc += tile_dh[u][q] * phi_k[q];
                dphi[q] += tile_dh[u][q] * x;
            }
            dX[t * nC + k] = acc;
        }
    }
    if (!real) return;
#pragma unroll
    for (int q = 0; q < M; q++) dphi_part[((size_t)blockIdx.y * M + q) * nC + k] = dphi[q];
}

/* whether the pre-stage backward of n streams runs mhc_pre_grad_streams_kernel (gpu_mhc_pre_backward) */
static int mhc_pre_grad_one_pass(int n) { return n == MHC_SK_N; }

/* mhc_pre_grad_streams_kernel's token splits for N tokens, and the tokens of each */
static int mhc_pre_grad_per_split(int N) { return (N + MHC_PG_SPLITS - 1) / MHC_PG_SPLITS; }
static int mhc_pre_grad_splits(int N) { return (N + mhc_pre_grad_per_split(N) - 1) / mhc_pre_grad_per_split(N); }

/* mhc_pre_grad_streams_kernel at n = MHC_SK_N, then its splits' dphi added into dphi */
static void gpu_mhc_pre_grad_streams(float *dX, float *dphi, const MhcPreGradScratch *scratch, const float *dXo, const float *dy,
                                     const float *X, const float *H, const float *dh, const float *phi, int N, int C) {
    int per_split = mhc_pre_grad_per_split(N), splits = mhc_pre_grad_splits(N), D = (MHC_SK_N * MHC_SK_N + 2 * MHC_SK_N) * MHC_SK_N * C;
    dim3 grid((C + MHC_PG_CHANNELS - 1) / MHC_PG_CHANNELS, splits);
    mhc_pre_grad_streams_kernel<MHC_SK_N><<<grid, MHC_SK_N * MHC_PG_CHANNELS>>>(dX, scratch->dphi_part, dXo, dy, X, H, dh,
                                                                                scratch->dS2, phi, N, C, per_split);
    LAUNCH_CHECK();
    colsum_final_kernel<<<mhc_blocks((size_t)D, 128), 128>>>(dphi, scratch->dphi_part, splits, D);
    LAUNCH_CHECK();
}

/* The pre-stage backward of N tokens. At n = MHC_SK_N (mhc_pre_grad_one_pass) it needs scratch (dS2 [N],
   dphi_part [MHC_PG_SPLITS, m, nC]) for the one-pass stream kernel above, and with dXo given makes dX from
   it (PATH 1 too) instead of adding to dX; other n take the block's own dX update and cuBLAS's two GEMMs
   (scratch may be NULL; dXo must be). */
static void gpu_mhc_pre_backward(const MhcBlas *bl, float *dX, float *dphi, float *dH, float *da, float *dalpha_t,
                                 const MhcPreGradScratch *scratch, const float *dXo, const float *dy, const float *X, const float *H,
                                 const float *a, const float *h, const float *r, const float *phi, const float *alpha, int N,
                                 int n, int C, int iters, double eps_sk) {
    int m = n * n + 2 * n, one_pass = mhc_pre_grad_one_pass(n);
    if ((one_pass && (!scratch || !scratch->dS2 || !scratch->dphi_part)) || (!one_pass && dXo)) {
        fprintf(stderr, "gpu_mhc_pre_backward: n = %d needs its scratch, or takes no dX' (a bug)\n", n);
        exit(1);
    }
    float *dS2 = one_pass ? scratch->dS2 : NULL;    /* NULL: the coefficient kernel updates dX itself */
    gpu_sinkhorn_backward(da, dH, a, N, n, iters, eps_sk);
    int W = C % 4 == 0 && ((uintptr_t)X | (uintptr_t)dy) % 16 == 0 ? 4 : 1;
    void (*kernel)(float *, float *, float *, float *, float *, const float *, const float *, const float *, const float *,
                   const float *, const float *, int, int) =
        W == 4 ? (one_pass ? mhc_coeffs_pre_backward_kernel<MHC_SK_N, 4> : mhc_coeffs_pre_backward_kernel<0, 4>)
               : (one_pass ? mhc_coeffs_pre_backward_kernel<MHC_SK_N, 1> : mhc_coeffs_pre_backward_kernel<0, 1>);
    kernel<<<N, mhc_pre_threads(C / W)>>>(dX, dS2, dH, da, dalpha_t, dy, X, H, h, r, alpha, n, C);
    LAUNCH_CHECK();
    if (!one_pass) {
        gpu_matmul_backward(bl, MHC_GEMM_FP32, dX, dphi, dH, X, phi, N, n * C, m);   /* dH holds dh */
        return;
    }
    gpu_mhc_pre_grad_streams(dX, dphi, scratch, dXo, dy, X, H, dH, phi, N, C);   /* dH holds dh */
}

/* SPEC §6 HC, one thread per token: tv [N, n, n+2] = theta @ Xt per stream j (pre, post, res_0..res_{n-1})
   becomes tanh(tv) in place; H_pre[j] = alpha0 tp + b_pre[j], H_post[j] = alpha1 to + b_post[j],
   H_res[i][j] = alpha2 tr_i + b_res[i][j]. */
__global__ void hc_coeffs_forward_kernel(float *H, float *tv, const float *alpha, const float *b_pre, const float *b_post,
                                         const float *b_res, int N, int n) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N) return;
    int m = n * n + 2 * n;
    float *tt = tv + (size_t)t * m, *Ht = H + (size_t)t * m;
    for (int k = 0; k < m; k++) tt[k] = tanhf(tt[k]);
    for (int j = 0; j < n; j++) {
        const float *tj = tt + j * (n + 2);
        Ht[j] = alpha[0] * tj[0] + b_pre[j];
        Ht[n + j] = alpha[1] * tj[1] + b_post[j];
        for (int i = 0; i < n; i++) Ht[2 * n + i * n + j] = alpha[2] * tj[2 + i] + b_res[i * n + j];
    }
}

/* SPEC §6 backward, one thread per token: dproj [N, n, n+2] = d(theta @ Xt) and dalpha_t [N,3] (the b
   gradients are column sums of dH itself) */
__global__ void hc_coeffs_backward_kernel(float *dproj, float *dalpha_t, const float *dH, const float *tv, const float *alpha,
                                          int N, int n) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N) return;
    int m = n * n + 2 * n;
    const float *tt = tv + (size_t)t * m, *dHt = dH + (size_t)t * m;
    float *dp = dproj + (size_t)t * m, ga0 = 0, ga1 = 0, ga2 = 0;
    for (int j = 0; j < n; j++) {
        const float *tj = tt + j * (n + 2);
        float *dpj = dp + j * (n + 2);
        dpj[0] = dHt[j] * alpha[0] * (1 - tj[0] * tj[0]);
        ga0 += dHt[j] * tj[0];
        dpj[1] = dHt[n + j] * alpha[1] * (1 - tj[1] * tj[1]);
        ga1 += dHt[n + j] * tj[1];
        for (int i = 0; i < n; i++) {
            float d = dHt[2 * n + i * n + j];
            dpj[2 + i] = d * alpha[2] * (1 - tj[2 + i] * tj[2 + i]);
            ga2 += d * tj[2 + i];
        }
    }
    dalpha_t[(size_t)t * 3] = ga0;
    dalpha_t[(size_t)t * 3 + 1] = ga1;
    dalpha_t[(size_t)t * 3 + 2] = ga2;
}

/* ---------------------------------------------------------------------------------------------
   4. MLA (SPEC §9). Training attention is flash-style, in FlashAttention-2's loop order: no [T,T]
      matrix in memory. A block owns a tile of one (b, h), queries (forward, dQ; rows below) or 64 keys
      (dK and dV), and loops over the 64-row tiles of the other side, reading q, k = [k_nope | k_pe] and v
      straight from the projections' buffers (q [N,H,d_qk], kv [N,H,d_n+d_v], kpe [N,d_r]) into shared
      memory, rounded there to the operand precision P (BF16: from bf16 copies made once per call).
      Every product is a warp's mma.sync step on register fragments (section 1, tensor-core fragments).
      A lane knows which rows its accumulators are, so the softmax runs on them in registers: the
      forward rescales O row by row as the running max grows (one pass, the online softmax), and two
      accumulator tiles side by side are an A fragment, so P and dS feed the next product without
      leaving registers. The softmax, lse, o and the gradients are fp32 in every mode.
        Forward: a block owns a query tile (128 rows in bf16, 64 in fp32 words: shared memory), a warp
          16 of its rows; per key tile S = Q K^T, the online softmax, O += P V.
        dQ: the same tiles; per key tile S, dP = dO V^T, dS, dQ += dS K, all in registers.
        dK, dV: a block owns 64 keys; per query tile its 8 warps compute P^T and dS^T (keys as rows) into
          shared memory, then dV += P^T dO and dK += dS^T Q, a warp taking 16 keys and every other
          8-column tile. Two kernels instead of one with an atomic dQ: no float atomics (Determinism).
      Shared layout: a [64, d] tile has row stride att_ld(d) = d rounded up to 16, plus 8 elements, so a
      fragment's 8 rows x 4 column pairs fall in distinct banks; columns past d and rows past T are 0. */

#define MHC_ATT_TILE 64                                /* keys per tile; dK, dV's query tiles          */
#define MHC_ATT_KV_WARPS (2 * MHC_ATT_TILE / 16)       /* dK, dV: two warps per 16 keys                */
#define MHC_ATT_KEY_FRAGS (MHC_ATT_TILE / 8)           /* D tiles of a warp's 16 x 64 scores           */
#define MHC_ATT_MAX_DQK 192                            /* the register accumulators' widths: every     */
#define MHC_ATT_MAX_DV 128                             /* preset's heads (3b..27b: 192 and 128)        */
#define MHC_ATT_PLD (MHC_ATT_TILE + 8)                 /* row stride of the P^T, dS^T tiles            */

/* Blocks of a training attention kernel that must fit on an SM at once (__launch_bounds__' second
   argument). 0, the default, asks for no minimum (no .minnctapersm in the PTX), and ptxas takes the
   registers it likes: at 3b's head dims the bf16 kernels then hold one block of 256 threads per SM.
   1 is not the same as 0: ptxas then allocates differently (nvcc 13.0: bf16 dK/dV at small's dims 126 ->
   174 registers, too many for two blocks). 2 caps the kernels at 128 registers, for twice the warps to
   hide latency with; at 3b's dims the bf16 forward fits without spilling, dK/dV spills 40 bytes and dQ
   808. dev/gpu_check.sh times 0 and 2 with dev/bench_attention. */
#ifndef MHC_ATT_MIN_BLOCKS
#define MHC_ATT_MIN_BLOCKS 0
#endif

/* The kernels' exponentials are base 2, exp(x) = exp2(x log2 e), as in FlashAttention-2: exp2f is one
   hardware instruction where expf is several, on every score. The scores are scaled by scale_log2, the
   running max is kept in those units, and lse stays in natural-log units in memory. */
typedef struct {
    int T, H, dn, dr, dv;
    float scale;                  /* 1 / sqrt(d_qk) */
    float scale_log2;             /* scale log2 e */
} MhcAttShape;

#define MHC_LOG2E 1.4426950408889634f

static __host__ __device__ int att_width(int d) { return (d + 15) / 16 * 16; }   /* k steps of 16 */
static __host__ __device__ int att_ld(int d) { return att_width(d) + 8; }

/* sh with its head dims d_n, d_r, d_v replaced by DN, DR, DV where those are not 0: the kernels are
   instanced with the presets' dims fixed at compile time (gpu_attention_kernels), so that every loop over
   a head's columns has a known trip count: the products unroll completely, whole accumulator tiles that
   the dims leave unused drop out of the registers, and the tile loads index without divisions. 0 keeps
   the dims read at run time (any shape). */
template <int DN, int DR, int DV> __device__ MhcAttShape att_fixed_dims(MhcAttShape sh) {
    if (DN) sh.dn = DN;
    if (DR) sh.dr = DR;
    if (DV) sh.dv = DV;
    return sh;
}

/* rows of the forward's and dQ's query tile, a warp per 16: 128 in bf16 (half the K, V traffic per query),
   64 in fp32 words (at 3b's heads dQ's 128-row tile would not fit in shared memory) */
static constexpr __host__ __device__ int att_query_rows(int P) { return P == MHC_PREC_BF16 ? 128 : 64; }

/* key s is visible to query t: causal, and a real key (a padding query row t >= T still sees the real
   keys, so its softmax stays finite). MASKED false: the caller knows that it is (att_block_masked). */
template <bool MASKED> __device__ bool att_visible(int t, int s, MhcAttShape sh) { return !MASKED || (s <= t && s < sh.T); }

/* whether a block of queries t_first .. +t_count-1 and keys s_first .. +s_count-1 needs the mask: not
   when every key precedes every query and every query is real (then so is every key). Most of a long
   sequence's tiles are below the diagonal; the kernels run those with MASKED false, no test per score. */
__device__ bool att_block_masked(int t_first, int t_count, int s_first, int s_count, MhcAttShape sh) {
    return s_first + s_count - 1 > t_first || t_first + t_count > sh.T;
}

/* acc[j] += S B[0 .. 64, columns 8j .. 8j+7] with S a warp's [16, 64] register scores (P or dS) and B a
   key tile kept as rows of keys (V or K) */
template <int P, int NF>
__device__ void att_mma_scores(float (&acc)[NF][4], const float (&S)[MHC_ATT_KEY_FRAGS][4],
                               const typename MmaOperand<P>::elem *B, int ldb, int n) {
#pragma unroll
    for (int k = 0; k < MHC_ATT_KEY_FRAGS / 2; k++)
        mma_row<P, false>(acc, mma_acc_to_a<P>(S[2 * k], S[2 * k + 1]), B, ldb, 16 * k, 0, 8, n);
}

/* an element of an operand buffer as shared memory keeps it: fp32 words rounded to the precision P; in
   BF16 the buffers are bf16 copies already (att_bf16_copies) */
template <int P> __device__ MmaElem<P> att_stored(MmaElem<P> x) {
    if constexpr (P == MHC_PREC_BF16) return x;
    else return MmaOperand<P>::round(x);
}

/* How a kernel keeps a tile in shared memory: ATT_ROWS, rows of stride ld (att_ld: the mma.sync kernels);
   the wgmma kernels' tiles in the 128-byte swizzle (wg_offset): ATT_WG_KMAJOR (wgmma's K is the head's
   columns, in chunks of 64 one after another, each chunk ld = the tile's rows lines of 64; a 64-row one is
   also the MN-major operand whose K is the rows) and ATT_WG_MNMAJOR for the forward's V (its K is the keys,
   in halves of 64, its N the ATT_WG_TILE columns). */
enum { ATT_ROWS, ATT_WG_KMAJOR, ATT_WG_MNMAJOR };
#define ATT_WG_TILE 128                                /* the wgmma forward's queries and keys, dQ's queries */

/* where element (row i, column c) of a tile goes, in elements from its start */
template <int L> __device__ int att_tile_index(int ld, int i, int c) {
    if constexpr (L == ATT_WG_KMAJOR) return c / 64 * 64 * ld + wg_offset(false, i, c % 64);
    else if constexpr (L == ATT_WG_MNMAJOR) return i / 64 * 64 * ATT_WG_TILE + wg_offset(true, c, i % 64);
    else return i * ld + c;
}

/* the columns a tile of head dim d keeps, zero past d: whole k steps of 16 (ATT_ROWS), whole chunks of 64
   (ATT_WG_KMAJOR), wgmma's N of 128 (ATT_WG_MNMAJOR, d <= 128) */
template <int L> static __host__ __device__ int att_tile_width(int d) {
    return L == ATT_ROWS ? att_width(d) : L == ATT_WG_KMAJOR ? (d + 63) / 64 * 64 : ATT_WG_TILE;
}

/* dst[i][c0 + c] = src[(b T + t0+i) tok_stride + c] for i < rows, c < d, zero for d <= c < n and for
   rows past T, as att_stored keeps it: one head's slice of token-major rows into a shared tile (laid out
   as L: att_tile_index). Each thread moves one 16-byte chunk of consecutive columns (4 fp32 words or 8 bf16),
   coalesced, when all offsets are multiples of a chunk (every preset); element by element otherwise (the
   tests' odd dims). BF16 chunks go by cp.async (they need no rounding): they land at the caller's next
   cp_async_wait that covers them, everything else is stored before this returns. */
template <int P, int L>
__device__ void att_load_tile(MmaElem<P> *dst, int ld, int c0, int n, const MmaElem<P> *src, size_t tok_stride, int d, int b,
                              int t0, int rows, MhcAttShape sh) {
    typedef MmaElem<P> elem;
    const int w = 16 / sizeof(elem);
    bool vec = c0 % w == 0 && n % w == 0 && d % w == 0 && tok_stride % w == 0 && (uintptr_t)src % 16 == 0;
    int chunks = vec ? n / w : (n + 3) / 4, each = vec ? w : 4;
    for (int e = threadIdx.x; e < rows * chunks; e += blockDim.x) {
        int i = e / chunks, c = e % chunks * each, t = t0 + i;
        const elem *row = src + ((size_t)b * sh.T + t) * tok_stride;
        elem *out = dst + att_tile_index<L>(ld, i, c0 + c);   /* a chunk's elements stay together in every layout */
        bool real = t < sh.T && c < d;
        if (vec && P == MHC_PREC_BF16) {
            cp_async<16>(out, real ? row + c : src, real);
        } else if (vec) {
            float4 x = real ? *(const float4 *)(row + c) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            *(float4 *)out = make_float4(att_stored<P>(x.x), att_stored<P>(x.y), att_stored<P>(x.z), att_stored<P>(x.w));
        } else {
            for (int k = 0; k < each && c + k < n; k++)
                dst[att_tile_index<L>(ld, i, c0 + c + k)] = t < sh.T && c + k < d ? att_stored<P>(row[c + k]) : (elem)0;
        }
    }
}

/* K tile of keys s0 .. s0+keys-1: [k_nope | k_pe] per row (k_pe shared by the heads), zero-padded */
template <int P, int L = ATT_ROWS>
__device__ void att_load_k(MmaElem<P> *Ks, const MmaElem<P> *kv, const MmaElem<P> *kpe, int b, int h, int s0, int keys,
                           MhcAttShape sh) {
    int dqk = sh.dn + sh.dr, row = sh.dn + sh.dv, ld = L == ATT_ROWS ? att_ld(dqk) : keys;
    att_load_tile<P, L>(Ks, ld, 0, sh.dn, kv + (size_t)h * row, (size_t)sh.H * row, sh.dn, b, s0, keys, sh);
    att_load_tile<P, L>(Ks, ld, sh.dn, att_tile_width<L>(dqk) - sh.dn, kpe, sh.dr, sh.dr, b, s0, keys, sh);
}

/* V tile of keys s0 .. s0+keys-1 */
template <int P, int L = ATT_ROWS>
__device__ void att_load_v(MmaElem<P> *Vs, const MmaElem<P> *kv, int b, int h, int s0, int keys, MhcAttShape sh) {
    int row = sh.dn + sh.dv;
    att_load_tile<P, L>(Vs, L == ATT_ROWS ? att_ld(sh.dv) : keys, 0, att_tile_width<L>(sh.dv), kv + (size_t)h * row + sh.dn,
                        (size_t)sh.H * row, sh.dv, b, s0, keys, sh);
}

/* Q tile of queries t0 .. t0+rows-1 */
template <int P, int L = ATT_ROWS>
__device__ void att_load_q(MmaElem<P> *Qs, const MmaElem<P> *q, int b, int h, int t0, int rows, MhcAttShape sh) {
    int dqk = sh.dn + sh.dr;
    att_load_tile<P, L>(Qs, L == ATT_ROWS ? att_ld(dqk) : rows, 0, att_tile_width<L>(dqk), q + (size_t)h * dqk,
                        (size_t)sh.H * dqk, dqk, b, t0, rows, sh);
}

/* dO tile of queries t0 .. t0+rows-1 */
template <int P, int L = ATT_ROWS>
__device__ void att_load_do(MmaElem<P> *dOs, const MmaElem<P> *d_o, int b, int h, int t0, int rows, MhcAttShape sh) {
    att_load_tile<P, L>(dOs, L == ATT_ROWS ? att_ld(sh.dv) : rows, 0, att_tile_width<L>(sh.dv), d_o + (size_t)h * sh.dv,
                        (size_t)sh.H * sh.dv, sh.dv, b, t0, rows, sh);
}

/* the dK, dV kernel's query tile t0 .. t0+63 besides Q: its dO rows, and lse and D of those rows (zero
   past T) by 4-byte cp.async */
template <int P, int L = ATT_ROWS>
__device__ void att_load_do_rows(MmaElem<P> *dOs, float *lse_s, float *D_s, const MmaElem<P> *d_o, const float *lse,
                                 const float *D, int b, int h, int t0, MhcAttShape sh) {
    att_load_do<P, L>(dOs, d_o, b, h, t0, MHC_ATT_TILE, sh);
    if (threadIdx.x < MHC_ATT_TILE) {
        int t = t0 + threadIdx.x;
        size_t at = ((size_t)b * sh.H + h) * sh.T + (t < sh.T ? t : 0);
        cp_async<4>(lse_s + threadIdx.x, lse + at, t < sh.T);
        cp_async<4>(D_s + threadIdx.x, D + at, t < sh.T);
    }
}

/* The warp's [16, 64] accumulator tiles, for this lane: element e of tile j is row g + 8 (e / 2), key
   column 8j + 2t + e % 2. */
__device__ int att_acc_row(int e) { return threadIdx.x % 32 / 4 + 8 * (e / 2); }
__device__ int att_acc_col(int j, int e) { return 8 * j + 2 * (threadIdx.x % 4) + e % 2; }

/* P = exp(scale s - lse) = exp2(scale_log2 s - lse log2 e) where key k is visible to a real query t,
   else 0 (MASKED false: it is) */
template <bool MASKED> __device__ float att_prob(float s, float lse, int t, int k, MhcAttShape sh) {
    return !MASKED || (t < sh.T && att_visible<true>(t, k, sh)) ? exp2f(sh.scale_log2 * s - MHC_LOG2E * lse) : 0.0f;
}

/* One key tile of the online softmax on a warp's score rows S [16, 8 KF] (queries t_0 + row, keys s0 +
   column): the running max m and sum l of this lane's two rows move on, O is rescaled by exp(m_old -
   m_new) row by row, and S becomes exp(scale S - m_new) (0 where not visible). m is in log2 units (the
   max of scale_log2 S), every exponential an exp2. m is finite from the first tile on: key 0 is visible
   to every row. The four lanes of a row (same g) combine with two shuffles. */
template <bool MASKED, int KF, int NF>
__device__ void att_online_softmax(float (&S)[KF][4], float (&O)[NF][4], float (&m)[2], float (&l)[2],
                                   int t_0, int s0, MhcAttShape sh) {
#pragma unroll
    for (int r = 0; r < 2; r++) {
        float m_new = m[r], sum = 0.0f;
#pragma unroll
        for (int j = 0; j < KF; j++)
#pragma unroll
            for (int e = 2 * r; e < 2 * r + 2; e++) {
                S[j][e] = att_visible<MASKED>(t_0 + att_acc_row(e), s0 + att_acc_col(j, e), sh) ? sh.scale_log2 * S[j][e]
                                                                                                 : -INFINITY;
                m_new = fmaxf(m_new, S[j][e]);
            }
        m_new = fmaxf(m_new, __shfl_xor_sync(0xffffffffu, m_new, 1));
        m_new = fmaxf(m_new, __shfl_xor_sync(0xffffffffu, m_new, 2));
#pragma unroll
        for (int j = 0; j < KF; j++)
#pragma unroll
            for (int e = 2 * r; e < 2 * r + 2; e++) {
                S[j][e] = exp2f(S[j][e] - m_new);
                sum += S[j][e];
            }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        float rescale = exp2f(m[r] - m_new);          /* exp2(-inf) = 0 on the first tile, where l and O are 0 */
        l[r] = l[r] * rescale + sum;
        m[r] = m_new;
#pragma unroll
        for (int j = 0; j < NF; j++) {
            O[j][2 * r] *= rescale;
            O[j][2 * r + 1] *= rescale;
        }
    }
}

/* out[(b T + t_0 + row) stride + col] = scale_r acc (row, col) for real rows and columns col < d of the
   warp's tiles j < n (tile j at columns n0 + j nstep): a warp's register result into a token-major
   buffer. Columns c0 .. c0 + d - 1 of the tiles go to out[..c - c0]. */
template <int NF>
__device__ void att_store_acc(float *out, size_t stride, const float (&acc)[NF][4], int n0, int nstep, int n, int c0, int d,
                              const float (&scale_r)[2], int b, int t_0, MhcAttShape sh) {
#pragma unroll
    for (int j = 0; j < NF; j++) {
        if (j >= n) continue;
#pragma unroll
        for (int e = 0; e < 4; e++) {
            int t = t_0 + att_acc_row(e), c = n0 + j * nstep + 2 * (threadIdx.x % 4) + e % 2 - c0;
            if (t < sh.T && c >= 0 && c < d) out[((size_t)b * sh.T + t) * stride + c] = scale_r[e / 2] * acc[j][e];
        }
    }
}

/* shared bytes of the kernels, carved in this order (elem, query_rows: those of the precision P):
   forward:  Q [query_rows, d_qk], K [64, d_qk], V [64, d_v]
   dQ:       Q [query_rows, d_qk], K [64, d_qk], V [64, d_v], dO [query_rows, d_v]
   dK, dV:   lse, D [64] (floats), then Q, K [64, d_qk], V, dO [64, d_v], P^T, dS^T [64, 64] */
template <int P> static size_t att_forward_smem_bytes(MhcAttShape sh) {
    int qk = att_ld(sh.dn + sh.dr), v = att_ld(sh.dv);
    return sizeof(typename MmaOperand<P>::elem) * (att_query_rows(P) * qk + MHC_ATT_TILE * (qk + v));
}
template <int P> static size_t att_backward_q_smem_bytes(MhcAttShape sh) {
    int qk = att_ld(sh.dn + sh.dr), v = att_ld(sh.dv);
    return sizeof(typename MmaOperand<P>::elem) * (att_query_rows(P) + MHC_ATT_TILE) * (qk + v);
}
template <int P> static size_t att_backward_kv_smem_bytes(MhcAttShape sh) {
    int qk = att_ld(sh.dn + sh.dr), v = att_ld(sh.dv);
    return 2 * MHC_ATT_TILE * sizeof(float) + sizeof(typename MmaOperand<P>::elem) * MHC_ATT_TILE * 2 * (qk + v + MHC_ATT_PLD);
}

/* the wgmma forward's: Q, K [128, d_qk rounded up to 64] and V [128, 128] in bf16, and room to align them to
   1024 bytes */
static size_t att_forward_wgmma_smem_bytes(MhcAttShape sh) {
    size_t qk = (size_t)att_tile_width<ATT_WG_KMAJOR>(sh.dn + sh.dr);
    return sizeof(unsigned short) * ATT_WG_TILE * (2 * qk + ATT_WG_TILE) + 1024;
}

/* the wgmma dK, dV kernel's: K [64, d_qk], V [64, d_v] and a ring of Q, dO tiles (d_qk, d_v rounded up to
   64), P^T and dS^T twice, then lse and D of the ring's rows, and room to align to 1024 bytes */
#define ATT_WG_RING 3                                  /* Q, dO tiles in flight or in use */

static __host__ __device__ size_t att_wg_kv_elems(int qk, int nv) {   /* bf16 elements before lse and D */
    return (size_t)MHC_ATT_TILE * (1 + ATT_WG_RING) * (qk + nv) + 4 * (size_t)MHC_ATT_TILE * MHC_ATT_TILE;
}

static size_t att_backward_kv_wgmma_smem_bytes(MhcAttShape sh) {
    int qk = att_tile_width<ATT_WG_KMAJOR>(sh.dn + sh.dr), nv = att_tile_width<ATT_WG_KMAJOR>(sh.dv);
    return sizeof(unsigned short) * att_wg_kv_elems(qk, nv) + sizeof(float) * 2 * ATT_WG_RING * MHC_ATT_TILE + 1024;
}

/* the wgmma dQ kernel's: Q [128, d_qk], dO [128, d_v], K [64, d_qk], V [64, d_v] (rounded up to 64), aligned */
static size_t att_backward_q_wgmma_smem_bytes(MhcAttShape sh) {
    int qk = att_tile_width<ATT_WG_KMAJOR>(sh.dn + sh.dr), nv = att_tile_width<ATT_WG_KMAJOR>(sh.dv);
    return sizeof(unsigned short) * (ATT_WG_TILE + MHC_ATT_TILE) * (size_t)(qk + nv) + 1024;
}

/* the most shared memory any attention kernel on mma.sync takes in any precision, for a check at init (the
   wgmma kernels' is checked by mhc_gpu_set_wgmma) */
static size_t att_smem_most(MhcAttShape sh) {
    size_t most = 0;
    size_t each[9] = {att_forward_smem_bytes<MHC_PREC_FP32>(sh), att_forward_smem_bytes<MHC_PREC_TF32>(sh),
                      att_forward_smem_bytes<MHC_PREC_BF16>(sh), att_backward_q_smem_bytes<MHC_PREC_FP32>(sh),
                      att_backward_q_smem_bytes<MHC_PREC_TF32>(sh), att_backward_q_smem_bytes<MHC_PREC_BF16>(sh),
                      att_backward_kv_smem_bytes<MHC_PREC_FP32>(sh), att_backward_kv_smem_bytes<MHC_PREC_TF32>(sh),
                      att_backward_kv_smem_bytes<MHC_PREC_BF16>(sh)};
    for (int k = 0; k < 9; k++) most = each[k] > most ? each[k] : most;
    return most;
}

/* grid (B*H, query tiles of query_rows). o [N,H,d_v] = softmax(Sc) V per row, lse [B,H,T] = log sum_s
   exp(Sc[t,s]). The tiles run last one first: they have the most key tiles, and a long block started
   late would leave the GPU idle at the end. A warp whose 16 rows all precede a key tile skips its
   products (it still loads its share, and meets the barriers).
   K and V have one buffer each and take turns (FlashAttention-2's pipeline): V of this tile arrives while
   S = Q K^T is computed, and K of the next tile while the softmax and O += P V are, so in BF16 (cp.async)
   a tile's loads overlap the other half's products instead of stalling the block. */
template <int P, int DN, int DR, int DV>
__global__ void __launch_bounds__(32 * (att_query_rows(P) / 16), MHC_ATT_MIN_BLOCKS)
attention_forward_kernel(float *o, float *lse, const MmaElem<P> *q, const MmaElem<P> *kv, const MmaElem<P> *kpe, MhcAttShape dims) {
    typedef typename MmaOperand<P>::elem elem;
    const MhcAttShape sh = att_fixed_dims<DN, DR, DV>(dims);
    extern __shared__ __align__(32) float smem[];
    const int rows = att_query_rows(P);
    int dqk = sh.dn + sh.dr, dv = sh.dv, b = blockIdx.x / sh.H, h = blockIdx.x % sh.H;
    int t0 = (gridDim.y - 1 - blockIdx.y) * rows, r0 = threadIdx.x / 32 * 16;
    elem *Qs = (elem *)smem, *Ks = Qs + rows * att_ld(dqk), *Vs = Ks + MHC_ATT_TILE * att_ld(dqk);
    int end = min(t0 + rows, sh.T);                         /* keys s < end are visible to some row */
    att_load_q<P>(Qs, q, b, h, t0, rows, sh);
    att_load_k<P>(Ks, kv, kpe, b, h, 0, MHC_ATT_TILE, sh);
    cp_async_commit();                                      /* group: Q, K of tile 0 */
    att_load_v<P>(Vs, kv, b, h, 0, MHC_ATT_TILE, sh);
    cp_async_commit();                                      /* group: V of tile 0 */
    float O[MHC_ATT_MAX_DV / 8][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};   /* O [16, d_v] */
    mma_zero(O);
    for (int s0 = 0; s0 < end; s0 += MHC_ATT_TILE) {
        bool active = t0 + r0 + 15 >= s0, more = s0 + MHC_ATT_TILE < end;
        float S[MHC_ATT_KEY_FRAGS][4];
        mma_zero(S);
        cp_async_wait<1>();                                 /* K of this tile is in (V may still come) */
        __syncthreads();
        if (active) mma_smem<P, true>(S, Qs, att_ld(dqk), r0, Ks, att_ld(dqk), att_width(dqk), 0, 8, MHC_ATT_KEY_FRAGS);
        __syncthreads();                                    /* every warp is done with K */
        if (more) att_load_k<P>(Ks, kv, kpe, b, h, s0 + MHC_ATT_TILE, MHC_ATT_TILE, sh);
        cp_async_commit();                                  /* (empty on the last tile: the count stays) */
        if (active) {
            if (att_block_masked(t0 + r0, 16, s0, MHC_ATT_TILE, sh)) att_online_softmax<true>(S, O, m, l, t0 + r0, s0, sh);
            else att_online_softmax<false>(S, O, m, l, t0 + r0, s0, sh);
        }
        cp_async_wait<1>();                                 /* V of this tile is in (the next K may come) */
        __syncthreads();
        if (active) att_mma_scores<P>(O, S, Vs, att_ld(dv), att_width(dv) / 8);
        __syncthreads();                                    /* every warp is done with V */
        if (more) att_load_v<P>(Vs, kv, b, h, s0 + MHC_ATT_TILE, MHC_ATT_TILE, sh);
        cp_async_commit();
    }
    float inv_l[2] = {1.0f / l[0], 1.0f / l[1]};
    att_store_acc(o + (size_t)h * dv, (size_t)sh.H * dv, O, 0, 8, att_width(dv) / 8, 0, dv, inv_l, b, t0 + r0, sh);
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int t = t0 + r0 + att_acc_row(2 * r);
        if (threadIdx.x % 4 == 0 && t < sh.T) lse[(size_t)blockIdx.x * sh.T + t] = (m[r] + log2f(l[r])) / MHC_LOG2E;
    }
}

/* The forward on Hopper's wgmma (BF16, mhc_gpu_set_wgmma's MHC_WGMMA_ATTENTION; d_v <= 128): the same grid,
   sums and softmax as attention_forward_kernel on tiles of ATT_WG_TILE queries and keys. Each of the two
   warpgroups owns 64 of the query rows: S [64 x 128 keys] = Q K^T is wg_product's m64n128k16 steps over
   the head's columns, both tiles in shared memory (K-major); the online softmax runs on S as it lies in
   the registers (16 of mma.sync's D tiles a warp: att_online_softmax as it is); O [64 x 128] += P V takes
   P from those registers (wg_product_regs, mma_acc_to_a) and V MN-major. K and V take turns in one buffer
   each, as in the mma.sync kernel. A query tile and a key tile start at multiples of 128, so key s0 is
   visible to every row of every tile the loop reaches: no warpgroup sits a tile out. d_v below 128 and
   d_qk not a multiple of 64 are padded with zero columns (the presets from 3b up: 128 and 192, none).
   Shared memory: att_forward_wgmma_smem_bytes. */
template <int DN, int DR, int DV>
__global__ void __launch_bounds__(2 * 128, 1)
attention_forward_wgmma_kernel(float *o, float *lse, const unsigned short *q, const unsigned short *kv, const unsigned short *kpe,
                               MhcAttShape dims) {
    const MhcAttShape sh = att_fixed_dims<DN, DR, DV>(dims);
    extern __shared__ uint8_t att_wg_smem[];
    int dqk = sh.dn + sh.dr, dv = sh.dv, qk = att_tile_width<ATT_WG_KMAJOR>(dqk), b = blockIdx.x / sh.H, h = blockIdx.x % sh.H;
    int t0 = (gridDim.y - 1 - blockIdx.y) * ATT_WG_TILE, wg = threadIdx.x / 128, r0 = threadIdx.x / 32 * 16;
    unsigned short *Qs = wg_tiles(att_wg_smem);
    unsigned short *Ks = Qs + ATT_WG_TILE * qk, *Vs = Ks + ATT_WG_TILE * qk;
    int end = min(t0 + ATT_WG_TILE, sh.T);                  /* keys s < end are visible to some row */
    att_load_q<MHC_PREC_BF16, ATT_WG_KMAJOR>(Qs, q, b, h, t0, ATT_WG_TILE, sh);
    att_load_k<MHC_PREC_BF16, ATT_WG_KMAJOR>(Ks, kv, kpe, b, h, 0, ATT_WG_TILE, sh);
    cp_async_commit();                                      /* group: Q, K of tile 0 */
    att_load_v<MHC_PREC_BF16, ATT_WG_MNMAJOR>(Vs, kv, b, h, 0, ATT_WG_TILE, sh);
    cp_async_commit();                                      /* group: V of tile 0 */
    float O[16][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};   /* the warp's O [16, 128] */
    mma_zero(O);
    for (int s0 = 0; s0 < end; s0 += ATT_WG_TILE) {
        bool more = s0 + ATT_WG_TILE < end;
        float S[16][4];                                     /* the warp's S [16, 128 keys] */
        mma_zero(S);
        cp_async_wait<1>();                                 /* K of this tile is in (V may still come) */
        wg_fence_shared();
        __syncthreads();
        wg_hold(S);
        wg_fence();
        for (int c = 0; c < qk; c += 64)                    /* chunk c of the head's columns, 4 k steps */
#pragma unroll
            for (int k0 = 0; k0 < 64; k0 += 16)
                wg_product<false, false>(S, Qs + c * ATT_WG_TILE + 4096 * wg, Ks + c * ATT_WG_TILE, k0);
        wg_commit();
        wg_wait();
        wg_hold(S);
        __syncthreads();                                    /* every warpgroup is done with K */
        if (more) att_load_k<MHC_PREC_BF16, ATT_WG_KMAJOR>(Ks, kv, kpe, b, h, s0 + ATT_WG_TILE, ATT_WG_TILE, sh);
        cp_async_commit();                                  /* (empty on the last tile: the count stays) */
        if (att_block_masked(t0 + r0, 16, s0, ATT_WG_TILE, sh)) att_online_softmax<true>(S, O, m, l, t0 + r0, s0, sh);
        else att_online_softmax<false>(S, O, m, l, t0 + r0, s0, sh);
        MmaFragA<MHC_PREC_BF16> p[8];                       /* P, rounded, 16 keys a fragment */
#pragma unroll
        for (int k = 0; k < 8; k++) p[k] = mma_acc_to_a<MHC_PREC_BF16>(S[2 * k], S[2 * k + 1]);
        cp_async_wait<1>();                                 /* V of this tile is in (the next K may come) */
        wg_fence_shared();
        __syncthreads();
        wg_hold(O);
        wg_fence();
#pragma unroll
        for (int k = 0; k < 8; k++) wg_product_regs<true>(O, p[k], Vs + k / 4 * 64 * ATT_WG_TILE, 16 * (k % 4));
        wg_commit();
        wg_wait();
        wg_hold(O);
        __syncthreads();                                    /* every warpgroup is done with V */
        if (more) att_load_v<MHC_PREC_BF16, ATT_WG_MNMAJOR>(Vs, kv, b, h, s0 + ATT_WG_TILE, ATT_WG_TILE, sh);
        cp_async_commit();
    }
    float inv_l[2] = {1.0f / l[0], 1.0f / l[1]};
    att_store_acc(o + (size_t)h * dv, (size_t)sh.H * dv, O, 0, 8, 16, 0, dv, inv_l, b, t0 + r0, sh);
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int t = t0 + r0 + att_acc_row(2 * r);
        if (threadIdx.x % 4 == 0 && t < sh.T) lse[(size_t)blockIdx.x * sh.T + t] = (m[r] + log2f(l[r])) / MHC_LOG2E;
    }
}

/* D [B,H,T]: D[t] = sum_c dO[t][c] O[t][c], the row term of the softmax backward; one warp per row */
__global__ void attention_rowdot_kernel(float *D, const float *d_o, const float *o, MhcAttShape sh, int rows) {
    int row = blockIdx.x * MHC_ROW_WARPS + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    int t = row % sh.T, h = row / sh.T % sh.H, b = row / sh.T / sh.H;
    size_t base = (((size_t)b * sh.T + t) * sh.H + h) * sh.dv;
    float sum = 0;
    for (int c = lane; c < sh.dv; c += 32) sum += d_o[base + c] * o[base + c];
    sum = warp_reduce(sum, SumOp());
    if (lane == 0) D[row] = sum;
}

/* dS = scale P (dP - D) on a warp's [16, 64] tiles (queries t_0 + row, keys s0 + column): dS holds dP
   = dO V^T and becomes dS; S holds the scores; lse_r, D_r are this lane's two rows' (SPEC §9's softmax
   backward, the score scale folded in) */
template <bool MASKED>
__device__ void att_score_grads(float (&dS)[MHC_ATT_KEY_FRAGS][4], const float (&S)[MHC_ATT_KEY_FRAGS][4],
                                const float (&lse_r)[2], const float (&D_r)[2], int t_0, int s0, MhcAttShape sh) {
#pragma unroll
    for (int j = 0; j < MHC_ATT_KEY_FRAGS; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            float p = att_prob<MASKED>(S[j][e], lse_r[e / 2], t_0 + att_acc_row(e), s0 + att_acc_col(j, e), sh);
            dS[j][e] = sh.scale * p * (dS[j][e] - D_r[e / 2]);
        }
}

/* The dK, dV kernels' P^T and dS^T of a warp's [16 keys, 8 KF queries] tiles (keys s0 + kr0 + row, queries
   t0 + qc0 + column; St the transposed scores, dPt = V dO^T) into the shared tiles Pt, dSt [64 keys, 64
   queries] laid out as L (ld: att_tile_index), rounded to the operand precision: a lane's two adjacent
   queries, one pair store each. lse_s, D_s: the query tile's rows. */
template <int P, bool MASKED, int L, int KF>
__device__ void att_store_score_grads_t(MmaElem<P> *Pt, MmaElem<P> *dSt, int ld, const float (&St)[KF][4],
                                        const float (&dPt)[KF][4], const float *lse_s, const float *D_s, int kr0, int qc0,
                                        int t0, int s0, MhcAttShape sh) {
    typedef MmaOperand<P> Op;
#pragma unroll
    for (int j = 0; j < KF; j++)
#pragma unroll
        for (int e = 0; e < 4; e += 2) {
            int i = kr0 + att_acc_row(e), c = qc0 + att_acc_col(j, e), at = att_tile_index<L>(ld, i, c);
            float p0 = att_prob<MASKED>(St[j][e], lse_s[c], t0 + c, s0 + i, sh);
            float p1 = att_prob<MASKED>(St[j][e + 1], lse_s[c + 1], t0 + c + 1, s0 + i, sh);
            float ds0 = sh.scale * p0 * (dPt[j][e] - D_s[c]), ds1 = sh.scale * p1 * (dPt[j][e + 1] - D_s[c + 1]);
            *(typename Op::pair *)(Pt + at) = Op::make(Op::round(p0), Op::round(p1));   /* c, c + 1 adjacent in every layout */
            *(typename Op::pair *)(dSt + at) = Op::make(Op::round(ds0), Op::round(ds1));
        }
}

/* grid (B*H, query tiles, last first as in the forward): dq [N,H,d_qk] of rows t0 .. t0+query_rows-1 =
   sum over the key tiles up to the diagonal of dS K, with P = exp(Sc - lse) and dS = scale P (dP - D)
   (SPEC §9's softmax backward, the score scale folded in). K and V take turns as in the forward: the next
   V arrives while S, dS and dS K are computed, the next K while dP = dO V^T is. */
template <int P, int DN, int DR, int DV>
__global__ void __launch_bounds__(32 * (att_query_rows(P) / 16), MHC_ATT_MIN_BLOCKS)
attention_backward_q_kernel(float *dq, const MmaElem<P> *d_o, const float *lse, const float *D, const MmaElem<P> *q,
                            const MmaElem<P> *kv, const MmaElem<P> *kpe, MhcAttShape dims) {
    typedef typename MmaOperand<P>::elem elem;
    const MhcAttShape sh = att_fixed_dims<DN, DR, DV>(dims);
    extern __shared__ __align__(32) float smem[];
    const int rows = att_query_rows(P);
    int dqk = sh.dn + sh.dr, dv = sh.dv, b = blockIdx.x / sh.H, h = blockIdx.x % sh.H;
    int t0 = (gridDim.y - 1 - blockIdx.y) * rows, r0 = threadIdx.x / 32 * 16;
    elem *Qs = (elem *)smem, *dOs = Qs + rows * att_ld(dqk), *Ks = dOs + rows * att_ld(dv);
    elem *Vs = Ks + MHC_ATT_TILE * att_ld(dqk);
    int end = min(t0 + rows, sh.T);
    att_load_q<P>(Qs, q, b, h, t0, rows, sh);
    att_load_do<P>(dOs, d_o, b, h, t0, rows, sh);
    att_load_v<P>(Vs, kv, b, h, 0, MHC_ATT_TILE, sh);
    cp_async_commit();                                      /* group: Q, dO, V of tile 0 */
    att_load_k<P>(Ks, kv, kpe, b, h, 0, MHC_ATT_TILE, sh);
    cp_async_commit();                                      /* group: K of tile 0 */
    float lse_r[2], D_r[2];                                 /* of this lane's two query rows */
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int t = t0 + r0 + att_acc_row(2 * r);
        lse_r[r] = t < sh.T ? lse[(size_t)blockIdx.x * sh.T + t] : 0.0f;
        D_r[r] = t < sh.T ? D[(size_t)blockIdx.x * sh.T + t] : 0.0f;
    }
    float dQ[MHC_ATT_MAX_DQK / 8][4];                       /* [16, d_qk] */
    mma_zero(dQ);
    for (int s0 = 0; s0 < end; s0 += MHC_ATT_TILE) {
        bool active = t0 + r0 + 15 >= s0, more = s0 + MHC_ATT_TILE < end;
        float S[MHC_ATT_KEY_FRAGS][4], dS[MHC_ATT_KEY_FRAGS][4];
        mma_zero(S);
        mma_zero(dS);
        cp_async_wait<1>();                                 /* V of this tile is in (K may still come) */
        __syncthreads();
        if (active) mma_smem<P, true>(dS, dOs, att_ld(dv), r0, Vs, att_ld(dv), att_width(dv), 0, 8, MHC_ATT_KEY_FRAGS);  /* dP */
        __syncthreads();                                    /* every warp is done with V */
        if (more) att_load_v<P>(Vs, kv, b, h, s0 + MHC_ATT_TILE, MHC_ATT_TILE, sh);
        cp_async_commit();
        cp_async_wait<1>();                                 /* K of this tile is in (the next V may come) */
        __syncthreads();
        if (active) {
            mma_smem<P, true>(S, Qs, att_ld(dqk), r0, Ks, att_ld(dqk), att_width(dqk), 0, 8, MHC_ATT_KEY_FRAGS);
            if (att_block_masked(t0 + r0, 16, s0, MHC_ATT_TILE, sh)) att_score_grads<true>(dS, S, lse_r, D_r, t0 + r0, s0, sh);
            else att_score_grads<false>(dS, S, lse_r, D_r, t0 + r0, s0, sh);
            att_mma_scores<P>(dQ, dS, Ks, att_ld(dqk), att_width(dqk) / 8);
        }
        __syncthreads();                                    /* every warp is done with K */
        if (more) att_load_k<P>(Ks, kv, kpe, b, h, s0 + MHC_ATT_TILE, MHC_ATT_TILE, sh);
        cp_async_commit();
    }
    float one[2] = {1.0f, 1.0f};
    att_store_acc(dq + (size_t)h * dqk, (size_t)sh.H * dqk, dQ, 0, 8, att_width(dqk) / 8, 0, dqk, one, b, t0 + r0, sh);
}

/* grid (B*H, key tiles): dK and dV of keys s0 .. s0+63, summed over the query tiles t0 >= s0 (the first
   key tiles have the most, and run first). Writes the k_nope and v parts of dkv [N,H,d_n+d_v] and this
   head's k_pe gradient dkpe_h [N,H,d_r]. Warp w: keys kr0 = 16 (w % 4) .. +15; for P^T and dS^T the
   queries 32 (w / 4) .. +31 of the tile, for dK and dV the 8-column tiles of parity w / 4.
   Q and dO have one buffer each and take turns: the next dO (with its rows' lse and D) arrives while
   dK += dS^T Q is computed, the next Q while dP^T = V dO^T is. */
template <int P, int DN, int DR, int DV>
__global__ void __launch_bounds__(32 * MHC_ATT_KV_WARPS, MHC_ATT_MIN_BLOCKS)
attention_backward_kv_kernel(float *dkv, float *dkpe_h, const MmaElem<P> *d_o, const float *lse, const float *D,
                             const MmaElem<P> *q, const MmaElem<P> *kv, const MmaElem<P> *kpe, MhcAttShape dims) {
    typedef typename MmaOperand<P>::elem elem;
    const MhcAttShape sh = att_fixed_dims<DN, DR, DV>(dims);
    extern __shared__ __align__(32) float smem[];
    int dqk = sh.dn + sh.dr, dv = sh.dv, b = blockIdx.x / sh.H, h = blockIdx.x % sh.H, s0 = blockIdx.y * MHC_ATT_TILE;
    int warp = threadIdx.x / 32, kr0 = warp % (MHC_ATT_TILE / 16) * 16, half = warp / (MHC_ATT_TILE / 16);
    int qc0 = half * MHC_ATT_TILE / 2;
    float *lse_s = smem, *D_s = lse_s + MHC_ATT_TILE;
    elem *Qs = (elem *)(D_s + MHC_ATT_TILE), *Ks = Qs + MHC_ATT_TILE * att_ld(dqk), *Vs = Ks + MHC_ATT_TILE * att_ld(dqk);
    elem *dOs = Vs + MHC_ATT_TILE * att_ld(dv), *Pt = dOs + MHC_ATT_TILE * att_ld(dv), *dSt = Pt + MHC_ATT_TILE * MHC_ATT_PLD;
    att_load_k<P>(Ks, kv, kpe, b, h, s0, MHC_ATT_TILE, sh);
    att_load_v<P>(Vs, kv, b, h, s0, MHC_ATT_TILE, sh);
    att_load_do_rows<P>(dOs, lse_s, D_s, d_o, lse, D, b, h, s0, sh);
    cp_async_commit();                                      /* group: K, V, dO (lse, D) of tile s0 */
    att_load_q<P>(Qs, q, b, h, s0, MHC_ATT_TILE, sh);
    cp_async_commit();                                      /* group: Q of tile s0 */
    int nk = (att_width(dqk) / 8 - half + 1) / 2, nv = (att_width(dv) / 8 - half + 1) / 2;   /* this warp's tiles */
    float dK[MHC_ATT_MAX_DQK / 16][4], dV[MHC_ATT_MAX_DV / 16][4];
    mma_zero(dK);
    mma_zero(dV);
    for (int t0 = s0; t0 < sh.T; t0 += MHC_ATT_TILE) {
        bool more = t0 + MHC_ATT_TILE < sh.T;
        float St[MHC_ATT_KEY_FRAGS / 2][4], dPt[MHC_ATT_KEY_FRAGS / 2][4];   /* [16 keys, 32 queries] */
        mma_zero(St);
        mma_zero(dPt);
        cp_async_wait<1>();                                 /* dO, lse, D of this tile are in (Q may come) */
        __syncthreads();
        mma_smem<P, true>(dPt, Vs, att_ld(dv), kr0, dOs, att_ld(dv), att_width(dv), qc0, 8, MHC_ATT_KEY_FRAGS / 2);
        cp_async_wait<0>();                                 /* Q of this tile is in */
        __syncthreads();
        mma_smem<P, true>(St, Ks, att_ld(dqk), kr0, Qs, att_ld(dqk), att_width(dqk), qc0, 8, MHC_ATT_KEY_FRAGS / 2);
        if (att_block_masked(t0 + qc0, MHC_ATT_TILE / 2, s0 + kr0, 16, sh))
            att_store_score_grads_t<P, true, ATT_ROWS>(Pt, dSt, MHC_ATT_PLD, St, dPt, lse_s, D_s, kr0, qc0, t0, s0, sh);
        else
            att_store_score_grads_t<P, false, ATT_ROWS>(Pt, dSt, MHC_ATT_PLD, St, dPt, lse_s, D_s, kr0, qc0, t0, s0, sh);
        __syncthreads();                                    /* P^T, dS^T are complete */
        mma_smem<P, false>(dV, Pt, MHC_ATT_PLD, kr0, dOs, att_ld(dv), MHC_ATT_TILE, 8 * half, 16, nv);   /* P^T dO */
        __syncthreads();                                    /* every warp is done with dO, lse, D */
        if (more) att_load_do_rows<P>(dOs, lse_s, D_s, d_o, lse, D, b, h, t0 + MHC_ATT_TILE, sh);
        cp_async_commit();
        mma_smem<P, false>(dK, dSt, MHC_ATT_PLD, kr0, Qs, att_ld(dqk), MHC_ATT_TILE, 8 * half, 16, nk);  /* dS^T Q */
        __syncthreads();                                    /* every warp is done with Q, P^T and dS^T */
        if (more) att_load_q<P>(Qs, q, b, h, t0 + MHC_ATT_TILE, MHC_ATT_TILE, sh);
        cp_async_commit();
    }
    float one[2] = {1.0f, 1.0f};
    size_t row = (size_t)sh.H * (sh.dn + dv);
    float *dkv_h = dkv + (size_t)h * (sh.dn + dv);
    att_store_acc(dkv_h, row, dK, 8 * half, 16, nk, 0, sh.dn, one, b, s0 + kr0, sh);
    att_store_acc(dkv_h + sh.dn, row, dV, 8 * half, 16, nv, 0, dv, one, b, s0 + kr0, sh);
    att_store_acc(dkpe_h + (size_t)h * sh.dr, (size_t)sh.H * sh.dr, dK, 8 * half, 16, nk, sh.dn, sh.dr, one, b, s0 + kr0, sh);
}

/* att_store_acc of a warp's [16, qk] wgmma accumulator kept as two: columns 0 .. 127 in a128 where qk >= 128, the
   last 64 in a64 where qk is not a multiple of 128 (qk: d_qk rounded up to 64, at most 192) */
__device__ void att_store_acc_qk(float *out, size_t stride, const float (&a128)[16][4], const float (&a64)[8][4], int qk,
                                 int c0, int d, int b, int t_0, MhcAttShape sh) {
    float one[2] = {1.0f, 1.0f};
    if (qk >= 128) att_store_acc(out, stride, a128, 0, 8, 16, c0, d, one, b, t_0, sh);
    if (qk % 128) att_store_acc(out, stride, a64, qk - 64, 8, 8, c0, d, one, b, t_0, sh);
}

/* dQ on wgmma (BF16, MHC_WGMMA_ATTENTION; d_qk <= 192, d_v <= 128, NV: d_v rounded up to 64 or 128): the grid,
   sums and pipeline of attention_backward_q_kernel (128 queries a block, key tiles of 64, V and K taking
   turns in one buffer each), each warpgroup 64 of the queries. Per key tile dP = dO V^T and S = Q K^T are
   m64n64k16 steps from shared memory (all K-major), dS = scale P (dP - D) is made on them in registers
   (att_score_grads as it is), and dQ += dS K takes dS from the registers (wg_product_regs) with K's tile as
   the MN-major operand (the same bytes: a 64-row K-major tile), m64n128k16 for d_qk's first 128 columns
   and m64n64k16 for the last 64 of 192. A warpgroup whose 64 rows all precede a key tile skips its
   products. Shared memory: att_backward_q_wgmma_smem_bytes. */
template <int DN, int DR, int DV, int NV>
__global__ void __launch_bounds__(2 * 128, 1)
attention_backward_q_wgmma_kernel(float *dq, const unsigned short *d_o, const float *lse, const float *D, const unsigned short *q,
                                  const unsigned short *kv, const unsigned short *kpe, MhcAttShape dims) {
    const MhcAttShape sh = att_fixed_dims<DN, DR, DV>(dims);
    extern __shared__ uint8_t att_wg_smem[];
    const int rows = ATT_WG_TILE;                           /* the block's queries */
    int qk = att_tile_width<ATT_WG_KMAJOR>(sh.dn + sh.dr), b = blockIdx.x / sh.H, h = blockIdx.x % sh.H;
    int t0 = (gridDim.y - 1 - blockIdx.y) * rows, wg = threadIdx.x / 128, r0 = threadIdx.x / 32 * 16;
    unsigned short *Qs = wg_tiles(att_wg_smem), *dOs = Qs + rows * qk, *Ks = dOs + rows * NV, *Vs = Ks + MHC_ATT_TILE * qk;
    int end = min(t0 + rows, sh.T);
    att_load_q<MHC_PREC_BF16, ATT_WG_KMAJOR>(Qs, q, b, h, t0, rows, sh);
    att_load_do<MHC_PREC_BF16, ATT_WG_KMAJOR>(dOs, d_o, b, h, t0, rows, sh);
    att_load_v<MHC_PREC_BF16, ATT_WG_KMAJOR>(Vs, kv, b, h, 0, MHC_ATT_TILE, sh);
    cp_async_commit();                                      /* group: Q, dO, V of tile 0 */
    att_load_k<MHC_PREC_BF16, ATT_WG_KMAJOR>(Ks, kv, kpe, b, h, 0, MHC_ATT_TILE, sh);
    cp_async_commit();                                      /* group: K of tile 0 */
    float lse_r[2], D_r[2];                                 /* of this lane's two query rows */
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int t = t0 + r0 + att_acc_row(2 * r);
        lse_r[r] = t < sh.T ? lse[(size_t)blockIdx.x * sh.T + t] : 0.0f;
        D_r[r] = t < sh.T ? D[(size_t)blockIdx.x * sh.T + t] : 0.0f;
    }
    float dQa[16][4], dQb[8][4];                            /* dQ's columns 0 .. 127 (qk >= 128), its last 64 */
    mma_zero(dQa);
    mma_zero(dQb);
    const unsigned short *Qw = Qs + 4096 * wg, *dOw = dOs + 4096 * wg;   /* the warpgroup's rows of each chunk */
    for (int s0 = 0; s0 < end; s0 += MHC_ATT_TILE) {
        bool active = t0 + 64 * wg + 63 >= s0, more = s0 + MHC_ATT_TILE < end;
        float S[MHC_ATT_KEY_FRAGS][4], dS[MHC_ATT_KEY_FRAGS][4];   /* the warp's [16, 64 keys]; dS holds dP first */
        mma_zero(S);
        mma_zero(dS);
        cp_async_wait<1>();                                 /* V of this tile is in (K may still come) */
        wg_fence_shared();
        __syncthreads();
        if (active) {
            wg_hold(dS);
            wg_fence();
#pragma unroll
            for (int c = 0; c < NV; c += 64)
#pragma unroll
                for (int k0 = 0; k0 < 64; k0 += 16) wg_product<false, false, 64>(dS, dOw + c * rows, Vs + c * MHC_ATT_TILE, k0);
            wg_commit();
            wg_wait();
            wg_hold(dS);
        }
        __syncthreads();                                    /* every warpgroup is done with V */
        if (more) att_load_v<MHC_PREC_BF16, ATT_WG_KMAJOR>(Vs, kv, b, h, s0 + MHC_ATT_TILE, MHC_ATT_TILE, sh);
        cp_async_commit();
        cp_async_wait<1>();                                 /* K of this tile is in (the next V may come) */
        wg_fence_shared();
        __syncthreads();
        if (active) {
            wg_hold(S);
            wg_fence();
            for (int c = 0; c < qk; c += 64)
#pragma unroll
                for (int k0 = 0; k0 < 64; k0 += 16) wg_product<false, false, 64>(S, Qw + c * rows, Ks + c * MHC_ATT_TILE, k0);
            wg_commit();
            wg_wait();
            wg_hold(S);
            if (att_block_masked(t0 + r0, 16, s0, MHC_ATT_TILE, sh)) att_score_grads<true>(dS, S, lse_r, D_r, t0 + r0, s0, sh);
            else att_score_grads<false>(dS, S, lse_r, D_r, t0 + r0, s0, sh);
            MmaFragA<MHC_PREC_BF16> ds[MHC_ATT_KEY_FRAGS / 2];   /* dS, rounded, 16 keys a fragment */
#pragma unroll
            for (int k = 0; k < MHC_ATT_KEY_FRAGS / 2; k++) ds[k] = mma_acc_to_a<MHC_PREC_BF16>(dS[2 * k], dS[2 * k + 1]);
            wg_hold(dQa);
            wg_hold(dQb);
            wg_fence();
#pragma unroll
            for (int k = 0; k < MHC_ATT_KEY_FRAGS / 2; k++) {
                if (qk >= 128) wg_product_regs<true, 128>(dQa, ds[k], Ks, 16 * k);
                if (qk % 128) wg_product_regs<true, 64>(dQb, ds[k], Ks + (qk - 64) * MHC_ATT_TILE, 16 * k);
            }
            wg_commit();
            wg_wait();
            wg_hold(dQa);
            wg_hold(dQb);
        }
        __syncthreads();                                    /* every warpgroup is done with K */
        if (more) att_load_k<MHC_PREC_BF16, ATT_WG_KMAJOR>(Ks, kv, kpe, b, h, s0 + MHC_ATT_TILE, MHC_ATT_TILE, sh);
        cp_async_commit();
    }
    int dqk = sh.dn + sh.dr;
    att_store_acc_qk(dq + (size_t)h * dqk, (size_t)sh.H * dqk, dQa, dQb, qk, 0, dqk, b, t0 + r0, sh);
}

/* barrier 1 over the whole block: the warpgroups of a kernel whose loops are their own meet here, each
   from its own loop. That takes PTX's barrier.sync without .aligned, which counts the block's arrivals
   wherever they come from; bar.sync (and __syncthreads) is the .aligned form, which promises that every
   thread reaches the same instruction (CUTLASS's NamedBarrier::arrive_and_wait_unaligned is this one) */
__device__ void att_barrier() {
#if defined(__CUDA_ARCH__)
    asm volatile("barrier.sync 1, %0;" ::"r"(blockDim.x) : "memory");
#else
    __syncthreads();
#endif
}

/* the buffers of attention_backward_kv_wgmma_kernel, carved from its dynamic shared memory in this order */
typedef struct {
    unsigned short *K, *V;                   /* [64, qk], [64, NV], K-major                        */
    unsigned short *Q, *dO;                  /* [ATT_WG_RING][64, qk], [ATT_WG_RING][64, NV]        */
    unsigned short *Pt, *dSt;                /* [2][64 keys, 64 queries], K-major                   */
    float *lse, *D;                          /* [ATT_WG_RING][64]                                   */
    int qk, nv;                              /* d_qk and d_v rounded up to 64                       */
} MhcAttWgKv;

/* query tile i (queries s0 + 64 i ..) into ring slot i % ATT_WG_RING: Q, dO, and lse, D of its rows; one
   cp.async group, empty past the last tile */
__device__ void att_wg_load_queries(const MhcAttWgKv &m, const unsigned short *q, const unsigned short *d_o, const float *lse,
                                    const float *D, int b, int h, int s0, int i, MhcAttShape sh) {
    int tiles = (sh.T - s0 + MHC_ATT_TILE - 1) / MHC_ATT_TILE, slot = i % ATT_WG_RING, t0 = s0 + MHC_ATT_TILE * i;
    if (i < tiles) {
        att_load_q<MHC_PREC_BF16, ATT_WG_KMAJOR>(m.Q + (size_t)slot * MHC_ATT_TILE * m.qk, q, b, h, t0, MHC_ATT_TILE, sh);
        att_load_do_rows<MHC_PREC_BF16, ATT_WG_KMAJOR>(m.dO + (size_t)slot * MHC_ATT_TILE * m.nv, m.lse + slot * MHC_ATT_TILE,
                                                        m.D + slot * MHC_ATT_TILE, d_o, lse, D, b, h, t0, sh);
    }
    cp_async_commit();
}

/* the end of step i of both warpgroups' loops: warpgroup 0's P^T and dS^T of tile i are complete and
   tile i - 1's slot is free (every product that read it has completed), so tile i + 2 goes there; then
   tile i + 1 has landed */
__device__ void att_wg_next_tile(const MhcAttWgKv &m, const unsigned short *q, const unsigned short *d_o, const float *lse,
                                 const float *D, int b, int h, int s0, int i, MhcAttShape sh) {
    wg_fence_shared();                                      /* P^T, dS^T: generic stores, for the tensor cores */
    att_barrier();
    att_wg_load_queries(m, q, d_o, lse, D, b, h, s0, i + 2, sh);
    cp_async_wait<1>();                                     /* tile i + 1 (i + 2 may still come) */
    wg_fence_shared();
    att_barrier();
}

/* warpgroup 0, query tile i: S^T = K Q^T and dP^T = V dO^T (the warp's 16 keys kr0 .. of the 64, 64
   queries), then P^T and dS^T into buffer i % 2 */
template <int NV>
__device__ void att_wg_scores(const MhcAttWgKv &m, int s0, int i, MhcAttShape sh) {
    int slot = i % ATT_WG_RING, t0 = s0 + MHC_ATT_TILE * i, kr0 = threadIdx.x / 32 * 16;
    const unsigned short *Qi = m.Q + (size_t)slot * MHC_ATT_TILE * m.qk, *dOi = m.dO + (size_t)slot * MHC_ATT_TILE * NV;
    float St[MHC_ATT_KEY_FRAGS][4], dPt[MHC_ATT_KEY_FRAGS][4];   /* [16 keys, 64 queries] */
    mma_zero(St);
    mma_zero(dPt);
    wg_hold(St);
    wg_hold(dPt);
    wg_fence();
    for (int c = 0; c < m.qk; c += 64)                      /* chunk c of the columns: 4 k steps */
#pragma unroll
        for (int k0 = 0; k0 < 64; k0 += 16) wg_product<false, false, 64>(St, m.K + c * MHC_ATT_TILE, Qi + c * MHC_ATT_TILE, k0);
#pragma unroll
    for (int c = 0; c < NV; c += 64)
#pragma unroll
        for (int k0 = 0; k0 < 64; k0 += 16) wg_product<false, false, 64>(dPt, m.V + c * MHC_ATT_TILE, dOi + c * MHC_ATT_TILE, k0);
    wg_commit();
    wg_wait();
    wg_hold(St);
    wg_hold(dPt);
    unsigned short *Pt = m.Pt + i % 2 * MHC_ATT_TILE * MHC_ATT_TILE, *dSt = m.dSt + i % 2 * MHC_ATT_TILE * MHC_ATT_TILE;
    const float *lse_s = m.lse + slot * MHC_ATT_TILE, *D_s = m.D + slot * MHC_ATT_TILE;
    if (att_block_masked(t0, MHC_ATT_TILE, s0 + kr0, 16, sh))
        att_store_score_grads_t<MHC_PREC_BF16, true, ATT_WG_KMAJOR>(Pt, dSt, MHC_ATT_TILE, St, dPt, lse_s, D_s, kr0, 0, t0, s0, sh);
    else
        att_store_score_grads_t<MHC_PREC_BF16, false, ATT_WG_KMAJOR>(Pt, dSt, MHC_ATT_TILE, St, dPt, lse_s, D_s, kr0, 0, t0, s0, sh);
}

/* warpgroup 1, query tile i: dV += P^T dO, dK += dS^T Q (dK's columns 0 .. 127 in dKa where qk >= 128, the
   last 64 in dKb where qk is not a multiple of 128) */
template <int NV>
__device__ void att_wg_grads(float (&dV)[NV / 8][4], float (&dKa)[16][4], float (&dKb)[8][4], const MhcAttWgKv &m, int i) {
    int slot = i % ATT_WG_RING;
    const unsigned short *Qi = m.Q + (size_t)slot * MHC_ATT_TILE * m.qk, *dOi = m.dO + (size_t)slot * MHC_ATT_TILE * NV;
    const unsigned short *Pt = m.Pt + i % 2 * MHC_ATT_TILE * MHC_ATT_TILE, *dSt = m.dSt + i % 2 * MHC_ATT_TILE * MHC_ATT_TILE;
    wg_hold(dV);
    wg_hold(dKa);
    wg_hold(dKb);
    wg_fence();
#pragma unroll
    for (int k0 = 0; k0 < MHC_ATT_TILE; k0 += 16) {         /* the tile's queries, 16 at a time */
        wg_product<false, true, NV>(dV, Pt, dOi, k0);
        if (m.qk >= 128) wg_product<false, true, 128>(dKa, dSt, Qi, k0);
        if (m.qk % 128) wg_product<false, true, 64>(dKb, dSt, Qi + (m.qk - 64) * MHC_ATT_TILE, k0);
    }
    wg_commit();
    wg_wait();
    wg_hold(dV);
    wg_hold(dKa);
    wg_hold(dKb);
}

/* dK and dV on wgmma (BF16, mhc_gpu_set_wgmma's MHC_WGMMA_ATTENTION; d_qk <= 192, d_v <= 128, NV: d_v rounded
   up to 64 or 128): the grid and sums of attention_backward_kv_kernel, 64 keys a block, walking the query
   tiles of 64 from the diagonal on. The two warpgroups split a tile's work, as FlashAttention-3's producer
   and consumer do, but both on the tensor cores:
     warpgroup 0 makes S^T = K Q^T and dP^T = V dO^T (64 keys x 64 queries each, m64n64k16), and from them
       P^T and dS^T, rounded to bf16 into shared memory (att_wg_scores);
     warpgroup 1 takes the tile before's and adds dV += P^T dO and dK += dS^T Q (m64n128k16, and m64n64k16
       for the last 64 of d_qk's 192 columns), holding dV and dK, 64 + 96 accumulators a thread (att_wg_grads).
   Each has about half the FLOPs of a tile: 64 x 64 x (d_qk + d_v) multiply-adds. Q and dO come by cp.async
   through a ring of 3 (warpgroup 0 reads tile i while warpgroup 1 reads tile i - 1 and tile i + 1 lands),
   P^T and dS^T through two buffers. A 64-row K-major tile is the same bytes as a 64-deep MN-major one, so
   the copies of dO and Q that the scores read K-major are also the MN-major operands of dV and dK. The
   warpgroups run loops of their own, so they meet at a named barrier (att_barrier), which PTX counts
   wherever it is reached from. Shared memory: att_backward_kv_wgmma_smem_bytes. */
template <int DN, int DR, int DV, int NV>
__global__ void __launch_bounds__(2 * 128, 1)
attention_backward_kv_wgmma_kernel(float *dkv, float *dkpe_h, const unsigned short *d_o, const float *lse, const float *D,
                                   const unsigned short *q, const unsigned short *kv, const unsigned short *kpe, MhcAttShape dims) {
    const MhcAttShape sh = att_fixed_dims<DN, DR, DV>(dims);
    extern __shared__ uint8_t att_wg_smem[];
    int b = blockIdx.x / sh.H, h = blockIdx.x % sh.H, s0 = blockIdx.y * MHC_ATT_TILE, wg = threadIdx.x / 128;
    int tiles = (sh.T - s0 + MHC_ATT_TILE - 1) / MHC_ATT_TILE;
    MhcAttWgKv m;
    m.qk = att_tile_width<ATT_WG_KMAJOR>(sh.dn + sh.dr);
    m.nv = NV;
    m.K = wg_tiles(att_wg_smem);
    m.V = m.K + MHC_ATT_TILE * m.qk;
    m.Q = m.V + MHC_ATT_TILE * NV;
    m.dO = m.Q + ATT_WG_RING * MHC_ATT_TILE * m.qk;
    m.Pt = m.dO + ATT_WG_RING * MHC_ATT_TILE * NV;
    m.dSt = m.Pt + 2 * MHC_ATT_TILE * MHC_ATT_TILE;
    m.lse = (float *)(m.K + att_wg_kv_elems(m.qk, NV));
    m.D = m.lse + ATT_WG_RING * MHC_ATT_TILE;
    att_load_k<MHC_PREC_BF16, ATT_WG_KMAJOR>(m.K, kv, kpe, b, h, s0, MHC_ATT_TILE, sh);
    att_load_v<MHC_PREC_BF16, ATT_WG_KMAJOR>(m.V, kv, b, h, s0, MHC_ATT_TILE, sh);
    att_wg_load_queries(m, q, d_o, lse, D, b, h, s0, 0, sh);    /* group: K, V, tile 0 */
    att_wg_load_queries(m, q, d_o, lse, D, b, h, s0, 1, sh);    /* group: tile 1 */
    cp_async_wait<1>();
    wg_fence_shared();
    att_barrier();
    if (wg == 0) {
        for (int i = 0; i <= tiles; i++) {
            if (i < tiles) att_wg_scores<NV>(m, s0, i, sh);
            att_wg_next_tile(m, q, d_o, lse, D, b, h, s0, i, sh);
        }
        return;
    }
    float dV[NV / 8][4], dKa[16][4], dKb[8][4];
    mma_zero(dV);
    mma_zero(dKa);
    mma_zero(dKb);
    for (int i = 0; i <= tiles; i++) {
        if (i > 0) att_wg_grads<NV>(dV, dKa, dKb, m, i - 1);
        att_wg_next_tile(m, q, d_o, lse, D, b, h, s0, i, sh);
    }
    int kr0 = threadIdx.x % 128 / 32 * 16;                  /* the warp's 16 keys */
    float one[2] = {1.0f, 1.0f};
    size_t row = (size_t)sh.H * (sh.dn + sh.dv);
    float *dkv_h = dkv + (size_t)h * (sh.dn + sh.dv), *dkpe_hh = dkpe_h + (size_t)h * sh.dr;
    att_store_acc(dkv_h + sh.dn, row, dV, 0, 8, NV / 8, 0, sh.dv, one, b, s0 + kr0, sh);
    att_store_acc_qk(dkv_h, row, dKa, dKb, m.qk, 0, sh.dn, b, s0 + kr0, sh);                        /* k_nope */
    att_store_acc_qk(dkpe_hh, (size_t)sh.H * sh.dr, dKa, dKb, m.qk, sh.dn, sh.dr, b, s0 + kr0, sh); /* k_pe   */
}

/* dkpe [N,d_r] = sum_h dkpe_h [N,H,d_r]: the shared k_pe collects the gradient of every head (SPEC §9) */
__global__ void kpe_grad_kernel(float *dkpe, const float *dkpe_h, int N, int H, int dr) {
    size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * dr) return;
    size_t t = idx / dr;
    int i = (int)(idx % dr);
    float sum = 0;
    for (int h = 0; h < H; h++) sum += dkpe_h[(t * H + h) * dr + i];
    dkpe[idx] = sum;
}

/* BF16: the attention kernels read q, kv, kpe (and in the backward d_o) as bf16 copies made once per call,
   in place of rounding every tile as they load it (each key tile is loaded once per query tile). The
   copies live in the GEMM operand scratch, which no GEMM uses while attention runs: q then k_pe in
   scratch[0], kv then d_o in scratch[1], each starting on 16 bytes. The kernels take bf16 bits
   (MmaOperand<MHC_PREC_BF16>::elem), so the copies are handed over as such. */
typedef struct {
    const unsigned short *q, *kv, *kpe, *d_o;
} MhcAttBf16;

static size_t att_bf16_chunks(size_t count) { return (count + 7) / 8 * 8; }   /* whole 16-byte chunks */

/* elements each scratch buffer needs for N tokens */
static size_t att_bf16_scratch_count(const MhcConfig *c, size_t N) {
    size_t H = c->n_heads, dn = c->qk_nope_head_dim, dr = c->qk_rope_head_dim, dv = c->v_head_dim;
    size_t s0 = att_bf16_chunks(N * H * (dn + dr)) + N * dr, s1 = att_bf16_chunks(N * H * (dn + dv)) + N * H * dv;
    return s0 > s1 ? s0 : s1;
}

/* d_o may be NULL (the forward) */
static MhcAttBf16 att_bf16_copies(const MhcBlas *bl, const float *q, const float *kv, const float *kpe, const float *d_o,
                                  int N, const MhcConfig *c) {
    size_t H = c->n_heads, dn = c->qk_nope_head_dim, dr = c->qk_rope_head_dim, dv = c->v_head_dim;
    size_t nq = (size_t)N * H * (dn + dr), nkv = (size_t)N * H * (dn + dv);
    if (!bl->scratch[0] || !bl->scratch[1] || bl->scratch_count < att_bf16_scratch_count(c, (size_t)N)) {
        fprintf(stderr, "mhc_cuda attention: the bf16 copies of %d tokens do not fit the scratch of %zu (a bug)\n", N,
                bl->scratch[0] ? bl->scratch_count : 0);
        exit(1);
    }
    __nv_bfloat16 *s0 = bl->scratch[0], *s1 = bl->scratch[1];
    gpu_to_bf16(s0, q, nq);
    gpu_to_bf16(s0 + att_bf16_chunks(nq), kpe, (size_t)N * dr);
    gpu_to_bf16(s1, kv, nkv);
    if (d_o) gpu_to_bf16(s1 + att_bf16_chunks(nkv), d_o, (size_t)N * H * dv);
    MhcAttBf16 x = {(const unsigned short *)s0, (const unsigned short *)s1, (const unsigned short *)(s0 + att_bf16_chunks(nq)),
                    d_o ? (const unsigned short *)(s1 + att_bf16_chunks(nkv)) : NULL};
    return x;
}

/* out [dc] = sum_{s < rows} weight[s] row_s, by the whole block: row_s = base + s ld, except the last,
   row rows - 1, which is `last` where that is given. Warp w takes rows w, w + warps, ..., a lane the
   columns lane + 32 x of each chunk of MHC_DECODE_COLS; the warps' sums go to part [warps][MHC_DECODE_COLS]
   and a thread per column adds them in warp order (the same bits on every run). A lane has a row's 16
   loads in flight at once and every warp loads, where a thread per column walking the rows had 8 loads in
   flight and half the block idle (dc = 512 of 1024 threads); unrolling the rows as well spills registers
   (64 at 1024 threads). The rows are fp32 (the cache), or a weight's rows in fp32 or bf16 (R). out may
   not be part; the call ends on a barrier. */
#define MHC_DECODE_COLS 512
#define MHC_DECODE_LANE_COLS (MHC_DECODE_COLS / 32)

template <typename R>
__device__ void block_weighted_rows(float *out, const R *__restrict__ base, size_t ld, const R *last, const float *weight,
                                    int rows, int dc, float *part) {
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    for (int k0 = 0; k0 < dc; k0 += MHC_DECODE_COLS) {
        float acc[MHC_DECODE_LANE_COLS];
#pragma unroll
        for (int x = 0; x < MHC_DECODE_LANE_COLS; x++) acc[x] = 0.0f;
        for (int s = warp; s < rows; s += warps) {
            const R *row = (last && s == rows - 1 ? last : base + (size_t)s * ld) + k0;
            float w = weight[s];
#pragma unroll
            for (int x = 0; x < MHC_DECODE_LANE_COLS; x++)
                if (k0 + lane + 32 * x < dc) acc[x] += w * weight_value(row[lane + 32 * x]);
        }
#pragma unroll
        for (int x = 0; x < MHC_DECODE_LANE_COLS; x++) part[warp * MHC_DECODE_COLS + lane + 32 * x] = acc[x];
        __syncthreads();
        for (int k = threadIdx.x; k < MHC_DECODE_COLS && k0 + k < dc; k += blockDim.x) {
            float sum = 0;
            for (int w = 0; w < warps; w++) sum += part[w * MHC_DECODE_COLS + k];
            out[k0 + k] = sum;
        }
        __syncthreads();                               /* out is complete; part is free again */
    }
}

/* the lane's share of a . row over n elements, lane + 32 x of each chunk of MHC_DECODE_COLS: the chunk's
   loads of row in flight at once (a loop the compiler unrolls by 4 had a quarter of them) */
__device__ float lane_dot_rows(const float *a, const float *__restrict__ row, int n) {
    int lane = threadIdx.x % 32;
    float s = 0;
    for (int k0 = 0; k0 < n; k0 += MHC_DECODE_COLS) {
        float v[MHC_DECODE_LANE_COLS];
#pragma unroll
        for (int x = 0; x < MHC_DECODE_LANE_COLS; x++) v[x] = k0 + lane + 32 * x < n ? row[k0 + lane + 32 * x] : 0.0f;
#pragma unroll
        for (int x = 0; x < MHC_DECODE_LANE_COLS; x++)
            if (k0 + lane + 32 * x < n) s += a[k0 + lane + 32 * x] * v[x];
    }
    return s;
}

/* SPEC §10 absorbed attention of the new token at position t = *pos, all of it for head h in block h.
   The position is read from device memory so that a captured decode graph replays at every position
   (section 8). First the token's own latent row, which every block makes for itself from
   raw = W_dkv u [d_c + d_r] (one launch fewer than a kernel of its own): c_t = RMSNorm(raw[0, d_c)) with
   gain g and k_pe,t = RoPE_t(raw[d_c, d_c + d_r)), and head h's q_pe rotated; block 0 also writes c_t and
   k_pe,t to the cache rows ckv[t], kpe[t] for the tokens after this one (the blocks read rows < t from
   the cache, row t from their own copy). Then q_abs = W_uk[h]^T q_nope[h] = sum_i q_nope[h][i] W_uk[h][i]
   (block_weighted_rows), Sc[s] = scale (q_abs . c_s + q_pe[h] . k_pe,s) for s <= t (a warp per s),
   P = softmax, olat = sum_s P[s] c_s (block_weighted_rows again), and o[h] = W_uv[h] olat (a warp per
   output). W_uk[h] and W_uv[h] are rows [0, dn) and [dn, dn + dv) of head h's (dn + dv) x dc block of
   W_ukv. Shared: q_abs, olat, c_t [dc each], q_pe, k_pe,t [dr each], block_weighted_rows' part; the
   scores go to scores [H, max_len]. W_ukv is fp32 (exact), or in BF16 its bf16 twin (MW,
   decode_bf16_weight); the cache and all sums are fp32. A warp has a whole key's loads in flight
   (lane_dot_rows), and a block has MHC_DECODE_ATT_THREADS threads: H blocks leave most SMs idle, so each
   waits on memory, and more warps keep more rows loading at once. Launched overlapped (section 0):
   W_ukv[h] heads for L2 before the wait. */
#define MHC_DECODE_ATT_THREADS 1024
static size_t decode_attention_smem_bytes(int dc, int dr) {
    return sizeof(float) * (3 * (size_t)dc + 2 * (size_t)dr + MHC_DECODE_ATT_THREADS / 32 * MHC_DECODE_COLS);
}

template <typename MW>
__global__ void __launch_bounds__(MHC_DECODE_ATT_THREADS, 1)
mla_decode_attention_kernel(float *__restrict__ o, float *__restrict__ scores, float *__restrict__ ckv, float *__restrict__ kpe,
                            const float *__restrict__ q, const float *__restrict__ raw, const float *__restrict__ g,
                            const MW *__restrict__ wukv, const int *pos, int max_len, int dc, int dr, int dn, int dv,
                            float scale, float eps, double theta) {
    extern __shared__ float smem[];
    float *qa = smem, *ol = qa + dc, *ct = ol + dc, *qp = ct + dc, *kt = qp + dr, *part = kt + dr;
    int h = blockIdx.x, lane = threadIdx.x % 32, warps = blockDim.x / 32, half = dr / 2;
    const float *qn = q + (size_t)h * (dn + dr);
    const MW *w = wukv + (size_t)h * (dn + dv) * dc;
    for (int i = threadIdx.x / 32; i < dn + dv; i += warps) prefetch_l2(w + (size_t)i * dc, dc);
    grid_dependency_wait();
    grid_dependents_launch();
    int t = *pos;
    float *sc = scores + (size_t)h * max_len, ss = 0;
    for (int k = threadIdx.x; k < dc; k += blockDim.x) {
        ct[k] = raw[k];
        ss += raw[k] * raw[k];
    }
    for (int p = threadIdx.x; p < 2 * half; p += blockDim.x) {   /* pairs [0, half): q_pe's; then k_pe,t's */
        if (p < half) rope_pair(qp, qn + dn, t, p, dr, theta, 0);
        else rope_pair(kt, raw + dc, t, p - half, dr, theta, 0);
    }
    block_weighted_rows(qa, w, dc, (const MW *)NULL, qn, dn, dc, part);
    float r = 1.0f / sqrtf(block_reduce(ss, SumOp()) / dc + eps);   /* its barriers: qp and kt are complete */
    for (int k = threadIdx.x; k < dc; k += blockDim.x) {
        ct[k] = g[k] * ct[k] * r;
        if (h == 0) ckv[(size_t)t * dc + k] = ct[k];
    }
    if (h == 0)
        for (int i = threadIdx.x; i < dr; i += blockDim.x) kpe[(size_t)t * dr + i] = kt[i];
    __syncthreads();
    for (int s = threadIdx.x / 32; s <= t; s += warps) {
        const float *cs = s < t ? ckv + (size_t)s * dc : ct, *ks = s < t ? kpe + (size_t)s * dr : kt;
        float dot = lane_dot_rows(qa, cs, dc);
        for (int i = lane; i < dr; i += 32) dot += qp[i] * ks[i];
        dot = warp_reduce(dot, SumOp());
        if (lane == 0) sc[s] = dot * scale;
    }
    __syncthreads();
    float mx = -INFINITY, sum = 0;
    for (int s = threadIdx.x; s <= t; s += blockDim.x) mx = fmaxf(mx, sc[s]);
    mx = block_reduce(mx, MaxOp());
    for (int s = threadIdx.x; s <= t; s += blockDim.x) {
        sc[s] = expf(sc[s] - mx);
        sum += sc[s];
    }
    sum = block_reduce(sum, SumOp());
    for (int s = threadIdx.x; s <= t; s += blockDim.x) sc[s] /= sum;   /* P; each thread its own entries */
    __syncthreads();
    block_weighted_rows(ol, ckv, dc, ct, sc, t + 1, dc, part);
    for (int k = threadIdx.x / 32; k < dv; k += warps) {
        float d = warp_dot(w + (size_t)(dn + k) * dc, ol, dc);
        if (lane == 0) o[(size_t)h * dv + k] = d;
    }
}

/* ---------------------------------------------------------------------------------------------
   5. FFN and MoE (SPEC §8, §11). Per layer the hidden buffers ffn_a/g/h hold [N, D] (dense), or the
      N*K routed slots in expert-grouped row order, [N*K, I], followed by the shared expert, [N, Ns*I].
      moe_eo [N*K, C] uses the same grouped rows; row[p] is the grouped row of assignment p = t*K + k. */

/* SPEC §11 routing (mhc.h moe_route), one warp per token with its scores in shared memory: s = sigma(z)
   in place (computed in double like the CPU, so the selections agree); selection score c = s + bias,
   dropped groups -inf; top-K with the lowest index on ties; w = rho s / sum_Sel s (unbiased). Each of
   the K picks is one warp argmax: a lane takes the best of its experts lane, lane + 32, ..., then a
   butterfly keeps the higher score, the lower index on equal scores, as the CPU's first maximum. Per
   warp, shared: score [E], gscore [G] (doubles), then the picks so far [K] (ints). */
#define MHC_ROUTE_WARPS 4

static __host__ __device__ size_t route_warp_bytes(int E, int G, int K) {   /* whole doubles: the next warp's stay aligned */
    return (sizeof(double) * (size_t)(E + G) + sizeof(int) * (size_t)K + 7) / 8 * 8;
}

/* the better of two (score, expert) candidates, expert -1 meaning none; every lane ends with the same */
__device__ void route_better(double &v, int &i, double v2, int i2) {
    if (i2 >= 0 && (i < 0 || v2 > v || (v2 == v && i2 < i))) { v = v2; i = i2; }
}

/* one token's routing by one warp: z [E] (its gate scores; s = sigma(z) replaces them) into sel, w [K];
   score [E], gscore [G], picked [K]: the warp's shared scratch (route_warp_bytes). z is read past L1
   (__ldcg): in decode the blocks of this very launch wrote it (moe_route_lone_kernel). */
__device__ void route_token(int *sel, float *w, float *st, const float *bias, double *score, int E, int K, int G, int Gk,
                            double rho) {
    int lane = threadIdx.x % 32;
    double *gscore = score + E;
    int *picked = (int *)(gscore + G);
    for (int i = lane; i < E; i += 32) {
        st[i] = (float)(1.0 / (1.0 + exp(-(double)__ldcg(st + i))));
        score[i] = (double)st[i] + bias[i];
    }
    __syncwarp();
    if (G > 1) {
        int per = E / G;
        for (int gi = lane; gi < G; gi += 32) {     /* group score: sum of its top-2 selection scores */
            double b1 = -INFINITY, b2 = -INFINITY;
            for (int i = gi * per; i < (gi + 1) * per; i++) {
                if (score[i] > b1) { b2 = b1; b1 = score[i]; }
                else if (score[i] > b2) b2 = score[i];
            }
            gscore[gi] = b1 + b2;
        }
        __syncwarp();
        for (int gi = lane; gi < G; gi += 32) {     /* keep the top G_k groups (lowest index on ties) */
            int rank = 0;
            for (int gj = 0; gj < G; gj++) rank += gscore[gj] > gscore[gi] || (gscore[gj] == gscore[gi] && gj < gi);
            if (rank >= Gk)
                for (int i = gi * per; i < (gi + 1) * per; i++) score[i] = -INFINITY;
        }
        __syncwarp();
    }
    for (int k = 0; k < K; k++) {
        double v = -INFINITY;
        int best = -1;
        for (int i = lane; i < E; i += 32) {
            int taken = 0;
            for (int j = 0; j < k; j++) taken |= picked[j] == i;
            if (!taken) route_better(v, best, score[i], i);
        }
        for (int o = 16; o > 0; o >>= 1) {
            double v2 = __shfl_xor_sync(0xffffffffu, v, o);
            int i2 = __shfl_xor_sync(0xffffffffu, best, o);
            route_better(v, best, v2, i2);
        }
        if (lane == 0) picked[k] = best;
        __syncwarp();
    }
    if (lane == 0) {                                /* the sum in pick order, as on the CPU */
        double Z = 0;
        for (int k = 0; k < K; k++) Z += st[picked[k]];
        for (int k = 0; k < K; k++) {
            sel[k] = picked[k];
            w[k] = (float)(rho * st[picked[k]] / Z);
        }
    }
}

__global__ void __launch_bounds__(32 * MHC_ROUTE_WARPS) moe_route_kernel(int *sel, float *w, float *s, const float *bias, int N,
                                                                         int E, int K, int G, int Gk, double rho) {
    extern __shared__ double route_smem[];
    int warp = threadIdx.x / 32;
    size_t t = blockIdx.x * (size_t)(blockDim.x / 32) + warp;
    grid_dependency_wait();                         /* launched overlapped (section 0): z is the router's */
    grid_dependents_launch();
    if (t >= (size_t)N) return;
    double *score = (double *)((char *)route_smem + warp * route_warp_bytes(E, G, K));
    route_token(sel + t * K, w + t * K, s + t * E, bias, score, E, K, G, Gk, rho);
}

static void gpu_moe_route(int *sel, float *w, float *s, const float *bias, int N, const MhcConfig *c) {
    int E = c->n_routed_experts, G = c->n_expert_groups, K = c->n_activated_experts;
    size_t per = route_warp_bytes(E, G, K);
    int warps = (int)(48 * 1024 / per);
    warps = warps < 1 ? 1 : warps > MHC_ROUTE_WARPS ? MHC_ROUTE_WARPS : warps;
    cudaLaunchConfig_t config = overlapped_launch(mhc_blocks((size_t)N, warps), 32 * warps, warps * per);
    CUDA_CHECK(cudaLaunchKernelEx(&config, moe_route_kernel, sel, w, s, bias, N, E, K, G, c->n_limited_groups,
                                  c->route_scale));
}

/* A lone token's router (decode) in one launch where it took two: z = W_gate u a warp per expert, as
   matvec_kernel makes it (exact fp32, the same sums), then the last block to finish routes the token
   (route_token on its warp 0), as the lone pre-stage's last block finishes it. done: blocks finished, 0
   between launches (the last block resets it). Launched overlapped (section 0): the gate's rows head for
   L2 before the wait. */
__global__ void moe_route_lone_kernel(int *sel, float *w, float *s, const float *gate, const float *u, const float *bias,
                                      unsigned *done, int C, int E, int K, int G, int Gk, double rho) {
    extern __shared__ double route_smem[];
    int o = blockIdx.x * MHC_ROW_WARPS + threadIdx.x / 32;
    if (o < E) prefetch_l2(gate + (size_t)o * C, C);
    grid_dependency_wait();
    grid_dependents_launch();
    if (o < E) {
        float z = warp_dot(gate + (size_t)o * C, u, C);
        if (threadIdx.x % 32 == 0) s[o] = z;
    }
    if (!grid_last_block(done)) return;             /* this block's scores fenced first */
    if (threadIdx.x < 32) route_token(sel, w, s, bias, route_smem, E, K, G, Gk, rho);
    if (threadIdx.x == 0) *done = 0;
}

static void gpu_moe_route_lone(int *sel, float *w, float *s, const float *gate, const float *u, const float *bias,
                               unsigned *done, const MhcConfig *c) {
    int E = c->n_routed_experts, G = c->n_expert_groups, K = c->n_activated_experts;
    cudaLaunchConfig_t config = overlapped_launch(mhc_blocks((size_t)E, MHC_ROW_WARPS), 32 * MHC_ROW_WARPS,
                                                  route_warp_bytes(E, G, K));
    CUDA_CHECK(cudaLaunchKernelEx(&config, moe_route_lone_kernel, sel, w, s, gate, u, bias, done, c->d_model, E, K, G,
                                  c->n_limited_groups, c->route_scale));
}

__global__ void moe_count_kernel(int *count, const int *sel, int NK) {
    int c = 0;
    for (int p = threadIdx.x; p < NK; p += blockDim.x) c += sel[p] == (int)blockIdx.x;
    c = block_reduce(c, SumOp());
    if (threadIdx.x == 0) count[blockIdx.x] = c;
}

/* start [E+1] = exclusive prefix sum of count; load (may be NULL) = count, the bias update's loads */
__global__ void moe_offsets_kernel(int *start, int *load, const int *count, int E) {
    if (threadIdx.x != 0) return;
    start[0] = 0;
    for (int e = 0; e < E; e++) {
        start[e + 1] = start[e] + count[e];
        if (load) load[e] = count[e];
    }
}

/* group the assignments by expert in assignment order (mhc.h moe_group_by_expert): order[pos] = p and
   row[p] = pos. One block per expert walks the assignments in tiles; warp ballots rank the hits. */
__global__ void moe_fill_kernel(int *order, int *row, const int *sel, const int *start, int NK) {
    __shared__ int warp_hits[32], base;
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, e = blockIdx.x;
    if (threadIdx.x == 0) base = start[e];
    __syncthreads();
    for (int p0 = 0; p0 < NK; p0 += blockDim.x) {
        int p = p0 + threadIdx.x, hit = p < NK && sel[p] == e;
        unsigned ballot = __ballot_sync(0xffffffffu, hit);
        if (lane == 0) warp_hits[warp] = __popc(ballot);
        __syncthreads();
        int pos = base + __popc(ballot & ((1u << lane) - 1));
        for (int w = 0; w < warp; w++) pos += warp_hits[w];
        if (hit) { order[pos] = p; row[p] = pos; }
        __syncthreads();
        if (threadIdx.x == 0)
            for (int w = 0; w < (int)blockDim.x / 32; w++) base += warp_hits[w];
        __syncthreads();
    }
}

/* xg[pos] = u[token of order[pos]]: the expert inputs in grouped order. xg [N*K, C] */
__global__ void moe_gather_kernel(float *xg, const float *u, const int *order, int NK, int K, int C) {
    size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (idx >= (size_t)NK * C) return;
    size_t pos = idx / C, c = idx % C;
    xg[idx] = u[(size_t)(order[pos] / K) * C + c];
}

/* out[t] += sum_k w[t][k] * src[row[t*K + k]] in slot order (w NULL: weight 1). Forward: the weighted
   un-permute of the expert outputs; backward: the expert input gradients back to their tokens. */
__global__ void moe_combine_kernel(float *out, const float *src, const int *row, const float *w, int N, int K, int C) {
    size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * C) return;
    size_t t = idx / C, c = idx % C;
    float acc = out[idx];
    for (int k = 0; k < K; k++) {
        float v = src[(size_t)row[t * K + k] * C + c];
        acc += w ? w[t * K + k] * v : v;
    }
    out[idx] = acc;
}

/* Decode's FFNs on one token (SPEC §8 SwiGLU, §11 experts), one warp per output, the token's own
   rows read in place: no grouping, no gather, no combine. A set of slots (MhcFfnSlots) is K FFNs of
   `rows` hidden units: slot k uses expert e_k = sel[k], whose matrices are W + e_k w_stride, or, with
   sel NULL, W itself (a dense FFN, or the shared experts), weighted by w_k (1 where w is NULL). The
   kernels take two sets, s0 then s1 (s1.K = 0: none), so an MoE layer's shared and routed experts are
   one launch each way:
     up:   h[k][i] = silu(W1_k[i] . u) (W3_k[i] . u),   i < rows, each set's slots   grid (K0 + K1, rows / 8)
     down: out[c] = sum over s0's slots, then s1's, of w_k (W2_k[c] . h[k]),  c < C  grid (C / 8)
   The matrices are fp32, or in BF16 their bf16 twins (MW, decode_bf16_weight); products and sums in fp32
   (warp_dot), the slots summed in order as moe_combine_kernel does. Both are launched overlapped (section
   0): the rows of slots that need no selection (sel NULL: dense FFNs, the shared experts) head for L2
   before the wait. */
template <typename MW> struct MhcFfnSlots {
    const MW *w1, *w3, *w2;
    const int *sel;
    const float *w;
    size_t w_stride;
    int K, rows;
    float *h;                            /* [K, rows] */
};

template <typename MW> __global__ void ffn_decode_up_kernel(MhcFfnSlots<MW> s0, MhcFfnSlots<MW> s1, const float *u, int C) {
    int k = blockIdx.x, i = blockIdx.y * 8 + threadIdx.x / 32;
    MhcFfnSlots<MW> s = k < s0.K ? s0 : s1;
    k = k < s0.K ? k : k - s0.K;
    if (!s.sel && i < s.rows) {
        prefetch_l2(s.w1 + (size_t)i * C, C);
        prefetch_l2(s.w3 + (size_t)i * C, C);
    }
    grid_dependency_wait();
    grid_dependents_launch();
    if (i >= s.rows) return;
    size_t at = (s.sel ? (size_t)s.sel[k] * s.w_stride : 0) + (size_t)i * C;
    float a = warp_dot(s.w1 + at, u, C), g = warp_dot(s.w3 + at, u, C);
    if (threadIdx.x % 32 == 0) s.h[(size_t)k * s.rows + i] = a * mhc_sigmoidf(a) * g;
}

template <typename MW> __device__ float ffn_decode_down_sum(float acc, const MhcFfnSlots<MW> &s, int c) {
    for (int k = 0; k < s.K; k++) {
        float v = warp_dot(s.w2 + (s.sel ? (size_t)s.sel[k] * s.w_stride : 0) + (size_t)c * s.rows, s.h + (size_t)k * s.rows,
                           s.rows);
        acc += s.w ? s.w[k] * v : v;
    }
    return acc;
}

template <typename MW> __global__ void ffn_decode_down_kernel(float *out, MhcFfnSlots<MW> s0, MhcFfnSlots<MW> s1, int C) {
    int c = blockIdx.x * 8 + threadIdx.x / 32;
    if (c < C && s0.K && !s0.sel) prefetch_l2(s0.w2 + (size_t)c * s0.rows, s0.rows);
    if (c < C && s1.K && !s1.sel) prefetch_l2(s1.w2 + (size_t)c * s1.rows, s1.rows);
    grid_dependency_wait();
    grid_dependents_launch();
    if (c >= C) return;
    float acc = ffn_decode_down_sum(ffn_decode_down_sum(0.0f, s0, c), s1, c);
    if (threadIdx.x % 32 == 0) out[c] = acc;
}

/* SPEC §11 backward of the weighted un-permute, one warp per grouped row pos (assignment p = order[pos],
   token t = p / K): dgw[p] = dout[t] . eo[pos] (dw_i = dout . Expert_i(u)), dYp[pos] = w[p] dout[t] */
__global__ void moe_uncombine_kernel(float *dYp, float *dgw, const float *dout, const float *eo, const float *w, const int *order,
                                     int NK, int K, int C) {
    int pos = blockIdx.x * MHC_ROW_WARPS + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (pos >= NK) return;
    int p = order[pos];
    const float *d = dout + (size_t)(p / K) * C, *e = eo + (size_t)pos * C;
    float dot = 0;
    for (int c = lane; c < C; c += 32) {
        dot += d[c] * e[c];
        dYp[(size_t)pos * C + c] = w[p] * d[c];
    }
    dot = warp_reduce(dot, SumOp());
    if (lane == 0) dgw[p] = dot;
}

/* SPEC §11 balance loss: f_i = E/(K T) #{t : i in Sel_t}, P_i = mean_t s_it / sum_j s_jt per sequence;
   alpha sum_i f_i P_i / B is this layer's share of L_aux. f [B,E] and ssum [N] are kept for the router
   backward. Two kernels, so that the per-expert sums run one block per (expert, sequence).
   ssum [N]: sum_j s[t][j], one thread per token. */
__global__ void moe_score_sum_kernel(double *ssum, const float *s, int N, int E) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N) return;
    double sum = 0;
    for (int i = 0; i < E; i++) sum += s[(size_t)t * E + i];
    ssum[t] = sum;
}

/* grid (E, B), after moe_score_sum_kernel: block (i, b) reduces over the T tokens of sequence b the
   count of slots that chose expert i and P_i = (1/T) sum_t s[t][i] / ssum[t]; f [B,E] = E/(K T) count,
   bal [B,E] = alpha f_i P_i / B (the loss is the sum of bal over sequences and experts) */
__global__ void moe_balance_kernel(double *bal, double *f, const double *ssum, const float *s, const int *sel, int B, int T,
                                   int E, int K, double alpha) {
    int i = blockIdx.x, b = blockIdx.y;
    double count = 0, P = 0;
    for (int t = b * T + threadIdx.x; t < (b + 1) * T; t += blockDim.x) {
        for (int k = 0; k < K; k++) count += sel[(size_t)t * K + k] == i;
        P += s[(size_t)t * E + i] / ssum[t];
    }
    count = block_reduce(count, SumOp());
    P = block_reduce(P, SumOp());
    if (threadIdx.x == 0) {
        double fi = (double)E / ((double)K * T) * count;
        f[(size_t)b * E + i] = fi;
        bal[(size_t)b * E + i] = alpha * fi * (P / T) / B;
    }
}

static void gpu_moe_balance(double *bal, double *f, double *ssum, const float *s, const int *sel, int B, int T, int E, int K,
                            double alpha) {
    moe_score_sum_kernel<<<mhc_blocks((size_t)B * T, MHC_BLOCK), MHC_BLOCK>>>(ssum, s, B * T, E);
    LAUNCH_CHECK();
    moe_balance_kernel<<<dim3(E, B), MHC_BLOCK>>>(bal, f, ssum, s, sel, B, T, E, K, alpha);
    LAUNCH_CHECK();
}

/* SPEC §11 router backward, one thread per token t (sequence t / T), Sel fixed: ds from the gate weights,
   plus the balance-loss term (f from moe_balance_kernel), then through the sigmoid: ds [N,E] = dz */
__global__ void moe_router_backward_kernel(float *ds, const float *s, const int *sel, const float *dgw, const double *f, int N,
                                           int T, int B, int E, int K, double rho, double alpha) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N) return;
    const float *st = s + (size_t)t * E, *dgt = dgw + (size_t)t * K;
    const int *selt = sel + (size_t)t * K;
    float *dst = ds + (size_t)t * E;
    for (int i = 0; i < E; i++) dst[i] = 0;
    double Z = 0, dot = 0;                          /* ds_i = (rho/Z) (dw_i - sum_j dw_j s_j / Z) */
    for (int k = 0; k < K; k++) Z += st[selt[k]];
    for (int k = 0; k < K; k++) dot += dgt[k] * st[selt[k]] / Z;
    for (int k = 0; k < K; k++) dst[selt[k]] += (float)(rho / Z * (dgt[k] - dot));
    if (alpha > 0) {                                /* ds_k += (gp_k - sum_i gp_i s'_i) / sum_j s_j */
        const double *fb = f + (size_t)(t / T) * E;
        double sum = 0, dotb = 0;
        for (int i = 0; i < E; i++) sum += st[i];
        for (int i = 0; i < E; i++) dotb += alpha * fb[i] / T / B * st[i] / sum;
        for (int i = 0; i < E; i++) dst[i] += (float)((alpha * fb[i] / T / B - dotb) / sum);
    }
    for (int i = 0; i < E; i++) dst[i] *= st[i] * (1 - st[i]);
}

/* ---------------------------------------------------------------------------------------------
   6. The model                                                                                  */

static void gpu_acts_free(MhcGpuActs *A) {
    arena_free(&A->arena);
    memset(A, 0, sizeof *A);
}

/* The largest non-weight operand of an MHC_GEMM_FAST GEMM or a routed-expert GEMM, in elements
   (gemm_bf16_operand checks it): N rows of an activation or its gradient (u, dy: C; FFN: F; q: H d_qk;
   c_q: d_q; latent + k_pe: d_c + d_r; kv: H (d_nope + d_v); o: H d_v; the experts' K slots a token: K C
   and K I), or logit_rows rows of dlogits (V). */
static size_t gpu_bf16_scratch_count(const MhcConfig *c, size_t N, size_t logit_rows) {
    size_t H = c->n_heads, dqk = c->qk_nope_head_dim + c->qk_rope_head_dim, w = c->d_model, K = c->n_activated_experts, x[] = {
        (size_t)mhc_ffn_width(c), H * dqk, (size_t)c->q_lora_rank, (size_t)c->kv_lora_rank + c->qk_rope_head_dim,
        H * (c->qk_nope_head_dim + c->v_head_dim), H * c->v_head_dim, K * c->d_model, K * c->moe_inter_dim};
    for (size_t k = 0; k < sizeof x / sizeof x[0]; k++) w = w > x[k] ? w : x[k];
    size_t count = N * w, logits = logit_rows * c->vocab_size, att = att_bf16_scratch_count(c, N);
    count = count > logits ? count : logits;
    return count > att ? count : att;
}

/* What a set of activation buffers is for (gpu_acts_init's flags) */
enum {
    GPU_ACTS_GRAD = 1,         /* the backward's buffers too                                      */
    GPU_ACTS_BF16 = 2,         /* the BF16 GEMM operand scratch                                   */
    GPU_ACTS_RECOMPUTE = 4,    /* one layer's buffers and a chunk of logits (mhc_gpu_set_recompute) */
    GPU_ACTS_MEASURE = 8       /* count the bytes only (A->arena.bytes), allocate nothing         */
};

/* Which slot of the per-sublayer (y, u, f, coefficients) and per-layer (MLA but o, FFN, MoE) buffers
   sublayer s or layer l uses: its own, or with recompute the one that its backward refills. The recompute
   buffers are those of a one-layer model: two sublayer slots (attention, FFN) and one layer slot. */
static int gpu_sub_slot(const MhcGpuActs *A, int s) { return A->flags & GPU_ACTS_RECOMPUTE ? s % 2 : s; }
static int gpu_layer_slot(const MhcGpuActs *A, int l) { return A->flags & GPU_ACTS_RECOMPUTE ? 0 : l; }

/* 0 ok, -1 out of GPU memory (nothing left allocated) */
static int gpu_acts_init(MhcGpuActs *A, const MhcConfig *c, int B, int T, int flags) {
    MhcBuffer tab[MHC_MAX_BUFFERS];
    memset(A, 0, sizeof *A);
    A->B = A->a.B = B;
    A->T = A->a.T = T;
    A->flags = flags;
    MhcGpuArena *ar = &A->arena;
    ar->measure = (flags & GPU_ACTS_MEASURE) != 0;
    int recompute = (flags & GPU_ACTS_RECOMPUTE) != 0, with_grad = (flags & GPU_ACTS_GRAD) != 0;
    size_t N = (size_t)B * T, H = c->n_heads, S = 2 * (size_t)c->n_layers;
    A->logit_rows = recompute && N > MHC_LOGIT_CHUNK_ROWS ? MHC_LOGIT_CHUNK_ROWS : (int)N;
    MhcConfig slots = *c;
    if (recompute) slots.n_layers = 1;
    int n = mhc_acts_table(&A->a, &slots, B, T, tab);
    for (int k = 0; k < n; k++) {
        size_t count = tab[k].count;
        if (tab[k].grad && !with_grad) continue;
        if (tab[k].real == &A->a.att) continue;      /* flash attention keeps att_lse instead of [L,B,H,T,T] */
        if (tab[k].real == &A->a.X) count = (S + 1) * N * c->hc_mult * c->d_model;   /* all S + 1, always */
        if (tab[k].real == &A->a.o) count = (size_t)c->n_layers * N * H * c->v_head_dim;   /* every layer, always */
        if (tab[k].real == &A->a.logits) count = (size_t)A->logit_rows * c->vocab_size;
        if (tab[k].real) *tab[k].real = arena_new<float>(ar, count);
        else *tab[k].integer = arena_new<int>(ar, count);
    }
    size_t E = c->n_routed_experts, K = c->n_activated_experts, C = c->d_model;
    size_t wide = C > (size_t)c->kv_lora_rank ? C : c->kv_lora_rank;
    wide = wide > (size_t)c->q_lora_rank ? wide : c->q_lora_rank;
    wide = wide > (size_t)mhc_m(c) ? wide : mhc_m(c);
    A->tokens = arena_new<int>(ar, N);
    A->targets = arena_new<int>(ar, N);
    A->att_lse = arena_new<float>(ar, (size_t)c->n_layers * N * H);
    A->moe_count = arena_new<int>(ar, E);
    A->moe_ssum = arena_new<double>(ar, N);
    A->moe_f = arena_new<double>(ar, (size_t)B * E);
    A->moe_bal = arena_new<double>(ar, (size_t)c->n_layers * B * c->n_routed_experts);
    A->lone.part = arena_new<float>(ar, (size_t)lone_blocks((int)C) * (mhc_m(c) + 1));
    A->lone.done = arena_new<unsigned>(ar, 1);
    A->route_done = arena_new<unsigned>(ar, 1);
    if (flags & GPU_ACTS_BF16) {
        A->gemm_bf16_count = gpu_bf16_scratch_count(c, N, (size_t)A->logit_rows);
        A->gemm_bf16[0] = arena_new<__nv_bfloat16>(ar, A->gemm_bf16_count);
        A->gemm_bf16[1] = arena_new<__nv_bfloat16>(ar, A->gemm_bf16_count);
    }
    if (with_grad) {
        A->att_rowdot = arena_new<float>(ar, N * H);
        A->coef_alpha = arena_new<float>(ar, N * 3);
        size_t split = gpu_expert_split_floats((int)E, c->moe_inter_dim, (int)C, (int)(N * K));
        if (split) A->expert_split = arena_new<float>(ar, split);
        A->colsum_part = arena_new<float>(ar, MHC_COLSUM_CHUNKS * wide);
        if (c->residual == MHC_RESIDUAL_MHC && mhc_pre_grad_one_pass(c->hc_mult)) {
            A->pre_grad.dS2 = arena_new<float>(ar, N);
            A->pre_grad.dphi_part = arena_new<float>(ar, (size_t)MHC_PG_SPLITS * mhc_m(c) * c->hc_mult * C);
        }
        A->emb_rows = arena_new<int>(ar, N);
        A->emb_start = arena_new<int>(ar, N + 1);
        A->emb_order = arena_new<int>(ar, N);
    }
    if (!ar->failed) {
        if (A->lone.done) CUDA_CHECK(cudaMemset(A->lone.done, 0, sizeof(unsigned)));
        if (A->route_done) CUDA_CHECK(cudaMemset(A->route_done, 0, sizeof(unsigned)));
        return 0;
    }
    gpu_acts_free(A);
    return -1;
}



/* ---- sublayer pieces (mirror mhc.h section 7) ---- */

/* Sublayer s's coefficients H (SPEC §4 mhc, §6 hc, n = 1 plain), the pre-mix y [N,C] = H_pre X (§3) and
   the branch input u = RMSNorm(y) with gain norm_g, u_rstd [N]. merge_prev (mhc, a lone token: decode):
   X_s itself is made first, by the merge of sublayer s - 1 (gpu_sublayer_forward left it out). */
static void gpu_stream_pre(MhcGpu *g, MhcGpuActs *A, int s, int N, float *y, float *u, float *u_rstd, const float *norm_g,
                           int merge_prev) {
    const MhcConfig *c = &g->cfg;
    int n = c->hc_mult, C = c->d_model, m = mhc_m(c), ss = gpu_sub_slot(A, s);
    float *X = A->a.X + (size_t)s * N * n * C;
    float *h = A->a.coef_h + (size_t)ss * N * m, *a = A->a.coef_a + (size_t)ss * N * m;
    float *H = A->a.coef_H + (size_t)ss * N * m, *r = A->a.coef_r + (size_t)ss * N * n;
    const MhcStreamParams *q = &g->p.sub[s];
    if (c->residual == MHC_RESIDUAL_MHC) {            /* the GEMM, one block per token, the Sinkhorn, the norm */
        const float *prev[3] = {NULL, NULL, NULL};   /* sublayer s - 1's H, X and f */
        if (merge_prev) {
            int sp = gpu_sub_slot(A, s - 1);
            prev[0] = A->a.coef_H + (size_t)sp * N * m;
            prev[1] = A->a.X + (size_t)(s - 1) * N * n * C;
            prev[2] = A->a.f + (size_t)sp * N * C;
        }
        gpu_mhc_pre_forward(&g->blas, y, u, u_rstd, H, a, h, r, X, q->phi, q->alpha, q->b, norm_g, merge_prev ? prev : NULL,
                            &A->lone, N, n, C, c->sinkhorn_iters, c->sinkhorn_eps, c->rms_eps);
        return;
    }
    if (c->residual == MHC_RESIDUAL_PLAIN) {
        gpu_fill(H, 1.0f, (size_t)N * m);            /* n = 1: H = [1 | 1 | 1] */
    } else {                                          /* hc: Xt = per-stream RMSNorm of X, a = theta @ Xt */
        gpu_rmsnorm_forward(A->a.Xt, r, X, NULL, N * n, C, c->rms_eps);
        gpu_matmul_forward(&g->blas, MHC_GEMM_FP32, a, A->a.Xt, q->theta, N * n, C, n + 2);
        hc_coeffs_forward_kernel<<<mhc_blocks((size_t)N, 128), 128>>>(H, a, q->alpha, q->b_pre, q->b_post, q->b_res, N, n);
        LAUNCH_CHECK();
    }
    gpu_stream_pre_forward(y, H, X, N, n, C, m);
    gpu_rmsnorm_forward(u, u_rstd, y, norm_g, N, C, c->rms_eps);
}

/* The backward of gpu_stream_pre (SPEC §5.3 PATH 2, §5.4 mhc / §6 hc PATH 3): from dy [N,C] and dH [N,m]
   (post and res parts set by the merge backward; consumed) into dX, and the coefficient parameters'
   gradients. dXo (else NULL; mhc with gpu_merge_leaves_dX only): the sublayer's dX', from which PATH 1
   goes into dX here, where the merge backward left it out. */
static void gpu_stream_pre_grad(MhcGpu *g, MhcGpuActs *A, int s, int N, const float *dy, float *dH, const float *dXo,
                                float *dX) {
    const MhcConfig *c = &g->cfg;
    int n = c->hc_mult, C = c->d_model, m = mhc_m(c), ss = gpu_sub_slot(A, s);
    const float *X = A->a.X + (size_t)s * N * n * C, *h = A->a.coef_h + (size_t)ss * N * m;
    const float *a = A->a.coef_a + (size_t)ss * N * m, *H = A->a.coef_H + (size_t)ss * N * m;
    float *r = A->a.coef_r + (size_t)ss * N * n;
    const MhcStreamParams *q = &g->p.sub[s];
    MhcStreamParams *gq = &g->g.sub[s];
    if (c->residual == MHC_RESIDUAL_MHC) {            /* the Sinkhorn, one block per token, the GEMMs, then the reductions */
        gpu_mhc_pre_backward(&g->blas, dX, gq->phi, dH, A->a.dcoef, A->coef_alpha, &A->pre_grad, dXo, dy, X, H, a, h, r,
                             q->phi, q->alpha, N, n, C, c->sinkhorn_iters, c->sinkhorn_eps);
        gpu_colsum(gq->b, A->a.dcoef, m, NULL, 0, NULL, N, m, A->colsum_part);
        gpu_colsum(gq->alpha, A->coef_alpha, 3, NULL, 0, NULL, N, 3, A->colsum_part);
        return;
    }
    gpu_stream_pre_backward(dX, dH, dy, H, X, N, n, C, m);
    if (c->residual == MHC_RESIDUAL_HC) {
        hc_coeffs_backward_kernel<<<mhc_blocks((size_t)N, 128), 128>>>(A->a.dcoef, A->coef_alpha, dH, a, q->alpha, N, n);
        LAUNCH_CHECK();
        gpu_colsum(gq->b_pre, dH, m, NULL, 0, NULL, N, n, A->colsum_part);
        gpu_colsum(gq->b_post, dH + n, m, NULL, 0, NULL, N, n, A->colsum_part);
        gpu_colsum(gq->b_res, dH + 2 * n, m, NULL, 0, NULL, N, n * n, A->colsum_part);
        gpu_colsum(gq->alpha, A->coef_alpha, 3, NULL, 0, NULL, N, 3, A->colsum_part);
        gpu_rmsnorm_forward(A->a.Xt, r, X, NULL, N * n, C, c->rms_eps);   /* recompute Xt (r is rewritten bit-identically) */
        CUDA_CHECK(cudaMemset(A->a.dXt, 0, sizeof(float) * (size_t)N * n * C));
        gpu_matmul_backward(&g->blas, MHC_GEMM_FP32, A->a.dXt, gq->theta, A->a.dcoef, A->a.Xt, q->theta, N * n, C, n + 2);
        gpu_rmsnorm_backward(dX, NULL, A->a.dXt, X, NULL, r, N * n, C, A->colsum_part);   /* PATH 3 */
    }
}

/* SPEC §8 SwiGLU FFN of width W over N rows (mhc.h swiglu_ffn_forward / _backward). W1 and W3 read the same
   u, which BF16 rounds once for both (in_rounded), forward and backward. */
static void gpu_swiglu_ffn_forward(const MhcBlas *bl, float *out, float *a, float *gt, float *h, const float *u, const float *w1,
                                   const float *w3, const float *w2, int N, int C, int W) {
    gpu_matmul_forward(bl, MHC_GEMM_FAST, a, u, w1, N, C, W);
    gpu_matmul_forward_core(bl, MHC_GEMM_FAST, 1, gt, u, w3, N, C, W);
    gpu_swiglu_forward(h, a, gt, (size_t)N * W);
    gpu_matmul_forward(bl, MHC_GEMM_FAST, out, h, w2, N, W, C);
}

static void gpu_swiglu_ffn_backward(const MhcBlas *bl, float *du, float *dw1, float *dw3, float *dw2, const float *dout,
                                    const float *a, const float *gt, const float *h, const float *u, const float *w1,
                                    const float *w3, const float *w2, float *dh, float *da, float *dg, int N, int C, int W) {
    CUDA_CHECK(cudaMemset(dh, 0, sizeof(float) * (size_t)N * W));
    gpu_matmul_backward(bl, MHC_GEMM_FAST, dh, dw2, dout, h, w2, N, W, C);
    gpu_swiglu_backward(da, dg, dh, a, gt, (size_t)N * W);
    gpu_matmul_backward(bl, MHC_GEMM_FAST, du, dw1, da, u, w1, N, C, W);
    gpu_matmul_backward_core(bl, MHC_GEMM_FAST, 0, 1, du, dw3, dg, u, w3, N, C, W);
}

/* SPEC §9 queries of layer l for N tokens, before RoPE: q [N, H dqk] = W_q u, or through the q latent
   W_uq RMSNorm(W_dq u). Returns q (the layer's slot of a.q). lat_raw: NULL, or (decode, N = 1) where
   W_dkv u [d_c + d_r] goes, made in the same launch as u's product here. u_rounded: BF16's rounded u waits
   in the GEMM scratch already (gpu_matmul_forward_core). */
static float *gpu_mla_query(MhcGpu *g, MhcGpuActs *A, int l, const float *u, int u_rounded, int N, float *lat_raw) {
    const MhcConfig *c = &g->cfg;
    const MhcBlock *b = &g->p.blk[l];
    const MhcBlas *bl = &g->blas;
    int C = c->d_model, H = c->n_heads, dqk = c->qk_nope_head_dim + c->qk_rope_head_dim, dq = c->q_lora_rank;
    int ls = gpu_layer_slot(A, l);
    float *q = A->a.q + (size_t)ls * N * H * dqk, *cq_raw = A->a.cq_raw + (size_t)ls * N * dq;
    float *first = dq == 0 ? q : cq_raw;           /* u's product: q itself, or q's latent */
    const float *W = dq == 0 ? b->wq : b->wdq;
    int O = dq == 0 ? H * dqk : dq;
    if (lat_raw) gpu_matvec(bl, MHC_GEMM_FAST, first, W, O, lat_raw, b->wdkv, c->kv_lora_rank + c->qk_rope_head_dim, u, C);
    else gpu_matmul_forward_core(bl, MHC_GEMM_FAST, u_rounded, first, u, W, N, C, O);
    if (dq > 0) {
        float *cq = A->a.cq + (size_t)ls * N * dq;
        gpu_rmsnorm_forward(cq, A->a.cq_rstd + (size_t)ls * N, cq_raw, b->q_norm, N, dq, c->rms_eps);
        gpu_matmul_forward(bl, MHC_GEMM_FAST, q, cq, b->wuq, N, dq, H * dqk);
    }
    return q;
}

/* SPEC §9 projections of layer l for N tokens at positions pos0 + (t mod T): q, the KV latent c with its
   RMSNorm, k_pe, kv = W_ukv c, and RoPE (mhc.h mla_project). Decode has its own (gpu_mla_decode_forward).
   The three products of u come first, so that BF16 rounds u once for them. */
static void gpu_mla_project(MhcGpu *g, MhcGpuActs *A, int l, const float *u, int N, int T, int pos0) {
    const MhcConfig *c = &g->cfg;
    const MhcBlock *b = &g->p.blk[l];
    const MhcBlas *bl = &g->blas;
    int C = c->d_model, H = c->n_heads, dn = c->qk_nope_head_dim, dr = c->qk_rope_head_dim;
    int dqk = dn + dr, dc = c->kv_lora_rank, dv = c->v_head_dim, ls = gpu_layer_slot(A, l);
    float *c_raw = A->a.c_raw + (size_t)ls * N * dc, *lat = A->a.c + (size_t)ls * N * dc, *kpe = A->a.kpe + (size_t)ls * N * dr;
    gpu_matmul_forward(bl, MHC_GEMM_FAST, c_raw, u, b->wdkv, N, C, dc);                        /* rows [0, d_c) of W_dkv */
    gpu_matmul_forward_core(bl, MHC_GEMM_FAST, 1, kpe, u, b->wdkv + (size_t)dc * C, N, C, dr); /* rows [d_c, d_c+d_r)    */
    float *q = gpu_mla_query(g, A, l, u, 1, N, NULL);
    gpu_rmsnorm_forward(lat, A->a.c_rstd + (size_t)ls * N, c_raw, b->kv_norm, N, dc, c->rms_eps);
    gpu_matmul_forward(bl, MHC_GEMM_FAST, A->a.kv + (size_t)ls * N * H * (dn + dv), lat, b->wukv, N, dc, H * (dn + dv));
    gpu_rope(q, N, T, pos0, H, H * dqk, dn, dqk, dr, c->rope_theta, 0);
    gpu_rope(kpe, N, T, pos0, 1, dr, 0, dr, dr, c->rope_theta, 0);
}

static MhcAttShape att_shape(const MhcConfig *c, int T) {
    double scale = 1.0 / sqrt((double)(c->qk_nope_head_dim + c->qk_rope_head_dim));
    MhcAttShape sh = {T, c->n_heads, c->qk_nope_head_dim, c->qk_rope_head_dim, c->v_head_dim, (float)scale,
                      (float)(scale * MHC_LOG2E)};
    return sh;
}

/* dynamic shared bytes of an attention kernel, opted in past the default 48 KiB */
static size_t att_smem_optin(const void *kernel, size_t bytes) {
    if (bytes > 48 * 1024) CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
    return bytes;
}

/* (b, h) along x, tiles along y: blocks start x first, so the kernels' longest tiles of every head go
   first */
static dim3 att_grid(int B, MhcAttShape sh, int rows) { return dim3((unsigned)(B * sh.H), mhc_blocks((size_t)sh.T, rows)); }

/* One call of the attention kernels at precision P: which of them to launch (MHC_ATT_* bits: the forward
   makes o [N, H*d_v] and lse [B,H,T]; the backward's dK/dV kernel dkv and dkpe_h, its dQ kernel dq; both
   read lse and D [B,H,T]) and their buffers, the operands in P's element type. */
enum { MHC_ATT_FORWARD = 1, MHC_ATT_BACKWARD_KV = 2, MHC_ATT_BACKWARD_Q = 4 };
template <int P> struct MhcAttCall {
    float *o, *lse_out, *dq, *dkv, *dkpe_h;
    const float *lse, *D;
    const MmaElem<P> *q, *kv, *kpe, *d_o;
    int B;
    MhcAttShape sh;
    int wgmma;                    /* BF16, 1: the kernels on wgmma where the heads allow (gpu_attention_kernels_at) */
};

/* the backward's wgmma kernels of `which` for heads of d_v rounded up to NV (an instance only where DV is 0 or
   rounds to NV) */
template <int DN, int DR, int DV, int NV> static void att_backward_wgmma(int which, const MhcAttCall<MHC_PREC_BF16> &x) {
    if constexpr (DV == 0 || (DV <= 64) == (NV == 64)) {
        if (which & MHC_ATT_BACKWARD_KV) {
            size_t bytes = att_smem_optin((const void *)attention_backward_kv_wgmma_kernel<DN, DR, DV, NV>,
                                          att_backward_kv_wgmma_smem_bytes(x.sh));
            attention_backward_kv_wgmma_kernel<DN, DR, DV, NV><<<att_grid(x.B, x.sh, MHC_ATT_TILE), 2 * 128, bytes>>>(
                x.dkv, x.dkpe_h, x.d_o, x.lse, x.D, x.q, x.kv, x.kpe, x.sh);
            LAUNCH_CHECK();
        }
        if (which & MHC_ATT_BACKWARD_Q) {
            size_t bytes = att_smem_optin((const void *)attention_backward_q_wgmma_kernel<DN, DR, DV, NV>,
                                          att_backward_q_wgmma_smem_bytes(x.sh));
            attention_backward_q_wgmma_kernel<DN, DR, DV, NV><<<att_grid(x.B, x.sh, ATT_WG_TILE), 2 * 128, bytes>>>(
                x.dq, x.d_o, x.lse, x.D, x.q, x.kv, x.kpe, x.sh);
            LAUNCH_CHECK();
        }
    }
}

/* the kernels of x.which instanced for head dims DN, DR, DV (0: read at run time; att_fixed_dims) */
template <int P, int DN, int DR, int DV> static void gpu_attention_kernels_at(int which, const MhcAttCall<P> &x) {
    const int rows = att_query_rows(P);
    size_t bytes;
    if constexpr (P == MHC_PREC_BF16) {
        if (x.wgmma && x.sh.dv <= ATT_WG_TILE && x.sh.dn + x.sh.dr <= MHC_ATT_MAX_DQK) {   /* the wgmma kernels' heads */
            if (which & MHC_ATT_FORWARD) {
                bytes = att_smem_optin((const void *)attention_forward_wgmma_kernel<DN, DR, DV>, att_forward_wgmma_smem_bytes(x.sh));
                attention_forward_wgmma_kernel<DN, DR, DV><<<att_grid(x.B, x.sh, ATT_WG_TILE), 2 * 128, bytes>>>(
                    x.o, x.lse_out, x.q, x.kv, x.kpe, x.sh);
                LAUNCH_CHECK();
            }
            if (which & (MHC_ATT_BACKWARD_KV | MHC_ATT_BACKWARD_Q)) {
                if (DV ? DV <= 64 : x.sh.dv <= 64) att_backward_wgmma<DN, DR, DV, 64>(which, x);
                else att_backward_wgmma<DN, DR, DV, 128>(which, x);
            }
            return;
        }
    }
    if (which & MHC_ATT_FORWARD) {
        bytes = att_smem_optin((const void *)attention_forward_kernel<P, DN, DR, DV>, att_forward_smem_bytes<P>(x.sh));
        attention_forward_kernel<P, DN, DR, DV><<<att_grid(x.B, x.sh, rows), 32 * (rows / 16), bytes>>>(x.o, x.lse_out, x.q,
                                                                                                     x.kv, x.kpe, x.sh);
        LAUNCH_CHECK();
    }
    if (which & MHC_ATT_BACKWARD_KV) {
        bytes = att_smem_optin((const void *)attention_backward_kv_kernel<P, DN, DR, DV>, att_backward_kv_smem_bytes<P>(x.sh));
        attention_backward_kv_kernel<P, DN, DR, DV><<<att_grid(x.B, x.sh, MHC_ATT_TILE), 32 * MHC_ATT_KV_WARPS, bytes>>>(
            x.dkv, x.dkpe_h, x.d_o, x.lse, x.D, x.q, x.kv, x.kpe, x.sh);
        LAUNCH_CHECK();
    }
    if (which & MHC_ATT_BACKWARD_Q) {
        bytes = att_smem_optin((const void *)attention_backward_q_kernel<P, DN, DR, DV>, att_backward_q_smem_bytes<P>(x.sh));
        attention_backward_q_kernel<P, DN, DR, DV><<<att_grid(x.B, x.sh, rows), 32 * (rows / 16), bytes>>>(
            x.dq, x.d_o, x.lse, x.D, x.q, x.kv, x.kpe, x.sh);
        LAUNCH_CHECK();
    }
}

/* SPEC §9 causal attention with the shared k_pe: the kernels of `which` at precision P, on tensor cores
   instanced for the presets' head dims where x's are those (small: d_n 64, d_r 32, d_v 64; 3b and up:
   128, 64, 128), else reading them at run time (FP32, the tests' exact mode, always does) */
template <int P> static void gpu_attention_kernels(int which, const MhcAttCall<P> &x) {
    const MhcAttShape &sh = x.sh;
    if constexpr (P != MHC_PREC_FP32) {
        if (sh.dn == 128 && sh.dr == 64 && sh.dv == 128) return gpu_attention_kernels_at<P, 128, 64, 128>(which, x);
        if (sh.dn == 64 && sh.dr == 32 && sh.dv == 64) return gpu_attention_kernels_at<P, 64, 32, 64>(which, x);
    }
    gpu_attention_kernels_at<P, 0, 0, 0>(which, x);
}

/* which of the kernels at bl->precision: the operands of the tile products, bf16 or TF32 on tensor cores or
   exact fp32 (section 4). BF16 first makes bf16 copies of q, kv, kpe and (the backward) d_o in bl's scratch. */
static void gpu_attention_launch(const MhcBlas *bl, int which, float *o, float *lse_out, float *dq, float *dkv, float *dkpe_h,
                                 const float *lse, const float *D, const float *q, const float *kv, const float *kpe,
                                 const float *d_o, int B, int T, const MhcConfig *c) {
    MhcAttShape sh = att_shape(c, T);
    if (bl->precision == MHC_PREC_BF16) {
        MhcAttBf16 x = att_bf16_copies(bl, q, kv, kpe, d_o, B * T, c);
        gpu_attention_kernels<MHC_PREC_BF16>(which, {o, lse_out, dq, dkv, dkpe_h, lse, D, x.q, x.kv, x.kpe, x.d_o, B, sh,
                                                     (bl->wgmma & MHC_WGMMA_ATTENTION) != 0});
    } else if (bl->precision == MHC_PREC_TF32) {
        gpu_attention_kernels<MHC_PREC_TF32>(which, {o, lse_out, dq, dkv, dkpe_h, lse, D, q, kv, kpe, d_o, B, sh, 0});
    } else {
        gpu_attention_kernels<MHC_PREC_FP32>(which, {o, lse_out, dq, dkv, dkpe_h, lse, D, q, kv, kpe, d_o, B, sh, 0});
    }
}

/* o [N, H*d_v] = softmax(scores) V per row, lse [B,H,T] */
static void gpu_attention_forward(const MhcBlas *bl, float *o, float *lse, const float *q, const float *kv, const float *kpe,
                                  int B, int T, const MhcConfig *c) {
    gpu_attention_launch(bl, MHC_ATT_FORWARD, o, lse, NULL, NULL, NULL, NULL, NULL, q, kv, kpe, NULL, B, T, c);
}

/* SPEC §9 backward of the attention core given d_o [N, H*d_v]: dq, dkv (k_nope and v parts) and dkpe
   (summed over heads, before RoPE^T) are overwritten; dkpe_h [N,H,d_r] and D [B,H,T] are scratch */
static void gpu_attention_backward(const MhcBlas *bl, float *dq, float *dkv, float *dkpe, float *dkpe_h, float *D,
                                   const float *d_o, const float *o, const float *lse, const float *q, const float *kv,
                                   const float *kpe, int B, int T, const MhcConfig *c) {
    MhcAttShape sh = att_shape(c, T);
    int rows = B * sh.H * T;
    attention_rowdot_kernel<<<mhc_blocks((size_t)rows, MHC_ROW_WARPS), 32 * MHC_ROW_WARPS>>>(D, d_o, o, sh, rows);
    LAUNCH_CHECK();
    gpu_attention_launch(bl, MHC_ATT_BACKWARD_KV | MHC_ATT_BACKWARD_Q, NULL, NULL, dq, dkv, dkpe_h, lse, D, q, kv, kpe, d_o, B,
                         T, c);
    size_t count = (size_t)B * T * sh.dr;
    kpe_grad_kernel<<<mhc_blocks(count, MHC_BLOCK), MHC_BLOCK>>>(dkpe, dkpe_h, B * T, sh.H, sh.dr);
    LAUNCH_CHECK();
}

/* training / prefill: out [N,C] = MLA_l(u). The attention output o and its lse are kept for every layer,
   also with recompute; rerun (the backward's recompute) runs only the projections again, not attention. */
static void gpu_mla_forward(MhcGpu *g, MhcGpuActs *A, int l, const float *u, float *out, int B, int T, int rerun) {
    const MhcConfig *c = &g->cfg;
    int N = B * T, C = c->d_model, H = c->n_heads, dn = c->qk_nope_head_dim, dr = c->qk_rope_head_dim, dv = c->v_head_dim;
    int ls = gpu_layer_slot(A, l);
    gpu_mla_project(g, A, l, u, N, T, 0);
    float *o = A->a.o + (size_t)l * N * H * dv;
    if (!rerun) {
        gpu_attention_forward(&g->blas, o, A->att_lse + (size_t)l * B * H * T, A->a.q + (size_t)ls * N * H * (dn + dr),
                              A->a.kv + (size_t)ls * N * H * (dn + dv), A->a.kpe + (size_t)ls * N * dr, B, T, c);
    }
    gpu_matmul_forward(&g->blas, MHC_GEMM_FAST, out, o, g->p.blk[l].wo, N, H * dv, C);
}

/* du += dMLA/du applied to dout (mhc.h mla_backward) */
static void gpu_mla_backward(MhcGpu *g, MhcGpuActs *A, int l, const float *u, const float *dout, float *du, int B, int T) {
    const MhcConfig *c = &g->cfg;
    const MhcBlock *b = &g->p.blk[l];
    MhcBlock *gb = &g->g.blk[l];
    const MhcBlas *bl = &g->blas;
    MhcActs *a = &A->a;
    int N = B * T, C = c->d_model, H = c->n_heads, dn = c->qk_nope_head_dim, dr = c->qk_rope_head_dim;
    int dqk = dn + dr, dv = c->v_head_dim, dc = c->kv_lora_rank, dq = c->q_lora_rank, ls = gpu_layer_slot(A, l);
    const float *q = a->q + (size_t)ls * N * H * dqk, *kv = a->kv + (size_t)ls * N * H * (dn + dv);
    const float *kpe = a->kpe + (size_t)ls * N * dr, *o = a->o + (size_t)l * N * H * dv, *lat = a->c + (size_t)ls * N * dc;
    float *d_o = a->dwide;
    CUDA_CHECK(cudaMemset(d_o, 0, sizeof(float) * (size_t)N * H * dv));
    gpu_matmul_backward(bl, MHC_GEMM_FAST, d_o, gb->wo, dout, o, b->wo, N, H * dv, C);
    gpu_attention_backward(bl, a->dq, a->dkv, a->dkpe, a->dkpe_h, A->att_rowdot, d_o, o,
                           A->att_lse + (size_t)l * B * H * T, q, kv, kpe, B, T, c);
    gpu_rope(a->dkpe, N, T, 0, 1, dr, 0, dr, dr, c->rope_theta, 1);
    gpu_rope(a->dq, N, T, 0, H, H * dqk, dn, dqk, dr, c->rope_theta, 1);
    CUDA_CHECK(cudaMemset(a->dlat, 0, sizeof(float) * (size_t)N * dc));
    CUDA_CHECK(cudaMemset(a->dlat_raw, 0, sizeof(float) * (size_t)N * dc));
    gpu_matmul_backward(bl, MHC_GEMM_FAST, a->dlat, gb->wukv, a->dkv, lat, b->wukv, N, dc, H * (dn + dv));
    gpu_rmsnorm_backward(a->dlat_raw, gb->kv_norm, a->dlat, a->c_raw + (size_t)ls * N * dc, b->kv_norm,
                         a->c_rstd + (size_t)ls * N, N, dc, A->colsum_part);
    const float *dfirst = a->dq, *wfirst = b->wq;   /* the gradient of u's product on the query side, and its weight */
    float *gwfirst = gb->wq;
    int ofirst = H * dqk;
    if (dq > 0) {
        const float *cq_raw = a->cq_raw + (size_t)ls * N * dq, *cq = a->cq + (size_t)ls * N * dq;
        CUDA_CHECK(cudaMemset(a->dcq, 0, sizeof(float) * (size_t)N * dq));
        CUDA_CHECK(cudaMemset(a->dcq_raw, 0, sizeof(float) * (size_t)N * dq));
        gpu_matmul_backward(bl, MHC_GEMM_FAST, a->dcq, gb->wuq, a->dq, cq, b->wuq, N, dq, H * dqk);
        gpu_rmsnorm_backward(a->dcq_raw, gb->q_norm, a->dcq, cq_raw, b->q_norm, a->cq_rstd + (size_t)ls * N, N, dq,
                             A->colsum_part);
        dfirst = a->dcq_raw, wfirst = b->wdq, gwfirst = gb->wdq, ofirst = dq;
    }
    /* the three products of u last and together, so that BF16 rounds u for their weight gradients once */
    gpu_matmul_backward(bl, MHC_GEMM_FAST, du, gb->wdkv, a->dlat_raw, u, b->wdkv, N, C, dc);
    gpu_matmul_backward_core(bl, MHC_GEMM_FAST, 0, 1, du, gb->wdkv + (size_t)dc * C, a->dkpe, u, b->wdkv + (size_t)dc * C, N, C, dr);
    gpu_matmul_backward_core(bl, MHC_GEMM_FAST, 0, 1, du, gwfirst, dfirst, u, wfirst, N, C, ofirst);
}

/* one token through MLA_l, absorbed, at the position in cache->pos: q, and raw = W_dkv u (c and k_pe in
   one product: the rows of W_dkv are [d_c; d_r]) in the same launch as q's first product; the new cache
   rows, the RoPEs and each head's attention over the latents to o [H, dv] in one launch
   (mla_decode_attention_kernel); out = W_o o. Three launches. */
static void gpu_mla_decode_forward(MhcGpu *g, MhcGpuCache *cache, int l, const float *u, float *out) {
    const MhcConfig *c = &g->cfg;
    const MhcBlock *b = &g->p.blk[l];
    int C = c->d_model, H = c->n_heads, dn = c->qk_nope_head_dim, dr = c->qk_rope_head_dim;
    int dqk = dn + dr, dv = c->v_head_dim, dc = c->kv_lora_rank;
    float *ckv = cache->ckv + (size_t)l * cache->max_len * dc, *kpe = cache->kpe + (size_t)l * cache->max_len * dr;
    float *q = gpu_mla_query(g, &cache->acts, l, u, 0, 1, cache->lat_raw), *o = cache->acts.a.o + (size_t)l * H * dv;
    cudaLaunchConfig_t config = overlapped_launch(H, MHC_DECODE_ATT_THREADS, decode_attention_smem_bytes(dc, dr));
    float scale = (float)(1.0 / sqrt((double)dqk)), eps = (float)c->rms_eps;
    const __nv_bfloat16 *wukv16 = decode_bf16_weight(&g->blas, MHC_GEMM_FAST, b->wukv);
    if (wukv16)
        CUDA_CHECK(cudaLaunchKernelEx(&config, mla_decode_attention_kernel<__nv_bfloat16>, o, cache->scores, ckv, kpe, q,
                                      cache->lat_raw, b->kv_norm, wukv16, cache->pos, cache->max_len, dc, dr, dn, dv, scale,
                                      eps, c->rope_theta));
    else
        CUDA_CHECK(cudaLaunchKernelEx(&config, mla_decode_attention_kernel<float>, o, cache->scores, ckv, kpe, q,
                                      cache->lat_raw, b->kv_norm, b->wukv, cache->pos, cache->max_len, dc, dr, dn, dv, scale,
                                      eps, c->rope_theta));
    gpu_matmul_forward(&g->blas, MHC_GEMM_FAST, out, o, b->wo, 1, H * dv, C);
}

/* group the N*K assignments of sel by expert: a.expert_order, a.expert_row, a.expert_start; load may be NULL */
static void gpu_moe_group(MhcGpuActs *A, const int *sel, int NK, int E, int *load) {
    moe_count_kernel<<<E, MHC_BLOCK>>>(A->moe_count, sel, NK);
    LAUNCH_CHECK();
    moe_offsets_kernel<<<1, 32>>>(A->a.expert_start, load, A->moe_count, E);
    LAUNCH_CHECK();
    moe_fill_kernel<<<E, MHC_BLOCK>>>(A->a.expert_order, A->a.expert_row, sel, A->a.expert_start, NK);
    LAUNCH_CHECK();
}

static void gpu_moe_gather(MhcGpuActs *A, const float *u, int NK, int K, int C) {
    moe_gather_kernel<<<mhc_blocks((size_t)NK * C, MHC_BLOCK), MHC_BLOCK>>>(A->a.moe_x, u, A->a.expert_order, NK, K, C);
    LAUNCH_CHECK();
}

static void gpu_moe_combine(float *out, const float *src, const int *row, const float *w, int N, int K, int C) {
    moe_combine_kernel<<<mhc_blocks((size_t)N * C, MHC_BLOCK), MHC_BLOCK>>>(out, src, row, w, N, K, C);
    LAUNCH_CHECK();
}

template <typename MW> static void ffn_decode_launch(float *out, const float *u, const MhcFfnSlots<MW> &s0,
                                                     const MhcFfnSlots<MW> &s1, int C) {
    int rows = s0.rows > s1.rows ? s0.rows : s1.rows;
    cudaLaunchConfig_t up = overlapped_launch(dim3(s0.K + s1.K, mhc_blocks((size_t)rows, 8)), 256, 0);
    CUDA_CHECK(cudaLaunchKernelEx(&up, ffn_decode_up_kernel<MW>, s0, s1, u, C));
    cudaLaunchConfig_t down = overlapped_launch(mhc_blocks((size_t)C, 8), 256, 0);
    CUDA_CHECK(cudaLaunchKernelEx(&down, ffn_decode_down_kernel<MW>, out, s0, s1, C));
}

/* the slots s with their matrices' bf16 twins */
static MhcFfnSlots<__nv_bfloat16> ffn_slots_bf16(const MhcBlas *bl, const MhcFfnSlots<float> &s) {
    MhcFfnSlots<__nv_bfloat16> t = {NULL, NULL, NULL, s.sel, s.w, s.w_stride, s.K, s.rows, s.h};
    if (s.K) {
        t.w1 = gemm_bf16_weight(bl, s.w1);
        t.w3 = gemm_bf16_weight(bl, s.w3);
        t.w2 = gemm_bf16_weight(bl, s.w2);
    }
    return t;
}

/* decode's SwiGLU FFNs on one token (the ffn_decode kernels): out = the sum over the slots of s0, then
   of s1 (may be NULL); in BF16 from the matrices' bf16 twins (decode_bf16_weight) */
static void gpu_ffn_decode(const MhcBlas *bl, float *out, const float *u, const MhcFfnSlots<float> *s0,
                           const MhcFfnSlots<float> *s1, int C) {
    MhcFfnSlots<float> none;
    memset(&none, 0, sizeof none);
    if (!s1) s1 = &none;
    if (decode_bf16_weight(bl, MHC_GEMM_FAST, s0->w1))
        ffn_decode_launch(out, u, ffn_slots_bf16(bl, *s0), ffn_slots_bf16(bl, *s1), C);
    else
        ffn_decode_launch(out, u, *s0, *s1, C);
}

/* SPEC §11 forward of layer l: out [N,C] = Shared(u) + sum_Sel w_i Expert_i(u); its loads go to
   expert_load[l] and its balance loss to moe_bal[l]. decode (one token, B = T = 1): the experts run in
   place on the token's slots (gpu_ffn_decode), with no loads and no loss (nothing trains there). */
static void gpu_moe_forward(MhcGpu *g, MhcGpuActs *A, int l, const float *u, float *out, int B, int T, int decode) {
    const MhcConfig *c = &g->cfg;
    const MhcBlock *b = &g->p.blk[l];
    MhcActs *a = &A->a;
    int N = B * T, C = c->d_model, E = c->n_routed_experts, K = c->n_activated_experts, I = c->moe_inter_dim;
    int NsI = c->n_shared_experts * I, F = mhc_ffn_width(c), NK = N * K, ls = gpu_layer_slot(A, l);
    float *s = a->moe_s + (size_t)ls * N * E, *w = a->moe_w + (size_t)ls * NK, *eo = a->moe_eo + (size_t)ls * NK * C;
    float *ha = a->ffn_a + (size_t)ls * N * F, *hg = a->ffn_g + (size_t)ls * N * F, *hh = a->ffn_h + (size_t)ls * N * F;
    int *sel = a->moe_sel + (size_t)ls * NK;
    const float *bias = g->expert_bias + (size_t)l * E;
    if (decode) {                                   /* z = W_gate u (fp32) and the routing, one launch */
        gpu_moe_route_lone(sel, w, s, b->gate, u, bias, A->route_done, c);
        MhcFfnSlots<float> shared = {b->sw1, b->sw3, b->sw2, NULL, NULL, 0, 1, NsI, hh + (size_t)NK * I};
        MhcFfnSlots<float> routed = {b->w1, b->w3, b->w2, sel, w, (size_t)I * C, K, I, hh};
        if (NsI > 0) gpu_ffn_decode(&g->blas, out, u, &shared, &routed, C);
        else gpu_ffn_decode(&g->blas, out, u, &routed, NULL, C);
        return;
    }
    gpu_matmul_forward(&g->blas, MHC_GEMM_FP32, s, u, b->gate, N, C, E);          /* z = W_gate u (fp32) */
    gpu_moe_route(sel, w, s, bias, N, c);
    if (NsI > 0) {
        size_t off = (size_t)NK * I;                 /* shared expert after the routed slots */
        gpu_swiglu_ffn_forward(&g->blas, out, ha + off, hg + off, hh + off, u, b->sw1, b->sw3, b->sw2, N, C, NsI);
    } else {
        CUDA_CHECK(cudaMemset(out, 0, sizeof(float) * (size_t)N * C));
    }
    gpu_moe_group(A, sel, NK, E, g->expert_load + (size_t)l * E);
    gpu_moe_gather(A, u, NK, K, C);
    const int *seg = a->expert_start;
    const MhcBlas *bl = &g->blas;
    gpu_expert_gemm(bl, 0, ha, I, A->a.moe_x, C, b->w1, C, 1, (size_t)I * C, seg, E, NK, I, C, 0, 0.0f, NULL);             /* a = W1_e x */
    gpu_expert_gemm(bl, MHC_A_ROUNDED, hg, I, A->a.moe_x, C, b->w3, C, 1, (size_t)I * C, seg, E, NK, I, C, 0, 0.0f, NULL); /* g = W3_e x */
    gpu_swiglu_forward(hh, ha, hg, (size_t)NK * I);
    gpu_expert_gemm(bl, 0, eo, C, hh, I, b->w2, I, 1, (size_t)C * I, seg, E, NK, C, I, 0, 0.0f, NULL);                     /* W2_e h    */
    gpu_moe_combine(out, eo, A->a.expert_row, w, N, K, C);
    if (c->seq_aux_alpha > 0) {
        gpu_moe_balance(A->moe_bal + (size_t)l * B * E, A->moe_f, A->moe_ssum, s, sel, B, T, E, K, c->seq_aux_alpha);
    }
}

/* du += dMoE/du applied to dout (mhc.h moe_backward) */
static void gpu_moe_backward(MhcGpu *g, MhcGpuActs *A, int l, const float *u, const float *dout, float *du, int B, int T) {
    const MhcConfig *c = &g->cfg;
    const MhcBlock *b = &g->p.blk[l];
    MhcBlock *gb = &g->g.blk[l];
    const MhcBlas *bl = &g->blas;
    MhcActs *a = &A->a;
    int N = B * T, C = c->d_model, E = c->n_routed_experts, K = c->n_activated_experts, I = c->moe_inter_dim;
    int NsI = c->n_shared_experts * I, F = mhc_ffn_width(c), NK = N * K, ls = gpu_layer_slot(A, l);
    const float *s = a->moe_s + (size_t)ls * N * E, *w = a->moe_w + (size_t)ls * NK, *eo = a->moe_eo + (size_t)ls * NK * C;
    const float *ha = a->ffn_a + (size_t)ls * N * F, *hg = a->ffn_g + (size_t)ls * N * F, *hh = a->ffn_h + (size_t)ls * N * F;
    const int *sel = a->moe_sel + (size_t)ls * NK, *seg = a->expert_start;
    if (NsI > 0) {
        size_t off = (size_t)NK * I;
        gpu_swiglu_ffn_backward(bl, du, gb->sw1, gb->sw3, gb->sw2, dout, ha + off, hg + off, hh + off, u, b->sw1, b->sw3, b->sw2,
                                a->dwide, a->dffn_a, a->dffn_g, N, C, NsI);
    }
    gpu_moe_group(A, sel, NK, E, NULL);             /* the forward's grouping again (same order) */
    gpu_moe_gather(A, u, NK, K, C);
    float *dYp = a->moe_dy, *dh = a->dwide, *da = a->dffn_a, *dg = a->dffn_g;
    moe_uncombine_kernel<<<mhc_blocks((size_t)NK, MHC_ROW_WARPS), 32 * MHC_ROW_WARPS>>>(dYp, a->dgw, dout, eo, w,
                                                                                       a->expert_order, NK, K, C);
    LAUNCH_CHECK();
    /* in this order a bf16 copy serves both products of one input: dy, then da, then dg (with x for both
       weight gradients) */
    float *dx = A->a.moe_dx, *split = A->expert_split;
    gpu_expert_gemm(bl, 0, dh, I, dYp, C, b->w2, I, 0, (size_t)C * I, seg, E, NK, I, C, 0, 0.0f, NULL);                   /* dh = W2_e^T dy   */
    gpu_expert_gemm(bl, MHC_A_ROUNDED, gb->w2, I, dYp, C, hh, I, 0, (size_t)C * I, seg, E, C, I, NK, 1, 1.0f, split);    /* dW2_e += dy (x) h */
    gpu_swiglu_backward(da, dg, dh, ha, hg, (size_t)NK * I);
    gpu_expert_gemm(bl, 0, dx, C, da, I, b->w1, C, 0, (size_t)I * C, seg, E, NK, C, I, 0, 0.0f, NULL);                    /* dx = W1_e^T da  */
    gpu_expert_gemm(bl, MHC_A_ROUNDED, gb->w1, C, da, I, A->a.moe_x, C, 0, (size_t)I * C, seg, E, I, C, NK, 1, 1.0f, split);   /* dW1_e += da (x) x */
    gpu_expert_gemm(bl, 0, dx, C, dg, I, b->w3, C, 0, (size_t)I * C, seg, E, NK, C, I, 0, 1.0f, NULL);                    /*   + W3_e^T dg   */
    gpu_expert_gemm(bl, MHC_A_ROUNDED | MHC_B_ROUNDED, gb->w3, C, dg, I, A->a.moe_x, C, 0, (size_t)I * C, seg, E, I, C, NK, 1,
                    1.0f, split);                                                                                           /* dW3_e += dg (x) x */
    gpu_moe_combine(du, A->a.moe_dx, A->a.expert_row, NULL, N, K, C);                                    /* slots -> tokens */
    if (c->seq_aux_alpha > 0) {                     /* f of each sequence (the forward's values again) */
        gpu_moe_balance(A->moe_bal + (size_t)l * B * E, A->moe_f, A->moe_ssum, s, sel, B, T, E, K, c->seq_aux_alpha);
    }
    moe_router_backward_kernel<<<mhc_blocks((size_t)N, 128), 128>>>(a->dscore, s, sel, a->dgw, A->moe_f, N, T, B, E, K,
                                                                     c->route_scale, c->seq_aux_alpha);
    LAUNCH_CHECK();
    gpu_matmul_backward(bl, MHC_GEMM_FP32, du, gb->gate, a->dscore, u, b->gate, N, C, E);
}

/* decoding with mhc, whose lone-token pre-stage makes X_s itself from sublayer s - 1 */
static int gpu_merge_deferred(const MhcConfig *c, const MhcGpuCache *cache) {
    return cache != NULL && c->residual == MHC_RESIDUAL_MHC;
}

/* The branch of one sublayer (SPEC §3) from X_s: its coefficients H, y = H_pre X_s, u = RMSNorm(y) and
   f = F_s(u), with every intermediate the backward reads. cache != NULL: one token of absorbed decode
   (B = T = 1), where with mhc X_s itself is made first (see gpu_sublayer_forward). With recompute the
   backward calls it again (rerun) to refill the sublayer's buffers. */
static void gpu_sublayer_branch_forward(MhcGpu *g, MhcGpuActs *A, int s, int B, int T, MhcGpuCache *cache, int rerun) {
    const MhcConfig *c = &g->cfg;
    int N = B * T, C = c->d_model, l = s / 2, F = mhc_ffn_width(c);
    int ss = gpu_sub_slot(A, s), ls = gpu_layer_slot(A, l);
    MhcActs *a = &A->a;
    float *y = a->y + (size_t)ss * N * C, *u = a->u + (size_t)ss * N * C, *f = a->f + (size_t)ss * N * C;
    const MhcBlock *b = &g->p.blk[l];
    gpu_stream_pre(g, A, s, N, y, u, a->u_rstd + (size_t)ss * N, s % 2 == 0 ? b->attn_norm : b->ffn_norm,
                   gpu_merge_deferred(c, cache) && s > 0);
    if (s % 2 == 0 && cache) {
        gpu_mla_decode_forward(g, cache, l, u, f);
    } else if (s % 2 == 0) {
        gpu_mla_forward(g, A, l, u, f, B, T, rerun);
    } else if (mhc_is_moe(c, l)) {
        gpu_moe_forward(g, A, l, u, f, B, T, cache != NULL);
    } else if (cache) {
        MhcFfnSlots<float> dense = {b->w1, b->w3, b->w2, NULL, NULL, 0, 1, c->dense_inter_dim, a->ffn_h + (size_t)ls * N * F};
        gpu_ffn_decode(&g->blas, f, u, &dense, NULL, C);
    } else {
        size_t off = (size_t)ls * N * F;
        gpu_swiglu_ffn_forward(&g->blas, f, a->ffn_a + off, a->ffn_g + off, a->ffn_h + off, u, b->w1, b->w3, b->w2, N, C,
                               c->dense_inter_dim);
    }
}

/* One sublayer (SPEC §3): X_{s+1} = H_res X_s + H_post^T F_s(H_pre X_s). Decoding with mhc, the merge of
   all but the last sublayer runs at the start of the next one's pre-stage block instead: one launch
   fewer, where a launch costs more than the work. */
static void gpu_sublayer_forward(MhcGpu *g, MhcGpuActs *A, int s, int B, int T, MhcGpuCache *cache) {
    const MhcConfig *c = &g->cfg;
    int N = B * T, n = c->hc_mult, C = c->d_model, m = mhc_m(c), ss = gpu_sub_slot(A, s);
    MhcActs *a = &A->a;
    gpu_sublayer_branch_forward(g, A, s, B, T, cache, 0);
    if (gpu_merge_deferred(c, cache) && s + 1 < 2 * c->n_layers) return;
    gpu_stream_merge_forward(a->X + (size_t)(s + 1) * N * n * C, a->coef_H + (size_t)ss * N * m, a->X + (size_t)s * N * n * C,
                             a->f + (size_t)ss * N * C, N, n, C, m);
}

/* whether the merge backward leaves dX = H_res^T dX' (PATH 1) to the one-pass pre-stage backward, which
   then writes dX once with all three paths, instead of adding to what the merge wrote */
static int gpu_merge_leaves_dX(const MhcConfig *c) {
    return c->residual == MHC_RESIDUAL_MHC && mhc_pre_grad_one_pass(c->hc_mult);
}

/* Backward of one sublayer (SPEC §5, mhc.h sublayer_backward): from dX' (dXo) to dX = PATH 1 (residual)
   + PATH 2 (pre) + PATH 3 (coefficients), accumulating every parameter gradient of the sublayer */
static void gpu_sublayer_backward(MhcGpu *g, MhcGpuActs *A, int s, const float *dXo, float *dX) {
    const MhcConfig *c = &g->cfg;
    MhcActs *a = &A->a;
    int B = A->B, T = A->T, N = B * T, n = c->hc_mult, C = c->d_model, m = mhc_m(c), l = s / 2, F = mhc_ffn_width(c);
    int ss = gpu_sub_slot(A, s), ls = gpu_layer_slot(A, l);
    const MhcBlock *b = &g->p.blk[l];
    MhcBlock *gb = &g->g.blk[l];
    const float *X = a->X + (size_t)s * N * n * C, *H = a->coef_H + (size_t)ss * N * m;
    const float *y = a->y + (size_t)ss * N * C, *u = a->u + (size_t)ss * N * C, *f = a->f + (size_t)ss * N * C;
    int leave_dX = gpu_merge_leaves_dX(c);          /* PATH 1 then goes into dX with PATHs 2 and 3 */
    gpu_stream_merge_backward(leave_dX ? NULL : dX, a->df, a->dH, dXo, H, X, f, N, n, C, m);   /* §5.1, PATH 1 */
    CUDA_CHECK(cudaMemset(a->du, 0, sizeof(float) * (size_t)N * C));
    if (s % 2 == 0) {
        gpu_mla_backward(g, A, l, u, a->df, a->du, B, T);                             /* §5.2 */
    } else if (mhc_is_moe(c, l)) {
        gpu_moe_backward(g, A, l, u, a->df, a->du, B, T);
    } else {
        size_t off = (size_t)ls * N * F;
        gpu_swiglu_ffn_backward(&g->blas, a->du, gb->w1, gb->w3, gb->w2, a->df, a->ffn_a + off, a->ffn_g + off, a->ffn_h + off,
                                u, b->w1, b->w3, b->w2, a->dwide, a->dffn_a, a->dffn_g, N, C, c->dense_inter_dim);
    }
    CUDA_CHECK(cudaMemset(a->dy, 0, sizeof(float) * (size_t)N * C));
    gpu_rmsnorm_backward(a->dy, s % 2 == 0 ? gb->attn_norm : gb->ffn_norm, a->du, y, s % 2 == 0 ? b->attn_norm : b->ffn_norm,
                         a->u_rstd + (size_t)ss * N, N, C, A->colsum_part);
    gpu_stream_pre_grad(g, A, s, N, a->dy, a->dH, leave_dX ? dXo : NULL, dX);          /* §5.3-§5.4, PATHs 2, 3 */
}

/* Rows [r0, r0 + rows) of the head (SPEC §2) into the logits buffer, whose row 0 is row r0, and with
   targets the fused cross-entropy (§8): their losses, and the rows' dlogits of the mean over all N, over
   the logits or, in BF16, rounded into the GEMM scratch where the head backward takes them (dlogits16) */
static void gpu_head_forward(MhcGpu *g, MhcGpuActs *A, int r0, int rows, int has_targets) {
    const MhcConfig *c = &g->cfg;
    int C = c->d_model, V = c->vocab_size;
    gpu_matmul_forward(&g->blas, MHC_GEMM_FAST, A->a.logits, A->a.hf + (size_t)r0 * C, g->p.head, rows, C, V);
    if (!has_targets) return;
    __nv_bfloat16 *d16 = g->blas.precision == MHC_PREC_BF16 ? g->blas.scratch[0] : NULL;
    if (d16 && g->blas.scratch_count < (size_t)rows * V) {
        fprintf(stderr, "mhc_cuda: the bf16 dlogits of %d rows do not fit the scratch of %zu (a bug)\n", rows, g->blas.scratch_count);
        exit(1);
    }
    gpu_crossentropy(A->a.losses + r0, A->a.logits, d16, A->targets + r0, rows, V, 1.0f / (A->B * A->T));
    g->dlogits16 = d16 != NULL;
}

/* SPEC §2: embed, expand once, the S sublayers, reduce once, norm, head, and (with targets) the fused
   cross-entropy, logit_rows rows at a time. Tokens (and targets) are already in A. Sets g->ce and g->aux
   unless decoding. */
static double gpu_model_forward(MhcGpu *g, MhcGpuActs *A, int B, int T, int has_targets, MhcGpuCache *cache) {
    const MhcConfig *c = &g->cfg;
    int N = B * T, n = c->hc_mult, C = c->d_model, S = 2 * c->n_layers;
    MhcActs *a = &A->a;
    if (cache && g->dlogits16) g->has_targets = 0;  /* decoding's GEMMs take the scratch where those dlogits wait */
    gpu_stream_expand(a->X, g->p.embed, A->tokens, N, n, C);
    if (!cache) CUDA_CHECK(cudaMemset(A->moe_bal, 0, sizeof(double) * (size_t)c->n_layers * B * c->n_routed_experts));
    for (int s = 0; s < S; s++) gpu_sublayer_forward(g, A, s, B, T, cache);
    gpu_stream_reduce(a->z, a->X + (size_t)S * N * n * C, N, n, C);
    gpu_rmsnorm_forward(a->hf, a->hf_rstd, a->z, g->p.norm_final, N, C, c->rms_eps);
    for (int r0 = 0; r0 < N; r0 += A->logit_rows) gpu_head_forward(g, A, r0, min(A->logit_rows, N - r0), has_targets);
    if (cache) return 0;
    gpu_reduce_sum(g->reduce_out, a->losses, has_targets ? (size_t)N : 0, 0, g->reduce_part);
    gpu_reduce_sum(g->reduce_out + 1, A->moe_bal, (size_t)c->n_layers * B * c->n_routed_experts, 0, g->reduce_part);
    double sums[2];
    CUDA_CHECK(cudaMemcpy(sums, g->reduce_out, sizeof sums, cudaMemcpyDeviceToHost));
    g->ce = has_targets ? sums[0] / N : 0;
    g->aux = sums[1];
    return g->ce + g->aux;
}

/* The embedding gradient adds dx0 of every position into its token's row (SPEC §2). To do it without
   atomics the positions are grouped by token, ascending: computed here on the host, where the tokens
   arrive, and uploaded with them. */
static int cmp_u64(const void *x, const void *y) {
    uint64_t a = *(const uint64_t *)x, b = *(const uint64_t *)y;
    return (a > b) - (a < b);
}

static void gpu_upload_token_groups(MhcGpuActs *A, const int *tokens, int N) {
    uint64_t *key = (uint64_t *)mhc_calloc((size_t)N, sizeof(uint64_t));
    int *order = (int *)mhc_calloc((size_t)N, sizeof(int)), *rows = (int *)mhc_calloc((size_t)N, sizeof(int));
    int *start = (int *)mhc_calloc((size_t)N + 1, sizeof(int)), U = 0;
    for (int t = 0; t < N; t++) key[t] = (uint64_t)tokens[t] << 32 | (uint32_t)t;
    qsort(key, (size_t)N, sizeof(uint64_t), cmp_u64);
    for (int p = 0; p < N; p++) {
        int tok = (int)(key[p] >> 32);
        order[p] = (int)(key[p] & 0xffffffffu);
        if (p == 0 || tok != rows[U - 1]) { rows[U] = tok; start[U++] = p; }
    }
    start[U] = N;
    A->n_emb_rows = U;
    CUDA_CHECK(cudaMemcpy(A->emb_order, order, sizeof(int) * N, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(A->emb_rows, rows, sizeof(int) * U, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(A->emb_start, start, sizeof(int) * (U + 1), cudaMemcpyHostToDevice));
    free(key); free(order); free(rows); free(start);
}

/* ---- the public interface ---- */
void mhc_gpu_free(MhcGpu *g) {
    gpu_acts_free(&g->acts);
    arena_free(&g->arena);
    if (g->blas.handle) CUBLAS_CHECK(cublasDestroy(g->blas.handle));
    free(g->tensors);
    free(g->p.blk); free(g->g.blk); free(g->p.sub); free(g->g.sub);
    memset(g, 0, sizeof *g);
}

/* points g->blas at what BF16 GEMMs read: the slab, its twin, and the current acts' operand scratch */
static void gpu_blas_bind(MhcGpu *g) {
    g->blas.params = g->params_bf16 ? g->params : NULL;
    g->blas.params_bf16 = g->params_bf16;
    g->blas.n_params = g->n_params;
    g->blas.scratch[0] = g->acts.gemm_bf16[0];
    g->blas.scratch[1] = g->acts.gemm_bf16[1];
    g->blas.scratch_count = g->acts.gemm_bf16_count;
}

void mhc_gpu_set_precision(MhcGpu *g, int precision) {
    if (precision != MHC_PREC_FP32 && precision != MHC_PREC_TF32 && precision != MHC_PREC_BF16) {
        fprintf(stderr, "mhc_gpu_set_precision: unknown precision %d\n", precision);
        exit(1);
    }
    g->blas.precision = precision;
    if (precision != MHC_PREC_BF16) return;
    if (!g->params_bf16) {                  /* once: the bf16 copy lives from here on, kept current */
        g->params_bf16 = arena_new<__nv_bfloat16>(&g->arena, g->n_params);
        if (g->arena.failed) {
            fprintf(stderr, "mhc_gpu_set_precision: out of GPU memory for the bf16 parameter copy\n");
            exit(1);
        }
        gpu_to_bf16(g->params_bf16, g->params, g->n_params);
    }
}

void mhc_gpu_set_recompute(MhcGpu *g, int enable) { g->recompute = enable != 0; }
/* *built = 1 where this build's code for the GPU has Hopper's own instructions (sm_90a), and in the host
   pass of dev/cuda_emu, which runs wg_product too */
__global__ void wgmma_built_kernel(int *built) {
#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
    *built = 1;
#else
    *built = 0;
#endif
}

int mhc_gpu_has_wgmma(void) {
    int dev, major, built = 0, *d_built;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    if (major != 9) return 0;
    CUDA_CHECK(cudaMalloc((void **)&d_built, sizeof(int)));
    wgmma_built_kernel<<<1, 1>>>(d_built);
    LAUNCH_CHECK();
    CUDA_CHECK(cudaMemcpy(&built, d_built, sizeof(int), cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaFree(d_built));
    return built;
}

int mhc_gpu_set_wgmma(MhcGpu *g, int kernels) {
    if (kernels && !mhc_gpu_has_wgmma()) {
        fprintf(stderr, "mhc_gpu_set_wgmma: wgmma needs a Hopper GPU (compute capability 9.x) and a build for "
                        "sm_90a (make gpu's default GPU_ARCH_FLAGS)\n");
        return -1;
    }
    if (kernels & MHC_WGMMA_ATTENTION) {           /* (the heads init took always fit a Hopper's 227 KB) */
        MhcAttShape sh = att_shape(&g->cfg, 1);
        size_t most = att_forward_wgmma_smem_bytes(sh), kv = att_backward_kv_wgmma_smem_bytes(sh);
        size_t dq = att_backward_q_wgmma_smem_bytes(sh);
        int dev, optin;
        CUDA_CHECK(cudaGetDevice(&dev));
        CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
        most = kv > most ? kv : most;
        most = dq > most ? dq : most;
        if (most > (size_t)optin) {
            fprintf(stderr, "mhc_gpu_set_wgmma: the wgmma attention kernels take %zu bytes of shared memory (max %d)\n", most,
                    optin);
            return -1;
        }
    }
    g->blas.wgmma = kernels & (MHC_WGMMA_EXPERTS | MHC_WGMMA_ATTENTION);
    return 0;
}

/* the buffers of a training forward: with the bf16 operand scratch, with recompute's one-layer slots */
static int gpu_training_acts_flags(int bf16, int recompute) {
    return GPU_ACTS_GRAD | (bf16 ? GPU_ACTS_BF16 : 0) | (recompute ? GPU_ACTS_RECOMPUTE : 0);
}

/* The activation buffers a forward of B x T needs with g's settings (the bf16 operand scratch once the
   bf16 weight copy exists, recompute): kept when they already are those, else freed and allocated anew
   (which forgets the last forward). Out of memory is fatal. */
static void gpu_acts_ensure(MhcGpu *g, int B, int T, const char *who) {
    MhcGpuActs *A = &g->acts;
    int flags = gpu_training_acts_flags(g->params_bf16 != NULL, g->recompute);
    if (A->flags == flags && A->B == B && A->T == T) return;
    gpu_acts_free(A);
    g->has_targets = 0;
    if (gpu_acts_init(A, &g->cfg, B, T, flags)) {
        MhcGpuActs need;
        gpu_acts_init(&need, &g->cfg, B, T, flags | GPU_ACTS_MEASURE);
        fprintf(stderr, "%s: out of GPU memory for the activations of a %d x %d batch (%.2f GiB)%s\n", who, B, T,
                (double)need.arena.bytes / (1 << 30), g->recompute ? "" : "; recompute or smaller micro-batches need less");
        exit(1);
    }
    gpu_blas_bind(g);
}

size_t mhc_gpu_acts_bytes(const MhcConfig *c, int B, int T, int precision, int recompute) {
    MhcGpuActs A;
    gpu_acts_init(&A, c, B, T, gpu_training_acts_flags(precision == MHC_PREC_BF16, recompute) | GPU_ACTS_MEASURE);
    return A.arena.bytes;
}

void mhc_gpu_set_tf32(MhcGpu *g, int enable) { mhc_gpu_set_precision(g, enable ? MHC_PREC_TF32 : MHC_PREC_FP32); }

void mhc_gpu_upload(MhcGpu *g, const MhcModel *host) {
    size_t bytes = sizeof(float) * g->n_params, LE = (size_t)g->cfg.n_layers * g->cfg.n_routed_experts;
    CUDA_CHECK(cudaMemcpy(g->params, host->params, bytes, cudaMemcpyHostToDevice));
    if (g->params_bf16) gpu_to_bf16(g->params_bf16, g->params, g->n_params);
    CUDA_CHECK(cudaMemcpy(g->adam_m, host->adam_m, bytes, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(g->adam_v, host->adam_v, bytes, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(g->expert_bias, host->expert_bias, sizeof(float) * LE, cudaMemcpyHostToDevice));
    g->step = host->step;
}

void mhc_gpu_download(MhcGpu *g, MhcModel *host) {
    size_t bytes = sizeof(float) * g->n_params, LE = (size_t)g->cfg.n_layers * g->cfg.n_routed_experts;
    CUDA_CHECK(cudaMemcpy(host->params, g->params, bytes, cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(host->adam_m, g->adam_m, bytes, cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(host->adam_v, g->adam_v, bytes, cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(host->expert_bias, g->expert_bias, sizeof(float) * LE, cudaMemcpyDeviceToHost));
    int *load = (int *)mhc_calloc(LE, sizeof(int));
    CUDA_CHECK(cudaMemcpy(load, g->expert_load, sizeof(int) * LE, cudaMemcpyDeviceToHost));
    for (size_t k = 0; k < LE; k++) host->expert_load[k] = load[k];
    CUDA_CHECK(cudaMemcpy(load, g->step_load, sizeof(int) * LE, cudaMemcpyDeviceToHost));
    for (size_t k = 0; k < LE; k++) host->step_load[k] = load[k];
    free(load);
    host->step = g->step;
    host->ce = g->ce;
    host->aux = g->aux;
}

void mhc_gpu_download_grads(MhcGpu *g, MhcModel *host) {
    CUDA_CHECK(cudaMemcpy(host->grads, g->grads, sizeof(float) * g->n_params, cudaMemcpyDeviceToHost));
}

void mhc_gpu_download_logits(MhcGpu *g, float *logits) {
    size_t count = (size_t)g->acts.B * g->acts.T * g->cfg.vocab_size;
    if (!g->acts.flags || g->has_targets || g->acts.logit_rows < g->acts.B * g->acts.T) {
        fprintf(stderr, "mhc_gpu_download_logits: the last forward kept no raw logits of all its rows\n");
        exit(1);
    }
    CUDA_CHECK(cudaMemcpy(logits, g->acts.a.logits, sizeof(float) * count, cudaMemcpyDeviceToHost));
}

size_t mhc_gpu_memory_bytes(const MhcGpu *g) { return g->arena.bytes + g->acts.arena.bytes; }

void mhc_gpu_zero_grad(MhcGpu *g) {
    CUDA_CHECK(cudaMemset(g->grads, 0, sizeof(float) * g->n_params));
    CUDA_CHECK(cudaMemset(g->step_load, 0, sizeof(int) * g->cfg.n_layers * g->cfg.n_routed_experts));
}

void mhc_gpu_scale_grads(MhcGpu *g, double scale) {
    scale_kernel<<<mhc_blocks(g->n_params, MHC_BLOCK), MHC_BLOCK>>>(g->grads, (float)scale, g->n_params);
    LAUNCH_CHECK();
}

int mhc_gpu_init(MhcGpu *g, const MhcModel *host, int B, int T) {
    const MhcConfig *c = &host->cfg;
    memset(g, 0, sizeof *g);
    g->cfg = *c;
    int dev, smem_optin;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    size_t sk_bytes = sk_warp_bytes(c->hc_mult, c->sinkhorn_iters, 1);
    if (c->residual == MHC_RESIDUAL_MHC && sk_bytes > (size_t)smem_optin) {
        fprintf(stderr, "mhc_gpu_init: the Sinkhorn tape of hc_mult %d, %d iterations needs %zu bytes of shared memory (max %d)\n",
                c->hc_mult, c->sinkhorn_iters, sk_bytes, smem_optin);
        return -1;
    }
    size_t att_bytes = att_smem_most(att_shape(c, T));
    int dqk = c->qk_nope_head_dim + c->qk_rope_head_dim;
    if (att_bytes > (size_t)smem_optin || dqk > MHC_ATT_MAX_DQK || c->v_head_dim > MHC_ATT_MAX_DV) {
        fprintf(stderr, "mhc_gpu_init: attention head dims d_qk %d, d_v %d: the kernels take d_qk <= %d, d_v <= %d and "
                "%zu bytes of shared memory (max %d)\n", dqk, c->v_head_dim, MHC_ATT_MAX_DQK, MHC_ATT_MAX_DV, att_bytes,
                smem_optin);
        return -1;
    }
    if (c->n_routed_experts > 1024) {
        fprintf(stderr, "mhc_gpu_init: n_routed_experts %d > 1024 is not supported\n", c->n_routed_experts);
        return -1;
    }
    if (B < 1 || T < 1) {
        fprintf(stderr, "mhc_gpu_init: bad batch shape %d x %d\n", B, T);
        return -1;
    }
    g->n_tensors = host->n_tensors;
    g->n_params = host->n_params;
    g->tensors = (MhcTensor *)mhc_calloc((size_t)g->n_tensors, sizeof(MhcTensor));
    memcpy(g->tensors, host->tensors, sizeof(MhcTensor) * g->n_tensors);
    size_t LE = (size_t)c->n_layers * c->n_routed_experts;
    g->params = arena_new<float>(&g->arena, g->n_params);
    g->grads = arena_new<float>(&g->arena, g->n_params);
    g->adam_m = arena_new<float>(&g->arena, g->n_params);
    g->adam_v = arena_new<float>(&g->arena, g->n_params);
    g->expert_bias = arena_new<float>(&g->arena, LE);
    g->expert_load = arena_new<int>(&g->arena, LE);
    g->step_load = arena_new<int>(&g->arena, LE);
    g->p.blk = (MhcBlock *)mhc_calloc((size_t)c->n_layers, sizeof(MhcBlock));
    g->g.blk = (MhcBlock *)mhc_calloc((size_t)c->n_layers, sizeof(MhcBlock));
    g->reduce_part = arena_new<double>(&g->arena, MHC_REDUCE_BLOCKS);
    g->reduce_out = arena_new<double>(&g->arena, 2);
    g->p.sub = (MhcStreamParams *)mhc_calloc((size_t)2 * c->n_layers, sizeof(MhcStreamParams));
    g->g.sub = (MhcStreamParams *)mhc_calloc((size_t)2 * c->n_layers, sizeof(MhcStreamParams));
    g->acts.B = B;                  /* the shape to expect; the first forward allocates (gpu_acts_ensure) */
    g->acts.T = T;
    if (g->arena.failed) {
        fprintf(stderr, "mhc_gpu_init: out of GPU memory (%zu parameters)\n", g->n_params);
        mhc_gpu_free(g);
        return -1;
    }
    MhcLayoutWalk wp = {NULL, 0, 0, g->params}, wg = {NULL, 0, 0, g->grads};   /* views only: no device access */
    mhc_layout(c, &wp, &g->p);
    mhc_layout(c, &wg, &g->g);
    g->blas.handle = gpu_blas_handle();
    mhc_gpu_set_precision(g, MHC_PREC_TF32);
    CUDA_CHECK(cudaMemset(g->expert_load, 0, sizeof(int) * LE));
    mhc_gpu_upload(g, host);
    mhc_gpu_zero_grad(g);
    return 0;
}

double mhc_gpu_forward(MhcGpu *g, const int *tokens, const int *targets, int B, int T) {
    const MhcConfig *c = &g->cfg;
    int N = B * T;
    gpu_acts_ensure(g, B, T, "mhc_gpu_forward");
    if (!targets && g->acts.logit_rows < N) {
        fprintf(stderr, "mhc_gpu_forward: with recompute, a forward without targets keeps the logits of at most %d rows "
                "(MHC_LOGIT_CHUNK_ROWS), not %d x %d\n", g->acts.logit_rows, B, T);
        exit(1);
    }
    for (int t = 0; t < N; t++)
        if (tokens[t] < 0 || tokens[t] >= c->vocab_size || (targets && (targets[t] < 0 || targets[t] >= c->vocab_size))) {
            fprintf(stderr, "mhc_gpu_forward: token out of range at position %d\n", t);
            exit(1);
        }
    MhcGpuActs *A = &g->acts;
    CUDA_CHECK(cudaMemcpy(A->tokens, tokens, sizeof(int) * N, cudaMemcpyHostToDevice));
    if (targets) {
        CUDA_CHECK(cudaMemcpy(A->targets, targets, sizeof(int) * N, cudaMemcpyHostToDevice));
        gpu_upload_token_groups(A, tokens, N);
    }
    g->has_targets = targets != NULL;
    return gpu_model_forward(g, A, B, T, targets != NULL, NULL);
}

__global__ void add_int_kernel(int *acc, const int *x, size_t count) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < count) acc[i] += x[i];
}

/* Accumulates into grads, and the forward's expert loads into step_load. The logits buffer holds the
   dlogits of the forward's last chunk of rows (fused cross-entropy); when it holds a chunk, the others
   are computed again. With recompute each sublayer's branch is run again from its X_s first. */
void mhc_gpu_backward(MhcGpu *g) {
    const MhcConfig *c = &g->cfg;
    MhcGpuActs *A = &g->acts;
    MhcActs *a = &A->a;
    const MhcBlas *bl = &g->blas;
    int N = A->B * A->T, n = c->hc_mult, C = c->d_model, V = c->vocab_size, S = 2 * c->n_layers;
    if (!g->has_targets) {
        fprintf(stderr, "mhc_gpu_backward: the last forward had no targets (or decoding has run since it)\n");
        exit(1);
    }
    CUDA_CHECK(cudaMemset(a->dy, 0, sizeof(float) * (size_t)N * C));
    int last = (N - 1) / A->logit_rows * A->logit_rows;          /* first row of the forward's last chunk */
    for (int r0 = last; r0 >= 0; r0 -= A->logit_rows) {
        int rows = min(A->logit_rows, N - r0);
        if (r0 != last) gpu_head_forward(g, A, r0, rows, 1);
        gpu_matmul_backward_core(bl, MHC_GEMM_FAST, g->dlogits16, 0, a->dy + (size_t)r0 * C, g->g.head, a->logits,
                                 a->hf + (size_t)r0 * C, g->p.head, rows, C, V);
    }
    CUDA_CHECK(cudaMemset(a->du, 0, sizeof(float) * (size_t)N * C));
    gpu_rmsnorm_backward(a->du, g->g.norm_final, a->dy, a->z, g->p.norm_final, a->hf_rstd, N, C, A->colsum_part);
    float *dXo = a->dX, *dX = a->dX2;
    gpu_stream_expand(dXo, a->du, NULL, N, n, C);          /* reduce by sum: every stream receives dz */
    for (int s = S - 1; s >= 0; s--) {
        if (A->flags & GPU_ACTS_RECOMPUTE) gpu_sublayer_branch_forward(g, A, s, A->B, A->T, NULL, 1);
        gpu_sublayer_backward(g, A, s, dXo, dX);
        float *swap = dXo;
        dXo = dX;
        dX = swap;
    }
    size_t count = (size_t)A->n_emb_rows * C;                                          /* expand: dx0 = sum_i dX_0[i] */
    embedding_backward_kernel<<<mhc_blocks(count, MHC_BLOCK), MHC_BLOCK>>>(g->g.embed, dXo, A->emb_rows, A->emb_start,
                                                                          A->emb_order, A->n_emb_rows, n, C);
    LAUNCH_CHECK();
    size_t LE = (size_t)c->n_layers * c->n_routed_experts;
    add_int_kernel<<<mhc_blocks(LE, MHC_BLOCK), MHC_BLOCK>>>(g->step_load, g->expert_load, LE);
    LAUNCH_CHECK();
}

/* ---------------------------------------------------------------------------------------------
   7. Optimizer (SPEC §11, §12)                                                                  */
double mhc_gpu_clip_grad(MhcGpu *g, double max_norm) {
    double sum;
    gpu_reduce_sum(g->reduce_out, g->grads, g->n_params, 1, g->reduce_part);
    CUDA_CHECK(cudaMemcpy(&sum, g->reduce_out, sizeof sum, cudaMemcpyDeviceToHost));
    double norm = sqrt(sum);
    if (max_norm > 0 && norm > max_norm) {
        scale_kernel<<<mhc_blocks(g->n_params, MHC_BLOCK), MHC_BLOCK>>>(g->grads, (float)(max_norm / norm), g->n_params);
        LAUNCH_CHECK();
    }
    return norm;
}

/* SPEC §12 AdamW on one tensor, in double like the CPU. p is the fp32 master; p16 (NULL: none) its bf16
   copy, rewritten here from the new master (RNE) so the BF16 GEMMs never read a stale weight */
__global__ void adamw_kernel(float *p, __nv_bfloat16 *p16, const float *grad, float *m, float *v, size_t count, double lr,
                             double b1, double b2, double bc1, double bc2, double eps, double wd) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= count) return;
    double gi = grad[i];
    double mi = b1 * m[i] + (1 - b1) * gi, vi = b2 * v[i] + (1 - b2) * gi * gi;
    m[i] = (float)mi;
    v[i] = (float)vi;
    float pi = (float)(p[i] * (1 - lr * wd) - lr * (mi / bc1) / (sqrt(vi / bc2) + eps));
    p[i] = pi;
    if (p16) p16[i] = __float2bfloat16(pi);
}

void mhc_gpu_adamw_step(MhcGpu *g, double lr) {
    const MhcConfig *c = &g->cfg;
    g->step++;
    double b1 = c->adam_beta1, b2 = c->adam_beta2, bc1 = 1 - pow(b1, g->step), bc2 = 1 - pow(b2, g->step);
    for (int k = 0; k < g->n_tensors; k++) {           /* decay only on 2-D matrices (MhcTensor.decay) */
        const MhcTensor *t = &g->tensors[k];
        adamw_kernel<<<mhc_blocks(t->size, MHC_BLOCK), MHC_BLOCK>>>(g->params + t->offset,
                                                                   g->params_bf16 ? g->params_bf16 + t->offset : NULL,
                                                                   g->grads + t->offset,
                                                                   g->adam_m + t->offset, g->adam_v + t->offset, t->size, lr,
                                                                   b1, b2, bc1, bc2, c->adam_eps, t->decay ? c->weight_decay : 0);
        LAUNCH_CHECK();
    }
}

/* SPEC §11 aux-loss-free balancing, one block per MoE layer, one thread per expert:
   bias_i += gamma * sign(mean_load - load_i), with the loads of the step (step_load) */
__global__ void expert_bias_update_kernel(float *bias, const int *load, int first_layer, int E, double gamma) {
    int e = threadIdx.x;
    if (e >= E) return;
    size_t l = first_layer + blockIdx.x;
    long long total = 0;
    for (int i = 0; i < E; i++) total += load[l * E + i];
    double d = (double)total / E - (double)load[l * E + e];
    bias[l * E + e] += (float)(gamma * ((d > 0) - (d < 0)));
}

void mhc_gpu_update_expert_bias(MhcGpu *g) {
    const MhcConfig *c = &g->cfg;
    int layers = c->n_layers - c->first_k_dense;
    if (layers <= 0) return;
    expert_bias_update_kernel<<<layers, 32 * mhc_blocks((size_t)c->n_routed_experts, 32)>>>(
        g->expert_bias, g->step_load, c->first_k_dense, c->n_routed_experts, c->bias_update_speed);
    LAUNCH_CHECK();
}

/* ---------------------------------------------------------------------------------------------
   8. Absorbed decode (SPEC §10): the same sublayers on one token; attention over the latent cache.
      A decoded token is a couple of hundred small launches, and launching them costs more than their
      work, so from the second token on the step is one CUDA graph, captured once and replayed. */
int mhc_gpu_cache_init(MhcGpuCache *c, const MhcGpu *g, int max_len) {
    const MhcConfig *cfg = &g->cfg;
    memset(c, 0, sizeof *c);
    if (max_len < 1) return -1;
    c->max_len = max_len;
    size_t L = cfg->n_layers, H = cfg->n_heads, dc = cfg->kv_lora_rank;
    c->ckv = arena_new<float>(&c->arena, L * max_len * dc);
    c->kpe = arena_new<float>(&c->arena, L * max_len * cfg->qk_rope_head_dim);
    c->scores = arena_new<float>(&c->arena, H * max_len);
    c->lat_raw = arena_new<float>(&c->arena, dc + cfg->qk_rope_head_dim);
    c->pos = arena_new<int>(&c->arena, 1);
    c->next = arena_new<int>(&c->arena, 1);
    c->argmax_keys = arena_new<unsigned long long>(&c->arena, MHC_LOGIT_BLOCKS);
    for (int k = 0; k < 2; k++)
        c->top_k_keys[k] = arena_new<unsigned long long>(&c->arena,
                                                         (size_t)mhc_blocks(cfg->vocab_size, MHC_TOP_K_TILE) * MHC_TOP_K_MAX);
    c->top_k = arena_new<MhcTopK>(&c->arena, 1);
    c->use_graph = MHC_DECODE_GRAPH;
    int att_smem = (int)decode_attention_smem_bytes((int)dc, cfg->qk_rope_head_dim);
    CUDA_CHECK(cudaFuncSetAttribute((const void *)mla_decode_attention_kernel<float>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    att_smem));
    CUDA_CHECK(cudaFuncSetAttribute((const void *)mla_decode_attention_kernel<__nv_bfloat16>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, att_smem));
    if (c->arena.failed || gpu_acts_init(&c->acts, cfg, 1, 1, 0)) {   /* decode's GEMMs use g's bf16 scratch */
        fprintf(stderr, "mhc_gpu_cache_init: out of GPU memory for a cache of %d positions\n", max_len);
        arena_free(&c->arena);
        return -1;
    }
    return 0;
}

void mhc_gpu_cache_free(MhcGpuCache *c) {
    if (c->graph) CUDA_CHECK(cudaGraphExecDestroy(c->graph));
    gpu_acts_free(&c->acts);
    arena_free(&c->arena);
    memset(c, 0, sizeof *c);
}

/* The graph replays every pointer and scalar it was captured with, so what changes per token lives in
   device memory (the token in acts.tokens, its position in pos). It must be captured anew when what it
   points at moves: another MhcGpu, or g's GEMM binding (precision; the bf16 twin and operand scratch,
   which a forward of another batch shape reallocates). */
static int gpu_decode_graph_current(const MhcGpuCache *c, const MhcGpu *g) {
    const MhcBlas *a = &c->graph_blas, *b = &g->blas;
    return c->graph && c->graph_gpu == g && a->handle == b->handle && a->precision == b->precision &&
           a->params == b->params && a->params_bf16 == b->params_bf16 && a->n_params == b->n_params &&
           a->scratch[0] == b->scratch[0] && a->scratch[1] == b->scratch[1] && a->scratch_count == b->scratch_count;
}

/* records one decode step's launches and cuBLAS calls (nothing runs) into c->graph */
static void gpu_decode_capture(MhcGpu *g, MhcGpuCache *c) {
    cudaGraph_t graph;
    if (c->graph) CUDA_CHECK(cudaGraphExecDestroy(c->graph));
    c->graph = NULL;
    CUDA_CHECK(cudaStreamBeginCapture(cudaStreamPerThread, cudaStreamCaptureModeThreadLocal));
    gpu_model_forward(g, &c->acts, 1, 1, 0, c);
    CUDA_CHECK(cudaStreamEndCapture(cudaStreamPerThread, &graph));
    CUDA_CHECK(cudaGraphInstantiate(&c->graph, graph, 0));
    CUDA_CHECK(cudaGraphDestroy(graph));
    c->graph_gpu = g;
    c->graph_blas = g->blas;
    c->graph_captures++;
}

int mhc_gpu_decode_step(MhcGpu *g, MhcGpuCache *c, int token, float *logits_host) {
    if (c->len >= c->max_len || token < 0 || token >= g->cfg.vocab_size) return -1;
    gpu_acts_ensure(g, g->acts.B, g->acts.T, "mhc_gpu_decode_step");     /* decode's bf16 GEMMs use g's operand scratch */
    CUDA_CHECK(cudaMemcpy(c->acts.tokens, &token, sizeof(int), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(c->pos, &c->len, sizeof(int), cudaMemcpyHostToDevice));
    if (c->use_graph && c->len > 0) {           /* the first token runs launch by launch: every kernel is loaded */
        if (!gpu_decode_graph_current(c, g)) gpu_decode_capture(g, c);
        CUDA_CHECK(cudaGraphLaunch(c->graph, cudaStreamPerThread));
    } else {
        gpu_model_forward(g, &c->acts, 1, 1, 0, c);
    }
    if (logits_host)
        CUDA_CHECK(cudaMemcpy(logits_host, c->acts.a.logits, sizeof(float) * g->cfg.vocab_size, cudaMemcpyDeviceToHost));
    c->len++;
    return 0;
}

/* A logit as a 64-bit key that orders as (value, then the lower index): its bits made to order as the
   floats do (negatives reversed below the positives; -0 and +0 equal), above the complemented index. A NaN
   is 0, below every number's key, so it never wins. */
__device__ unsigned long long logit_key(float v, int i) {
    if (v != v) return 0;
    unsigned u = __float_as_uint(v == 0 ? 0.0f : v);
    u = u & 0x80000000u ? ~u : u | 0x80000000u;
    return (unsigned long long)u << 32 | (0xFFFFFFFFu - (unsigned)i);
}

__host__ __device__ int logit_key_index(unsigned long long key) { return (int)(0xFFFFFFFFu - (unsigned)(key & 0xFFFFFFFFu)); }

__host__ __device__ float logit_key_value(unsigned long long key) {
    unsigned u = (unsigned)(key >> 32);
    u = u & 0x80000000u ? u & 0x7FFFFFFFu : ~u;
    float v;
    memcpy(&v, &u, sizeof v);
    return v;
}

/* The argmax of x [count]: the lowest index of its largest value, as a loop on the host finds it (NaNs
   never win; with no number, 0). MHC_LOGIT_BLOCKS blocks keep the largest key of their share, then one
   block the largest of those (one block alone took 51 us over the 3b's 129280 logits, H100). */
__global__ void argmax_keys_kernel(unsigned long long *keys, const float *x, int count) {
    unsigned long long best = 0;
    for (int k = blockIdx.x * blockDim.x + threadIdx.x; k < count; k += gridDim.x * blockDim.x) {
        unsigned long long key = logit_key(x[k], k);
        best = key > best ? key : best;
    }
    best = block_reduce(best, MaxOp());
    if (threadIdx.x == 0) keys[blockIdx.x] = best;
}

__global__ void argmax_index_kernel(int *out, const unsigned long long *keys, int n) {
    unsigned long long best = 0;
    for (int k = threadIdx.x; k < n; k += blockDim.x) best = keys[k] > best ? keys[k] : best;
    best = block_reduce(best, MaxOp());
    if (threadIdx.x == 0) *out = best ? logit_key_index(best) : 0;
}

/* keys: MHC_LOGIT_BLOCKS of scratch */
static void gpu_argmax(int *out, unsigned long long *keys, const float *x, int count) {
    argmax_keys_kernel<<<MHC_LOGIT_BLOCKS, MHC_BLOCK>>>(keys, x, count);
    LAUNCH_CHECK();
    argmax_index_kernel<<<1, 32 * mhc_blocks(MHC_LOGIT_BLOCKS, 32)>>>(out, keys, MHC_LOGIT_BLOCKS);
    LAUNCH_CHECK();
}

int mhc_gpu_decode_argmax(const MhcGpu *g, MhcGpuCache *c) {
    int next;
    gpu_argmax(c->next, c->argmax_keys, c->acts.a.logits, g->cfg.vocab_size);
    CUDA_CHECK(cudaMemcpy(&next, c->next, sizeof next, cudaMemcpyDeviceToHost));
    return next;
}

/* Sorts tile [n] (n a power of two) into descending order, the whole block taking part: bitonic merges of
   sorted runs of size/2 into runs of size, the runs alternating direction until the last. Each step
   compares the pairs (i, i + stride), i with bit `stride` clear; n/2 pairs a step. */
__device__ void bitonic_sort_descending(unsigned long long *tile, int n) {
    for (int size = 2; size <= n; size *= 2)
        for (int stride = size / 2; stride > 0; stride /= 2) {
            __syncthreads();                              /* the previous step's swaps are done */
            for (int t = threadIdx.x; t < n / 2; t += blockDim.x) {
                int i = 2 * t - (t & (stride - 1)), j = i + stride;
                int descending = (i & size) == 0;
                unsigned long long a = tile[i], b = tile[j];
                if ((a < b) == descending) {
                    tile[i] = b;
                    tile[j] = a;
                }
            }
        }
    __syncthreads();
}

/* One pass of the top-k: block b sorts the keys [b * MHC_TOP_K_TILE, +MHC_TOP_K_TILE) of its input, the
   logits' (x, first pass) or the last pass's (keys), and writes its k largest, largest first, to
   out [b * k, +k). A short last tile is filled with 0 keys, below every number's. */
__global__ void __launch_bounds__(MHC_TOP_K_TILE / 2)
top_k_pass_kernel(unsigned long long *out, const float *x, const unsigned long long *keys, int count, int k) {
    __shared__ unsigned long long tile[MHC_TOP_K_TILE];
    size_t begin = (size_t)blockIdx.x * MHC_TOP_K_TILE;
    for (int i = threadIdx.x; i < MHC_TOP_K_TILE; i += blockDim.x) {
        size_t j = begin + i;
        tile[i] = j >= (size_t)count ? 0 : x ? logit_key(x[j], (int)j) : keys[j];
    }
    bitonic_sort_descending(tile, MHC_TOP_K_TILE);
    for (int i = threadIdx.x; i < k; i += blockDim.x) out[(size_t)blockIdx.x * k + i] = tile[i];
}

/* block b's share of the softmax denominator sum_v exp((x_v - max) / temperature), max the value of
   top[0], in double as the host computes it (NaNs left out); the host adds the parts in block order */
__global__ void softmax_denominator_kernel(double *parts, const float *x, int count, const unsigned long long *top,
                                           double temperature) {
    float mx = logit_key_value(top[0]);
    double s = 0;
    for (int k = blockIdx.x * blockDim.x + threadIdx.x; k < count; k += gridDim.x * blockDim.x)
        if (x[k] == x[k]) s += exp((x[k] - mx) / temperature);
    s = block_reduce(s, SumOp());
    if (threadIdx.x == 0) parts[blockIdx.x] = s;
}

/* The k (<= MHC_TOP_K_MAX) largest of x [count] and the softmax denominator, as mhc_gpu_decode_top_k
   describes them: passes of top_k_pass_kernel, each keeping k keys of every MHC_TOP_K_TILE (a factor of
   8 or more), until one block holds them all (the 3b's 129280 logits: 3 passes), then the denominator's
   parts, then one copy to the host. out: device; scratch: two buffers of
   ceil(count / MHC_TOP_K_TILE) * k keys. */
static int gpu_top_k(MhcTopK *out, unsigned long long *const scratch[2], const float *x, int count, int k,
                     double temperature, int *ids, float *logits, double *denominator) {
    const unsigned long long *in = NULL;
    for (int pass = 0, n = count;; pass++) {
        unsigned blocks = mhc_blocks((size_t)n, MHC_TOP_K_TILE);
        unsigned long long *dst = blocks == 1 ? out->keys : scratch[pass % 2];
        top_k_pass_kernel<<<blocks, MHC_TOP_K_TILE / 2>>>(dst, in ? NULL : x, in, n, k);
        LAUNCH_CHECK();
        if (blocks == 1) break;
        in = dst;
        n = (int)blocks * k;
    }
    softmax_denominator_kernel<<<MHC_LOGIT_BLOCKS, MHC_BLOCK>>>(out->sum_parts, x, count, out->keys, temperature);
    LAUNCH_CHECK();
    MhcTopK top;
    CUDA_CHECK(cudaMemcpy(&top, out, sizeof top, cudaMemcpyDeviceToHost));
    int found = 0;
    for (; found < k && top.keys[found]; found++) {
        ids[found] = logit_key_index(top.keys[found]);
        logits[found] = logit_key_value(top.keys[found]);
    }
    *denominator = 0;
    for (int b = 0; b < MHC_LOGIT_BLOCKS; b++) *denominator += top.sum_parts[b];
    return found;
}

int mhc_gpu_decode_top_k(const MhcGpu *g, MhcGpuCache *c, int k, double temperature, int *ids, float *logits,
                         double *denominator) {
    int V = g->cfg.vocab_size;
    if (k < 1 || k > MHC_TOP_K_MAX || k > V || !(temperature > 0)) return -1;
    return gpu_top_k(c->top_k, c->top_k_keys, c->acts.a.logits, V, k, temperature, ids, logits, denominator);
}

#endif /* MHC_CUDA_CUH */
