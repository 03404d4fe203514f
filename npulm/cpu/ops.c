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
            float *xp = x.buf;
            for (Py_ssize_t r = 0; r < rows; r++) {
                const float *cr = (const float *)c.buf + (pos + r) * half, *sr = (const float *)s.buf + (pos + r) * half;
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
static inline float dot(const float *a, const float *b, Py_ssize_t n) {
    Py_ssize_t i = 0;
    float s;
    if (n < 128) {
        float acc[8] = {0};
        for (; i + 8 <= n; i += 8)
            for (int j = 0; j < 8; j++) acc[j] += a[i + j] * b[i + j];
        s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    } else {
        float acc[16] = {0};
        for (; i + 16 <= n; i += 16)
            for (int j = 0; j < 16; j++) acc[j] += a[i + j] * b[i + j];
        s = 0.0f;
        for (int j = 0; j < 16; j++) s += acc[j];
    }
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* Decode attention, split like flash-decoding: a task is (query row r, kv head j, slice s of the visible keys).
 * It converts each cached row once for the kv head's `group` query heads and leaves, per query head, the slice's
 * score max m, its sum l of exp(score - m) and o = sum exp(score - m) v; the caller merges the slices. Slices
 * keep both cores busy on long contexts, where attention is most of a token. */
typedef struct {
    const float *q;
    const uint16_t *kc, *vc;
    float *part;    /* per task: group x (2 + dv): m, l, o */
    float *scratch; /* per thread: group x span scores, then one converted cache row (dk + dv) */
    Py_ssize_t nh, nkv, group, dk, dv, n_ctx, pos, window, nsplit, span, stride;
    float scale;
} attention_job;

static Py_ssize_t first_key(const attention_job *c, Py_ssize_t qp) {
    return c->window > 0 && qp - c->window + 1 > 0 ? qp - c->window + 1 : 0;
}

static void attention_task(void *ctx, int64_t task, int tid) {
    const attention_job *c = ctx;
    const Py_ssize_t s = task % c->nsplit, j = task / c->nsplit % c->nkv, r = task / (c->nsplit * c->nkv);
    const Py_ssize_t dk = c->dk, dv = c->dv, group = c->group, span = c->span, qp = c->pos + r;
    const Py_ssize_t lo = first_key(c, qp), per = (qp + 1 - lo + c->nsplit - 1) / c->nsplit;
    const Py_ssize_t a = lo + s * per, b = a + per < qp + 1 ? a + per : qp + 1; /* keys [a, b), maybe none */
    float *sc = c->scratch + tid * c->stride, *row = sc + group * span;
    const uint16_t *kb = c->kc + j * c->n_ctx * dk, *vb = c->vc + j * c->n_ctx * dv;
    const float *qj = c->q + (r * c->nh + j * group) * dk;
    for (Py_ssize_t t = a; t < b; t++) {
        half_row(kb + t * dk, row, dk);
        for (Py_ssize_t g = 0; g < group; g++) sc[g * span + t - a] = dot(qj + g * dk, row, dk) * c->scale;
    }
    float *part = c->part + task * group * (2 + dv);
    for (Py_ssize_t g = 0; g < group; g++) {
        float *sg = sc + g * span, *pg = part + g * (2 + dv), mx = -INFINITY, sum = 0.0f;
        for (Py_ssize_t t = 0; t < b - a; t++) mx = sg[t] > mx ? sg[t] : mx;
        for (Py_ssize_t t = 0; t < b - a; t++) sg[t] = exp_neg(sg[t] - mx);
        sum = sum16(sg, b - a);
        pg[0] = mx;
        pg[1] = sum;
        memset(pg + 2, 0, sizeof(float) * (size_t)dv);
    }
    for (Py_ssize_t t = a; t < b; t++) {
        half_row(vb + t * dv, row, dv);
        for (Py_ssize_t g = 0; g < group; g++) {
            const float p = sc[g * span + t - a];
            float *o = part + g * (2 + dv) + 2;
            for (Py_ssize_t i = 0; i < dv; i++) o[i] += p * row[i];
        }
    }
}

#define ATTN_MIN_SLICE 256 /* keys per slice below which splitting costs more than it saves */

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
            attention_job c = {q.buf, kc.buf, vc.buf, NULL, NULL, nh, nkv, nh / nkv, dk, dv, n_ctx, pos, window,
                               1, 0, 0, scale};
            const Py_ssize_t longest = pos + rows - first_key(&c, pos + rows - 1); /* keys of the last row */
            c.nsplit = longest / ATTN_MIN_SLICE < threads ? longest / ATTN_MIN_SLICE : threads;
            if (c.nsplit < 1) c.nsplit = 1;
            Py_ssize_t most = 0; /* the most keys one row sees (windows can make earlier rows see more) */
            for (Py_ssize_t r = 0; r < rows; r++) {
                const Py_ssize_t n = pos + r + 1 - first_key(&c, pos + r);
                most = n > most ? n : most;
            }
            c.span = (most + c.nsplit - 1) / c.nsplit;
            c.stride = c.group * c.span + dk + dv;
            const Py_ssize_t ntasks = rows * nkv * c.nsplit, part = ntasks * c.group * (2 + dv);
            if (!(buf = PyMem_Malloc(sizeof(float) * (size_t)(part + threads * c.stride)))) {
                PyErr_NoMemory();
            } else {
                c.part = buf;
                c.scratch = buf + part;
                nl_parallel(attention_task, &c, ntasks);
                for (Py_ssize_t r = 0; r < rows; r++)  /* merge the slices of each query head */
                    for (Py_ssize_t h = 0; h < nh; h++) {
                        const Py_ssize_t j = h / c.group, g = h % c.group;
                        const float *p0 = c.part + ((r * nkv + j) * c.nsplit * c.group + g) * (2 + dv);
                        const Py_ssize_t step = c.group * (2 + dv); /* next slice, same head */
                        float mx = -INFINITY, sum = 0.0f;
                        for (Py_ssize_t s = 0; s < c.nsplit; s++) mx = p0[s * step] > mx ? p0[s * step] : mx;
                        float *o = (float *)out.buf + (r * nh + h) * dv;
                        memset(o, 0, sizeof(float) * (size_t)dv);
                        for (Py_ssize_t s = 0; s < c.nsplit; s++) {
                            const float *ps = p0 + s * step, w = ps[1] > 0 ? expf(ps[0] - mx) : 0.0f;
                            sum += w * ps[1];
                            for (Py_ssize_t i = 0; i < dv; i++) o[i] += w * ps[2 + i];
                        }
                        for (Py_ssize_t i = 0; i < dv; i++) o[i] /= sum;
                    }
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

PyMethodDef nl_ops_methods[] = { /* added to npulm.cpu._kernels by module.c */
    {"rms_norm", rms_norm, METH_VARARGS, "rms_norm(x, w, out, rows, dim, eps)"},
    {"rope", rope, METH_VARARGS, "rope(x, cos, sin, rows, heads, head_dim, n_rot, pos, neox)"},
    {"attention", attention, METH_VARARGS,
     "attention(q, k_cache, v_cache, out, rows, n_head, n_kv, dk, dv, n_ctx, pos, scale, window)"},
    {"gated", gated, METH_VARARGS, "gated(gate, up, n, kind): kind 0 SiLU, 1 GELU-tanh"},
    {NULL, NULL, 0, NULL},
};
