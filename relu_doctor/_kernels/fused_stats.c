/* Fused per-unit statistics of relu_doctor: one pass over an activation (or its gradient)
 * that adds every field of a site's window at once. Built at first use by
 * relu_doctor/_kernels/cpu.py and called through ctypes (no torch headers: it compiles in
 * a few seconds, once per machine).
 *
 * Layout: the tensor is read as x[(a * U + u) * B + b], a < A, u < U, b < B (units in the
 * middle; B == 1 for a units-last view such as (N, F) or a channels-last (N, H, W, C)).
 * The window is a row-major float64 (rows, U) matrix; the kernels add into its rows from
 * row0 on, in place.
 *
 * Accumulators live in vector lanes (GCC/Clang vector extensions: the same code on x86 and
 * ARM, as wide as the target's registers: see VB), in registers on the common paths. Two loops:
 *  - per unit (B >= RUN, or few rows: see per_unit): each unit's A runs of B contiguous
 *    elements, four vectors at a time summed pairwise into one (a chain of one add per four
 *    vectors: with one per vector, the adds' latency bound it, a (64, 32, 32, 32) map's
 *    forward fields took 250-275 us on 2 threads, 173-193 us so);
 *  - by groups of units (otherwise): the (A, U * B) matrix read row by row over the W <= RUN
 *    contiguous columns of G = RUN / B units, in W / N vectors (in L1, added to four rows
 *    at a time), the columns of each unit folded at the end. Reading RUN contiguous
 *    elements per row keeps the reads sequential within a page.
 * Counts are kept in integer lanes (exact); sums in float lanes over at most FLUSH elements
 * of a unit (or ROWS rows), then in double.
 *
 * Work is split by slabs of rows first (a < A), then by units: a task is one slab and one
 * unit or group, and a thread takes a run of consecutive tasks. Slabs give the threads work
 * where the units alone cannot (a units-last tensor of few units, such as a channels-last
 * map of 64 channels: 8x faster on 2 threads) and keep each per-unit task's reads within a
 * few pages (a (64, 32, 32, 32) map: 2.5x faster). How many depends on the shape only (see
 * slab_count); each task writes its slab's totals of its units and the slabs are added in
 * order, so the order of every sum is fixed and a result is the same with any number of
 * threads. The totals go to a scratch buffer per calling thread, kept between calls.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define DT_F32 0
#define DT_F64 1
#define DT_F16 2
#define DT_BF16 3

#define FLAG_CAP 1     /* count saturated: h >= cap */
#define FLAG_NONNEG 2  /* the family never outputs negatives: |h| = h, no second sum */

/* Bytes of one accumulator vector: the target's vector registers. A generic vector wider
 * than them is lowered through the stack (64 bytes on an AVX2 machine: 3-5x slower loops). */
#if defined(__AVX512F__)
#define VB 64
#elif defined(__AVX2__)
#define VB 32          /* AVX alone has no 32-byte integer ops (the counts' lanes) */
#else
#define VB 16          /* SSE2, NEON */
#endif
#define NS (VB / 4)    /* float lanes */
#define ND (VB / 8)    /* double lanes */
#define FLUSH 4096     /* elements of one unit summed in float lanes before going to double */
#define ROWS 256       /* rows of the by-groups loop summed in float lanes before double */
#define RUN 256        /* contiguous elements per row of one group, and the per-unit bound */
#define MIN_PAR 65536  /* elements below which one thread does it all */
#define SLABS 8        /* slabs of rows of a tensor of MIN_PAR elements or more, at most */
#define SLAB_ROWS 64   /* rows of a slab in the group loop, at least */
#define SLAB_RUN 1024  /* elements of a unit in a slab in the per-unit loop, at least */
#define NARROW 512     /* elements per row below which the group loop is split in slabs */
#define SLAB_BYTES (1 << 22) /* at most this much scratch for the slabs' totals */

typedef float vf32 __attribute__((vector_size(VB)));
typedef int32_t vi32 __attribute__((vector_size(VB)));
typedef double vf64 __attribute__((vector_size(VB)));
typedef int64_t vi64 __attribute__((vector_size(VB)));
typedef uint32_t vu32 __attribute__((vector_size(VB)));
typedef uint16_t vu16 __attribute__((vector_size(VB / 2)));
typedef _Float16 vh16 __attribute__((vector_size(VB / 2)));

/* Loads of one vector of N elements (unaligned), converted to the accumulator type. */
static inline vf32 ld_f32(const float *p) { vf32 v; memcpy(&v, p, sizeof v); return v; }
static inline vf64 ld_f64(const double *p) { vf64 v; memcpy(&v, p, sizeof v); return v; }
static inline vf32 ld_f16(const _Float16 *p) {
    vh16 h;
    memcpy(&h, p, sizeof h);
    return __builtin_convertvector(h, vf32);
}
static inline vf32 ld_bf16(const uint16_t *p) {
    vu16 h;
    memcpy(&h, p, sizeof h);
    vu32 w = __builtin_convertvector(h, vu32) << 16; /* unsigned: no shift into a sign */
    vf32 f;
    memcpy(&f, &w, sizeof f);
    return f;
}
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

/* Forward fields, in this order in every accumulator: active, saturated, sum, sum_abs,
 * sum_sq. Gradient fields: sum of squares of dL/d(output), zero entries of dL/d(input). */
