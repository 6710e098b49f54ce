/* dev/bench_mhc.c - achieved memory bandwidth of the mHC stream kernels of mhc_cuda.cuh (issue 5): each
   kernel's time at a preset's shape (n = 4 streams, N = batch x seq_len tokens), the bytes it must move
   (every input read once, every output written once; phi and the other parameters are negligible), and
   that over the time against a measured device-to-device copy (bytes read + written). Built by
   `make gpu` as dev/bench_mhc; run on the GPU machine:

       ./dev/bench_mhc                 small (C 512, N 32 x 1024) and 3b (C 1280, N 2 x 4096)
       ./dev/bench_mhc C N [C N ...]   other shapes

   Prints a markdown table. For scale, it also times the pre-stage's GEMM h = X phi^T (exact fp32 through
   cuBLAS) alone: it reads X once; the whole forward reads it twice (the GEMM, then the streaming kernel,
   which keeps a token's streams in registers from its |x|^2 pass to y). The forward runs twice: without
   the sublayer's norm, and with it (u = RMSNorm(y), made by the streaming kernel from y in registers,
   as training runs it); a row times the norm's own kernel on y for comparison. The Sinkhorn kernels, forward and backward
   (which replays the forward), are timed alone as well: they move only n^2 values per token, so their
   row gives the time, not a bandwidth. */
#define MHC_IMPLEMENTATION
#include "mhc.h"
#include "mhc_cuda.cuh"
#include "dev/bench_util.cuh"

#include <stdio.h>
#include <stdlib.h>

static void bench_row(const char *kernel, int C, int N, double bytes, float ms, double copy_gbs) {
    double gbs = bytes / (ms * 1e-3) / 1e9;
    printf("| %s | %d | %d | %.1f | %.3f | %.0f | %.0f%% |\n", kernel, C, N, bytes / 1e6, ms, gbs, 100 * gbs / copy_gbs);
}

/* device-to-device copy of 1 GiB, bytes read + written over the time */
static double bench_copy_gbs(BenchTimer *tm) {
    size_t bytes = (size_t)1 << 30;
    void *a, *b;
    CUDA_CHECK(cudaMalloc(&a, bytes));
    CUDA_CHECK(cudaMalloc(&b, bytes));
    CUDA_CHECK(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice));
    CUDA_CHECK(cudaEventRecord(tm->start));
    for (int r = 0; r < REPS; r++) CUDA_CHECK(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice));
    CUDA_CHECK(cudaEventRecord(tm->stop));
    float ms = bench_ms(tm);
    CUDA_CHECK(cudaFree(a));
    CUDA_CHECK(cudaFree(b));
    return 2.0 * bytes / (ms * 1e-3) / 1e9;
}

