/* dev/bench_attention.c - the training attention kernels of mhc_cuda.cuh (section 4) one by one (issue 5):
   the forward, the dK/dV kernel and the dQ kernel, each timed alone at a preset's heads, in TF32 and in
   bf16, with the tensor-core FLOP rate each reaches. Attention was 49% of the 3b cut's kernel time in a
   TF32 profile (2026-11-23), so this is where the 3b targets (MFU, speed against torch.compile) are won or
   lost; the table tells which kernel to work on, and dev/ncu_lines.sh (CMD="./dev/bench_attention")
   where its warps wait. Built by `make gpu` as dev/bench_attention; run on the GPU machine:

       ./dev/bench_attention                     small at B 32, T 1024 and 3b at B 2, T 4096 (as dev/bench.sh)
       ./dev/bench_attention preset B T [...]    other shapes

   FLOPs are those of the visible (query, key) pairs only, B H T (T + 1) / 2 of them, 2 per multiply-add:
   forward S = Q K^T and O = P V: d_qk + d_v per pair; dK/dV: S^T, dP^T = V dO^T, dV = P^T dO, dK = dS^T Q:
   2 d_qk + 2 d_v; dQ: S, dP = dO V^T, dQ = dS K: 2 d_qk + d_v (S and dP are made twice in the backward,
   once per kernel: no float atomics). The rate is set against the H100 SXM's dense peak (989 TFLOP/s bf16,
   495 TF32). The inputs are hashed values; lse, o and D come from a forward and the row sums, as in
   training. The bf16 rows time the kernels on bf16 copies made beforehand; the copies' own time is a row
   of its own. On a Hopper the bf16 kernels are timed a second time on wgmma (train's --attention-wgmma). */
#define MHC_IMPLEMENTATION
#include "mhc.h"
#include "mhc_cuda.cuh"
#include "dev/bench_util.cuh"

#include <stdio.h>
#include <stdlib.h>

#define PEAK_BF16_TFLOPS 989.0
#define PEAK_TF32_TFLOPS 495.0

typedef struct {
    MhcAttShape sh;
    int B;
    float *q, *kv, *kpe, *o, *lse, *d_o, *D, *dq, *dkv, *dkpe_h;   /* fp32, token-major as in training   */
    unsigned short *q16, *kv16, *kpe16, *d_o16;                     /* their bf16 copies (MmaElem<BF16>)  */
} BenchAtt;

static unsigned short *bench_bf16_copy(const float *src, size_t count) {
    __nv_bfloat16 *p;
    CUDA_CHECK(cudaMalloc((void **)&p, count * sizeof *p));
    gpu_to_bf16(p, src, count);
    return (unsigned short *)p;
}

static void bench_row(const char *kernel, const BenchAtt *x, const char *prec, double flops, float ms, double peak) {
    double tflops = flops / (ms * 1e-3) / 1e12;
    printf("| %s | %d | %d | %d | %d/%d | %s | %.3f | %.1f | %.1f%% |\n", kernel, x->B, x->sh.T, x->sh.H,
           x->sh.dn + x->sh.dr, x->sh.dv, prec, ms, tflops, 100 * tflops / peak);
}

/* one kernel (which: an MHC_ATT_* bit) at precision P on x's buffers, REPS launches after one untimed
   launch (which also loads the kernel: CUDA loads code at a kernel's first launch) */
template <int P>
static float bench_kernel(int which, const MhcAttCall<P> &call, BenchTimer *tm) {
    gpu_attention_kernels<P>(which, call);
    CUDA_CHECK(cudaEventRecord(tm->start));
    for (int k = 0; k < REPS; k++) gpu_attention_kernels<P>(which, call);
    CUDA_CHECK(cudaEventRecord(tm->stop));
    return bench_ms(tm);
}

/* the three kernels at precision P, its operands q, kv, kpe, d_o */
template <int P>
static void bench_kernels(BenchAtt *x, BenchTimer *tm, const MmaElem<P> *q, const MmaElem<P> *kv, const MmaElem<P> *kpe,
                          const MmaElem<P> *d_o, const char *prec, double peak) {
    MhcAttShape sh = x->sh;
    double pairs = (double)x->B * sh.H * sh.T * (sh.T + 1) / 2.0, dqk = sh.dn + sh.dr, dv = sh.dv;
    MhcAttCall<P> call = {x->o, x->lse, x->dq, x->dkv, x->dkpe_h, x->lse, x->D, q, kv, kpe, d_o, x->B, sh, 0};
    bench_row("forward", x, prec, 2 * pairs * (dqk + dv), bench_kernel<P>(MHC_ATT_FORWARD, call, tm), peak);
    if (P == MHC_PREC_BF16 && mhc_gpu_has_wgmma()) {   /* the wgmma kernels (--attention-wgmma) */
        call.wgmma = 1;
        bench_row("forward on wgmma", x, prec, 2 * pairs * (dqk + dv), bench_kernel<P>(MHC_ATT_FORWARD, call, tm), peak);
        bench_row("dK, dV on wgmma", x, prec, 2 * pairs * (2 * dqk + 2 * dv), bench_kernel<P>(MHC_ATT_BACKWARD_KV, call, tm),
                  peak);
        bench_row("dQ on wgmma", x, prec, 2 * pairs * (2 * dqk + dv), bench_kernel<P>(MHC_ATT_BACKWARD_Q, call, tm), peak);
        call.wgmma = 0;
    }
    bench_row("dK, dV", x, prec, 2 * pairs * (2 * dqk + 2 * dv), bench_kernel<P>(MHC_ATT_BACKWARD_KV, call, tm), peak);
    bench_row("dQ", x, prec, 2 * pairs * (2 * dqk + dv), bench_kernel<P>(MHC_ATT_BACKWARD_Q, call, tm), peak);
}

