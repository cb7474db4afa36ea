/* kernels.c — one short function per operation of a GPT-2 block.
 *
 * Matrix products go to the BLAS (blas.h); the element-wise work is plain loops,
 * split over rows by ms_parallel_for; matrix products are cut into panels that the
 * same threads share, each panel one single-threaded BLAS call. */
#include "kernels.h"
#include "blas.h"
#include "fastmath.h"

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- threads ------------------------------------------------------------------- */

/* A loop is cut into chunks that threads claim one at a time: the caller claims
 * chunks itself and helpers from a pool of waiting threads join in when they get
 * a core. The caller never waits for a helper that has not started: if the
 * machine is busy and no helper gets scheduled, the caller does every chunk
 * alone, as fast as one thread does. It waits only for chunks a helper is
 * computing. (OpenBLAS's own threads split a product statically and wait for
 * each other, which on a loaded machine costs a time slice per product; so the
 * BLAS runs single-threaded and products are cut into panels here.)
 *
 * A small model's step is thousands of short loops, and waking a sleeping thread
 * takes tens of microseconds: so a helper out of work, and a caller waiting for a
 * helper's last chunk, first watch for a while (SPIN_NS) before they sleep. */
typedef struct loop_job {
    ms_range_fn fn;
    void *ctx;
    long long n, chunk;       /* items, items per claim */
    long long next;           /* first unclaimed item (atomic) */
    int max_helpers, helpers; /* helpers allowed to join / joined (under the pool lock) */
    unsigned active;          /* helpers computing a chunk of it (changed under the pool lock) */
    const volatile int *stop; /* the caller's run's interrupt flag, or NULL */
    struct loop_job *next_job;
} loop_job;

enum { MAX_HELPERS = 63 };

/* how long a thread out of work watches for more before it sleeps */
static const long long SPIN_NS = 100 * 1000;

static struct {
    pthread_mutex_t lock;
    pthread_cond_t work; /* helpers wait here for jobs */
    pthread_cond_t idle; /* callers wait here for helpers to leave their job */
    loop_job *jobs;      /* jobs that may still have unclaimed chunks */
    int n_helpers;       /* threads started */
    unsigned posted;     /* jobs posted so far (atomic): what spinning helpers watch */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, 0, 0};

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* spin for up to SPIN_NS until *word equals value (equal = 1) or differs from it
 * (equal = 0); whether it did */
static int watch(const unsigned *word, unsigned value, int equal) {
    long long end = now_ns() + SPIN_NS;
    for (;;) {
        for (int i = 0; i < 64; i++) {
            if ((__atomic_load_n(word, __ATOMIC_ACQUIRE) == value) == equal) return 1;
            cpu_relax();
        }
        if (now_ns() > end) return 0;
    }
}

/* the interrupt flag of the run this thread is computing (NULL: none) */
static _Thread_local const volatile int *current_stop = NULL;

const volatile int *ms_stop_flag_swap(const volatile int *stop) {
    const volatile int *old = current_stop;
    current_stop = stop;
    return old;
}

int ms_interrupted(void) { return current_stop && *current_stop; }

/* claim [lo, hi) of j, or return 0 when nothing is left (or the run was stopped) */
static int claim(loop_job *j, long long *lo, long long *hi) {
    if (j->stop && *j->stop) return 0;
    *lo = __atomic_fetch_add(&j->next, j->chunk, __ATOMIC_RELAXED);
    if (*lo >= j->n) return 0;
    *hi = *lo + j->chunk < j->n ? *lo + j->chunk : j->n;
    return 1;
}

static void *helper_main(void *unused) {
    (void)unused;
    pthread_mutex_lock(&pool.lock);
    for (;;) {
        loop_job *j = pool.jobs;
        while (j && j->helpers >= j->max_helpers) j = j->next_job;
        long long lo, hi;
        /* the first chunk is claimed under the lock: a helper the caller waits
         * for is always one that is computing */
        if (!j || !claim(j, &lo, &hi)) {
            if (j) {
                j->helpers = j->max_helpers; /* nothing left: no more helpers for it */
                continue;
            }
            /* no job to join: watch for the next one a while, then sleep; a job
             * posted after this scan signals, as the scan and the wait are under one
             * hold of the lock */
            unsigned seen = pool.posted;
            pthread_mutex_unlock(&pool.lock);
            int came = watch(&pool.posted, seen, 0);
            pthread_mutex_lock(&pool.lock);
            if (!came && pool.posted == seen) pthread_cond_wait(&pool.work, &pool.lock);
            continue;
        }
        j->helpers++;
        __atomic_add_fetch(&j->active, 1, __ATOMIC_RELAXED);
        pthread_mutex_unlock(&pool.lock);
        const volatile int *saved = ms_stop_flag_swap(j->stop);
        do j->fn(j->ctx, lo, hi);
        while (claim(j, &lo, &hi));
        ms_stop_flag_swap(saved);
        pthread_mutex_lock(&pool.lock);
        /* the last touch of j: its caller may return as soon as it reads 0 */
        if (__atomic_sub_fetch(&j->active, 1, __ATOMIC_RELEASE) == 0) pthread_cond_broadcast(&pool.idle);
    }
    return NULL;
}

/* at least n helpers, as far as threads can be started; the number there is */
static int start_helpers(int n) {
    if (n > MAX_HELPERS) n = MAX_HELPERS;
    while (pool.n_helpers < n) {
        pthread_t id;
        pthread_attr_t attr;
        if (pthread_attr_init(&attr) != 0) break;
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&id, &attr, helper_main, NULL);
        pthread_attr_destroy(&attr);
        if (rc != 0) break; /* fewer helpers: the caller does more itself */
        pool.n_helpers++;
    }
    return pool.n_helpers;
}

/* a forked child has none of the parent's helpers, and maybe a lock held */
static void pool_after_fork(void) {
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.work, NULL);
    pthread_cond_init(&pool.idle, NULL);
    pool.jobs = NULL;
    pool.n_helpers = 0;
}

static pthread_once_t pool_once = PTHREAD_ONCE_INIT;
static void pool_init(void) { pthread_atfork(NULL, NULL, pool_after_fork); }

void ms_parallel_for(long long n, long long min_per_thread, int n_threads, ms_range_fn fn,
                     void *ctx) {
    if (n <= 0) return;
    long long t = n_threads < MAX_HELPERS + 1 ? n_threads : MAX_HELPERS + 1;
    if (min_per_thread < 1) min_per_thread = 1;
    if (t > n / min_per_thread) t = n / min_per_thread;
    if (t <= 1) {
        fn(ctx, 0, n);
        return;
    }
    pthread_once(&pool_once, pool_init);
    /* chunks of about a quarter of a thread's share, so that a late helper still
     * finds work and a slow one delays the end by little */
    long long chunk = n / (4 * t);
    if (chunk < min_per_thread) chunk = min_per_thread;
    loop_job j = {fn, ctx, n, chunk, 0, (int)t - 1, 0, 0, current_stop, NULL};
    pthread_mutex_lock(&pool.lock);
    int helpers = start_helpers((int)t - 1);
    if (helpers > 0) {
        j.next_job = pool.jobs;
        pool.jobs = &j;
        __atomic_add_fetch(&pool.posted, 1, __ATOMIC_RELEASE);
        for (int i = 0; i < j.max_helpers && i < helpers; i++) pthread_cond_signal(&pool.work);
    }
    pthread_mutex_unlock(&pool.lock);
    long long lo, hi;
    while (claim(&j, &lo, &hi)) fn(ctx, lo, hi);
    if (helpers == 0) return;
    pthread_mutex_lock(&pool.lock);
    loop_job **at = &pool.jobs;
    while (*at != &j) at = &(*at)->next_job;
    *at = j.next_job; /* no helper joins it from now on */
    if (__atomic_load_n(&j.active, __ATOMIC_RELAXED) > 0) {
        pthread_mutex_unlock(&pool.lock);
        if (watch(&j.active, 0, 1)) return;
        pthread_mutex_lock(&pool.lock);
        while (j.active > 0) pthread_cond_wait(&pool.idle, &pool.lock);
    }
    pthread_mutex_unlock(&pool.lock);
}

