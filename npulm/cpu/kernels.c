/* npulm CPU matmul kernels: y = x @ W.T with W in GGUF blocks, read in place (no dequantized copy of the model).
 *
 * Every product quantizes x per block of 32 to int8 (scale dx = amax/127, round to nearest) and does integer dot
 * products with the weight codes, as llama.cpp does with its Q8_0 activations; the result differs from the exact
 * product by at most sum over blocks of (dx/2) * sum|w| (plus float rounding). Weights are written as
 *     w = d16 * (code - off) + bias32
 * with code an unsigned byte, d16 a float scale per 16 values, bias32 per 32 values and off a per-type constant
 * (Q4_0: 8, Q5_0: 16, Q6_K: 32, Q8_0: 128 with code = q + 128, others 0).
 *
 * Three algorithms, two kernels:
 *   rows  (decode, small M): stream each weight row once, unpack a block into SIMD registers, dot it with the M
 *         quantized activation rows. Memory-bound at M = 1; threads split the output rows.
 *   packed (AVX512-VNNI and NEON dotprod builds, every M): the weight repacked once at load into panels of 16 rows,
 *         codes interleaved per 4 (4-bit codes kept as nibbles); a register-tiled kernel multiplies every activation
 *         row with them: one int8 dot instruction covers 16 (or 4) output columns, so per-block scaling costs little,
 *         it serves decode too, and M = 8 costs far less than 8 x M = 1.
 *   gemm  (prefill of a weight not repacked, M >= gemm_min_m): each task packs two panels into its thread's scratch
 *         and runs the packed kernel on them.
 *
 * ISA paths are chosen at compile time: x86 AVX2+FMA+F16C (VNNI dot if AVX512-VNNI+VL or AVX-VNNI), x86
 * AVX512BW+VNNI for the gemm, aarch64 NEON (dotprod if __ARM_FEATURE_DOTPROD) for both, and a scalar fallback.
 *
 * Why C and not numba (measured on the 2-core AVX-512 development machine): a numba call costs ~0.6 us, but each
 * prange parallel region ~15 us (decode makes ~210 calls of 5-70 us per token), every kernel specialization
 * JIT-compiles for ~2 s on first use, and LLVM does not turn a plain int8 dot loop into VNNI/sdot: a Q8_0-style
 * row dot ran at 13 ns per 32-block against 1.1 ns here. C gives the intrinsics, our own thread pool (~1 us to
 * dispatch to spinning workers) and a build that needs only a C compiler.
 */
#define _GNU_SOURCE
#include "kernels.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#error "GGUF blocks are little-endian; these kernels read them in place"
#endif

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(_WIN32)
#define NL_NO_THREADS 1
#else
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>
#include <unistd.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h> /* _mm_pause, and the AVX2/AVX-512 intrinsics below */
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define NL_X86 1
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define NL_X86_VNNI256 1
#define HAS_VNNI 1
#elif defined(__AVXVNNI__)
#define NL_X86_AVXVNNI 1
#define HAS_VNNI 1
#else
#define HAS_VNNI 0
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define NL_X86_GEMM 1
#endif
#elif defined(__aarch64__) && defined(__ARM_NEON)
#define NL_NEON 1
#include <arm_neon.h>
#if defined(__ARM_FEATURE_DOTPROD)
#define NL_NEON_DOT 1
#define NL_NEON_GEMM 1
#endif
#endif

#define INLINE static inline __attribute__((always_inline))
/* per-type constants usable in always-inlined kernels (folded at compile time) */
#define T_OFF(T) ((T) == NL_Q4_0 ? 8 : (T) == NL_Q5_0 ? 16 : (T) == NL_Q6_K ? 32 : (T) == NL_Q8_0 ? 128 : 0)
#define T_BIAS(T) ((T) == NL_Q4_1 || (T) == NL_Q5_1 || (T) == NL_Q4_K || (T) == NL_Q5_K)
#define T_BYTES(T) ((T) == NL_Q4_0 ? 18 : (T) == NL_Q4_1 ? 20 : (T) == NL_Q5_0 ? 22 : (T) == NL_Q5_1 ? 24 : 34)
#define ALIGN 64

/* ------------------------------------------------------------------------------------------------------------ */
/* Types                                                                                                        */

typedef struct {
    int block;      /* values per block */
    int bytes;      /* bytes per block */
    int off;        /* code offset (see top) */
    int bias;       /* has a per-32 bias (min) term */
    int halves;     /* separate scales per 16 values within a 32-block */
} type_info;

static const type_info *tinfo(int type) {
    static const type_info q4_0 = {32, 18, 8, 0, 1}, q4_1 = {32, 20, 0, 1, 1}, q5_0 = {32, 22, 16, 0, 1},
                           q5_1 = {32, 24, 0, 1, 1}, q8_0 = {32, 34, 128, 0, 1}, q4_k = {256, 144, 0, 1, 1},
                           q5_k = {256, 176, 0, 1, 1}, q6_k = {256, 210, 32, 0, 2}, f16 = {1, 2, 0, 0, 1};
    switch (type) {
    case NL_Q4_0: return &q4_0;
    case NL_Q4_1: return &q4_1;
    case NL_Q5_0: return &q5_0;
    case NL_Q5_1: return &q5_1;
    case NL_Q8_0: return &q8_0;
    case NL_Q4_K: return &q4_k;
    case NL_Q5_K: return &q5_k;
    case NL_Q6_K: return &q6_k;
    case NL_F16: return &f16;
    default: return NULL;
    }
}

int nl_type_supported(int type) { return tinfo(type) != NULL; }

int64_t nl_row_bytes(int type, int64_t k) {
    const type_info *t = tinfo(type);
    if (!t || k <= 0 || k % t->block || (type != NL_F16 && k % 32)) return -1;
    return k / t->block * t->bytes;
}

INLINE float h2f(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
#if defined(__F16C__)
    return _cvtsh_ss(h);
#elif defined(__aarch64__)
    __fp16 f;
    memcpy(&f, &h, 2);
    return (float)f;
#else
    return nl_h2f_soft(h);
#endif
}

INLINE uint32_t le32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Q4_K / Q5_K: 8 six-bit scales and mins packed in 12 bytes (byte-parallel on 32-bit words) */
INLINE void kscales(const uint8_t *s, uint8_t sc[8], uint8_t mn[8]) {
    uint32_t u[3], o[4];
    memcpy(u, s, 12);
    const uint32_t m6 = 0x3f3f3f3fu, m4 = 0x0f0f0f0fu, m2 = 0x03030303u;
    o[0] = u[0] & m6;                                    /* sc[0..3] */
    o[1] = (u[2] & m4) | (((u[0] >> 6) & m2) << 4);      /* sc[4..7] */
    o[2] = u[1] & m6;                                    /* mn[0..3] */
    o[3] = ((u[2] >> 4) & m4) | (((u[1] >> 6) & m2) << 4); /* mn[4..7] */
    memcpy(sc, o, 8);
    memcpy(mn, o + 2, 8);
}

/* Portable unpack of one row: codes[k], d16[k/16], bias[k/32] (see the formula at the top). Used by the gemm
 * packer, the dequantizer and the scalar kernels. */
