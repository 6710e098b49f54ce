/* dev/wgmma_probe.cu - whether Hopper's wgmma reads shared memory as mhc_cuda.cuh's wg_offset lays it
   out, and registers as its mma.sync A fragments hold them (issue 5: the MFU target wants the large
   products on wgmma: expert_wgmma_kernel and the attention kernels on wgmma, mhc_gpu_set_wgmma). The CPU
   emulation cannot tell: it makes the products from the tiles through wg_offset itself, so a misreading
   of the instruction would pass there. Here one warpgroup multiplies a 64 x 64 bf16 tile A by an N x 64
   bf16 tile B (D = A B^T, 64 x N in fp32, K in 4 steps of mhc_cuda.cuh's wg_product or wg_product_regs)
   in each form and layout the kernels use: N 128 with A and B K-major or MN-major; A from registers with
   B MN-major at N 128 and 64; N 64 with B K-major or MN-major. D is checked against the host element by element.
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
        for (int i = 0; i < na; i++) a[i] = quarter(&state), a16[i] = bf16_bits(a[i]);   /* fresh inputs every row */
        for (int i = 0; i < nb; i++) b[i] = quarter(&state), b16[i] = bf16_bits(b[i]);
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
        double worst = 0;
        int wrong = 0;
        for (int i = 0; i < PROBE_M; i++)
            for (int j = 0; j < rows[r].n; j++) {   /* n64: the other columns are left as they were */
                double s = 0;
                for (int k = 0; k < PROBE_K; k++) s += (double)a[i * PROBE_K + k] * b[j * PROBE_K + k];
                double e = fabs((double)got[i * PROBE_N + j] - s);
                if (!(e == 0)) wrong++;             /* NaN included */
                if (!(e <= worst)) worst = e;
            }
        printf("| %s | %g | %d of %d |\n", rows[r].name, worst, wrong, PROBE_M * rows[r].n);
        if (wrong) failed = 1;
    }
    printf("\n%s\n", failed ? "wgmma does not read some layout as mhc_cuda.cuh lays it out"
                            : "every layout reads as mhc_cuda.cuh lays it out");
    return failed;
}