/* ---- matrix products --------------------------------------------------------------- */

/* A product is cut into tiles of the output (panels of columns, or a grid when
 * there are many rows), each one single-threaded BLAS call: enough tiles to share
 * among the threads, each big enough to run near the BLAS's full speed, and none
 * above about 2^32 FLOP, so that an interrupted run stops within a fraction of a
 * second. */
typedef struct {
    float *out;
    const float *in, *w, *bias;
    int ld_in, N, IC, OC;
    int ld_out, ld_w;
    int tile_m, tile_n; /* tiles of tile_m rows by tile_n columns of out */
    int transpose_w; /* w is [OC, IC] (the unembedding) rather than [IC, OC] */
    /* 2-byte weights (w is then NULL): each panel of columns is widened into a
     * float32 buffer of the thread computing it, then multiplied */
    const uint16_t *w16;
    ms_dtype dtype;
    float *bufs;        /* n_bufs buffers of buf_floats, claimed through busy[] */
    size_t buf_floats;
    int n_bufs;
    int *busy;
} gemm_job;

/* A 2-byte panel is widened into at most this many floats at once (4 MB): a few
 * times the L2 cache, so that the product reads it back while it is still near */
#define MS_HALF_PANEL_FLOATS ((size_t)1 << 20)
/* products of fewer rows than this through a matrix of at least MS_WIDE_INPUT
 * inputs go in blocks of MS_NARROW_COLS output columns (see gemm_panels) */
#define MS_FEW_ROWS 32
#define MS_WIDE_INPUT 4096
#define MS_NARROW_COLS 16
/* products of at most this many rows through a float32 weight go through
 * weight_row_dots (stored [OC, IC]) or weight_row_combos ([IC, OC]) on CPUs with AVX-512 */
#define MS_KERNEL_ROWS 16

/* a free buffer of g (its index in *slot), or NULL (then the caller uses its own) */
static float *claim_buffer(const gemm_job *g, int *slot) {
    for (int i = 0; i < g->n_bufs; i++)
        if (!__atomic_exchange_n(&g->busy[i], 1, __ATOMIC_ACQUIRE)) {
            *slot = i;
            return g->bufs + (size_t)i * g->buf_floats;
        }
    *slot = -1;
    return NULL;
}

static int weight_row_dots(float *out, int ld_out, const float *in, int ld_in, const float *w, int ld_w,
                           int rows, int cols, int IC, float beta);
static int weight_row_combos(float *out, int ld_out, const float *in, int ld_in, const float *w, int ld_w,
                             int rows, int cols, int IC, float beta);

/* out[rows, cols] = beta * out + in[rows, IC] @ W[:, c0:c0 + cols] for 2-byte W:
 * blocks of at most max_cols columns of the panel (all of it when buf holds
 * cap >= IC * cols floats) are widened into buf and multiplied by the BLAS,
 * accumulating over blocks of IC when a block of columns does not fit in buf */
static void half_panel(const gemm_job *g, float *out, const float *in, int rows, int c0, int cols,
                       int max_cols, float beta, float *buf, size_t cap) {
    int cw = cols < max_cols ? cols : max_cols;
    if ((size_t)cw > cap) cw = (int)cap;
    for (int j0 = 0; j0 < cols; j0 += cw) {
        int nc = cols - j0 < cw ? cols - j0 : cw;
        int kc = cap / (size_t)nc < (size_t)g->IC ? (int)(cap / (size_t)nc) : g->IC;
        float b = beta;
        for (int k0 = 0; k0 < g->IC; k0 += kc) {
            int nk = g->IC - k0 < kc ? g->IC - k0 : kc;
            if (g->transpose_w) { /* W [OC, IC]: buf [nc, nk] */
                for (int j = 0; j < nc; j++)
                    ms_widen(buf + (size_t)j * nk, g->w16 + (size_t)(c0 + j0 + j) * g->ld_w + k0, (size_t)nk,
                             g->dtype);
                /* the float32 weight's kernel for few rows, so that both give the same sums */
                if (rows <= MS_KERNEL_ROWS &&
                    weight_row_dots(out + j0, g->ld_out, in + k0, g->ld_in, buf, nk, rows, nc, nk, b)) {
                    b = 1.0f;
                    continue;
                }
                ms_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, nc, nk, 1.0f, in + k0, g->ld_in, buf,
                         nk, b, out + j0, g->ld_out);
            } else { /* W [IC, OC]: buf [nk, nc] */
                for (int k = 0; k < nk; k++)
                    ms_widen(buf + (size_t)k * nc, g->w16 + (size_t)(k0 + k) * g->ld_w + c0 + j0, (size_t)nc,
                             g->dtype);
                if (rows <= MS_KERNEL_ROWS &&
                    weight_row_combos(out + j0, g->ld_out, in + k0, g->ld_in, buf, nc, rows, nc, nk, b)) {
                    b = 1.0f;
                    continue;
                }
                ms_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, nc, nk, 1.0f, in + k0, g->ld_in, buf,
                         nc, b, out + j0, g->ld_out);
            }
            b = 1.0f;
        }
    }
}

static void gemm_panels(void *ctx, long long lo, long long hi) {
    const gemm_job *g = ctx;
    /* 2-byte weights: a buffer for this thread's panels, or (if the job could not
     * allocate them) a small one on the stack, used block by block */
    float small[4096];
    int slot = -1;
    float *buf = NULL;
    size_t cap = sizeof small / sizeof small[0];
    if (g->w16) {
        buf = claim_buffer(g, &slot);
        if (buf) cap = g->buf_floats;
        else buf = small;
    }
    /* Few rows through a wide matrix: the product is bound by reading the weights,
     * and blocks of a few columns, which stay in the L2 cache (for 2-byte weights
     * from widening to use), run about twice as fast here. float32 and 2-byte
     * weights go in the same blocks, so that both give the same sums to the bit;
     * panels start at multiples of 64 columns, so the blocks do not depend on the
     * thread count either. */
    int max_cols = g->OC;
    if (g->N < MS_FEW_ROWS && g->IC >= MS_WIDE_INPUT) max_cols = MS_NARROW_COLS;
    int tiles_n = (g->OC + g->tile_n - 1) / g->tile_n;
    for (long long p = lo; p < hi && !ms_interrupted(); p++) {
        int r0 = (int)(p / tiles_n) * g->tile_m, c0 = (int)(p % tiles_n) * g->tile_n;
        int r1 = r0 + g->tile_m < g->N ? r0 + g->tile_m : g->N, c1 = c0 + g->tile_n < g->OC ? c0 + g->tile_n : g->OC;
        int rows = r1 - r0, cols = c1 - c0;
        float *out = g->out + (size_t)r0 * g->ld_out + c0;
        const float *in = g->in + (size_t)r0 * g->ld_in;
        float beta = 0.0f;
        if (g->bias) {
            /* start from the bias in every row, then accumulate the product onto it */
            for (int i = 0; i < rows; i++) memcpy(out + (size_t)i * g->ld_out, g->bias + c0, sizeof(float) * (size_t)cols);
            beta = 1.0f;
        }
        if (g->w16) {
            half_panel(g, out, in, rows, c0, cols, max_cols, beta, buf, cap);
            continue;
        }
        /* few rows through W [IC, OC]: the whole panel at once (its sums do not depend on the blocks) */
        if (!g->transpose_w && rows <= MS_KERNEL_ROWS &&
            weight_row_combos(out, g->ld_out, in, g->ld_in, g->w + c0, g->ld_w, rows, cols, g->IC, beta))
            continue;
        for (int j0 = 0; j0 < cols; j0 += max_cols) {
            int nc = cols - j0 < max_cols ? cols - j0 : max_cols;
            if (g->transpose_w && rows <= MS_KERNEL_ROWS &&
                weight_row_dots(out + j0, g->ld_out, in, g->ld_in, g->w + (size_t)(c0 + j0) * g->ld_w, g->ld_w,
                                rows, nc, g->IC, beta))
                continue;
            if (g->transpose_w)
                ms_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, nc, g->IC, 1.0f, in, g->ld_in,
                         g->w + (size_t)(c0 + j0) * g->ld_w, g->ld_w, beta, out + j0, g->ld_out);
            else
                ms_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, nc, g->IC, 1.0f, in, g->ld_in,
                         g->w + c0 + j0, g->ld_w, beta, out + j0, g->ld_out);
        }
    }
    if (slot >= 0) __atomic_store_n(&g->busy[slot], 0, __ATOMIC_RELEASE);
}

