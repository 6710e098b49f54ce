/* dev/bench_util.cuh - what the GPU benchmarks in dev/ share: device buffers filled with hashed values (no
   zeros, no host memory) and a timer of REPS repetitions between two CUDA events. Include after
   mhc_cuda.cuh (CUDA_CHECK, mhc_blocks). */
#ifndef MHC_BENCH_UTIL_CUH
#define MHC_BENCH_UTIL_CUH

#define REPS 20

/* x[i] = scale * a hash of (i, seed) in [-1, 1) */
__global__ void bench_fill_kernel(float *x, size_t count, unsigned seed, float scale) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= count) return;
    unsigned h = (unsigned)i * 2654435761u ^ seed * 2246822519u;
    h ^= h >> 15; h *= 2246822519u; h ^= h >> 13;
    x[i] = scale * ((float)(h >> 8) / 8388608.0f - 1.0f);
}

static float *bench_buffer(size_t count, unsigned seed, float scale) {
    float *p;
    CUDA_CHECK(cudaMalloc((void **)&p, count * sizeof(float)));
    bench_fill_kernel<<<mhc_blocks(count, MHC_BLOCK), MHC_BLOCK>>>(p, count, seed, scale);
    LAUNCH_CHECK();
    return p;
}

typedef struct { cudaEvent_t start, stop; } BenchTimer;

static void bench_timer_init(BenchTimer *tm) {
    CUDA_CHECK(cudaEventCreate(&tm->start));
    CUDA_CHECK(cudaEventCreate(&tm->stop));
}

static float bench_ms(BenchTimer *tm) {            /* mean of the REPS repetitions just recorded */
    float ms;
    CUDA_CHECK(cudaEventSynchronize(tm->stop));
    CUDA_CHECK(cudaEventElapsedTime(&ms, tm->start, tm->stop));
    return ms / REPS;
}

#endif
