/* npulm.cpu._kernels: CPython binding of kernels.c.
 *
 * CPython C API (METH_FASTCALL + buffer protocol), not ctypes: a decode step makes ~210 matmul calls from Python.
 * Measured per call at M = 1 on a tiny matrix (benchmarks/kernels.py --overhead): this binding 0.3-0.4 us,
 * ctypes into the same library 6.3 us when passing x.ctypes.data / y.ctypes.data (2.0 us even with the pointers
 * cached, which fresh arrays do not allow). No numpy headers are needed: arrays come in through the buffer
 * protocol, the caller allocates the output.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "kernels.h"

typedef struct {
    Py_buffer view; /* keeps the weight memory (an mmap) alive */
    nl_mat mat;
    void *packed;   /* owned: the repacked rows, or NULL */
} weight_handle;

static const char *CAPSULE = "npulm.cpu.weight";

static void handle_free(PyObject *cap) {
    weight_handle *h = PyCapsule_GetPointer(cap, CAPSULE);
    if (h) {
        PyBuffer_Release(&h->view);
        free(h->packed);
        PyMem_Free(h);
    }
}

/* weight(buffer, type, n, k, act16=0, pack=0, drop=0) -> handle; pack: also keep the rows repacked for the packed
 * kernel (where this build has it for the type); drop: the buffer is a read-only file mapping whose pages may be
 * dropped once packed */
static PyObject *py_weight(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *obj;
    int type;
    long long n, k;
    int act16 = 0, pack = 0, drop = 0;
    if (!PyArg_ParseTuple(args, "OiLL|ppp", &obj, &type, &n, &k, &act16, &pack, &drop)) return NULL;
    const int64_t rb = nl_row_bytes(type, k);
    if (rb < 0 || n <= 0) {
        PyErr_Format(PyExc_ValueError, "unsupported weight: type %d with %lld x %lld values", type, n, k);
        return NULL;
    }
    weight_handle *h = PyMem_Calloc(1, sizeof *h);
    if (!h) return PyErr_NoMemory();
    if (PyObject_GetBuffer(obj, &h->view, PyBUF_C_CONTIGUOUS) < 0) {
        PyMem_Free(h);
        return NULL;
    }
    if (h->view.len < (Py_ssize_t)(rb * n)) {
        PyErr_Format(PyExc_ValueError, "weight buffer has %zd bytes, %lld rows of %lld bytes need %lld", h->view.len,
                     n, (long long)rb, (long long)(rb * n));
        PyBuffer_Release(&h->view);
        PyMem_Free(h);
        return NULL;
    }
    h->mat.data = h->view.buf;
    h->mat.type = type;
    h->mat.n = n;
    h->mat.k = k;
    h->mat.row_bytes = rb;
    h->mat.act16 = act16;
    const int64_t pbytes = pack ? nl_packed_bytes(type, n, k) : -1;
    if (pbytes > 0) {
        int rc = -1;
        Py_BEGIN_ALLOW_THREADS
        if (posix_memalign(&h->packed, 64, (size_t)pbytes)) h->packed = NULL;
        rc = h->packed ? nl_pack(&h->mat, h->packed, drop) : -1;
        Py_END_ALLOW_THREADS
        if (rc) {
            free(h->packed);
            PyBuffer_Release(&h->view);
            PyMem_Free(h);
            return PyErr_NoMemory();
        }
        h->mat.packed = h->packed;
    }
    PyObject *cap = PyCapsule_New(h, CAPSULE, handle_free);
    if (!cap) {
        PyBuffer_Release(&h->view);
        PyMem_Free(h);
    }
    return cap;
}