static void bench_shape(MhcBlas *bl, BenchTimer *tm, int C, int N, double copy_gbs) {
    const int n = 4, m = n * n + 2 * n, iters = 20, nC = n * C;
    const double f = sizeof(float);
    float *X = bench_buffer((size_t)N * nC, 1, 1.0f), *phi = bench_buffer((size_t)m * nC, 2, 0.02f);
    float *alpha = bench_buffer(3, 3, 0.01f), *b = bench_buffer(m, 4, 1.0f), *fo = bench_buffer((size_t)N * C, 5, 1.0f);
    float *dXo = bench_buffer((size_t)N * nC, 6, 1.0f), *dy = bench_buffer((size_t)N * C, 7, 1.0f);
    float *y = bench_buffer((size_t)N * C, 8, 0), *H = bench_buffer((size_t)N * m, 9, 0), *a = bench_buffer((size_t)N * m, 10, 0);
    float *h = bench_buffer((size_t)N * m, 11, 0), *r = bench_buffer((size_t)N * n, 12, 0), *Xo = bench_buffer((size_t)N * nC, 13, 0);
    float *dX = bench_buffer((size_t)N * nC, 14, 0), *df = bench_buffer((size_t)N * C, 15, 0), *dH = bench_buffer((size_t)N * m, 16, 0);
    float *da = bench_buffer((size_t)N * m, 17, 0), *dalpha = bench_buffer((size_t)N * 3, 18, 0);
    float *dphi = bench_buffer((size_t)m * nC, 19, 0);
    float *u = bench_buffer((size_t)N * C, 23, 0), *u_rstd = bench_buffer(N, 24, 0), *gain = bench_buffer(C, 25, 1.0f);
    MhcLoneScratch lone = {bench_buffer((size_t)lone_blocks(C) * (m + 1), 20, 0), NULL};
    MhcPreGradScratch pre_grad = {bench_buffer(N, 21, 0), bench_buffer((size_t)MHC_PG_SPLITS * m * nC, 22, 0)};
    CUDA_CHECK(cudaMalloc((void **)&lone.done, sizeof(unsigned)));
    CUDA_CHECK(cudaMemset(lone.done, 0, sizeof(unsigned)));

    gpu_mhc_pre_forward(bl, y, NULL, NULL, H, a, h, r, X, phi, alpha, b, NULL, NULL, NULL, N, n, C, iters, 1e-6, 1e-6);     /* warm-up, and H for the rest */
    CUDA_CHECK(cudaEventRecord(tm->start));
    for (int k = 0; k < REPS; k++) gpu_mhc_pre_forward(bl, y, NULL, NULL, H, a, h, r, X, phi, alpha, b, NULL, NULL, NULL, N, n, C, iters, 1e-6, 1e-6);
    CUDA_CHECK(cudaEventRecord(tm->stop));
    bench_row("pre-stage forward (GEMM + streaming kernel + Sinkhorn)", C, N, f * N * (nC + C + 3.0 * m + n), bench_ms(tm),
              copy_gbs);

    gpu_mhc_pre_forward(bl, y, u, u_rstd, H, a, h, r, X, phi, alpha, b, gain, NULL, NULL, N, n, C, iters, 1e-6, 1e-6);
    CUDA_CHECK(cudaEventRecord(tm->start));
    for (int k = 0; k < REPS; k++) gpu_mhc_pre_forward(bl, y, u, u_rstd, H, a, h, r, X, phi, alpha, b, gain, NULL, NULL, N, n, C, iters, 1e-6, 1e-6);
    CUDA_CHECK(cudaEventRecord(tm->stop));
    bench_row("pre-stage forward with the sublayer's norm u (as training runs it)", C, N, f * N * (nC + 2.0 * C + 3.0 * m + n + 1),
              bench_ms(tm), copy_gbs);

    gpu_rmsnorm_forward(u, u_rstd, y, gain, N, C, 1e-6);
    CUDA_CHECK(cudaEventRecord(tm->start));
    for (int k = 0; k < REPS; k++) gpu_rmsnorm_forward(u, u_rstd, y, gain, N, C, 1e-6);
    CUDA_CHECK(cudaEventRecord(tm->stop));
    bench_row("for scale: the norm's own kernel on y (what the streaming kernel now does in registers)", C, N,
              f * N * (2.0 * C + 1), bench_ms(tm), copy_gbs);

    /* decode's: a lone token's whole pre-stage in one launch (h = X phi^T, Sinkhorn, y), phi warm in L2. The
       warm-up also loads the kernel: CUDA loads a kernel's code at its first launch (lazy loading), which
       inside the timed repetitions would add its cost to the first shape's row only. */
    gpu_mhc_pre_forward(bl, y, NULL, NULL, H, a, h, r, X, phi, alpha, b, NULL, NULL, &lone, 1, n, C, iters, 1e-6, 1e-6);
    CUDA_CHECK(cudaEventRecord(tm->start));
    for (int k = 0; k < REPS; k++) gpu_mhc_pre_forward(bl, y, NULL, NULL, H, a, h, r, X, phi, alpha, b, NULL, NULL, &lone, 1, n, C, iters, 1e-6, 1e-6);
    CUDA_CHECK(cudaEventRecord(tm->stop));
    bench_row("pre-stage forward of one token (decode: all of it in one launch)", C, 1, f * ((m + 1.0) * nC + C + 3.0 * m + n),
              bench_ms(tm), copy_gbs);

    CUDA_CHECK(cudaEventRecord(tm->start));
    for (int k = 0; k < REPS; k++) gpu_sinkhorn_forward(H, a, N, n, iters, 1e-6);
    CUDA_CHECK(cudaEventRecord(tm->stop));
    bench_row("for scale: its Sinkhorn alone", C, N, f * N * 2.0 * n * n, bench_ms(tm), copy_gbs);

    gpu_matmul_forward(bl, MHC_GEMM_FP32, h, X, phi, N, nC, m);
    CUDA_CHECK(cudaEventRecord(tm->start));
    for (int k = 0; k < REPS; k++) gpu_matmul_forward(bl, MHC_GEMM_FP32, h, X, phi, N, nC, m);
    CUDA_CHECK(cudaEventRecord(tm->stop));
    bench_row("for scale: cuBLAS h = phi X alone", C, N, f * N * (nC + m), bench_ms(tm), copy_gbs);

    gpu_stream_merge_forward(Xo, H, X, fo, N, n, C, m);
    CUDA_CHECK(cudaEventRecord(tm->start));
    for (int k = 0; k < REPS; k++) gpu_stream_merge_forward(Xo, H, X, fo, N, n, C, m);
    CUDA_CHECK(cudaEventRecord(tm->stop));
    bench_row("merge forward", C, N, f * N * (2.0 * nC + C + m), bench_ms(tm), copy_gbs);

    gpu_stream_merge_backward(dX, df, dH, dXo, H, X, fo, N, n, C, m);
    CUDA_CHECK(cudaEventRecord(tm->start));
    for (int k = 0; k < REPS; k++) gpu_stream_merge_backward(dX, df, dH, dXo, H, X, fo, N, n, C, m);
    CUDA_CHECK(cudaEventRecord(tm->stop));
    bench_row("merge backward", C, N, f * N * (3.0 * nC + 2.0 * C + 2.0 * m), bench_ms(tm), copy_gbs);

    CUDA_CHECK(cudaEventRecord(tm->start));
    for (int k = 0; k < REPS; k++) gpu_stream_merge_backward(NULL, df, dH, dXo, H, X, fo, N, n, C, m);
    CUDA_CHECK(cudaEventRecord(tm->stop));
    bench_row("merge backward without dX (training's at n = 4: the pre-stage backward makes it)", C, N,
              f * N * (2.0 * nC + 2.0 * C + 2.0 * m), bench_ms(tm), copy_gbs);

    /* dH is rewritten with dh by each run: the repetitions see other values, the same work */
    gpu_mhc_pre_backward(bl, dX, dphi, dH, da, dalpha, &pre_grad, dXo, dy, X, H, a, h, r, phi, alpha, N, n, C, iters, 1e-6);
    CUDA_CHECK(cudaEventRecord(tm->start));
    for (int k = 0; k < REPS; k++)
        gpu_mhc_pre_backward(bl, dX, dphi, dH, da, dalpha, &pre_grad, dXo, dy, X, H, a, h, r, phi, alpha, N, n, C, iters, 1e-6);
    CUDA_CHECK(cudaEventRecord(tm->stop));
    bench_row("pre-stage backward (Sinkhorn + coefficient kernel + one-pass stream kernel, dX from dX')", C, N,
              f * N * (3.0 * nC + C + 7.0 * m + n + 3), bench_ms(tm), copy_gbs);

    CUDA_CHECK(cudaEventRecord(tm->start));
    for (int k = 0; k < REPS; k++) gpu_mhc_pre_grad_streams(dX, dphi, &pre_grad, dXo, dy, X, H, dH, phi, N, C);
    CUDA_CHECK(cudaEventRecord(tm->stop));
    bench_row("for scale: its stream kernel alone (dX from dX', dphi; with the splits' sum)", C, N,
              f * N * (3.0 * nC + C + m + n + 1) + f * MHC_PG_SPLITS * m * nC * 2, bench_ms(tm), copy_gbs);

    CUDA_CHECK(cudaEventRecord(tm->start));
    for (int k = 0; k < REPS; k++) gpu_sinkhorn_backward(da, dH, a, N, n, iters, 1e-6);
    CUDA_CHECK(cudaEventRecord(tm->stop));
    bench_row("for scale: its Sinkhorn alone (replay + backward)", C, N, f * N * 3.0 * n * n, bench_ms(tm), copy_gbs);

    gpu_matmul_backward(bl, MHC_GEMM_FP32, dX, dphi, dH, X, phi, N, nC, m);
    CUDA_CHECK(cudaEventRecord(tm->start));
    for (int k = 0; k < REPS; k++) gpu_matmul_backward(bl, MHC_GEMM_FP32, dX, dphi, dH, X, phi, N, nC, m);
    CUDA_CHECK(cudaEventRecord(tm->stop));
    bench_row("for scale: cuBLAS's dX += dh phi, dphi += dh^T X (what the stream kernel took over)", C, N,
              f * N * (3.0 * nC + m), bench_ms(tm), copy_gbs);

    float *all[] = {X, phi, alpha, b, fo, dXo, dy, y, H, a, h, r, Xo, dX, df, dH, da, dalpha, dphi, u, u_rstd, gain, lone.part,
                    pre_grad.dS2, pre_grad.dphi_part};
    CUDA_CHECK(cudaFree(lone.done));
    for (size_t k = 0; k < sizeof all / sizeof all[0]; k++) CUDA_CHECK(cudaFree(all[k]));
}