static void unpack_row(int type, const uint8_t *row, int64_t k, uint8_t *codes, float *d16, float *bias) {
    const int64_t nb = k / 32;
    switch (type) {
    case NL_Q4_0:
    case NL_Q4_1:
        for (int64_t b = 0; b < nb; b++) {
            const int bs = type == NL_Q4_0 ? 18 : 20;
            const uint8_t *p = row + b * bs, *qs = p + bs - 16;
            uint8_t *c = codes + 32 * b;
            for (int i = 0; i < 16; i++) {
                c[i] = qs[i] & 15;
                c[i + 16] = qs[i] >> 4;
            }
            d16[2 * b] = d16[2 * b + 1] = h2f(p);
            bias[b] = type == NL_Q4_1 ? h2f(p + 2) : 0.0f;
        }
        break;
    case NL_Q5_0:
    case NL_Q5_1:
        for (int64_t b = 0; b < nb; b++) {
            const int bs = type == NL_Q5_0 ? 22 : 24;
            const uint8_t *p = row + b * bs, *qs = p + bs - 16;
            const uint32_t qh = le32(p + bs - 20);
            uint8_t *c = codes + 32 * b;
            for (int i = 0; i < 16; i++) {
                c[i] = (qs[i] & 15) | (((qh >> i) & 1) << 4);
                c[i + 16] = (qs[i] >> 4) | (((qh >> (i + 16)) & 1) << 4);
            }
            d16[2 * b] = d16[2 * b + 1] = h2f(p);
            bias[b] = type == NL_Q5_1 ? h2f(p + 2) : 0.0f;
        }
        break;
    case NL_Q8_0:
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *p = row + b * 34;
            for (int i = 0; i < 32; i++) codes[32 * b + i] = p[2 + i] ^ 0x80;
            d16[2 * b] = d16[2 * b + 1] = h2f(p);
            bias[b] = 0.0f;
        }
        break;
    case NL_Q4_K:
    case NL_Q5_K:
        for (int64_t sb = 0; sb < k / 256; sb++) {
            const int five = type == NL_Q5_K;
            const uint8_t *p = row + sb * (five ? 176 : 144), *qh = p + 16, *qs = p + (five ? 48 : 16);
            const float d = h2f(p), dmin = h2f(p + 2);
            uint8_t sc[8], mn[8];
            kscales(p + 4, sc, mn);
            uint8_t *c = codes + 256 * sb;
            for (int j = 0; j < 4; j++) {
                for (int i = 0; i < 32; i++) {
                    uint8_t lo = qs[32 * j + i] & 15, hi = qs[32 * j + i] >> 4;
                    if (five) {
                        lo |= ((qh[i] >> (2 * j)) & 1) << 4;
                        hi |= ((qh[i] >> (2 * j + 1)) & 1) << 4;
                    }
                    c[64 * j + i] = lo;
                    c[64 * j + 32 + i] = hi;
                }
            }
            for (int j = 0; j < 8; j++) {
                d16[16 * sb + 2 * j] = d16[16 * sb + 2 * j + 1] = d * sc[j];
                bias[8 * sb + j] = -(dmin * mn[j]);
            }
        }
        break;
    case NL_Q6_K:
        for (int64_t sb = 0; sb < k / 256; sb++) {
            const uint8_t *p = row + sb * 210;
            const int8_t *sc = (const int8_t *)(p + 192);
            const float d = h2f(p + 208);
            uint8_t *c = codes + 256 * sb;
            for (int h = 0; h < 2; h++) {
                const uint8_t *ql = p + 64 * h, *qh = p + 128 + 32 * h;
                uint8_t *o = c + 128 * h;
                for (int l = 0; l < 32; l++) {
                    o[l] = (ql[l] & 15) | ((qh[l] & 3) << 4);
                    o[l + 32] = (ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4);
                    o[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                    o[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                }
            }
            for (int g = 0; g < 16; g++) d16[16 * sb + g] = d * sc[g];
            for (int j = 0; j < 8; j++) bias[8 * sb + j] = 0.0f;
        }
        break;
    default:
        break;
    }
}

/* ------------------------------------------------------------------------------------------------------------ */
/* Scratch memory: one growable buffer per (thread, purpose); calls are serialized, so reuse is safe.            */

#define MAX_THREADS 256
enum { SCR_ACT, SCR_PANEL, SCR_ROW, SCR_RES, SCR_Y, SCR_N };
static void *g_scr[MAX_THREADS][SCR_N];
static size_t g_scr_size[MAX_THREADS][SCR_N];

static void *scratch(int tid, int which, size_t bytes) {
    if (g_scr_size[tid][which] >= bytes) return g_scr[tid][which];
    free(g_scr[tid][which]);
    bytes = (bytes + 4095) & ~(size_t)4095;
    void *p = NULL;
    if (posix_memalign(&p, ALIGN, bytes)) p = NULL;
    g_scr[tid][which] = p;
    g_scr_size[tid][which] = p ? bytes : 0;
    return p;
}

/* ------------------------------------------------------------------------------------------------------------ */
/* Thread pool. A job is published by bumping the generation in `work` = (generation << 32) | next task index;
 * threads claim tasks with a compare-and-swap that also checks the generation, and the caller waits for the count
 * of finished tasks, never for every worker to show up: on a busy machine a descheduled worker delays nothing
 * unless it holds a task. Idle workers poll for g_spin_us after a job, then sleep on a condition variable. */

typedef void (*task_fn)(void *ctx, int64_t task, int tid);

static int g_threads = 0; /* 0 = not yet set: defaults to the CPU count */
static int g_spin_us = 500;
#define SPIN_PAUSE_US 50 /* the first part of the polling, without yielding */
static int g_gemm_min_m = 8;

#ifndef NL_NO_THREADS
static struct {
    pthread_mutex_t call;       /* one matmul at a time: scratch and pool are shared */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_t th[MAX_THREADS];
    int nworkers;               /* started worker threads */
    unsigned start_gen;         /* generation when the workers were created */
    atomic_ullong work;
    atomic_llong finished;
    atomic_int sleepers;
    atomic_int quit;
    _Atomic(task_fn) fn;
    _Atomic(void *) ctx;
    atomic_llong ntasks;
} P = {.call = PTHREAD_MUTEX_INITIALIZER, .mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

#define GEN(v) ((unsigned)((v) >> 32))

INLINE void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec * 1e-3;
}

static void run_tasks(unsigned gen, int tid) {
    for (;;) {
        unsigned long long v = atomic_load_explicit(&P.work, memory_order_acquire);
        if (GEN(v) != gen) return;
        const int64_t t = (int64_t)(v & 0xffffffffu);
        /* read after `work` (acquire): at least this job's values; a newer job's make the CAS below fail */
        const task_fn fn = atomic_load_explicit(&P.fn, memory_order_relaxed);
        void *ctx = atomic_load_explicit(&P.ctx, memory_order_relaxed);
        if (t >= atomic_load_explicit(&P.ntasks, memory_order_relaxed)) return;
        if (!atomic_compare_exchange_weak_explicit(&P.work, &v, v + 1, memory_order_acq_rel, memory_order_relaxed))
            continue;
        fn(ctx, t, tid);
        atomic_fetch_add_explicit(&P.finished, 1, memory_order_release);
    }
}

static void *worker(void *arg) {
    const int tid = (int)(intptr_t)arg;
    unsigned seen = P.start_gen; /* not a fresh load: a job may already have been posted */
    for (;;) {
        unsigned g = GEN(atomic_load_explicit(&P.work, memory_order_acquire));
        if (g == seen) {
            /* poll: first with pause, then yielding the core to any other runnable thread (OpenBLAS workers,
             * numpy) so that polling costs them nothing; after g_spin_us sleep */
            const double t0 = now_us();
            for (int i = 1;; i++) {
                g = GEN(atomic_load_explicit(&P.work, memory_order_acquire));
                if (g != seen) break;
                if ((i & 255) == 0) {
                    const double dt = now_us() - t0;
                    if (dt > g_spin_us) break;
                    if (dt > SPIN_PAUSE_US) {
                        sched_yield();
                        continue;
                    }
                }
                cpu_relax();
            }
            if (g == seen) {
                pthread_mutex_lock(&P.mu);
                atomic_fetch_add(&P.sleepers, 1); /* seq_cst: pairs with the check in parallel() */
                while ((g = GEN(atomic_load(&P.work))) == seen && !atomic_load(&P.quit))
                    pthread_cond_wait(&P.cv, &P.mu);
                atomic_fetch_sub(&P.sleepers, 1);
                pthread_mutex_unlock(&P.mu);
            }
        }
        if (atomic_load(&P.quit)) break;
        seen = g;
        run_tasks(seen, tid);
    }
    return NULL;
}

static void pool_stop(void) {
    if (!P.nworkers) return;
    atomic_store(&P.quit, 1);
    pthread_mutex_lock(&P.mu);
    atomic_store(&P.ntasks, 0);
    atomic_store(&P.work, (unsigned long long)(GEN(atomic_load(&P.work)) + 1) << 32);
    pthread_cond_broadcast(&P.cv);
    pthread_mutex_unlock(&P.mu);
    for (int i = 0; i < P.nworkers; i++) pthread_join(P.th[i + 1], NULL);
    P.nworkers = 0;
    atomic_store(&P.quit, 0);
}

static void pool_start(int nthreads) {
    pool_stop();
    P.start_gen = GEN(atomic_load(&P.work));
    for (int i = 1; i < nthreads; i++) {
        if (pthread_create(&P.th[i], NULL, worker, (void *)(intptr_t)i)) break;
        P.nworkers++;
    }
}

/* Run fn(ctx, t, tid) for t in [0, ntasks) on all threads; returns when every task is done. */
static void parallel(task_fn fn, void *ctx, int64_t ntasks) {
    if (P.nworkers == 0 || ntasks <= 1) {
        for (int64_t t = 0; t < ntasks; t++) fn(ctx, t, 0);
        return;
    }
    const unsigned gen = GEN(atomic_load(&P.work)) + 1;
    atomic_store_explicit(&P.fn, fn, memory_order_relaxed);
    atomic_store_explicit(&P.ctx, ctx, memory_order_relaxed);
    atomic_store_explicit(&P.ntasks, ntasks, memory_order_relaxed);
    atomic_store_explicit(&P.finished, 0, memory_order_relaxed);
    atomic_store(&P.work, (unsigned long long)gen << 32); /* seq_cst: publishes the job, then read sleepers */
    if (atomic_load(&P.sleepers) > 0) {
        pthread_mutex_lock(&P.mu);
        pthread_cond_broadcast(&P.cv);
        pthread_mutex_unlock(&P.mu);
    }
    run_tasks(gen, 0);
    for (int i = 1; atomic_load_explicit(&P.finished, memory_order_acquire) < ntasks; i++) {
        if (i < 4096) cpu_relax();
        else sched_yield(); /* a worker holding a task may be waiting for this core */
    }
}

static int cpu_count(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : n > MAX_THREADS ? MAX_THREADS : (int)n;
}

/* A forked child has no worker threads: start over there. */
static void after_fork_child(void) {
    P.nworkers = 0;
    g_threads = 0;
    pthread_mutex_init(&P.call, NULL);
    pthread_mutex_init(&P.mu, NULL);
    pthread_cond_init(&P.cv, NULL);
    atomic_store(&P.sleepers, 0);
}

static void ensure_pool(void) {
    static int atfork = 0;
    if (!atfork) {
        pthread_atfork(NULL, NULL, after_fork_child);
        atfork = 1;
    }
    if (g_threads == 0) {
        g_threads = cpu_count();
        pool_start(g_threads);
    }
}

void nl_set_threads(int n) {
    pthread_mutex_lock(&P.call);
    if (n < 1) n = cpu_count();
    if (n > MAX_THREADS) n = MAX_THREADS;
    if (n != g_threads) {
        g_threads = n;
        pool_start(n);
    }
    pthread_mutex_unlock(&P.call);
}

#define CALL_LOCK() pthread_mutex_lock(&P.call)
#define CALL_UNLOCK() pthread_mutex_unlock(&P.call)
#else
static void parallel(task_fn fn, void *ctx, int64_t ntasks) {
    for (int64_t t = 0; t < ntasks; t++) fn(ctx, t, 0);
}
static void ensure_pool(void) { g_threads = 1; }
void nl_set_threads(int n) { (void)n; g_threads = 1; }
#define CALL_LOCK() ((void)0)
#define CALL_UNLOCK() ((void)0)
#endif

void nl_parallel(task_fn fn, void *ctx, int64_t ntasks) {
    CALL_LOCK();
    ensure_pool();
    parallel(fn, ctx, ntasks);
    CALL_UNLOCK();
}

int nl_get_threads(void) {
    CALL_LOCK();
    ensure_pool();
    int n = g_threads;
    CALL_UNLOCK();
    return n;
}
void nl_set_spin_us(int us) { g_spin_us = us < 0 ? 0 : us; }
int nl_get_spin_us(void) { return g_spin_us; }
void nl_set_gemm_min_m(int m) { g_gemm_min_m = m < 1 ? 1 : m; }
int nl_get_gemm_min_m(void) { return g_gemm_min_m; }

/* ------------------------------------------------------------------------------------------------------------ */
/* Activations: int8 per block of 32 with scale d, d*sum (bias terms) and -off*sum per 16 / 32 (offset terms).   */

typedef struct {
    int8_t *q;    /* m * k */
    float *d;     /* m * kb */
    float *s;     /* m * kb: d * sum(q) over the block */
    int32_t *c16; /* m * 2kb: -off * sum(q) over each half block */
    int32_t *c32; /* m * kb: -off * sum(q) over the block */
    int64_t k, kb;
} acts;

static void quant_row(const float *x, int64_t k, int off, int8_t *q, float *d, float *s, int32_t *c16,
                      int32_t *c32) {
    for (int64_t b = 0; b < k / 32; b++) {
        const float *xb = x + 32 * b;
        int8_t *qb = q + 32 * b;
        int sum0 = 0, sum1 = 0;
#if defined(NL_X86)
        __m256 v[4], mx = _mm256_setzero_ps();
        const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(xb + 8 * i);
            mx = _mm256_max_ps(mx, _mm256_and_ps(v[i], absm));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4), db = amax / 127.0f, id = amax > 0 ? 1.0f / db : 0.0f;
        const __m256 vid = _mm256_set1_ps(id);
        __m256i iv[4];
        for (int i = 0; i < 4; i++) iv[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], vid));
        __m256i s01 = _mm256_add_epi32(iv[0], iv[1]), s23 = _mm256_add_epi32(iv[2], iv[3]);
        __m128i h0 = _mm_add_epi32(_mm256_castsi256_si128(s01), _mm256_extracti128_si256(s01, 1));
        __m128i h1 = _mm_add_epi32(_mm256_castsi256_si128(s23), _mm256_extracti128_si256(s23, 1));
        h0 = _mm_hadd_epi32(h0, h1);
        h0 = _mm_hadd_epi32(h0, h0);
        sum0 = _mm_cvtsi128_si32(h0);
        sum1 = _mm_extract_epi32(h0, 1);
        __m256i p16 = _mm256_packs_epi32(iv[0], iv[1]), p16b = _mm256_packs_epi32(iv[2], iv[3]);
        __m256i p8 = _mm256_packs_epi16(p16, p16b);
        p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)qb, p8);
#elif defined(NL_NEON)
        float32x4_t v[8];
        float32x4_t mx = vdupq_n_f32(0);
        for (int i = 0; i < 8; i++) {
            v[i] = vld1q_f32(xb + 4 * i);
            mx = vmaxq_f32(mx, vabsq_f32(v[i]));
        }
        const float amax = vmaxvq_f32(mx), db = amax / 127.0f, id = amax > 0 ? 1.0f / db : 0.0f;
        int32x4_t iv[8];
        for (int i = 0; i < 8; i++) iv[i] = vcvtnq_s32_f32(vmulq_n_f32(v[i], id));
        sum0 = vaddvq_s32(vaddq_s32(vaddq_s32(iv[0], iv[1]), vaddq_s32(iv[2], iv[3])));
        sum1 = vaddvq_s32(vaddq_s32(vaddq_s32(iv[4], iv[5]), vaddq_s32(iv[6], iv[7])));
        for (int i = 0; i < 4; i++) {
            int16x8_t h = vcombine_s16(vmovn_s32(iv[2 * i]), vmovn_s32(iv[2 * i + 1]));
            vst1_s8(qb + 8 * i, vmovn_s16(h));
        }
#else
        float amax = 0.0f;
        for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(xb[i]));
        const float db = amax / 127.0f, id = amax > 0 ? 1.0f / db : 0.0f;
        for (int i = 0; i < 32; i++) {
            const int v = (int)lrintf(xb[i] * id);
            qb[i] = (int8_t)v;
            if (i < 16) sum0 += v;
            else sum1 += v;
        }
#endif
        d[b] = db;
        s[b] = db * (float)(sum0 + sum1);
        c16[2 * b] = -off * sum0;
        c16[2 * b + 1] = -off * sum1;
        c32[b] = -off * (sum0 + sum1);
    }
}

typedef struct {
    const float *x;
    acts *a;
    int64_t rows_per_task, m;
    int off, act16;
} quant_ctx;

