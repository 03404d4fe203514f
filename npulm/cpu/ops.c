/* Fused small ops of the transformer block for npulm.models.blocks (float32, C-contiguous).
 *
 * Why: a decode step of a small model calls ~60 numpy ops per layer (norms, RoPE, softmax, activations), each
 * 1-3 us of dispatch and temporaries: several ms per token, as much as the matmuls of a 135M model. One call per
 * op here does the same math in one pass. Buffers come through the buffer protocol (no numpy headers needed);
 * the Python side (npulm/models/blocks.py) passes shapes and keeps a numpy path for when this is not built.
 * The KV cache is float16, as llama.cpp's default cache type. Built into npulm.cpu._kernels (module.c adds these
 * functions) so that decode attention runs on the matmul thread pool instead of a second pool fighting for cores.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include "kernels.h"
#include <string.h>
#if defined(__F16C__)
#include <immintrin.h>
#endif

static int check(Py_buffer *b, Py_ssize_t n_floats, const char *what) {
    if (b->len != n_floats * (Py_ssize_t)sizeof(float)) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd float32 values, got %zd bytes", what, n_floats, b->len);
        return 0;
    }
    return 1;
}

/* rms_norm(x, w, out, rows, dim, eps): out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w (out may alias x) */
static PyObject *rms_norm(PyObject *self, PyObject *args) {
    Py_buffer x, w, out;
    Py_ssize_t rows, dim;
    float eps;
    if (!PyArg_ParseTuple(args, "y*y*w*nnf", &x, &w, &out, &rows, &dim, &eps)) return NULL;
    PyObject *ret = NULL;
    if (check(&x, rows * dim, "x") && check(&w, dim, "w") && check(&out, rows * dim, "out")) {
        const float *xp = x.buf, *wp = w.buf;
        float *op = out.buf;
        for (Py_ssize_t r = 0; r < rows; r++) {
            const float *xr = xp + r * dim;
            float *orow = op + r * dim;
            float ss = 0.0f;
            for (Py_ssize_t i = 0; i < dim; i++) ss += xr[i] * xr[i];
            const float scale = 1.0f / sqrtf(ss / (float)dim + eps);
            for (Py_ssize_t i = 0; i < dim; i++) orow[i] = xr[i] * scale * wp[i];
        }
        ret = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&x); PyBuffer_Release(&w); PyBuffer_Release(&out);
    return ret;
}

/* noinline: the fused attention_seqs and rope() run the same code, so the same roundings */
__attribute__((noinline)) static void rope_rows(float *xp, const float *cos, const float *sin, Py_ssize_t rows, Py_ssize_t heads, Py_ssize_t hd,
                      Py_ssize_t half, Py_ssize_t pos, int neox) {
    for (Py_ssize_t r = 0; r < rows; r++) {
        const float *cr = cos + (pos + r) * half, *sr = sin + (pos + r) * half;
        for (Py_ssize_t h = 0; h < heads; h++) {
            float *v = xp + (r * heads + h) * hd;
            for (Py_ssize_t i = 0; i < half; i++) {
                float *a = neox ? v + i : v + 2 * i, *b = neox ? v + i + half : v + 2 * i + 1;
                const float a0 = *a, b0 = *b;
                *a = a0 * cr[i] - b0 * sr[i];
                *b = a0 * sr[i] + b0 * cr[i];
            }
        }
    }
}

/* rope(x, cos, sin, rows, heads, head_dim, n_rot, pos, neox): rotate x (rows, heads, head_dim) in place;
 * cos/sin are (n_ctx, n_rot/2) tables, row r has position pos + r. neox: pairs (i, i + n_rot/2), else (2i, 2i+1). */
static PyObject *rope(PyObject *self, PyObject *args) {
    Py_buffer x, c, s;
    Py_ssize_t rows, heads, hd, n_rot, pos;
    int neox;
    if (!PyArg_ParseTuple(args, "w*y*y*nnnnnp", &x, &c, &s, &rows, &heads, &hd, &n_rot, &pos, &neox)) return NULL;
    PyObject *ret = NULL;
    const Py_ssize_t half = n_rot / 2, n_pos = c.len / (Py_ssize_t)sizeof(float) / (half ? half : 1);
    if (check(&x, rows * heads * hd, "x") && check(&s, n_pos * half, "sin")) {
        if (n_rot > hd || pos < 0 || pos + rows > n_pos) {
            PyErr_SetString(PyExc_ValueError, "rope: n_rot or positions out of range");
        } else {
            rope_rows(x.buf, c.buf, s.buf, rows, heads, hd, half, pos, neox);
            ret = Py_NewRef(Py_None);
        }
    }
    PyBuffer_Release(&x); PyBuffer_Release(&c); PyBuffer_Release(&s);
    return ret;
}