#define NF 5
#define NG 2

/* Window rows of one unit from its totals d[NF] over per_unit elements: elements, active,
 * sum, sum_abs, sum_sq, saturated, nonfinite. A unit whose sum |h| is not finite adds only
 * nonfinite = 1 (as the eager path). */
static inline void fwd_finish(double *r, int64_t U, int64_t u, const double *d, double per_unit,
                              int mode) {
    double sum_abs = (mode & FLAG_NONNEG) ? d[2] : d[3];
    if (isfinite(sum_abs)) {
        r[0 * U + u] += per_unit;
        r[1 * U + u] += d[0];
        r[2 * U + u] += d[2];
        r[3 * U + u] += sum_abs;
        r[4 * U + u] += d[4];
        r[5 * U + u] += (mode & FLAG_CAP) ? d[1] : 0.0;
    } else {
        r[6 * U + u] += 1.0;
    }
}

/* Window rows of one unit from its gradient totals d[NG]: grad_elements, grad_sq (times
 * scale2), grad_in_elements, grad_zero, grad_nonfinite. A unit whose sum of squares is not
 * finite adds only grad_nonfinite = 1. */
static inline void grad_finish(double *r, int64_t U, int64_t u, const double *d,
                               double per_unit, double scale2, int has_gi) {
    if (isfinite(d[0])) {
        r[0 * U + u] += per_unit;
        r[1 * U + u] += d[0] * scale2;
        if (has_gi) {
            r[2 * U + u] += per_unit;
            r[3 * U + u] += d[1];
        }
    } else {
        r[4 * U + u] += 1.0;
    }
}

/* The accumulators of one vector of columns k: integer lanes (act, sat) and float lanes
 * (s, sa, sq), in arrays of vectors indexed by k. A vector comparison is -1 where true, a
 * scalar one 1: vector updates subtract, lane updates add. The casts name the lanes' integer
 * type, which compilers spell differently for a comparison's result (long, long long). */
#define FWD_VEC(v, k, ABS)                                                                      \
    do {                                                                                    \
        act[k] -= (__typeof__(act[k]))((v) > zero);                                         \
        if (mode & FLAG_CAP) sat[k] -= (__typeof__(sat[k]))((v) >= capv);                   \
        s[k] += (v);                                                                        \
        if (!(mode & FLAG_NONNEG)) sa[k] += ABS(v);                                         \
        sq[k] += (v) * (v);                                                                 \
    } while (0)
/* Four rows' vectors v0..v3 of columns k at once: the accumulators (in L1, not registers, on
 * the group loop) read and written once per four rows. */
#define FWD_VEC4(v0, v1, v2, v3, k, ABS)                                                    \
    do {                                                                                    \
        typedef __typeof__(act[k]) I_;                                                      \
        act[k] -= ((I_)((v0) > zero) + (I_)((v1) > zero)) + ((I_)((v2) > zero) + (I_)((v3) > zero)); \
        if (mode & FLAG_CAP)                                                                \
            sat[k] -= ((I_)((v0) >= capv) + (I_)((v1) >= capv))                             \
                      + ((I_)((v2) >= capv) + (I_)((v3) >= capv));                          \
        s[k] += ((v0) + (v1)) + ((v2) + (v3));                                              \
        if (!(mode & FLAG_NONNEG)) sa[k] += (ABS(v0) + ABS(v1)) + (ABS(v2) + ABS(v3));      \
        sq[k] += ((v0) * (v0) + (v1) * (v1)) + ((v2) * (v2) + (v3) * (v3));                 \
    } while (0)
/* |v| of a lane's scalar. */
#define ABS1(v) ((v) < 0 ? -(v) : (v))
#define FWD_LANE(v, k, j)                                                                   \
    do {                                                                                    \
        act[k][j] += (v) > 0;                                                               \
        if (mode & FLAG_CAP) sat[k][j] += (v) >= cap;                                       \
        s[k][j] += (v);                                                                     \
        if (!(mode & FLAG_NONNEG)) sa[k][j] += ABS1(v);                                     \
        sq[k][j] += (v) * (v);                                                              \
    } while (0)
/* FWD_VEC4 for lane j of vector k: the same sums in the same grouping, so a column's sums
 * are the same whether it is a vector's lane or left over past a group's last full vector
 * (which depends on the group size, and so on the thread count). */
#define FWD_LANE4(v0, v1, v2, v3, k, j)                                                     \
    do {                                                                                    \
        act[k][j] += (((v0) > 0) + ((v1) > 0)) + (((v2) > 0) + ((v3) > 0));                 \
        if (mode & FLAG_CAP)                                                                \
            sat[k][j] += (((v0) >= cap) + ((v1) >= cap)) + (((v2) >= cap) + ((v3) >= cap)); \
        s[k][j] += ((v0) + (v1)) + ((v2) + (v3));                                          \
        if (!(mode & FLAG_NONNEG))                                                          \
            sa[k][j] += (ABS1(v0) + ABS1(v1)) + (ABS1(v2) + ABS1(v3));                      \
        sq[k][j] += ((v0) * (v0) + (v1) * (v1)) + ((v2) * (v2) + (v3) * (v3));             \
    } while (0)
