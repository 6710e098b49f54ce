/* dev/bench_expert.c - the routed-expert GEMMs of mhc_cuda.cuh (section 1) one by one (issue 5): each
   product an MoE layer's forward and backward make, timed alone at a preset's experts with the rows
   spread evenly over them, in TF32 and in bf16, with the tensor-core FLOP rate each reaches. bf16 is timed
   twice: with the call's own rounding of its activation operands into the scratch (as training runs it),
   and the kernel alone on copies made beforehand; on a Hopper, both again with the wgmma kernel
   (mhc_gpu_set_wgmma, MHC_WGMMA_EXPERTS). Each product is timed again in cuBLAS (strided-batched, one GEMM per
   expert of its even share; the same FLOPs), the rate our kernels are set against. wgmma tiles of our
   own are the way to cuBLAS's rate in bf16: cuBLAS's grouped GEMM (uneven shares) takes bf16 A and B
   only with a bf16 C, and these outputs and weight gradients are fp32 (in TF32 it would serve, at one
   host read of the expert counts a layer). Built by `make gpu` as
   dev/bench_expert; run on the GPU machine:

       ./dev/bench_expert                     small (B 32, T 1024) and 3b (B 2, T 4096), as dev/bench.sh
       ./dev/bench_expert preset N [...]      other presets and token counts
       ./dev/bench_expert --wgmma-only [...]  the wgmma rows alone (a build with other wgmma knobs:
                                              MHC_EXPERT_WGMMA_INFLIGHT, MHC_EXPERT_WGMMA_STAGES)

   FLOPs: 2 M N K per product. The rate is set against the H100 SXM's dense peak (989 TFLOP/s bf16, 495
   TF32). The inputs are hashed values. */
#define MHC_IMPLEMENTATION
#include "mhc.h"
#include "mhc_cuda.cuh"
#include "dev/bench_util.cuh"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PEAK_BF16_TFLOPS 989.0
#define PEAK_TF32_TFLOPS 495.0

/* one MoE layer's operands: rows NK = N K token slots grouped by expert, E experts of inter dim I */
typedef struct {
    int E, NK, C, I;
    int *seg;                       /* [E + 1], even shares */
    float *slab;                    /* weights W1 [E,I,C] then W2 [E,C,I] (the "parameters") */
    __nv_bfloat16 *slab16;          /* their bf16 twin */
    float *W1, *W2, *X, *H, *dY, *dA, *out_i, *out_c, *dW1, *dW2, *split;
} BenchMoe;

/* one product of the layer, its shapes as gpu_expert_gemm takes them */
typedef struct {
    const char *name;
    float *C;
    int ldc;
    const float *A;
    int lda;
    const float *B;
    int ldb, transB;
    size_t w_stride;
    int M, N, K, kseg;
    float beta;
} BenchProduct;

/* One call of product p: our kernel over seg (cublas 0), or (cublas 1) cuBLAS's strided-batched GEMM over the
   E experts' equal shares, R rows each, through gemm_core at the same precision: the bar the kernel is set
   against, E products of one shape (the rows spread evenly make them so; a grouped GEMM of uneven shares
   would do the same work). kseg products have R as their depth. */
static void run_product(const MhcBlas *bl, int rounded, const BenchMoe *x, const BenchProduct *p, int cublas) {
    if (!cublas) {
        gpu_expert_gemm(bl, rounded, p->C, p->ldc, p->A, p->lda, p->B, p->ldb, p->transB, p->w_stride, x->seg, x->E, p->M, p->N,
                        p->K, p->kseg, p->beta, p->kseg ? x->split : NULL);
        return;
    }
    long long R = x->NK / x->E;
    if (p->kseg)                                    /* C_e [M,N] += A_e^T B_e, A_e [R,M], B_e [R,N] */
        gemm_core(bl, MHC_GEMM_FAST, rounded, 1, 0, p->M, p->N, (int)R, 1.0f, p->A, R * p->lda, p->B, R * p->ldb, p->beta, p->C,
                  (long long)p->w_stride, x->E);
    else                                            /* C_e [R,N] = A_e [R,K] op(W_e) */
        gemm_core(bl, MHC_GEMM_FAST, rounded, 0, p->transB, (int)R, p->N, p->K, 1.0f, p->A, R * p->lda, p->B,
                  (long long)p->w_stride, p->beta, p->C, R * p->ldc, x->E);
}