static void quant_task(void *ctx, int64_t t, int tid) {
    quant_ctx *c = ctx;
    acts *a = c->a;
    const int64_t k = a->k, kb = a->kb;
    const int64_t r0 = t * c->rows_per_task, r1 = r0 + c->rows_per_task < c->m ? r0 + c->rows_per_task : c->m;
    for (int64_t r = r0; r < r1; r++) {
        quant_row(c->x + r * k, k, c->off, a->q + r * k, a->d + r * kb, a->s + r * kb, a->c16 + 2 * r * kb,
                  a->c32 + r * kb);
        if (!c->act16) continue;
        /* row m + r: what the int8 blocks of row r missed, quantized the same way */
        float *res = g_scr[tid][SCR_RES];
        const float *x = c->x + r * k, *d = a->d + r * kb;
        const int8_t *q = a->q + r * k;
        for (int64_t i = 0; i < k; i++) res[i] = x[i] - d[i / 32] * (float)q[i];
        const int64_t r2 = c->m + r;
        quant_row(res, k, c->off, a->q + r2 * k, a->d + r2 * kb, a->s + r2 * kb, a->c16 + 2 * r2 * kb,
                  a->c32 + r2 * kb);
    }
}

/* m rows of x -> int8 blocks; with act16, 2m rows: rows m.. hold the residuals of rows 0.. */
static int quantize_acts(const float *x, int64_t m, int64_t k, int off, int act16, acts *a) {
    const int64_t kb = k / 32, rows = act16 ? 2 * m : m;
    const size_t qbytes = ((size_t)(rows * k) + ALIGN - 1) & ~(size_t)(ALIGN - 1);
    char *p = scratch(0, SCR_ACT, qbytes + (size_t)(rows * kb) * 4 * 5 + ALIGN);
    if (!p) return -1;
    for (int t = 0; act16 && t < g_threads; t++) /* every thread's residual row, here: tasks cannot fail */
        if (!scratch(t, SCR_RES, (size_t)k * 4)) return -1;
    a->k = k;
    a->kb = kb;
    a->q = (int8_t *)p;
    a->d = (float *)(p + qbytes);
    a->s = a->d + rows * kb;
    a->c16 = (int32_t *)(a->s + rows * kb);
    a->c32 = a->c16 + 2 * rows * kb;
    quant_ctx c = {x, a, m >= 64 ? 16 : m, m, off, act16};
    parallel(quant_task, &c, (m + c.rows_per_task - 1) / c.rows_per_task);
    return 0;
}

/* act16: y[i] = the products of row i and of its residual row m + i, for output columns n0..n1 */
static void fold_residual(const float *y2, float *y, int64_t m, int64_t n, int64_t n0, int64_t n1) {
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = n0; j < n1; j++) y[i * n + j] = y2[i * n + j] + y2[(m + i) * n + j];
}

/* ------------------------------------------------------------------------------------------------------------ */
/* rows: streaming kernel for small M. MR activation rows at a time, one weight row per step.                  */

typedef struct {
    const nl_mat *w;
    const acts *a;
    const float *x; /* float activations (F16 weights) */
    float *y;
    int64_t m, rows_per_task;
    float *yout; /* act16: y holds 2 * m_out rows, folded into yout */
    int64_t m_out;
} rows_ctx;

#if defined(NL_X86)
INLINE __m256i dot_us(__m256i u, __m256i s) { /* 8 x int32 = sums of 4 adjacent u8*s8 products */
#if defined(NL_X86_VNNI256)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(NL_X86_AVXVNNI)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)); /* |u| <= 128: no saturation */
#endif
}

INLINE float hsum8(__m256 v) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

INLINE __m256i nib32(const uint8_t *qs) { /* 16 bytes -> 32 codes: low nibbles then high nibbles */
    /* both halves hold the 16 bytes; the upper one shifted right by 4 per 64-bit lane, then masked */
    const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qs));
    return _mm256_and_si256(_mm256_srlv_epi64(v, _mm256_setr_epi64x(0, 0, 4, 4)), _mm256_set1_epi8(15));
}

INLINE __m256i bits32(uint32_t qh) { /* byte i = 16 if bit i of qh is set */
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    return _mm256_maskz_set1_epi8((__mmask32)qh, 16);
#else
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)qh),
                                    _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                                      0x0101010101010101, 0x0000000000000000));
    const __m256i bm = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    v = _mm256_cmpeq_epi8(_mm256_and_si256(v, bm), bm);
    return _mm256_and_si256(v, _mm256_set1_epi8(16));
#endif
}

/* Accumulate one 32-block (scale d, bias) into MR activation rows: the tail of the 8-block loop below. */
INLINE void rows_step(const int T, const int MR, __m256i codes, float d, float bias, const acts *A, int64_t m0,
                      int64_t b, __m256 *acc, float *bacc) {
    __m256i ucodes = codes;
    if (T == NL_Q8_0) ucodes = _mm256_abs_epi8(codes);
    for (int m = 0; m < MR; m++) {
        const __m256i a = _mm256_loadu_si256((const __m256i *)(A->q + (m0 + m) * A->k + 32 * b));
        __m256i ip;
        if (T == NL_Q8_0) ip = dot_us(ucodes, _mm256_sign_epi8(a, codes));
        else {
            ip = dot_us(codes, a);
            if (T_OFF(T)) ip = _mm256_sub_epi32(ip, dot_us(_mm256_set1_epi8((char)T_OFF(T)), a));
        }
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ip), _mm256_set1_ps(d * A->d[(m0 + m) * A->kb + b]), acc[m]);
        if (T_BIAS(T)) bacc[m] += bias * A->s[(m0 + m) * A->kb + b];
    }
}

INLINE int ld16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

INLINE __m256i simple_codes(const int T, const uint8_t *p) {
    switch (T) {
    case NL_Q4_0: return nib32(p + 2);
    case NL_Q4_1: return nib32(p + 4);
    case NL_Q5_0: return _mm256_or_si256(nib32(p + 6), bits32(le32(p + 2)));
    case NL_Q5_1: return _mm256_or_si256(nib32(p + 8), bits32(le32(p + 4)));
    default: return _mm256_loadu_si256((const __m256i *)(p + 2)); /* Q8_0 */
    }
}

INLINE void simple_block(const int T, const uint8_t *p, __m256i *codes, float *d, float *bias) {
    switch (T) {
    case NL_Q4_0: *codes = nib32(p + 2); *d = h2f(p); break;
    case NL_Q4_1: *codes = nib32(p + 4); *d = h2f(p); *bias = h2f(p + 2); break;
    case NL_Q5_0: *codes = _mm256_or_si256(nib32(p + 6), bits32(le32(p + 2))); *d = h2f(p); break;
    case NL_Q5_1:
        *codes = _mm256_or_si256(nib32(p + 8), bits32(le32(p + 4)));
        *d = h2f(p);
        *bias = h2f(p + 2);
        break;
    case NL_Q8_0: *codes = _mm256_loadu_si256((const __m256i *)(p + 2)); *d = h2f(p); break;
    }
}

/* Q4_K / Q5_K: codes of sub-blocks 2j (lo) and 2j+1 (hi) of the superblock at p */
INLINE void kq_pair(const int five, const uint8_t *p, int j, __m256i *lo, __m256i *hi) {
    const __m256i m4 = _mm256_set1_epi8(15);
    const __m256i v = _mm256_loadu_si256((const __m256i *)(p + (five ? 48 : 16) + 32 * j));
    *lo = _mm256_and_si256(v, m4);
    *hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    if (five) {
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(p + 16)), b16 = _mm256_set1_epi8(16), z = _mm256_setzero_si256();
        const __m256i hl = _mm256_and_si256(qh, _mm256_set1_epi8((char)(1 << (2 * j))));
        const __m256i hh = _mm256_and_si256(qh, _mm256_set1_epi8((char)(2 << (2 * j))));
        *lo = _mm256_or_si256(*lo, _mm256_andnot_si256(_mm256_cmpeq_epi8(hl, z), b16));
        *hi = _mm256_or_si256(*hi, _mm256_andnot_si256(_mm256_cmpeq_epi8(hh, z), b16));
    }
}

/* Q4_K / Q5_K: the 8 scales (d * sc) and bias terms (-dmin * m) of the superblock at p */
INLINE void kq_scales(const uint8_t *p, float dsc[8], float bias[8]) {
    uint8_t sc[8], mn[8];
    kscales(p + 4, sc, mn);
    const __m256 d = _mm256_set1_ps(h2f(p)), dmin = _mm256_set1_ps(-h2f(p + 2));
    _mm256_storeu_ps(dsc, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)sc)))));
    _mm256_storeu_ps(bias, _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)mn)))));
}

/* Q4_K / Q5_K: the same as vectors */
INLINE void kq_scales_v(const uint8_t *p, __m256 *dsc, __m256 *bias) {
    uint8_t sc[8], mn[8];
    kscales(p + 4, sc, mn);
    *dsc = _mm256_mul_ps(_mm256_set1_ps(h2f(p)),
                         _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)sc))));
    *bias = _mm256_mul_ps(_mm256_set1_ps(-h2f(p + 2)),
                          _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)mn))));
}

/* Q6_K: codes of sub-blocks 4h .. 4h+3 of the superblock at p */
INLINE void q6_quad(const uint8_t *p, int h, __m256i q[4]) {
    const __m256i m4 = _mm256_set1_epi8(15), m3 = _mm256_set1_epi8(0x30);
    const __m256i l0 = _mm256_loadu_si256((const __m256i *)(p + 64 * h));
    const __m256i l1 = _mm256_loadu_si256((const __m256i *)(p + 64 * h + 32));
    const __m256i qh = _mm256_loadu_si256((const __m256i *)(p + 128 + 32 * h));
    q[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m3));
    q[1] = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m3));
    q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(qh, m3));
    q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                           _mm256_and_si256(_mm256_srli_epi16(qh, 2), m3));
}