/* Lane j of vector k into the double totals d[NF], then cleared. */
#define FWD_DRAIN(d, k, j)                                                                  \
    do {                                                                                    \
        (d)[0] += (double)act[k][j]; (d)[1] += (double)sat[k][j]; (d)[2] += (double)s[k][j]; \
        (d)[3] += (double)sa[k][j]; (d)[4] += (double)sq[k][j];                             \
        act[k][j] = 0; sat[k][j] = 0; s[k][j] = 0; sa[k][j] = 0; sq[k][j] = 0;              \
    } while (0)
/* Every lane of vector k into columns k * N .. k * N + N - 1 of the double totals d[NF][RUN],
 * then cleared: a loop per vector, which the compiler turns into vector conversions. */
#define FWD_DRAIN_VEC(d, k)                                                                 \
    do {                                                                                    \
        const int n_ = (int)(sizeof(s[0]) / sizeof(s[0][0]));                               \
        for (int j = 0; j < n_; j++) {                                                      \
            int64_t c_ = (k) * n_ + j;                                                      \
            (d)[0][c_] += (double)act[k][j]; (d)[1][c_] += (double)sat[k][j];               \
            (d)[2][c_] += (double)s[k][j]; (d)[3][c_] += (double)sa[k][j];                  \
            (d)[4][c_] += (double)sq[k][j];                                                 \
        }                                                                                   \
        act[k] -= act[k]; sat[k] -= sat[k]; s[k] = zero; sa[k] = zero; sq[k] = zero;        \
    } while (0)
#define FWD_DECL(V, I, NVEC)                                                                \
    const V zero = {0};                                                                     \
    V capv = zero;                                                                          \
    for (int j = 0; j < (int)(sizeof(V) / sizeof(capv[0])); j++) capv[j] = cap;             \
    V s[NVEC], sa[NVEC], sq[NVEC];                                                          \
    I act[NVEC], sat[NVEC];                                                                 \
    for (int k = 0; k < (NVEC); k++) {                                                      \
        s[k] = zero; sa[k] = zero; sq[k] = zero;                                            \
        act[k] = (I){0}; sat[k] = (I){0};                                                   \
    }

#define GRAD_VEC(v, q, k)                                                                   \
    do {                                                                                    \
        sq[k] += (v) * (v);                                                                 \
        if (has_gi) z[k] -= (__typeof__(z[k]))((q) == zero);                                \
    } while (0)
#define GRAD_VEC4(v0, v1, v2, v3, q0, q1, q2, q3, k)                                       \
    do {                                                                                    \
        typedef __typeof__(z[k]) I_;                                                        \
        sq[k] += ((v0) * (v0) + (v1) * (v1)) + ((v2) * (v2) + (v3) * (v3));                 \
        if (has_gi)                                                                         \
            z[k] -= ((I_)((q0) == zero) + (I_)((q1) == zero)) + ((I_)((q2) == zero) + (I_)((q3) == zero)); \
    } while (0)
#define GRAD_LANE(v, q, k, j)                                                               \
    do {                                                                                    \
        sq[k][j] += (v) * (v);                                                              \
        if (has_gi) z[k][j] += (q) == 0;                                                    \
    } while (0)
#define GRAD_LANE4(v0, v1, v2, v3, q0, q1, q2, q3, k, j)                                  \
    do {                                                                                    \
        sq[k][j] += ((v0) * (v0) + (v1) * (v1)) + ((v2) * (v2) + (v3) * (v3));             \
        if (has_gi) z[k][j] += (((q0) == 0) + ((q1) == 0)) + (((q2) == 0) + ((q3) == 0));   \
    } while (0)
#define GRAD_DRAIN(d, k, j)                                                                 \
    do {                                                                                    \
        (d)[0] += (double)sq[k][j]; (d)[1] += (double)z[k][j];                              \
        sq[k][j] = 0; z[k][j] = 0;                                                          \
    } while (0)
#define GRAD_DRAIN_VEC(d, k)                                                                \
    do {                                                                                    \
        const int n_ = (int)(sizeof(sq[0]) / sizeof(sq[0][0]));                             \
        for (int j = 0; j < n_; j++) {                                                      \
            int64_t c_ = (k) * n_ + j;                                                      \
            (d)[0][c_] += (double)sq[k][j]; (d)[1][c_] += (double)z[k][j];                  \
        }                                                                                   \
        sq[k] = zero; z[k] -= z[k];                                                         \
    } while (0)
#define GRAD_DECL(V, I, NVEC)                                                               \
    const V zero = {0};                                                                     \
    V sq[NVEC];                                                                             \
    I z[NVEC];                                                                              \
    for (int k = 0; k < (NVEC); k++) { sq[k] = zero; z[k] = (I){0}; }

/* fwd_unit_S: unit u (see per_unit), its A runs of B elements, summed in the lanes of one vector.
 * fwd_group_S: units [u0, u0 + g) (B < RUN): their W = g * B <= RUN contiguous columns of
 * each row, in W / N vectors and W % N lanes of one more. */