/* A product with 2-byte weights: always panels of columns (a panel of rows would
 * widen the whole matrix), none wider than MS_HALF_PANEL_FLOATS, and one float32
 * buffer per thread that computes them. */
static void gemm_half(gemm_job *g, long long want, int n_threads) {
    int panel = g->OC;
    if (want > 1) panel = (int)((g->OC + want - 1) / want);
    size_t widest = MS_HALF_PANEL_FLOATS / (size_t)g->IC;
    if ((size_t)panel > widest) panel = widest > 64 ? (int)widest : 64;
    if (panel < g->OC) panel = (panel + 63) / 64 * 64; /* whole BLAS kernel blocks */
    if (panel > g->OC) panel = g->OC;
    g->tile_m = g->N, g->tile_n = panel;
    long long n_panels = (g->OC + panel - 1) / panel;
    int busy[64] = {0};
    int t = n_threads < 64 ? n_threads : 64;
    if (t > n_panels) t = (int)n_panels;
    if (t < 1) t = 1;
    g->buf_floats = (size_t)g->IC * (size_t)panel;
    g->bufs = malloc(sizeof(float) * g->buf_floats * (size_t)t);
    g->n_bufs = g->bufs ? t : 0; /* none: every panel goes block by block through a stack buffer */
    g->busy = busy;
    ms_parallel_for(n_panels, 1, n_threads, gemm_panels, g);
    free(g->bufs);
    g->bufs = NULL, g->n_bufs = 0;
}

static void gemm(gemm_job *g, int n_threads) {
    if (g->N <= 0 || g->OC <= 0) return;
    double flops = 2.0 * g->N * g->IC * g->OC;
    long long want = ms_gemm_tiles_wanted(flops, n_threads);
    if (g->w16) {
        gemm_half(g, want, n_threads);
        return;
    }
    if (want <= 1) {
        g->tile_m = g->N, g->tile_n = g->OC;
        gemm_panels(g, 0, 1);
        return;
    }
    if (g->N >= 64 * want) { /* many rows: the grid that packs the least */
        ms_gemm_grid(g->N, g->OC, want, &g->tile_m, &g->tile_n);
    } else { /* columns in multiples of 64 (whole BLAS kernel blocks) */
        int panel = (int)((g->OC + want - 1) / want);
        g->tile_m = g->N, g->tile_n = (panel + 63) / 64 * 64;
    }
    long long tiles = (long long)((g->N + g->tile_m - 1) / g->tile_m) * ((g->OC + g->tile_n - 1) / g->tile_n);
    ms_parallel_for(tiles, 1, n_threads, gemm_panels, g);
}

/* Tiles to share among n_threads: one per thread, none below 2^22 FLOP (smaller
 * calls run the BLAS well below its speed) and none above 2^32 (an interrupted run
 * stops within a fraction of a second). Every tile packs the part of each operand
 * it reads, so more tiles pack more: at GPT-2 small's shapes (1,024 rows, 2
 * threads) one tile per thread ran 5-10% faster than four, as fast as OpenBLAS's
 * own threads sharing one call. A helper that has not started when the caller is
 * done with its own tile leaves its tile to the caller (ms_parallel_for). */
long long ms_gemm_tiles_wanted(double flops, int n_threads) {
    const double min_tile = 1 << 22, max_tile = 4.0 * (1 << 30); /* FLOP */
    long long want = n_threads > 1 ? n_threads : 1;
    if (want > flops / min_tile) want = (long long)(flops / min_tile);
    if (want < flops / max_tile) want = (long long)(flops / max_tile) + 1;
    /* more tiles than threads: whole rounds of them, so that no thread waits idle
     * while another computes the last one (at 2 threads the unembedding's 19 tiles
     * left one thread idle for a twentieth of it) */
    if (n_threads > 1 && want > n_threads) want = (want + n_threads - 1) / n_threads * n_threads;
    return want;
}

/* A BLAS call packs the rows of A and the columns of B it reads, so cutting an
 * [M, Nc] product into p x q tiles packs K (q M + p Nc) floats: the grid of at least
 * `want` tiles that packs the least (columns in multiples of 64, whole BLAS kernel
 * blocks, when they are cut). */
void ms_gemm_grid(int M, int Nc, long long want, int *tile_m, int *tile_n) {
    double best = -1.0;
    *tile_m = M, *tile_n = Nc;
    for (long long p = 1; p <= want && p <= M; p++) {
        long long q = (want + p - 1) / p;
        int tm = (int)((M + p - 1) / p), tn = (int)((Nc + q - 1) / q);
        if (q > 1) tn = (tn + 63) / 64 * 64;
        int rows = (M + tm - 1) / tm, cols = (Nc + tn - 1) / tn;
        double cost = (double)cols * M + (double)rows * Nc;
        if (best < 0 || cost < best) best = cost, *tile_m = tm, *tile_n = tn;
    }
}

void ms_linear(float *out, int ld_out, const float *in, int ld_in, const ms_linear_weight *w,
               int N, int IC, int OC, int n_threads) {
    gemm_job g = {out, in, w->w, w->b, ld_in, N, IC, OC, ld_out, w->ld, 0, 0, w->trans};
    if (w->dtype != MS_F32) g.w16 = w->w16, g.dtype = w->dtype, g.w = NULL;
    gemm(&g, n_threads);
}

/* max(x[n]), -inf for n == 0; in lanes, so that it vectorizes */
static inline float max_of(const float *x, int n) {
    float m[MS_LANES];
    for (int k = 0; k < MS_LANES; k++) m[k] = -INFINITY;
    int j = 0;
    for (; j + MS_LANES <= n; j += MS_LANES)
        for (int k = 0; k < MS_LANES; k++) m[k] = x[j + k] > m[k] ? x[j + k] : m[k];
    float mx = -INFINITY;
    for (int k = 0; k < MS_LANES; k++) mx = m[k] > mx ? m[k] : mx;
    for (; j < n; j++) mx = x[j] > mx ? x[j] : mx;
    return mx;
}

/* sum(x[n]) in lanes, so that it vectorizes (the lanes are added in a fixed order) */
static inline float sum_of(const float *x, int n) {
    float acc[MS_LANES] = {0};
    int j = 0;
    for (; j + MS_LANES <= n; j += MS_LANES)
        for (int k = 0; k < MS_LANES; k++) acc[k] += x[j + k];
    float sum = 0.0f;
    for (int k = 0; k < MS_LANES; k++) sum += acc[k];
    for (; j < n; j++) sum += x[j];
    return sum;
}

/* RMSNorm: scale = sqrt(mean(x^2) + eps), y = x / scale; the weight is applied
 * after hook_normalized, as TransformerLens does (ms_norm_weight) */
