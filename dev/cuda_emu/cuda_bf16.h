/* dev/cuda_emu/cuda_bf16.h - the part of CUDA's bf16 header mhc_cuda.cuh uses (see cuda_runtime.h).
   A bf16 is the top 16 bits of an fp32: sign, 8-bit exponent, 7 stored mantissa bits. */
#pragma once
#include <stdint.h>
#include <string.h>

struct __nv_bfloat16 { uint16_t bits; };

/* round to nearest, ties to even, like CUDA's __float2bfloat16: add 0x7FFF plus the lowest kept bit, then
   truncate (a carry out of the mantissa bumps the exponent; past the largest finite value that gives inf).
   A NaN becomes the canonical bf16 NaN 0x7FFF (rounding could otherwise carry it into inf). */
static inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    __nv_bfloat16 h;
    if ((u & 0x7fffffffu) > 0x7f800000u) h.bits = 0x7fffu;
    else h.bits = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return h;
}

/* exact: the 16 bits become the top half of an fp32 */
static inline float __bfloat162float(__nv_bfloat16 h) {
    uint32_t u = (uint32_t)h.bits << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* the 16 bits as they are */
static inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }
