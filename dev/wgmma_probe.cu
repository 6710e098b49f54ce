/* dev/wgmma_probe.cu - what a Hopper wgmma kernel needs settled before one is written (issue 5: the MFU
   target wants the attention and routed-expert products on wgmma, README "Against the targets"). One
   warpgroup multiplies a 64 x 64 bf16 tile A [M, K] by a 64 x 64 bf16 tile B [N, K] (D = A B^T, fp32,
   K in 4 steps of wgmma.m64n64k16) with its operands in shared memory in each layout a kernel would use,
   and checks D against the host, element by element. The operands are small multiples of 1/4, so every
   product and sum is exact in fp32: a right layout gives an error of exactly 0, a wrong one errors of
   order 1. What it settles, each a row of its table:
     - the accumulator fragment: thread t of warp w holds D[16 w + t%32 / 4 + 8 h][8 j + 2 (t%4) + b] in
       register 4 j + 2 h + b (every row reads D through it);
     - the shared-memory descriptor: start address, leading (LBO) and stride (SBO) byte offsets, each
       over 16, at bits 0, 16 and 32, the swizzle mode at bit 62;
     - K-major tiles without swizzle (8 x 16-byte core matrices: LBO steps along K, SBO along M or N);
     - K-major tiles with the 128-byte swizzle (a row of 64 elements in 128 bytes, its 16-byte chunks
       XORed with the row's index mod 8; SBO 1024 between groups of 8 rows; a K step of 16 moves the start
       address 32 bytes);
     - MN-major tiles with the 128-byte swizzle, read transposed (the trans-b or trans-a flag): the
       operands that are stored [K][N] (dh = dy W2) or [K][M] (the weight gradients);
     - MN-major tiles without swizzle, under both readings of which offset steps along K.
   Built by `make gpu` for sm_90a; run on the GPU machine: ./dev/wgmma_probe (a second; dev/gpu_check.sh
   runs it). Exit 0 when every layout a kernel needs (the rows marked "needed") matches. */
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define TILE 64                                     /* M = N = K of the probe */
#define K_STEP 16                                   /* wgmma's K for bf16 */

#define CHECK(call)                                                                                      \
    do {                                                                                                 \
        cudaError_t err_ = (call);                                                                       \
        if (err_ != cudaSuccess) {                                                                       \
            fprintf(stderr, "wgmma_probe: %s (%s:%d)\n", cudaGetErrorString(err_), __FILE__, __LINE__); \
            exit(1);                                                                                     \
        }                                                                                                \
    } while (0)

/* how one operand sits in shared memory */
enum { K_INTERLEAVE, K_SWIZZLE128, MN_SWIZZLE128, MN_INTERLEAVE_SBO_MN, MN_INTERLEAVE_LBO_MN };

/* byte offset of element (r, k) of a 64 x 64 operand tile, r along M (or N), k along K */
__host__ __device__ int tile_offset(int layout, int r, int k) {
    switch (layout) {
    case K_INTERLEAVE:                              /* core matrices of 8 rows x 16 bytes, 128 bytes each; */
        return (r / 8) * 1024 + (k / 8) * 128 + (r % 8) * 16 + (k % 8) * 2;   /* along K 128 apart, along r 1024 */
    case K_SWIZZLE128:                              /* row r in bytes [128 r, 128 r + 128), chunks swizzled */
        return r * 128 + ((k / 8) ^ (r % 8)) * 16 + (k % 8) * 2;
    case MN_SWIZZLE128:                             /* the same with the roles of r and k swapped */
        return k * 128 + ((r / 8) ^ (k % 8)) * 16 + (r % 8) * 2;
    default:                                        /* MN-major core matrices: 8 k x 16 bytes along r */
        return (r / 8) * 128 + (k / 8) * 1024 + (k % 8) * 16 + (r % 8) * 2;
    }
}