MS_VECTOR_CLONES
static void rmsnorm_row(float *y, float *scale, const float *x, const float *w, const float *b,
                        int C, float eps) {
    float acc[MS_LANES] = {0};
    int c = 0;
    for (; c + MS_LANES <= C; c += MS_LANES)
        for (int j = 0; j < MS_LANES; j++) acc[j] += x[c + j] * x[c + j];
    double ss = 0.0;
    for (int j = 0; j < MS_LANES; j++) ss += acc[j];
    for (; c < C; c++) ss += (double)x[c] * x[c];
    float s = (float)sqrt(ss / C + (double)eps);
    (void)w, (void)b;
    for (c = 0; c < C; c++) y[c] = x[c] / s;
    *scale = s;
}

MS_VECTOR_CLONES
static void layernorm_row(float *y, float *scale, const float *x, const float *w, const float *b,
                          int C, float eps) {
    float acc[MS_LANES] = {0};
    int c = 0;
    for (; c + MS_LANES <= C; c += MS_LANES)
        for (int j = 0; j < MS_LANES; j++) acc[j] += x[c + j];
    double sum = 0.0;
    for (int j = 0; j < MS_LANES; j++) sum += acc[j];
    for (; c < C; c++) sum += x[c];
    float mean = (float)(sum / C);
    /* second pass on the centred values, as the reference computes the variance */
    float acc2[MS_LANES] = {0};
    c = 0;
    for (; c + MS_LANES <= C; c += MS_LANES)
        for (int j = 0; j < MS_LANES; j++) {
            float d = x[c + j] - mean;
            acc2[j] += d * d;
        }
    double var = 0.0;
    for (int j = 0; j < MS_LANES; j++) var += acc2[j];
    for (; c < C; c++) var += (double)(x[c] - mean) * (x[c] - mean);
    float s = (float)sqrt(var / C + (double)eps);
    float inv = 1.0f / s;
    if (b)
        for (c = 0; c < C; c++) y[c] = (x[c] - mean) * inv * w[c] + b[c];
    else
        for (c = 0; c < C; c++) y[c] = (x[c] - mean) * inv * w[c];
    *scale = s;
}

typedef struct {
    float *out, *scale;
    const float *in, *w, *b;
    int C;
    float eps;
    ms_norm_kind kind;
} layernorm_job;

static void layernorm_rows(void *ctx, long long lo, long long hi) {
    const layernorm_job *j = ctx;
    size_t C = (size_t)j->C;
    for (long long i = lo; i < hi; i++) {
        if (j->kind == MS_NORM_RMS) rmsnorm_row(j->out + i * C, j->scale + i, j->in + i * C, j->w, j->b, j->C, j->eps);
        else layernorm_row(j->out + i * C, j->scale + i, j->in + i * C, j->w, j->b, j->C, j->eps);
    }
}

void ms_layernorm(float *out, float *scale, const float *in, const float *w, const float *b,
                  int N, int C, float eps, ms_norm_kind kind, int n_threads) {
    layernorm_job job = {out, scale, in, w, b, C, eps, kind};
    ms_parallel_for(N, 65536 / (C + 1) + 1, n_threads, layernorm_rows, &job);
}

void ms_layernorm_apply(float *out, const float *scale, const float *in, const float *w,
                        const float *b, int N, int C, ms_norm_kind kind) {
    for (int i = 0; i < N; i++) {
        const float *x = in + (size_t)i * C;
        float *y = out + (size_t)i * C;
        double sum = 0.0;
        if (kind == MS_NORM_LAYER)
            for (int c = 0; c < C; c++) sum += x[c];
        float mean = (float)(sum / C), inv = 1.0f / scale[i];
        if (kind == MS_NORM_RMS)
            for (int c = 0; c < C; c++) y[c] = x[c] / scale[i];
        else
            for (int c = 0; c < C; c++) y[c] = (x[c] - mean) * inv * w[c] + (b ? b[c] : 0.0f);
    }
}

typedef struct {
    float *x;
    int ld, heads, d;
    const float *w;
    float eps;
} head_norm_job;

static void head_norm_rows(void *ctx, long long lo, long long hi) {
    const head_norm_job *j = ctx;
    for (long long i = lo; i < hi; i++)
        for (int h = 0; h < j->heads; h++) {
            float *x = j->x + (size_t)i * j->ld + (size_t)h * j->d;
            double sum = 0.0;
            for (int c = 0; c < j->d; c++) sum += (double)x[c] * x[c];
            float scale = sqrtf((float)(sum / j->d) + j->eps);
            for (int c = 0; c < j->d; c++) x[c] = x[c] / scale * j->w[c];
        }
}

void ms_head_rmsnorm(float *x, int ld, int N, int heads, int d, const float *w, float eps, int n_threads) {
    head_norm_job job = {x, ld, heads, d, w, eps};
    ms_parallel_for(N, 65536 / ((long long)heads * d + 1) + 1, n_threads, head_norm_rows, &job);
}

void ms_norm_weight(float *y, const float *w, const float *b, int N, int C) {
    for (int i = 0; i < N; i++) {
        float *row = y + (size_t)i * C;
        if (b)
            for (int c = 0; c < C; c++) row[c] = row[c] * w[c] + b[c];
        else
            for (int c = 0; c < C; c++) row[c] *= w[c];
    }
}

/* out[i] = act(x[i]); out may be x (then in place). ivdep: no element depends on
 * another, so the loops vectorize without checking whether out and x overlap. */
MS_VECTOR_CLONES
static void activation_span(float *out, const float *x, long long n, ms_activation act) {
    switch (act) {
    case MS_ACT_GELU_NEW: /* 0.5 x (1 + tanh u) == x * sigmoid(2u) */
    case MS_ACT_GELU_FAST:
#pragma GCC ivdep
        for (long long i = 0; i < n; i++) {
            float v = x[i];
            float u = 0.7978845608028654f * (v + 0.044715f * v * v * v);
            out[i] = v / (1.0f + exp_approx(-2.0f * u));
        }
        break;
    case MS_ACT_GELU:
#pragma GCC ivdep
        for (long long i = 0; i < n; i++) out[i] = 0.5f * x[i] * (1.0f + erf_approx(x[i] * 0.7071067811865476f));
        break;
    case MS_ACT_RELU:
#pragma GCC ivdep
        for (long long i = 0; i < n; i++) out[i] = x[i] > 0.0f ? x[i] : 0.0f;
        break;
    case MS_ACT_SILU:
#pragma GCC ivdep
        for (long long i = 0; i < n; i++) out[i] = x[i] * sigmoid_approx(x[i]);
        break;
    case MS_ACT_QUICK_GELU:
#pragma GCC ivdep
        for (long long i = 0; i < n; i++) out[i] = x[i] * sigmoid_approx(1.702f * x[i]);
        break;
    case MS_ACT_TANH:
#pragma GCC ivdep
        for (long long i = 0; i < n; i++) out[i] = 2.0f * sigmoid_approx(2.0f * x[i]) - 1.0f;
        break;
    case MS_ACT_SIGMOID:
#pragma GCC ivdep
        for (long long i = 0; i < n; i++) out[i] = sigmoid_approx(x[i]);
        break;
    default:
        break;
    }
}

typedef struct {
    float *out;
    const float *x;
    ms_activation act;
} activation_job;

static void activation_range(void *ctx, long long lo, long long hi) {
    const activation_job *j = ctx;
    activation_span(j->out + lo, j->x + lo, hi - lo, j->act);
}

void ms_activate(float *out, const float *x, size_t n, ms_activation act, int n_threads) {
    activation_job job = {out, x, act};
    ms_parallel_for((long long)n, 65536, n_threads, activation_range, &job);
}

typedef struct {
    float *out;
    const float *x;
    int ld_out, ld, F;
    ms_activation act;
} gated_job;