/* float16 -> float32 for a row of cached keys or values: F16C / aarch64 hardware where present, else bit math */
static inline void half_row(const uint16_t *h, float *f, Py_ssize_t n) {
    Py_ssize_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
#elif defined(__aarch64__)
    for (; i < n; i++) f[i] = (float)((const __fp16 *)h)[i];
#endif
    for (; i < n; i++) f[i] = nl_h2f_soft(h[i]);
}

/* exp(x) for x <= 0 (softmax after subtracting the max), in plain float / int steps the compiler vectorizes:
 * x = n ln2 + f with |f| <= ln2/2, exp(f) by its degree-6 Taylor polynomial (relative error < 3e-7), 2^n built
 * in the exponent bits. glibc's expf is a scalar call (~10 ns): at a 2000-token context a SmolLM2 token spends
 * ~3 ms in it. Below -87 the result is flushed to 0. */
static inline float exp_neg(float x) {
    const float t = x * 1.44269504088896341f, r = t + 12582912.0f; /* 1.5 * 2^23: round to nearest */
    int32_t n;
    memcpy(&n, &r, 4);
    n -= 0x4B400000;
    const float nf = r - 12582912.0f;
    const float f = (x - nf * 0.693145751953125f) - nf * 1.428606765330187e-06f; /* ln2 split in two parts */
    const float p = 1.0f + f * (1.0f + f * (0.5f + f * (1.6666667e-1f + f * (4.1666668e-2f
                      + f * (8.3333338e-3f + f * 1.3888889e-3f)))));
    const int32_t bits = (n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return x < -87.0f ? 0.0f : p * scale;
}

/* sum of x[0..n) with 16 partial sums (vectorizable, like dot) */
static inline float sum16(const float *x, Py_ssize_t n) {
    float acc[16] = {0};
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += x[i + j];
    float s = 0.0f;
    for (int j = 0; j < 16; j++) s += acc[j];
    for (; i < n; i++) s += x[i];
    return s;
}

/* a . b with independent partial sums: the compiler turns them into SIMD FMAs (one strict left-to-right sum cannot
 * be vectorized without -ffast-math). 8 sums measured faster for 64-wide heads (SmolLM2: 356 -> 243 us a layer at a
 * 2000-token context, 1 thread), 16 for 256-wide ones (Gemma-3: 282 us with 16, 960 with 8). */
/* the partial sums of dot(): 8 as a tree, 16 in order (dot_keys adds its partials the same way) */
static inline float sum_partials(const float *acc, int n) {
    if (n == 8) return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    float s = 0.0f;
    for (int j = 0; j < n; j++) s += acc[j];
    return s;
}

static inline float dot(const float *a, const float *b, Py_ssize_t n) {
    Py_ssize_t i = 0;
    float s;
    if (n < 128) {
        float acc[8] = {0};
        for (; i + 8 <= n; i += 8)
            for (int j = 0; j < 8; j++) acc[j] += a[i + j] * b[i + j];
        s = sum_partials(acc, 8);
    } else {
        float acc[16] = {0};
        for (; i + 16 <= n; i += 16)
            for (int j = 0; j < 16; j++) acc[j] += a[i + j] * b[i + j];
        s = sum_partials(acc, 16);
    }
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* Decode attention, split like flash-decoding: a task is (a block of query rows, kv head j, slice s of the visible
 * keys). It converts each cached row once for the kv head's `group` query heads (and the block's rows) and leaves,
 * per row and query head, the slice's score max m, its sum l of exp(score - m) and o = sum exp(score - m) v; the
 * caller merges the slices. Slices keep the cores busy on long contexts, where attention is most of a token. */
typedef struct {
    const float *q;
    const uint16_t *kc, *vc;
    float *part;    /* per row, kv head, slice: group x (2 + dv): m, l, o */
    float *scratch; /* per thread: rblock x group x span scores, then ATTN_KEYS converted cache rows */
    Py_ssize_t nh, nkv, group, dk, dv, n_ctx, pos, window, nsplit, span, stride, rows, rblock, threads;
    float scale;
} attention_job;
#define ATTN_MAX_RBLOCK 16 /* query rows a task may take */

static Py_ssize_t first_key(const attention_job *c, Py_ssize_t qp) {
    return c->window > 0 && qp - c->window + 1 > 0 ? qp - c->window + 1 : 0;
}

#define ATTN_KEYS 8 /* keys a block: their dot products run as independent chains (one chain is FMA-latency bound) */
typedef float v8f __attribute__((vector_size(32))); /* GCC vectors: AVX / NEON registers, FMAs by -ffp-contract */
typedef float v16f __attribute__((vector_size(64)));
static inline v8f load8(const float *p) { v8f v; memcpy(&v, p, sizeof v); return v; }
static inline v16f load16(const float *p) { v16f v; memcpy(&v, p, sizeof v); return v; }

/* sum_partials(acc[u], 8) for the 8 keys u of a block at once, lane u of the result: the same tree of additions
 * ((a0 + a4) + (a1 + a5)) + ((a2 + a6) + (a3 + a7)) per key, done by shuffles across keys instead of lane by lane */
static inline v8f sum_partials8x8(const v8f acc[ATTN_KEYS]) {
    v8f b[4], c[2];
    for (int u = 0; u < 4; u++) /* b: a_j + a_(j+4) of keys 2u, 2u+1 */
        b[u] = __builtin_shufflevector(acc[2 * u], acc[2 * u + 1], 0, 1, 2, 3, 8, 9, 10, 11)
             + __builtin_shufflevector(acc[2 * u], acc[2 * u + 1], 4, 5, 6, 7, 12, 13, 14, 15);
    for (int u = 0; u < 2; u++) /* c: (b0 + b1), (b2 + b3) of keys 4u .. 4u+3 */
        c[u] = __builtin_shufflevector(b[2 * u], b[2 * u + 1], 0, 2, 4, 6, 8, 10, 12, 14)
             + __builtin_shufflevector(b[2 * u], b[2 * u + 1], 1, 3, 5, 7, 9, 11, 13, 15);
    return __builtin_shufflevector(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14)
         + __builtin_shufflevector(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15);
}

/* sc[u] = q . rows[u] * scale for the n <= ATTN_KEYS rows (stride d) of a block, each summed as dot() sums it */
static inline void dot_keys(const float *q, const float *rows, Py_ssize_t d, int n, float *sc, float scale) {
    if (n < ATTN_KEYS || d % 16) {
        for (int u = 0; u < n; u++) sc[u] = dot(q, rows + u * d, d) * scale;
        return;
    }
    if (d < 128) {
        v8f acc[ATTN_KEYS] = {0};
        for (Py_ssize_t i = 0; i < d; i += 8) {
            const v8f qv = load8(q + i);
            for (int u = 0; u < ATTN_KEYS; u++) acc[u] += qv * load8(rows + u * d + i);
        }
        const v8f s = sum_partials8x8(acc) * scale;
        memcpy(sc, &s, sizeof s);
    } else {
        v16f acc[ATTN_KEYS] = {0};
        for (Py_ssize_t i = 0; i < d; i += 16) {
            const v16f qv = load16(q + i);
            for (int u = 0; u < ATTN_KEYS; u++) acc[u] += qv * load16(rows + u * d + i);
        }
        for (int u = 0; u < ATTN_KEYS; u++) {
            float a[16];
            memcpy(a, &acc[u], sizeof a);
            sc[u] = sum_partials(a, 16) * scale;
        }
    }
}

/* o += p[0] rows[0] + ... + p[n-1] rows[n-1] (stride d), added in that order as one row at a time */
static inline void axpy_keys(float *o, const float *p, const float *rows, Py_ssize_t d, int n) {
    Py_ssize_t i = 0;
    for (; i + 64 <= d; i += 64) { /* 8 independent sums over the keys (one sum's chain is add-latency bound) */
        v8f acc[8];
        for (int c = 0; c < 8; c++) acc[c] = load8(o + i + 8 * c);
        for (int u = 0; u < n; u++) {
            const float pu = p[u];
            for (int c = 0; c < 8; c++) acc[c] += pu * load8(rows + u * d + i + 8 * c);
        }
        memcpy(o + i, acc, sizeof acc);
    }
    for (; i + 8 <= d; i += 8) {
        v8f acc = load8(o + i);
        for (int u = 0; u < n; u++) acc += p[u] * load8(rows + u * d + i);
        memcpy(o + i, &acc, sizeof acc);
    }
    for (; i < d; i++)
        for (int u = 0; u < n; u++) o[i] += p[u] * rows[u * d + i];
}

/* max of x[0..n), 8 running maxima (one chain is latency bound; a max does not depend on the order) */
static inline float max_of(const float *x, Py_ssize_t n) {
    float m8[8] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    Py_ssize_t t = 0;
    for (; t + 8 <= n; t += 8)
        for (int u = 0; u < 8; u++) m8[u] = x[t + u] > m8[u] ? x[t + u] : m8[u];
    float mx = -INFINITY;
    for (int u = 0; u < 8; u++) mx = m8[u] > mx ? m8[u] : mx;
    for (; t < n; t++) mx = x[t] > mx ? x[t] : mx;
    return mx;
}

#define ATTN_MIN_SLICE 256 /* keys per slice below which splitting costs more than it saves */
#define ATTN_SLICE_ROUND 64 /* slice lengths rounded up to this: neighbouring rows get the same slice boundaries */

/* Keys [a, b) of slice s of the row at position qp (empty when a >= b). A function of the row alone: its slices
 * are as many as threads while each keeps ATTN_MIN_SLICE keys, so a row gives the same bits alone or batched. */
static void row_slice(const attention_job *c, Py_ssize_t qp, Py_ssize_t s, Py_ssize_t *a, Py_ssize_t *b) {
    const Py_ssize_t lo = first_key(c, qp), keys = qp + 1 - lo;
    Py_ssize_t n = keys / ATTN_MIN_SLICE < c->threads ? keys / ATTN_MIN_SLICE : c->threads;
    n = n < 1 ? 1 : n;
    const Py_ssize_t per = ((keys + n - 1) / n + ATTN_SLICE_ROUND - 1) / ATTN_SLICE_ROUND * ATTN_SLICE_ROUND;
    *a = s < n ? lo + s * per : qp + 1;
    *b = *a + per < qp + 1 ? *a + per : qp + 1;
    if (*a > *b) *a = *b;
}

/* A task: kv head j, slice s, query rows r0 .. r1. Rows whose slice starts at the same key share its key blocks:
 * each cached block is converted once for all of them, and each row runs the blocks it sees exactly as alone. */
static void attention_task(void *ctx, int64_t task, int tid) {
    const attention_job *c = ctx;
    const Py_ssize_t s = task % c->nsplit, j = task / c->nsplit % c->nkv, rb = task / (c->nsplit * c->nkv);
    const Py_ssize_t dk = c->dk, dv = c->dv, group = c->group, span = c->span;
    const Py_ssize_t r0 = rb * c->rblock, r1 = r0 + c->rblock < c->rows ? r0 + c->rblock : c->rows, nr = r1 - r0;
    Py_ssize_t a[ATTN_MAX_RBLOCK], b[ATTN_MAX_RBLOCK];
    for (Py_ssize_t i = 0; i < nr; i++) row_slice(c, c->pos + r0 + i, s, &a[i], &b[i]);
    float *sc = c->scratch + tid * c->stride, *rows = sc + nr * group * span; /* rows: ATTN_KEYS converted rows */
    const uint16_t *kb = c->kc + j * c->n_ctx * dk, *vb = c->vc + j * c->n_ctx * dv;
    for (Py_ssize_t i0 = 0, i1; i0 < nr; i0 = i1) { /* runs of rows i0 .. i1 with one first key a0 */
        const Py_ssize_t a0 = a[i0];
        Py_ssize_t bmax = b[i0];
        for (i1 = i0 + 1; i1 < nr && a[i1] == a0; i1++) bmax = b[i1] > bmax ? b[i1] : bmax;
        for (Py_ssize_t t = a0; t < bmax; t += ATTN_KEYS) {
            half_row(kb + t * dk, rows, (bmax - t < ATTN_KEYS ? bmax - t : ATTN_KEYS) * dk);
            for (Py_ssize_t i = i0; i < i1; i++) {
                const Py_ssize_t n = b[i] - t < ATTN_KEYS ? b[i] - t : ATTN_KEYS;
                const float *qi = c->q + ((r0 + i) * c->nh + j * group) * dk;
                for (Py_ssize_t g = 0; n > 0 && g < group; g++)
                    dot_keys(qi + g * dk, rows, dk, (int)n, sc + (i * group + g) * span + t - a0, c->scale);
            }
        }
        for (Py_ssize_t i = i0; i < i1; i++) {
            float *part = c->part + (((r0 + i) * c->nkv + j) * c->nsplit + s) * group * (2 + dv);
            for (Py_ssize_t g = 0; g < group; g++) {
                float *sg = sc + (i * group + g) * span, *pg = part + g * (2 + dv);
                const Py_ssize_t n = b[i] - a0;
                const float mx = max_of(sg, n); /* a local: pg might alias sg for all the compiler knows (no SIMD) */
                for (Py_ssize_t t = 0; t < n; t++) sg[t] = exp_neg(sg[t] - mx);
                pg[0] = mx; /* an empty slice: -inf, 0 and zeros, which the merge weighs 0 */
                pg[1] = sum16(sg, n);
                memset(pg + 2, 0, sizeof(float) * (size_t)dv);
            }
        }
        for (Py_ssize_t t = a0; t < bmax; t += ATTN_KEYS) { /* o += p v over a block of keys, in key order */
            half_row(vb + t * dv, rows, (bmax - t < ATTN_KEYS ? bmax - t : ATTN_KEYS) * dv);
            for (Py_ssize_t i = i0; i < i1; i++) {
                const Py_ssize_t n = b[i] - t < ATTN_KEYS ? b[i] - t : ATTN_KEYS;
                float *part = c->part + (((r0 + i) * c->nkv + j) * c->nsplit + s) * group * (2 + dv);
                for (Py_ssize_t g = 0; n > 0 && g < group; g++)
                    axpy_keys(part + g * (2 + dv) + 2, sc + (i * group + g) * span + t - a0, rows, dv, (int)n);
            }
        }
    }
}

/* A job's task grid (row blocks x kv heads x slices: as many slices as its rows need at most, a row's unused ones
 * empty), its span and per-thread scratch; returns its task count. Rows go in blocks (sharing key conversions)
 * sized for about two tasks a thread. */
static Py_ssize_t attention_plan(attention_job *c, Py_ssize_t rows, int threads) {
    c->threads = threads;
    c->rows = rows;
    c->nsplit = 1;
    c->span = 1;
    for (Py_ssize_t r = 0; r < rows; r++)
        for (Py_ssize_t s = 0, a, b; s < threads; s++) {
            row_slice(c, c->pos + r, s, &a, &b);
            if (b > a && s + 1 > c->nsplit) c->nsplit = s + 1;
            c->span = b - a > c->span ? b - a : c->span;
        }
    Py_ssize_t nblocks = (2 * threads + c->nkv * c->nsplit - 1) / (c->nkv * c->nsplit);
    nblocks = nblocks > rows ? rows : nblocks < 1 ? 1 : nblocks;
    if ((rows + nblocks - 1) / nblocks > ATTN_MAX_RBLOCK) nblocks = (rows + ATTN_MAX_RBLOCK - 1) / ATTN_MAX_RBLOCK;
    c->rblock = (rows + nblocks - 1) / nblocks;
    nblocks = (rows + c->rblock - 1) / c->rblock;
    c->stride = c->rblock * c->group * c->span + ATTN_KEYS * (c->dk > c->dv ? c->dk : c->dv);
    return nblocks * c->nkv * c->nsplit;
}

static attention_job new_job(const float *q, const uint16_t *kc, const uint16_t *vc, Py_ssize_t nh, Py_ssize_t nkv,
                             Py_ssize_t dk, Py_ssize_t dv, Py_ssize_t n_ctx, Py_ssize_t pos, Py_ssize_t window,
                             float scale) {
    return (attention_job){.q = q, .kc = kc, .vc = vc, .nh = nh, .nkv = nkv, .group = nh / nkv, .dk = dk, .dv = dv,
                           .n_ctx = n_ctx, .pos = pos, .window = window, .nsplit = 1, .rows = 1, .rblock = 1,
                           .scale = scale};
}

/* floats of a planned job's slice results: (m, l, o) per row, query head and slice */
static Py_ssize_t part_floats(const attention_job *c) { return c->rows * c->nh * c->nsplit * (2 + c->dv); }

/* out (rows, n_head * dv) from the slices' (m, l, o) of each query head */
__attribute__((noinline)) static void attention_merge(const attention_job *c, Py_ssize_t rows, float *out) {
    const Py_ssize_t nh = c->nh, nkv = c->nkv, dv = c->dv;
    for (Py_ssize_t r = 0; r < rows; r++)
        for (Py_ssize_t h = 0; h < nh; h++) {
            const Py_ssize_t j = h / c->group, g = h % c->group;
            const float *p0 = c->part + ((r * nkv + j) * c->nsplit * c->group + g) * (2 + dv);
            const Py_ssize_t step = c->group * (2 + dv); /* next slice, same head */
            float mx = -INFINITY, sum = 0.0f;
            for (Py_ssize_t s = 0; s < c->nsplit; s++) mx = p0[s * step] > mx ? p0[s * step] : mx;
            float *o = out + (r * nh + h) * dv;
            memset(o, 0, sizeof(float) * (size_t)dv);
            for (Py_ssize_t s = 0; s < c->nsplit; s++) {
                const float *ps = p0 + s * step, w = ps[1] > 0 ? expf(ps[0] - mx) : 0.0f;
                sum += w * ps[1];
                for (Py_ssize_t i = 0; i < dv; i++) o[i] += w * ps[2 + i];
            }
            for (Py_ssize_t i = 0; i < dv; i++) o[i] /= sum;
        }
}

/* attention(q, k_cache, v_cache, out, rows, n_head, n_kv, dk, dv, n_ctx, pos, scale, window):
 * causal grouped-query attention of `rows` float32 queries at positions pos.. against float16 caches
 * (n_kv, n_ctx, d) already holding their keys; query head h reads kv head h / (n_head / n_kv); window > 0 hides
 * keys with q_pos - k_pos >= window. out: (rows, n_head * dv) float32. Meant for decode (small rows). */
static PyObject *attention(PyObject *self, PyObject *args) {
    Py_buffer q, kc, vc, out;
    Py_ssize_t rows, nh, nkv, dk, dv, n_ctx, pos, window;
    float scale;
    if (!PyArg_ParseTuple(args, "y*y*y*w*nnnnnnnfn", &q, &kc, &vc, &out, &rows, &nh, &nkv, &dk, &dv, &n_ctx, &pos,
                          &scale, &window)) return NULL;
    PyObject *ret = NULL;
    float *buf = NULL;
    if (check(&q, rows * nh * dk, "q") && check(&out, rows * nh * dv, "out")) {
        if (kc.len != nkv * n_ctx * dk * 2 || vc.len != nkv * n_ctx * dv * 2) {
            PyErr_SetString(PyExc_ValueError, "attention: caches must be float16 (n_kv, n_ctx, d)");
        } else if (nkv <= 0 || nh % nkv || rows <= 0 || pos < 0 || pos + rows > n_ctx) {
            PyErr_SetString(PyExc_ValueError, "attention: bad head counts or positions");
        } else {
            const int threads = nl_get_threads();
            attention_job c = new_job(q.buf, kc.buf, vc.buf, nh, nkv, dk, dv, n_ctx, pos, window, scale);
            const Py_ssize_t ntasks = attention_plan(&c, rows, threads), part = part_floats(&c);
            if (!(buf = PyMem_Malloc(sizeof(float) * (size_t)(part + threads * c.stride)))) {
                PyErr_NoMemory();
            } else {
                c.part = buf;
                c.scratch = buf + part;
                nl_parallel(attention_task, &c, ntasks);
                attention_merge(&c, rows, out.buf);
                ret = Py_NewRef(Py_None);
            }
        }
    }
    PyMem_Free(buf);
    PyBuffer_Release(&q); PyBuffer_Release(&kc); PyBuffer_Release(&vc); PyBuffer_Release(&out);
    return ret;
}

/* act(x) * u with act(x) = x * sigmoid(z): SiLU z = x, GELU-tanh z = 2 c (x + 0.044715 x^3) since
 * 0.5 (1 + tanh z') = sigmoid(2 z'). sigmoid through exp_neg(-|z|) on either sign, so the loop vectorizes. */
static inline float gated_one(float x, float u, int gelu) {
    const float z = gelu ? 1.5957691216057308f * (x + 0.044715f * x * x * x) : x;
    const float e = exp_neg(-fabsf(z)), s = (z >= 0.0f ? 1.0f : e) / (1.0f + e);
    return x * s * u;
}

typedef struct {
    float *g;
    const float *u;
    Py_ssize_t n;
    int gelu;
} gated_job;

#define GATED_TASK 16384

static void gated_task(void *ctx, int64_t task, int tid) {
    (void)tid;
    gated_job *c = ctx;
    const Py_ssize_t a = task * GATED_TASK, b = a + GATED_TASK < c->n ? a + GATED_TASK : c->n;
    float *g = c->g;
    const float *u = c->u;
    if (c->gelu)
        for (Py_ssize_t i = a; i < b; i++) g[i] = gated_one(g[i], u[i], 1);
    else
        for (Py_ssize_t i = a; i < b; i++) g[i] = gated_one(g[i], u[i], 0);
}

/* gated(gate, up, n, kind): gate = act(gate) * up in place; kind 0 = SiLU, 1 = GELU (tanh approximation).
 * Prefill-sized arrays are split over the matmul thread pool. */
static PyObject *gated(PyObject *self, PyObject *args) {
    Py_buffer g, u;
    Py_ssize_t n;
    int kind;
    if (!PyArg_ParseTuple(args, "w*y*ni", &g, &u, &n, &kind)) return NULL;
    PyObject *ret = NULL;
    if (check(&g, n, "gate") && check(&u, n, "up")) {
        gated_job c = {g.buf, u.buf, n, kind == 1};
        const int64_t ntasks = (n + GATED_TASK - 1) / GATED_TASK;
        Py_BEGIN_ALLOW_THREADS
        if (ntasks > 1) nl_parallel(gated_task, &c, ntasks);
        else gated_task(&c, 0, 0);
        Py_END_ALLOW_THREADS
        ret = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&g); PyBuffer_Release(&u);
    return ret;
}

#if defined(__F16C__) || defined(__aarch64__)
/* float32 -> float16, rounded to nearest even as numpy's cast (the cache's append) */
static void f2h_row(const float *x, uint16_t *h, Py_ssize_t n) {
    Py_ssize_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(h + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) h[i] = _cvtss_sh(x[i], _MM_FROUND_TO_NEAREST_INT);
#else
    for (; i < n; i++) {
        const __fp16 v = (__fp16)x[i];
        memcpy(h + i, &v, 2);
    }
#endif
}

typedef struct {
    attention_job *jobs;
    Py_ssize_t *first; /* first task of each job, and the total at [n] */
    Py_ssize_t n;
} seqs_job;

static void seqs_task(void *ctx, int64_t task, int tid) {
    const seqs_job *c = ctx;
    Py_ssize_t j = 0;
    while (c->first[j + 1] <= task) j++;
    attention_task(&c->jobs[j], task - c->first[j], tid);
}

/* attention_seqs(q, k, v, out, k_caches, v_caches, positions, counts, cos, sin, n_rot, neox, n_head, n_kv, dk, dv,
 * scale, window): a batched decode step's attention in one call. Rows counts[j] of q (M, n_head, dk), k (M, n_kv, dk)
 * and v (M, n_kv, dv) belong to sequence j, whose float16 caches (n_kv, n_ctx, d) hold positions[j] tokens: RoPE at
 * its positions (q and k in place, as rope()), k and v written after its tokens, then attention() of its rows; the
 * tasks of all sequences in one parallel run. The caller advances the caches' offsets. Per sequence the same code
 * and roundings as rope(), the cache's append and attention(): the same bits as one call per sequence. */
static PyObject *attention_seqs(PyObject *self, PyObject *args) {
    Py_buffer q, k, v, out, cb, sb;
    PyObject *kcs, *vcs, *poss, *cnts;
    Py_ssize_t n_rot, nh, nkv, dk, dv, window;
    int neox;
    float scale;
    if (!PyArg_ParseTuple(args, "w*w*y*w*OOOOy*y*npnnnnfn", &q, &k, &v, &out, &kcs, &vcs, &poss, &cnts, &cb, &sb,
                          &n_rot, &neox, &nh, &nkv, &dk, &dv, &scale, &window)) return NULL;
    PyObject *ret = NULL, *kl = PySequence_Fast(kcs, "k_caches"), *vl = PySequence_Fast(vcs, "v_caches");
    PyObject *pl = PySequence_Fast(poss, "positions"), *cl = PySequence_Fast(cnts, "counts");
    Py_ssize_t n = kl && vl && pl && cl ? PySequence_Fast_GET_SIZE(kl) : -1, got = 0;
    Py_buffer *bufs = n > 0 ? PyMem_Calloc((size_t)(2 * n), sizeof(Py_buffer)) : NULL;
    attention_job *jobs = n > 0 ? PyMem_Calloc((size_t)n, sizeof(attention_job)) : NULL;
    Py_ssize_t *first = n > 0 ? PyMem_Calloc((size_t)(n + 1), sizeof(Py_ssize_t)) : NULL;
    Py_ssize_t *pos = n > 0 ? PyMem_Calloc((size_t)(2 * n), sizeof(Py_ssize_t)) : NULL, *cnt = pos ? pos + n : NULL;
    float *buf = NULL;
    const Py_ssize_t half = n_rot / 2, n_pos = cb.len / (Py_ssize_t)sizeof(float) / (half ? half : 1);
    if (n <= 0 || !bufs || !jobs || !first || !pos) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "attention_seqs: no sequences");
        goto done;
    }
    if (PySequence_Fast_GET_SIZE(vl) != n || PySequence_Fast_GET_SIZE(pl) != n || PySequence_Fast_GET_SIZE(cl) != n) {
        PyErr_SetString(PyExc_ValueError, "attention_seqs: one cache pair, position and count per sequence");
        goto done;
    }
    Py_ssize_t m = 0;
    for (Py_ssize_t j = 0; j < n; j++) {
        pos[j] = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(pl, j));
        cnt[j] = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(cl, j));
        if (PyErr_Occurred()) goto done;
        for (int w = 0; w < 2; w++, got++)
            if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(w ? vl : kl, j), &bufs[2 * j + w],
                                   PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) goto done;
        const Py_ssize_t n_ctx = bufs[2 * j].len / (nkv * dk * 2);
        if (nkv <= 0 || nh % nkv || n_rot > dk || cnt[j] <= 0 || pos[j] < 0 || pos[j] + cnt[j] > n_ctx
            || pos[j] + cnt[j] > n_pos || bufs[2 * j].len != nkv * n_ctx * dk * 2 || bufs[2 * j + 1].len != nkv * n_ctx * dv * 2) {
            PyErr_SetString(PyExc_ValueError, "attention_seqs: bad heads, positions or float16 caches");
            goto done;
        }
        m += cnt[j];
    }
    if (!check(&q, m * nh * dk, "q") || !check(&k, m * nkv * dk, "k") || !check(&v, m * nkv * dv, "v")
        || !check(&out, m * nh * dv, "out") || !check(&sb, n_pos * half, "sin")) goto done;
    const int threads = nl_get_threads();
    Py_ssize_t parts = 0, stride = 0;
    for (Py_ssize_t j = 0, a = 0; j < n; a += cnt[j], j++) {
        float *qj = (float *)q.buf + a * nh * dk, *kj = (float *)k.buf + a * nkv * dk;
        const float *vj = (const float *)v.buf + a * nkv * dv;
        uint16_t *kc = bufs[2 * j].buf, *vc = bufs[2 * j + 1].buf;
        const Py_ssize_t n_ctx = bufs[2 * j].len / (nkv * dk * 2);
        rope_rows(qj, cb.buf, sb.buf, cnt[j], nh, dk, half, pos[j], neox);
        rope_rows(kj, cb.buf, sb.buf, cnt[j], nkv, dk, half, pos[j], neox);
        for (Py_ssize_t r = 0; r < cnt[j]; r++)
            for (Py_ssize_t h = 0; h < nkv; h++) {
                f2h_row(kj + (r * nkv + h) * dk, kc + (h * n_ctx + pos[j] + r) * dk, dk);
                f2h_row(vj + (r * nkv + h) * dv, vc + (h * n_ctx + pos[j] + r) * dv, dv);
            }
        jobs[j] = new_job(qj, kc, vc, nh, nkv, dk, dv, n_ctx, pos[j], window, scale);
        first[j + 1] = first[j] + attention_plan(&jobs[j], cnt[j], threads);
        parts += part_floats(&jobs[j]);
        stride = jobs[j].stride > stride ? jobs[j].stride : stride;
    }
    if (!(buf = PyMem_Malloc(sizeof(float) * (size_t)(parts + threads * stride)))) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t j = 0, off = 0; j < n; j++) { /* the threads' scratch is shared: a thread runs one task at once */
        jobs[j].part = buf + off;
        jobs[j].scratch = buf + parts;
        jobs[j].stride = stride;
        off += part_floats(&jobs[j]);
    }
    seqs_job sj = {jobs, first, n};
    nl_parallel(seqs_task, &sj, first[n]);
    for (Py_ssize_t j = 0, a = 0; j < n; a += cnt[j], j++) attention_merge(&jobs[j], cnt[j], (float *)out.buf + a * nh * dv);
    ret = Py_NewRef(Py_None);
