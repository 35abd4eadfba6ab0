/* Fused per-unit statistics of relu_doctor: one pass over an activation (or its gradient)
 * that adds every field of a site's window at once. Built at first use by
 * relu_doctor/_kernels/cpu.py and called through ctypes (no torch headers: it compiles in
 * well under a second).
 *
 * Layout: the tensor is read as x[(a * U + u) * B + b], a < A, u < U, b < B (units in the
 * middle; B == 1 for a units-last view such as (N, F) or a channels-last (N, H, W, C)).
 * The window is a row-major float64 (rows, U) matrix; the kernels add into its rows from
 * row0 on, in place.
 *
 * Values are read as float (float64 input as double). Sums run in float over chunks of at
 * most CHUNK elements per unit, then in double across chunks; counts are exact. Chunks are
 * fixed (they do not depend on the thread count) and combined in a fixed order, so a result
 * is the same with any number of threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define DT_F32 0
#define DT_F64 1
#define DT_F16 2
#define DT_BF16 3

#define CHUNK 4096  /* elements of one unit summed in float before going to double */
#define ROWS 64     /* rows of a units-last view per parallel chunk */

static inline float bf16f(uint16_t h) {
    uint32_t w = ((uint32_t)h) << 16;
    float f;
    memcpy(&f, &w, 4);
    return f;
}
#define CV(x) (x)
#define CVF16(x) ((float)(x))
#define CVBF16(x) bf16f(x)

static int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }
static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* Per unit: active, saturated, sum, sum_abs, sum_sq (5 doubles). */
#define NF 5

/* fwd_units_T: B > 1, units [u0, u1): each unit's A runs of B contiguous elements. */
/* fwd_rows_T: B == 1, rows [a0, a1) of an (A, U) matrix into part[NF][U] (float). */
#define DEFINE_FWD(SUFFIX, T, ACC, CONV)                                                    \
    static void fwd_units_##SUFFIX(const T *x, int64_t A, int64_t U, int64_t B, ACC cap,    \
                                   int64_t u, double *o) {                                  \
        double act = 0, sat = 0, s = 0, sa = 0, sq = 0;                                     \
        for (int64_t a = 0; a < A; a++) {                                                   \
            const T *p = x + (a * U + u) * B;                                               \
            for (int64_t c = 0; c < B; c += CHUNK) {                                        \
                int64_t n = min64(CHUNK, B - c);                                            \
                ACC fa = 0, ft = 0, fs = 0, fsa = 0, fsq = 0;                               \
                _Pragma("omp simd reduction(+ : fa, ft, fs, fsa, fsq)")                     \
                for (int64_t b = 0; b < n; b++) {                                           \
                    ACC v = CONV(p[c + b]);                                                 \
                    fa += v > 0 ? (ACC)1 : (ACC)0;                                          \
                    ft += v >= cap ? (ACC)1 : (ACC)0;                                       \
                    fs += v;                                                                \
                    fsa += v < 0 ? -v : v;                                                  \
                    fsq += v * v;                                                           \
                }                                                                           \
                act += fa; sat += ft; s += fs; sa += fsa; sq += fsq;                        \
            }                                                                               \
        }                                                                                   \
        o[0 * U + u] = act; o[1 * U + u] = sat; o[2 * U + u] = s;                           \
        o[3 * U + u] = sa; o[4 * U + u] = sq;                                               \
    }                                                                                       \
    static void fwd_rows_##SUFFIX(const T *x, int64_t a0, int64_t a1, int64_t U, ACC cap,   \
                                  ACC *f) {                                                 \
        ACC *fa = f, *ft = f + U, *fs = f + 2 * U, *fsa = f + 3 * U, *fsq = f + 4 * U;      \
        for (int64_t a = a0; a < a1; a++) {                                                 \
            const T *p = x + a * U;                                                         \
            _Pragma("omp simd")                                                             \
            for (int64_t u = 0; u < U; u++) {                                               \
                ACC v = CONV(p[u]);                                                         \
                fa[u] += v > 0 ? (ACC)1 : (ACC)0;                                           \
                ft[u] += v >= cap ? (ACC)1 : (ACC)0;                                        \
                fs[u] += v;                                                                 \
                fsa[u] += v < 0 ? -v : v;                                                   \
                fsq[u] += v * v;                                                            \
            }                                                                               \
        }                                                                                   \
    }