static void gated_rows(void *ctx, long long lo, long long hi) {
    const gated_job *j = ctx;
    for (long long i = lo; i < hi; i++) {
        const float *g = j->x + (size_t)i * j->ld, *u = g + j->F;
        float *o = j->out + (size_t)i * j->ld_out;
        activation_span(o, g, j->F, j->act);
        for (int c = 0; c < j->F; c++) o[c] *= u[c];
    }
}

void ms_gated_activation(float *out, int ld_out, const float *x, int ld, int N, int F, ms_activation act,
                         int n_threads) {
    gated_job job = {out, x, ld_out, ld, F, act};
    ms_parallel_for(N, 65536 / (F + 1) + 1, n_threads, gated_rows, &job);
}

void ms_rotary(float *x, const float *rope, int rotary_dim, int interleaved) {
    int half = rotary_dim / 2;
    const float *cs = rope, *sn = rope + half;
    if (interleaved) {
        for (int i = 0; i < half; i++) {
            float x1 = x[2 * i], x2 = x[2 * i + 1];
            x[2 * i] = x1 * cs[i] - x2 * sn[i];
            x[2 * i + 1] = x2 * cs[i] + x1 * sn[i];
        }
        return;
    }
    for (int i = 0; i < half; i++) {
        float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * cs[i] - x2 * sn[i];
        x[i + half] = x2 * cs[i] + x1 * sn[i];
    }
}

/* ---- element-wise passes over memory, split over the threads ---------------------- */

/* Items per thread below which a pass over memory is not split: a thread's share
 * must outweigh waking it (tens of microseconds). */
#define MS_MEMORY_MIN_PER_THREAD (1 << 16)

typedef struct {
    float *out;
    const float *a, *b;
    int ld_out, ld_a, width; /* rows copies: widths and strides; sums: unused */
} memory_job;

static void add_range(void *ctx, long long lo, long long hi) {
    const memory_job *j = ctx;
    for (long long i = lo; i < hi; i++) j->out[i] = j->a[i] + j->b[i];
}

void ms_add(float *out, const float *a, const float *b, size_t n, int n_threads) {
    memory_job job = {out, a, b, 0, 0, 0};
    ms_parallel_for((long long)n, MS_MEMORY_MIN_PER_THREAD, n_threads, add_range, &job);
}

typedef struct {
    float *x;
    float cap;
} softcap_job;

static void softcap_range(void *ctx, long long lo, long long hi) {
    const softcap_job *j = ctx;
    for (long long i = lo; i < hi; i++) j->x[i] = ms_softcap(j->x[i], j->cap);
}

void ms_softcap_all(float *x, size_t n, float cap, int n_threads) {
    softcap_job job = {x, cap};
    ms_parallel_for((long long)n, MS_MEMORY_MIN_PER_THREAD, n_threads, softcap_range, &job);
}

static void copy_rows_range(void *ctx, long long lo, long long hi) {
    const memory_job *j = ctx;
    for (long long i = lo; i < hi; i++)
        memcpy(j->out + i * j->ld_out, j->a + i * j->ld_a, sizeof(float) * (size_t)j->width);
}

void ms_copy_rows(float *dst, int ld_dst, const float *src, int ld_src, int rows, int width, int n_threads) {
    if (rows <= 0 || width <= 0) return;
    memory_job job = {dst, src, NULL, ld_dst, ld_src, width};
    ms_parallel_for(rows, MS_MEMORY_MIN_PER_THREAD / width + 1, n_threads, copy_rows_range, &job);
}

void ms_copy(float *dst, const float *src, size_t n, int n_threads) {
    /* rows of 4,096 floats, the last one partial */
    const int width = 4096;
    int rows = (int)(n / width);
    ms_copy_rows(dst, width, src, width, rows, width, n_threads);
    memcpy(dst + (size_t)rows * width, src + (size_t)rows * width, sizeof(float) * (n - (size_t)rows * width));
}

static void zero_range(void *ctx, long long lo, long long hi) {
    const memory_job *j = ctx;
    memset(j->out + lo, 0, sizeof(float) * (size_t)(hi - lo));
}

void ms_zero(float *dst, size_t n, int n_threads) {
    memory_job job = {dst, NULL, NULL, 0, 0, 0};
    ms_parallel_for((long long)n, MS_MEMORY_MIN_PER_THREAD, n_threads, zero_range, &job);
}

void ms_zero_floats(float *x, size_t n) { ms_zero(x, n, ms_get_num_threads()); }

/* ---- attention, one head and one query at a time ------------------------------------ */

void ms_transpose_keys(float *kt, int ldkt, const float *k, int ldk, int n, int d) {
    for (int j = 0; j < n; j++)
        for (int c = 0; c < d; c++) kt[(size_t)c * ldkt + j] = k[(size_t)j * ldk + c];
}

/* Keys in blocks of this many: the partial scores of four queries stay in
 * registers while the loop runs over the dimensions, and each key value loaded
 * serves the four of them. */
#define MS_KEY_BLOCK 32

MS_VECTOR_CLONES
static void scores4_loops(float *s, int lds, const float *q, int ldq, const float *kt, int ldkt, int n,
                          int d, float scale) {
    int j0 = 0;
    for (; j0 + MS_KEY_BLOCK <= n; j0 += MS_KEY_BLOCK) {
        float a0[MS_KEY_BLOCK] = {0}, a1[MS_KEY_BLOCK] = {0}, a2[MS_KEY_BLOCK] = {0}, a3[MS_KEY_BLOCK] = {0};
        for (int c = 0; c < d; c++) {
            const float *row = kt + (size_t)c * ldkt + j0;
            float q0 = q[c], q1 = q[ldq + c], q2 = q[2 * (size_t)ldq + c], q3 = q[3 * (size_t)ldq + c];
            for (int j = 0; j < MS_KEY_BLOCK; j++) {
                float k = row[j];
                a0[j] += q0 * k;
                a1[j] += q1 * k;
                a2[j] += q2 * k;
                a3[j] += q3 * k;
            }
        }
        for (int j = 0; j < MS_KEY_BLOCK; j++) {
            s[j0 + j] = a0[j] * scale;
            s[lds + j0 + j] = a1[j] * scale;
            s[2 * (size_t)lds + j0 + j] = a2[j] * scale;
            s[3 * (size_t)lds + j0 + j] = a3[j] * scale;
        }
    }
    for (int i = 0; i < 4 && j0 < n; i++)
        ms_query_scores(s + (size_t)i * lds + j0, q + (size_t)i * ldq, kt + j0, ldkt, n - j0, d, scale);
}

MS_VECTOR_CLONES
void ms_query_scores(float *s, const float *q, const float *kt, int ldkt, int n, int d, float scale) {
    for (int j = 0; j < n; j++) s[j] = 0.0f;
    /* one key dimension at a time: contiguous in kt, so the loop over keys vectorizes */
    for (int c = 0; c < d; c++) {
        float qc = q[c];
        const float *row = kt + (size_t)c * ldkt;
        for (int j = 0; j < n; j++) s[j] += qc * row[j];
    }
    for (int j = 0; j < n; j++) s[j] *= scale;
}

/* p[n] <- softmax(p[n]); a row whose entries are all -inf becomes all 0 */
MS_VECTOR_CLONES
void ms_softmax(float *p, int n) {
    float mx = max_of(p, n);
    if (mx == -INFINITY) {
        /* every visible key masked (only an intervention does that): attend nowhere */
        for (int j = 0; j < n; j++) p[j] = 0.0f;
        return;
    }
    /* the exponentials, then their sum: two loops that each vectorize */
    for (int j = 0; j < n; j++) p[j] = exp_approx(p[j] - mx);
    float inv = 1.0f / sum_of(p, n);
    for (int j = 0; j < n; j++) p[j] *= inv;
}