static int get_f32(PyObject *obj, Py_buffer *v, int writable, const char *what) {
    if (PyObject_GetBuffer(obj, v, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    if (v->itemsize != 4 || !v->format || (strcmp(v->format, "f") && strcmp(v->format, "<f") && strcmp(v->format, "=f"))) {
        PyErr_Format(PyExc_TypeError, "%s must be a C-contiguous float32 array (format %s)", what,
                     v->format ? v->format : "?");
        PyBuffer_Release(v);
        return -1;
    }
    return 0;
}

/* matmul(handle, x, out, path=0): out (M, n) = x (M, k) @ W.T; both 2-D C-contiguous float32. */
static PyObject *py_matmul(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 3 && nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "matmul(handle, x, out, path=0)");
        return NULL;
    }
    weight_handle *h = PyCapsule_GetPointer(args[0], CAPSULE);
    if (!h) return NULL;
    int path = 0;
    if (nargs == 4) {
        path = (int)PyLong_AsLong(args[3]);
        if (path == -1 && PyErr_Occurred()) return NULL;
    }
    Py_buffer xv, yv;
    if (get_f32(args[1], &xv, 0, "x") < 0) return NULL;
    if (get_f32(args[2], &yv, 1, "out") < 0) {
        PyBuffer_Release(&xv);
        return NULL;
    }
    const int64_t k = h->mat.k, n = h->mat.n, m = xv.ndim == 2 ? xv.shape[0] : -1;
    int rc = 0;
    if (xv.ndim != 2 || xv.shape[1] != k || yv.ndim != 2 || yv.shape[0] != m || yv.shape[1] != n) {
        PyErr_Format(PyExc_ValueError, "need x of shape (M, %lld) and out of shape (M, %lld)", (long long)k,
                     (long long)n);
        rc = -2;
    } else {
        Py_BEGIN_ALLOW_THREADS
        rc = nl_matmul(&h->mat, xv.buf, m, yv.buf, path);
        Py_END_ALLOW_THREADS
        if (rc) PyErr_NoMemory();
    }
    PyBuffer_Release(&xv);
    PyBuffer_Release(&yv);
    if (rc) return NULL;
    Py_RETURN_NONE;
}

/* dequantize(handle, r0, r1, out): out (r1 - r0, k) float32 = rows r0..r1 */
static PyObject *py_dequantize(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap, *out;
    long long r0, r1;
    if (!PyArg_ParseTuple(args, "OLLO", &cap, &r0, &r1, &out)) return NULL;
    weight_handle *h = PyCapsule_GetPointer(cap, CAPSULE);
    if (!h) return NULL;
    if (r0 < 0 || r1 > h->mat.n || r0 > r1) {
        PyErr_SetString(PyExc_ValueError, "row range out of bounds");
        return NULL;
    }
    Py_buffer ov;
    if (get_f32(out, &ov, 1, "out") < 0) return NULL;
    int rc = -2;
    if (ov.ndim != 2 || ov.shape[0] != r1 - r0 || ov.shape[1] != h->mat.k)
        PyErr_SetString(PyExc_ValueError, "out must have shape (r1 - r0, k)");
    else {
        Py_BEGIN_ALLOW_THREADS
        rc = nl_dequant(&h->mat, r0, r1, ov.buf);
        Py_END_ALLOW_THREADS
        if (rc) PyErr_NoMemory();
    }
    PyBuffer_Release(&ov);
    if (rc) return NULL;
    Py_RETURN_NONE;
}

