/* dev/wgmma_probe.cu - whether Hopper's wgmma reads shared memory as mhc_cuda.cuh's wg_offset lays it
   out, and registers as its mma.sync A fragments hold them (issue 5: the MFU target wants the large
   products on wgmma: expert_wgmma_kernel and the attention kernels on wgmma, mhc_gpu_set_wgmma). The CPU
   emulation cannot tell: it makes the products from the tiles through wg_offset itself, so a misreading
   of the instruction would pass there. Here one warpgroup multiplies a 64 x 64 bf16 tile A by an N x 64
   bf16 tile B (D = A B^T, 64 x N in fp32, K in 4 steps of mhc_cuda.cuh's wg_product or wg_product_regs)
   in each form and layout the kernels use: N 128 with A and B K-major or MN-major; A from registers with
   B MN-major at N 128 and 64; N 64 with B K-major or MN-major. Then attention's forward products as its
   kernel makes them, where the single-tile rows leave out the addressing around the instruction: two
   warpgroups (the second one's rows 8 KB into each tile), d_qk 192 in three 64-column chunks, the tiles
   laid out by att_tile_index in dynamic shared memory past wg_tiles' alignment and a nonzero base.
   D is checked against the host element by element.
   The inputs are multiples of 1/4 in [-2, 2), so every product and sum is exact in fp32: right readings
   give an error of exactly 0, and a misread descriptor, swizzle or fragment gives errors of order 1.
   Built by `make gpu`; run on the GPU machine: ./dev/wgmma_probe (a second; dev/gpu_check.sh runs it).
   Exit 0 when every layout matches. */
#define MHC_IMPLEMENTATION
#include "mhc.h"
#include "mhc_cuda.cuh"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#define PROBE_M 64
#define PROBE_N 128
#define PROBE_K 64

/* one warpgroup: A [64][64] and B [128][64] (row-major, k inner) from global memory into shared memory
   through wg_offset (A_REGS: A instead into each warp's mma.sync A fragments, wg_product_regs), the four K
   steps, D [64][128] out row-major through the accumulator fragment */
template <bool A_MN, bool B_MN, bool A_REGS, int N>
__global__ void __launch_bounds__(128) probe_kernel(float *D, const unsigned short *A, const unsigned short *B) {
    __shared__ __align__(1024) unsigned short sa[PROBE_M * PROBE_K], sb[PROBE_N * PROBE_K];
    for (int i = threadIdx.x; i < PROBE_M * PROBE_K; i += blockDim.x) sa[wg_offset(A_MN, i / PROBE_K, i % PROBE_K)] = A[i];
    for (int i = threadIdx.x; i < PROBE_N * PROBE_K; i += blockDim.x) sb[wg_offset(B_MN, i / PROBE_K, i % PROBE_K)] = B[i];
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
    MmaFragA<MHC_PREC_BF16> a[PROBE_K / 16];          /* A_REGS: (g | g+8, 2t | 2t+8) of the warp's 16 rows */
    for (int s = 0; s < PROBE_K / 16; s++)
        for (int x = 0; x < 4; x++) {
            const unsigned short *p = A + (16 * warp + g + 8 * (x % 2)) * PROBE_K + 16 * s + 2 * t + 8 * (x / 2);
            a[s].x[x] = (unsigned)p[0] | (unsigned)p[1] << 16;
        }
    wg_fence_shared();
    __syncthreads();
    float d[N / 8][4];                                /* D's first N columns (B's first N rows) */
    mma_zero(d);
    wg_hold(d);
    wg_fence();
#pragma unroll
    for (int k0 = 0; k0 < PROBE_K; k0 += 16) {
        if constexpr (A_REGS) wg_product_regs<B_MN, N>(d, a[k0 / 16], sb, k0);
        else wg_product<A_MN, B_MN, N>(d, sa, sb, k0);
    }
    wg_commit();
    wg_wait();
    wg_hold(d);
#pragma unroll
    for (int j = 0; j < N / 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) D[(16 * warp + g + 8 * (e / 2)) * PROBE_N + 8 * j + 2 * t + e % 2] = d[j][e];
}

/* attention_forward_wgmma_kernel's two products at the 3b heads (d_qk 192, d_v 128) on one block of 128
   queries and 128 keys: S = Q K^T, a warpgroup's 64 queries each, over the three 64-column chunks of Q and
   K (ATT_WG_KMAJOR), and O = P V with P [queries][keys] from registers (as the kernel's mma_acc_to_a leaves
   it: each warp's 16 rows as 8 m16n8k16 A fragments of 16 keys) and V [keys][128] MN-major
   (ATT_WG_MNMAJOR), addressed as the kernel addresses them. S and O [128][128] out row-major. */
