/* dev/cuda_emu/cuda_runtime.h - a CPU emulation of the part of CUDA that mhc_cuda.cuh uses, so the GPU
   code paths (and the `gpu` test group of tests.c) can be run and checked on a machine with no GPU.

   Every thread of a block is a fiber (ucontext) with its own stack; blocks run one after another, and
   within a block one warp at a time runs up to the next __syncthreads (emu.cpp emu_run_block), so a
   missing barrier between warps shows. __syncthreads and __syncwarp are real barriers (a fiber waits
   until every live thread of its block or warp arrives), warp shuffles and ballots exchange values
   through a per-warp table, and a barrier that can never be released aborts with "deadlock". Device memory is host memory filled with 0xFF bytes
   (NaN floats, -1 ints) when allocated and shared memory with 0x7F, so reads of unwritten memory show.
   Kernel launches `k<<<grid, block, smem>>>(args)` are rewritten into emu_launch calls by launch.py.
   With EMU_LAUNCH_LOG=1 every launch, cuBLAS call, cudaMemcpy and cudaMemset prints a line on stderr
   ("launch NAME"): the launch count of a step or a decoded token, without a GPU. A stream capture
   records launches and cuBLAS calls, and a graph launch replays them (see emu_capture).

   What it does not model: concurrency between blocks (they run in order, or reversed with
   EMU_REVERSE=1 so order dependence shows), memory-model races, timing, and hardware rounding modes
   other than round-to-nearest. It is a correctness tool, not a GPU. */
#pragma once
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <algorithm>
#include <functional>
#include <tuple>

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct emu_uint3 { unsigned x, y, z; };
struct __attribute__((aligned(16))) float4 { float x, y, z, w; };
struct __attribute__((aligned(8))) float2 { float x, y; };
static inline float2 make_float2(float x, float y) { float2 v = {x, y}; return v; }
static inline float4 make_float4(float x, float y, float z, float w) { float4 v = {x, y, z, w}; return v; }
struct __attribute__((aligned(16))) uint4 { unsigned x, y, z, w; };
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { uint4 v = {x, y, z, w}; return v; }
static inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
extern emu_uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static      /* one block runs at a time: a static is that block's shared array */
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline int __popc(unsigned x) { return __builtin_popcount(x); }
/* one thread runs at a time: an atomic is a plain read-modify-write, a fence orders nothing further, and
   a load that skips L1 is a load */
static inline unsigned atomicAdd(unsigned *p, unsigned v) { unsigned old = *p; *p = old + v; return old; }
static inline void __threadfence() {}
static inline float __ldcg(const float *p) { return *p; }

/* ---- threads, barriers, warp exchange ---- */
enum { EMU_RUN, EMU_WAIT_BLOCK, EMU_WAIT_WARP, EMU_DONE };
void emu_yield(int state);
static inline void __syncthreads() { emu_yield(EMU_WAIT_BLOCK); }
static inline void __syncwarp(unsigned = 0xffffffffu) { emu_yield(EMU_WAIT_WARP); }
extern uint64_t emu_exchange[32][32];     /* [warp][lane] */
template <typename T> T __shfl_xor_sync(unsigned, T v, int lane_mask) {
    unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    memcpy(&emu_exchange[warp][lane], &v, sizeof(T));
    __syncwarp();
    T r;
    memcpy(&r, &emu_exchange[warp][lane ^ lane_mask], sizeof(T));
    __syncwarp();
    return r;
}
template <typename T> T __shfl_sync(unsigned, T v, int src_lane) {
    unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    memcpy(&emu_exchange[warp][lane], &v, sizeof(T));
    __syncwarp();
    T r;
    memcpy(&r, &emu_exchange[warp][src_lane % 32], sizeof(T));
    __syncwarp();
    return r;
}
static inline unsigned __ballot_sync(unsigned, int pred) {
    unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    emu_exchange[warp][lane] = pred != 0;
    __syncwarp();
    unsigned mask = 0;
    for (int l = 0; l < 32; l++) mask |= (emu_exchange[warp][l] ? 1u : 0u) << l;
    __syncwarp();
    return mask;
}
extern char *emu_dynamic_smem;
void emu_launch(const char *name, const void *func, dim3 grid, dim3 block, size_t smem, std::function<void()> body);
/* Stream capture: while a capture is open, launches and cuBLAS calls are recorded (their arguments as
   they were at the call) instead of run, and a graph launch runs the record. A call a GPU cannot capture
   (a synchronous copy or memset, an allocation) aborts, so decode's graph is known to be capturable. */
int emu_capture(std::function<void()> work);      /* 1: recorded into the open capture, 0: none open */
void emu_not_capturing(const char *call);