INLINE void rows_kernel(const int T, const int MR, const nl_mat *w, const acts *A, int64_t m0, int64_t n0,
                        int64_t n1, float *y, int64_t ldy) {
    const int64_t kb = w->k / 32;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = w->data + n * w->row_bytes;
        __m256 acc0[4], acc1[4], bvec[4]; /* fixed sizes (MR <= 4): a VLA would keep them in memory */
        float bacc[4];
        for (int m = 0; m < MR; m++) {
            acc0[m] = acc1[m] = bvec[m] = _mm256_setzero_ps();
            bacc[m] = 0.0f;
        }
        if (T == NL_Q4_K || T == NL_Q5_K || T == NL_Q6_K) {
            /* per superblock: the 8 (Q6_K: 16) sub-block scales times dx as vectors, the bias terms as one FMA;
             * each block then broadcasts its lane */
            for (int64_t sb = 0; sb < kb / 8; sb++) {
                __m256 s_lo[4], s_hi[4];
                const int64_t b = sb * 8;
                if (T == NL_Q6_K) {
                    const uint8_t *p = row + sb * 210;
                    const __m128i sc = _mm_loadu_si128((const __m128i *)(p + 192));
                    const __m128i even = _mm_shuffle_epi8(sc, _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7,
                                                                            9, 11, 13, 15));
                    const __m256 d = _mm256_set1_ps(h2f(p + 208));
                    const __m256 dlo = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(even)));
                    const __m256 dhi = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(even, 8))));
                    for (int m = 0; m < MR; m++) {
                        const __m256 dx = _mm256_loadu_ps(A->d + (m0 + m) * A->kb + b);
                        s_lo[m] = _mm256_mul_ps(dlo, dx);
                        s_hi[m] = _mm256_mul_ps(dhi, dx);
                    }
                    for (int h = 0; h < 2; h++) {
                        __m256i q[4];
                        q6_quad(p, h, q);
                        for (int i = 0; i < 4; i++) {
                            const int j = 4 * h + i;
                            const __m256i lane = _mm256_set1_epi32(j);
                            for (int m = 0; m < MR; m++) {
                                const __m256i a =
                                    _mm256_loadu_si256((const __m256i *)(A->q + (m0 + m) * A->k + 32 * (b + j)));
                                /* offset 32 per lane: the two 16-halves have their own scales */
                                const __m256i ip = _mm256_sub_epi32(dot_us(q[i], a), dot_us(_mm256_set1_epi8(32), a));
                                const __m256 sc2 = _mm256_blend_ps(_mm256_permutevar8x32_ps(s_lo[m], lane),
                                                                   _mm256_permutevar8x32_ps(s_hi[m], lane), 0xF0);
                                __m256 *acc = (j & 1) ? acc1 : acc0;
                                acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ip), sc2, acc[m]);
                            }
                        }
                    }
                } else {
                    const int five = T == NL_Q5_K;
                    const uint8_t *p = row + sb * (five ? 176 : 144);
                    __m256 dsc, bias;
                    kq_scales_v(p, &dsc, &bias);
                    for (int m = 0; m < MR; m++) {
                        s_lo[m] = _mm256_mul_ps(dsc, _mm256_loadu_ps(A->d + (m0 + m) * A->kb + b));
                        bvec[m] = _mm256_fmadd_ps(bias, _mm256_loadu_ps(A->s + (m0 + m) * A->kb + b), bvec[m]);
                    }
                    for (int jj = 0; jj < 4; jj++) {
                        __m256i lohi[2];
                        kq_pair(five, p, jj, &lohi[0], &lohi[1]);
                        for (int i = 0; i < 2; i++) {
                            const int j = 2 * jj + i;
                            const __m256i lane = _mm256_set1_epi32(j);
                            for (int m = 0; m < MR; m++) {
                                const __m256i a =
                                    _mm256_loadu_si256((const __m256i *)(A->q + (m0 + m) * A->k + 32 * (b + j)));
                                __m256 *acc = i ? acc1 : acc0;
                                acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_us(lohi[i], a)),
                                                         _mm256_permutevar8x32_ps(s_lo[m], lane), acc[m]);
                            }
                        }
                    }
                }
            }
        } else {
            /* 8 blocks at a time: their fp16 scales converted and multiplied by dx as one vector, the bias
             * terms as one FMA; each block then broadcasts its lane */
            const int bs = T_BYTES(T);
            int64_t b = 0;
            for (; b + 8 <= kb; b += 8) {
                const uint8_t *p = row + b * bs;
                __m128i dh = _mm_setzero_si128(), mh = _mm_setzero_si128();
#define NL_GATHER(J)                                                                                            \
    dh = _mm_insert_epi16(dh, ld16(p + (J) * bs), J);                                                           \
    if (T_BIAS(T)) mh = _mm_insert_epi16(mh, ld16(p + (J) * bs + 2), J);
                NL_GATHER(0) NL_GATHER(1) NL_GATHER(2) NL_GATHER(3) NL_GATHER(4) NL_GATHER(5) NL_GATHER(6)
                NL_GATHER(7)
#undef NL_GATHER
                const __m256 dv = _mm256_cvtph_ps(dh);
                /* w = d * (code - off) (+ bias): the -off * d * dx * sum(q) and bias * dx * sum(q) terms of all 8
                 * blocks are one FMA with s = dx * sum(q). Q8_0 takes that route (code = q ^ 0x80, off 128) only
                 * with VNNI: maddubs would saturate on codes above 127 and uses the sign trick instead. */
                const int off = T == NL_Q8_0 && !HAS_VNNI ? 0 : T_OFF(T);
                __m256 bw = _mm256_setzero_ps();
                if (T_BIAS(T)) bw = _mm256_cvtph_ps(mh);
                if (off) bw = _mm256_mul_ps(dv, _mm256_set1_ps((float)-off));
                __m256 sv[4];
                for (int m = 0; m < MR; m++) {
                    sv[m] = _mm256_mul_ps(dv, _mm256_loadu_ps(A->d + (m0 + m) * A->kb + b));
                    if (T_BIAS(T) || off)
                        bvec[m] = _mm256_fmadd_ps(bw, _mm256_loadu_ps(A->s + (m0 + m) * A->kb + b), bvec[m]);
                }
#pragma GCC unroll 8
                for (int j = 0; j < 8; j++) {
                    __m256i codes = simple_codes(T, p + j * bs);
                    const __m256i lane = _mm256_set1_epi32(j);
                    const __m256i ucodes = T == NL_Q8_0 && !off ? _mm256_abs_epi8(codes) : codes;
                    if (T == NL_Q8_0 && off) codes = _mm256_xor_si256(codes, _mm256_set1_epi8((char)0x80));
                    for (int m = 0; m < MR; m++) {
                        const __m256i a = _mm256_loadu_si256((const __m256i *)(A->q + (m0 + m) * A->k + 32 * (b + j)));
                        __m256i ip;
                        if (T == NL_Q8_0 && !off) ip = dot_us(ucodes, _mm256_sign_epi8(a, codes));
                        else ip = dot_us(codes, a);
                        __m256 *acc = (j & 1) ? acc1 : acc0;
                        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ip), _mm256_permutevar8x32_ps(sv[m], lane), acc[m]);
                    }
                }
            }
            for (; b < kb; b++) {
                __m256i c0;
                float d0 = 0, bi0 = 0;
                simple_block(T, row + b * bs, &c0, &d0, &bi0);
                rows_step(T, MR, c0, d0, bi0, A, m0, b, (b & 1) ? acc1 : acc0, bacc);
            }
        }
        for (int m = 0; m < MR; m++)
            y[(m0 + m) * ldy + n] = hsum8(_mm256_add_ps(_mm256_add_ps(acc0[m], acc1[m]), bvec[m])) + bacc[m];
    }
}

/* SIMD version of unpack_row (codes as unsigned bytes, see the top) for the gemm packer. */
INLINE void unpack_row_t(const int T, const uint8_t *row, int64_t k, uint8_t *codes, float *d16, float *bias) {
    const int64_t kb = k / 32;
    if (T == NL_Q4_K || T == NL_Q5_K) {
        const int five = T == NL_Q5_K;
        for (int64_t sb = 0; sb < kb / 8; sb++) {
            const uint8_t *p = row + sb * (five ? 176 : 144);
            float dsc[8];
            kq_scales(p, dsc, bias + 8 * sb);
            for (int j = 0; j < 4; j++) {
                __m256i lo, hi;
                kq_pair(five, p, j, &lo, &hi);
                _mm256_storeu_si256((__m256i *)(codes + 256 * sb + 64 * j), lo);
                _mm256_storeu_si256((__m256i *)(codes + 256 * sb + 64 * j + 32), hi);
            }
            for (int j = 0; j < 8; j++) d16[16 * sb + 2 * j] = d16[16 * sb + 2 * j + 1] = dsc[j];
        }
    } else if (T == NL_Q6_K) {
        for (int64_t sb = 0; sb < kb / 8; sb++) {
            const uint8_t *p = row + sb * 210;
            const float d = h2f(p + 208);
            for (int h = 0; h < 2; h++) {
                __m256i q[4];
                q6_quad(p, h, q);
                for (int i = 0; i < 4; i++) _mm256_storeu_si256((__m256i *)(codes + 256 * sb + 128 * h + 32 * i), q[i]);
            }
            const __m128i sc = _mm_loadu_si128((const __m128i *)(p + 192));
            const __m256 vd = _mm256_set1_ps(d);
            _mm256_storeu_ps(d16 + 16 * sb, _mm256_mul_ps(vd, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc))));
            _mm256_storeu_ps(d16 + 16 * sb + 8,
                             _mm256_mul_ps(vd, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8)))));
            for (int j = 0; j < 8; j++) bias[8 * sb + j] = 0.0f;
        }
    } else {
        const int bs = T_BYTES(T);
        for (int64_t b = 0; b < kb; b++) {
            __m256i c;
            float d = 0, bi = 0;
            simple_block(T, row + b * bs, &c, &d, &bi);
            if (T == NL_Q8_0) c = _mm256_xor_si256(c, _mm256_set1_epi8((char)0x80));
            _mm256_storeu_si256((__m256i *)(codes + 32 * b), c);
            d16[2 * b] = d16[2 * b + 1] = d;
            bias[b] = bi;
        }
    }
}
#define HAVE_FAST_UNPACK 1

/* F16 weights: float FMA on converted rows (no activation quantization). */
static void rows_f16(const nl_mat *w, const float *x, int64_t m, int64_t n0, int64_t n1, float *y) {
    const int64_t k = w->k;
    for (int64_t n = n0; n < n1; n++) {
        const uint16_t *r = (const uint16_t *)(w->data + n * w->row_bytes);
        for (int64_t mi = 0; mi < m; mi++) {
            const float *xr = x + mi * k;
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            int64_t i = 0;
            for (; i + 16 <= k; i += 16) {
                a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r + i))),
                                     _mm256_loadu_ps(xr + i), a0);
                a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r + i + 8))),
                                     _mm256_loadu_ps(xr + i + 8), a1);
            }
            float s = hsum8(_mm256_add_ps(a0, a1));
            for (; i < k; i++) s += _cvtsh_ss(r[i]) * xr[i];
            y[mi * w->n + n] = s;
        }
    }
}
#define HAVE_ROWS_F16 1

#elif defined(NL_NEON)

INLINE int32x4_t dot16(int8x16_t a, int8x16_t b) {
#if defined(NL_NEON_DOT)
    return vdotq_s32(vdupq_n_s32(0), a, b);
#else
    const int16x8_t p0 = vmull_s8(vget_low_s8(a), vget_low_s8(b)), p1 = vmull_high_s8(a, b);
    return vaddq_s32(vpaddlq_s16(p0), vpaddlq_s16(p1));
#endif
}

INLINE uint8x16_t bits16(uint32_t x) { /* byte i = 16 if bit i of the low 16 bits of x is set */
    const uint8x16_t t = vcombine_u8(vdup_n_u8((uint8_t)x), vdup_n_u8((uint8_t)(x >> 8)));
    const uint8x16_t bm = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    return vandq_u8(vtstq_u8(t, bm), vdupq_n_u8(16));
}

INLINE int8x16_t sgn(uint8x16_t c, int off) { return vsubq_s8(vreinterpretq_s8_u8(c), vdupq_n_s8((int8_t)off)); }

INLINE int32x4_t dot32(int8x16_t lo, int8x16_t hi, int8x16_t a0, int8x16_t a1) {
#if defined(NL_NEON_DOT)
    return vdotq_s32(vdotq_s32(vdupq_n_s32(0), lo, a0), hi, a1);
#else
    return vaddq_s32(dot16(lo, a0), dot16(hi, a1));
#endif
}

INLINE int ld16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

/* signed codes (code - off) of a Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 block: values 0..15 in lo, 16..31 in hi */
INLINE void simple_codes(const int T, const uint8_t *p, int8x16_t *lo, int8x16_t *hi) {
    if (T == NL_Q8_0) {
        *lo = vld1q_s8((const int8_t *)p + 2);
        *hi = vld1q_s8((const int8_t *)p + 18);
        return;
    }
    const int bs = T_BYTES(T);
    const uint8x16_t v = vld1q_u8(p + bs - 16), m4 = vdupq_n_u8(15);
    uint8x16_t l = vandq_u8(v, m4), h = vshrq_n_u8(v, 4);
    if (T == NL_Q5_0 || T == NL_Q5_1) {
        const uint32_t qh = le32(p + bs - 20);
        l = vorrq_u8(l, bits16(qh));
        h = vorrq_u8(h, bits16(qh >> 16));
    }
    *lo = sgn(l, T_OFF(T));
    *hi = sgn(h, T_OFF(T));
}

/* One 32-block (signed codes lo/hi for values 0..15 / 16..31, scale d, bias) into MR activation rows: the tail of
 * the 4-block loop below. */
INLINE void rows_step(const int T, const int MR, int8x16_t lo, int8x16_t hi, float d, float bias, const acts *A,
                      int64_t m0, int64_t b, float32x4_t *acc, float *bacc) {
    for (int m = 0; m < MR; m++) {
        const int8_t *a = A->q + (m0 + m) * A->k + 32 * b;
        const float dx = A->d[(m0 + m) * A->kb + b];
        acc[m] = vfmaq_n_f32(acc[m], vcvtq_f32_s32(dot32(lo, hi, vld1q_s8(a), vld1q_s8(a + 16))), d * dx);
        if (T_BIAS(T)) bacc[m] += bias * A->s[(m0 + m) * A->kb + b];
    }
}