static float bench_product(const MhcBlas *bl, int rounded, const BenchMoe *x, const BenchProduct *p, int cublas, BenchTimer *tm) {
    run_product(bl, 0, x, p, cublas);               /* untimed: loads the kernel, and leaves the bf16 copies in the scratch */
    CUDA_CHECK(cudaEventRecord(tm->start));
    for (int k = 0; k < REPS; k++) run_product(bl, rounded, x, p, cublas);
    CUDA_CHECK(cudaEventRecord(tm->stop));
    return bench_ms(tm);
}

static void bench_row(const char *preset, const BenchProduct *p, const char *prec, float ms, double peak) {
    double flops = 2.0 * p->M * p->N * p->K, tflops = flops / (ms * 1e-3) / 1e12;
    printf("| %s | %s | %d x %d x %d | %s | %.3f | %.1f | %.1f%% |\n", preset, p->name, p->M, p->N, p->K, prec, ms, tflops,
           100 * tflops / peak);
}

static int bench_preset(BenchTimer *tm, const char *preset, int N, int wgmma_only) {
    MhcConfig cfg;
    if (mhc_preset(&cfg, preset)) {
        fprintf(stderr, "bench_expert: unknown preset %s\n", preset);
        return 1;
    }
    BenchMoe x;
    x.E = cfg.n_routed_experts, x.C = cfg.d_model, x.I = cfg.moe_inter_dim, x.NK = N * cfg.n_activated_experts;
    int E = x.E, C = x.C, I = x.I, NK = x.NK;
    int *seg = (int *)malloc(sizeof(int) * (E + 1));
    for (int e = 0; e <= E; e++) seg[e] = (int)((long long)NK * e / E);
    CUDA_CHECK(cudaMalloc((void **)&x.seg, sizeof(int) * (E + 1)));
    CUDA_CHECK(cudaMemcpy(x.seg, seg, sizeof(int) * (E + 1), cudaMemcpyHostToDevice));
    free(seg);
    size_t w = (size_t)E * I * C, rows_c = (size_t)NK * C, rows_i = (size_t)NK * I;
    x.slab = bench_buffer(2 * w, 1, 0.05f);
    x.W1 = x.slab, x.W2 = x.slab + w;
    CUDA_CHECK(cudaMalloc((void **)&x.slab16, 2 * w * sizeof(__nv_bfloat16)));
    gpu_to_bf16(x.slab16, x.slab, 2 * w);
    x.X = bench_buffer(rows_c, 2, 1.0f), x.dY = bench_buffer(rows_c, 3, 1.0f), x.out_c = bench_buffer(rows_c, 4, 0.0f);
    x.H = bench_buffer(rows_i, 5, 1.0f), x.dA = bench_buffer(rows_i, 6, 1.0f), x.out_i = bench_buffer(rows_i, 7, 0.0f);
    x.dW1 = bench_buffer(w, 8, 0.0f), x.dW2 = bench_buffer(w, 9, 0.0f);
    size_t split = gpu_expert_split_floats(E, C, I, NK), split2 = gpu_expert_split_floats(E, I, C, NK);
    split = split > split2 ? split : split2;
    x.split = split ? bench_buffer(split, 10, 0.0f) : NULL;        /* the weight gradients' row splits, if any */

    BenchProduct products[6] = {
        {"forward x W1^T (W3 alike)", x.out_i, I, x.X, C, x.W1, C, 1, (size_t)I * C, NK, I, C, 0, 0.0f},
        {"forward h W2^T", x.out_c, C, x.H, I, x.W2, I, 1, (size_t)C * I, NK, C, I, 0, 0.0f},
        {"dh = dy W2", x.out_i, I, x.dY, C, x.W2, I, 0, (size_t)C * I, NK, I, C, 0, 0.0f},
        {"dx += da W1 (dg W3 alike)", x.out_c, C, x.dA, I, x.W1, C, 0, (size_t)I * C, NK, C, I, 0, 1.0f},
        {"dW2 += dy^T h", x.dW2, I, x.dY, C, x.H, I, 0, (size_t)C * I, C, I, NK, 1, 1.0f},
        {"dW1 += da^T x (dW3 alike)", x.dW1, C, x.dA, I, x.X, C, 0, (size_t)I * C, I, C, NK, 1, 1.0f},
    };
    MhcBlas bl;
    memset(&bl, 0, sizeof bl);
    bl.params = x.slab, bl.params_bf16 = x.slab16, bl.n_params = 2 * w;
    size_t count = rows_c > rows_i ? rows_c : rows_i;
    for (int k = 0; k < 2; k++) CUDA_CHECK(cudaMalloc((void **)&bl.scratch[k], count * sizeof(__nv_bfloat16)));
    bl.scratch_count = count;
    int even = NK % E == 0;                         /* cuBLAS's rows need equal shares */
    int wgmma = mhc_gpu_has_wgmma();                /* the wgmma rows: on a Hopper only */
    for (int p = 0; p < 6; p++) {
        int rounded = products[p].kseg ? MHC_A_ROUNDED | MHC_B_ROUNDED : MHC_A_ROUNDED;
        for (int cublas = 0; cublas <= even; cublas++) {
            const char *who = cublas ? "cuBLAS batched, " : "";
            char label[96];
            if (!wgmma_only) {
                bl.precision = MHC_PREC_TF32;
                snprintf(label, sizeof label, "%sTF32", who);
                bench_row(preset, &products[p], label, bench_product(&bl, 0, &x, &products[p], cublas, tm), PEAK_TF32_TFLOPS);
                bl.precision = MHC_PREC_BF16;
                snprintf(label, sizeof label, "%sbf16, rounding its operands", who);
                bench_row(preset, &products[p], label, bench_product(&bl, 0, &x, &products[p], cublas, tm), PEAK_BF16_TFLOPS);
                snprintf(label, sizeof label, "%sbf16, kernel alone", who);
                bench_row(preset, &products[p], label, bench_product(&bl, rounded, &x, &products[p], cublas, tm), PEAK_BF16_TFLOPS);
            }
            if (cublas || !wgmma) continue;
            bl.precision = MHC_PREC_BF16;
            bl.wgmma = MHC_WGMMA_EXPERTS;
            bench_row(preset, &products[p], "bf16 wgmma, rounding its operands", bench_product(&bl, 0, &x, &products[p], 0, tm),
                      PEAK_BF16_TFLOPS);
            bench_row(preset, &products[p], "bf16 wgmma, kernel alone", bench_product(&bl, rounded, &x, &products[p], 0, tm),
                      PEAK_BF16_TFLOPS);
            bl.wgmma = 0;
        }
    }
    float *all[] = {x.slab, x.X, x.dY, x.out_c, x.H, x.dA, x.out_i, x.dW1, x.dW2, x.split};
    for (size_t k = 0; k < sizeof all / sizeof all[0]; k++)
        if (all[k]) CUDA_CHECK(cudaFree(all[k]));
    CUDA_CHECK(cudaFree(x.slab16));
    CUDA_CHECK(cudaFree(x.seg));
    for (int k = 0; k < 2; k++) CUDA_CHECK(cudaFree(bl.scratch[k]));
    return 0;
}