static int bench_shape(BenchTimer *tm, const char *preset, int B, int T) {
    MhcConfig cfg;
    if (mhc_preset(&cfg, preset)) {
        fprintf(stderr, "bench_attention: unknown preset %s\n", preset);
        return 1;
    }
    BenchAtt x;
    x.sh = att_shape(&cfg, T);
    x.B = B;
    MhcAttShape sh = x.sh;
    size_t N = (size_t)B * T, H = sh.H, dqk = sh.dn + sh.dr, rows = (size_t)B * H * T;
    x.q = bench_buffer(N * H * dqk, 1, 1.0f);          /* scores scale q . k / sqrt(d_qk): below 1 in size */
    x.kv = bench_buffer(N * H * (sh.dn + sh.dv), 2, 1.0f);
    x.kpe = bench_buffer(N * sh.dr, 3, 1.0f);
    x.d_o = bench_buffer(N * H * sh.dv, 4, 1.0f);
    x.o = bench_buffer(N * H * sh.dv, 5, 0.0f);
    x.lse = bench_buffer(rows, 6, 0.0f);
    x.D = bench_buffer(rows, 7, 0.0f);
    x.dq = bench_buffer(N * H * dqk, 8, 0.0f);
    x.dkv = bench_buffer(N * H * (sh.dn + sh.dv), 9, 0.0f);
    x.dkpe_h = bench_buffer(N * H * sh.dr, 10, 0.0f);
    MhcAttCall<MHC_PREC_TF32> forward = {x.o, x.lse, NULL, NULL, NULL, NULL, NULL, x.q, x.kv, x.kpe, NULL, B, sh, 0};
    gpu_attention_kernels<MHC_PREC_TF32>(MHC_ATT_FORWARD, forward);   /* lse, o, D as in training */
    attention_rowdot_kernel<<<mhc_blocks(rows, MHC_ROW_WARPS), 32 * MHC_ROW_WARPS>>>(x.D, x.d_o, x.o, sh, (int)rows);
    LAUNCH_CHECK();

    bench_kernels<MHC_PREC_TF32>(&x, tm, x.q, x.kv, x.kpe, x.d_o, "TF32", PEAK_TF32_TFLOPS);
    x.q16 = bench_bf16_copy(x.q, N * H * dqk);
    x.kv16 = bench_bf16_copy(x.kv, N * H * (sh.dn + sh.dv));
    x.kpe16 = bench_bf16_copy(x.kpe, N * sh.dr);
    x.d_o16 = bench_bf16_copy(x.d_o, N * H * sh.dv);
    bench_kernels<MHC_PREC_BF16>(&x, tm, x.q16, x.kv16, x.kpe16, x.d_o16, "bf16", PEAK_BF16_TFLOPS);

    /* the backward's copies (the forward's are q, kv, k_pe only): no FLOPs, so the rate column is 0 */
    CUDA_CHECK(cudaEventRecord(tm->start));
    for (int k = 0; k < REPS; k++) {
        gpu_to_bf16((__nv_bfloat16 *)x.q16, x.q, N * H * dqk);
        gpu_to_bf16((__nv_bfloat16 *)x.kv16, x.kv, N * H * (sh.dn + sh.dv));
        gpu_to_bf16((__nv_bfloat16 *)x.kpe16, x.kpe, N * sh.dr);
        gpu_to_bf16((__nv_bfloat16 *)x.d_o16, x.d_o, N * H * sh.dv);
    }
    CUDA_CHECK(cudaEventRecord(tm->stop));
    bench_row("bf16 copies of q, kv, k_pe, dO", &x, "bf16", 0, bench_ms(tm), PEAK_BF16_TFLOPS);

    float *all[] = {x.q, x.kv, x.kpe, x.o, x.lse, x.d_o, x.D, x.dq, x.dkv, x.dkpe_h};
    for (size_t k = 0; k < sizeof all / sizeof all[0]; k++) CUDA_CHECK(cudaFree(all[k]));
    unsigned short *all16[] = {x.q16, x.kv16, x.kpe16, x.d_o16};
    for (size_t k = 0; k < sizeof all16 / sizeof all16[0]; k++) CUDA_CHECK(cudaFree(all16[k]));
    return 0;
}

int main(int argc, char **argv) {
    const char *presets[16] = {"small", "3b"};
    int B[16] = {32, 2}, T[16] = {1024, 4096}, n_shapes = 2;
    if (argc > 1) {
        if ((argc - 1) % 3 || argc - 1 > 48) {
            fprintf(stderr, "usage: %s [preset B T ...]  (at most 16 triples)\n", argv[0]);
            return 2;
        }
        n_shapes = (argc - 1) / 3;
        for (int k = 0; k < n_shapes; k++) {
            presets[k] = argv[1 + 3 * k];
            B[k] = atoi(argv[2 + 3 * k]);
            T[k] = atoi(argv[3 + 3 * k]);
            if (B[k] <= 0 || T[k] <= 0) {
                fprintf(stderr, "bench_attention: B and T must be positive integers\n");
                return 2;
            }
        }
    }
    BenchTimer tm;
    bench_timer_init(&tm);
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    printf("Training attention kernels on %s, causal, visible pairs only\n\n", prop.name);
    printf("| kernel | B | T | H | d_qk/d_v | operands | ms | TFLOP/s | of peak |\n|---|---|---|---|---|---|---|---|---|\n");
    for (int k = 0; k < n_shapes; k++)
        if (bench_shape(&tm, presets[k], B[k], T[k])) return 1;
    return 0;
}