DEFINE_FWD(f32, float, float, CV)
DEFINE_FWD(f64, double, double, CV)
DEFINE_FWD(f16, _Float16, float, CVF16)
DEFINE_FWD(bf16, uint16_t, float, CVBF16)

#define DISPATCH(dt, CALL)                                                                  \
    switch (dt) {                                                                           \
    case DT_F32: CALL(f32, float, float); break;                                            \
    case DT_F64: CALL(f64, double, double); break;                                          \
    case DT_F16: CALL(f16, _Float16, float); break;                                         \
    default: CALL(bf16, uint16_t, float); break;                                            \
    }

/* Sum per-chunk float partials part[k][NF][U] into o[NF][U] (double), in chunk order. */
static void combine(const void *part, int is_double, int64_t chunks, int64_t nf, int64_t U,
                    double *o) {
    for (int64_t k = 0; k < chunks; k++) {
        if (is_double) {
            const double *p = (const double *)part + k * nf * U;
            for (int64_t i = 0; i < nf * U; i++) o[i] += p[i];
        } else {
            const float *p = (const float *)part + k * nf * U;
            for (int64_t i = 0; i < nf * U; i++) o[i] += (double)p[i];
        }
    }
}

/* Adds to window rows row0..row0+6: elements, active, sum, sum_abs, sum_sq, saturated,
 * nonfinite. A unit whose sum |h| is not finite adds only nonfinite = 1. */
int rd_forward(const void *x, int dt, int64_t A, int64_t U, int64_t B, double *win,
               int64_t row0, int has_cap, double cap, int nthreads) {
    double *o = (double *)calloc((size_t)(NF * U), sizeof(double));
    if (o == NULL) return 1;
    float fcap = has_cap ? (float)cap : INFINITY;
    double dcap = has_cap ? cap : INFINITY;
    int64_t work = A * U * B;
    int par = work > 65536 && nthreads > 1;
    if (B > 1) {
#define CALL_UNITS(S, T, ACC)                                                               \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if (par)")             \
    for (int64_t u = 0; u < U; u++)                                                         \
        fwd_units_##S((const T *)x, A, U, B, dt == DT_F64 ? (ACC)dcap : (ACC)fcap, u, o);
        DISPATCH(dt, CALL_UNITS)
    } else {
        int64_t chunks = divup(A, ROWS);
        size_t esz = dt == DT_F64 ? sizeof(double) : sizeof(float);
        void *part = calloc((size_t)(chunks * NF * U), esz);
        if (part == NULL) { free(o); return 1; }
#define CALL_ROWS(S, T, ACC)                                                                \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if (par)")             \
    for (int64_t k = 0; k < chunks; k++)                                                    \
        fwd_rows_##S((const T *)x, k * ROWS, min64((k + 1) * ROWS, A), U,                   \
                     dt == DT_F64 ? (ACC)dcap : (ACC)fcap, (ACC *)part + k * NF * U);
        DISPATCH(dt, CALL_ROWS)
        combine(part, dt == DT_F64, chunks, NF, U, o);
        free(part);
    }
    double per_unit = (double)(A * B);
    double *r = win + row0 * U;
    for (int64_t u = 0; u < U; u++) {
        if (isfinite(o[3 * U + u])) { /* as the eager path: finite where sum |h| is */
            r[0 * U + u] += per_unit;
            r[1 * U + u] += o[0 * U + u];
            r[2 * U + u] += o[2 * U + u];
            r[3 * U + u] += o[3 * U + u];
            r[4 * U + u] += o[4 * U + u];
            r[5 * U + u] += has_cap ? o[1 * U + u] : 0.0;
        } else {
            r[6 * U + u] += 1.0;
        }
    }
    free(o);
    return 0;
}

/* Per unit: sum of squares of dL/d(output), zero entries of dL/d(input). */
#define NG 2

