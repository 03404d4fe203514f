/* npulm CPU matmul kernels over GGUF blocks read in place. Plain C, no Python: the extension module wraps it. */
#ifndef NPULM_KERNELS_H
#define NPULM_KERNELS_H

#include <stdint.h>
#include <string.h>

/* GGML type ids (gguf.constants.GGMLQuantizationType) */
enum {
    NL_F32 = 0, NL_F16 = 1, NL_Q4_0 = 2, NL_Q4_1 = 3, NL_Q5_0 = 6, NL_Q5_1 = 7, NL_Q8_0 = 8,
    NL_Q4_K = 12, NL_Q5_K = 13, NL_Q6_K = 14,
};

/* Which algorithm nl_matmul uses; AUTO picks by M. */
enum { NL_PATH_AUTO = 0, NL_PATH_ROWS = 1, NL_PATH_GEMM = 2, NL_PATH_PACKED = 3 };

typedef struct {
    const uint8_t *data; /* n rows of row_bytes, GGUF block layout */
    int type;
    int64_t n, k, row_bytes;
    /* 1: each activation row goes in as two int8 rows, x's blocks and their quantization residual, and the two
     * products are summed: ~16-bit activations for twice the integer work (no effect on F16 weights) */
    int act16;
    /* NULL, or the rows repacked by nl_pack (64-byte aligned, nl_packed_bytes long): then AUTO uses them for every M */
    const uint8_t *packed;
} nl_mat;

/* float16 bits -> float without F16C / fp16 hardware (subnormals, inf and nan kept); used by kernels.c and ops.c */
static inline float nl_h2f_soft(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 31, man = h & 1023, bits;
    if (exp == 0) {
        if (man == 0) bits = sign;
        else {  /* subnormal: normalize */
            int e = -1;
            do { man <<= 1; e++; } while (!(man & 1024));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 1023) << 13);
        }
    } else if (exp == 31) bits = sign | 0x7f800000u | (man << 13);
    else bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Bytes of one row of k values, or -1 if the type is unsupported or k does not fit its blocks. */
int64_t nl_row_bytes(int type, int64_t k);
/* 1 if nl_matmul handles this type. */
int nl_type_supported(int type);
/* 1 if the packed integer GEMM (fast prefill) exists for this type on this build. */
int nl_gemm_available(int type);

/* 1 if this build has the packed small-M kernel for the type; bytes nl_pack writes for an n x k weight, or -1 */
int nl_pack_available(int type);
/* 1 if QuantLinear repacks the type unless told: every type on x86 (compute-bound there: the packed kernel measured
 * faster at every M); on NEON only types whose repacked rows are no larger than the GGUF's (Q4_0, Q4_1, Q8_0), as the
 * boards' decode is bound by memory bandwidth (not yet measured on a board) */
int nl_pack_default(int type);
int64_t nl_packed_bytes(int type, int64_t n, int64_t k);
/* Repack W's rows into out (nl_packed_bytes, 64-byte aligned); 0, or -1. Set w->packed = out to use it.
 * drop_source: W's rows are a read-only file mapping whose pages may be dropped as they are packed (not for
 * anonymous memory: dropping would zero it). */
int nl_pack(const nl_mat *w, uint8_t *out, int drop_source);

/* y (m, n) = x (m, k) @ W.T; x and y C-contiguous float32. Returns 0, or -1 on a bad argument / no memory. */
int nl_matmul(const nl_mat *w, const float *x, int64_t m, float *y, int path);
/* out (r1 - r0, k) float32 = rows r0..r1 of W, dequantized. Returns 0 or -1. */
int nl_dequant(const nl_mat *w, int64_t r0, int64_t r1, float *out);

/* Run fn(ctx, task, tid) for every task in [0, ntasks) on the matmul thread pool (tid < nl_get_threads()). */
void nl_parallel(void (*fn)(void *ctx, int64_t task, int tid), void *ctx, int64_t ntasks);

void nl_set_threads(int n);
int nl_get_threads(void);
/* Workers poll for new work this long after a job before sleeping (microseconds). */
void nl_set_spin_us(int us);
int nl_get_spin_us(void);
/* Smallest M that takes the packed GEMM under NL_PATH_AUTO. */
void nl_set_gemm_min_m(int m);
int nl_get_gemm_min_m(void);
/* Instruction set the kernels were compiled for, e.g. "avx512-vnni", "neon-dotprod", "scalar". */
const char *nl_isa(void);

#endif