#define DEFINE_FWD(S, T, ACC, V, I, N, LD, CONV, ABS)                                       \
    static inline __attribute__((always_inline)) void fwd_unit_##S(                        \
        const T *x, int64_t a0, int64_t a1, int64_t U, int64_t B, ACC cap, int64_t u,       \
        double *out, const int mode) {                                                        \
        FWD_DECL(V, I, 1)                                                                   \
        double d[NF] = {0, 0, 0, 0, 0};                                                     \
        int64_t since = 0;                                                                  \
        for (int64_t a = a0; a < a1; a++) {                                                 \
            const T *p = x + (a * U + u) * B;                                               \
            for (int64_t c = 0; c < B; c += FLUSH) {                                        \
                int64_t n = min64(FLUSH, B - c), b = 0;                                     \
                for (; b + 4 * N <= n; b += 4 * N) {                                        \
                    const T *r = p + c + b;                                                 \
                    V v0 = LD(r), v1 = LD(r + N), v2 = LD(r + 2 * N), v3 = LD(r + 3 * N);   \
                    FWD_VEC4(v0, v1, v2, v3, 0, ABS);                                       \
                }                                                                           \
                for (; b + N <= n; b += N) {                                                \
                    V v = LD(p + c + b);                                                    \
                    FWD_VEC(v, 0, ABS);                                                     \
                }                                                                           \
                for (int j = 0; b < n; b++, j++) {                                          \
                    ACC v = CONV(p[c + b]);                                                 \
                    FWD_LANE(v, 0, j);                                                      \
                }                                                                           \
                since += n;                                                                 \
                if (since >= FLUSH) {                                                       \
                    for (int j = 0; j < N; j++) FWD_DRAIN(d, 0, j);                         \
                    since = 0;                                                              \
                }                                                                           \
            }                                                                               \
        }                                                                                   \
        for (int j = 0; j < N; j++) FWD_DRAIN(d, 0, j);                                     \
        for (int f = 0; f < NF; f++) out[f * U + u] = d[f];                                 \
    }                                                                                       \
    static inline __attribute__((always_inline)) void fwd_group_##S(                       \
        const T *x, int64_t a0, int64_t a1, int64_t U, int64_t B, ACC cap, int64_t u0,      \
        int64_t g, double *out, const int mode) {                                             \
        FWD_DECL(V, I, RUN / N)                                                             \
        int64_t C = U * B, W = g * B, full = W / N;                                         \
        int64_t nv = divup(W, N);                                                       \
        double d[NF][RUN];                                                              \
        for (int64_t c = 0; c < nv * N; c++)                                            \
            for (int f = 0; f < NF; f++) d[f][c] = 0;                                   \
        for (int64_t b0 = a0; b0 < a1; b0 += ROWS) {                                        \
            int64_t e = min64(b0 + ROWS, a1), a = b0;                                       \
            for (; a + 4 <= e; a += 4) {                                                    \
                const T *p = x + a * C + u0 * B;                                            \
                for (int64_t k = 0; k < full; k++) {                                        \
                    const T *r = p + k * N;                                                 \
                    V v0 = LD(r), v1 = LD(r + C), v2 = LD(r + 2 * C), v3 = LD(r + 3 * C);   \
                    FWD_VEC4(v0, v1, v2, v3, k, ABS);                                       \
                }                                                                           \
                for (int64_t c = full * N; c < W; c++) {                                    \
                    ACC v0 = CONV(p[c]), v1 = CONV(p[C + c]);                               \
                    ACC v2 = CONV(p[2 * C + c]), v3 = CONV(p[3 * C + c]);                   \
                    FWD_LANE4(v0, v1, v2, v3, c / N, c % N);                                \
                }                                                                           \
            }                                                                               \
            for (; a < e; a++) {                                                            \
                const T *p = x + a * C + u0 * B;                                            \
                for (int64_t k = 0; k < full; k++) {                                        \
                    V v = LD(p + k * N);                                                    \
                    FWD_VEC(v, k, ABS);                                                     \
                }                                                                           \
                for (int64_t c = full * N; c < W; c++) {                                    \
                    ACC v = CONV(p[c]);                                                     \
                    FWD_LANE(v, c / N, c % N);                                              \
                }                                                                           \
            }                                                                               \
            for (int64_t k = 0; k < nv; k++) FWD_DRAIN_VEC(d, k);                       \
        }                                                                                   \
        for (int64_t i = 0; i < g; i++) {                                                   \
            double t[NF] = {0, 0, 0, 0, 0};                                                 \
            for (int64_t b = 0; b < B; b++)                                                 \
                for (int f = 0; f < NF; f++) t[f] += d[f][i * B + b];                       \
            for (int f = 0; f < NF; f++) out[f * U + u0 + i] = t[f];                        \
        }                                                                                   \
    }