int main(int argc, char **argv) {
    int shapes[16][2] = {{512, 32 * 1024}, {1280, 2 * 4096}}, n_shapes = 2;
    if (argc > 1) {
        if ((argc - 1) % 2 || argc - 1 > 32) {
            fprintf(stderr, "usage: %s [C N ...]  (at most 16 pairs)\n", argv[0]);
            return 2;
        }
        n_shapes = (argc - 1) / 2;
        for (int k = 0; k < n_shapes; k++) {
            shapes[k][0] = atoi(argv[1 + 2 * k]);
            shapes[k][1] = atoi(argv[2 + 2 * k]);
            if (shapes[k][0] <= 0 || shapes[k][1] <= 0) {
                fprintf(stderr, "bench_mhc: C and N must be positive integers\n");
                return 2;
            }
        }
    }
    MhcBlas bl;
    memset(&bl, 0, sizeof bl);
    bl.precision = MHC_PREC_FP32;
    bl.handle = gpu_blas_handle();
    BenchTimer tm;
    bench_timer_init(&tm);
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    double copy_gbs = bench_copy_gbs(&tm);
    printf("mHC stream kernels on %s, n = 4, fp32; device-to-device copy %.0f GB/s (read + write)\n\n", prop.name, copy_gbs);
    printf("| kernel | C | N | MB moved | ms | GB/s | of copy |\n|---|---|---|---|---|---|---|\n");
    for (int k = 0; k < n_shapes; k++) bench_shape(&bl, &tm, shapes[k][0], shapes[k][1], copy_gbs);
    CUBLAS_CHECK(cublasDestroy(bl.handle));
    return 0;
}
