/* The RWKV-6 / RWKV-7 WKV recurrences for npulm.models.rwkv (float32, C-contiguous), one thread-pool task per head.
 *
 * Why: the recurrence steps through the tokens with a (head_size x head_size) state per head; in numpy that is a
 * handful of calls per token and layer (each a few us of dispatch and temporaries), here one pass over the state
 * per token, the inner loop over a state row vectorized by the compiler. The math is llama.cpp's
 * ggml_rwkv_wkv6 / ggml_rwkv_wkv7; the numpy path in rwkv.py computes the same and is the reference in the tests.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include "kernels.h"

typedef struct {
    const float *r, *k, *v, *w, *u, *a, *b;
    float *state, *out;
    Py_ssize_t t_len, n_head, n;
} wkv_job;

static int check_len(Py_buffer *b, Py_ssize_t n_floats, const char *what) {
    if (b->len != n_floats * (Py_ssize_t)sizeof(float)) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd float32 values, got %zd bytes", what, n_floats, b->len);
        return 0;
    }
    return 1;
}

/* Eight partial sums: without -ffast-math the compiler keeps a single sum sequential (not vectorized). */
static inline float dot(const float *a, const float *b, Py_ssize_t n) {
    float acc[8] = {0};
    Py_ssize_t j = 0;
    for (; j + 8 <= n; j += 8)
        for (int l = 0; l < 8; l++) acc[l] += a[j + l] * b[j + l];
    float sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; j < n; j++) sum += a[j] * b[j];
    return sum;
}

/* y_t[j] = sum_i r_i (u_i k_i v_j + S[i][j]);  S[i][j] = S[i][j] w_i + k_i v_j   (S rows: k index) */
static void wkv6_head(void *ctx, int64_t h, int tid) {
    (void)tid;
    const wkv_job *c = ctx;
    const Py_ssize_t n = c->n, stride = c->n_head * n;
    float *S = c->state + h * n * n;
    const float *u = c->u + h * n;
    for (Py_ssize_t t = 0; t < c->t_len; t++) {
        const Py_ssize_t o = t * stride + h * n;
        const float *r = c->r + o, *k = c->k + o, *v = c->v + o, *w = c->w + o;
        float *y = c->out + o;
        memset(y, 0, n * sizeof(float));
        for (Py_ssize_t i = 0; i < n; i++) {
            const float ri = r[i], ki = k[i], wi = w[i], ruk = r[i] * u[i] * k[i];
            float *s = S + i * n;
            for (Py_ssize_t j = 0; j < n; j++) {
                y[j] += ri * s[j] + ruk * v[j];
                s[j] = s[j] * wi + ki * v[j];
            }
        }
    }
}

/* S[i][j] = S[i][j] w_j + v_i k_j + (S a)_i b_j;  y_t[i] = sum_j S[i][j] r_j   (S rows: v index) */
static void wkv7_head(void *ctx, int64_t h, int tid) {
    (void)tid;
    const wkv_job *c = ctx;
    const Py_ssize_t n = c->n, stride = c->n_head * n;
    float *S = c->state + h * n * n;
    for (Py_ssize_t t = 0; t < c->t_len; t++) {
        const Py_ssize_t o = t * stride + h * n;
        const float *r = c->r + o, *k = c->k + o, *v = c->v + o, *w = c->w + o, *a = c->a + o, *b = c->b + o;
        float *y = c->out + o;
        for (Py_ssize_t i = 0; i < n; i++) {
            float *s = S + i * n;
            const float sa = dot(a, s, n), vi = v[i];
            for (Py_ssize_t j = 0; j < n; j++) s[j] = s[j] * w[j] + vi * k[j] + sa * b[j];
            y[i] = dot(s, r, n);
        }
    }
}

static PyObject *run(PyObject *args, int version) {
    Py_buffer in[6], state, out;
    Py_ssize_t t_len, n_head, n;
    int ok;
    if (version == 6)  /* wkv6(r, k, v, w, u, state, out, T, H, N) */
        ok = PyArg_ParseTuple(args, "y*y*y*y*y*w*w*nnn", &in[0], &in[1], &in[2], &in[3], &in[4], &state, &out,
                              &t_len, &n_head, &n);
    else  /* wkv7(r, w, k, v, a, b, state, out, T, H, N) */
        ok = PyArg_ParseTuple(args, "y*y*y*y*y*y*w*w*nnn", &in[0], &in[1], &in[2], &in[3], &in[4], &in[5], &state,
                              &out, &t_len, &n_head, &n);
    if (!ok) return NULL;
    const int n_in = version == 6 ? 5 : 6;
    const Py_ssize_t rows = t_len * n_head * n;
    int good = check_len(&state, n_head * n * n, "state") && check_len(&out, rows, "out");
    for (int i = 0; i < n_in && good; i++)
        good = check_len(&in[i], version == 6 && i == 4 ? n_head * n : rows, "input");
    PyObject *ret = NULL;
    if (good) {
        wkv_job c = {0};
        if (version == 6) {
            c.r = in[0].buf; c.k = in[1].buf; c.v = in[2].buf; c.w = in[3].buf; c.u = in[4].buf;
        } else {
            c.r = in[0].buf; c.w = in[1].buf; c.k = in[2].buf; c.v = in[3].buf; c.a = in[4].buf; c.b = in[5].buf;
        }
        c.state = state.buf; c.out = out.buf; c.t_len = t_len; c.n_head = n_head; c.n = n;
        Py_BEGIN_ALLOW_THREADS
        nl_parallel(version == 6 ? wkv6_head : wkv7_head, &c, n_head);
        Py_END_ALLOW_THREADS
        ret = Py_NewRef(Py_None);
    }
    for (int i = 0; i < n_in; i++) PyBuffer_Release(&in[i]);
    PyBuffer_Release(&state); PyBuffer_Release(&out);
    return ret;
}

static PyObject *wkv6(PyObject *self, PyObject *args) { (void)self; return run(args, 6); }
static PyObject *wkv7(PyObject *self, PyObject *args) { (void)self; return run(args, 7); }

PyMethodDef nl_wkv_methods[] = { /* added to npulm.cpu._kernels by module.c */
    {"wkv6", wkv6, METH_VARARGS, "wkv6(r, k, v, w, u, state, out, T, H, N): RWKV-6 recurrence, state in place"},
    {"wkv7", wkv7, METH_VARARGS, "wkv7(r, w, k, v, a, b, state, out, T, H, N): RWKV-7 recurrence, state in place"},
    {NULL, NULL, 0, NULL},
};
