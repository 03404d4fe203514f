/* The host work around an NPU matmul call, in C: activations into the native A layout (fp16 or int8 codes), and
 * native C back to rows with the chunk sum and the scales. One pass over A and one over C instead of numpy's
 * several (measured by benchmarks/npu_overhead.py). Results are bit-identical to the numpy path of
 * npulm/npu/pipelines.py: the same float32 / float64 operations in the same order.
 *
 * Native layouts (SDK 2.x): A (K/sub, rows, sub) per K-chunk, C (N/sub, rows, sub) per K-chunk.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

/* float32 -> IEEE half, round to nearest even (what numpy's astype(float16) does): the compiler's _Float16
 * conversion (one instruction with F16C / AVX512-FP16 / ARMv8.2) where it exists, else in software */
#ifdef __FLT16_MAX__
static inline uint16_t f32_to_f16(float f) {
    _Float16 h = (_Float16)f;
    uint16_t u;
    memcpy(&u, &h, 2);
    return u;
}
#else
static uint16_t f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t exp = (x >> 23) & 0xffu;
    uint32_t man = x & 0x7fffffu;
    if (exp == 0xffu) /* inf / nan */
        return (uint16_t)(sign | 0x7c00u | (man ? 0x200u | (man >> 13) : 0));
    int e = (int)exp - 127 + 15;
    if (e >= 31) return (uint16_t)(sign | 0x7c00u);
    if (e <= 0) { /* subnormal half (or zero) */
        if (e < -10) return (uint16_t)sign;
        man |= 0x800000u;
        int shift = 14 - e;
        uint32_t h = man >> shift, rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1u))) h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = ((uint32_t)e << 10) | (man >> 13), rem = man & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++; /* may carry into the exponent: still right */
    return (uint16_t)(sign | h);
}
#endif

static int get_buf(PyObject *o, Py_buffer *b, int writable, Py_ssize_t need, const char *what) {
    if (PyObject_GetBuffer(o, b, (writable ? PyBUF_WRITABLE : 0) | PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (b->len < need) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, need %zd", what, b->len, need);
        PyBuffer_Release(b);
        return -1;
    }
    return 0;
}

/* Threads: the host work of one call is split by rows over up to n_threads threads (created per call, so only for
 * calls big enough to pay for it: at least MIN_PARALLEL values). The board's 4 A76 cores are idle while the host
 * packs A or reduces C; the rows are independent, so the results do not depend on the split. */
#define MAX_THREADS 8
#define MIN_PARALLEL (1 << 16)
static int n_threads = 1;

static int split_threads(Py_ssize_t rows, Py_ssize_t work) {
    if (work < MIN_PARALLEL || rows < 2) return 1;
    return (int)(rows < n_threads ? rows : n_threads);
}

static void fan_out(void *(*fn)(void *), void *jobs, size_t size, int nt) {
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int i = 1; i < nt; i++) started[i] = pthread_create(&tid[i], NULL, fn, (char *)jobs + i * size) == 0;
    fn(jobs);
    for (int i = 1; i < nt; i++) {
        if (started[i]) pthread_join(tid[i], NULL);
        else fn((char *)jobs + i * size); /* no thread: do its rows here */
    }
}

static PyObject *py_set_threads(PyObject *self, PyObject *arg) {
    long v = PyLong_AsLong(arg);
    if (v == -1 && PyErr_Occurred()) return NULL;
    n_threads = v < 1 ? 1 : (v > MAX_THREADS ? MAX_THREADS : (int)v);
    return PyLong_FromLong(n_threads);
}

static PyObject *py_get_threads(PyObject *self, PyObject *noargs) { return PyLong_FromLong(n_threads); }

/* pack_a(x, scale, dst, m, k, n_chunks, chunk_k, rows, sub, kind)
 * kind 0: x float32 (m, k), scale float32 (m,), a power of two: dst fp16 = half(x / scale)   (W16A16)
 * kind 1: x float64 (m, k), scale float64 (m,): dst int8 = rint(x / scale)   (int8 codes; |x / scale| <= 127)
 * kind 2: as kind 0, the scales computed here and written into scale: 2^(e - 14) for amax = f * 2^e, f in
 *         [0.5, 1) (W16A16's rows: amax lands in [2^13, 2^14), far from fp16's limits; numpy's frexp / ldexp)
 * kind 3: x float64 (m, k), scale float64 (2m,): ~16-bit x as two int8 rows (quant.quantize_rows_residual):
 *         rows 0..m-1 q1 = rint(x / s1) with s1 = scale[r] given; rows m..2m-1 q2 = rint(res / s2) of the
 *         residual res = x - q1 * s1, s2 = max|res| / 127 computed here into scale[m + r]
 * dst (n_chunks, chunk_k / sub, rows, sub); rows m.. (2m.. for kind 3) and K beyond k are zeroed. */
