/* A CPython front for the per-call kernels of fused_stats.c (included below, so one shared
 * object holds both): forward() and grad() take the same arguments as rd_forward and
 * rd_grad, as Python ints, floats and None, through METH_FASTCALL. A ctypes call converts
 * its ten arguments through libffi, about 3 us a call on this project's CPU, paid twice per
 * watched activation and collecting step; this front takes about 0.2 us.
 *
 * Built by relu_doctor/_kernels/cpu.py where the Python headers are found; elsewhere the
 * kernels are called through ctypes (same numbers). The GIL is released while a kernel
 * runs, as ctypes does. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "fused_stats.c"

static int arg_ptr(PyObject *o, void **p) {
    if (o == Py_None) {
        *p = NULL;
        return 1;
    }
    *p = PyLong_AsVoidPtr(o);
    return !(*p == NULL && PyErr_Occurred());
}

static int arg_i64(PyObject *o, int64_t *v) {
    *v = (int64_t)PyLong_AsLongLong(o);
    return !(*v == -1 && PyErr_Occurred());
}

static int arg_f64(PyObject *o, double *v) {
    *v = PyFloat_AsDouble(o);
    return !(*v == -1.0 && PyErr_Occurred());
}

static int arity(const char *name, Py_ssize_t n, Py_ssize_t want) {
    if (n == want) return 1;
    PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, want, n);
    return 0;
}

/* forward(x, dtype, A, U, B, window, row0, flags, cap, nthreads) -> rd_forward's code */
static PyObject *fast_forward(PyObject *self, PyObject *const *a, Py_ssize_t n) {
    void *x, *win;
    int64_t dt, A, U, B, row0, flags, nt;
    double cap;
    (void)self;
    if (!arity("forward", n, 10) || !arg_ptr(a[0], &x) || !arg_i64(a[1], &dt) ||
        !arg_i64(a[2], &A) || !arg_i64(a[3], &U) || !arg_i64(a[4], &B) ||
        !arg_ptr(a[5], &win) || !arg_i64(a[6], &row0) || !arg_i64(a[7], &flags) ||
        !arg_f64(a[8], &cap) || !arg_i64(a[9], &nt))
        return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = rd_forward(x, (int)dt, A, U, B, (double *)win, row0, (int)flags, cap, (int)nt);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(rc);
}

/* grad(g, gi or None, dtype, A, U, B, window, row0, scale2, nthreads) -> rd_grad's code */
static PyObject *fast_grad(PyObject *self, PyObject *const *a, Py_ssize_t n) {
    void *g, *gi, *win;
    int64_t dt, A, U, B, row0, nt;
    double scale2;
    (void)self;
    if (!arity("grad", n, 10) || !arg_ptr(a[0], &g) || !arg_ptr(a[1], &gi) ||
        !arg_i64(a[2], &dt) || !arg_i64(a[3], &A) || !arg_i64(a[4], &U) ||
        !arg_i64(a[5], &B) || !arg_ptr(a[6], &win) || !arg_i64(a[7], &row0) ||
        !arg_f64(a[8], &scale2) || !arg_i64(a[9], &nt))
        return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = rd_grad(g, gi, (int)dt, A, U, B, (double *)win, row0, scale2, (int)nt);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(rc);
}

static PyMethodDef methods[] = {
    {"forward", (PyCFunction)(void (*)(void))fast_forward, METH_FASTCALL, "rd_forward"},
    {"grad", (PyCFunction)(void (*)(void))fast_grad, METH_FASTCALL, "rd_grad"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rd_fastcall", NULL, -1, methods};

PyMODINIT_FUNC PyInit__rd_fastcall(void) { return PyModule_Create(&module); }