INLINE void rows_kernel(const int T, const int MR, const nl_mat *w, const acts *A, int64_t m0, int64_t n0,
                        int64_t n1, float *y, int64_t ldy) {
    const int64_t kb = w->k / 32;
    const uint8x16_t m4 = vdupq_n_u8(15);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = w->data + n * w->row_bytes;
        float32x4_t acc0[4], acc1[4], bvec[4]; /* fixed sizes (MR <= 4): a VLA would keep them in memory */
        float bacc[4];
        for (int m = 0; m < MR; m++) {
            acc0[m] = acc1[m] = bvec[m] = vdupq_n_f32(0);
            bacc[m] = 0.0f;
        }
        if (T == NL_Q4_K || T == NL_Q5_K) {
            /* per superblock: the 8 sub-block scales times dx as vectors (kept in a small array for by-element
             * FMAs), the bias terms as two FMAs */
            const int five = T == NL_Q5_K;
            for (int64_t sb = 0; sb < kb / 8; sb++) {
                const uint8_t *p = row + sb * (five ? 176 : 144), *qs = p + (five ? 48 : 16);
                const int64_t b = sb * 8;
                uint8_t sc[8], mn[8];
                kscales(p + 4, sc, mn);
                const float32x4_t d = vdupq_n_f32(h2f(p)), dm = vdupq_n_f32(-h2f(p + 2));
                const uint16x8_t sc16 = vmovl_u8(vld1_u8(sc)), mn16 = vmovl_u8(vld1_u8(mn));
                const float32x4_t s0 = vmulq_f32(d, vcvtq_f32_u32(vmovl_u16(vget_low_u16(sc16))));
                const float32x4_t s1 = vmulq_f32(d, vcvtq_f32_u32(vmovl_u16(vget_high_u16(sc16))));
                const float32x4_t b0 = vmulq_f32(dm, vcvtq_f32_u32(vmovl_u16(vget_low_u16(mn16))));
                const float32x4_t b1 = vmulq_f32(dm, vcvtq_f32_u32(vmovl_u16(vget_high_u16(mn16))));
                float sdx[4][8];
                for (int m = 0; m < MR; m++) {
                    const float *dx = A->d + (m0 + m) * A->kb + b, *sx = A->s + (m0 + m) * A->kb + b;
                    vst1q_f32(sdx[m], vmulq_f32(s0, vld1q_f32(dx)));
                    vst1q_f32(sdx[m] + 4, vmulq_f32(s1, vld1q_f32(dx + 4)));
                    bvec[m] = vfmaq_f32(vfmaq_f32(bvec[m], b0, vld1q_f32(sx)), b1, vld1q_f32(sx + 4));
                }
                const uint8x16_t qh0 = vld1q_u8(p + 16), qh1 = vld1q_u8(p + 32), b16 = vdupq_n_u8(16);
                for (int j = 0; j < 4; j++) {
                    const uint8x16_t v0 = vld1q_u8(qs + 32 * j), v1 = vld1q_u8(qs + 32 * j + 16);
                    uint8x16_t l0 = vandq_u8(v0, m4), l1 = vandq_u8(v1, m4), h0 = vshrq_n_u8(v0, 4),
                               h1 = vshrq_n_u8(v1, 4);
                    if (five) {
                        const int8x16_t sl = vdupq_n_s8((int8_t)(4 - 2 * j)), sh = vdupq_n_s8((int8_t)(3 - 2 * j));
                        l0 = vorrq_u8(l0, vandq_u8(vshlq_u8(qh0, sl), b16));
                        l1 = vorrq_u8(l1, vandq_u8(vshlq_u8(qh1, sl), b16));
                        h0 = vorrq_u8(h0, vandq_u8(vshlq_u8(qh0, sh), b16));
                        h1 = vorrq_u8(h1, vandq_u8(vshlq_u8(qh1, sh), b16));
                    }
                    for (int m = 0; m < MR; m++) {
                        const int8_t *a = A->q + (m0 + m) * A->k + 32 * (b + 2 * j);
                        const int32x4_t il = dot32(vreinterpretq_s8_u8(l0), vreinterpretq_s8_u8(l1), vld1q_s8(a),
                                                   vld1q_s8(a + 16));
                        const int32x4_t ih = dot32(vreinterpretq_s8_u8(h0), vreinterpretq_s8_u8(h1), vld1q_s8(a + 32),
                                                   vld1q_s8(a + 48));
                        acc0[m] = vfmaq_n_f32(acc0[m], vcvtq_f32_s32(il), sdx[m][2 * j]);
                        acc1[m] = vfmaq_n_f32(acc1[m], vcvtq_f32_s32(ih), sdx[m][2 * j + 1]);
                    }
                }
            }
        } else if (T == NL_Q6_K) {
            /* scales of the first and second 16 values of each sub-block, times dx, as vectors */
            const uint8x16_t m3 = vdupq_n_u8(0x30);
            for (int64_t sb = 0; sb < kb / 8; sb++) {
                const uint8_t *p = row + sb * 210;
                const int64_t b0 = sb * 8;
                const int8x16_t scv = vld1q_s8((const int8_t *)(p + 192));
                const int8x16x2_t uz = vuzpq_s8(scv, scv); /* even (first halves), odd (second halves) */
                const float32x4_t d = vdupq_n_f32(h2f(p + 208));
                const int16x8_t ev = vmovl_s8(vget_low_s8(uz.val[0])), od = vmovl_s8(vget_low_s8(uz.val[1]));
                const float32x4_t e0 = vmulq_f32(d, vcvtq_f32_s32(vmovl_s16(vget_low_s16(ev))));
                const float32x4_t e1 = vmulq_f32(d, vcvtq_f32_s32(vmovl_s16(vget_high_s16(ev))));
                const float32x4_t o0 = vmulq_f32(d, vcvtq_f32_s32(vmovl_s16(vget_low_s16(od))));
                const float32x4_t o1 = vmulq_f32(d, vcvtq_f32_s32(vmovl_s16(vget_high_s16(od))));
                float slo[4][8], shi[4][8];
                for (int m = 0; m < MR; m++) {
                    const float *dx = A->d + (m0 + m) * A->kb + b0;
                    const float32x4_t x0 = vld1q_f32(dx), x1 = vld1q_f32(dx + 4);
                    vst1q_f32(slo[m], vmulq_f32(e0, x0));
                    vst1q_f32(slo[m] + 4, vmulq_f32(e1, x1));
                    vst1q_f32(shi[m], vmulq_f32(o0, x0));
                    vst1q_f32(shi[m] + 4, vmulq_f32(o1, x1));
                }
                for (int h = 0; h < 2; h++) {
                    const uint8_t *ql = p + 64 * h, *qhp = p + 128 + 32 * h;
                    const uint8x16_t l00 = vld1q_u8(ql), l01 = vld1q_u8(ql + 16), l10 = vld1q_u8(ql + 32),
                                     l11 = vld1q_u8(ql + 48), qh0 = vld1q_u8(qhp), qh1 = vld1q_u8(qhp + 16);
                    int8x16_t q[4][2];
                    q[0][0] = sgn(vorrq_u8(vandq_u8(l00, m4), vandq_u8(vshlq_n_u8(qh0, 4), m3)), 32);
                    q[0][1] = sgn(vorrq_u8(vandq_u8(l01, m4), vandq_u8(vshlq_n_u8(qh1, 4), m3)), 32);
                    q[1][0] = sgn(vorrq_u8(vandq_u8(l10, m4), vandq_u8(vshlq_n_u8(qh0, 2), m3)), 32);
                    q[1][1] = sgn(vorrq_u8(vandq_u8(l11, m4), vandq_u8(vshlq_n_u8(qh1, 2), m3)), 32);
                    q[2][0] = sgn(vorrq_u8(vshrq_n_u8(l00, 4), vandq_u8(qh0, m3)), 32);
                    q[2][1] = sgn(vorrq_u8(vshrq_n_u8(l01, 4), vandq_u8(qh1, m3)), 32);
                    q[3][0] = sgn(vorrq_u8(vshrq_n_u8(l10, 4), vandq_u8(vshrq_n_u8(qh0, 2), m3)), 32);
                    q[3][1] = sgn(vorrq_u8(vshrq_n_u8(l11, 4), vandq_u8(vshrq_n_u8(qh1, 2), m3)), 32);
                    for (int i = 0; i < 4; i++) {
                        const int j = 4 * h + i;
                        for (int m = 0; m < MR; m++) {
                            const int8_t *a = A->q + (m0 + m) * A->k + 32 * (b0 + j);
                            float32x4_t *acc = (i & 1) ? acc1 : acc0;
                            acc[m] = vfmaq_n_f32(acc[m], vcvtq_f32_s32(dot16(q[i][0], vld1q_s8(a))), slo[m][j]);
                            acc[m] = vfmaq_n_f32(acc[m], vcvtq_f32_s32(dot16(q[i][1], vld1q_s8(a + 16))), shi[m][j]);
                        }
                    }
                }
            }
        } else {
            /* 4 blocks at a time: fp16 scales converted and multiplied by dx as one vector, bias terms as one
             * FMA; each block then uses its lane (lane-indexed FMA) */
            const int bs = T_BYTES(T);
            int64_t b = 0;
            for (; b + 4 <= kb; b += 4) {
                const uint8_t *p = row + b * bs;
                uint16x4_t dh = vdup_n_u16(0), mh = vdup_n_u16(0);
                dh = vset_lane_u16((uint16_t)ld16(p), dh, 0);
                dh = vset_lane_u16((uint16_t)ld16(p + bs), dh, 1);
                dh = vset_lane_u16((uint16_t)ld16(p + 2 * bs), dh, 2);
                dh = vset_lane_u16((uint16_t)ld16(p + 3 * bs), dh, 3);
                if (T_BIAS(T)) {
                    mh = vset_lane_u16((uint16_t)ld16(p + 2), mh, 0);
                    mh = vset_lane_u16((uint16_t)ld16(p + bs + 2), mh, 1);
                    mh = vset_lane_u16((uint16_t)ld16(p + 2 * bs + 2), mh, 2);
                    mh = vset_lane_u16((uint16_t)ld16(p + 3 * bs + 2), mh, 3);
                }
                const float32x4_t dv = vcvt_f32_f16(vreinterpret_f16_u16(dh));
                float32x4_t sv[4];
                for (int m = 0; m < MR; m++) {
                    sv[m] = vmulq_f32(dv, vld1q_f32(A->d + (m0 + m) * A->kb + b));
                    if (T_BIAS(T))
                        bvec[m] = vfmaq_f32(bvec[m], vcvt_f32_f16(vreinterpret_f16_u16(mh)),
                                            vld1q_f32(A->s + (m0 + m) * A->kb + b));
                }
#define NL_BLOCK(J)                                                                                             \
    {                                                                                                           \
        int8x16_t lo, hi;                                                                                       \
        simple_codes(T, p + (J) * bs, &lo, &hi);                                                                \
        for (int m = 0; m < MR; m++) {                                                                          \
            const int8_t *a = A->q + (m0 + m) * A->k + 32 * (b + (J));                                          \
            const int32x4_t ip = dot32(lo, hi, vld1q_s8(a), vld1q_s8(a + 16));                                  \
            float32x4_t *acc = ((J) & 1) ? acc1 : acc0;                                                         \
            acc[m] = vfmaq_laneq_f32(acc[m], vcvtq_f32_s32(ip), sv[m], J);                                      \
        }                                                                                                       \
    }
                NL_BLOCK(0) NL_BLOCK(1) NL_BLOCK(2) NL_BLOCK(3)
#undef NL_BLOCK
            }
            for (; b < kb; b++) {
                const uint8_t *p = row + b * bs;
                int8x16_t lo, hi;
                simple_codes(T, p, &lo, &hi);
                const float d = h2f(p), bias = T_BIAS(T) ? h2f(p + 2) : 0.0f;
                rows_step(T, MR, lo, hi, d, bias, A, m0, b, (b & 1) ? acc1 : acc0, bacc);
            }
        }
        for (int m = 0; m < MR; m++)
            y[(m0 + m) * ldy + n] = vaddvq_f32(vaddq_f32(vaddq_f32(acc0[m], acc1[m]), bvec[m])) + bacc[m];
    }
}

static void rows_f16(const nl_mat *w, const float *x, int64_t m, int64_t n0, int64_t n1, float *y) {
    const int64_t k = w->k;
    for (int64_t n = n0; n < n1; n++) {
        const __fp16 *r = (const __fp16 *)(w->data + n * w->row_bytes);
        for (int64_t mi = 0; mi < m; mi++) {
            const float *xr = x + mi * k;
            float32x4_t a0 = vdupq_n_f32(0), a1 = vdupq_n_f32(0);
            int64_t i = 0;
            for (; i + 8 <= k; i += 8) {
                const float16x8_t h = vld1q_f16(r + i);
                a0 = vfmaq_f32(a0, vcvt_f32_f16(vget_low_f16(h)), vld1q_f32(xr + i));
                a1 = vfmaq_f32(a1, vcvt_high_f32_f16(h), vld1q_f32(xr + i + 4));
            }
            float s = vaddvq_f32(vaddq_f32(a0, a1));
            for (; i < k; i++) s += (float)r[i] * xr[i];
            y[mi * w->n + n] = s;
        }
    }
}
#define HAVE_ROWS_F16 1