#define DEFINE_GRAD(S, T, ACC, V, I, N, LD, CONV)                                           \
    static inline __attribute__((always_inline)) void grad_unit_##S(                       \
        const T *g, const T *gi, int64_t a0, int64_t a1, int64_t U, int64_t B, int64_t u,   \
        double *out, const int has_gi) {                                                    \
        GRAD_DECL(V, I, 1)                                                                  \
        double d[NG] = {0, 0};                                                              \
        int64_t since = 0;                                                                  \
        for (int64_t a = a0; a < a1; a++) {                                                 \
            int64_t off = (a * U + u) * B;                                                  \
            const T *p = g + off, *pq = has_gi ? gi + off : g;                              \
            for (int64_t c = 0; c < B; c += FLUSH) {                                        \
                int64_t n = min64(FLUSH, B - c), b = 0;                                     \
                for (; b + 4 * N <= n; b += 4 * N) {                                        \
                    const T *r = p + c + b, *rq = pq + c + b;                               \
                    V v0 = LD(r), v1 = LD(r + N), v2 = LD(r + 2 * N), v3 = LD(r + 3 * N);   \
                    V q0 = zero, q1 = zero, q2 = zero, q3 = zero;                           \
                    if (has_gi) {                                                           \
                        q0 = LD(rq); q1 = LD(rq + N); q2 = LD(rq + 2 * N); q3 = LD(rq + 3 * N); \
                    }                                                                       \
                    GRAD_VEC4(v0, v1, v2, v3, q0, q1, q2, q3, 0);                           \
                }                                                                           \
                for (; b + N <= n; b += N) {                                                \
                    V v = LD(p + c + b), q = has_gi ? LD(pq + c + b) : zero;                \
                    GRAD_VEC(v, q, 0);                                                      \
                }                                                                           \
                for (int j = 0; b < n; b++, j++) {                                          \
                    ACC v = CONV(p[c + b]), q = has_gi ? CONV(pq[c + b]) : 0;               \
                    GRAD_LANE(v, q, 0, j);                                                  \
                }                                                                           \
                since += n;                                                                 \
                if (since >= FLUSH) {                                                       \
                    for (int j = 0; j < N; j++) GRAD_DRAIN(d, 0, j);                        \
                    since = 0;                                                              \
                }                                                                           \
            }                                                                               \
        }                                                                                   \
        for (int j = 0; j < N; j++) GRAD_DRAIN(d, 0, j);                                    \
        for (int f = 0; f < NG; f++) out[f * U + u] = d[f];                                 \
    }                                                                                       \
    static inline __attribute__((always_inline)) void grad_group_##S(                      \
        const T *g, const T *gi, int64_t a0, int64_t a1, int64_t U, int64_t B, int64_t u0,  \
        int64_t gn, double *out, const int has_gi) {                                        \
        GRAD_DECL(V, I, RUN / N)                                                            \
        int64_t C = U * B, W = gn * B, full = W / N;                                        \
        int64_t nv = divup(W, N);                                                       \
        double d[NG][RUN];                                                              \
        for (int64_t c = 0; c < nv * N; c++)                                            \
            for (int f = 0; f < NG; f++) d[f][c] = 0;                                   \
        for (int64_t b0 = a0; b0 < a1; b0 += ROWS) {                                        \
            int64_t e = min64(b0 + ROWS, a1), a = b0;                                       \
            for (; a + 4 <= e; a += 4) {                                                    \
                const T *p = g + a * C + u0 * B, *pq = has_gi ? gi + a * C + u0 * B : p;    \
                for (int64_t k = 0; k < full; k++) {                                        \
                    const T *r = p + k * N, *rq = pq + k * N;                               \
                    V v0 = LD(r), v1 = LD(r + C), v2 = LD(r + 2 * C), v3 = LD(r + 3 * C);   \
                    V q0 = zero, q1 = zero, q2 = zero, q3 = zero;                           \
                    if (has_gi) {                                                           \
                        q0 = LD(rq); q1 = LD(rq + C); q2 = LD(rq + 2 * C); q3 = LD(rq + 3 * C); \
                    }                                                                       \
                    GRAD_VEC4(v0, v1, v2, v3, q0, q1, q2, q3, k);                           \
                }                                                                           \
                for (int64_t c = full * N; c < W; c++) {                                    \
                    ACC v0 = CONV(p[c]), v1 = CONV(p[C + c]);                               \
                    ACC v2 = CONV(p[2 * C + c]), v3 = CONV(p[3 * C + c]);                   \
                    ACC q0 = 0, q1 = 0, q2 = 0, q3 = 0;                                     \
                    if (has_gi) {                                                           \
                        q0 = CONV(pq[c]); q1 = CONV(pq[C + c]);                             \
                        q2 = CONV(pq[2 * C + c]); q3 = CONV(pq[3 * C + c]);                 \
                    }                                                                       \
                    GRAD_LANE4(v0, v1, v2, v3, q0, q1, q2, q3, c / N, c % N);               \
                }                                                                           \
            }                                                                               \
            for (; a < e; a++) {                                                            \
                const T *p = g + a * C + u0 * B, *pq = has_gi ? gi + a * C + u0 * B : p;    \
                for (int64_t k = 0; k < full; k++) {                                        \
                    V v = LD(p + k * N), q = has_gi ? LD(pq + k * N) : zero;                \
                    GRAD_VEC(v, q, k);                                                      \
                }                                                                           \
                for (int64_t c = full * N; c < W; c++) {                                    \
                    ACC v = CONV(p[c]), q = has_gi ? CONV(pq[c]) : 0;                       \
                    GRAD_LANE(v, q, c / N, c % N);                                          \
                }                                                                           \
            }                                                                               \
            for (int64_t k = 0; k < nv; k++) GRAD_DRAIN_VEC(d, k);                      \
        }                                                                                   \
        for (int64_t i = 0; i < gn; i++) {                                                  \
            double t[NG] = {0, 0};                                                          \
            for (int64_t b = 0; b < B; b++)                                                 \
                for (int f = 0; f < NG; f++) t[f] += d[f][i * B + b];                       \
            for (int f = 0; f < NG; f++) out[f * U + u0 + i] = t[f];                        \
        }                                                                                   \
    }

