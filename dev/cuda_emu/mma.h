/* dev/cuda_emu/mma.h - the warp matrix (WMMA) calls mhc_cuda.cuh makes: TF32 m16n16k8 fragments with
   fp32 accumulators (see cuda_runtime.h).

   On a GPU a fragment is spread over the 32 lanes of a warp in an unspecified layout. Here every lane
   holds the whole tile, and every lane does the whole load, multiply and store (a store writes the
   same values 32 times). Each call is a warp barrier on entry and exit, as the real collective is: no
   lane stores before every lane has loaded (an accumulator read-modify-write stays one update). That is the same result for code that touches fragments only through
   fill_fragment, load_matrix_sync, mma_sync, store_matrix_sync and a loop over all of x[] (the
   documented __float_to_tf32 conversion). The hardware's alignment rules are checked: pointers
   32-byte aligned, ldm a multiple of 4 floats. The products are summed in k order in fp32. */
#pragma once
#include <type_traits>
#include "cuda_runtime.h"

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision { struct tf32 {}; }
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K> struct emu_shape { enum { rows = M, cols = K }; };
template <int M, int N, int K> struct emu_shape<matrix_b, M, N, K> { enum { rows = K, cols = N }; };
template <int M, int N, int K> struct emu_shape<accumulator, M, N, K> { enum { rows = M, cols = N }; };

template <typename Use, int M, int N, int K, typename T, typename Layout = void> struct fragment {
    enum { rows = emu_shape<Use, M, N, K>::rows, cols = emu_shape<Use, M, N, K>::cols, num_elements = rows * cols };
    float x[num_elements];                /* row-major rows x cols, the whole tile in every lane */
};

static inline void emu_check_access(const void *p, unsigned ldm) {
    if ((uintptr_t)p % 32 || ldm % 4) {
        fprintf(stderr, "cuda_emu: wmma access at %p with ldm %u (needs 32-byte alignment, ldm a multiple of 4)\n", p, ldm);
        abort();
    }
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout> &f, float v) {
    for (int i = 0; i < f.num_elements; i++) f.x[i] = v;
}

/* matrix_a / matrix_b: the layout is the fragment's (row_major: element (r, c) at p[r * ldm + c]) */
template <typename Use, int M, int N, int K, typename T, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout> &f, const float *p, unsigned ldm) {
    emu_check_access(p, ldm);
    __syncwarp();
    const int R = f.rows, C = f.cols, col = std::is_same<Layout, col_major>::value;
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) f.x[r * C + c] = col ? p[(size_t)c * ldm + r] : p[(size_t)r * ldm + c];
    __syncwarp();
}

/* accumulator: the layout is given with the call */
template <int M, int N, int K>
void load_matrix_sync(fragment<accumulator, M, N, K, float> &f, const float *p, unsigned ldm, layout_t layout) {
    emu_check_access(p, ldm);
    __syncwarp();
    for (int r = 0; r < M; r++)
        for (int c = 0; c < N; c++) f.x[r * N + c] = layout == mem_row_major ? p[(size_t)r * ldm + c] : p[(size_t)c * ldm + r];
    __syncwarp();
}

template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float> &d, const fragment<matrix_a, M, N, K, TA, LA> &a,
              const fragment<matrix_b, M, N, K, TB, LB> &b, const fragment<accumulator, M, N, K, float> &c) {
    float out[M * N];
    __syncwarp();
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            float acc = c.x[i * N + j];
            for (int k = 0; k < K; k++) acc += a.x[i * K + k] * b.x[k * N + j];
            out[i * N + j] = acc;
        }
    memcpy(d.x, out, sizeof out);
    __syncwarp();
}

template <int M, int N, int K>
void store_matrix_sync(float *p, const fragment<accumulator, M, N, K, float> &f, unsigned ldm, layout_t layout) {
    emu_check_access(p, ldm);
    __syncwarp();
    for (int r = 0; r < M; r++)
        for (int c = 0; c < N; c++) {
            if (layout == mem_row_major) p[(size_t)r * ldm + c] = f.x[r * N + c];
            else p[(size_t)c * ldm + r] = f.x[r * N + c];
        }
    __syncwarp();
}

/* round to TF32 (10 mantissa bits), nearest with ties away from zero like cvt.rna.tf32.f32 */
static inline float __float_to_tf32(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
    memcpy(&x, &u, 4);
    return x;
}
}  // namespace wmma
}  // namespace nvcuda