typedef struct {
    const void *x;
    void *scale, *dst;
    Py_ssize_t m, k, nch, ck, rows, sub, r0, r1;
    int kind;
} PackJob;

/* x - rint(x / s) * s: the product rounded on its own (volatile: no fused multiply-add), as numpy computes it */
static inline double residual(double x, double s) {
    double q = nearbyint(x / (s == 0 ? 1.0 : s));
    volatile double p = q * s;
    return x - p;
}

static void pack_residual_rows(const PackJob *a) {
    Py_ssize_t m = a->m, k = a->k, ck = a->ck, rows = a->rows, sub = a->sub, ksub = ck / sub;
    double *scale = (double *)a->scale;
    for (Py_ssize_t r = a->r0; r < a->r1 && r < 2 * m; r++) { /* this thread's residual rows: their scales first */
        if (r < m) continue;
        const double *x = (const double *)a->x + (r - m) * k;
        double s1 = scale[r - m], amax = 0;
        for (Py_ssize_t i = 0; i < k; i++) amax = fmax(amax, fabs(residual(x[i], s1)));
        scale[r] = amax / 127.0;
    }
    for (Py_ssize_t j = 0; j < a->nch; j++) {
        for (Py_ssize_t t = 0; t < ksub; t++) {
            Py_ssize_t k0 = j * ck + t * sub, w = k - k0 < sub ? (k - k0 > 0 ? k - k0 : 0) : sub;
            for (Py_ssize_t r = a->r0; r < a->r1; r++) {
                int8_t *d = (int8_t *)a->dst + ((j * ksub + t) * rows + r) * sub;
                if (r >= 2 * m) { memset(d, 0, sub); continue; }
                const double *x = (const double *)a->x + (r < m ? r : r - m) * k + k0;
                double s = scale[r], s1 = scale[r < m ? r : r - m], sd = s == 0 ? 1.0 : s;
                for (Py_ssize_t i = 0; i < w; i++)
                    d[i] = (int8_t)nearbyint((r < m ? x[i] : residual(x[i], s1)) / sd);
                if (w < sub) memset(d + w, 0, sub - w);
            }
        }
    }
}

static void pack_rows(const PackJob *a) {
    Py_ssize_t m = a->m, k = a->k, ck = a->ck, rows = a->rows, sub = a->sub, ksub = ck / sub;
    int kind = a->kind;
    if (kind == 3) {
        pack_residual_rows(a);
        return;
    }
    if (kind == 2) {
        for (Py_ssize_t r = a->r0; r < a->r1 && r < m; r++) {
            const float *x = (const float *)a->x + r * k;
            float amax = 0.0f;
            for (Py_ssize_t i = 0; i < k; i++) amax = fmaxf(amax, fabsf(x[i]));
            int e;
            frexpf(amax, &e);
            ((float *)a->scale)[r] = ldexpf(1.0f, e - 14);
        }
        kind = 0;
    }
    for (Py_ssize_t j = 0; j < a->nch; j++) {
        for (Py_ssize_t t = 0; t < ksub; t++) {
            Py_ssize_t k0 = j * ck + t * sub;
            for (Py_ssize_t r = a->r0; r < a->r1; r++) {
                Py_ssize_t off = ((j * ksub + t) * rows + r) * sub;
                if (kind == 0) {
                    uint16_t *d = (uint16_t *)a->dst + off;
                    if (r >= m) { memset(d, 0, sub * 2); continue; }
                    const float *x = (const float *)a->x + r * k;
                    /* scale is a power of two: times its (exact) reciprocal is the same correctly rounded value */
                    float inv = 1.0f / ((const float *)a->scale)[r];
                    if (k0 + sub <= k)
                        for (Py_ssize_t i = 0; i < sub; i++) d[i] = f32_to_f16(x[k0 + i] * inv);
                    else
                        for (Py_ssize_t i = 0; i < sub; i++) d[i] = k0 + i < k ? f32_to_f16(x[k0 + i] * inv) : 0;
                } else {
                    int8_t *d = (int8_t *)a->dst + off;
                    if (r >= m) { memset(d, 0, sub); continue; }
                    const double *x = (const double *)a->x + r * k;
                    double s = ((const double *)a->scale)[r];
                    if (s == 0) s = 1.0;
                    for (Py_ssize_t i = 0; i < sub; i++) d[i] = k0 + i < k ? (int8_t)nearbyint(x[k0 + i] / s) : 0;
                }
            }
        }
    }
}