/* |v| of a vector: the sign bit cleared. */
#define ABS32(v) ((vf32)((vi32)(v) & 0x7fffffff))
#define ABS64(v) ((vf64)((vi64)(v) & 0x7fffffffffffffffLL))

#define DEFINE_ALL(S, T, ACC, V, I, N, LD, CONV, ABS)                                       \
    DEFINE_FWD(S, T, ACC, V, I, N, LD, CONV, ABS)                                           \
    DEFINE_GRAD(S, T, ACC, V, I, N, LD, CONV)

DEFINE_ALL(f32, float, float, vf32, vi32, NS, ld_f32, CV, ABS32)
DEFINE_ALL(f64, double, double, vf64, vi64, ND, ld_f64, CV, ABS64)
DEFINE_ALL(f16, _Float16, float, vf32, vi32, NS, ld_f16, CVF16, ABS32)
DEFINE_ALL(bf16, uint16_t, float, vf32, vi32, NS, ld_bf16, CVBF16, ABS32)

/* Whether to run the per-unit loop: for runs of RUN elements or more, and for few rows of
 * runs of a vector or more (a batch of 1-16 conv maps of 4x4 to 15x15, evaluation at batch
 * size 1), where the group loop's fixed cost per group (its W columns drained and folded per
 * ROWS rows) outweighs the rows it reads: (1, 256, 14, 14) took 169 us by groups and 14 us
 * by units, (16, 512, 7, 7) 155 and 94 us; from 64 rows on, groups are as fast or faster.
 * Depends on the shape only, so results are the same for any thread count. */
static int per_unit(int64_t A, int64_t B) {
    return B >= RUN || (A <= 16 && B >= 32) || (A <= 4 && B >= 16);
}
/* Slabs of rows, for a tensor worth splitting (MIN_PAR elements): in the per-unit loop up to
 * SLABS, each of SLAB_RUN elements of a unit or more; in the group loop only for rows of fewer
 * than NARROW elements (there the units alone leave groups too narrow for the vectors: a
 * (8192, 64) tensor took 400 us on 2 threads, 50 us in slabs), of SLAB_ROWS rows or more
 * (each task drains and folds its W columns once per slab). Wider rows stay in one slab:
 * measured in a training step, the drains cost more than slabs saved. The slabs' totals
 * (fields doubles per unit each) take at most SLAB_BYTES. Depends on the shape only (see the
 * top of the file). */
static int64_t slab_count(int64_t A, int64_t U, int64_t B, int fields) {
    if (A * U * B <= MIN_PAR) return 1;
    int64_t rows = per_unit(A, B) ? divup(SLAB_RUN, B) : U * B < NARROW ? SLAB_ROWS : A + 1;
    int64_t n = min64(SLABS, A / rows);
    n = min64(n, SLAB_BYTES / (fields * U * (int64_t)sizeof(double)));
    return n < 1 ? 1 : n;
}
/* Units per group for B < RUN: RUN / B, fewer where that leaves under four tasks per thread
 * (a units-last layer of 256 units in one slab would otherwise run on one thread). A column's
 * sums do not depend on its group (each column has its own lane), so neither do the results. */
static int64_t group_units(int64_t B, int64_t U, int64_t slabs, int par, int nthreads) {
    int64_t G = B >= RUN ? 1 : RUN / B;
    if (par) G = min64(G, divup(U * slabs, 4 * (int64_t)nthreads));
    return G < 1 ? 1 : G;
}

/* The calling thread's scratch for the slabs' totals, kept between calls and grown as needed
 * (at most SLAB_BYTES, or one slab's totals): NULL if it cannot be had. */
static _Thread_local double *scratch_;
static _Thread_local size_t scratch_n_;
static double *scratch(size_t n) {
    if (n > scratch_n_) {
        free(scratch_);
        scratch_ = malloc(n * sizeof(double));
        scratch_n_ = scratch_ ? n : 0;
    }
    return scratch_;
}

#define DISPATCH(dt, CALL, ...)                                                             \
    switch (dt) {                                                                           \
    case DT_F32: CALL(f32, float, float, __VA_ARGS__); break;                               \
    case DT_F64: CALL(f64, double, double, __VA_ARGS__); break;                             \
    case DT_F16: CALL(f16, _Float16, float, __VA_ARGS__); break;                            \
    default: CALL(bf16, uint16_t, float, __VA_ARGS__); break;                               \
    }

/* One parallel region: the tasks (slab s, unit or group k), numbered s * per + k, in runs of
 * consecutive tasks per thread, each writing its slab's totals part[s][f][u]; then, per unit,
 * the slabs added in order into the window (FINISH). TASK(lo, hi, k, p) runs task k of the
 * slab of rows [lo, hi) into p = part[s]. */
#define SLAB_LOOPS(FIELDS, TASK, FINISH)                                                    \
    do {                                                                                    \
        const int64_t per_ = pu ? U : groups;                                               \
        _Pragma("omp parallel num_threads(nthreads) if (par)")                              \
        {                                                                                   \
            _Pragma("omp for schedule(static)")                                             \
            for (int64_t t_ = 0; t_ < slabs * per_; t_++) {                                 \
                int64_t s_ = t_ / per_, k = t_ % per_;                                      \
                int64_t lo = A * s_ / slabs, hi = A * (s_ + 1) / slabs;                     \
                double *p = part + s_ * (FIELDS) * U;                                       \
                TASK;                                                                       \
            }                                                                               \
            _Pragma("omp for schedule(static)")                                             \
            for (int64_t u = 0; u < U; u++) {                                               \
                double d[FIELDS] = {0};                                                     \
                for (int64_t s_ = 0; s_ < slabs; s_++)                                      \
                    for (int f = 0; f < (FIELDS); f++) d[f] += part[(s_ * (FIELDS) + f) * U + u]; \
                FINISH;                                                                     \
            }                                                                               \
        }                                                                                   \
    } while (0)