#else /* scalar */

INLINE void rows_kernel(const int T, const int MR, const nl_mat *w, const acts *A, int64_t m0, int64_t n0,
                        int64_t n1, float *y, int64_t ldy) {
    (void)T;
    const int64_t k = w->k, kb = k / 32;
    const int off = tinfo(w->type)->off;
    /* one small buffer per call (a task of >= 16 rows): negligible next to the scalar arithmetic */
    char buf[(k + 15) / 16 * 16 + kb * 12];
    uint8_t *codes = (uint8_t *)buf;
    float *d16 = (float *)(buf + (k + 15) / 16 * 16), *bias = d16 + 2 * kb;
    for (int64_t n = n0; n < n1; n++) {
        unpack_row(w->type, w->data + n * w->row_bytes, k, codes, d16, bias);
        for (int m = 0; m < MR; m++) {
            const int8_t *a = A->q + (m0 + m) * k;
            float acc = 0.0f;
            for (int64_t b = 0; b < kb; b++) {
                int32_t s0 = 0, s1 = 0;
                for (int i = 0; i < 16; i++) s0 += ((int)codes[32 * b + i] - off) * a[32 * b + i];
                for (int i = 16; i < 32; i++) s1 += ((int)codes[32 * b + i] - off) * a[32 * b + i];
                const float dx = A->d[(m0 + m) * kb + b];
                acc += dx * (d16[2 * b] * (float)s0 + d16[2 * b + 1] * (float)s1) +
                       bias[b] * A->s[(m0 + m) * kb + b];
            }
            y[(m0 + m) * ldy + n] = acc;
        }
    }
}
#endif

#ifndef HAVE_ROWS_F16
static void rows_f16(const nl_mat *w, const float *x, int64_t m, int64_t n0, int64_t n1, float *y) {
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *r = w->data + n * w->row_bytes;
        for (int64_t mi = 0; mi < m; mi++) {
            float s = 0.0f;
            for (int64_t i = 0; i < w->k; i++) s += h2f(r + 2 * i) * x[mi * w->k + i];
            y[mi * w->n + n] = s;
        }
    }
}
#endif

/* M in chunks of up to 4 rows; T and MR are compile-time constants inside each instance. */
#define ROWS_ALL_MR(T)                                                                                          \
    static void rows_##T(const nl_mat *w, const acts *A, int64_t m, int64_t n0, int64_t n1, float *y) {        \
        int64_t m0 = 0;                                                                                         \
        for (; m0 + 4 <= m; m0 += 4) rows_kernel(T, 4, w, A, m0, n0, n1, y, w->n);                             \
        switch (m - m0) {                                                                                       \
        case 3: rows_kernel(T, 3, w, A, m0, n0, n1, y, w->n); break;                                          \
        case 2: rows_kernel(T, 2, w, A, m0, n0, n1, y, w->n); break;                                          \
        case 1: rows_kernel(T, 1, w, A, m0, n0, n1, y, w->n); break;                                          \
        }                                                                                                       \
    }
ROWS_ALL_MR(NL_Q4_0)
ROWS_ALL_MR(NL_Q4_1)
ROWS_ALL_MR(NL_Q5_0)
ROWS_ALL_MR(NL_Q5_1)
ROWS_ALL_MR(NL_Q8_0)
ROWS_ALL_MR(NL_Q4_K)
ROWS_ALL_MR(NL_Q5_K)
ROWS_ALL_MR(NL_Q6_K)

static void rows_task(void *ctx, int64_t t, int tid) {
    (void)tid;
    rows_ctx *c = ctx;
    const nl_mat *w = c->w;
    const int64_t n0 = t * c->rows_per_task, n1 = n0 + c->rows_per_task < w->n ? n0 + c->rows_per_task : w->n;
    switch (w->type) {
    case NL_Q4_0: rows_NL_Q4_0(w, c->a, c->m, n0, n1, c->y); break;
    case NL_Q4_1: rows_NL_Q4_1(w, c->a, c->m, n0, n1, c->y); break;
    case NL_Q5_0: rows_NL_Q5_0(w, c->a, c->m, n0, n1, c->y); break;
    case NL_Q5_1: rows_NL_Q5_1(w, c->a, c->m, n0, n1, c->y); break;
    case NL_Q8_0: rows_NL_Q8_0(w, c->a, c->m, n0, n1, c->y); break;
    case NL_Q4_K: rows_NL_Q4_K(w, c->a, c->m, n0, n1, c->y); break;
    case NL_Q5_K: rows_NL_Q5_K(w, c->a, c->m, n0, n1, c->y); break;
    case NL_Q6_K: rows_NL_Q6_K(w, c->a, c->m, n0, n1, c->y); break;
    case NL_F16: rows_f16(w, c->x, c->m, n0, n1, c->y); break;
    }
    if (c->yout) fold_residual(c->y, c->yout, c->m_out, w->n, n0, n1);
}

#ifdef HAVE_FAST_UNPACK
static void unpack_row_fast(int type, const uint8_t *row, int64_t k, uint8_t *codes, float *d16, float *bias) {
    switch (type) {
    case NL_Q4_0: unpack_row_t(NL_Q4_0, row, k, codes, d16, bias); break;
    case NL_Q4_1: unpack_row_t(NL_Q4_1, row, k, codes, d16, bias); break;
    case NL_Q5_0: unpack_row_t(NL_Q5_0, row, k, codes, d16, bias); break;
    case NL_Q5_1: unpack_row_t(NL_Q5_1, row, k, codes, d16, bias); break;
    case NL_Q8_0: unpack_row_t(NL_Q8_0, row, k, codes, d16, bias); break;
    case NL_Q4_K: unpack_row_t(NL_Q4_K, row, k, codes, d16, bias); break;
    case NL_Q5_K: unpack_row_t(NL_Q5_K, row, k, codes, d16, bias); break;
    case NL_Q6_K: unpack_row_t(NL_Q6_K, row, k, codes, d16, bias); break;
    default: unpack_row(type, row, k, codes, d16, bias); break;
    }
}
#else
#define unpack_row_fast unpack_row
#endif

/* ------------------------------------------------------------------------------------------------------------ */
/* NEON's sdot multiplies signed bytes: there the panels hold codes minus their offset                          */

#if defined(NL_X86_GEMM)
#define SIGNED_CODES 0
#elif defined(NL_NEON_GEMM)
#define SIGNED_CODES 1
#endif

/* ------------------------------------------------------------------------------------------------------------ */
/* packed: the weight repacked once at load into 16-row panels, so that one VNNI instruction multiplies 4 inputs   */
/* of 16 output rows by one activation row. The rows kernel spends ~4 instructions per (32-block, output, row of   */
/* x) and the gemm repacks on every call; here a pass of M = 8 costs little more than M = 1 (the point of         */
/* batched decode and speculative verification). Per (panel, 32-block): codes as [group of 4][row][4] bytes         */
/* (4-bit types: two groups per byte, low nibbles the even group), scales [half][row], bias [row] (see PK_F16).     */
/* Q4_0, Q4_1 and Q8_0 keep their GGUF size; Q4_K grows by a third, 5- and 6-bit types to ~1.1-1.25 bytes/weight.  */

#if defined(NL_X86_GEMM) || defined(NL_NEON_GEMM)
#define PK_NIB(T) ((T) == NL_Q4_0 || (T) == NL_Q4_1 || (T) == NL_Q4_K)
/* scales (and bias) as float16 where the type stores them so (exact; then Q4_0, Q4_1 and Q8_0 keep their GGUF size),
 * float32 where they are products (K-quants: d * a 6- or 8-bit scale) */
#define PK_F16(T) ((T) == NL_Q4_0 || (T) == NL_Q4_1 || (T) == NL_Q5_0 || (T) == NL_Q5_1 || (T) == NL_Q8_0)
#define HAVE_PACKED 1

static int64_t pk_block_bytes(int type) {
    const type_info *ti = tinfo(type);
    return (PK_NIB(type) ? 256 : 512) + (PK_F16(type) ? 32 : 64) * (ti->halves + ti->bias);
}

INLINE uint16_t f2h(float x) { /* exact for the values PK_F16 stores: they were float16 */
#if defined(__F16C__)
    return _cvtss_sh(x, 0);
#else
    __fp16 h = (__fp16)x;
    uint16_t u;
    memcpy(&u, &h, 2);
    return u;
#endif
}

typedef struct {
    const nl_mat *w;
    uint8_t *out;
    int64_t panels_per_task;
    int drop; /* the source rows are a read-only file mapping: drop their pages once packed */
} pk_pack_ctx;

/* Let the kernel drop the whole pages inside [p, p + n) of a file mapping (read back from the file if touched) */
static void drop_pages(const uint8_t *p, int64_t n) {
#if defined(MADV_DONTNEED) && !defined(NL_NO_THREADS)
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    const uintptr_t a = ((uintptr_t)p + page - 1) & ~(page - 1), b = ((uintptr_t)p + (uintptr_t)n) & ~(page - 1);
    if (b > a) madvise((void *)a, b - a, MADV_DONTNEED);
#else
    (void)p, (void)n;
#endif
}

#define PK_TMP_BYTES(k) ((size_t)(16 * (k) + 64) + (size_t)(16 * 3 * ((k) / 32)) * 4) /* pk_pack_panels' tmp */

/* Panels p0 .. p1 of W into out (panel p at out + (p - p0) * its bytes); tmp: PK_TMP_BYTES(k), 64-byte aligned */
static void pk_pack_panels(const nl_mat *w, int64_t p0, int64_t p1, uint8_t *out, void *tmp) {
    const int64_t k = w->k, kb = k / 32, bb = pk_block_bytes(w->type);
    const type_info *ti = tinfo(w->type);
    const int nib = PK_NIB(w->type), cb = nib ? 256 : 512, H = ti->halves, f16 = PK_F16(w->type);
    uint8_t *codes = tmp;
    float *d16 = (float *)(codes + 16 * k + 64), *bias = d16 + 16 * 2 * kb;
    for (int64_t p = p0; p < p1; p++) {
        for (int r = 0; r < 16; r++) {
            const int64_t n = 16 * p + r;
            if (n < w->n) unpack_row_fast(w->type, w->data + n * w->row_bytes, k, codes + r * k, d16 + r * 2 * kb,
                                          bias + r * kb);
            else { /* padding rows: zero scales, so they add nothing */
                memset(codes + r * k, 0, (size_t)k);
                memset(d16 + r * 2 * kb, 0, (size_t)(2 * kb) * 4);
                memset(bias + r * kb, 0, (size_t)kb * 4);
            }
        }
        for (int64_t b = 0; b < kb; b++) {
            uint8_t *pb = out + ((p - p0) * kb + b) * bb;
            float *ps = (float *)(pb + cb);
            uint16_t *ph = (uint16_t *)(pb + cb);
            for (int r = 0; r < 16; r++) {
                const uint8_t *src = codes + r * k + 32 * b;
                for (int g = 0; g < 8; g++)
                    for (int i = 0; i < 4; i++) {
                        const uint8_t v = (uint8_t)(src[4 * g + i] - (SIGNED_CODES ? ti->off : 0)) & (nib ? 15 : 255);
                        if (!nib) pb[64 * g + 4 * r + i] = v;
                        else if (g % 2 == 0) pb[64 * (g / 2) + 4 * r + i] = v;
                        else pb[64 * (g / 2) + 4 * r + i] |= (uint8_t)(v << 4);
                    }
                for (int h = 0; h < H; h++) {
                    if (f16) ph[16 * h + r] = f2h(d16[r * 2 * kb + 2 * b + h]);
                    else ps[16 * h + r] = d16[r * 2 * kb + 2 * b + h];
                }
                if (ti->bias && f16) ph[16 * H + r] = f2h(bias[r * kb + b]);
                else if (ti->bias) ps[16 * H + r] = bias[r * kb + b];
            }
        }
    }
}