static void *pack_thread(void *a) { pack_rows((const PackJob *)a); return NULL; }

static PyObject *py_pack_a(PyObject *self, PyObject *args) {
    PyObject *ox, *os, *od;
    Py_ssize_t m, k, nch, ck, rows, sub;
    int kind;
    if (!PyArg_ParseTuple(args, "OOOnnnnnni", &ox, &os, &od, &m, &k, &nch, &ck, &rows, &sub, &kind)) return NULL;
    if ((kind == 3 ? 2 * m : m) > rows || nch * ck < k || ck % sub || kind < 0 || kind > 3) {
        PyErr_SetString(PyExc_ValueError, "pack_a: inconsistent shapes");
        return NULL;
    }
    Py_ssize_t esz = kind == 1 || kind == 3 ? 8 : 4, dsz = kind == 1 || kind == 3 ? 1 : 2;
    Py_buffer bx, bs, bd;
    if (get_buf(ox, &bx, 0, m * k * esz, "x") < 0) return NULL;
    if (get_buf(os, &bs, kind >= 2, (kind == 3 ? 2 : 1) * m * esz, "scale") < 0) { PyBuffer_Release(&bx); return NULL; }
    if (get_buf(od, &bd, 1, nch * ck * rows * dsz, "A") < 0) {
        PyBuffer_Release(&bx); PyBuffer_Release(&bs); return NULL;
    }
    PackJob jobs[MAX_THREADS];
    int nt = split_threads(rows, (kind == 3 ? 2 : 1) * m * (k + 1));
    for (int i = 0; i < nt; i++)
        jobs[i] = (PackJob){bx.buf, bs.buf, bd.buf, m, k, nch, ck, rows, sub, rows * i / nt, rows * (i + 1) / nt,
                            kind};
    Py_BEGIN_ALLOW_THREADS
    fan_out(pack_thread, jobs, sizeof(PackJob), nt);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&bx); PyBuffer_Release(&bs); PyBuffer_Release(&bd);
    Py_RETURN_NONE;
}

/* unpack_c(c, out, row_scale, col_scale, m, n, n_chunks, n_pad, rows, sub, kind)
 * kind 0: c float32: out[r, i] = (sum_j c[j, r, i]) * row_scale[r]                (float32, numpy's order)
 * kind 1: c int32:   out[r, i] = float((double(sum_j c) * row_scale[r]) * col_scale[i or 0])
 *         row_scale float64 (m,), col_scale float64 (n,) or (1,)
 * kind 2: c int32 with 2m rows (kind 3's A): out[r, i] = float((double(sum_j c[r]) * row_scale[r]
 *         + double(sum_j c[m + r]) * row_scale[m + r]) * col_scale[i or 0]), row_scale float64 (2m,)
 * c (n_chunks, n_pad / sub, rows, sub); out float32 (m, n). */
typedef struct {
    const void *c;
    float *out;
    const void *row, *col;
    Py_ssize_t m, n, nch, npad, rows, sub, ncol, r0, r1;
    int kind;
} UnpackJob;

#define UNPACK_TILES 16
#define UNPACK_ROWS 16