static PyObject *py_set_num_threads(PyObject *self, PyObject *arg) {
    (void)self;
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    Py_BEGIN_ALLOW_THREADS
    nl_set_threads((int)n);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_get_num_threads(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyLong_FromLong(nl_get_threads());
}

static PyObject *py_set_spin_us(PyObject *self, PyObject *arg) {
    (void)self;
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    nl_set_spin_us((int)n);
    Py_RETURN_NONE;
}

static PyObject *py_get_spin_us(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyLong_FromLong(nl_get_spin_us());
}

static PyObject *py_set_gemm_min_m(PyObject *self, PyObject *arg) {
    (void)self;
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    nl_set_gemm_min_m((int)n);
    Py_RETURN_NONE;
}

static PyObject *py_get_gemm_min_m(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyLong_FromLong(nl_get_gemm_min_m());
}

/* f(type id) for a GGML type id argument, as a bool */
static PyObject *type_predicate(PyObject *arg, int (*f)(int)) {
    long t = PyLong_AsLong(arg);
    if (t == -1 && PyErr_Occurred()) return NULL;
    return PyBool_FromLong(f((int)t));
}

#define TYPE_PREDICATE(NAME, F)                                                                                 \
    static PyObject *NAME(PyObject *self, PyObject *arg) {                                                      \
        (void)self;                                                                                             \
        return type_predicate(arg, F);                                                                          \
    }
TYPE_PREDICATE(py_supported, nl_type_supported)
TYPE_PREDICATE(py_gemm_available, nl_gemm_available)
TYPE_PREDICATE(py_pack_available, nl_pack_available)
TYPE_PREDICATE(py_pack_default, nl_pack_default)

static PyObject *py_packed(PyObject *self, PyObject *arg) {
    (void)self;
    weight_handle *h = PyCapsule_GetPointer(arg, CAPSULE);
    if (!h) return NULL;
    return PyLong_FromLongLong(h->packed ? nl_packed_bytes(h->mat.type, h->mat.n, h->mat.k) : 0);
}

static PyObject *py_row_bytes(PyObject *self, PyObject *args) {
    (void)self;
    int type;
    long long k;
    if (!PyArg_ParseTuple(args, "iL", &type, &k)) return NULL;
    return PyLong_FromLongLong(nl_row_bytes(type, k));
}

static PyObject *py_isa(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyUnicode_FromString(nl_isa());
}

static PyMethodDef methods[] = {
    {"weight", py_weight, METH_VARARGS,
     "weight(buffer, type, n, k, act16=False, pack=False) -> handle over GGUF rows (kept alive), pack: also repacked"},
    {"matmul", (PyCFunction)(void (*)(void))py_matmul, METH_FASTCALL,
     "matmul(handle, x, out, path=0): out = x @ W.T (path 0 auto, 1 rows kernel, 2 gemm, 3 the repacked rows)"},
    {"dequantize", py_dequantize, METH_VARARGS, "dequantize(handle, r0, r1, out): rows r0..r1 as float32"},
    {"set_num_threads", py_set_num_threads, METH_O, "threads for the kernels (< 1: CPU count)"},
    {"get_num_threads", py_get_num_threads, METH_NOARGS, "threads used by the kernels"},
    {"set_spin_us", py_set_spin_us, METH_O, "how long idle workers poll before sleeping (us)"},
    {"get_spin_us", py_get_spin_us, METH_NOARGS, "how long idle workers poll before sleeping (us)"},
    {"set_gemm_min_m", py_set_gemm_min_m, METH_O, "smallest M that uses the packed gemm"},
    {"get_gemm_min_m", py_get_gemm_min_m, METH_NOARGS, "smallest M that uses the packed gemm"},
    {"supported", py_supported, METH_O, "whether matmul handles a GGML type id"},
    {"gemm_available", py_gemm_available, METH_O, "whether the packed int8 gemm exists for a type on this build"},
    {"pack_available", py_pack_available, METH_O, "whether weight(..., pack=True) repacks a type on this build"},
    {"pack_default", py_pack_default, METH_O, "whether QuantLinear repacks a type unless told"},
    {"packed_bytes", py_packed, METH_O, "bytes of a handle's repacked rows (0: not repacked)"},
    {"row_bytes", py_row_bytes, METH_VARARGS, "row_bytes(type, k): bytes per row, -1 if unsupported"},
    {"isa", py_isa, METH_NOARGS, "instruction set the kernels were built for"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_kernels", "npulm CPU matmul kernels over GGUF blocks",
                                    -1, methods};

extern PyMethodDef nl_ops_methods[]; /* ops.c: the fused small ops of the transformer block */
extern PyMethodDef nl_wkv_methods[]; /* wkv.c: the RWKV recurrences */

PyMODINIT_FUNC PyInit__kernels(void) {
    PyObject *m = PyModule_Create(&moddef);
    if (m && PyModule_AddFunctions(m, nl_ops_methods) < 0) Py_CLEAR(m);
    if (m && PyModule_AddFunctions(m, nl_wkv_methods) < 0) Py_CLEAR(m);
    return m;
}