static void pk_pack_task(void *ctx, int64_t t, int tid) {
    (void)tid;
    pk_pack_ctx *c = ctx;
    const nl_mat *w = c->w;
    const int64_t np = (w->n + 15) / 16, p0 = t * c->panels_per_task;
    const int64_t p1 = p0 + c->panels_per_task < np ? p0 + c->panels_per_task : np;
    pk_pack_panels(w, p0, p1, c->out + p0 * (w->k / 32) * pk_block_bytes(w->type), g_scr[tid][SCR_ROW]);
    if (c->drop) /* now, not after the whole weight: the file's pages and the copy never all coexist */
        drop_pages(w->data + 16 * p0 * w->row_bytes, ((16 * p1 < w->n ? 16 * p1 : w->n) - 16 * p0) * w->row_bytes);
}

/* MR activation rows x NP panels (2, or 1 at the tail) of the packed weight, from panel address `panel` on. */
#if defined(NL_X86_GEMM)
/* The next pair of panels is fetched while this pair computes: in a memory-bound pass (the weights stream from
   DRAM once per token) the hardware prefetcher alone leaves the multiply waiting on the first row tile of each
   pair and the memory idle during the others. The ntiles tiles of a pair share the fetch, one block of the next
   pair every ntiles iterations each. */
INLINE void pk_prefetch(const uint8_t *pf, int64_t pstride, int64_t kb, int bb, int ntiles, int tile, int64_t b) {
    const int64_t t = tile * kb + b;
    if (t % ntiles) return;
    const uint8_t *q = pf + t / ntiles * bb;
    for (int o = 0; o < bb; o += 64) {
        __builtin_prefetch(q + o, 0, 2); /* into L2 (prefetcht1): into L1 it slowed single-row passes */
        __builtin_prefetch(q + pstride + o, 0, 2);
    }
}

#define PK_MR 4
INLINE __m512 pk_scales(const int F16, const uint8_t *p) { /* 16 scales of a panel */
    return F16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)) : _mm512_loadu_ps((const float *)p);
}

INLINE void pk_tile(const int NIB, const int F16, const int OFF, const int BIAS, const int H, const int MR, const int NP,
                    const uint8_t *panel, int64_t pstride, const acts *A, int64_t m0, int64_t kb, float *y,
                    int64_t ldy, int64_t n0, int nvalid, const uint8_t *pf, int ntiles, int tile) {
    const int cb = NIB ? 256 : 512, sb = F16 ? 32 : 64, bb = cb + sb * (H + BIAS);
    const __m512i m4 = _mm512_set1_epi8(15);
    __m512 facc[4][2]; /* fixed sizes (MR <= 4, NP <= 2): the accumulators stay in registers */
    const int8_t *aq[4];
    const float *ad[4], *as[4];
    const int32_t *ac[4];
    for (int m = 0; m < MR; m++) {
        aq[m] = A->q + (m0 + m) * A->k;
        ad[m] = A->d + (m0 + m) * kb;
        as[m] = A->s + (m0 + m) * kb;
        ac[m] = H == 2 ? A->c16 + (m0 + m) * 2 * kb : A->c32 + (m0 + m) * kb;
        for (int p = 0; p < NP; p++) facc[m][p] = _mm512_setzero_ps();
    }
    for (int64_t b = 0; b < kb; b++) {
        const uint8_t *pb = panel + b * bb;
        if (pf) pk_prefetch(pf, pstride, kb, bb, ntiles, tile, b);
        for (int h = 0; h < H; h++) {
            __m512i iacc[4][2];
            for (int m = 0; m < MR; m++) {
                const __m512i start = OFF ? _mm512_set1_epi32(ac[m][H * b + h]) : _mm512_setzero_si512();
                for (int p = 0; p < NP; p++) iacc[m][p] = start;
            }
#pragma GCC unroll 8
            for (int g = h * (8 / H); g < (h + 1) * (8 / H); g++) {
                __m512i wv[2];
                for (int p = 0; p < NP; p++) {
                    if (!NIB) wv[p] = _mm512_loadu_si512((const void *)(pb + p * pstride + 64 * g));
                    else {
                        const __m512i raw = _mm512_loadu_si512((const void *)(pb + p * pstride + 64 * (g / 2)));
                        wv[p] = _mm512_and_si512(g % 2 ? _mm512_srli_epi16(raw, 4) : raw, m4);
                    }
                }
                for (int m = 0; m < MR; m++) {
                    int32_t a4;
                    memcpy(&a4, aq[m] + 32 * b + 4 * g, 4);
                    const __m512i av = _mm512_set1_epi32(a4);
                    for (int p = 0; p < NP; p++) iacc[m][p] = _mm512_dpbusd_epi32(iacc[m][p], wv[p], av);
                }
            }
            __m512 dw[2];
            for (int p = 0; p < NP; p++) dw[p] = pk_scales(F16, pb + p * pstride + cb + sb * h);
            for (int m = 0; m < MR; m++) {
                const __m512 dx = _mm512_set1_ps(ad[m][b]);
                for (int p = 0; p < NP; p++)
                    facc[m][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[m][p]), _mm512_mul_ps(dw[p], dx), facc[m][p]);
            }
        }
        if (BIAS) {
            __m512 bw[2];
            for (int p = 0; p < NP; p++) bw[p] = pk_scales(F16, pb + p * pstride + cb + sb * H);
            for (int m = 0; m < MR; m++) {
                const __m512 sx = _mm512_set1_ps(as[m][b]);
                for (int p = 0; p < NP; p++) facc[m][p] = _mm512_fmadd_ps(bw[p], sx, facc[m][p]);
            }
        }
    }
    for (int p = 0; p < NP; p++) {
        const int v = nvalid - 16 * p;
        const __mmask16 mask = v >= 16 ? 0xffff : (__mmask16)((1u << (v > 0 ? v : 0)) - 1);
        for (int m = 0; m < MR; m++) _mm512_mask_storeu_ps(y + (m0 + m) * ldy + n0 + 16 * p, mask, facc[m][p]);
    }
}

#else /* NEON dotprod: a panel's 16 rows as 4 int32x4; codes signed (SIGNED_CODES), so no offset terms */
#define PK_MR 2 /* 2 rows of x: 16 int32x4 + 16 float32x4 accumulators stay within the 32 registers with the codes */
INLINE float32x4_t pk_scales4(const int F16, const uint8_t *p, int r) { /* scales of rows 4r .. 4r+3 */
    return F16 ? vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)p + 4 * r)))
               : vld1q_f32((const float *)p + 4 * r);
}
INLINE void pk_tile(const int NIB, const int F16, const int OFF, const int BIAS, const int H, const int MR, const int NP,
                    const uint8_t *panel, int64_t pstride, const acts *A, int64_t m0, int64_t kb, float *y,
                    int64_t ldy, int64_t n0, int nvalid, const uint8_t *pf, int ntiles, int tile) {
    const int cb = NIB ? 256 : 512, sb = F16 ? 32 : 64, bb = cb + sb * (H + BIAS);
    (void)pf, (void)ntiles, (void)tile; /* the A76's prefetchers: not measured here */
    for (int p = 0; p < NP; p++) {
        float32x4_t facc[2][4]; /* fixed sizes (MR <= 2) */
        for (int m = 0; m < MR; m++)
            for (int r = 0; r < 4; r++) facc[m][r] = vdupq_n_f32(0);
        for (int64_t b = 0; b < kb; b++) {
            const uint8_t *pb = panel + p * pstride + b * bb;
            int8x16_t av[2][2];
            for (int m = 0; m < MR; m++) {
                av[m][0] = vld1q_s8(A->q + (m0 + m) * A->k + 32 * b);
                av[m][1] = vld1q_s8(A->q + (m0 + m) * A->k + 32 * b + 16);
            }
            for (int h = 0; h < H; h++) {
                int32x4_t iacc[2][4];
                for (int m = 0; m < MR; m++)
                    for (int r = 0; r < 4; r++) iacc[m][r] = vdupq_n_s32(0);
#define PK_GROUP(G)                                                                                             \
    if ((G) / (8 / H) == h) {                                                                                   \
        for (int r = 0; r < 4; r++) {                                                                           \
            int8x16_t wv;                                                                                       \
            if (!NIB) wv = vld1q_s8((const int8_t *)pb + 64 * (G) + 16 * r);                                    \
            else {                                                                                              \
                const int8x16_t raw = vld1q_s8((const int8_t *)pb + 64 * ((G) / 2) + 16 * r);                   \
                if (OFF) wv = (G) % 2 ? vshrq_n_s8(raw, 4) : vshrq_n_s8(vshlq_n_s8(raw, 4), 4);                 \
                else wv = (G) % 2 ? vreinterpretq_s8_u8(vshrq_n_u8(vreinterpretq_u8_s8(raw), 4))               \
                                  : vandq_s8(raw, vdupq_n_s8(15));                                              \
            }                                                                                                   \
            for (int m = 0; m < MR; m++) iacc[m][r] = vdotq_laneq_s32(iacc[m][r], wv, av[m][(G) / 4], (G) % 4); \
        }                                                                                                       \
    }
                PK_GROUP(0) PK_GROUP(1) PK_GROUP(2) PK_GROUP(3) PK_GROUP(4) PK_GROUP(5) PK_GROUP(6) PK_GROUP(7)
#undef PK_GROUP
                for (int r = 0; r < 4; r++) {
                    const float32x4_t dw = pk_scales4(F16, pb + cb + sb * h, r);
                    for (int m = 0; m < MR; m++)
                        facc[m][r] = vfmaq_f32(facc[m][r], vcvtq_f32_s32(iacc[m][r]),
                                               vmulq_n_f32(dw, A->d[(m0 + m) * kb + b]));
                }
            }
            if (BIAS)
                for (int r = 0; r < 4; r++) {
                    const float32x4_t bw = pk_scales4(F16, pb + cb + sb * H, r);
                    for (int m = 0; m < MR; m++) facc[m][r] = vfmaq_n_f32(facc[m][r], bw, A->s[(m0 + m) * kb + b]);
                }
        }
        for (int m = 0; m < MR; m++)
            for (int r = 0; r < 4; r++) {
                float out[4];
                vst1q_f32(out, facc[m][r]);
                for (int i = 0; i < 4; i++)
                    if (16 * p + 4 * r + i < nvalid) y[(m0 + m) * ldy + n0 + 16 * p + 4 * r + i] = out[i];
            }
    }
}
#endif

/* Panels p0 .. p1 against all m activation rows: pairs of panels, PK_MR rows of x at a time, then the rest.      */
#define PK_TILES(NIB, F16, OFF, BIAS, H, NP)                                                                    \
    {                                                                                                           \
        const int nt = (int)((m + PK_MR - 1) / PK_MR); /* row tiles per pair of panels */                       \
        int64_t m0 = 0;                                                                                         \
        for (; m0 + PK_MR <= m; m0 += PK_MR)                                                                    \
            pk_tile(NIB, F16, OFF, BIAS, H, PK_MR, NP, pp, ps, A, m0, kb, y, ldy, n0, nv, pf, nt, m0 / PK_MR);  \
        const int mr = (int)(m - m0);                                                                           \
        if (mr == 3) pk_tile(NIB, F16, OFF, BIAS, H, PK_MR > 3 ? 3 : 1, NP, pp, ps, A, m0, kb, y, ldy, n0, nv,  \
                             pf, nt, nt - 1);                                                                   \
        if (mr == 2) pk_tile(NIB, F16, OFF, BIAS, H, PK_MR > 2 ? 2 : 1, NP, pp, ps, A, m0, kb, y, ldy, n0, nv,  \
                             pf, nt, nt - 1);                                                                   \
        if (mr == 1) pk_tile(NIB, F16, OFF, BIAS, H, 1, NP, pp, ps, A, m0, kb, y, ldy, n0, nv, pf, nt, nt - 1); \
    }
#define PK_VARIANT(NAME, NIB, F16, OFF, BIAS, H)                                                                     \
    static void NAME(const nl_mat *w, const uint8_t *base, int64_t pbase, int64_t pend, const acts *A, int64_t m, \
                     int64_t p0, int64_t p1, float *y) {                                                         \
        const int64_t kb = w->k / 32, ps = kb * pk_block_bytes(w->type), ldy = w->n;                          \
        for (int64_t p = p0; p < p1; p += 2) {                                                                  \
            const uint8_t *pp = base + (p - pbase) * ps, *pf = p + 3 < pend ? pp + 2 * ps : NULL;               \
            const int64_t n0 = 16 * p;                                                                          \
            const int nv = (int)(w->n - n0 < 32 ? w->n - n0 : 32);                                              \
            if (p + 1 < p1) PK_TILES(NIB, F16, OFF, BIAS, H, 2) else PK_TILES(NIB, F16, OFF, BIAS, H, 1)                  \
        }                                                                                                       \
    }