static void unpack_rows(const UnpackJob *a) {
    Py_ssize_t n = a->n, nch = a->nch, rows = a->rows, sub = a->sub, ncol = a->ncol;
    Py_ssize_t chunk = a->npad * rows; /* elements per K-chunk */
    int kind = a->kind;
    /* In blocks of UNPACK_TILES column tiles x UNPACK_ROWS rows: C read in short contiguous runs, `out` written
     * UNPACK_TILES x sub values per row, some 32 lines / pages per block. One pass over every row per tile (the
     * previous order) touched a page per row and, where n x 4 bytes is a power of two (n = 1536, 2048), mapped every
     * row to the same cache sets: 2-3x slower at M=512 there (npu_overhead.py), as fast elsewhere. */
    Py_ssize_t tiles = (n + sub - 1) / sub;
    for (Py_ssize_t t0 = 0; t0 < tiles; t0 += UNPACK_TILES)
    for (Py_ssize_t q0 = a->r0; q0 < a->r1; q0 += UNPACK_ROWS)
    for (Py_ssize_t t = t0; t < t0 + UNPACK_TILES && t < tiles; t++) {
        for (Py_ssize_t r = q0; r < q0 + UNPACK_ROWS && r < a->r1; r++) {
            Py_ssize_t at = (t * rows + r) * sub, i0 = t * sub, w = n - i0 < sub ? n - i0 : sub;
            float *o = a->out + r * n + i0;
            if (kind == 0) {
                const float *c = (const float *)a->c + at;
                float s = ((const float *)a->row)[r];
                for (Py_ssize_t l = 0; l < w; l++) {
                    float acc = c[l];
                    for (Py_ssize_t j = 1; j < nch; j++) acc += c[j * chunk + l];
                    o[l] = acc * s;
                }
            } else if (kind == 1) {
                const int32_t *c = (const int32_t *)a->c + at;
                const double *cs = (const double *)a->col;
                double s = ((const double *)a->row)[r];
                for (Py_ssize_t l = 0; l < w; l++) {
                    int64_t acc = c[l];
                    for (Py_ssize_t j = 1; j < nch; j++) acc += c[j * chunk + l];
                    o[l] = (float)(((double)acc * s) * cs[ncol == 1 ? 0 : i0 + l]);
                }
            } else {
                const int32_t *c = (const int32_t *)a->c + at, *c2 = c + a->m * sub; /* row m + r */
                const double *cs = (const double *)a->col;
                double s = ((const double *)a->row)[r], s2 = ((const double *)a->row)[a->m + r];
                for (Py_ssize_t l = 0; l < w; l++) {
                    int64_t acc = c[l], acc2 = c2[l];
                    for (Py_ssize_t j = 1; j < nch; j++) acc += c[j * chunk + l], acc2 += c2[j * chunk + l];
                    volatile double hi = (double)acc * s, lo = (double)acc2 * s2; /* no fused multiply-add */
                    o[l] = (float)((hi + lo) * cs[ncol == 1 ? 0 : i0 + l]);
                }
            }
        }
    }
}

static void *unpack_thread(void *a) { unpack_rows((const UnpackJob *)a); return NULL; }

static PyObject *py_unpack_c(PyObject *self, PyObject *args) {
    PyObject *oc, *oo, *orow, *ocol;
    Py_ssize_t m, n, nch, npad, rows, sub;
    int kind;
    if (!PyArg_ParseTuple(args, "OOOOnnnnnni", &oc, &oo, &orow, &ocol, &m, &n, &nch, &npad, &rows, &sub, &kind))
        return NULL;
    if ((kind == 2 ? 2 * m : m) > rows || n > npad || npad % sub || kind < 0 || kind > 2) {
        PyErr_SetString(PyExc_ValueError, "unpack_c: inconsistent shapes");
        return NULL;
    }
    Py_buffer bc, bo, br, bl;
    if (get_buf(oc, &bc, 0, nch * npad * rows * 4, "C") < 0) return NULL;
    if (get_buf(oo, &bo, 1, m * n * 4, "out") < 0) { PyBuffer_Release(&bc); return NULL; }
    if (get_buf(orow, &br, 0, (kind == 2 ? 2 : 1) * m * (kind == 0 ? 4 : 8), "row_scale") < 0) {
        PyBuffer_Release(&bc); PyBuffer_Release(&bo); return NULL;
    }
    if (get_buf(ocol, &bl, 0, kind == 0 ? 0 : 8, "col_scale") < 0) {
        PyBuffer_Release(&bc); PyBuffer_Release(&bo); PyBuffer_Release(&br); return NULL;
    }
    Py_ssize_t ncol = kind != 0 ? bl.len / 8 : 0;
    if (kind != 0 && ncol != 1 && ncol < n) {
        PyErr_SetString(PyExc_ValueError, "unpack_c: col_scale must hold 1 or n values");
        PyBuffer_Release(&bc); PyBuffer_Release(&bo); PyBuffer_Release(&br); PyBuffer_Release(&bl);
        return NULL;
    }
    UnpackJob jobs[MAX_THREADS];
    int nt = split_threads(m, m * n);
    for (int i = 0; i < nt; i++)
        jobs[i] = (UnpackJob){bc.buf, bo.buf, br.buf, bl.buf, m, n, nch, npad, rows, sub, ncol, m * i / nt,
                              m * (i + 1) / nt, kind};
    Py_BEGIN_ALLOW_THREADS
    fan_out(unpack_thread, jobs, sizeof(UnpackJob), nt);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&bc); PyBuffer_Release(&bo); PyBuffer_Release(&br); PyBuffer_Release(&bl);
    Py_RETURN_NONE;
}