/* The forward loops for a constant mode M (each mode is compiled apart, without the branches
 * of the others). */
#define FWD_LOOPS(S, T, ACC, M)                                                             \
    do {                                                                                    \
        ACC c_ = dt == DT_F64 ? (ACC)dcap : (ACC)fcap;                                      \
        const T *x_ = (const T *)x;                                                         \
        SLAB_LOOPS(NF,                                                                      \
                   if (pu) fwd_unit_##S(x_, lo, hi, U, B, c_, k, p, M);                     \
                   else fwd_group_##S(x_, lo, hi, U, B, c_, k * G, min64(G, U - k * G), p, M), \
                   fwd_finish(r, U, u, d, (double)(A * B), M));                             \
    } while (0)
/* float32 (nearly every CPU activation) gets a loop per mode; the other dtypes share one
 * that tests the mode as it runs (four copies of each would quadruple the compile time). */
#define FWD_MODES(S, T, ACC, unused)                                                        \
    if (dt != DT_F32) {                                                                     \
        FWD_LOOPS(S, T, ACC, mode);                                                         \
    } else {                                                                                \
        switch (mode) {                                                                     \
        case 0: FWD_LOOPS(S, T, ACC, 0); break;                                             \
        case 1: FWD_LOOPS(S, T, ACC, 1); break;                                             \
        case 2: FWD_LOOPS(S, T, ACC, 2); break;                                             \
        default: FWD_LOOPS(S, T, ACC, 3); break;                                            \
        }                                                                                   \
    }

/* Adds the forward fields of x to window rows row0..row0+6 (see fwd_finish).
 * flags: FLAG_CAP (count h >= cap), FLAG_NONNEG (sum |h| = sum h). Returns 0, or -1 (nothing
 * done) when the scratch cannot be allocated. */
int rd_forward(const void *x, int dt, int64_t A, int64_t U, int64_t B, double *win,
               int64_t row0, int flags, double cap, int nthreads) {
    const int mode = flags & 3, pu = per_unit(A, B);
    float fcap = (mode & FLAG_CAP) ? (float)cap : INFINITY;
    double dcap = (mode & FLAG_CAP) ? cap : INFINITY;
    int par = A * U * B > MIN_PAR && nthreads > 1;
    int64_t slabs = slab_count(A, U, B, NF);
    int64_t G = group_units(B, U, slabs, par, nthreads), groups = divup(U, G);
    double *r = win + row0 * U, *part = scratch((size_t)(slabs * NF * U));
    if (part == NULL) return -1;
    DISPATCH(dt, FWD_MODES, 0)
    return 0;
}

#define GRAD_LOOPS(S, T, ACC, M)                                                            \
    do {                                                                                    \
        const T *g_ = (const T *)g, *gi_ = (const T *)gi;                                   \
        SLAB_LOOPS(NG,                                                                      \
                   if (pu) grad_unit_##S(g_, gi_, lo, hi, U, B, k, p, M);                   \
                   else grad_group_##S(g_, gi_, lo, hi, U, B, k * G, min64(G, U - k * G), p, M), \
                   grad_finish(r, U, u, d, (double)(A * B), scale2, M));                    \
    } while (0)
#define GRAD_MODES(S, T, ACC, unused)                                                       \
    if (dt != DT_F32) {                                                                     \
        GRAD_LOOPS(S, T, ACC, has_gi);                                                      \
    } else if (has_gi) {                                                                    \
        GRAD_LOOPS(S, T, ACC, 1);                                                           \
    } else {                                                                                \
        GRAD_LOOPS(S, T, ACC, 0);                                                           \
    }

/* Adds the gradient fields to window rows row0..row0+4 (see grad_finish). gi may be NULL
 * (the input needs no gradient). Returns 0, or -1 (nothing done) when the scratch cannot be
 * allocated. */
int rd_grad(const void *g, const void *gi, int dt, int64_t A, int64_t U, int64_t B,
            double *win, int64_t row0, double scale2, int nthreads) {
    const int has_gi = gi != NULL, pu = per_unit(A, B);
    int par = A * U * B > MIN_PAR && nthreads > 1;
    int64_t slabs = slab_count(A, U, B, NG);
    int64_t G = group_units(B, U, slabs, par, nthreads), groups = divup(U, G);
    double *r = win + row0 * U, *part = scratch((size_t)(slabs * NG * U));
    if (part == NULL) return -1;
    DISPATCH(dt, GRAD_MODES, 0)
    return 0;
}