/* ---- runtime API ---- */
typedef int cudaError_t;
enum { cudaSuccess = 0, cudaErrorMemoryAllocation = 2 };
enum cudaMemcpyKind { cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice };
enum { cudaFuncAttributeMaxDynamicSharedMemorySize, cudaDevAttrMaxSharedMemoryPerBlockOptin, cudaDevAttrComputeCapabilityMajor };
enum { EMU_SMEM_OPTIN = 227 * 1024 };     /* an H100's opt-in shared memory per block */
static inline const char *cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }
static inline cudaError_t cudaGetLastError() { return cudaSuccess; }
cudaError_t cudaMalloc(void **p, size_t bytes);
static inline cudaError_t cudaFree(void *p) { emu_not_capturing("cudaFree"); free(p); return cudaSuccess; }
extern const int emu_launch_log;          /* EMU_LAUNCH_LOG set: every launch, copy and memset named on stderr */
static inline cudaError_t cudaMemcpy(void *d, const void *s, size_t n, cudaMemcpyKind) {
    emu_not_capturing("cudaMemcpy");
    if (emu_launch_log) fprintf(stderr, "launch cudaMemcpy %zu bytes\n", n);
    memmove(d, s, n);
    return cudaSuccess;
}
static inline cudaError_t cudaMemset(void *d, int v, size_t n) {
    emu_not_capturing("cudaMemset");
    if (emu_launch_log) fprintf(stderr, "launch cudaMemset %zu bytes\n", n);
    memset(d, v, n);
    return cudaSuccess;
}
typedef struct emu_stream *cudaStream_t;
#define cudaStreamPerThread ((cudaStream_t)0x2)
enum cudaStreamCaptureMode { cudaStreamCaptureModeGlobal, cudaStreamCaptureModeThreadLocal, cudaStreamCaptureModeRelaxed };
struct EmuGraph;
typedef EmuGraph *cudaGraph_t;
typedef EmuGraph *cudaGraphExec_t;
cudaError_t cudaStreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode mode);
cudaError_t cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t *graph);
cudaError_t cudaGraphInstantiate(cudaGraphExec_t *exec, cudaGraph_t graph, unsigned long long flags);
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t stream);
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec);
cudaError_t cudaGraphDestroy(cudaGraph_t graph);
/* cudaLaunchKernelEx: launch.py rewrites each call into emu_launch_config. Blocks and kernels run one
   after another here, so a programmatic dependent launch (its attribute) changes nothing. */
enum cudaLaunchAttributeID { cudaLaunchAttributeProgrammaticStreamSerialization = 6 };
union cudaLaunchAttributeValue { int programmaticStreamSerializationAllowed; };
struct cudaLaunchAttribute { cudaLaunchAttributeID id; cudaLaunchAttributeValue val; };
struct cudaLaunchConfig_t {
    dim3 gridDim, blockDim;
    size_t dynamicSmemBytes;
    cudaStream_t stream;
    cudaLaunchAttribute *attrs;
    unsigned numAttrs;
};
static inline cudaError_t emu_launch_config(const char *name, const void *func, const cudaLaunchConfig_t &config,
                                            std::function<void()> body) {
    emu_launch(name, func, config.gridDim, config.blockDim, config.dynamicSmemBytes, body);
    return cudaSuccess;
}
/* events hold the host's clock when recorded (kernels run at their launch here), so dev/'s benchmarks run
   through the emulation as a check that they work; their times are the emulation's, not a GPU's */
struct emu_event { double seconds; };
typedef emu_event *cudaEvent_t;
static inline cudaError_t cudaEventCreate(cudaEvent_t *e) {
    *e = (cudaEvent_t)calloc(1, sizeof(emu_event));
    return *e ? cudaSuccess : cudaErrorMemoryAllocation;
}
static inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t = 0) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    e->seconds = ts.tv_sec + 1e-9 * ts.tv_nsec;
    return cudaSuccess;
}
static inline cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
static inline cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t stop) {
    *ms = (float)(1e3 * (stop->seconds - start->seconds));
    return cudaSuccess;
}
struct cudaDeviceProp { char name[256]; };
static inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int) {
    snprintf(p->name, sizeof p->name, "the CPU emulation (dev/cuda_emu)");
    return cudaSuccess;
}
static inline cudaError_t cudaGetDevice(int *d) { *d = 0; return cudaSuccess; }
static inline cudaError_t cudaDeviceGetAttribute(int *v, int attr, int) {       /* an H100's */
    *v = attr == cudaDevAttrComputeCapabilityMajor ? 9 : EMU_SMEM_OPTIN;
    return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void *, int, int value);