/* rotate(x, signs, out, m, k, k_pad, block): out = blockdiag(H(block)) applied to (x zero-padded to k_pad) * signs,
 * normalized by 1/sqrt(block) (quant.Rotation.apply): x float64 (m, k), signs float64 (k_pad,), out float64
 * (m, k_pad). An in-place butterfly per block: the same values as numpy's Kronecker products up to float64
 * rounding (~1e-16 relative). */
typedef struct {
    const double *x, *signs;
    double *out;
    Py_ssize_t k, kp, block, r0, r1;
} RotJob;

static void rotate_rows(const RotJob *a) {
    Py_ssize_t k = a->k, kp = a->kp, b = a->block;
    double norm = 1.0 / sqrt((double)b);
    for (Py_ssize_t r = a->r0; r < a->r1; r++) {
        const double *x = a->x + r * k;
        double *y = a->out + r * kp;
        for (Py_ssize_t i = 0; i < kp; i++) y[i] = i < k ? x[i] * a->signs[i] : 0.0;
        for (Py_ssize_t s = 0; s < kp; s += b) {
            double *v = y + s;
            for (Py_ssize_t h = 1; h < b; h *= 2)
                for (Py_ssize_t i = 0; i < b; i += 2 * h)
                    for (Py_ssize_t j = i; j < i + h; j++) {
                        double u = v[j], w = v[j + h];
                        v[j] = u + w;
                        v[j + h] = u - w;
                    }
            for (Py_ssize_t i = 0; i < b; i++) v[i] *= norm;
        }
    }
}

static void *rotate_thread(void *a) { rotate_rows((const RotJob *)a); return NULL; }

static PyObject *py_rotate(PyObject *self, PyObject *args) {
    PyObject *ox, *os, *oo;
    Py_ssize_t m, k, kp, block;
    if (!PyArg_ParseTuple(args, "OOOnnnn", &ox, &os, &oo, &m, &k, &kp, &block)) return NULL;
    if (k > kp || block < 1 || (block & (block - 1)) || kp % block) {
        PyErr_SetString(PyExc_ValueError, "rotate: inconsistent shapes");
        return NULL;
    }
    Py_buffer bx, bs, bo;
    if (get_buf(ox, &bx, 0, m * k * 8, "x") < 0) return NULL;
    if (get_buf(os, &bs, 0, kp * 8, "signs") < 0) { PyBuffer_Release(&bx); return NULL; }
    if (get_buf(oo, &bo, 1, m * kp * 8, "out") < 0) { PyBuffer_Release(&bx); PyBuffer_Release(&bs); return NULL; }
    RotJob jobs[MAX_THREADS];
    int nt = split_threads(m, m * kp);
    for (int i = 0; i < nt; i++)
        jobs[i] = (RotJob){bx.buf, bs.buf, bo.buf, k, kp, block, m * i / nt, m * (i + 1) / nt};
    Py_BEGIN_ALLOW_THREADS
    fan_out(rotate_thread, jobs, sizeof(RotJob), nt);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&bx); PyBuffer_Release(&bs); PyBuffer_Release(&bo);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"pack_a", py_pack_a, METH_VARARGS, "activations -> native A (fp16 or int8 codes), padding zeroed"},
    {"unpack_c", py_unpack_c, METH_VARARGS, "native C -> rows: chunk sum and scales (float32 out)"},
    {"rotate", py_rotate, METH_VARARGS, "rows times a signed block-diagonal Hadamard (float64, normalized)"},
    {"set_threads", py_set_threads, METH_O, "threads for large calls (1..8); returns the value set"},
    {"get_threads", py_get_threads, METH_NOARGS, "threads for large calls"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_host", "npulm NPU host work (A packing, C epilogue)", -1,
                                    methods};

PyMODINIT_FUNC PyInit__host(void) { return PyModule_Create(&moddef); }