/* ---------------------------------------------------------------- sums of squares
 * The optimizer tap's per-layer squared norms: out[idx[i]] += sum of squares of the n[i]
 * contiguous elements at ptrs[i] (dtype dt[i]), i < count, in one call. With sub (not NULL)
 * it also adds the sum of squares of ptrs[i] - sub[i] (same dtype and layout) to
 * out_sub[idx[i]], in the same pass: the update norm ||W_after - W_before|| and the weight
 * norm ||W_after|| from one read of each copy. The differences are taken in the accumulator
 * type (float for the 16-bit types), never rounded to the tensors' dtype.
 *
 * The tensors are cut into chunks of SQ_CHUNK elements, chunk c of tensor i being number
 * first[i] + c (the caller numbers them: first[count] chunks in all); part (first[count]
 * doubles, twice that with sub, from the caller) holds each chunk's sums, and the chunks are
 * added in order, so a result is the same with any number of threads. */
#define SQ_CHUNK 65536

/* One chunk: returns the sum of p[i]^2; with q, also sets *dsq to the sum of (p[i]-q[i])^2.
 * The loop without q is the hot one (every collecting step); q comes at logging steps. */
#define DEFINE_SUMSQ(S, T, ACC, V, I, N, LD, CONV)                                          \
    static double sumsq_##S(const T *p, const T *q, int64_t n, double *dsq) {               \
        const V zero = {0};                                                                 \
        V acc = zero, dacc = zero;                                                          \
        double d = 0, dd = 0;                                                               \
        int64_t i = 0;                                                                      \
        for (int64_t c = 0; c < n; c += FLUSH) {                                            \
            int64_t e = min64(c + FLUSH, n);                                                \
            if (q) {                                                                        \
                for (i = c; i + N <= e; i += N) {                                           \
                    V v = LD(p + i), w = v - LD(q + i);                                     \
                    acc += v * v;                                                           \
                    dacc += w * w;                                                          \
                }                                                                           \
                for (int j = 0; i < e; i++, j++) {                                          \
                    ACC v = CONV(p[i]), w = v - CONV(q[i]);                                 \
                    acc[j] += v * v;                                                        \
                    dacc[j] += w * w;                                                       \
                }                                                                           \
            } else {                                                                        \
                V acc2 = zero;                                                              \
                for (i = c; i + 2 * N <= e; i += 2 * N) {                                   \
                    V v = LD(p + i), w = LD(p + i + N);                                     \
                    acc += v * v;                                                           \
                    acc2 += w * w;                                                          \
                }                                                                           \
                for (; i + N <= e; i += N) {                                                \
                    V v = LD(p + i);                                                        \
                    acc += v * v;                                                           \
                }                                                                           \
                acc += acc2;                                                                \
                for (int j = 0; i < e; i++, j++) {                                          \
                    ACC v = CONV(p[i]);                                                     \
                    acc[j] += v * v;                                                        \
                }                                                                           \
            }                                                                               \
            for (int j = 0; j < N; j++) {                                                   \
                d += (double)acc[j];                                                        \
                dd += (double)dacc[j];                                                      \
            }                                                                               \
            acc = zero;                                                                     \
            dacc = zero;                                                                    \
        }                                                                                   \
        *dsq = dd;                                                                          \
        return d;                                                                           \
    }
DEFINE_SUMSQ(f32, float, float, vf32, vi32, NS, ld_f32, CV)
DEFINE_SUMSQ(f64, double, double, vf64, vi64, ND, ld_f64, CV)
DEFINE_SUMSQ(f16, _Float16, float, vf32, vi32, NS, ld_f16, CVF16)
DEFINE_SUMSQ(bf16, uint16_t, float, vf32, vi32, NS, ld_bf16, CVBF16)

int rd_sumsq(const void *const *ptrs, const void *const *sub, const int64_t *n, const int *dt,
             const int64_t *idx, const int64_t *first, int64_t count, double *out,
             double *out_sub, double *part, int nthreads) {
    int64_t chunks = first[count], total = 0;
    for (int64_t i = 0; i < count; i++) total += n[i];
    int par = total > MIN_PAR && nthreads > 1 && chunks > 1;
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if (par)")
    for (int64_t k = 0; k < chunks; k++) {
        int64_t lo = 0, hi = count - 1; /* the tensor i with first[i] <= k < first[i + 1] */
        while (lo < hi) {
            int64_t mid = (lo + hi + 1) / 2;
            if (first[mid] <= k) lo = mid; else hi = mid - 1;
        }
        int64_t off = (k - first[lo]) * SQ_CHUNK, m = min64(SQ_CHUNK, n[lo] - off);
        double *dsq = sub ? &part[chunks + k] : &part[k]; /* no sub: overwritten below */
        switch (dt[lo]) {
#define SQ_CASE(CODE, S, T)                                                                 \
        case CODE:                                                                          \
            part[k] = sumsq_##S((const T *)ptrs[lo] + off,                                  \
                                sub ? (const T *)sub[lo] + off : NULL, m, dsq);             \
            break;
        SQ_CASE(DT_F32, f32, float)
        SQ_CASE(DT_F64, f64, double)
        SQ_CASE(DT_F16, f16, _Float16)
        default: SQ_CASE(DT_BF16, bf16, uint16_t)
#undef SQ_CASE
        }
    }
    for (int64_t i = 0; i < count; i++) {
        double s = 0, ds = 0;
        for (int64_t k = first[i]; k < first[i + 1]; k++) {
            s += part[k];
            if (sub) ds += part[chunks + k];
        }
        out[idx[i]] += s;
        if (sub) out_sub[idx[i]] += ds;
    }
    return 0;
}