int main(int argc, char **argv) {
    const char *presets[16] = {"small", "3b"};
    int N[16] = {32 * 1024, 2 * 4096}, n_shapes = 2;
    int wgmma_only = argc > 1 && !strcmp(argv[1], "--wgmma-only"), first = 1 + wgmma_only;
    if (argc > first) {
        if ((argc - first) % 2 || argc - first > 32) {
            fprintf(stderr, "usage: %s [--wgmma-only] [preset N ...]  (at most 16 pairs; N tokens)\n", argv[0]);
            return 2;
        }
        n_shapes = (argc - first) / 2;
        for (int k = 0; k < n_shapes; k++) {
            presets[k] = argv[first + 2 * k];
            N[k] = atoi(argv[first + 1 + 2 * k]);
            if (N[k] <= 0) {
                fprintf(stderr, "bench_expert: N must be a positive integer\n");
                return 2;
            }
        }
    }
    BenchTimer tm;
    bench_timer_init(&tm);
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    printf("Routed-expert GEMMs on %s, rows spread evenly over the experts (M x N x K: output rows x columns x depth)\n\n",
           prop.name);
    if (wgmma_only && !mhc_gpu_has_wgmma()) {
        fprintf(stderr, "bench_expert --wgmma-only: this GPU or build has no wgmma (an sm_90a build on a Hopper)\n");
        return 1;
    }
    printf("wgmma kernel: MHC_EXPERT_WGMMA_INFLIGHT %d, MHC_EXPERT_WGMMA_STAGES %d\n\n", MHC_EXPERT_WGMMA_INFLIGHT,
           MHC_EXPERT_WGMMA_STAGES);
    printf("| preset | product | M x N x K | operands | ms | TFLOP/s | of peak |\n|---|---|---|---|---|---|---|\n");
    for (int k = 0; k < n_shapes; k++)
        if (bench_preset(&tm, presets[k], N[k], wgmma_only)) return 1;
    return 0;
}