/* Dimensions of z in blocks of this many: four queries' sums stay in registers
 * over the keys, and each value loaded serves the four of them. */
#define MS_VALUE_BLOCK 32

MS_VECTOR_CLONES
static void mix4_loops(float *z, int ldz, const float *p, int ldp, const float *v, int ldv, int n, int d) {
    int c0 = 0;
    for (; c0 + MS_VALUE_BLOCK <= d; c0 += MS_VALUE_BLOCK) {
        float a0[MS_VALUE_BLOCK], a1[MS_VALUE_BLOCK], a2[MS_VALUE_BLOCK], a3[MS_VALUE_BLOCK];
        for (int c = 0; c < MS_VALUE_BLOCK; c++) {
            a0[c] = z[c0 + c];
            a1[c] = z[ldz + c0 + c];
            a2[c] = z[2 * (size_t)ldz + c0 + c];
            a3[c] = z[3 * (size_t)ldz + c0 + c];
        }
        for (int j = 0; j < n; j++) {
            const float *vj = v + (size_t)j * ldv + c0;
            float w0 = p[j], w1 = p[ldp + j], w2 = p[2 * (size_t)ldp + j], w3 = p[3 * (size_t)ldp + j];
            for (int c = 0; c < MS_VALUE_BLOCK; c++) {
                float x = vj[c];
                a0[c] += w0 * x;
                a1[c] += w1 * x;
                a2[c] += w2 * x;
                a3[c] += w3 * x;
            }
        }
        for (int c = 0; c < MS_VALUE_BLOCK; c++) {
            z[c0 + c] = a0[c];
            z[ldz + c0 + c] = a1[c];
            z[2 * (size_t)ldz + c0 + c] = a2[c];
            z[3 * (size_t)ldz + c0 + c] = a3[c];
        }
    }
    if (c0 < d)
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < n; j++) {
                float w = p[(size_t)i * ldp + j];
                const float *vj = v + (size_t)j * ldv;
                for (int c = c0; c < d; c++) z[(size_t)i * ldz + c] += w * vj[c];
            }
}

MS_VECTOR_CLONES
void ms_mix_values(float *z, const float *p, const float *v, int ldv, int n, int d) {
    /* every key given is one the query sees, so a zero weight is not skipped: it
     * multiplies the value as in the four-query kernel (0 * NaN is NaN in both) */
    for (int j = 0; j < n; j++) {
        float w = p[j];
        const float *vj = v + (size_t)j * ldv;
        for (int c = 0; c < d; c++) z[c] += w * vj[c];
    }
}

/* On CPUs with AVX-512 the two four-query kernels are written with 16-float
 * vectors (GCC's vector extension): the compiler then keeps the 4 x 32 partial
 * results in registers, which it does not do for the plain loops above. The
 * arithmetic is the same. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(MS_NO_CLONES)
#define MS_AVX512_KERNELS 1
#include <immintrin.h>
typedef float ms_v16 __attribute__((vector_size(64), aligned(4), may_alias));

/* as scores4_loops; reads keys up to n rounded up to 32 (kt padded by the caller) */
__attribute__((target("arch=x86-64-v4")))
static void scores4_avx512(float *s, int lds, const float *q, int ldq, const float *kt, int ldkt, int n,
                           int d, float scale) {
    for (int j0 = 0; j0 < n; j0 += 32) {
        ms_v16 acc[4][2] = {{{0}}};
        for (int c = 0; c < d; c++) {
            const ms_v16 *k = (const ms_v16 *)(kt + (size_t)c * ldkt + j0);
            ms_v16 k0 = k[0], k1 = k[1];
            for (int i = 0; i < 4; i++) {
                float qi = q[(size_t)i * ldq + c];
                acc[i][0] += qi * k0;
                acc[i][1] += qi * k1;
            }
        }
        int m = n - j0 < 32 ? n - j0 : 32;
        for (int i = 0; i < 4; i++) {
            float out[32];
            *(ms_v16 *)out = acc[i][0] * scale;
            *(ms_v16 *)(out + 16) = acc[i][1] * scale;
            memcpy(s + (size_t)i * lds + j0, out, sizeof(float) * (size_t)m);
        }
    }
}

/* as mix4_loops */
__attribute__((target("arch=x86-64-v4")))
static void mix4_avx512(float *z, int ldz, const float *p, int ldp, const float *v, int ldv, int n, int d) {
    int c0 = 0;
    for (; c0 + 32 <= d; c0 += 32) {
        ms_v16 acc[4][2];
        for (int i = 0; i < 4; i++) {
            acc[i][0] = *(const ms_v16 *)(z + (size_t)i * ldz + c0);
            acc[i][1] = *(const ms_v16 *)(z + (size_t)i * ldz + c0 + 16);
        }
        for (int j = 0; j < n; j++) {
            const ms_v16 *vj = (const ms_v16 *)(v + (size_t)j * ldv + c0);
            ms_v16 v0 = vj[0], v1 = vj[1];
            for (int i = 0; i < 4; i++) {
                float w = p[(size_t)i * ldp + j];
                acc[i][0] += w * v0;
                acc[i][1] += w * v1;
            }
        }
        for (int i = 0; i < 4; i++) {
            *(ms_v16 *)(z + (size_t)i * ldz + c0) = acc[i][0];
            *(ms_v16 *)(z + (size_t)i * ldz + c0 + 16) = acc[i][1];
        }
    }
    for (int i = 0; i < 4 && c0 < d; i++)
        for (int j = 0; j < n; j++) {
            float w = p[(size_t)i * ldp + j];
            const float *vj = v + (size_t)j * ldv;
            for (int c = c0; c < d; c++) z[(size_t)i * ldz + c] += w * vj[c];
        }
}

/* MECHSCOPE_GENERIC_KERNELS=1 in the environment selects the plain loops even on
 * AVX-512 CPUs (the tests use it to check both). */
static int has_avx512(void) {
    static int known = -1; /* the same answer from every thread: no lock needed */
    if (known < 0) {
        const char *generic = getenv("MECHSCOPE_GENERIC_KERNELS");
        known = __builtin_cpu_supports("avx512f") && !(generic && generic[0] == '1');
    }
    return known;
}

/* Few rows through a float32 weight stored [OC, IC] (the unembedding, and the
 * nn.Linear layout of Llama-family checkpoints): such a product is bound by reading
 * the weight, and the BLAS first packs it, which here read it at 5-6 GB/s per thread
 * where a core reads 14; dot products straight from the weight's rows read each
 * once, at 1.4x (16 rows) to 2.3x (1 row) the speed. Each output is one dot product
 * summed in the same order whatever the rows, columns or threads around it. */

/* out[r, k] = beta out[r, k] + in[r, :] . w[k, :] for r < R, k < K (R <= 4, K <= 4);
 * constants R and K after inlining, so that the 16 sums stay in registers */
__attribute__((target("arch=x86-64-v4"), always_inline))
static inline void dot_tile(int R, int K, float *out, int ld_out, const float *in, int ld_in, const float *w,
                            int ld_w, int IC, float beta) {
    ms_v16 acc[4][4] = {{{0}}};
    int i = 0;
    for (; i + 16 <= IC; i += 16) {
        ms_v16 wk[4];
        for (int k = 0; k < K; k++) wk[k] = *(const ms_v16 *)(w + (size_t)k * ld_w + i);
        for (int r = 0; r < R; r++) {
            ms_v16 x = *(const ms_v16 *)(in + (size_t)r * ld_in + i);
            for (int k = 0; k < K; k++) acc[r][k] += x * wk[k];
        }
    }
    if (i < IC) { /* the last IC % 16 inputs, the lanes past them zero */
        __mmask16 m = (__mmask16)((1u << (IC - i)) - 1);
        ms_v16 wk[4];
        for (int k = 0; k < K; k++) wk[k] = (ms_v16)_mm512_maskz_loadu_ps(m, w + (size_t)k * ld_w + i);
        for (int r = 0; r < R; r++) {
            ms_v16 x = (ms_v16)_mm512_maskz_loadu_ps(m, in + (size_t)r * ld_in + i);
            for (int k = 0; k < K; k++) acc[r][k] += x * wk[k];
        }
    }
    for (int r = 0; r < R; r++)
        for (int k = 0; k < K; k++) {
            float sum = _mm512_reduce_add_ps((__m512)acc[r][k]);
            float *o = out + (size_t)r * ld_out + k;
            *o = beta == 0.0f ? sum : beta * *o + sum;
        }
}