done:
    for (Py_ssize_t i = 0; i < got; i++) PyBuffer_Release(&bufs[i]);
    PyMem_Free(bufs); PyMem_Free(jobs); PyMem_Free(first); PyMem_Free(pos); PyMem_Free(buf);
    Py_XDECREF(kl); Py_XDECREF(vl); Py_XDECREF(pl); Py_XDECREF(cl);
    PyBuffer_Release(&q); PyBuffer_Release(&k); PyBuffer_Release(&v); PyBuffer_Release(&out);
    PyBuffer_Release(&cb); PyBuffer_Release(&sb);
    return ret;
}
#define HAVE_ATTENTION_SEQS 1
#endif

PyMethodDef nl_ops_methods[] = { /* added to npulm.cpu._kernels by module.c */
    {"rms_norm", rms_norm, METH_VARARGS, "rms_norm(x, w, out, rows, dim, eps)"},
    {"rope", rope, METH_VARARGS, "rope(x, cos, sin, rows, heads, head_dim, n_rot, pos, neox)"},
#ifdef HAVE_ATTENTION_SEQS
    {"attention_seqs", attention_seqs, METH_VARARGS,
     "attention_seqs(q, k, v, out, k_caches, v_caches, positions, counts, cos, sin, n_rot, neox, n_head, n_kv, dk, "
     "dv, scale, window): RoPE, cache append and decode attention of a batch of sequences in one call"},
#endif
    {"attention", attention, METH_VARARGS,
     "attention(q, k_cache, v_cache, out, rows, n_head, n_kv, dk, dv, n_ctx, pos, scale, window)"},
    {"gated", gated, METH_VARARGS, "gated(gate, up, n, kind): kind 0 SiLU, 1 GELU-tanh"},
    {NULL, NULL, 0, NULL},
};