#define PF_ROWS 128                                  /* queries, keys: ATT_WG_TILE */
#define PF_QK 192
#define PF_DV 128
#define PF_BASE 8192                                 /* Q's start past wg_tiles' alignment (16 KB: a nonzero base) */
#define PF_SMEM_BYTES (2 * (PF_BASE + 2 * PF_ROWS * PF_QK + PF_ROWS * PF_DV) + 1024)

__global__ void __launch_bounds__(256) probe_forward_kernel(float *S, float *O, const unsigned short *Q,
                                                            const unsigned short *K, const unsigned short *V,
                                                            const unsigned short *P) {
    extern __shared__ uint8_t probe_smem[];
    unsigned short *Qs = wg_tiles(probe_smem) + PF_BASE, *Ks = Qs + PF_ROWS * PF_QK, *Vs = Ks + PF_ROWS * PF_QK;
    for (int i = threadIdx.x; i < PF_ROWS * PF_QK; i += blockDim.x) {
        Qs[att_tile_index<ATT_WG_KMAJOR>(PF_ROWS, i / PF_QK, i % PF_QK)] = Q[i];
        Ks[att_tile_index<ATT_WG_KMAJOR>(PF_ROWS, i / PF_QK, i % PF_QK)] = K[i];
    }
    for (int i = threadIdx.x; i < PF_ROWS * PF_DV; i += blockDim.x)
        Vs[att_tile_index<ATT_WG_MNMAJOR>(PF_ROWS, i / PF_DV, i % PF_DV)] = V[i];
    int lane = threadIdx.x % 32, wg = threadIdx.x / 128, g = lane / 4, t = lane % 4;
    int r0 = threadIdx.x / 32 * 16;                  /* the warp's first query, as the kernel's r0 */
    MmaFragA<MHC_PREC_BF16> p[PF_ROWS / 16];
    for (int k = 0; k < PF_ROWS / 16; k++)
        for (int x = 0; x < 4; x++) {
            const unsigned short *e = P + (r0 + g + 8 * (x % 2)) * PF_ROWS + 16 * k + 2 * t + 8 * (x / 2);
            p[k].x[x] = (unsigned)e[0] | (unsigned)e[1] << 16;
        }
    wg_fence_shared();
    __syncthreads();
    float s[16][4], o[16][4];
    mma_zero(s);
    mma_zero(o);
    wg_hold(s);
    wg_fence();
#pragma unroll
    for (int c = 0; c < PF_QK; c += 64)
#pragma unroll
        for (int k0 = 0; k0 < 64; k0 += 16) wg_product<false, false>(s, Qs + c * PF_ROWS + 4096 * wg, Ks + c * PF_ROWS, k0);
    wg_commit();
    wg_wait();
    wg_hold(s);
    wg_hold(o);
    wg_fence();
#pragma unroll
    for (int k = 0; k < 8; k++) wg_product_regs<true>(o, p[k], Vs + k / 4 * 64 * PF_ROWS, 16 * (k % 4));
    wg_commit();
    wg_wait();
    wg_hold(o);
#pragma unroll
    for (int j = 0; j < 16; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            int at = (r0 + g + 8 * (e / 2)) * PF_ROWS + 8 * j + 2 * t + e % 2;
            S[at] = s[j][e];
            O[at] = o[j][e];
        }
}

/* a value in {-2, -1.75, ..., 1.75}, exact in bf16 */
static float quarter(unsigned *state) {
    *state = *state * 1664525u + 1013904223u;
    return (float)((int)(*state >> 24) % 16 - 8) / 4.0f;
}

static unsigned short bf16_bits(float x) {           /* exact for these values: the top half of the word */
    unsigned u;
    memcpy(&u, &x, 4);
    return (unsigned short)(u >> 16);
}

/* n fresh quarters into x and their bf16 bits into x16 (exact) */
static void fill_quarters(float *x, unsigned short *x16, int n, unsigned *state) {
    for (int i = 0; i < n; i++) x[i] = quarter(state), x16[i] = bf16_bits(x[i]);
}

/* the table's row for D [rows x cols] (rows ld apart) against the host's A [rows][k] B [cols][k]^T; 1 if wrong */
static int probe_row(const char *name, const float *got, const float *a, const float *b, int rows, int cols, int ld, int k) {
    double worst = 0;
    int wrong = 0;
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++) {
            double s = 0;
            for (int q = 0; q < k; q++) s += (double)a[i * k + q] * b[j * k + q];
            double e = fabs((double)got[i * ld + j] - s);
            if (!(e == 0)) wrong++;                 /* NaN included */
            if (!(e <= worst)) worst = e;
        }
    printf("| %s | %g | %d of %d |\n", name, worst, wrong, rows * cols);
    return wrong > 0;
}