/* the descriptor of the tile at smem for the K step s (k from 16 s) */
__device__ uint64_t tile_descriptor(const void *smem, int layout, int s) {
    uint32_t start = (uint32_t)__cvta_generic_to_shared(smem);
    uint32_t lbo, sbo, swizzle = 0;
    switch (layout) {
    case K_INTERLEAVE: start += s * 2 * 128; lbo = 128; sbo = 1024; break;
    case K_SWIZZLE128: start += s * 32; lbo = 16; sbo = 1024; swizzle = 1; break;
    case MN_SWIZZLE128: start += s * 2 * 1024; lbo = 8192; sbo = 1024; swizzle = 1; break;   /* one 64-wide block: LBO unused */
    case MN_INTERLEAVE_SBO_MN: start += s * 2 * 1024; lbo = 1024; sbo = 128; break;
    default: start += s * 2 * 1024; lbo = 128; sbo = 1024; break;                           /* MN_INTERLEAVE_LBO_MN */
    }
    return (uint64_t)((start & 0x3FFFF) >> 4) | (uint64_t)((lbo >> 4) & 0x3FFF) << 16 |
           (uint64_t)((sbo >> 4) & 0x3FFF) << 32 | (uint64_t)swizzle << 62;
}

/* D [64 x 64] (+)= A B^T over one K step, the warpgroup's 32 accumulators a thread; accumulate 0 overwrites */
template <int TRANS_A, int TRANS_B>
__device__ void wgmma_m64n64k16(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int accumulate) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
                 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
                 "%32, %33, p, 1, 1, %35, %36;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
                   "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
                   "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(TRANS_A), "n"(TRANS_B));
#else
    (void)d, (void)desc_a, (void)desc_b, (void)accumulate;
    __trap();                                       /* built without sm_90a: nothing to probe */
#endif
}

/* one warpgroup: A and B from global (row-major [64][64], r then k) into shared memory in their layouts,
   the four K steps, D out row-major through the fragment mapping above */