/* out[rows, cols] = beta out + in[rows, IC] w[cols, IC]^T: four columns at a time
 * (their weight rows stay in the L1 cache while every group of four rows uses them) */
__attribute__((target("arch=x86-64-v4")))
static void row_dots_avx512(float *out, int ld_out, const float *in, int ld_in, const float *w, int ld_w,
                            int rows, int cols, int IC, float beta) {
#define MS_DOT_TILE(R, K) dot_tile(R, K, o, ld_out, x, ld_in, wk, ld_w, IC, beta)
    for (int k0 = 0; k0 < cols;) {
        int K = cols - k0 >= 4 ? 4 : 1;
        const float *wk = w + (size_t)k0 * ld_w;
        for (int r0 = 0; r0 < rows; r0 += 4) {
            int R = rows - r0 < 4 ? rows - r0 : 4;
            float *o = out + (size_t)r0 * ld_out + k0;
            const float *x = in + (size_t)r0 * ld_in;
            if (K == 4) {
                if (R == 4) MS_DOT_TILE(4, 4);
                else if (R == 3) MS_DOT_TILE(3, 4);
                else if (R == 2) MS_DOT_TILE(2, 4);
                else MS_DOT_TILE(1, 4);
            } else {
                if (R == 4) MS_DOT_TILE(4, 1);
                else if (R == 3) MS_DOT_TILE(3, 1);
                else if (R == 2) MS_DOT_TILE(2, 1);
                else MS_DOT_TILE(1, 1);
            }
        }
        k0 += K;
    }
#undef MS_DOT_TILE
}

/* Few rows through a float32 weight stored [IC, OC] (GPT-2's Conv1D layout): the
 * same bound as above, but here each output row is a combination of the weight's
 * rows, out[r, :] = sum_k in[r, k] w[k, :]. The weight is read in blocks of
 * MS_COMBO_K whole rows, each row from left to right (a few sequential streams,
 * which the hardware prefetches; a strip of columns down the whole weight would
 * jump a row's length at every step), while the outputs stay in the L2 cache.
 * Each output is one chain of multiply-adds over k in order, started from 0
 * (beta 0) or from out (beta 1), so the sums do not depend on the rows, columns,
 * blocks of k or threads around it. */
#define MS_COMBO_K 32

/* out[R, 32] = (load ? out : 0) + in[R, :K] @ w[:K, :32], the columns past the
 * masks m0 | m1 neither read nor written; R <= 8, a constant after inlining, so
 * that the 16 partial sums stay in registers */