/* probe_forward_kernel's two rows; 1 if either is wrong */
static int probe_forward(unsigned *state) {
    int nq = PF_ROWS * PF_QK, nv = PF_ROWS * PF_DV, nd = PF_ROWS * PF_ROWS;
    float *q = (float *)mhc_calloc(nq, sizeof(float)), *k = (float *)mhc_calloc(nq, sizeof(float));
    float *v = (float *)mhc_calloc(nv, sizeof(float)), *p = (float *)mhc_calloc(nd, sizeof(float));
    float *vt = (float *)mhc_calloc(nv, sizeof(float)), *s = (float *)mhc_calloc(nd, sizeof(float));
    float *o = (float *)mhc_calloc(nd, sizeof(float));
    unsigned short *h16 = (unsigned short *)mhc_calloc(nq, sizeof(unsigned short));
    unsigned short *dQ, *dK, *dV, *dP;
    float *dS, *dO;
    CUDA_CHECK(cudaMalloc((void **)&dQ, sizeof(unsigned short) * nq));
    CUDA_CHECK(cudaMalloc((void **)&dK, sizeof(unsigned short) * nq));
    CUDA_CHECK(cudaMalloc((void **)&dV, sizeof(unsigned short) * nv));
    CUDA_CHECK(cudaMalloc((void **)&dP, sizeof(unsigned short) * nd));
    CUDA_CHECK(cudaMalloc((void **)&dS, sizeof(float) * nd));
    CUDA_CHECK(cudaMalloc((void **)&dO, sizeof(float) * nd));
    fill_quarters(q, h16, nq, state);
    CUDA_CHECK(cudaMemcpy(dQ, h16, sizeof(unsigned short) * nq, cudaMemcpyHostToDevice));
    fill_quarters(k, h16, nq, state);
    CUDA_CHECK(cudaMemcpy(dK, h16, sizeof(unsigned short) * nq, cudaMemcpyHostToDevice));
    fill_quarters(v, h16, nv, state);
    CUDA_CHECK(cudaMemcpy(dV, h16, sizeof(unsigned short) * nv, cudaMemcpyHostToDevice));
    fill_quarters(p, h16, nd, state);
    CUDA_CHECK(cudaMemcpy(dP, h16, sizeof(unsigned short) * nd, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemset(dS, 0xff, sizeof(float) * nd));   /* NaN: an element not written fails */
    CUDA_CHECK(cudaMemset(dO, 0xff, sizeof(float) * nd));
    CUDA_CHECK(cudaFuncSetAttribute((const void *)probe_forward_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    PF_SMEM_BYTES));
    probe_forward_kernel<<<1, 256, PF_SMEM_BYTES>>>(dS, dO, dQ, dK, dV, dP);
    CUDA_CHECK(cudaGetLastError());
    CUDA_CHECK(cudaDeviceSynchronize());
    CUDA_CHECK(cudaMemcpy(s, dS, sizeof(float) * nd, cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(o, dO, sizeof(float) * nd, cudaMemcpyDeviceToHost));
    for (int i = 0; i < PF_ROWS; i++)               /* V^T [columns][keys]: O = P (V^T)^T */
        for (int c = 0; c < PF_DV; c++) vt[c * PF_ROWS + i] = v[i * PF_DV + c];
    int failed = probe_row("attention forward's S = Q K^T as its kernel addresses it: two warpgroups, d_qk 192 in three "
                           "chunks, tiles past a nonzero base", s, q, k, PF_ROWS, PF_ROWS, PF_ROWS, PF_QK);
    failed |= probe_row("attention forward's O = P V likewise: P from registers, V MN-major over two 64-key chunks", o, p,
                        vt, PF_ROWS, PF_DV, PF_ROWS, PF_ROWS);
    unsigned short *dev[] = {dQ, dK, dV, dP};
    for (int i = 0; i < 4; i++) CUDA_CHECK(cudaFree(dev[i]));
    CUDA_CHECK(cudaFree(dS));
    CUDA_CHECK(cudaFree(dO));
    float *host[] = {q, k, v, p, vt, s, o};
    for (int i = 0; i < 7; i++) free(host[i]);
    free(h16);
    return failed;
}

int main(void) {
    struct { const char *name; int a_mn, b_mn, a_regs, n; } rows[] = {
        {"n128: A, B K-major (experts' forward: x W^T, h W2^T; attention's S = Q K^T)", 0, 0, 0, 128},
        {"n128: A K-major, B MN-major, trans-b (dh = dy W2, dx = da W1; attention's dV, dK)", 0, 1, 0, 128},
        {"n128: A, B MN-major, trans-a and trans-b (the weight gradients)", 1, 1, 0, 128},
        {"n128: A MN-major, B K-major, trans-a", 1, 0, 0, 128},
        {"n128: A in registers, B MN-major, trans-b (attention's O += P V, dQ += dS K)", 0, 1, 1, 128},
        {"n64: A in registers, B MN-major, trans-b (dQ's last 64 columns)", 0, 1, 1, 64},
        {"n64: A, B K-major (attention's S^T = K Q^T, dP^T = V dO^T; dQ's S, dP)", 0, 0, 0, 64},
        {"n64: A K-major, B MN-major, trans-b (attention's dV at d_v 64, dK's last 64 columns)", 0, 1, 0, 64},
    };
    int na = PROBE_M * PROBE_K, nb = PROBE_N * PROBE_K, nd = PROBE_M * PROBE_N;
    float *a = (float *)mhc_calloc(na, sizeof(float)), *b = (float *)mhc_calloc(nb, sizeof(float));
    float *got = (float *)mhc_calloc(nd, sizeof(float));
    unsigned short *a16 = (unsigned short *)mhc_calloc(na, sizeof(unsigned short));
    unsigned short *b16 = (unsigned short *)mhc_calloc(nb, sizeof(unsigned short));
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    if (prop.major != 9) {
        fprintf(stderr, "wgmma_probe: needs a Hopper GPU (compute capability 9.x), found %s (%d.%d)\n", prop.name, prop.major,
                prop.minor);
        return 2;
    }
    unsigned short *dA, *dB;
    float *dD;
    CUDA_CHECK(cudaMalloc((void **)&dA, sizeof(unsigned short) * na));
    CUDA_CHECK(cudaMalloc((void **)&dB, sizeof(unsigned short) * nb));
    CUDA_CHECK(cudaMalloc((void **)&dD, sizeof(float) * nd));
    printf("wg_product, wg_product_regs (wgmma.m64nNk16, bf16 -> fp32) on %s: D [64 x N] = A B^T over K 64, against "
           "the host\n\n", prop.name);
    printf("| operands | max abs error | elements wrong |\n|---|---|---|\n");
    int failed = 0;
    unsigned state = 12345u;
    for (size_t r = 0; r < sizeof rows / sizeof rows[0]; r++) {
        fill_quarters(a, a16, na, &state);           /* fresh inputs every row */
        fill_quarters(b, b16, nb, &state);
        CUDA_CHECK(cudaMemcpy(dA, a16, sizeof(unsigned short) * na, cudaMemcpyHostToDevice));
        CUDA_CHECK(cudaMemcpy(dB, b16, sizeof(unsigned short) * nb, cudaMemcpyHostToDevice));
        CUDA_CHECK(cudaMemset(dD, 0xff, sizeof(float) * nd));   /* NaN: an element not written fails */
        if (rows[r].n == 64 && rows[r].a_regs) probe_kernel<false, true, true, 64><<<1, 128>>>(dD, dA, dB);
        else if (rows[r].n == 64 && rows[r].b_mn) probe_kernel<false, true, false, 64><<<1, 128>>>(dD, dA, dB);
        else if (rows[r].n == 64) probe_kernel<false, false, false, 64><<<1, 128>>>(dD, dA, dB);
        else if (rows[r].a_regs) probe_kernel<false, true, true, 128><<<1, 128>>>(dD, dA, dB);
        else if (rows[r].a_mn && rows[r].b_mn) probe_kernel<true, true, false, 128><<<1, 128>>>(dD, dA, dB);
        else if (rows[r].a_mn) probe_kernel<true, false, false, 128><<<1, 128>>>(dD, dA, dB);
        else if (rows[r].b_mn) probe_kernel<false, true, false, 128><<<1, 128>>>(dD, dA, dB);
        else probe_kernel<false, false, false, 128><<<1, 128>>>(dD, dA, dB);
        CUDA_CHECK(cudaGetLastError());
        CUDA_CHECK(cudaDeviceSynchronize());
        CUDA_CHECK(cudaMemcpy(got, dD, sizeof(float) * nd, cudaMemcpyDeviceToHost));
        failed |= probe_row(rows[r].name, got, a, b, PROBE_M, rows[r].n, PROBE_N, PROBE_K);   /* n64: D's first 64 columns */
    }
    failed |= probe_forward(&state);
    printf("\n%s\n", failed ? "wgmma does not read some layout as mhc_cuda.cuh lays it out"
                            : "every layout reads as mhc_cuda.cuh lays it out");
    return failed;
}