#define DEFINE_GRAD(SUFFIX, T, ACC, CONV)                                                   \
    static void grad_units_##SUFFIX(const T *g, const T *gi, int64_t A, int64_t U,          \
                                    int64_t B, int64_t u, double *o) {                      \
        double sq = 0, z = 0;                                                               \
        for (int64_t a = 0; a < A; a++) {                                                   \
            int64_t off = (a * U + u) * B;                                                  \
            for (int64_t c = 0; c < B; c += CHUNK) {                                        \
                int64_t n = min64(CHUNK, B - c);                                            \
                ACC fsq = 0, fz = 0;                                                        \
                const T *p = g + off + c;                                                   \
                _Pragma("omp simd reduction(+ : fsq)")                                      \
                for (int64_t b = 0; b < n; b++) {                                           \
                    ACC v = CONV(p[b]);                                                     \
                    fsq += v * v;                                                           \
                }                                                                           \
                if (gi) {                                                                   \
                    const T *q = gi + off + c;                                              \
                    _Pragma("omp simd reduction(+ : fz)")                                   \
                    for (int64_t b = 0; b < n; b++) fz += CONV(q[b]) == 0 ? (ACC)1 : (ACC)0; \
                }                                                                           \
                sq += fsq; z += fz;                                                         \
            }                                                                               \
        }                                                                                   \
        o[u] = sq; o[U + u] = z;                                                            \
    }                                                                                       \
    static void grad_rows_##SUFFIX(const T *g, const T *gi, int64_t a0, int64_t a1,         \
                                   int64_t U, ACC *f) {                                     \
        ACC *fsq = f, *fz = f + U;                                                          \
        for (int64_t a = a0; a < a1; a++) {                                                 \
            const T *p = g + a * U;                                                         \
            _Pragma("omp simd")                                                             \
            for (int64_t u = 0; u < U; u++) {                                               \
                ACC v = CONV(p[u]);                                                         \
                fsq[u] += v * v;                                                            \
            }                                                                               \
            if (gi) {                                                                       \
                const T *q = gi + a * U;                                                    \
                _Pragma("omp simd")                                                         \
                for (int64_t u = 0; u < U; u++) fz[u] += CONV(q[u]) == 0 ? (ACC)1 : (ACC)0;  \
            }                                                                               \
        }                                                                                   \
    }

DEFINE_GRAD(f32, float, float, CV)
DEFINE_GRAD(f64, double, double, CV)
DEFINE_GRAD(f16, _Float16, float, CVF16)
DEFINE_GRAD(bf16, uint16_t, float, CVBF16)

/* Adds to window rows row0..row0+4: grad_elements, grad_sq (times scale2), grad_in_elements,
 * grad_zero, grad_nonfinite. gi may be NULL (the input needs no gradient). A unit whose sum
 * of squares is not finite adds only grad_nonfinite = 1. */
int rd_grad(const void *g, const void *gi, int dt, int64_t A, int64_t U, int64_t B,
            double *win, int64_t row0, double scale2, int nthreads) {
    double *o = (double *)calloc((size_t)(NG * U), sizeof(double));
    if (o == NULL) return 1;
    int64_t work = A * U * B;
    int par = work > 65536 && nthreads > 1;
    if (B > 1) {
#define CALL_GUNITS(S, T, ACC)                                                              \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if (par)")             \
    for (int64_t u = 0; u < U; u++) grad_units_##S((const T *)g, (const T *)gi, A, U, B, u, o);
        DISPATCH(dt, CALL_GUNITS)
    } else {
        int64_t chunks = divup(A, ROWS);
        size_t esz = dt == DT_F64 ? sizeof(double) : sizeof(float);
        void *part = calloc((size_t)(chunks * NG * U), esz);
        if (part == NULL) { free(o); return 1; }
#define CALL_GROWS(S, T, ACC)                                                               \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if (par)")             \
    for (int64_t k = 0; k < chunks; k++)                                                    \
        grad_rows_##S((const T *)g, (const T *)gi, k * ROWS, min64((k + 1) * ROWS, A), U,   \
                      (ACC *)part + k * NG * U);
        DISPATCH(dt, CALL_GROWS)
        combine(part, dt == DT_F64, chunks, NG, U, o);
        free(part);
    }
    double per_unit = (double)(A * B);
    double *r = win + row0 * U;
    for (int64_t u = 0; u < U; u++) {
        if (isfinite(o[u])) {
            r[0 * U + u] += per_unit;
            r[1 * U + u] += o[u] * scale2;
            if (gi) {
                r[2 * U + u] += per_unit;
                r[3 * U + u] += o[U + u];
            }
        } else {
            r[4 * U + u] += 1.0;
        }
    }
    free(o);
    return 0;
}