PK_VARIANT(pk_nib_off, 1, 1, 1, 0, 1)    /* Q4_0 */
PK_VARIANT(pk_nib_bias, 1, 1, 0, 1, 1)   /* Q4_1 */
PK_VARIANT(pk_nib_bias_k, 1, 0, 0, 1, 1) /* Q4_K */
PK_VARIANT(pk_off, 0, 1, 1, 0, 1)        /* Q5_0, Q8_0 */
PK_VARIANT(pk_bias, 0, 1, 0, 1, 1)       /* Q5_1 */
PK_VARIANT(pk_bias_k, 0, 0, 0, 1, 1)     /* Q5_K */
PK_VARIANT(pk_off_h2, 0, 0, 1, 0, 2)     /* Q6_K */

typedef struct {
    const nl_mat *w;
    const acts *a;
    float *y;
    int64_t m, panels_per_task;
    float *yout; /* as in rows_ctx */
    int64_t m_out;
} pk_ctx;

/* Panels p0 .. p1 (held from panel pbase to pend at base) against the m activation rows */
static void pk_run(const nl_mat *w, const uint8_t *base, int64_t pbase, int64_t pend, const acts *A, int64_t m,
                   int64_t p0, int64_t p1, float *y) {
    const type_info *ti = tinfo(w->type);
    const int f16 = PK_F16(w->type);
    void (*f)(const nl_mat *, const uint8_t *, int64_t, int64_t, const acts *, int64_t, int64_t, int64_t, float *) =
        ti->halves == 2 ? pk_off_h2
        : PK_NIB(w->type) ? (!ti->bias ? pk_nib_off : f16 ? pk_nib_bias : pk_nib_bias_k)
                          : (!ti->bias ? pk_off : f16 ? pk_bias : pk_bias_k);
    f(w, base, pbase, pend, A, m, p0, p1, y);
}

static void pk_task(void *ctx, int64_t t, int tid) {
    (void)tid;
    const pk_ctx *c = ctx;
    const nl_mat *w = c->w;
    const int64_t np = (w->n + 15) / 16, p0 = t * c->panels_per_task;
    const int64_t p1 = p0 + c->panels_per_task < np ? p0 + c->panels_per_task : np;
    pk_run(w, w->packed, 0, np, c->a, c->m, p0, p1, c->y); /* prefetches into the next task's panels */
    if (c->yout) fold_residual(c->y, c->yout, c->m_out, w->n, 16 * p0, 16 * p1 < w->n ? 16 * p1 : w->n);
}

/* gemm (a weight not repacked, M >= gemm_min_m): each task packs its two panels into its thread's scratch */
#define PANELS_PER_TASK 2
#define HAVE_GEMM 1

static void gemm_task(void *ctx, int64_t t, int tid) {
    const pk_ctx *c = ctx;
    const nl_mat *w = c->w;
    const int64_t np = (w->n + 15) / 16, p0 = t * PANELS_PER_TASK;
    const int64_t p1 = p0 + PANELS_PER_TASK < np ? p0 + PANELS_PER_TASK : np;
    uint8_t *panels = scratch(tid, SCR_PANEL, (size_t)(PANELS_PER_TASK * (w->k / 32) * pk_block_bytes(w->type)));
    if (!panels) return; /* allocated up front in nl_matmul, as the rows scratch */
    pk_pack_panels(w, p0, p1, panels, g_scr[tid][SCR_ROW]);
    pk_run(w, panels, p0, p1, c->a, c->m, p0, p1, c->y);
    if (c->yout) fold_residual(c->y, c->yout, c->m_out, w->n, 16 * p0, 16 * p1 < w->n ? 16 * p1 : w->n);
}
#endif

int nl_pack_available(int type) {
#ifdef HAVE_PACKED
    return tinfo(type) != NULL && type != NL_F16;
#else
    (void)type;
    return 0;
#endif
}

int nl_pack_default(int type) {
#if defined(NL_X86_GEMM)
    return nl_pack_available(type);
#elif defined(HAVE_PACKED)
    return nl_pack_available(type) && pk_block_bytes(type) <= 512 / tinfo(type)->block * tinfo(type)->bytes;
#else
    (void)type;
    return 0;
#endif
}

int64_t nl_packed_bytes(int type, int64_t n, int64_t k) {
#ifdef HAVE_PACKED
    if (!nl_pack_available(type) || nl_row_bytes(type, k) < 0 || n <= 0) return -1;
    return (n + 15) / 16 * (k / 32) * pk_block_bytes(type);
#else
    (void)type, (void)n, (void)k;
    return -1;
#endif
}

int nl_pack(const nl_mat *w, uint8_t *out, int drop_source) {
#ifdef HAVE_PACKED
    if (nl_packed_bytes(w->type, w->n, w->k) < 0 || ((uintptr_t)out & 63)) return -1;
    CALL_LOCK();
    ensure_pool();
    int rc = 0;
    for (int t = 0; t < g_threads; t++) /* every thread's unpacking scratch, here: tasks cannot fail */
        if (!scratch(t, SCR_ROW, PK_TMP_BYTES(w->k))) rc = -1;
    if (!rc) {
        const int64_t np = (w->n + 15) / 16;
        pk_pack_ctx c = {w, out, 16, drop_source};
        parallel(pk_pack_task, &c, (np + c.panels_per_task - 1) / c.panels_per_task);
    }
    CALL_UNLOCK();
    return rc;
#else
    (void)w, (void)out, (void)drop_source;
    return -1;
#endif
}

int nl_gemm_available(int type) { return nl_pack_available(type); } /* the gemm runs the packed kernel */

const char *nl_isa(void) {
#if defined(NL_X86)
#if defined(NL_X86_GEMM)
    return "avx512-vnni";
#elif defined(NL_X86_VNNI256) || defined(NL_X86_AVXVNNI)
    return "avx2-vnni";
#else
    return "avx2";
#endif
#elif defined(NL_NEON)
#if defined(NL_NEON_DOT)
    return "neon-dotprod";
#else
    return "neon";
#endif
#else
    return "scalar";
#endif
}

/* ------------------------------------------------------------------------------------------------------------ */

int nl_matmul(const nl_mat *w, const float *x, int64_t m, float *y, int path) {
    const type_info *ti = tinfo(w->type);
    if (!ti || m < 0 || w->n <= 0 || nl_row_bytes(w->type, w->k) < 0 || w->row_bytes < nl_row_bytes(w->type, w->k))
        return -1;
    if (m == 0) return 0;
    CALL_LOCK();
    ensure_pool();
    int rc = 0;
    const int64_t k = w->k;
    const int act16 = w->act16 && w->type != NL_F16;
    const int64_t mk = act16 ? 2 * m : m; /* activation rows the kernels see */
    float *yk = y, *yout = NULL;
    acts A;
    if (w->type != NL_F16 && quantize_acts(x, m, k, ti->off, act16, &A)) {
        rc = -1;
        goto out;
    }
    if (act16) {
        yk = scratch(0, SCR_Y, (size_t)(mk * w->n) * 4);
        yout = y;
        if (!yk) {
            rc = -1;
            goto out;
        }
    }
#ifdef HAVE_PACKED
    /* packed weights: every M (an output row's sum does not depend on the other rows of x, nor on the threads) */
    if (w->packed && (path == NL_PATH_AUTO || path == NL_PATH_PACKED)) {
        const int64_t np = (w->n + 15) / 16;
        const int nt = w->n * k * (mk < 4 ? mk : 4) < 65536 ? 1 : g_threads;
        int64_t per = (np + 8 * nt - 1) / (8 * nt);
        per = nt == 1 ? np : per < 2 ? 2 : (per + 1) & ~(int64_t)1; /* whole pairs of panels */
        pk_ctx c = {w, &A, yk, mk, per, yout, m};
        parallel(pk_task, &c, (np + per - 1) / per);
        goto out;
    }
#endif
#ifdef HAVE_GEMM
    /* the algorithm depends on M, the type and the path argument only, never on the thread count */
    if (w->type != NL_F16 && (path == NL_PATH_GEMM || (path == NL_PATH_AUTO && m >= g_gemm_min_m))) {
        const int64_t np = (w->n + 15) / 16;
        for (int t = 0; t < g_threads; t++) /* allocate every thread's scratch here: tasks cannot fail */
            if (!scratch(t, SCR_PANEL, (size_t)(PANELS_PER_TASK * (k / 32) * pk_block_bytes(w->type)))
                || !scratch(t, SCR_ROW, PK_TMP_BYTES(k))) {
                rc = -1;
                goto out;
            }
        pk_ctx c = {w, &A, yk, mk, PANELS_PER_TASK, yout, m};
        parallel(gemm_task, &c, (np + PANELS_PER_TASK - 1) / PANELS_PER_TASK);
        goto out;
    }
#else
    (void)path;
#endif
    {
        /* rows: tasks of whole row ranges; one thread for small matrices where waking others costs more */
        rows_ctx c = {w, &A, x, yk, mk, 0, yout, m};
        const int64_t work = w->n * k * (mk < 4 ? mk : 4);
        const int nt = work < 65536 ? 1 : g_threads;
        int64_t per = (w->n + 8 * nt - 1) / (8 * nt);
        if (per < 16) per = 16;
        per = (per + 3) & ~(int64_t)3;
        c.rows_per_task = nt == 1 ? w->n : per;
        parallel(rows_task, &c, (w->n + c.rows_per_task - 1) / c.rows_per_task);
    }
out:
    if (g_scr_size[0][SCR_Y] > (32u << 20)) { /* all-token logits (perplexity): do not keep 2 x their size around */
        free(g_scr[0][SCR_Y]);
        g_scr[0][SCR_Y] = NULL;
        g_scr_size[0][SCR_Y] = 0;
    }
    CALL_UNLOCK();
    return rc;
}

typedef struct {
    const nl_mat *w;
    int64_t r0, r1, rows_per_task;
    float *out;
} deq_ctx;

static void deq_task(void *ctx, int64_t t, int tid) {
    deq_ctx *c = ctx;
    const nl_mat *w = c->w;
    const int64_t k = w->k, kb = k / 32, off = tinfo(w->type)->off;
    const int64_t a = c->r0 + t * c->rows_per_task, b = a + c->rows_per_task < c->r1 ? a + c->rows_per_task : c->r1;
    if (w->type == NL_F16) {
        for (int64_t r = a; r < b; r++)
            for (int64_t i = 0; i < k; i++) c->out[(r - c->r0) * k + i] = h2f(w->data + r * w->row_bytes + 2 * i);
        return;
    }
    uint8_t *codes = scratch(tid, SCR_ROW, (size_t)k + (size_t)kb * 12 + 64);
    if (!codes) return; /* allocated up front in nl_dequant */
    float *d16 = (float *)(codes + ((k + 63) & ~(int64_t)63)), *bias = d16 + 2 * kb;
    for (int64_t r = a; r < b; r++) {
        unpack_row_fast(w->type, w->data + r * w->row_bytes, k, codes, d16, bias);
        float *o = c->out + (r - c->r0) * k;
        for (int64_t g = 0; g < k / 16; g++) { /* per 16 values: one scale, one bias (vectorizes) */
            const float d = d16[g], bi = bias[g / 2];
            for (int i = 0; i < 16; i++) o[16 * g + i] = d * (float)((int)codes[16 * g + i] - off) + bi;
        }
    }
}

int nl_dequant(const nl_mat *w, int64_t r0, int64_t r1, float *out) {
    if (!tinfo(w->type) || r0 < 0 || r1 > w->n || r0 > r1 || nl_row_bytes(w->type, w->k) < 0) return -1;
    CALL_LOCK();
    ensure_pool();
    int rc = 0;
    const int64_t k = w->k;
    for (int t = 0; t < g_threads; t++) /* every thread's row buffer, so that tasks cannot fail */
        if (!scratch(t, SCR_ROW, (size_t)k + (size_t)(k / 32) * 12 + 64)) rc = -1;
    if (rc == 0) {
        deq_ctx c = {w, r0, r1, 0, out};
        c.rows_per_task = (65536 + k - 1) / k; /* ~64k values per task */
        parallel(deq_task, &c, (r1 - r0 + c.rows_per_task - 1) / c.rows_per_task);
    }
    CALL_UNLOCK();
    return rc;
}