template <int TRANS_A, int TRANS_B>
__global__ void __launch_bounds__(128) probe_kernel(float *D, const __nv_bfloat16 *A, const __nv_bfloat16 *B, int layout_a,
                                                    int layout_b) {
    __shared__ __align__(1024) unsigned char smem[48 * 1024];   /* A, B, and room past B for a wrong reading */
    unsigned char *sa = smem, *sb = smem + 16 * 1024;
    for (int i = threadIdx.x; i < TILE * TILE; i += blockDim.x) {
        int r = i / TILE, k = i % TILE;
        *(__nv_bfloat16 *)(sa + tile_offset(layout_a, r, k)) = A[i];
        *(__nv_bfloat16 *)(sb + tile_offset(layout_b, r, k)) = B[i];
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");   /* ordinary stores, read by the tensor cores */
#endif
    __syncthreads();
    float d[32];
    uint64_t desc_a[TILE / K_STEP], desc_b[TILE / K_STEP];   /* made first: nothing but the products between them */
#pragma unroll
    for (int v = 0; v < 32; v++) d[v] = 0.0f;
#pragma unroll
    for (int s = 0; s < TILE / K_STEP; s++) {
        desc_a[s] = tile_descriptor(sa, layout_a, s);
        desc_b[s] = tile_descriptor(sb, layout_b, s);
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
#pragma unroll
    for (int s = 0; s < TILE / K_STEP; s++) wgmma_m64n64k16<TRANS_A, TRANS_B>(d, desc_a[s], desc_b[s], s > 0);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#endif
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
    for (int v = 0; v < 32; v++) {
        int j = v / 4, h = (v / 2) % 2, b = v % 2;
        D[(16 * warp + lane / 4 + 8 * h) * TILE + 8 * j + 2 * (lane % 4) + b] = d[v];
    }
}

/* a value in {-2, -1.75, ..., 1.75}: exact in bf16, and any 64 products of two of them sum exactly in fp32 */
static float quarter(unsigned *state) {
    *state = *state * 1664525u + 1013904223u;
    return (float)((int)(*state >> 24) % 16 - 8) / 4.0f;
}

int main(void) {
    struct { const char *name; int la, lb, ta, tb, needed; } rows[] = {
        {"A, B K-major, 128-byte swizzle (forward x W^T)", K_SWIZZLE128, K_SWIZZLE128, 0, 0, 1},
        {"A K-major, B MN-major, 128-byte swizzle, trans-b (dh = dy W2)", K_SWIZZLE128, MN_SWIZZLE128, 0, 1, 1},
        {"A MN-major, B K-major, 128-byte swizzle, trans-a (weight gradients)", MN_SWIZZLE128, K_SWIZZLE128, 1, 0, 1},
        {"A, B K-major, no swizzle", K_INTERLEAVE, K_INTERLEAVE, 0, 0, 0},
        {"B MN-major, no swizzle, SBO along N", K_INTERLEAVE, MN_INTERLEAVE_SBO_MN, 0, 1, 0},
        {"B MN-major, no swizzle, LBO along N", K_INTERLEAVE, MN_INTERLEAVE_LBO_MN, 0, 1, 0},
    };
    int count = TILE * TILE;
    float *a = (float *)malloc(sizeof(float) * count), *b = (float *)malloc(sizeof(float) * count);
    float *ref = (float *)malloc(sizeof(float) * count), *got = (float *)malloc(sizeof(float) * count);
    __nv_bfloat16 *a16 = (__nv_bfloat16 *)malloc(sizeof(__nv_bfloat16) * count);
    __nv_bfloat16 *b16 = (__nv_bfloat16 *)malloc(sizeof(__nv_bfloat16) * count);
    if (!a || !b || !ref || !got || !a16 || !b16) {
        fprintf(stderr, "wgmma_probe: out of memory\n");
        return 1;
    }
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, 0));
    if (prop.major != 9) {
        fprintf(stderr, "wgmma_probe: needs a Hopper GPU (compute capability 9.x), found %s (%d.%d)\n", prop.name, prop.major,
                prop.minor);
        return 2;
    }
    __nv_bfloat16 *dA, *dB;
    float *dD;
    CHECK(cudaMalloc((void **)&dA, sizeof(__nv_bfloat16) * count));
    CHECK(cudaMalloc((void **)&dB, sizeof(__nv_bfloat16) * count));
    CHECK(cudaMalloc((void **)&dD, sizeof(float) * count));
    printf("wgmma.m64n64k16 bf16 -> fp32 on %s: D = A B^T, 64 x 64 x 64 in 4 K steps, against the host\n\n", prop.name);
    printf("| operands in shared memory | max abs error | needed |\n|---|---|---|\n");
    int failed = 0;
    unsigned state = 12345u;
    for (size_t v = 0; v < sizeof rows / sizeof rows[0]; v++) {
        for (int i = 0; i < count; i++) {           /* fresh inputs for every row */
            a[i] = quarter(&state), b[i] = quarter(&state);
            a16[i] = __float2bfloat16(a[i]), b16[i] = __float2bfloat16(b[i]);
        }
        for (int r = 0; r < TILE; r++)
            for (int c = 0; c < TILE; c++) {
                double s = 0;
                for (int k = 0; k < TILE; k++) s += (double)a[r * TILE + k] * b[c * TILE + k];
                ref[r * TILE + c] = (float)s;
            }
        CHECK(cudaMemcpy(dA, a16, sizeof(__nv_bfloat16) * count, cudaMemcpyHostToDevice));
        CHECK(cudaMemcpy(dB, b16, sizeof(__nv_bfloat16) * count, cudaMemcpyHostToDevice));
        CHECK(cudaMemset(dD, 0xff, sizeof(float) * count));   /* NaN: an element not written fails */
        if (rows[v].ta) probe_kernel<1, 0><<<1, 128>>>(dD, dA, dB, rows[v].la, rows[v].lb);
        else if (rows[v].tb) probe_kernel<0, 1><<<1, 128>>>(dD, dA, dB, rows[v].la, rows[v].lb);
        else probe_kernel<0, 0><<<1, 128>>>(dD, dA, dB, rows[v].la, rows[v].lb);
        CHECK(cudaGetLastError());
        CHECK(cudaDeviceSynchronize());
        CHECK(cudaMemcpy(got, dD, sizeof(float) * count, cudaMemcpyDeviceToHost));
        double worst = 0;
        for (int i = 0; i < count; i++) {
            double e = fabs((double)got[i] - ref[i]);
            if (!(e <= worst)) worst = e;           /* NaN included */
        }
        printf("| %s | %g | %s |\n", rows[v].name, worst, rows[v].needed ? "yes" : "no");
        if (rows[v].needed && worst != 0) failed = 1;
    }
    printf("\n%s\n", failed ? "a needed layout does not match" : "every needed layout matches");
    return failed;
}