__attribute__((target("arch=x86-64-v4"), always_inline))
static inline void combo_tile(int R, float *out, int ld_out, const float *in, int ld_in, const float *w, int ld_w,
                              int K, int load, __mmask16 m0, __mmask16 m1) {
    __m512 acc[8][2];
    for (int r = 0; r < R; r++) {
        acc[r][0] = load ? _mm512_maskz_loadu_ps(m0, out + (size_t)r * ld_out) : _mm512_setzero_ps();
        acc[r][1] = load ? _mm512_maskz_loadu_ps(m1, out + (size_t)r * ld_out + 16) : _mm512_setzero_ps();
    }
    for (int k = 0; k < K; k++) {
        __m512 w0 = _mm512_maskz_loadu_ps(m0, w + (size_t)k * ld_w);
        __m512 w1 = _mm512_maskz_loadu_ps(m1, w + (size_t)k * ld_w + 16);
        for (int r = 0; r < R; r++) {
            __m512 x = _mm512_set1_ps(in[(size_t)r * ld_in + k]);
            acc[r][0] = _mm512_fmadd_ps(x, w0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(x, w1, acc[r][1]);
        }
    }
    for (int r = 0; r < R; r++) {
        _mm512_mask_storeu_ps(out + (size_t)r * ld_out, m0, acc[r][0]);
        _mm512_mask_storeu_ps(out + (size_t)r * ld_out + 16, m1, acc[r][1]);
    }
}

/* out[rows, cols] = beta out + in[rows, IC] @ w[IC, cols] (ld_w), beta 0 or 1 */
__attribute__((target("arch=x86-64-v4")))
static void row_combos_avx512(float *out, int ld_out, const float *in, int ld_in, const float *w, int ld_w,
                              int rows, int cols, int IC, float beta) {
#define MS_COMBO_TILE(R) combo_tile(R, o, ld_out, x, ld_in, wk, ld_w, K, load, m0, m1)
    for (int k0 = 0; k0 < IC; k0 += MS_COMBO_K) {
        int K = IC - k0 < MS_COMBO_K ? IC - k0 : MS_COMBO_K, load = k0 > 0 || beta != 0.0f;
        for (int j0 = 0; j0 < cols; j0 += 32) {
            int left = cols - j0;
            __mmask16 m0 = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
            __mmask16 m1 = left >= 32 ? (__mmask16)0xFFFF : left > 16 ? (__mmask16)((1u << (left - 16)) - 1) : 0;
            const float *wk = w + (size_t)k0 * ld_w + j0;
            for (int r0 = 0; r0 < rows; r0 += 8) {
                float *o = out + (size_t)r0 * ld_out + j0;
                const float *x = in + (size_t)r0 * ld_in + k0;
                switch (rows - r0 < 8 ? rows - r0 : 8) {
                case 8: MS_COMBO_TILE(8); break;
                case 7: MS_COMBO_TILE(7); break;
                case 6: MS_COMBO_TILE(6); break;
                case 5: MS_COMBO_TILE(5); break;
                case 4: MS_COMBO_TILE(4); break;
                case 3: MS_COMBO_TILE(3); break;
                case 2: MS_COMBO_TILE(2); break;
                default: MS_COMBO_TILE(1); break;
                }
            }
        }
    }
#undef MS_COMBO_TILE
}
#endif

/* weight_row_combos' product when this CPU has the kernel for it, IC > 0 and beta
 * is 0 or 1; 0: use the BLAS */
static int weight_row_combos(float *out, int ld_out, const float *in, int ld_in, const float *w, int ld_w,
                             int rows, int cols, int IC, float beta) {
#ifdef MS_AVX512_KERNELS
    if (has_avx512() && IC > 0 && (beta == 0.0f || beta == 1.0f)) {
        row_combos_avx512(out, ld_out, in, ld_in, w, ld_w, rows, cols, IC, beta);
        return 1;
    }
#endif
    return 0;
}

/* weight_row_dots' product when this CPU has the kernel for it; 0: use the BLAS */
static int weight_row_dots(float *out, int ld_out, const float *in, int ld_in, const float *w, int ld_w,
                           int rows, int cols, int IC, float beta) {
#ifdef MS_AVX512_KERNELS
    if (has_avx512()) {
        row_dots_avx512(out, ld_out, in, ld_in, w, ld_w, rows, cols, IC, beta);
        return 1;
    }
#endif
    return 0;
}

const char *ms_kernels_name(void) {
#ifdef MS_AVX512_KERNELS
    if (has_avx512()) return "AVX-512 attention kernels and few-row products";
#endif
    return "generic attention kernels (loops compiled for AVX-512, AVX2 and the baseline), BLAS products";
}

void ms_query_scores4(float *s, int lds, const float *q, int ldq, const float *kt, int ldkt, int n,
                      int d, float scale) {
#ifdef MS_AVX512_KERNELS
    if (has_avx512()) {
        scores4_avx512(s, lds, q, ldq, kt, ldkt, n, d, scale);
        return;
    }
#endif
    scores4_loops(s, lds, q, ldq, kt, ldkt, n, d, scale);
}

void ms_mix_values4(float *z, int ldz, const float *p, int ldp, const float *v, int ldv, int n, int d) {
#ifdef MS_AVX512_KERNELS
    if (has_avx512()) {
        mix4_avx512(z, ldz, p, ldp, v, ldv, n, d);
        return;
    }
#endif
    mix4_loops(z, ldz, p, ldp, v, ldv, n, d);
}

MS_VECTOR_CLONES
double ms_log_sum_exp(const float *y, int n) {
    float mx = max_of(y, n);
    if (mx == -INFINITY || mx == INFINITY || mx != mx) return (double)mx;
    float acc[MS_LANES] = {0};
    int i = 0;
    for (; i + MS_LANES <= n; i += MS_LANES)
        for (int j = 0; j < MS_LANES; j++) acc[j] += exp_approx(y[i + j] - mx);
    double sum = 0.0;
    for (int j = 0; j < MS_LANES; j++) sum += acc[j];
    for (; i < n; i++) sum += exp_approx(y[i] - mx);
    return (double)mx + log(sum);
}

MS_VECTOR_CLONES
double ms_cross_entropy_backward(float *y, int n, int target, float weight) {
    float mx = max_of(y, n), yt = y[target];
    if (mx == -INFINITY || mx == INFINITY || mx != mx) { /* no finite logits: the loss is not finite */
        for (int i = 0; i < n; i++) y[i] = NAN;
        return (double)mx - yt;
    }
    /* e^(y - max) in place, then their sum in lanes as ms_log_sum_exp sums them:
     * loops that each vectorize */
    for (int i = 0; i < n; i++) y[i] = exp_approx(y[i] - mx);
    float acc[MS_LANES] = {0};
    int i = 0;
    for (; i + MS_LANES <= n; i += MS_LANES)
        for (int k = 0; k < MS_LANES; k++) acc[k] += y[i + k];
    double sum = 0.0;
    for (int k = 0; k < MS_LANES; k++) sum += acc[k];
    for (; i < n; i++) sum += y[i];
    float scale = (float)(weight / sum);
    for (i = 0; i < n; i++) y[i] *= scale;
    y[target] -= weight;
    return (double)mx + log(sum) - (double)yt;
}

MS_VECTOR_CLONES
double ms_kl_divergence(const float *ref_logprob, const float *y, double log_z, int n) {
    float acc[MS_LANES] = {0};
    float lz = (float)log_z;
    int i = 0;
    for (; i + MS_LANES <= n; i += MS_LANES)
        for (int j = 0; j < MS_LANES; j++) {
            float r = ref_logprob[i + j];
            /* terms with zero reference probability are 0 (not 0 * inf) */
            float term = exp_approx(r) * (r - (y[i + j] - lz));
            acc[j] += r > -87.0f ? term : 0.0f;
        }
    double kl = 0.0;
    for (int j = 0; j < MS_LANES; j++) kl += acc[j];
    for (; i < n; i++) {
        float r = ref_logprob[i];
        if (r > -87.0f) kl += exp_approx(r) * (r - (y[i] - lz));
    }
    return kl;
}

void ms_unembed(float *out, const float *x, const float *unembed, int M, int C, int V, int n_threads) {
    gemm_job g = {out, x, unembed, NULL, C, M, C, V, V, C, 0, 0, 1};
    gemm(&g, n_threads);
}

/* ---- 2-byte weights ------------------------------------------------------------------ */

/* IEEE float16 -> float32, exactly (zero, subnormal, normal, inf, NaN) */
static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    float f;
    if (e == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (e) {
        bits = sign | ((e + 112u) << 23) | (man << 13);
    } else {
        f = (float)man * 5.9604644775390625e-8f; /* man * 2^-24: subnormal or zero */
        memcpy(&bits, &f, sizeof bits);
        bits |= sign;
    }
    memcpy(&f, &bits, sizeof f);
    return f;
}

float ms_half_to_float(uint16_t h, ms_dtype dtype) {
    if (dtype == MS_F16) return f16_to_f32(h);
    uint32_t bits = (uint32_t)h << 16; /* bfloat16 is the top half of a float32 */
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

MS_VECTOR_CLONES
static void widen_bf16(float *dst, const uint16_t *src, size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint32_t bits = (uint32_t)src[i] << 16;
        memcpy(dst + i, &bits, sizeof bits);
    }
}

static void widen_f16_loops(float *dst, const uint16_t *src, size_t n) {
    for (size_t i = 0; i < n; i++) dst[i] = f16_to_f32(src[i]);
}

/* The conversion instructions: AVX-512F converts 16 float16 at once, F16C (every
 * CPU with AVX2) 8; both exact, as the loop above. */
#ifdef MS_AVX512_KERNELS
#include <immintrin.h>

__attribute__((target("arch=x86-64-v4")))
static void widen_f16_avx512(float *dst, const uint16_t *src, size_t n) {
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i))));
    widen_f16_loops(dst + i, src + i, n - i);
}

__attribute__((target("arch=x86-64-v3")))
static void widen_f16_f16c(float *dst, const uint16_t *src, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    widen_f16_loops(dst + i, src + i, n - i);
}

/* as has_avx512: MECHSCOPE_GENERIC_KERNELS=1 selects the plain loop */
static int has_f16c(void) {
    static int known = -1;
    if (known < 0) {
        const char *generic = getenv("MECHSCOPE_GENERIC_KERNELS");
        known = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx2") && !(generic && generic[0] == '1');
    }
    return known;
}
#endif

void ms_widen(float *dst, const uint16_t *src, size_t n, ms_dtype dtype) {
    if (dtype == MS_BF16) {
        widen_bf16(dst, src, n);
        return;
    }
#ifdef MS_AVX512_KERNELS
    if (has_avx512()) {
        widen_f16_avx512(dst, src, n);
        return;
    }
    if (has_f16c()) {
        widen_f16_f16c(dst, src, n);
        return;
    }
#endif
    widen_f16_loops(dst, src, n);
}

/* ---- mixtures of experts ---------------------------------------------------------- */

/* place of expert e among the E probabilities p: how many come before it (a higher
 * probability, or an equal one of a lower index, as a stable descending sort) */
int ms_expert_rank(const float *p, int E, int e) {
    int rank = 0;
    for (int j = 0; j < E; j++) rank += p[j] > p[e] || (p[j] == p[e] && j < e);
    return rank;
}

/* w[E] <- each expert's weight for one token (see kernels.h); a sum of 0 means an
 * intervention routed the token nowhere */
void ms_expert_weights(float *w, const float *p, int E, int k, int renormalize) {
    if (!renormalize) {
        for (int e = 0; e < E; e++) w[e] = ms_expert_rank(p, E, e) < k ? p[e] : 0.0f;
        return;
    }
    for (int e = 0; e < E; e++) {
        int rank = ms_expert_rank(p, E, e);
        if (rank < k) w[rank] = p[e]; /* w[0..k) <- the chosen, most probable first */
    }
    float sum = 0.0f;
    for (int r = 0; r < k; r++) sum += w[r];
    for (int e = 0; e < E; e++)
        w[e] = ms_expert_rank(p, E, e) < k && sum != 0.0f ? p[e] / sum : 0.0f;
}

void ms_gated_post(float *out, const float *x, int n, int F, ms_activation act, int n_threads) {
    ms_gated_activation(out, F, x, 2 * F, n, F, act, n_threads);
}
