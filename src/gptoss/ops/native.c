/*
 * Native CPU kernels for the reads that decide CPU speed: MXFP4 expert weights and bf16 / int8
 * dense weights, multiplied by fp32 or bf16 activation rows.
 *
 * Why by hand: PyTorch has no packed-4-bit matmul, and its bf16 matvec reaches about half the
 * memory bandwidth on these machines. Each kernel streams a tile of weight rows once per chunk of
 * up to MAX_ROWS activation rows. Tiles go to OpenMP threads with a guided schedule: long runs of
 * neighbouring tiles first (one sequential stream per thread, which the hardware prefetchers follow
 * best: up to 1.4x the read rate of tile-by-tile handing out here), then smaller runs, so that a
 * thread another job slows down still takes less of the work.
 *
 * The module takes plain buffer addresses (Python ints from Tensor.data_ptr()), sizes and dtype
 * codes, so it builds with nothing but a C compiler and Python's headers. AVX-512 (with or without
 * BF16 dot products) and AVX2 paths are compiled side by side with target attributes and chosen at
 * run time, AMX tiles for a prompt's experts where Linux grants them; a portable C path covers the
 * rest. Accumulation is fp32 throughout, like PyTorch's, except that one bf16 row against MXFP4
 * weights on AVX2, and bf16 rows against int8 weights on AVX-512, sum each block exactly in
 * integers after rounding the rows to 16-bit block floats (mxfp4_i16_avx2, int8w_i16_avx512).
 *
 * Row counts 1..MAX_ROWS are compile-time constants inside each kernel (one specialisation per
 * count), so the accumulators stay in registers.
 *
 * An MoE layer's experts run in one call (moe): tokens grouped by expert, each chosen expert's
 * gate_up projection with the bias and clamped SwiGLU applied to the sums as they are made, then
 * the down projections summing every expert's weighted output into the token rows. Prefill goes
 * the same way: many tokens per expert are chunks of MAX_ROWS against a weight tile in cache (on
 * AVX2, all of them at once against a tile decoded a column chunk at a time: avx2_gemm). With
 * bf16 activations that runs at ~250 GFLOP/s per core here, as fast as PyTorch's bf16 GEMM alone at
 * 16 tokens per expert (a 128-token prompt's average) before any dequantization is paid for; only
 * from ~64 tokens per expert would dequantize-to-tile + GEMM start to gain (GEMM alone ~1.4x).
 * Where the CPU has AMX tiles, that does gain: a prompt's experts decode their weights to bf16
 * tiles and multiply them on AMX (mxfp4_amx).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>
#define ARCH_REQ_XCOMP_PERM 0x1023 /* arch_prctl: ask for an extended state component */
#define XFEATURE_XTILEDATA 18      /* the AMX tile data */
#endif

#define MAX_ROWS 8 /* activation rows per kernel call; more rows are processed in chunks */
#define BLOCK 32   /* MXFP4 values per block (16 bytes + 1 scale byte) */
#define TILE 32    /* weight rows per unit of work handed to a thread (even: SwiGLU pairs) */
/* Bytes ahead of the MXFP4 and int8 streams that the kernels ask the cache for (MXFP4 scales, 1/16
 * as many bytes, PF_DIST / 16 ahead): the hardware prefetchers alone leave two threads at about 3/4
 * of the read rate this reaches. 8 KiB rather than 2 for MXFP4: +6% from memory at ~44 GB/s, +11% at
 * ~70 GB/s (the more bandwidth, the more bytes must be in flight); the scale prefetches add ~4%. */
#ifndef PF_DIST
#define PF_DIST 8192
#endif
/* On Intel CPUs the AVX-512 decode kernels ask for their weights into L2 (_MM_HINT_T1), PF_L2_DIST
 * ahead, the bf16 matvec included. On this project's 2-core Xeon (AMX), two threads from DRAM: the
 * MoE at one token 18.7 GB/s against 16.1 with PF_DIST into L1, the bf16 matvec 28.8-30.2 against
 * 23.9 with no prefetch, int8 alike (23.4-24.2 against 23.4); T2 measured as T1, and 8-32 KiB ahead
 * alike. On the AMD machines prefetches into L1 PF_DIST ahead measured best for the MXFP4 and int8
 * kernels (T1, T2 and NTA gave nothing or lost) and the bf16 matvec kept up without any. */
#define PF_L2_DIST 16384
static int prefetch_to_l2; /* set at import: whether the CPU is Intel's */
#define PREFETCH_WEIGHTS(p)                                                                        \
    (prefetch_to_l2 ? _mm_prefetch((const char *)(p) + PF_L2_DIST, _MM_HINT_T1)                    \
                    : _mm_prefetch((const char *)(p) + PF_DIST, _MM_HINT_T0))
#define PREFETCH_SCALES(p) /* MXFP4 scales: 1/16 as far */                                        \
    (prefetch_to_l2 ? _mm_prefetch((const char *)(p) + PF_L2_DIST / 16, _MM_HINT_T1)               \
                    : _mm_prefetch((const char *)(p) + PF_DIST / 16, _MM_HINT_T0))
#define INLINE static inline __attribute__((always_inline))

enum dtype { F32 = 0, BF16 = 1 };
enum kind { MXFP4 = 0, BF16W = 1, INT8W = 2 };

static const float FP4_VALUES[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                                     -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
static float SCALES[256];       /* 2^(s - 127) for every scale byte */
static float SCALES_TOP[256];   /* 2^(s - 152) (s >= 3): the AVX2 kernel's scale, see mxfp4_avx2_block */
static float SCALES_HALF[256];  /* 2^(s - 128): the scale of twice the FP4 values, see mxfp4_i16_avx2 */
static int16_t EXP_SHIFT[256];  /* (s - 127) << 7: added to a bf16 it multiplies by 2^(s - 127) */
static uint16_t FP4_BF16[32]; /* the table as bf16 bits, twice: entry k is code k & 15 */

static inline float bf16_to_f32(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as PyTorch does */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7FFFFFFF) > 0x7F800000) return (uint16_t)((bits >> 16) | 0x40); /* quiet NaN */
    return (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

static inline float load_val(const void *p, int dt, int64_t i) {
    return dt == BF16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store_val(void *p, int dt, int64_t i, float v) {
    if (dt == BF16) ((uint16_t *)p)[i] = f32_to_bf16(v);
    else ((float *)p)[i] = v;
}

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* ------------------------------------------------------------------ what a kernel reads and writes */
typedef struct {
    int kind;
    const void *w;      /* MXFP4: blocks (out, in/32, 16); BF16W: (out, in) bf16; INT8W: (out, in) */
    const void *scales; /* MXFP4: (out, in/32) exponent bytes; INT8W: (out,) fp32; else unused */
    int64_t out, in;
} weights;

/* How a kernel wants its activation rows: bf16 as given; fp32 as given; fp32 with each group of 32
 * holding its 16 even-indexed values, then its 16 odd-indexed ones (a tail as it is); bf16 in the
 * order in which mxfp4_quads decodes weights: each run of 128 values (four groups) as four runs of
 * 32, the values whose index is 0, 1, 2, 3 mod 4 in turn, and a last run of 64 (rows of 64·odd
 * length) in the order of mxfp4_pair: the even-indexed values of its first group, then those of
 * the second, then the odd-indexed ones of each; or, for mxfp4_i16_avx2, every pair of groups as
 * 16-bit block floats, 256 bytes (see write_i16_pairs); or, for int8w_i16_avx512, the row's 16-bit
 * block-float integers, then each group's multiplier (see write_i16_groups). */
enum layout { AS_BF16, AS_F32, AS_F32_SPLIT, AS_BF16_QUADS, AS_I16_PAIRS, AS_I16_GROUPS };

/* Where column c of a row of `width` values lies in `layout`. */
static inline int64_t layout_column(int layout, int64_t c, int64_t width) {
    if (layout == AS_F32_SPLIT) {
        int64_t j = c % BLOCK;
        return c - j + (j % 2 ? BLOCK / 2 + j / 2 : j / 2);
    }
    if (layout == AS_BF16_QUADS && c < width - width % (4 * BLOCK)) {
        int64_t j = c % (4 * BLOCK);
        return c - j + (j % 4) * BLOCK + j / 4;
    }
    if (layout == AS_BF16_QUADS) { /* the last 64 of a row of 64·odd length */
        int64_t j = c % (2 * BLOCK), i = j % BLOCK;
        return c - j + (i % 2) * BLOCK + (j / BLOCK) * (BLOCK / 2) + i / 2;
    }
    return c;
}

/* What happens to the fp32 dot products of one weight row r with the n activation rows: each gets
 * the row's bias, then is stored in y (column r), or, for a gate_up projection, joins its pair in the
 * clamped SwiGLU (column r / 2), or, for an expert's down projection, is weighted and added to the
 * output row of its token (fp32). */
enum mode { STORE, SWIGLU, ACCUMULATE };

typedef struct {
    int64_t n;
    const void *bias; /* (out,) or NULL */
    int bias_dt;
    int mode;
    void *y; /* STORE, SWIGLU: (n, y_stride) in y_dt; ACCUMULATE: fp32 (tokens, y_stride) */
    int y_dt;
    int64_t y_stride;
    int y_layout;        /* SWIGLU: the layout the next kernel reads y in */
    int round_bf16;      /* SWIGLU into fp32: round to bf16 first, as bf16 activations are */
    float alpha, limit;  /* SWIGLU */
    const int64_t *token;  /* ACCUMULATE: the output row of each activation row */
    const float *weight;   /* ACCUMULATE: its routing weight */
} epilogue;

/* The clamped SwiGLU of model.clamped_swiglu for one (gate, linear) pair. */
static inline float swiglu(float gate, float linear, float alpha, float limit) {
    gate = gate < limit ? gate : limit;
    linear = linear < -limit ? -limit : linear > limit ? limit : linear;
    return gate / (1.0f + expf(-alpha * gate)) * (linear + 1.0f);
}

/* gate: the previous (even) row's values, kept by the caller between the two rows of a pair. */
static inline void finish_row(const epilogue *e, int64_t r, const float *sums, float *gate) {
    float b = e->bias ? load_val(e->bias, e->bias_dt, r) : 0.0f;
    for (int64_t t = 0; t < e->n; t++) {
        float v = sums[t] + b;
        if (e->mode == STORE) {
            store_val(e->y, e->y_dt, t * e->y_stride + r, v);
        } else if (e->mode == ACCUMULATE) {
            ((float *)e->y)[e->token[t] * e->y_stride + r] += e->weight[t] * v;
        } else if (r % 2 == 0) {
            gate[t] = v;
        } else {
            int64_t c = layout_column(e->y_layout, r / 2, e->y_stride);
            float h = swiglu(gate[t], v, e->alpha, e->limit);
            store_val(e->y, e->y_dt, t * e->y_stride + c, e->round_bf16 ? bf16_to_f32(f32_to_bf16(h)) : h);
        }
    }
}

/* e narrowed to activation rows [t0, t0 + count) of the rows it was made for. */
static epilogue rows_epilogue(const epilogue *e, int64_t t0, int64_t count) {
    size_t y_size = e->mode == ACCUMULATE || e->y_dt == F32 ? 4 : 2;
    epilogue rows = *e;
    rows.n = count;
    if (e->mode == ACCUMULATE) {
        rows.token = e->token + t0;
        rows.weight = e->weight + t0;
    } else {
        rows.y = (char *)e->y + t0 * e->y_stride * y_size;
    }
    return rows;
}

/* A kernel: weight rows [r0, r1) against n activation rows x (n, in), in the layout that kernel
 * expects (see write_activations); n is 1..MAX_ROWS except for kernels that takes_all_rows names. */
typedef void (*row_fn)(const void *x, int64_t n, const weights *w, int64_t r0, int64_t r1,
                       const epilogue *e);

#define SWITCH_ROWS(n, BODY)                                                                   \
    switch (n) {                                                                               \
    case 1: BODY(1); break;                                                                    \
    case 2: BODY(2); break;                                                                    \
    case 3: BODY(3); break;                                                                    \
    case 4: BODY(4); break;                                                                    \
    case 5: BODY(5); break;                                                                    \
    case 6: BODY(6); break;                                                                    \
    case 7: BODY(7); break;                                                                    \
    default: BODY(8); break;                                                                   \
    }

/* ------------------------------------------------------------------ portable C (natural fp32 x) */
static void mxfp4_c(const void *xv, int64_t n, const weights *w, int64_t r0, int64_t r1,
                    const epilogue *e) {
    const float *x = xv;
    const uint8_t *blocks = w->w, *scales = w->scales;
    int64_t in = w->in, groups = in / BLOCK;
    float sums[MAX_ROWS], gate[MAX_ROWS];
    for (int64_t r = r0; r < r1; r++) {
        for (int64_t t = 0; t < n; t++) {
            const float *xt = x + t * in;
            float acc = 0.0f;
            for (int64_t g = 0; g < groups; g++) {
                const uint8_t *b = blocks + (r * groups + g) * 16;
                float part = 0.0f;
                for (int j = 0; j < 16; j++) {
                    part += FP4_VALUES[b[j] & 15] * xt[g * BLOCK + 2 * j];
                    part += FP4_VALUES[b[j] >> 4] * xt[g * BLOCK + 2 * j + 1];
                }
                acc += part * SCALES[scales[r * groups + g]];
            }
            sums[t] = acc;
        }
        finish_row(e, r, sums, gate);
    }
}

static void bf16w_c(const void *xv, int64_t n, const weights *w, int64_t r0, int64_t r1,
                    const epilogue *e) {
    const float *x = xv;
    const uint16_t *wt = w->w;
    int64_t in = w->in;
    float sums[MAX_ROWS], gate[MAX_ROWS];
    for (int64_t r = r0; r < r1; r++) {
        for (int64_t t = 0; t < n; t++) {
            float acc = 0.0f;
            for (int64_t i = 0; i < in; i++) acc += bf16_to_f32(wt[r * in + i]) * x[t * in + i];
            sums[t] = acc;
        }
        finish_row(e, r, sums, gate);
    }
}

static void int8w_c(const void *xv, int64_t n, const weights *w, int64_t r0, int64_t r1,
                    const epilogue *e) {
    const float *x = xv, *wscale = w->scales;
    const int8_t *wt = w->w;
    int64_t in = w->in;
    float sums[MAX_ROWS], gate[MAX_ROWS];
    for (int64_t r = r0; r < r1; r++) {
        for (int64_t t = 0; t < n; t++) {
            float acc = 0.0f;
            for (int64_t i = 0; i < in; i++) acc += (float)wt[r * in + i] * x[t * in + i];
            sums[t] = acc * wscale[r];
        }
        finish_row(e, r, sums, gate);
    }
}

/* ------------------------------------------------------------------ AVX-512, fp32 activations */
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define AVX512_INLINE AVX512 INLINE

/* With 5 or more activation rows the AVX-512 kernels are compute-bound and take weight rows two
 * at a time (R = 2), so that every activation load feeds two products. With fewer (decode) they
 * are bound by memory and take one row at a time: a single sequential stream per thread is what
 * the hardware prefetchers follow best (two interleaved rows read at half the speed from DRAM).
 * U independent accumulator streams per (row, weight row) hide the FMA latency where rows are few. */
#define STREAMS(N) ((N) == 1 ? 4 : (N) <= 4 ? 2 : 1)

/* Weight rows [r0, r1), in pairs when N > 4; BODY(N, R, r) handles rows r .. r+R-1. */
#define ROW_PAIRS(N, BODY)                                                                     \
    do {                                                                                       \
        int64_t r = r0;                                                                        \
        if ((N) > 4)                                                                           \
            for (; r + 2 <= r1; r += 2) BODY(N, 2, r);                                         \
        for (; r < r1; r++) BODY(N, 1, r);                                                     \
    } while (0)

/* x is pre-split per block into its 16 even-indexed then its 16 odd-indexed values (split in
 * write_activations), so that a block's low nibbles multiply the first half and its high nibbles
 * the second: no byte interleaving in the inner loop. vpermps reads only the low 4 bits of each
 * index, so the low nibble needs no mask. The scale (a power of two) multiplies the decoded
 * weights, exactly. */
AVX512_INLINE void mxfp4_f32_avx512_rows(const int N, const int R, const float *x, const weights *w,
                                         int64_t r, const epilogue *e, float *gate) {
    const __m512 table = _mm512_loadu_ps(FP4_VALUES);
    const int U = STREAMS(N);
    int64_t in = w->in, groups = in / BLOCK;
    const uint8_t *rb = (const uint8_t *)w->w + r * groups * 16;
    const uint8_t *rs = (const uint8_t *)w->scales + r * groups;
    __m512 acc[4][MAX_ROWS][2];
#pragma GCC unroll 8
    for (int t = 0; t < N; t++)
        for (int u = 0; u < U; u++)
            for (int q = 0; q < R; q++) acc[u][t][q] = _mm512_setzero_ps();
    for (int64_t g0 = 0; g0 < groups; g0 += U) {
#pragma GCC unroll 4
        for (int u = 0; u < U; u++) {
            int64_t g = g0 + u;
            if (U > 1 && g >= groups) break;
            __m512 w_even[2], w_odd[2];
#pragma GCC unroll 2
            for (int q = 0; q < R; q++) {
                const uint8_t *b = rb + (q * groups + g) * 16;
                __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)b));
                __m512 scale = _mm512_set1_ps(SCALES[rs[q * groups + g]]);
                w_even[q] = _mm512_mul_ps(_mm512_permutexvar_ps(codes, table), scale);
                w_odd[q] = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), table), scale);
            }
#pragma GCC unroll 8
            for (int t = 0; t < N; t++) {
                __m512 x_even = _mm512_loadu_ps(x + t * in + g * BLOCK);
                __m512 x_odd = _mm512_loadu_ps(x + t * in + g * BLOCK + 16);
#pragma GCC unroll 2
                for (int q = 0; q < R; q++)
                    acc[u][t][q] = _mm512_fmadd_ps(w_odd[q], x_odd, _mm512_fmadd_ps(w_even[q], x_even, acc[u][t][q]));
            }
        }
    }
    float sums[2][MAX_ROWS];
#pragma GCC unroll 8
    for (int t = 0; t < N; t++)
        for (int q = 0; q < R; q++) {
            __m512 s = acc[0][t][q];
            for (int u = 1; u < U; u++) s = _mm512_add_ps(s, acc[u][t][q]);
            sums[q][t] = _mm512_reduce_add_ps(s);
        }
    for (int q = 0; q < R; q++) finish_row(e, r + q, sums[q], gate);
}

AVX512 static void mxfp4_f32_avx512(const void *x, int64_t n, const weights *w, int64_t r0,
                                    int64_t r1, const epilogue *e) {
    float gate[MAX_ROWS];
#define ROWS(N, R, r) mxfp4_f32_avx512_rows(N, R, x, w, r, e, gate)
#define BODY(N) ROW_PAIRS(N, ROWS)
    SWITCH_ROWS(n, BODY)
#undef BODY
#undef ROWS
}

/* bf16 → fp32 is a 16-bit left shift: even halves by shifting, odd ones by masking (x pre-split). */
AVX512_INLINE void bf16w_f32_avx512_rows(const int N, const int R, const float *x, const weights *w,
                                         int64_t r, const epilogue *e, float *gate) {
    const int U = STREAMS(N);
    int64_t in = w->in, full = in - in % BLOCK;
    const uint16_t *wr = (const uint16_t *)w->w + r * in;
    __m512 acc[4][MAX_ROWS][2];
#pragma GCC unroll 8
    for (int t = 0; t < N; t++)
        for (int u = 0; u < U; u++)
            for (int q = 0; q < R; q++) acc[u][t][q] = _mm512_setzero_ps();
    for (int64_t i0 = 0; i0 < full; i0 += U * BLOCK) {
#pragma GCC unroll 4
        for (int u = 0; u < U; u++) {
            int64_t i = i0 + u * BLOCK;
            if (U > 1 && i >= full) break;
            __m512 w_lo[2], w_hi[2];
#pragma GCC unroll 2
            for (int q = 0; q < R; q++) {
                __m512i raw = _mm512_loadu_si512((const void *)(wr + q * in + i));
                w_lo[q] = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
                w_hi[q] = _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32((int)0xFFFF0000)));
            }
#pragma GCC unroll 8
            for (int t = 0; t < N; t++) {
                __m512 x_even = _mm512_loadu_ps(x + t * in + i);
                __m512 x_odd = _mm512_loadu_ps(x + t * in + i + 16);
#pragma GCC unroll 2
                for (int q = 0; q < R; q++)
                    acc[u][t][q] = _mm512_fmadd_ps(w_hi[q], x_odd, _mm512_fmadd_ps(w_lo[q], x_even, acc[u][t][q]));
            }
        }
    }
    float sums[2][MAX_ROWS];
#pragma GCC unroll 8
    for (int t = 0; t < N; t++)
        for (int q = 0; q < R; q++) {
            __m512 s = acc[0][t][q];
            for (int u = 1; u < U; u++) s = _mm512_add_ps(s, acc[u][t][q]);
            float v = _mm512_reduce_add_ps(s);
            for (int64_t i = full; i < in; i++) v += bf16_to_f32(wr[q * in + i]) * x[t * in + i];
            sums[q][t] = v;
        }
    for (int q = 0; q < R; q++) finish_row(e, r + q, sums[q], gate);
}

AVX512 static void bf16w_f32_avx512(const void *x, int64_t n, const weights *w, int64_t r0,
                                    int64_t r1, const epilogue *e) {
    float gate[MAX_ROWS];
#define ROWS(N, R, r) bf16w_f32_avx512_rows(N, R, x, w, r, e, gate)
#define BODY(N) ROW_PAIRS(N, ROWS)
    SWITCH_ROWS(n, BODY)
#undef BODY
#undef ROWS
}

AVX512_INLINE void int8w_f32_avx512_rows(const int N, const int R, const float *x, const weights *w,
                                         int64_t r, const epilogue *e, float *gate) {
    const int U = STREAMS(N);
    int64_t in = w->in, full = in - in % 16;
    __mmask16 tail = (__mmask16)((1u << (in % 16)) - 1);
    const int8_t *wr = (const int8_t *)w->w + r * in;
    __m512 acc[4][MAX_ROWS][2];
#pragma GCC unroll 8
    for (int t = 0; t < N; t++)
        for (int u = 0; u < U; u++)
            for (int q = 0; q < R; q++) acc[u][t][q] = _mm512_setzero_ps();
    for (int64_t i0 = 0; i0 < full; i0 += U * 16) {
#pragma GCC unroll 4
        for (int u = 0; u < U; u++) {
            int64_t i = i0 + u * 16;
            if (U > 1 && i >= full) break;
            __m512 wv[2];
#pragma GCC unroll 2
            for (int q = 0; q < R; q++)
                wv[q] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(wr + q * in + i))));
#pragma GCC unroll 8
            for (int t = 0; t < N; t++) {
                __m512 xv = _mm512_loadu_ps(x + t * in + i);
#pragma GCC unroll 2
                for (int q = 0; q < R; q++) acc[u][t][q] = _mm512_fmadd_ps(wv[q], xv, acc[u][t][q]);
            }
        }
    }
    if (full < in) {
        __m512 wv[2];
        for (int q = 0; q < R; q++)
            wv[q] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(tail, wr + q * in + full)));
#pragma GCC unroll 8
        for (int t = 0; t < N; t++) {
            __m512 xv = _mm512_maskz_loadu_ps(tail, x + t * in + full);
            for (int q = 0; q < R; q++) acc[0][t][q] = _mm512_fmadd_ps(wv[q], xv, acc[0][t][q]);
        }
    }
    float sums[2][MAX_ROWS];
#pragma GCC unroll 8
    for (int t = 0; t < N; t++)
        for (int q = 0; q < R; q++) {
            __m512 s = acc[0][t][q];
            for (int u = 1; u < U; u++) s = _mm512_add_ps(s, acc[u][t][q]);
            sums[q][t] = _mm512_reduce_add_ps(s) * ((const float *)w->scales)[r + q];
        }
    for (int q = 0; q < R; q++) finish_row(e, r + q, sums[q], gate);
}

AVX512 static void int8w_f32_avx512(const void *x, int64_t n, const weights *w, int64_t r0,
                                    int64_t r1, const epilogue *e) {
    float gate[MAX_ROWS];
#define ROWS(N, R, r) int8w_f32_avx512_rows(N, R, x, w, r, e, gate)
#define BODY(N) ROW_PAIRS(N, ROWS)
    SWITCH_ROWS(n, BODY)
#undef BODY
#undef ROWS
}

/* ------------------------------------------------------------------ AVX-512 BF16, bf16 activations */
#define AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512bf16")))
#define AVX512BF16_INLINE AVX512BF16 INLINE

/* vdpbf16ps multiplies bf16 pairs exactly and accumulates in fp32: 32 products per instruction.
 * Used only when the activations already are bf16 (the model's dtype), so nothing is rounded that
 * the reference does not round. */
AVX512BF16_INLINE __m512bh as_bh(__m512i v) {
    __m512bh r;
    memcpy(&r, &v, sizeof r);
    return r;
}

/* A block's 32 weights as bf16 in natural order (dword j = weight 2j low, weight 2j+1 high), the
 * scale folded into the exponent; zeros stay zero. Exact while the exponent stays normal, which
 * scale bytes 2..252 guarantee for every table value (0.5 .. 6). Rows are checked whole before
 * their loop (rows_safe), so the loop of an ordinary row has no branch. */
#define SAFE_SCALE(s) ((s) >= 2 && (s) <= 252)

AVX512BF16_INLINE int rows_safe(const uint8_t *scales, int64_t count) {
    __mmask64 bad = 0;
    for (int64_t i = 0; i < count; i += 64) {
        __mmask64 valid = count - i >= 64 ? ~(__mmask64)0 : ((__mmask64)1 << (count - i)) - 1;
        __m512i v = _mm512_maskz_loadu_epi8(valid, scales + i);
        bad |= _mm512_mask_cmplt_epu8_mask(valid, v, _mm512_set1_epi8(2)) |
               _mm512_mask_cmpgt_epu8_mask(valid, v, _mm512_set1_epi8((char)252));
    }
    return bad == 0;
}

/* One block the exponent trick cannot take (extreme scale byte), in fp32, for n rows. */
static void mxfp4_block_f32(const uint16_t *x, int64_t in, int64_t n, const uint8_t *b, uint8_t s,
                            int64_t col, float *extra) {
    for (int64_t t = 0; t < n; t++) {
        float part = 0.0f;
        for (int j = 0; j < 16; j++) {
            part += FP4_VALUES[b[j] & 15] * bf16_to_f32(x[t * in + col + 2 * j]);
            part += FP4_VALUES[b[j] >> 4] * bf16_to_f32(x[t * in + col + 2 * j + 1]);
        }
        extra[t] += part * SCALES[s];
    }
}

/* The block at b with scale byte s as 32 bf16 weights (see above). The code of each weight is
 * looked up with one vpermw: a dword holding byte b and b << 12 indexes the doubled table FP4_BF16
 * (`table`) with b (low nibble; bit 4 is ignored) in its low word and b >> 4 in its high word. */
AVX512BF16_INLINE __m512i mxfp4_block_bf16(const uint8_t *b, uint8_t s, __m512i table) {
    __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)b));
    __m512i v = _mm512_permutexvar_epi16(_mm512_or_si512(codes, _mm512_slli_epi32(codes, 12)), table);
    __mmask32 nonzero = _mm512_test_epi16_mask(v, _mm512_set1_epi16(0x7FFF));
    return _mm512_mask_add_epi16(v, nonzero, v, _mm512_set1_epi16(EXP_SHIFT[s]));
}

/* CHECK: the rows hold extreme scale bytes, whose blocks take the fp32 detour. */
AVX512BF16_INLINE void mxfp4_bf16_avx512_rows(const int N, const int R, const int CHECK,
                                              const uint16_t *x, const weights *w, int64_t r,
                                              const epilogue *e, float *gate) {
    const __m512i table = _mm512_loadu_si512((const void *)FP4_BF16);
    const int U = STREAMS(N);
    int64_t in = w->in, groups = in / BLOCK;
    const uint8_t *rb = (const uint8_t *)w->w + r * groups * 16;
    const uint8_t *rs = (const uint8_t *)w->scales + r * groups;
    __m512 acc[4][MAX_ROWS][2];
    float extra[2][MAX_ROWS];
#pragma GCC unroll 8
    for (int t = 0; t < N; t++)
        for (int q = 0; q < R; q++) {
            extra[q][t] = 0.0f;
            for (int u = 0; u < U; u++) acc[u][t][q] = _mm512_setzero_ps();
        }
    for (int64_t g0 = 0; g0 < groups; g0 += U) {
        for (int q = 0; q < R; q++) {
            _mm_prefetch((const char *)rb + (q * groups + g0) * 16 + PF_DIST, _MM_HINT_T0);
            if (g0 % 64 == 0) _mm_prefetch((const char *)rs + q * groups + g0 + PF_DIST / 16, _MM_HINT_T0);
        }
#pragma GCC unroll 4
        for (int u = 0; u < U; u++) {
            int64_t g = g0 + u;
            if (U > 1 && g >= groups) break;
            __m512i wv[2];
#pragma GCC unroll 2
            for (int q = 0; q < R; q++) {
                const uint8_t *b = rb + (q * groups + g) * 16;
                uint8_t s = rs[q * groups + g];
                wv[q] = mxfp4_block_bf16(b, s, table);
                if (CHECK && !SAFE_SCALE(s)) {
                    mxfp4_block_f32(x, in, N, b, s, g * BLOCK, extra[q]);
                    wv[q] = _mm512_setzero_si512();
                }
            }
#pragma GCC unroll 8
            for (int t = 0; t < N; t++) {
                __m512i xv = _mm512_loadu_si512((const void *)(x + t * in + g * BLOCK));
#pragma GCC unroll 2
                for (int q = 0; q < R; q++) acc[u][t][q] = _mm512_dpbf16_ps(acc[u][t][q], as_bh(wv[q]), as_bh(xv));
            }
        }
    }
    float sums[2][MAX_ROWS];
#pragma GCC unroll 8
    for (int t = 0; t < N; t++)
        for (int q = 0; q < R; q++) {
            __m512 s = acc[0][t][q];
            for (int u = 1; u < U; u++) s = _mm512_add_ps(s, acc[u][t][q]);
            sums[q][t] = _mm512_reduce_add_ps(s) + extra[q][t];
        }
    for (int q = 0; q < R; q++) finish_row(e, r + q, sums[q], gate);
}

AVX512BF16 static void mxfp4_bf16_avx512(const void *x, int64_t n, const weights *w, int64_t r0,
                                         int64_t r1, const epilogue *e) {
    float gate[MAX_ROWS];
    int64_t groups = w->in / BLOCK;
    const uint8_t *scales = w->scales;
#define ROWS(N, R, r)                                                                          \
    (rows_safe(scales + (r) * groups, (R) * groups)                                           \
         ? mxfp4_bf16_avx512_rows(N, R, 0, x, w, r, e, gate)                                  \
         : mxfp4_bf16_avx512_rows(N, R, 1, x, w, r, e, gate))
#define BODY(N) ROW_PAIRS(N, ROWS)
    SWITCH_ROWS(n, BODY)
#undef BODY
#undef ROWS
}

/* The last two blocks (64 weights) of a row of 64·odd length, after mxfp4_quads' quads: 32 code
 * bytes are zero-extended to 32 words; vpermw looks up the low nibbles directly (it reads 5 index
 * bits and the doubled table ignores the fifth) and the high nibbles after a shift. The
 * even-indexed weights of both blocks land in one register and the odd-indexed in another, and
 * the activations are laid out the same way (AS_BF16_QUADS' last 64). Each block's products stay
 * in its own half of the fp32 lanes (0-7: first block, 8-15: second), so the two scales multiply
 * the partial sums in one multiply-add: exact (powers of two). */
/* Pair p of a row (codes rb, scales rs) against the N activation rows, into acc[t]. */
AVX512BF16_INLINE void mxfp4_pair(const int N, const uint16_t *x, int64_t in, const uint8_t *rb,
                                  const uint8_t *rs, int64_t p, __m512i table, __m512 *acc) {
    __m512i codes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(rb + p * 32)));
    __m512i even = _mm512_permutexvar_epi16(codes, table);
    __m512i odd = _mm512_permutexvar_epi16(_mm512_srli_epi16(codes, 4), table);
    __m512 scale = _mm512_insertf32x8(_mm512_set1_ps(SCALES[rs[2 * p]]), _mm256_set1_ps(SCALES[rs[2 * p + 1]]), 1);
#pragma GCC unroll 8
    for (int t = 0; t < N; t++) {
        const uint16_t *xt = x + t * in + p * 2 * BLOCK;
        __m512 part = _mm512_dpbf16_ps(_mm512_setzero_ps(), as_bh(even), as_bh(_mm512_loadu_si512((const void *)xt)));
        part = _mm512_dpbf16_ps(part, as_bh(odd), as_bh(_mm512_loadu_si512((const void *)(xt + BLOCK))));
        acc[t] = _mm512_fmadd_ps(part, scale, acc[t]);
    }
}

/* Four blocks (128 weights, 64 code bytes) a step, for rows whose length is a multiple of 64.
 * Word j of the 64 bytes holds weights 4j, 4j+1 (low byte: low, high nibble) and 4j+2, 4j+3 (high
 * byte); vpermw reads the low 5 bits of each word as its index into the doubled table (the fifth
 * bit is ignored), so the words shifted right by 0, 4, 8 and 12 decode the four weights of every
 * word, in four registers, with no widening shuffle. The activations are laid out to match
 * (AS_BF16_QUADS). An fp32 lane of vdpbf16ps sums words 2i and 2i+1, which lie in block i/4, so
 * each block's products stay in its own four lanes and one multiply-add applies the four scales
 * (powers of two: exact) to the partial sums, with no per-weight work. The scales come from one
 * 4-byte broadcast: rotating lane group g by 23 - 8g (mod 32) and keeping bits 23-30 makes s << 23,
 * the bit pattern of 2^(s - 127) for s ≥ 1 (255 gives inf, as SCALES does); a row with a zero
 * byte (2^-127, a denormal) looks them up instead. A row of 64·odd length ends with one pair of
 * blocks (mxfp4_pair). Taken for 1 to QUADS_MAX_ROWS activation rows (decode: with 2-4 rows it
 * reads ~6-17% faster than the two-block kernel it replaced, once the activations were cache-line
 * aligned); with more rows on one weight (prefill) mxfp4_bf16_avx512's two weight rows per pass
 * over the activations win (~1.4x the rate at 8 rows). */
#define QUADS_MAX_ROWS 4

/* Whether any of a row's n scale bytes is 0 (2^-127, a denormal that s << 23 does not make); the
 * bytes past the row read as 0xFF. */
AVX512BF16_INLINE int has_zero_scale(const uint8_t *s, int64_t n) {
    __mmask64 zero = 0;
    for (int64_t i = 0; i < n; i += 64) {
        __mmask64 have = n - i >= 64 ? ~(__mmask64)0 : ((__mmask64)1 << (n - i)) - 1;
        __m512i bytes = _mm512_mask_loadu_epi8(_mm512_set1_epi8(-1), have, s + i);
        zero |= _mm512_cmpeq_epi8_mask(bytes, _mm512_setzero_si512());
    }
    return zero != 0;
}

/* The scales of the four blocks at s, each in its four lanes. */
AVX512BF16_INLINE __m512 quad_scales(const uint8_t *s, int exact) {
    if (exact)
        return _mm512_set_ps(SCALES[s[3]], SCALES[s[3]], SCALES[s[3]], SCALES[s[3]], SCALES[s[2]],
                             SCALES[s[2]], SCALES[s[2]], SCALES[s[2]], SCALES[s[1]], SCALES[s[1]],
                             SCALES[s[1]], SCALES[s[1]], SCALES[s[0]], SCALES[s[0]], SCALES[s[0]], SCALES[s[0]]);
    int four;
    memcpy(&four, s, 4);
    const __m512i rotate = _mm512_set_epi32(31, 31, 31, 31, 7, 7, 7, 7, 15, 15, 15, 15, 23, 23, 23, 23);
    __m512i bits = _mm512_rolv_epi32(_mm512_set1_epi32(four), rotate);
    return _mm512_castsi512_ps(_mm512_and_si512(bits, _mm512_set1_epi32(0x7F800000)));
}

/* Quad q of a row (codes rb, scales rs) against the N activation rows, into acc[t]. */
AVX512BF16_INLINE void mxfp4_quad(const int N, const uint16_t *x, int64_t in, const uint8_t *rb,
                                  const uint8_t *rs, int64_t q, int exact, __m512i table, __m512 *acc) {
    PREFETCH_WEIGHTS(rb + q * 64);
    if (q % 16 == 0) PREFETCH_SCALES(rs + 4 * q);
    __m512 scale = quad_scales(rs + 4 * q, exact);
    __m512i codes = _mm512_loadu_si512((const void *)(rb + q * 64));
    __m512i v0 = _mm512_permutexvar_epi16(codes, table);
    __m512i v1 = _mm512_permutexvar_epi16(_mm512_srli_epi16(codes, 4), table);
    __m512i v2 = _mm512_permutexvar_epi16(_mm512_srli_epi16(codes, 8), table);
    __m512i v3 = _mm512_permutexvar_epi16(_mm512_srli_epi16(codes, 12), table);
#pragma GCC unroll 8
    for (int t = 0; t < N; t++) {
        const uint16_t *xt = x + t * in + q * 4 * BLOCK;
        __m512 part = _mm512_dpbf16_ps(_mm512_setzero_ps(), as_bh(v0), as_bh(_mm512_loadu_si512((const void *)xt)));
        part = _mm512_dpbf16_ps(part, as_bh(v1), as_bh(_mm512_loadu_si512((const void *)(xt + BLOCK))));
        part = _mm512_dpbf16_ps(part, as_bh(v2), as_bh(_mm512_loadu_si512((const void *)(xt + 2 * BLOCK))));
        part = _mm512_dpbf16_ps(part, as_bh(v3), as_bh(_mm512_loadu_si512((const void *)(xt + 3 * BLOCK))));
        acc[t] = _mm512_fmadd_ps(part, scale, acc[t]);
    }
}

/* Row r against the N activation rows: the fp32 partial sums into lanes[t][slot]. */
AVX512BF16_INLINE void mxfp4_quads_row(const int N, const uint16_t *x, const weights *w, int64_t r,
                                       __m512 (*lanes)[16], int slot) {
    const __m512i table = _mm512_loadu_si512((const void *)FP4_BF16);
    int64_t in = w->in, groups = in / BLOCK, quads = groups / 4, q = 0;
    const uint8_t *rb = (const uint8_t *)w->w + r * groups * 16;
    const uint8_t *rs = (const uint8_t *)w->scales + r * groups;
    __m512 acc[2][MAX_ROWS]; /* two chains of multiply-adds hide their latency */
#pragma GCC unroll 8
    for (int t = 0; t < N; t++) acc[0][t] = acc[1][t] = _mm512_setzero_ps();
    if (has_zero_scale(rs, groups)) {
        for (; q + 2 <= quads; q += 2) {
            mxfp4_quad(N, x, in, rb, rs, q, 1, table, acc[0]);
            mxfp4_quad(N, x, in, rb, rs, q + 1, 1, table, acc[1]);
        }
    } else {
        for (; q + 2 <= quads; q += 2) {
            mxfp4_quad(N, x, in, rb, rs, q, 0, table, acc[0]);
            mxfp4_quad(N, x, in, rb, rs, q + 1, 0, table, acc[1]);
        }
    }
    if (q < quads) mxfp4_quad(N, x, in, rb, rs, q, 1, table, acc[0]);
    if (groups % 4) mxfp4_pair(N, x, in, rb, rs, 2 * quads, table, acc[0]); /* the last two blocks */
#pragma GCC unroll 8
    for (int t = 0; t < N; t++) lanes[t][slot] = _mm512_add_ps(acc[0][t], acc[1][t]);
}

/* The lane sums of 16 vectors, as one vector (lane i: the sum of v[i]'s lanes): pairs of vectors,
 * then pairs of those, are interleaved and added, 45 instructions for the 16 sums where a
 * horizontal sum of each would take 8 and leave a chain of dependent shuffles on every row. */
AVX512BF16_INLINE __m512 lane_sums16(const __m512 *v) {
    __m512 a[8], b[4], c[2];
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++) /* 128-bit lane j: v[2i]'s and v[2i+1]'s lanes 4j..4j+3, alternating */
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++) { /* 128-bit lane j: the partial sums of rows 4i..4i+3 */
        __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(a[2 * i]), _mm512_castps_pd(a[2 * i + 1]));
        __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(a[2 * i]), _mm512_castps_pd(a[2 * i + 1]));
        b[i] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
    }
#pragma GCC unroll 2
    for (int i = 0; i < 2; i++)
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* exp(x) for the softmax and the SwiGLU: 2^n · p(r) with x = n·ln2 + r, |r| ≤ ln2/2 and p the
 * degree-5 polynomial of Cephes' expf (about 1 ulp in fp32, far below the bf16 rounding that
 * follows). Arguments under -87 (masked keys' -inf among them) give 0. */
AVX512_INLINE __m512 exp512(__m512 x) {
    const __m512 low = _mm512_set1_ps(-87.0f);
    __mmask16 live = _mm512_cmp_ps_mask(x, low, _CMP_GE_OQ);
    x = _mm512_max_ps(x, low);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}

/* swiglu of 16 (gate, linear) pairs: the same arithmetic, exp512 for expf. */
AVX512_INLINE __m512 swiglu16(__m512 g, __m512 l, float alpha, float limit) {
    __m512 top = _mm512_set1_ps(limit);
    g = _mm512_min_ps(g, top);
    l = _mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), top), _mm512_min_ps(top, l)); /* NaN stays */
    __m512 sig = _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_mul_ps(_mm512_set1_ps(-alpha), g)));
    return _mm512_mul_ps(_mm512_div_ps(g, sig), _mm512_add_ps(l, _mm512_set1_ps(1.0f)));
}

/* f32_to_bf16 of 16 values (round to nearest even, NaN kept quiet), by the same integer steps. */
AVX512BF16_INLINE __m256i bf16x16(__m512 v) {
    __m512i bits = _mm512_castps_si512(v), one = _mm512_set1_epi32(1);
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(bits, _mm512_set1_epi32(0x7FFFFFFF)),
                                            _mm512_set1_epi32(0x7F800000));
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), one);
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd)), 16);
    __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, quiet));
}

/* finish_row for the `count` (≤ 16) rows from r at once, sums[t] holding row r + i's sums in lane
 * i: the bias, the stores and the accumulation as vectors, and the SwiGLU of up to 8 pairs with
 * exp512 (~1 ulp of expf). With SWIGLU, r and count are even (a thread's rows start at a multiple
 * of TILE and a gate_up projection has an even row count), so no pair is split. The scalar
 * finish_row, row by row, took ~10% of a 2880-wide row's time. Apart from the exponential, the same
 * arithmetic in the same order as finish_row, so STORE and ACCUMULATE give its results bit for bit. */
AVX512BF16_INLINE void finish_rows16(const int N, const epilogue *e, int64_t r, int count, const __m512 *sums) {
    __mmask16 m = (__mmask16)((1u << count) - 1);
    __m512 bias = _mm512_setzero_ps();
    if (e->bias && e->bias_dt == BF16)
        bias = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)e->bias + r)), 16));
    else if (e->bias)
        bias = _mm512_maskz_loadu_ps(m, (const float *)e->bias + r);
#pragma GCC unroll 8
    for (int t = 0; t < N; t++) {
        __m512 v = _mm512_add_ps(sums[t], bias);
        if (e->mode == STORE && e->y_dt == BF16) {
            _mm256_mask_storeu_epi16((uint16_t *)e->y + t * e->y_stride + r, m, bf16x16(v));
        } else if (e->mode == STORE) {
            _mm512_mask_storeu_ps((float *)e->y + t * e->y_stride + r, m, v);
        } else if (e->mode == ACCUMULATE) {
            float *y = (float *)e->y + e->token[t] * e->y_stride + r;
            __m512 weighted = _mm512_mul_ps(_mm512_set1_ps(e->weight[t]), v);
            _mm512_mask_storeu_ps(y, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, y), weighted));
        } else { /* SWIGLU: lanes 0..7 the pairs' gates (even rows), linears (odd rows) */
            const __m512i evens = _mm512_set_epi32(14, 12, 10, 8, 6, 4, 2, 0, 14, 12, 10, 8, 6, 4, 2, 0);
            __m512 g = _mm512_permutexvar_ps(evens, v);
            __m512 l = _mm512_permutexvar_ps(_mm512_add_epi32(evens, _mm512_set1_epi32(1)), v);
            __m512 h = swiglu16(g, l, e->alpha, e->limit);
            float out[16];
            _mm512_storeu_ps(out, h);
            for (int j = 0; j < count / 2; j++) {
                int64_t c = layout_column(e->y_layout, r / 2 + j, e->y_stride);
                store_val(e->y, e->y_dt, t * e->y_stride + c, e->round_bf16 ? bf16_to_f32(f32_to_bf16(out[j])) : out[j]);
            }
        }
    }
}

/* Rows [r0, r1) sixteen at a time (inside a kernel: r0, r1 and e in scope): ROW(N, i, r) leaves row
 * r's fp32 partial sums, one vector per activation row, in lanes[t][i]; one lane_sums16 makes the
 * sixteen rows' sums and finish_rows16 finishes them: per row far fewer instructions than a
 * horizontal sum and the scalar finish_row. */
#define SIXTEEN_ROWS(N, ROW)                                                                      \
    do {                                                                                          \
        __m512 lanes[MAX_ROWS][16], sums[MAX_ROWS];                                               \
        for (int64_t r = r0; r < r1; r += 16) {                                                   \
            int count = r1 - r < 16 ? (int)(r1 - r) : 16;                                         \
            for (int i = 0; i < count; i++) ROW(N, i, r + i);                                     \
            for (int t = 0; t < (N); t++) {                                                       \
                for (int i = count; i < 16; i++) lanes[t][i] = _mm512_setzero_ps();               \
                sums[t] = lane_sums16(lanes[t]);                                                  \
            }                                                                                     \
            finish_rows16(N, e, r, count, sums);                                                  \
        }                                                                                         \
    } while (0)

AVX512BF16 static void mxfp4_quads_avx512(const void *x, int64_t n, const weights *w, int64_t r0,
                                          int64_t r1, const epilogue *e) {
#define ROW(N, i, r) mxfp4_quads_row(N, x, w, r, lanes, i)
#define BODY(N) SIXTEEN_ROWS(N, ROW)
    SWITCH_ROWS(n, BODY)
#undef BODY
#undef ROW
}

/* Rows r .. r+R-1 against the N activation rows: each row's fp32 partial sums into s[q][t]. */
AVX512BF16_INLINE void bf16w_bf16_sums(const int N, const int R, const uint16_t *x, const weights *w,
                                       int64_t r, __m512 (*s)[MAX_ROWS]) {
    const int U = STREAMS(N);
    int64_t in = w->in, full = in - in % 32;
    __mmask32 tail = (__mmask32)((1ull << (in % 32)) - 1);
    const uint16_t *wr = (const uint16_t *)w->w + r * in;
    __m512 acc[4][MAX_ROWS][2];
#pragma GCC unroll 8
    for (int t = 0; t < N; t++)
        for (int u = 0; u < U; u++)
            for (int q = 0; q < R; q++) acc[u][t][q] = _mm512_setzero_ps();
    for (int64_t i0 = 0; i0 < full; i0 += U * 32) {
#pragma GCC unroll 4
        for (int u = 0; u < U; u++) {
            int64_t i = i0 + u * 32;
            if (U > 1 && i >= full) break;
            __m512i wv[2];
#pragma GCC unroll 2
            for (int q = 0; q < R; q++) {
                if (prefetch_to_l2) _mm_prefetch((const char *)(wr + q * in + i) + PF_L2_DIST, _MM_HINT_T1);
                wv[q] = _mm512_loadu_si512((const void *)(wr + q * in + i));
            }
#pragma GCC unroll 8
            for (int t = 0; t < N; t++) {
                __m512i xv = _mm512_loadu_si512((const void *)(x + t * in + i));
#pragma GCC unroll 2
                for (int q = 0; q < R; q++) acc[u][t][q] = _mm512_dpbf16_ps(acc[u][t][q], as_bh(wv[q]), as_bh(xv));
            }
        }
    }
    if (full < in) {
        __m512i wv[2];
        for (int q = 0; q < R; q++) wv[q] = _mm512_maskz_loadu_epi16(tail, wr + q * in + full);
#pragma GCC unroll 8
        for (int t = 0; t < N; t++) {
            __m512i xv = _mm512_maskz_loadu_epi16(tail, x + t * in + full);
            for (int q = 0; q < R; q++) acc[0][t][q] = _mm512_dpbf16_ps(acc[0][t][q], as_bh(wv[q]), as_bh(xv));
        }
    }
#pragma GCC unroll 8
    for (int t = 0; t < N; t++)
        for (int q = 0; q < R; q++) {
            s[q][t] = acc[0][t][q];
            for (int u = 1; u < U; u++) s[q][t] = _mm512_add_ps(s[q][t], acc[u][t][q]);
        }
}

/* The finishing of rows that are not taken sixteen at a time: horizontal sums, finish_row. */
AVX512_INLINE void finish_rows_reduced(const int N, const int R, __m512 (*s)[MAX_ROWS], const float *row_scales,
                                           const epilogue *e, int64_t r, float *gate) {
    float sums[MAX_ROWS];
    for (int q = 0; q < R; q++) {
#pragma GCC unroll 8
        for (int t = 0; t < N; t++)
            sums[t] = _mm512_reduce_add_ps(s[q][t]) * (row_scales ? row_scales[r + q] : 1.0f);
        finish_row(e, r + q, sums, gate);
    }
}

/* One activation row to four (decode): rows sixteen at a time (+1% from memory at ~46 GB/s, +1-2%
 * at ~74); more: in pairs, each pair's weights read once for all the activation rows. */
AVX512BF16 static void bf16w_bf16_avx512(const void *x, int64_t n, const weights *w, int64_t r0,
                                         int64_t r1, const epilogue *e) {
    float gate[MAX_ROWS];
    __m512 s[2][MAX_ROWS];
#define ROW(N, i, r)                                                                               \
    do {                                                                                           \
        bf16w_bf16_sums(N, 1, x, w, r, s);                                                         \
        for (int t = 0; t < (N); t++) lanes[t][i] = s[0][t];                                       \
    } while (0)
#define ROWS(N, R, r)                                                                              \
    do {                                                                                           \
        bf16w_bf16_sums(N, R, x, w, r, s);                                                         \
        finish_rows_reduced(N, R, s, NULL, e, r, gate);                                            \
    } while (0)
#define BODY(N)                                                                                    \
    if ((N) <= 4) SIXTEEN_ROWS(N, ROW);                                       \
    else ROW_PAIRS(N, ROWS)
    SWITCH_ROWS(n, BODY)
#undef BODY
#undef ROWS
#undef ROW
}

/* int8 weights become bf16 exactly (|w| ≤ 127 needs 7 significant bits, bf16 has 8): sign-extend
 * and convert 32 of them to fp32, pack to bf16, then the same dot products; the row's scale
 * multiplies the sum. The conversion makes this as busy per byte as the MXFP4 kernels, so it asks
 * for its weights PF_DIST ahead as they do: +9-13% from memory at ~45 GB/s, +12-18% at ~70 GB/s in
 * two A/B runs (the bf16 kernel, a fraction of the work per byte, keeps up with the hardware
 * prefetchers alone). */
AVX512BF16_INLINE __m512i int8_to_bf16(const int8_t *p) {
    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
    __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 16))));
    __m512bh packed = _mm512_cvtne2ps_pbh(hi, lo); /* lo → elements 0..15, hi → 16..31 */
    __m512i bits;
    memcpy(&bits, &packed, sizeof bits);
    return bits;
}

/* Rows r .. r+R-1 against the N activation rows: each row's fp32 partial sums over its first
 * in - in % 32 values into s[q][t], unscaled. */
AVX512BF16_INLINE void int8w_bf16_sums(const int N, const int R, const uint16_t *x, const weights *w,
                                       int64_t r, __m512 (*s)[MAX_ROWS]) {
    const int U = STREAMS(N);
    int64_t in = w->in, full = in - in % 32;
    const int8_t *wr = (const int8_t *)w->w + r * in;
    __m512 acc[4][MAX_ROWS][2];
#pragma GCC unroll 8
    for (int t = 0; t < N; t++)
        for (int u = 0; u < U; u++)
            for (int q = 0; q < R; q++) acc[u][t][q] = _mm512_setzero_ps();
    for (int64_t i0 = 0; i0 < full; i0 += U * 32) {
#pragma GCC unroll 4
        for (int u = 0; u < U; u++) {
            int64_t i = i0 + u * 32;
            if (U > 1 && i >= full) break;
            __m512i wv[2];
#pragma GCC unroll 2
            for (int q = 0; q < R; q++) {
                if (i % 64 == 0) PREFETCH_WEIGHTS(wr + q * in + i);
                wv[q] = int8_to_bf16(wr + q * in + i);
            }
#pragma GCC unroll 8
            for (int t = 0; t < N; t++) {
                __m512i xv = _mm512_loadu_si512((const void *)(x + t * in + i));
#pragma GCC unroll 2
                for (int q = 0; q < R; q++) acc[u][t][q] = _mm512_dpbf16_ps(acc[u][t][q], as_bh(wv[q]), as_bh(xv));
            }
        }
    }
#pragma GCC unroll 8
    for (int t = 0; t < N; t++)
        for (int q = 0; q < R; q++) {
            s[q][t] = acc[0][t][q];
            for (int u = 1; u < U; u++) s[q][t] = _mm512_add_ps(s[q][t], acc[u][t][q]);
        }
}

/* Rows whose length is not a multiple of 32: the last in % 32 products added one by one. */
AVX512BF16_INLINE void int8w_bf16_rows_with_tail(const int N, const int R, const uint16_t *x, const weights *w,
                                                 int64_t r, const epilogue *e, float *gate) {
    int64_t in = w->in, full = in - in % 32;
    const int8_t *wr = (const int8_t *)w->w + r * in;
    __m512 s[2][MAX_ROWS];
    int8w_bf16_sums(N, R, x, w, r, s);
    for (int q = 0; q < R; q++) {
        float sums[MAX_ROWS];
#pragma GCC unroll 8
        for (int t = 0; t < N; t++) {
            float v = _mm512_reduce_add_ps(s[q][t]);
            for (int64_t i = full; i < in; i++) v += (float)wr[q * in + i] * bf16_to_f32(x[t * in + i]);
            sums[t] = v * ((const float *)w->scales)[r + q];
        }
        finish_row(e, r + q, sums, gate);
    }
}

/* Row by row (in pairs for more than four activation rows), each row's scale multiplying its sums.
 * Not sixteen rows at a time as bf16w_bf16_avx512: that measured ~2% slower from memory here at
 * ~74 GB/s (and no faster at ~46), where it gained ~1-2% for bf16 weights. */
AVX512BF16 static void int8w_bf16_avx512(const void *x, int64_t n, const weights *w, int64_t r0,
                                         int64_t r1, const epilogue *e) {
    float gate[MAX_ROWS];
    __m512 s[2][MAX_ROWS];
#define ROWS(N, R, r)                                                                              \
    do {                                                                                           \
        int8w_bf16_sums(N, R, x, w, r, s);                                                         \
        finish_rows_reduced(N, R, s, (const float *)w->scales, e, r, gate);                        \
    } while (0)
#define TAIL_ROWS(N, R, r) int8w_bf16_rows_with_tail(N, R, x, w, r, e, gate)
#define BODY(N)                                                                                    \
    if (w->in % 32) ROW_PAIRS(N, TAIL_ROWS);                                                       \
    else ROW_PAIRS(N, ROWS)
    SWITCH_ROWS(n, BODY)
#undef BODY
#undef TAIL_ROWS
#undef ROWS
}

/* int8 weights against bf16 activation rows as 16-bit block floats (AS_I16_GROUPS, the scheme of
 * mxfp4_i16_avx2: each group of 32 as integers q · d, exact within 2^7 of the group's largest |x|,
 * others within 2^-15 of it), on any AVX-512 CPU. int8_to_bf16 spends five conversions on every 32
 * weights to feed one vdpbf16ps, which kept int8w_bf16_avx512 at ~14 GB/s on one core from cache
 * and ~17 GB/s on two from DRAM, half of what the machine reads (2-core Xeon with AMX). Here one
 * vpmovsxbw widens 32 weights and vpmaddwd multiplies them with the activations' integers: every
 * lane sums two products exactly (|sum| ≤ 2 · 127 · 32640 < 2^24, so its conversion is exact too),
 * and one multiply-add applies the group's d. The row's scale multiplies the sum. On that machine,
 * 20b q_proj rows, single thread: from cache 23.8 GB/s against int8w_bf16_avx512's 14.3; from DRAM
 * 10.1 against 9.0 with prefetches into L1, 13.0 with them into L2 (PREFETCH_WEIGHTS), as fast as
 * the bf16 matvec read there then (12.2-12.5); two threads, 25.4 against 15.7. */
AVX512_INLINE void int8w_i16_sums(const int N, const int R, const uint8_t *x, const weights *w, int64_t r,
                                  __m512 (*s)[MAX_ROWS]) {
    const int U = N <= 2 ? 2 : 1; /* two chains of multiply-adds hide their latency */
    int64_t in = w->in, groups = in / BLOCK;
    const int8_t *wr = (const int8_t *)w->w + r * in;
    __m512 acc[2][MAX_ROWS][2];
#pragma GCC unroll 8
    for (int t = 0; t < N; t++)
        for (int u = 0; u < U; u++)
            for (int q = 0; q < R; q++) acc[u][t][q] = _mm512_setzero_ps();
    for (int64_t g0 = 0; g0 < groups; g0 += U) {
#pragma GCC unroll 2
        for (int u = 0; u < U; u++) {
            int64_t g = g0 + u;
            if (U > 1 && g >= groups) break;
            __m512i wv[2];
#pragma GCC unroll 2
            for (int q = 0; q < R; q++) {
                const int8_t *b = wr + q * in + g * BLOCK;
                if (g % 2 == 0) PREFETCH_WEIGHTS(b);
                wv[q] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)b));
            }
#pragma GCC unroll 8
            for (int t = 0; t < N; t++) {
                const uint8_t *xt = x + t * in * 4;
                __m512i xv = _mm512_load_si512((const void *)(xt + g * 2 * BLOCK));
                __m512 d = _mm512_set1_ps(((const float *)(xt + 2 * in))[g]);
#pragma GCC unroll 2
                for (int q = 0; q < R; q++)
                    acc[u][t][q] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_madd_epi16(wv[q], xv)), d, acc[u][t][q]);
            }
        }
    }
#pragma GCC unroll 8
    for (int t = 0; t < N; t++)
        for (int q = 0; q < R; q++) s[q][t] = U > 1 ? _mm512_add_ps(acc[0][t][q], acc[1][t][q]) : acc[0][t][q];
}

AVX512 static void int8w_i16_avx512(const void *x, int64_t n, const weights *w, int64_t r0, int64_t r1,
                                    const epilogue *e) {
    float gate[MAX_ROWS];
    __m512 s[2][MAX_ROWS];
#define ROWS(N, R, r)                                                                              \
    do {                                                                                           \
        int8w_i16_sums(N, R, x, w, r, s);                                                          \
        finish_rows_reduced(N, R, s, (const float *)w->scales, e, r, gate);                        \
    } while (0)
#define BODY(N) ROW_PAIRS(N, ROWS)
    SWITCH_ROWS(n, BODY)
#undef BODY
#undef ROWS
}

/* ------------------------------------------------------------------ AVX2, fp32 activations */
#define AVX2 __attribute__((target("avx2,fma")))
#define AVX2_INLINE AVX2 INLINE

AVX2_INLINE float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Without AVX-512 the kernels are bound by their own instructions long before memory: two cores at
 * ~2.4 GHz must take ~4.4 bytes a cycle each to keep up with ~22 GB/s. So every kernel here keeps
 * several independent accumulator chains per (activation row, weight row) when rows are few (an
 * FMA's result is ready 4 cycles after it starts; one chain per row had the bf16 matvec waiting on
 * it), and decodes its weights with as few instructions per byte as the format allows. */
#define AVX2_CHAINS(N) ((N) == 1 ? 4 : (N) <= 4 ? 2 : 1) /* at most 2 from 2 rows on */

AVX2_INLINE float chains_sum(const int C, const __m256 *acc) {
    __m256 s = C == 4 ? _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]))
               : C == 2 ? _mm256_add_ps(acc[0], acc[1])
                        : acc[0];
    return hsum256(s);
}

/* acc[t][q % C] += w[q] · the 8 activations of row t at column col + 8q, for the N rows of x (row
 * length in) and q = 0..3: every AVX2 kernel's inner step, after it has widened 32 weights into w. */
AVX2_INLINE void fma_rows(const int N, const int C, const __m256 *w, const float *x, int64_t in, int64_t col,
                          __m256 (*acc)[4]) {
#pragma GCC unroll 8
    for (int t = 0; t < N; t++) {
        const float *xt = x + t * in + col;
#pragma GCC unroll 4
        for (int q = 0; q < 4; q++) acc[t][q % C] = _mm256_fmadd_ps(w[q], _mm256_loadu_ps(xt + 8 * q), acc[t][q % C]);
    }
}

/* dword i (i = 0..3) of each 128-bit lane takes byte a..d (low lane) or e..h (high lane) of its lane
 * in its top byte, zeros below: as an int32 that is the signed byte times 2^24. */
#define TOP_BYTES(a, b, c, d, e, f, g, h)                                                          \
    _mm256_setr_epi8(-128, -128, -128, a, -128, -128, -128, b, -128, -128, -128, c, -128, -128, -128, d, \
                     -128, -128, -128, e, -128, -128, -128, f, -128, -128, -128, g, -128, -128, -128, h)

/* A row's MXFP4 bytes PF_DIST ahead of block g (a cache line: call every 4 blocks), and its scales
 * PF_DIST / 16 ahead every 64. */
static inline void mxfp4_prefetch_ahead(const uint8_t *rb, const uint8_t *rs, int64_t g) {
    _mm_prefetch((const char *)(rb + g * 16) + PF_DIST, _MM_HINT_T0);
    if (g % 64 == 0) _mm_prefetch((const char *)(rs + g) + PF_DIST / 16, _MM_HINT_T0);
}

/* Twice the FP4 values (integers -12..12) of the codes in each byte of packed: the low nibbles
 * into twice[0], the high ones into twice[1] (each 128-bit lane looked up on its own). */
AVX2_INLINE void fp4_twice(__m256i packed, __m256i *twice) {
    const __m256i table = _mm256_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12, 0, 1, 2, 3, 4, 6,
                                           8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    twice[0] = _mm256_shuffle_epi8(table, _mm256_and_si256(packed, low4));
    twice[1] = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(packed, 4), low4));
}

/* The 32 weights of a block in fp32, as four vectors that multiply the activations of the block
 * split as AS_F32_SPLIT lays them out: evens 0-7, evens 8-15, odds 0-7, odds 8-15. The block is
 * broadcast to both 128-bit lanes; one byte shuffle looks its low nibbles up in a table of twice the
 * FP4 values (integers -12..12) and another its high nibbles; two more per half move four values of
 * each lane to the top bytes of dwords, which vcvtdq2ps turns into floats 2^24 times too large.
 * SCALES_TOP[s] = 2^(s - 127) / 2 / 2^24 undoes both and applies the block's scale in one multiply,
 * exactly while it is representable (s >= 3; below that, two multiplies: a subnormal weight, as
 * the reference makes it). 13 instructions a block where widening and permuting took ~30. */
AVX2_INLINE void mxfp4_avx2_block(const uint8_t *b, uint8_t s, __m256 *wv) {
    const __m256i top[2] = {TOP_BYTES(0, 1, 2, 3, 4, 5, 6, 7), TOP_BYTES(8, 9, 10, 11, 12, 13, 14, 15)};
    __m256i halves[2];
    fp4_twice(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)b)), halves);
    int exact = s >= 3;
    __m256 scale = _mm256_set1_ps(exact ? SCALES_TOP[s] : 0x1p-25f);
#pragma GCC unroll 4
    for (int q = 0; q < 4; q++) {
        __m256 v = _mm256_cvtepi32_ps(_mm256_shuffle_epi8(halves[q / 2], top[q % 2]));
        wv[q] = _mm256_mul_ps(v, scale);
        if (!exact) wv[q] = _mm256_mul_ps(wv[q], _mm256_set1_ps(SCALES[s]));
    }
}

AVX2_INLINE void mxfp4_f32_avx2_n(const int N, const float *x, const weights *w, int64_t r0,
                                  int64_t r1, const epilogue *e) {
    const int C = AVX2_CHAINS(N);
    int64_t in = w->in, groups = in / BLOCK;
    float sums[MAX_ROWS], gate[MAX_ROWS];
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *rb = (const uint8_t *)w->w + r * groups * 16;
        const uint8_t *rs = (const uint8_t *)w->scales + r * groups;
        __m256 acc[MAX_ROWS][4];
#pragma GCC unroll 8
        for (int t = 0; t < N; t++)
            for (int c = 0; c < C; c++) acc[t][c] = _mm256_setzero_ps();
        for (int64_t g = 0; g < groups; g++) {
            if (g % 4 == 0) mxfp4_prefetch_ahead(rb, rs, g);
            __m256 wv[4];
            mxfp4_avx2_block(rb + g * 16, rs[g], wv);
            fma_rows(N, C, wv, x, in, g * BLOCK, acc);
        }
#pragma GCC unroll 8
        for (int t = 0; t < N; t++) sums[t] = chains_sum(C, acc[t]);
        finish_row(e, r, sums, gate);
    }
}

/* With several activation rows their fp32 copies outgrow L1 (8 rows of 2880: 92 KB against 32 KB),
 * and a kernel that walks a weight row from end to end reads them from L2 once per weight row; from
 * 3 rows on that, not the arithmetic, set its pace (8 rows: ~11 ns a block, twice the FMAs' time).
 * So with more rows the tile's weight rows are walked a column chunk at a time: AVX2_CHUNK blocks of
 * every activation row (16 KiB at 8 rows) stay in L1 while each weight row of the tile passes over
 * them, and the partial sums wait as vectors (8 KiB at 5-8 rows) for the next chunk. */
#define AVX2_CHUNK 16
#define AVX2_CHUNKED(N) ((N) >= 3)

/* bf16 → fp32 is a 16-bit left shift: even halves of a dword by shifting, odd ones by masking, 16
 * weights per load pair against activations split as AS_F32_SPLIT lays them out. */
AVX2_INLINE void bf16_avx2_block(const uint16_t *p, __m256 *wv) {
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000);
    __m256i raw[2] = {_mm256_loadu_si256((const __m256i *)p), _mm256_loadu_si256((const __m256i *)(p + 16))};
    wv[0] = _mm256_castsi256_ps(_mm256_slli_epi32(raw[0], 16));
    wv[1] = _mm256_castsi256_ps(_mm256_slli_epi32(raw[1], 16));
    wv[2] = _mm256_castsi256_ps(_mm256_and_si256(raw[0], high));
    wv[3] = _mm256_castsi256_ps(_mm256_and_si256(raw[1], high));
}

/* 32 int8 weights as four fp32 vectors, in their order (int8 rows take activations as AS_F32). */
AVX2_INLINE void int8_avx2_block(const int8_t *p, __m256 *wv) {
#pragma GCC unroll 4
    for (int q = 0; q < 4; q++) wv[q] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8 * q))));
}

/* Asks the cache for `count` blocks of row r's weights from block g (rows of whole blocks). The
 * chunked kernels do so one chunk ahead: the row's next, or after its last the first of the row a
 * tile further on, which the same thread usually takes next. A tile's first pass over 32 rows
 * a chunk at a time had left the hardware prefetchers behind: the experts of a 128-token prompt
 * (128 x 4 of 32 experts, interleaved in one process) 107 -> 121 GFLOP/s, 112 -> 127 with the
 * tokens spread evenly; the scales asked for too: no further gain. */
AVX2_INLINE void prefetch_chunk(const int kind, const weights *w, int64_t r, int64_t g, int64_t count) {
    const int64_t block_bytes = kind == MXFP4 ? 16 : kind == BF16W ? 2 * BLOCK : BLOCK;
    const char *p = (const char *)w->w + (r * (w->in / BLOCK) + g) * block_bytes;
    for (int64_t l = 0; l < count * block_bytes / 64; l++) _mm_prefetch(p + 64 * l, _MM_HINT_T0);
}

/* Rows of MXFP4 weights against 3 to MAX_ROWS activation rows (a decode batch). */
AVX2_INLINE void mxfp4_f32_avx2_chunked(const int N, const float *x, const weights *w, int64_t r0, int64_t r1,
                                        const epilogue *e) {
    const int C = AVX2_CHAINS(N);
    int64_t in = w->in, groups = in / BLOCK;
    const uint8_t *blocks = w->w, *scales = w->scales;
    float sums[MAX_ROWS], gate[MAX_ROWS];
    __m256 part[TILE][MAX_ROWS][2];
    for (int64_t t0 = r0; t0 < r1; t0 += TILE) {
        int64_t t1 = min64(r1, t0 + TILE);
        for (int64_t g0 = 0; g0 < groups; g0 += AVX2_CHUNK) {
            int64_t g1 = min64(groups, g0 + AVX2_CHUNK);
            for (int64_t r = t0; r < t1; r++) {
                if (g1 < groups) prefetch_chunk(MXFP4, w, r, g1, AVX2_CHUNK);
                else if (r + TILE < w->out) prefetch_chunk(MXFP4, w, r + TILE, 0, AVX2_CHUNK);
                __m256 acc[MAX_ROWS][4];
#pragma GCC unroll 8
                for (int t = 0; t < N; t++)
                    for (int c = 0; c < C; c++) acc[t][c] = g0 ? part[r - t0][t][c] : _mm256_setzero_ps();
                for (int64_t g = g0; g < g1; g++) {
                    __m256 wv[4];
                    mxfp4_avx2_block(blocks + (r * groups + g) * 16, scales[r * groups + g], wv);
                    fma_rows(N, C, wv, x, in, g * BLOCK, acc);
                }
#pragma GCC unroll 8
                for (int t = 0; t < N; t++)
                    for (int c = 0; c < C; c++) part[r - t0][t][c] = acc[t][c];
            }
        }
        for (int64_t r = t0; r < t1; r++) {
#pragma GCC unroll 8
            for (int t = 0; t < N; t++) sums[t] = chains_sum(C, part[r - t0][t]);
            finish_row(e, r, sums, gate);
        }
    }
}

AVX2 static void mxfp4_f32_avx2(const void *x, int64_t n, const weights *w, int64_t r0, int64_t r1,
                                const epilogue *e) {
#define BODY(N) (AVX2_CHUNKED(N) ? mxfp4_f32_avx2_chunked(N, x, w, r0, r1, e) : mxfp4_f32_avx2_n(N, x, w, r0, r1, e))
    SWITCH_ROWS(n, BODY)
#undef BODY
}

/* One bf16 activation row at a time (batch-1 decode: every expert sees one token) is where the AVX2
 * MXFP4 kernel is slowest against memory: ~22 vector instructions a block, ~2.7 ns a block on one
 * core from cache, so two cores read ~11 GB/s through it against the ~19-41 the machine reads.
 * Integer dot products take ~12 a block, one int-to-float conversion for two blocks where the float
 * kernel needs four a block: the activations become 16-bit block floats, x =
 * x16 · d with d = 2^(e - 15) for the group's largest |x| in [2^(e-1), 2^e), so |x16| < 2^15; a bf16
 * value (8 significant bits) within 2^7 of its group's largest is exact, a smaller one is off by at
 * most 2^(e-16), 2^-15 of the largest (at most 2^-8 of a bf16 step of the largest, far below the
 * output's own bf16 rounding). x16 is split into a signed high byte and an unsigned low byte, and vpmaddubsw
 * multiplies each by the twice-FP4 integers of the table lookup, the high bytes' signs moved onto
 * the weights (so |xh| = 128 stays exact); the block's dot product is then an exact integer
 * (|sum| < 2^24), converted exactly and scaled by d · 2^(s - 128). Two blocks a step, one per
 * 128-bit lane. Single thread from cache ~1.6x the float kernel's rate. */
#define I16_PAIR_BYTES 256 /* per 64 activations: |xh| 64, xh 64, xl 64, d 8 floats, 32 unused */

/* One group of BLOCK bf16 values as 16-bit block floats: q[i] · d, returned d (see above). A group
 * with a non-finite value gets d = NaN, so its sums are NaN. */
static float block_float16(const uint16_t *xg, int q[BLOCK]) {
    float largest = 0.0f, v[BLOCK];
    int finite = 1, e = 0;
    for (int i = 0; i < BLOCK; i++) {
        v[i] = bf16_to_f32(xg[i]);
        finite &= isfinite(v[i]) != 0;
        largest = fmaxf(largest, fabsf(v[i]));
    }
    if (largest > 0.0f) frexpf(largest, &e);
    float up = ldexpf(1.0f, 15 - e); /* exact multiplier; infinite for groups below 2^-112 */
    int scaled = finite && largest > 0.0f, exact_up = isfinite(up) != 0;
    for (int i = 0; i < BLOCK; i++) {
        float y = exact_up ? v[i] * up : ldexpf(v[i], 15 - e); /* |y| < 2^15 */
        /* to the nearest integer, ties to even, as lrintf but inline: 1.5·2^23 leaves no fraction */
        q[i] = scaled ? (int)((y + 0x1.8p23f) - 0x1.8p23f) : 0;
    }
    return !finite ? NAN : largest > 0.0f ? ldexpf(1.0f, e - 15) : 0.0f;
}

/* Row x (bf16, `in` values, in % 64 == 0) into dst as AS_I16_PAIRS: per pair of groups (g, g+1),
 * |xh|, xh and xl each as 64 bytes [evens of g | evens of g+1 | odds of g | odds of g+1], then d
 * as [d_g ×4 | d_g+1 ×4]. */
static void write_i16_pairs(const uint16_t *x, int64_t in, uint8_t *dst) {
    for (int64_t g = 0; g < in / BLOCK; g++) {
        uint8_t *pair = dst + (g / 2) * I16_PAIR_BYTES;
        int q[BLOCK];
        float d = block_float16(x + g * BLOCK, q);
        for (int i = 0; i < BLOCK; i++) {
            int at = (i % 2) * 32 + (g % 2) * 16 + i / 2, high = q[i] >> 8; /* arithmetic shift: floor */
            pair[at] = (uint8_t)(high < 0 ? -high : high);
            pair[64 + at] = (uint8_t)(int8_t)high;
            pair[128 + at] = (uint8_t)(q[i] & 255);
        }
        for (int k = 0; k < 4; k++) memcpy(pair + 192 + 4 * ((g % 2) * 4 + k), &d, 4);
    }
}

/* Row x (bf16, `in` values, in % 32 == 0) into dst as AS_I16_GROUPS: the `in` integers q (int16),
 * then each group's d (fp32); 4·in bytes a row, the d on a cache line's start. */
static void write_i16_groups(const uint16_t *x, int64_t in, uint8_t *dst) {
    int16_t *values = (int16_t *)dst;
    float *d = (float *)(dst + 2 * in);
    for (int64_t g = 0; g < in / BLOCK; g++) {
        int q[BLOCK];
        d[g] = block_float16(x + g * BLOCK, q);
        for (int i = 0; i < BLOCK; i++) values[g * BLOCK + i] = (int16_t)q[i];
    }
}

/* Weight rows [r0, r1) against one activation row (choose_kernel takes it for n == 1 only). */
AVX2 static void mxfp4_i16_avx2(const void *xv, int64_t n, const weights *w, int64_t r0, int64_t r1,
                                const epilogue *e) {
    const __m256i ones = _mm256_set1_epi16(1), k256 = _mm256_set1_epi16(256);
    const uint8_t *x = xv;
    int64_t groups = w->in / BLOCK;
    float sum, gate;
    (void)n;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *rb = (const uint8_t *)w->w + r * groups * 16, *rs = (const uint8_t *)w->scales + r * groups;
        __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t g = 0; g < groups; g += 2) {
            if (g % 4 == 0) mxfp4_prefetch_ahead(rb, rs, g);
            __m256i wv[2]; /* blocks g and g + 1, one per lane */
            fp4_twice(_mm256_loadu_si256((const __m256i *)(rb + g * 16)), wv);
            __m256 ws = _mm256_set_m128(_mm_set1_ps(SCALES_HALF[rs[g + 1]]), _mm_set1_ps(SCALES_HALF[rs[g]]));
            const uint8_t *pair = x + (g / 2) * I16_PAIR_BYTES;
            __m256i high = _mm256_setzero_si256(), low = _mm256_setzero_si256();
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) { /* evens, odds */
                __m256i mag = _mm256_load_si256((const __m256i *)(pair + 32 * h));
                __m256i sgn = _mm256_load_si256((const __m256i *)(pair + 64 + 32 * h));
                __m256i lo = _mm256_load_si256((const __m256i *)(pair + 128 + 32 * h));
                high = _mm256_add_epi16(high, _mm256_maddubs_epi16(mag, _mm256_sign_epi8(wv[h], sgn)));
                low = _mm256_add_epi16(low, _mm256_maddubs_epi16(lo, wv[h]));
            }
            __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(high, k256), _mm256_madd_epi16(low, ones));
            __m256 scale = _mm256_mul_ps(ws, _mm256_load_ps((const float *)(pair + 192)));
            acc[(g / 2) % 2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[(g / 2) % 2]);
        }
        sum = hsum256(_mm256_add_ps(acc[0], acc[1]));
        finish_row(e, r, &sum, &gate);
    }
}

AVX2_INLINE void bf16w_f32_avx2_n(const int N, const float *x, const weights *w, int64_t r0,
                                  int64_t r1, const epilogue *e) {
    const int C = AVX2_CHAINS(N);
    int64_t in = w->in, full = in - in % BLOCK;
    float sums[MAX_ROWS], gate[MAX_ROWS];
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *wr = (const uint16_t *)w->w + r * in;
        __m256 acc[MAX_ROWS][4];
#pragma GCC unroll 8
        for (int t = 0; t < N; t++)
            for (int c = 0; c < C; c++) acc[t][c] = _mm256_setzero_ps();
        for (int64_t i = 0; i < full; i += BLOCK) {
            __m256 wv[4];
            bf16_avx2_block(wr + i, wv);
            fma_rows(N, C, wv, x, in, i, acc);
        }
#pragma GCC unroll 8
        for (int t = 0; t < N; t++) {
            float s = chains_sum(C, acc[t]);
            for (int64_t i = full; i < in; i++) s += bf16_to_f32(wr[i]) * x[t * in + i];
            sums[t] = s;
        }
        finish_row(e, r, sums, gate);
    }
}

AVX2 static void bf16w_f32_avx2(const void *x, int64_t n, const weights *w, int64_t r0, int64_t r1,
                                const epilogue *e) {
#define BODY(N) bf16w_f32_avx2_n(N, x, w, r0, r1, e)
    SWITCH_ROWS(n, BODY)
#undef BODY
}

AVX2_INLINE void int8w_f32_avx2_n(const int N, const float *x, const weights *w, int64_t r0,
                                  int64_t r1, const epilogue *e) {
    const int C = AVX2_CHAINS(N);
    int64_t in = w->in, full = in - in % 32;
    float sums[MAX_ROWS], gate[MAX_ROWS];
    for (int64_t r = r0; r < r1; r++) {
        const int8_t *wr = (const int8_t *)w->w + r * in;
        __m256 acc[MAX_ROWS][4];
#pragma GCC unroll 8
        for (int t = 0; t < N; t++)
            for (int c = 0; c < C; c++) acc[t][c] = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i < full; i += 32) {
            if (i % 64 == 0) _mm_prefetch((const char *)(wr + i) + PF_DIST, _MM_HINT_T0);
            __m256 wv[4];
            int8_avx2_block(wr + i, wv);
            fma_rows(N, C, wv, x, in, i, acc);
        }
        for (; i + 8 <= in; i += 8) {
            __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(wr + i))));
#pragma GCC unroll 8
            for (int t = 0; t < N; t++) acc[t][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * in + i), acc[t][0]);
        }
        float scale = ((const float *)w->scales)[r];
#pragma GCC unroll 8
        for (int t = 0; t < N; t++) {
            float s = chains_sum(C, acc[t]);
            for (int64_t j = i; j < in; j++) s += (float)wr[j] * x[t * in + j];
            sums[t] = s * scale;
        }
        finish_row(e, r, sums, gate);
    }
}

AVX2 static void int8w_f32_avx2(const void *x, int64_t n, const weights *w, int64_t r0, int64_t r1,
                                const epilogue *e) {
#define BODY(N) int8w_f32_avx2_n(N, x, w, r0, r1, e)
    SWITCH_ROWS(n, BODY)
#undef BODY
}

/* ------------------------------------------------------------------ AVX2, prompt-sized calls
 * More than MAX_ROWS activation rows (a prompt; an expert's tokens in one) against a tile of weight
 * rows. Handed out MAX_ROWS rows at a time to the kernels above, every block was decoded once per
 * 8 rows (an expert's 17 tokens as 8 + 8 + 1: the last row paying a whole decode) and each FMA
 * loaded its own activations. Here a column chunk of GEMM_W weight rows is decoded into fp32 (8 KiB,
 * in L1) once per pass of up to GEMM_TOKENS activation rows, and a register block of 3 activation
 * rows by GEMM_W weight rows keeps 12 accumulators: 7 loads per 12 FMAs, ~85% of the FMA rate on
 * data in L1. Each chunk's 8-lane sums are reduced into the rows' sums, which the epilogue takes
 * MAX_ROWS tokens at a time. One thread, 20b-shaped experts of a 128-token prompt with uneven routing
 * (3 to 41 tokens an expert), interleaved in one process: 56 -> 62 GFLOP/s; bf16 q_proj at 128 rows
 * 57 -> 63. Passes of 24 rather than 48 rows: 3-7% slower; chunks of 8 blocks: ~5%. */
#define GEMM_TOKENS 48 /* activation rows per pass over a tile (their chunks come from L2) */
#define GEMM_KC 16     /* blocks per column chunk */
#define GEMM_W 4       /* weight rows decoded together (TILE is a multiple) */

/* Blocks [g0, g1) of weight rows r .. r + GEMM_W - 1 in fp32, step s (8 columns) of row j at
 * wb[s * GEMM_W + j]; rows from r1 on as zeros. */
AVX2_INLINE void gemm_decode(const int kind, const weights *w, int64_t r, int64_t r1, int64_t g0, int64_t g1,
                             __m256 *wb) {
    int64_t in = w->in, groups = in / BLOCK;
    const uint8_t *blocks = w->w, *scales = w->scales;
    for (int j = 0; j < GEMM_W; j++) {
        int64_t row = r + j;
        for (int64_t g = g0; g < g1; g++) {
            __m256 wv[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            if (row < r1 && kind == MXFP4) mxfp4_avx2_block(blocks + (row * groups + g) * 16, scales[row * groups + g], wv);
            else if (row < r1 && kind == BF16W) bf16_avx2_block((const uint16_t *)w->w + row * in + g * BLOCK, wv);
            else if (row < r1) int8_avx2_block((const int8_t *)w->w + row * in + g * BLOCK, wv);
#pragma GCC unroll 4
            for (int q = 0; q < 4; q++) wb[((g - g0) * 4 + q) * GEMM_W + j] = wv[q];
        }
    }
}

/* sums[i * TILE + j] += the dot product of activation row i (of M, at x + i * in) with decoded row j
 * of wb, over `steps` steps of 8 columns from column col. */
AVX2_INLINE void gemm_block(const int M, const float *x, int64_t in, int64_t col, int64_t steps, const __m256 *wb,
                            float *sums) {
    __m256 acc[3][GEMM_W];
#pragma GCC unroll 3
    for (int i = 0; i < M; i++)
        for (int j = 0; j < GEMM_W; j++) acc[i][j] = _mm256_setzero_ps();
    for (int64_t s = 0; s < steps; s++) {
        __m256 xv[3];
#pragma GCC unroll 3
        for (int i = 0; i < M; i++) xv[i] = _mm256_loadu_ps(x + i * in + col + 8 * s);
#pragma GCC unroll 4
        for (int j = 0; j < GEMM_W; j++) {
            __m256 wj = wb[s * GEMM_W + j];
#pragma GCC unroll 3
            for (int i = 0; i < M; i++) acc[i][j] = _mm256_fmadd_ps(xv[i], wj, acc[i][j]);
        }
    }
#pragma GCC unroll 3
    for (int i = 0; i < M; i++) { /* four rows' 8 lanes each into four sums */
        __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[i][0], acc[i][1]), _mm256_hadd_ps(acc[i][2], acc[i][3]));
        __m128 four = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        _mm_storeu_ps(sums + i * TILE, _mm_add_ps(_mm_loadu_ps(sums + i * TILE), four));
    }
}

/* The columns past the last whole block of bf16 or int8 row r (natural order in both layouts). */
static inline float dense_tail(const int kind, const weights *w, int64_t r, const float *x) {
    float s = 0.0f;
    for (int64_t i = w->in - w->in % BLOCK; i < w->in; i++)
        s += (kind == BF16W ? bf16_to_f32(((const uint16_t *)w->w)[r * w->in + i])
                            : (float)((const int8_t *)w->w)[r * w->in + i]) * x[i];
    return s;
}

/* Weight rows [r0, r1) (at most TILE) of kind `kind` against all n activation rows. */
AVX2_INLINE void avx2_gemm(const int kind, const float *x, int64_t n, const weights *w, int64_t r0, int64_t r1,
                           const epilogue *e) {
    int64_t in = w->in, groups = in / BLOCK;
    __m256 wb[GEMM_KC * 4 * GEMM_W];
    float sums[GEMM_TOKENS * TILE], row_sums[MAX_ROWS], gate[MAX_ROWS];
    /* passes of equal size: 50 rows as 25 + 25, not 48 + 2 (weights decoded for 2 rows) */
    int64_t passes = (n + GEMM_TOKENS - 1) / GEMM_TOKENS, size = (n + passes - 1) / passes;
    for (int64_t c0 = 0; c0 < n; c0 += size) {
        int64_t count = min64(size, n - c0), last_pass = c0 + size >= n;
        const float *xc = x + c0 * in;
        memset(sums, 0, sizeof(sums));
        for (int64_t g0 = 0; g0 < groups; g0 += GEMM_KC) {
            int64_t g1 = min64(groups, g0 + GEMM_KC);
            for (int64_t r = r0; r < r1; r += GEMM_W) {
                for (int64_t j = r; j < min64(r1, r + GEMM_W); j++) { /* the next chunk, or tile */
                    if (g1 < groups) prefetch_chunk(kind, w, j, g1, GEMM_KC);
                    else if (last_pass && j + TILE < w->out) prefetch_chunk(kind, w, j + TILE, 0, GEMM_KC);
                }
                gemm_decode(kind, w, r, r1, g0, g1, wb);
                float *at = sums + (r - r0);
                int64_t t = 0;
                for (; t + 3 <= count; t += 3) gemm_block(3, xc + t * in, in, g0 * BLOCK, (g1 - g0) * 4, wb, at + t * TILE);
                if (count - t == 2) gemm_block(2, xc + t * in, in, g0 * BLOCK, (g1 - g0) * 4, wb, at + t * TILE);
                if (count - t == 1) gemm_block(1, xc + t * in, in, g0 * BLOCK, (g1 - g0) * 4, wb, at + t * TILE);
            }
        }
        for (int64_t t0 = 0; t0 < count; t0 += MAX_ROWS) {
            epilogue rows = rows_epilogue(e, c0 + t0, min64(MAX_ROWS, count - t0));
            for (int64_t r = r0; r < r1; r++) {
                for (int64_t t = 0; t < rows.n; t++) {
                    float s = sums[(t0 + t) * TILE + r - r0];
                    if (kind != MXFP4) s += dense_tail(kind, w, r, xc + (t0 + t) * in);
                    row_sums[t] = kind == INT8W ? s * ((const float *)w->scales)[r] : s;
                }
                finish_row(&rows, r, row_sums, gate);
            }
        }
    }
}

AVX2 static void mxfp4_f32_avx2_gemm(const void *x, int64_t n, const weights *w, int64_t r0, int64_t r1,
                                     const epilogue *e) {
    avx2_gemm(MXFP4, x, n, w, r0, r1, e);
}

AVX2 static void bf16w_f32_avx2_gemm(const void *x, int64_t n, const weights *w, int64_t r0, int64_t r1,
                                     const epilogue *e) {
    avx2_gemm(BF16W, x, n, w, r0, r1, e);
}

AVX2 static void int8w_f32_avx2_gemm(const void *x, int64_t n, const weights *w, int64_t r0, int64_t r1,
                                     const epilogue *e) {
    avx2_gemm(INT8W, x, n, w, r0, r1, e);
}

/* ------------------------------------------------------------------ AMX: prompts through the experts */
#define AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
#define AMX_TILE_BYTES 1024 /* a tile register holds 16 rows of 64 bytes */
/* Weight rows per call in an MoE that takes mxfp4_amx (TILE for the other kernels): the activations
 * are rearranged once per call for all of them. */
#define AMX_ROWS 256
/* The fewest tokens an expert sends through mxfp4_amx; fewer take mxfp4_bf16_avx512 (single thread,
 * 20b experts: a 48-token prompt, ~6 tokens an expert, 85 GFLOP/s with 3 or 6 here, 70 with 10). */
#define AMX_MIN_TOKENS 6

static int amx_permitted; /* set at import: Linux lets this process use the tile registers */

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config;

/* Memory the kernels read 64 bytes at a time: on a cache line's start, as malloc's 16-byte alignment
 * is not. A load across two lines cost the MXFP4 decode kernel ~17% of its rate from memory
 * (single thread: 34-36 GB/s aligned against 28-30 with the activations 16 bytes off). */
static void *line_aligned(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

/* A thread's buffer of at least `need` bytes, kept for its next call: an MoE prompt makes hundreds
 * of calls a layer, and malloc would serve buffers this size with fresh pages (mmap) every time. */
static void *scratch(void **buf, size_t *have, size_t need) {
    if (*have < need) {
        free(*buf);
        *buf = line_aligned(need);
        *have = *buf ? need : 0;
    }
    return *buf;
}

/* finish_row for rows [r, r + rows) and e's (at most 32) tokens, row i's sums at sums[i]: a
 * gate_up's SwiGLU 16 tokens at a time with exp512 (the scalar expf took ~14% of mxfp4_amx's
 * time), the other modes row by row. */
AVX512_INLINE void amx_finish_rows(const epilogue *e, int64_t r, int64_t rows, float (*sums)[32], float *gate) {
    if (e->mode != SWIGLU) {
        for (int64_t i = 0; i < rows; i++) finish_row(e, r + i, sums[i], gate);
        return;
    }
    for (int64_t i = 0; i < rows; i += 2) { /* (r and rows are even) */
        int64_t c = layout_column(e->y_layout, (r + i) / 2, e->y_stride);
        __m512 gate_bias = _mm512_set1_ps(e->bias ? load_val(e->bias, e->bias_dt, r + i) : 0.0f);
        __m512 linear_bias = _mm512_set1_ps(e->bias ? load_val(e->bias, e->bias_dt, r + i + 1) : 0.0f);
        for (int64_t t0 = 0; t0 < e->n; t0 += 16) {
            __mmask16 m = e->n - t0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (e->n - t0)) - 1);
            __m512 g = _mm512_add_ps(_mm512_maskz_loadu_ps(m, sums[i] + t0), gate_bias);
            __m512 l = _mm512_add_ps(_mm512_maskz_loadu_ps(m, sums[i + 1] + t0), linear_bias);
            float out[16];
            _mm512_storeu_ps(out, swiglu16(g, l, e->alpha, e->limit));
            for (int64_t j = 0; j < 16 && t0 + j < e->n; j++)
                store_val(e->y, e->y_dt, (t0 + j) * e->y_stride + c,
                          e->round_bf16 ? bf16_to_f32(f32_to_bf16(out[j])) : out[j]);
        }
    }
}

/* Weight rows [r0, r1) against the n bf16 activation rows x (AS_BF16), with AMX tile multiplies
 * (tdpbf16ps: 16 x 16 outputs, 32 products each, exact bf16 products summed in fp32). The weights are
 * the A operand: a block of 16 rows decodes to 16 rows of 32 bf16 values in their own order (the
 * scale folded into the exponent, as mxfp4_bf16_avx512_rows does), with no transposition; the
 * activations are the B operand, rearranged once per call into pairs of values per token (B[p][t]
 * = x[t][2p], x[t][2p+1]; tokens padded to 16 with zeros). Per 32 weight rows: their blocks decoded
 * once into a thread buffer, then every pair of 16-token chunks gets four accumulator tiles
 * (2 x 16 rows by 2 x 16 tokens), stored, and finished row by row. Rows with scale bytes outside
 * 2..252 take mxfp4_bf16_avx512, as does a call whose buffers could not be had.
 *
 * On the 2-core Xeon, 20b experts, a 128-token prompt: 383 GFLOP/s against 150 for
 * mxfp4_bf16_avx512 (two threads; with amx_finish_rows, the 20b prefill 70 against 27 tok/s). Of
 * one thread's time the decoding takes ~60% (~8 TSC ticks a block: two blocks a vpermw, weights
 * read from cache, or each block decoded just before its product measured no faster), the
 * epilogue ~14% before its SwiGLU was vectorised (amx_finish_rows), the activations' rearranging
 * ~8% and the tile products ~5%. */
AMX static void mxfp4_amx(const void *xv, int64_t n, const weights *w, int64_t r0, int64_t r1, const epilogue *e) {
    static _Thread_local void *x_buf, *w_buf;
    static _Thread_local size_t x_have, w_have;
    const uint16_t *x = xv;
    int64_t in = w->in, groups = in / BLOCK, chunks = (n + 15) / 16;
    const uint8_t *blocks = w->w, *scales = w->scales;
    uint16_t *xb = scratch(&x_buf, &x_have, (size_t)chunks * groups * AMX_TILE_BYTES);
    uint16_t *wb = scratch(&w_buf, &w_have, (size_t)2 * groups * AMX_TILE_BYTES);
    if (!xb || !wb || !rows_safe(scales + r0 * groups, (r1 - r0) * groups)) {
        for (int64_t t0 = 0; t0 < n; t0 += MAX_ROWS) {
            epilogue part = rows_epilogue(e, t0, min64(MAX_ROWS, n - t0));
            mxfp4_bf16_avx512(x + t0 * in, part.n, w, r0, r1, &part);
        }
        return;
    }
    /* B tile (c, g): 16 rows p of 16 tokens' dwords (values 2p, 2p + 1 of group g) */
    const uint32_t *x32 = xv;
    uint32_t *xb32 = (uint32_t *)xb;
    for (int64_t c = 0; c < chunks; c++)
        for (int64_t g = 0; g < groups; g++) {
            uint32_t *tile = xb32 + (c * groups + g) * (AMX_TILE_BYTES / 4);
            for (int t = 0; t < 16; t++) {
                int64_t token = c * 16 + t;
                for (int p = 0; p < 16; p++) tile[p * 16 + t] = token < n ? x32[token * (in / 2) + g * 16 + p] : 0;
            }
        }
    amx_config config = {.palette = 1};
    for (int i = 0; i < 8; i++) config.rows[i] = 16, config.colsb[i] = 64;
    _tile_loadconfig(&config);
    const __m512i table = _mm512_loadu_si512((const void *)FP4_BF16);
    float sums[32][32], gate[32];
    for (int64_t rs = r0; rs < r1; rs += 32) {
        int64_t rows = min64(32, r1 - rs);
        /* A tile (h, g): rows rs + 16h .. + 15, block g, as 16 rows of 32 bf16 */
        for (int64_t i = 0; i < 32; i++)
            for (int64_t g = 0; g < groups; g++) {
                int64_t at = (rs + i) * groups + g;
                __m512i v = i < rows ? mxfp4_block_bf16(blocks + at * 16, scales[at], table) : _mm512_setzero_si512();
                _mm512_store_si512((void *)(wb + ((i / 16) * groups + g) * (AMX_TILE_BYTES / 2) + (i % 16) * 32), v);
            }
        for (int64_t c = 0; c < chunks; c += 2) {
            int two = c + 1 < chunks;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t g = 0; g < groups; g++) {
                _tile_loadd(4, wb + g * (AMX_TILE_BYTES / 2), 64);
                _tile_loadd(5, wb + (groups + g) * (AMX_TILE_BYTES / 2), 64);
                _tile_loadd(6, xb + (c * groups + g) * (AMX_TILE_BYTES / 2), 64);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 5, 6);
                if (two) {
                    _tile_loadd(7, xb + ((c + 1) * groups + g) * (AMX_TILE_BYTES / 2), 64);
                    _tile_dpbf16ps(2, 4, 7);
                    _tile_dpbf16ps(3, 5, 7);
                }
            }
            _tile_stored(0, &sums[0][0], sizeof sums[0]);
            _tile_stored(1, &sums[16][0], sizeof sums[0]);
            if (two) {
                _tile_stored(2, &sums[0][16], sizeof sums[0]);
                _tile_stored(3, &sums[16][16], sizeof sums[0]);
            }
            epilogue part = rows_epilogue(e, c * 16, min64(two ? 32 : 16, n - c * 16));
            amx_finish_rows(&part, rs, rows, sums, gate);
        }
    }
    _tile_release();
}

/* The kernel for an expert's `count` tokens in an MoE call that chose `kernel` for its busiest
 * expert: the prompt kernel decodes a tile for its rows whatever their number, and below MAX_ROWS + 1
 * the chunked kernel (same activation layout) is faster (single thread, 20b rows: 0.55x at 2 rows,
 * 0.7x at 3-4, 0.82x at 6-8; even at 10). */
static row_fn expert_kernel(row_fn kernel, int64_t count) {
    if (kernel == mxfp4_amx && count < AMX_MIN_TOKENS) return mxfp4_bf16_avx512;
    return kernel == mxfp4_f32_avx2_gemm && count <= MAX_ROWS ? mxfp4_f32_avx2 : kernel;
}

/* Whether kernel takes all of a call's activation rows at once rather than MAX_ROWS at a time. */
static int takes_all_rows(row_fn kernel) {
    return kernel == mxfp4_f32_avx2_gemm || kernel == bf16w_f32_avx2_gemm || kernel == int8w_f32_avx2_gemm ||
           kernel == mxfp4_amx;
}

/* ------------------------------------------------------------------ dispatch */
/* ISA_AMX: as ISA_AVX512BF16, and an MoE call whose busiest expert has AMX_MIN_TOKENS or more
 * takes mxfp4_amx (moe). */
enum isa { ISA_C = 0, ISA_AVX2 = 1, ISA_AVX512 = 2, ISA_AVX512BF16 = 3, ISA_AMX = 4 };
static enum isa active_isa = ISA_C;
static const char *ISA_NAMES[] = {"c", "avx2", "avx512", "avx512bf16", "amx"};

/* The kernel for a weight kind and activation dtype on the active ISA, and the layout it wants
 * its activations in, for n activation rows of length `in`. */
static row_fn choose_kernel(int kind, int x_dt, int64_t n, int64_t in, enum layout *layout) {
    if (active_isa >= ISA_AVX512BF16 && x_dt == BF16 && kind == MXFP4 && in % (2 * BLOCK) == 0 && n <= QUADS_MAX_ROWS) {
        *layout = AS_BF16_QUADS;
        return mxfp4_quads_avx512;
    }
    if (active_isa >= ISA_AVX512 && x_dt == BF16 && kind == INT8W && in % BLOCK == 0) {
        *layout = AS_I16_GROUPS;
        return int8w_i16_avx512;
    }
    if (active_isa >= ISA_AVX512BF16 && x_dt == BF16) {
        *layout = AS_BF16;
        return kind == MXFP4 ? mxfp4_bf16_avx512 : kind == BF16W ? bf16w_bf16_avx512 : int8w_bf16_avx512;
    }
    if (active_isa >= ISA_AVX512) {
        *layout = kind == INT8W ? AS_F32 : AS_F32_SPLIT;
        return kind == MXFP4 ? mxfp4_f32_avx512 : kind == BF16W ? bf16w_f32_avx512 : int8w_f32_avx512;
    }
    if (active_isa == ISA_AVX2 && kind == MXFP4 && x_dt == BF16 && n == 1 && in % (2 * BLOCK) == 0) {
        *layout = AS_I16_PAIRS;
        return mxfp4_i16_avx2;
    }
    if (active_isa == ISA_AVX2) {
        *layout = kind == INT8W ? AS_F32 : AS_F32_SPLIT;
        if (n > MAX_ROWS) return kind == MXFP4 ? mxfp4_f32_avx2_gemm : kind == BF16W ? bf16w_f32_avx2_gemm : int8w_f32_avx2_gemm;
        if (kind == MXFP4) return mxfp4_f32_avx2;
        return kind == BF16W ? bf16w_f32_avx2 : int8w_f32_avx2;
    }
    *layout = AS_F32;
    return kind == MXFP4 ? mxfp4_c : kind == BF16W ? bf16w_c : int8w_c;
}

static size_t layout_size(enum layout layout) { return layout == AS_BF16 || layout == AS_BF16_QUADS ? 2 : 4; }

/* Rows rows[0..n) of x (dtype x_dt, row length in; rows NULL: 0..n) into dst in `layout`. */
static void write_activations(const void *x, int x_dt, int64_t in, const int64_t *rows, int64_t n,
                              enum layout layout, void *dst) {
    for (int64_t t = 0; t < n; t++) {
        int64_t base = (rows ? rows[t] : t) * in;
        if (layout == AS_I16_PAIRS) { /* bf16 input too */
            write_i16_pairs((const uint16_t *)x + base, in, (uint8_t *)dst + t * in * 4);
            continue;
        }
        if (layout == AS_I16_GROUPS) { /* bf16 input too */
            write_i16_groups((const uint16_t *)x + base, in, (uint8_t *)dst + t * in * 4);
            continue;
        }
        if (layout == AS_BF16) { /* only chosen for bf16 input */
            memcpy((uint16_t *)dst + t * in, (const uint16_t *)x + base, 2 * in);
            continue;
        }
        if (layout == AS_BF16_QUADS) { /* bf16 input too */
            for (int64_t i = 0; i < in; i++)
                ((uint16_t *)dst)[t * in + layout_column(layout, i, in)] = ((const uint16_t *)x)[base + i];
            continue;
        }
        float *out = (float *)dst + t * in;
        int64_t full = layout == AS_F32_SPLIT ? in - in % BLOCK : 0;
        for (int64_t g = 0; g < full; g += BLOCK)
            for (int j = 0; j < BLOCK / 2; j++) {
                out[g + j] = load_val(x, x_dt, base + g + 2 * j);
                out[g + BLOCK / 2 + j] = load_val(x, x_dt, base + g + 2 * j + 1);
            }
        for (int64_t i = full; i < in; i++) out[i] = load_val(x, x_dt, base + i);
    }
}

/* Weight rows [r0, r1) against every chunk of MAX_ROWS of the n activation rows x (in `layout`), or
 * all n at once for a kernel that takes_all_rows: the tile is read from memory once and from cache
 * for the other chunks. */
static void tile_chunks(row_fn kernel, const void *x, size_t x_size, int64_t n, const weights *w,
                        int64_t r0, int64_t r1, const epilogue *e) {
    int64_t step = takes_all_rows(kernel) ? n : MAX_ROWS;
    for (int64_t t0 = 0; t0 < n; t0 += step) {
        epilogue chunk = rows_epilogue(e, t0, min64(step, n - t0));
        kernel((const char *)x + t0 * w->in * x_size, chunk.n, w, r0, r1, &chunk);
    }
}

static int64_t tile_count(int64_t rows, int64_t step) { return (rows + step - 1) / step; }

#define MAX_MANY 4 /* weights one matmul_many call takes */

/* y_i = epilogue_i(x @ W_i^T) for n rows, for `count` weights of one kind and row length that read
 * the same activations (a layer's q, k and v projections): the activations are laid out once and
 * the tiles of all the weights share one parallel region, so a decode step pays one fork and join
 * for the three. 0 on success, -1 when memory ran out. Weight tiles go to threads (guided, see the
 * top of the file). */
static int matmul_many(const weights *w, const epilogue *e, int count, const void *x, int x_dt) {
    enum layout layout;
    row_fn kernel = choose_kernel(w[0].kind, x_dt, e[0].n, w[0].in, &layout);
    void *owned = NULL;
    const void *xa = x;
    if (!(layout == AS_BF16 || (layout == AS_F32 && x_dt == F32))) { /* rearranged or converted */
        if (!(owned = line_aligned(layout_size(layout) * e[0].n * w[0].in))) return -1;
        write_activations(x, x_dt, w[0].in, NULL, e[0].n, layout, owned);
        xa = owned;
    }
    int64_t first[MAX_MANY + 1] = {0}; /* weight i's tiles are first[i] .. first[i + 1] - 1 */
    for (int i = 0; i < count; i++) first[i + 1] = first[i] + tile_count(w[i].out, TILE);
#ifdef _OPENMP
#pragma omp parallel for schedule(guided)
#endif
    for (int64_t tile = 0; tile < first[count]; tile++) {
        int i = 0;
        while (tile >= first[i + 1]) i++;
        int64_t r0 = (tile - first[i]) * TILE;
        tile_chunks(kernel, xa, layout_size(layout), e[i].n, &w[i], r0, min64(w[i].out, r0 + TILE), &e[i]);
    }
    free(owned);
    return 0;
}

static int check_sizes(long long n, long long in, long long out) {
    if (n < 1 || in < 1 || out < 1) {
        PyErr_Format(PyExc_ValueError, "sizes must be positive, got n=%lld in=%lld out=%lld", n, in, out);
        return 0;
    }
    return 1;
}

static int check_dtypes(int a, int b, int c) {
    if ((a != F32 && a != BF16) || (b != F32 && b != BF16) || (c != F32 && c != BF16)) {
        PyErr_SetString(PyExc_ValueError, "dtype codes are 0 (float32) or 1 (bfloat16)");
        return 0;
    }
    return 1;
}

static PyObject *run_matmul(weights *w, unsigned long long xp, int x_dt, long long n,
                            unsigned long long biasp, int bias_dt, unsigned long long yp, int y_dt) {
    if (!check_sizes(n, w->in, w->out) || !check_dtypes(x_dt, bias_dt, y_dt)) return NULL;
    epilogue e = {.n = n, .bias = (const void *)biasp, .bias_dt = bias_dt, .mode = STORE,
                  .y = (void *)yp, .y_dt = y_dt, .y_stride = w->out};
    int status;
    Py_BEGIN_ALLOW_THREADS;
    status = matmul_many(w, &e, 1, (const void *)xp, x_dt);
    Py_END_ALLOW_THREADS;
    if (status) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* mxfp4_matmul(x, x_dt, n, in, blocks, scales, out, bias, bias_dt, y, y_dt):
 * y[n, out] = x[n, in] @ dequant(blocks, scales)^T + bias */
static PyObject *py_mxfp4_matmul(PyObject *self, PyObject *args) {
    unsigned long long xp, bp, sp, biasp, yp;
    long long n, in, out;
    int x_dt, bias_dt, y_dt;
    if (!PyArg_ParseTuple(args, "KiLLKKLKiKi", &xp, &x_dt, &n, &in, &bp, &sp, &out, &biasp, &bias_dt,
                          &yp, &y_dt))
        return NULL;
    if (in % BLOCK) return PyErr_Format(PyExc_ValueError, "in (%lld) must be a multiple of 32", in);
    weights w = {MXFP4, (const void *)bp, (const void *)sp, out, in};
    return run_matmul(&w, xp, x_dt, n, biasp, bias_dt, yp, y_dt);
}

/* matmul_many(kind, x, x_dt, n, in, [(w, wscale, out, bias, bias_dt, y), ...], y_dt): for each
 * weight, y = x @ W[out, in]^T (int8 kind: times wscale, fp32 per row) + bias; kind 1 (bf16) or 2
 * (int8), up to MAX_MANY weights, in one parallel region. */
static PyObject *py_matmul_many(PyObject *self, PyObject *args) {
    unsigned long long xp;
    long long n, in;
    int kind, x_dt, y_dt;
    PyObject *items;
    if (!PyArg_ParseTuple(args, "iKiLLO!i", &kind, &xp, &x_dt, &n, &in, &PyList_Type, &items, &y_dt)) return NULL;
    Py_ssize_t count = PyList_GET_SIZE(items);
    if (kind != BF16W && kind != INT8W) return PyErr_Format(PyExc_ValueError, "kind is 1 (bf16) or 2 (int8), got %d", kind);
    if (count < 1 || count > MAX_MANY)
        return PyErr_Format(PyExc_ValueError, "1 to %d weights, got %zd", MAX_MANY, count);
    weights w[MAX_MANY];
    epilogue e[MAX_MANY];
    for (Py_ssize_t i = 0; i < count; i++) {
        unsigned long long wp, sp, biasp, yp;
        long long out;
        int bias_dt;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(items, i), "KKLKiK", &wp, &sp, &out, &biasp, &bias_dt, &yp))
            return NULL;
        if (!check_sizes(n, in, out) || !check_dtypes(x_dt, bias_dt, y_dt)) return NULL;
        w[i] = (weights){kind, (const void *)wp, (const void *)sp, out, in};
        e[i] = (epilogue){.n = n, .bias = (const void *)biasp, .bias_dt = bias_dt, .mode = STORE,
                          .y = (void *)yp, .y_dt = y_dt, .y_stride = out};
    }
    int status;
    Py_BEGIN_ALLOW_THREADS;
    status = matmul_many(w, e, (int)count, (const void *)xp, x_dt);
    Py_END_ALLOW_THREADS;
    if (status) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ mixture of MXFP4 experts */
/* The next run of tiles [first, *end) of `total` for the calling thread, guided as OpenMP's schedule
 * is (each run the rest divided by the thread count), or first == total when none is left. By hand
 * because a run is wanted whole: moe walks a run's rows expert by expert. */
static int64_t take_run(int64_t *next, int64_t total, int64_t *end) {
    int64_t first;
#ifdef _OPENMP
#pragma omp critical(gptoss_take_run)
#endif
    {
        first = *next;
#ifdef _OPENMP
        int64_t threads = omp_get_num_threads();
#else
        int64_t threads = 1;
#endif
        *next = *end = first < total ? first + (total - first + threads - 1) / threads : total;
    }
    return first;
}

/* The stacked expert tensors (E experts), as the checkpoint stores them. */
typedef struct {
    int64_t experts, hidden, inter;
    const uint8_t *gate_up_blocks, *gate_up_scales, *down_blocks, *down_scales; /* (E, out, in/32[, 16]) */
    const void *gate_up_bias, *down_bias; /* (E, 2·inter), (E, hidden) */
    int bias_dt;
    float alpha, limit;
} expert_stack;

/* y (n, hidden) = Σ_j weight[t, j] · expert_{idx[t, j]}(x[t]) for every token t, each expert a
 * clamped-SwiGLU MLP. Tokens are grouped by expert (counting sort); each chosen expert's gate_up
 * projection runs with its SwiGLU applied as the sums are made, then one pass over down-projection
 * rows adds every expert's weighted output (fp32) into the token rows. The rows go to threads in
 * runs of tiles (take_run); a run is one thread's, so no two threads write the same output and each
 * output sums its experts in the same order whatever the schedule. A run is walked expert by expert,
 * one sequential stream each, rather than every expert a tile at a time (a jump every 32 rows):
 * MoE decode +4% at ~41 GB/s, +5-8% at ~70. One parallel region in all. 0, or -1 when memory ran
 * out. */
static int moe(const expert_stack *s, const void *x, int dt, int64_t n, int64_t k, const int64_t *idx,
               const void *route_weight, int weight_dt, void *y) {
    size_t bias_size = s->bias_dt == BF16 ? 2 : 4;
    int64_t pairs = n * k, H = s->hidden, I = s->inter, E = s->experts, m = 0, busiest = 0;
    int64_t *start = calloc(E + 1, sizeof(int64_t)), *token = malloc(sizeof(int64_t) * pairs);
    int64_t *active = malloc(sizeof(int64_t) * E);
    float *weight = malloc(sizeof(float) * pairs), *acc = line_aligned(sizeof(float) * n * H);
    void *xs = NULL, *hs = NULL;
    uint16_t *hb = NULL; /* AS_I16_PAIRS: the hidden activations in bf16, before their layout */
    enum layout layout = AS_F32;
    row_fn kernel = NULL;
    size_t size = 0;
    int64_t step = TILE; /* weight rows a kernel call takes */
    int ok = start && token && active && weight && acc;
    if (ok) {
        memset(acc, 0, sizeof(float) * n * H);
        for (int64_t p = 0; p < pairs; p++) start[idx[p] + 1]++;
        for (int64_t e = 0; e < E; e++) start[e + 1] += start[e];
        int64_t *fill = active; /* borrowed as the per-expert write position, then overwritten */
        memcpy(fill, start, sizeof(int64_t) * E);
        for (int64_t p = 0; p < pairs; p++) { /* stable: each expert's tokens stay in order */
            int64_t q = fill[idx[p]]++;
            token[q] = p / k;
            weight[q] = load_val(route_weight, weight_dt, p);
        }
        for (int64_t e = 0; e < E; e++)
            if (start[e + 1] > start[e]) {
                active[m++] = e;
                busiest = start[e + 1] - start[e] > busiest ? start[e + 1] - start[e] : busiest;
            }
        /* One kernel and layout for both projections (the rows of both must suit it), chosen for
         * the most tokens an expert has: an expert's rows are read for its own tokens only. A batch
         * of 8 decode tokens spread over the experts takes the decode kernel (MoE +20-50% over the
         * prefill kernel), 8 tokens on the same experts the prefill kernel (~1.4x the decode one). */
        kernel = choose_kernel(MXFP4, dt, busiest, s->inter % (2 * BLOCK) == 0 ? s->hidden : s->inter, &layout);
        if (active_isa == ISA_AMX && kernel == mxfp4_bf16_avx512 && busiest >= AMX_MIN_TOKENS) kernel = mxfp4_amx;
        step = kernel == mxfp4_amx ? AMX_ROWS : TILE;
        size = layout_size(layout);
        xs = line_aligned(size * pairs * H);
        hs = line_aligned(size * pairs * I);
        if (layout == AS_I16_PAIRS) hb = malloc(sizeof(uint16_t) * pairs * I);
        ok = xs && hs && (layout != AS_I16_PAIRS || hb);
    }
    if (ok) {
        write_activations(x, dt, H, token, pairs, layout, xs);
        int64_t gate_up_tiles = tile_count(2 * I, step), down_tiles = tile_count(H, step);
        int64_t gate_up_blocks = 2 * I * (H / BLOCK), down_blocks = H * (I / BLOCK), next_tile = 0;
        int blocked = layout == AS_I16_PAIRS; /* the hidden activations go through hb */
#ifdef _OPENMP
#pragma omp parallel
#endif
        {
#ifdef _OPENMP
#pragma omp for schedule(guided)
#endif
            for (int64_t item = 0; item < m * gate_up_tiles; item++) {
                int64_t e = active[item / gate_up_tiles], tile = item % gate_up_tiles;
                int64_t first = start[e], count = start[e + 1] - first;
                weights w = {MXFP4, s->gate_up_blocks + e * gate_up_blocks * 16,
                             s->gate_up_scales + e * gate_up_blocks, 2 * I, H};
                epilogue ep = {.bias = (const char *)s->gate_up_bias + e * 2 * I * bias_size,
                               .bias_dt = s->bias_dt, .mode = SWIGLU,
                               .y = blocked ? (void *)(hb + first * I) : (char *)hs + first * I * size,
                               .y_dt = blocked || layout_size(layout) == 2 ? BF16 : F32,
                               .y_stride = I, .y_layout = blocked ? AS_BF16 : layout,
                               .round_bf16 = dt == BF16 && layout_size(layout) != 2, .alpha = s->alpha,
                               .limit = s->limit};
                tile_chunks(expert_kernel(kernel, count), (const char *)xs + first * H * size, size, count, &w,
                            tile * step, min64(2 * I, (tile + 1) * step), &ep);
            }
            /* (the loop's implicit barrier: every hidden activation is written) */
            if (blocked) {
#ifdef _OPENMP
#pragma omp for
#endif
                for (int64_t p = 0; p < pairs; p++) write_activations(hb, BF16, I, &p, 1, layout, (char *)hs + p * I * size);
            }
            for (int64_t t0, t1; (t0 = take_run(&next_tile, down_tiles, &t1)) < down_tiles;)
                for (int64_t j = 0; j < m; j++) {
                    int64_t e = active[j], first = start[e], count = start[e + 1] - first;
                    weights w = {MXFP4, s->down_blocks + e * down_blocks * 16, s->down_scales + e * down_blocks,
                                 H, I};
                    epilogue ep = {.bias = (const char *)s->down_bias + e * H * bias_size,
                                   .bias_dt = s->bias_dt, .mode = ACCUMULATE, .y = acc, .y_stride = H,
                                   .token = token + first, .weight = weight + first};
                    for (int64_t tile = t0; tile < t1; tile++) /* a tile in cache for every chunk of tokens */
                        tile_chunks(expert_kernel(kernel, count), (const char *)hs + first * I * size, size, count,
                                    &w, tile * step, min64(H, (tile + 1) * step), &ep);
                }
#ifdef _OPENMP
#pragma omp barrier /* every down-projection sum is made */
#pragma omp for
#endif
            for (int64_t i = 0; i < n * H; i++) store_val(y, dt, i, acc[i]);
        }
    }
    free(start);
    free(token);
    free(active);
    free(weight);
    free(acc);
    free(xs);
    free(hs);
    free(hb);
    return ok ? 0 : -1;
}

/* mxfp4_moe(x, dt, n, k, idx, route_weight, weight_dt, experts, hidden, inter, gate_up_blocks,
 *           gate_up_scales, gate_up_bias, down_blocks, down_scales, down_bias, bias_dt, alpha,
 *           limit, y): x, y (n, hidden) in dt; idx (n, k) int64 expert ids, route_weight (n, k). */
static PyObject *py_mxfp4_moe(PyObject *self, PyObject *args) {
    unsigned long long xp, ip, wp, gbp, gsp, gbiasp, dbp, dsp, dbiasp, yp;
    long long n, k, experts, hidden, inter;
    int dt, weight_dt, bias_dt;
    float alpha, limit;
    if (!PyArg_ParseTuple(args, "KiLLKKiLLLKKKKKKiffK", &xp, &dt, &n, &k, &ip, &wp, &weight_dt, &experts,
                          &hidden, &inter, &gbp, &gsp, &gbiasp, &dbp, &dsp, &dbiasp, &bias_dt, &alpha,
                          &limit, &yp))
        return NULL;
    if (experts < 1) return PyErr_Format(PyExc_ValueError, "no experts");
    if (!check_sizes(n * k, hidden, inter) || !check_dtypes(dt, weight_dt, bias_dt)) return NULL;
    if (hidden % BLOCK || inter % BLOCK)
        return PyErr_Format(PyExc_ValueError, "hidden (%lld) and inter (%lld) must be multiples of 32",
                            hidden, inter);
    const int64_t *idx = (const int64_t *)ip;
    for (int64_t p = 0; p < n * k; p++)
        if (idx[p] < 0 || idx[p] >= experts)
            return PyErr_Format(PyExc_ValueError, "expert index %lld is outside 0..%lld",
                                (long long)idx[p], experts - 1);
    expert_stack s = {experts, hidden, inter, (const uint8_t *)gbp, (const uint8_t *)gsp,
                      (const uint8_t *)dbp, (const uint8_t *)dsp, (const void *)gbiasp,
                      (const void *)dbiasp, bias_dt, alpha, limit};
    int status;
    Py_BEGIN_ALLOW_THREADS;
    status = moe(&s, (const void *)xp, dt, n, k, idx, (const void *)wp, weight_dt, (void *)yp);
    Py_END_ALLOW_THREADS;
    if (status) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ decode-time helpers
 * RMSNorm and attention over the KV cache. For the few tokens of a decode step PyTorch spends
 * more time dispatching their dozen small operators per layer than computing them; these do the
 * same arithmetic (fp32 throughout, rounded where the reference rounds) in one call each. */

/* A row of n values in dtype dt, as fp32. */
static inline void load_row(const void *p, int dt, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i++) out[i] = load_val(p, dt, i);
}

/* y = (w · (x · rsqrt(mean(x²) + eps))) per row, in x's dtype; w in w_dt. */
static void rms_norm(const void *x, int dt, int64_t rows, int64_t dim, const void *w, int w_dt,
                     float eps, void *y) {
    size_t size = dt == BF16 ? 2 : 4;
#ifdef _OPENMP
#pragma omp parallel for if (rows * dim > 262144)
#endif
    for (int64_t r = 0; r < rows; r++) {
        const char *xr = (const char *)x + r * dim * size;
        char *yr = (char *)y + r * dim * size;
        float sum = 0.0f;
        for (int64_t i = 0; i < dim; i++) {
            float v = load_val(xr, dt, i);
            sum += v * v;
        }
        float scale = 1.0f / sqrtf(sum / (float)dim + eps);
        for (int64_t i = 0; i < dim; i++) store_val(yr, dt, i, load_val(w, w_dt, i) * (load_val(xr, dt, i) * scale));
    }
}

typedef struct {
    int64_t batch, heads, kv_heads, tokens, keys, dim;
    const void *q; /* (batch, heads, tokens, dim) contiguous, q_dt */
    int q_dt;
    const void *k, *v; /* (batch, kv_heads, keys, dim): rows of dim contiguous, kv_dt */
    int64_t kv_batch_stride, kv_head_stride; /* in elements */
    int kv_dt;
    const uint8_t *mask; /* (mask_batch, 1, tokens, keys) bool: 1 where the query may see the key */
    int64_t mask_batch;
    const float *sinks; /* (heads,) */
    void *out;          /* (batch, heads, tokens, dim) in kv_dt */
} attention;

/* The three steps of one query row, portable and AVX-512 (dim a multiple of 16): the scores of
 * query q (fp32) against the keys the mask allows (the others -inf); the softmax beside the head's
 * sink, its probabilities rounded to bf16 when the values are bf16 (the reference multiplies in
 * their dtype); and acc = Σ p[s] · v[s], accumulated in fp32. */
typedef struct {
    void (*scores)(const float *q, const void *k, int kv_dt, int64_t keys, int64_t dim,
                   const uint8_t *mask, float root, float *scores);
    void (*softmax)(float *p, int64_t keys, float sink, int round_bf16);
    void (*weighted)(const float *p, const void *v, int kv_dt, int64_t keys, int64_t dim, float *acc);
} attention_steps;

static void key_scores_c(const float *q, const void *k, int kv_dt, int64_t keys, int64_t dim,
                         const uint8_t *mask, float root, float *scores) {
    for (int64_t s = 0; s < keys; s++) {
        float dot = 0.0f;
        for (int64_t d = 0; d < dim && mask[s]; d++) dot += q[d] * load_val(k, kv_dt, s * dim + d);
        scores[s] = mask[s] ? dot / root : -INFINITY;
    }
}

static void softmax_c(float *p, int64_t keys, float sink, int round_bf16) {
    float top = sink;
    for (int64_t s = 0; s < keys; s++) top = p[s] > top ? p[s] : top;
    float total = expf(sink - top);
    for (int64_t s = 0; s < keys; s++) total += p[s] = expf(p[s] - top);
    for (int64_t s = 0; s < keys; s++) {
        p[s] /= total;
        if (round_bf16) p[s] = bf16_to_f32(f32_to_bf16(p[s]));
    }
}

static void weighted_values_c(const float *p, const void *v, int kv_dt, int64_t keys, int64_t dim,
                              float *acc) {
    for (int64_t s = 0; s < keys; s++)
        for (int64_t d = 0; d < dim && p[s] != 0.0f; d++) acc[d] += p[s] * load_val(v, kv_dt, s * dim + d);
}

AVX512_INLINE __m512 load16_f32(const void *p, int dt, int64_t i) {
    if (dt == BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i))), 16));
    return _mm512_loadu_ps((const float *)p + i);
}

/* D: the head size, a compile-time 64 (every gpt-oss member) or 0 for `dim` at run time. */
AVX512_INLINE void key_scores_avx512_d(const int D, const float *q, const void *k, int kv_dt,
                                       int64_t keys, int64_t dim, const uint8_t *mask, float root,
                                       float *scores) {
    if (D) dim = D;
    for (int64_t s = 0; s < keys; s++) {
        if (!mask[s]) {
            scores[s] = -INFINITY;
            continue;
        }
        __m512 acc = _mm512_setzero_ps();
        for (int64_t d = 0; d < dim; d += 16)
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), load16_f32(k, kv_dt, s * dim + d), acc);
        scores[s] = _mm512_reduce_add_ps(acc) / root;
    }
}

AVX512 static void key_scores_avx512(const float *q, const void *k, int kv_dt, int64_t keys, int64_t dim,
                                     const uint8_t *mask, float root, float *scores) {
    if (dim == 64) key_scores_avx512_d(64, q, k, kv_dt, keys, dim, mask, root, scores);
    else key_scores_avx512_d(0, q, k, kv_dt, keys, dim, mask, root, scores);
}

AVX512 static void softmax_avx512(float *p, int64_t keys, float sink, int round_bf16) {
    const __m512 none = _mm512_set1_ps(-INFINITY);
    __m512 top = _mm512_set1_ps(sink), sum = _mm512_setzero_ps();
    for (int64_t s = 0; s < keys; s += 16) {
        __mmask16 m = keys - s >= 16 ? 0xFFFF : (__mmask16)((1u << (keys - s)) - 1);
        top = _mm512_max_ps(top, _mm512_mask_loadu_ps(none, m, p + s));
    }
    __m512 t = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    for (int64_t s = 0; s < keys; s += 16) {
        __mmask16 m = keys - s >= 16 ? 0xFFFF : (__mmask16)((1u << (keys - s)) - 1);
        __m512 e = exp512(_mm512_sub_ps(_mm512_mask_loadu_ps(none, m, p + s), t));
        _mm512_mask_storeu_ps(p + s, m, e);
        sum = _mm512_add_ps(sum, e);
    }
    __m512 total = _mm512_set1_ps(_mm512_reduce_add_ps(sum) + expf(sink - _mm512_cvtss_f32(t)));
    for (int64_t s = 0; s < keys; s += 16) {
        __mmask16 m = keys - s >= 16 ? 0xFFFF : (__mmask16)((1u << (keys - s)) - 1);
        __m512 q = _mm512_div_ps(_mm512_maskz_loadu_ps(m, p + s), total);
        if (round_bf16) { /* to the nearest bf16, ties to even (probabilities are never NaN) */
            __m512i bits = _mm512_castps_si512(q);
            __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
            bits = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
            q = _mm512_castsi512_ps(_mm512_and_si512(bits, _mm512_set1_epi32((int)0xFFFF0000u)));
        }
        _mm512_mask_storeu_ps(p + s, m, q);
    }
}

AVX512_INLINE void weighted_values_avx512_d(const int D, const float *p, const void *v, int kv_dt,
                                            int64_t keys, int64_t dim, float *acc) {
    if (D) { /* the row's sums stay in registers */
        __m512 sums[16];
        for (int i = 0; i < D / 16; i++) sums[i] = _mm512_setzero_ps();
        for (int64_t s = 0; s < keys; s++) {
            if (p[s] == 0.0f) continue;
            __m512 ps = _mm512_set1_ps(p[s]);
            for (int i = 0; i < D / 16; i++) sums[i] = _mm512_fmadd_ps(ps, load16_f32(v, kv_dt, s * D + 16 * i), sums[i]);
        }
        for (int i = 0; i < D / 16; i++) _mm512_storeu_ps(acc + 16 * i, _mm512_add_ps(_mm512_loadu_ps(acc + 16 * i), sums[i]));
        return;
    }
    for (int64_t s = 0; s < keys; s++) {
        if (p[s] == 0.0f) continue;
        __m512 ps = _mm512_set1_ps(p[s]);
        for (int64_t d = 0; d < dim; d += 16)
            _mm512_storeu_ps(acc + d, _mm512_fmadd_ps(ps, load16_f32(v, kv_dt, s * dim + d), _mm512_loadu_ps(acc + d)));
    }
}

AVX512 static void weighted_values_avx512(const float *p, const void *v, int kv_dt, int64_t keys,
                                          int64_t dim, float *acc) {
    if (dim == 64) weighted_values_avx512_d(64, p, v, kv_dt, keys, dim, acc);
    else weighted_values_avx512_d(0, p, v, kv_dt, keys, dim, acc);
}

/* One query row of sink_attention. work: room for keys + 2·dim floats. */
static void attend_row(const attention *a, const attention_steps *steps, int64_t b, int64_t h, int64_t t,
                       float *work) {
    int64_t D = a->dim, S = a->keys, kh = h / (a->heads / a->kv_heads);
    size_t q_size = a->q_dt == BF16 ? 2 : 4, kv_size = a->kv_dt == BF16 ? 2 : 4;
    float *scores = work, *q = work + S, *acc = work + S + D;
    load_row((const char *)a->q + ((b * a->heads + h) * a->tokens + t) * D * q_size, a->q_dt, D, q);
    int64_t offset = (b * a->kv_batch_stride + kh * a->kv_head_stride) * kv_size;
    const uint8_t *mask = a->mask + ((a->mask_batch > 1 ? b : 0) * a->tokens + t) * S;
    steps->scores(q, (const char *)a->k + offset, a->kv_dt, S, D, mask, sqrtf((float)D), scores);
    steps->softmax(scores, S, a->sinks[h], a->kv_dt == BF16);
    for (int64_t d = 0; d < D; d++) acc[d] = 0.0f;
    steps->weighted(scores, (const char *)a->v + offset, a->kv_dt, S, D, acc);
    char *out = (char *)a->out + ((b * a->heads + h) * a->tokens + t) * D * kv_size;
    for (int64_t d = 0; d < D; d++) store_val(out, a->kv_dt, d, acc[d]);
}

/* 0, or -1 when memory ran out. Query rows go to threads once there is enough work: from ~32K
 * multiply-adds a product (one 20b decode step over 128-256 keys, 64 heads: 53 → 37 µs at 161 keys,
 * 91 → 56 at 256, the cache read from DRAM; the threshold had been 1M, which kept those on one
 * thread). */
static int sink_attention(const attention *a) {
    int64_t rows = a->batch * a->heads * a->tokens;
    static const attention_steps portable = {key_scores_c, softmax_c, weighted_values_c};
    static const attention_steps avx512 = {key_scores_avx512, softmax_avx512, weighted_values_avx512};
    const attention_steps *steps = active_isa >= ISA_AVX512 && a->dim % 16 == 0 && a->dim <= 256 ? &avx512 : &portable;
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel if (rows * a->keys * a->dim > 1 << 15)
#endif
    {
        float *work = malloc(sizeof(float) * (a->keys + 2 * a->dim));
        if (!work) failed = 1;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t row = 0; row < rows; row++) {
            if (!work) continue;
            int64_t t = row % a->tokens, h = row / a->tokens % a->heads, b = row / a->tokens / a->heads;
            attend_row(a, steps, b, h, t, work);
        }
        free(work);
    }
    return failed ? -1 : 0;
}

/* rms_norm(x, dt, rows, dim, w, w_dt, eps, y) */
static PyObject *py_rms_norm(PyObject *self, PyObject *args) {
    unsigned long long xp, wp, yp;
    long long rows, dim;
    int dt, w_dt;
    float eps;
    if (!PyArg_ParseTuple(args, "KiLLKifK", &xp, &dt, &rows, &dim, &wp, &w_dt, &eps, &yp)) return NULL;
    if (!check_sizes(rows, dim, 1) || !check_dtypes(dt, w_dt, dt)) return NULL;
    Py_BEGIN_ALLOW_THREADS;
    rms_norm((const void *)xp, dt, rows, dim, (const void *)wp, w_dt, eps, (void *)yp);
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}

/* sink_attention(q, q_dt, batch, heads, tokens, dim, k, v, kv_dt, kv_heads, keys, kv_batch_stride,
 *                kv_head_stride, mask, mask_batch, sinks, out) */
/* The NeoX "halves" rotation of rows x (tokens, heads, dim) in place: with (a, b) the values i and
 * i + dim/2 of a head, a·cos - b·sin and b·cos + a·sin, each product rounded to fp32 before the sum
 * as the reference's separate operators do (this file is compiled without contraction into fused
 * multiply-adds, -std=c11), then to x's dtype. cos, sin: fp32 (tokens, dim/2). */
static void rotary(void *x, int dt, int64_t tokens, int64_t heads, int64_t dim, const float *cos,
                   const float *sin) {
    int64_t half = dim / 2;
    for (int64_t t = 0; t < tokens; t++)
        for (int64_t h = 0; h < heads; h++) {
            int64_t row = (t * heads + h) * dim;
            for (int64_t i = 0; i < half; i++) {
                float a = load_val(x, dt, row + i), b = load_val(x, dt, row + half + i);
                float c = cos[t * half + i], s = sin[t * half + i];
                float ac = a * c, bs = b * s, bc = b * c, as = a * s;
                store_val(x, dt, row + i, ac - bs);
                store_val(x, dt, row + half + i, bc + as);
            }
        }
}

/* rotary(x, dt, tokens, heads, dim, cos, sin): see rotary; dim even. */
static PyObject *py_rotary(PyObject *self, PyObject *args) {
    unsigned long long xp, cp, sp;
    long long tokens, heads, dim;
    int dt;
    if (!PyArg_ParseTuple(args, "KiLLLKK", &xp, &dt, &tokens, &heads, &dim, &cp, &sp)) return NULL;
    if (!check_sizes(tokens, heads, dim) || !check_dtypes(dt, dt, dt)) return NULL;
    if (dim % 2) return PyErr_Format(PyExc_ValueError, "head dim (%lld) must be even", dim);
    rotary((void *)xp, dt, tokens, heads, dim, (const float *)cp, (const float *)sp);
    Py_RETURN_NONE;
}

static PyObject *py_sink_attention(PyObject *self, PyObject *args) {
    attention a;
    unsigned long long qp, kp, vp, mp, sp, op;
    long long batch, heads, tokens, dim, kv_heads, keys, kv_batch_stride, kv_head_stride, mask_batch;
    if (!PyArg_ParseTuple(args, "KiLLLLKKiLLLLKLKK", &qp, &a.q_dt, &batch, &heads, &tokens, &dim, &kp,
                          &vp, &a.kv_dt, &kv_heads, &keys, &kv_batch_stride, &kv_head_stride, &mp,
                          &mask_batch, &sp, &op))
        return NULL;
    if (!check_sizes(batch * heads * tokens, dim, keys) || !check_dtypes(a.q_dt, a.kv_dt, F32)) return NULL;
    if (kv_heads < 1 || heads % kv_heads)
        return PyErr_Format(PyExc_ValueError, "%lld query heads cannot share %lld key/value heads",
                            heads, kv_heads);
    if (mask_batch != 1 && mask_batch != batch)
        return PyErr_Format(PyExc_ValueError, "mask batch %lld is neither 1 nor %lld", mask_batch, batch);
    a.batch = batch, a.heads = heads, a.kv_heads = kv_heads, a.tokens = tokens, a.keys = keys, a.dim = dim;
    a.q = (const void *)qp, a.k = (const void *)kp, a.v = (const void *)vp;
    a.kv_batch_stride = kv_batch_stride, a.kv_head_stride = kv_head_stride;
    a.mask = (const uint8_t *)mp, a.mask_batch = mask_batch, a.sinks = (const float *)sp;
    a.out = (void *)op;
    int status;
    Py_BEGIN_ALLOW_THREADS;
    status = sink_attention(&a);
    Py_END_ALLOW_THREADS;
    if (status) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------- a block's decode step, attention half */
/* Everything a block's decode step does before its experts, in one call: RMSNorm, the q, k and v
 * projections, the rotary embedding of q and k, the write of k and v into the KV cache, the sink
 * attention over the cache, the o projection and the residual add, the second RMSNorm and the
 * router's logits. The same kernels in the same order as the separate calls (so the same bits); what
 * one call saves is the Python and PyTorch between them, which at batch 1 costs more than the small
 * kernels themselves: every layer's weight reads have evicted the interpreter's objects from the
 * caches by the time the next layer's glue touches them. The weights and sizes, fixed for a block,
 * go into an attention_plan once (`attention_plan`); a step passes only what changes. */
typedef struct {
    int64_t width, heads, kv_heads, dim;
    const void *norm_w[2];
    int norm_dt[2];
    float eps[2];
    weights qkv[3], o, router; /* o: heads·dim → width; router: width → experts */
    const void *bias[5];       /* q, k, v, o, router: (out,) or NULL */
    int bias_dt[5];
    const float *sinks; /* (heads,) fp32 */
} attention_plan;

#define PLAN_CAPSULE "gptoss.ops._native.attention_plan"

/* (w, wscale, out, bias, bias_dt) of one weight of `kind` reading rows of `in` values. */
static int parse_weight(PyObject *item, int kind, int64_t in, weights *w, const void **bias, int *bias_dt) {
    unsigned long long wp, sp, biasp;
    long long out;
    if (!PyArg_ParseTuple(item, "KKLKi", &wp, &sp, &out, &biasp, bias_dt)) return 0;
    if (!check_sizes(1, in, out) || !check_dtypes(*bias_dt, F32, F32)) return 0;
    *w = (weights){kind, (const void *)wp, (const void *)sp, out, in};
    *bias = (const void *)biasp;
    return 1;
}

static void free_plan(PyObject *capsule) { free(PyCapsule_GetPointer(capsule, PLAN_CAPSULE)); }

/* attention_plan(width, heads, kv_heads, dim, (norm1, dt, eps), (norm2, dt, eps), kind, (q, k, v),
 *                o, router, sinks) -> capsule; weights as matmul_many's items without y, q k v o of
 * `kind` (1 bf16, 2 int8), the router bf16. The tensors must outlive the capsule. */
static PyObject *py_attention_plan(PyObject *self, PyObject *args) {
    attention_plan p;
    long long width, heads, kv_heads, dim;
    unsigned long long n1, n2, sinks;
    int kind;
    PyObject *q, *k, *v, *o, *router;
    if (!PyArg_ParseTuple(args, "LLLL(Kif)(Kif)i(OOO)OOK", &width, &heads, &kv_heads, &dim, &n1, &p.norm_dt[0],
                          &p.eps[0], &n2, &p.norm_dt[1], &p.eps[1], &kind, &q, &k, &v, &o, &router, &sinks))
        return NULL;
    if (kind != BF16W && kind != INT8W) return PyErr_Format(PyExc_ValueError, "kind is 1 (bf16) or 2 (int8), got %d", kind);
    if (!check_sizes(width, heads, dim) || !check_dtypes(p.norm_dt[0], p.norm_dt[1], F32)) return NULL;
    if (dim % 2 || kv_heads < 1 || heads % kv_heads)
        return PyErr_Format(PyExc_ValueError, "bad attention shapes: dim %lld, heads %lld / %lld", dim, heads, kv_heads);
    p.width = width, p.heads = heads, p.kv_heads = kv_heads, p.dim = dim;
    p.norm_w[0] = (const void *)n1, p.norm_w[1] = (const void *)n2, p.sinks = (const float *)sinks;
    PyObject *items[3] = {q, k, v};
    for (int i = 0; i < 3; i++)
        if (!parse_weight(items[i], kind, width, &p.qkv[i], &p.bias[i], &p.bias_dt[i])) return NULL;
    if (!parse_weight(o, kind, heads * dim, &p.o, &p.bias[3], &p.bias_dt[3]) ||
        !parse_weight(router, BF16W, width, &p.router, &p.bias[4], &p.bias_dt[4]))
        return NULL;
    if (p.qkv[0].out != heads * dim || p.qkv[1].out != kv_heads * dim || p.qkv[2].out != kv_heads * dim ||
        p.o.out != width)
        return PyErr_Format(PyExc_ValueError,
                            "projections (q %lld, k %lld, v %lld, o %lld) do not fit %lld heads, %lld kv "
                            "heads of %lld and width %lld",
                            (long long)p.qkv[0].out, (long long)p.qkv[1].out, (long long)p.qkv[2].out,
                            (long long)p.o.out, heads, kv_heads, dim, width);
    attention_plan *owned = malloc(sizeof p);
    if (!owned) return PyErr_NoMemory();
    *owned = p;
    PyObject *capsule = PyCapsule_New(owned, PLAN_CAPSULE, free_plan);
    if (!capsule) free(owned);
    return capsule;
}

/* y (n, out) = x @ w^T + bias in dt: matmul_many's STORE epilogue. */
static int project(const weights *w, const void *bias, int bias_dt, const void *x, int dt, int64_t n, void *y) {
    epilogue e = {.n = n, .bias = bias, .bias_dt = bias_dt, .mode = STORE, .y = y, .y_dt = dt, .y_stride = w->out};
    return matmul_many(w, &e, 1, x, dt);
}

/* attention_step(plan, x, dt, batch, cos, sin, cache_k, cache_v, slots, slot, keys, mask, mask_batch,
 *                rows, h, logits): x (batch, width) in dt, one token a row; cos, sin fp32 (dim/2,) of
 * its position; caches (batch, kv_heads, slots, dim) in dt, the new k and v written into `slot`, the
 * queries attending their first `keys` slots under mask (mask_batch, 1, 1, keys). Out, in dt: rows =
 * x + o(attention), h = RMSNorm2(rows), logits = router(h). */
static PyObject *py_attention_step(PyObject *self, PyObject *args) {
    PyObject *capsule;
    unsigned long long xp, cp, sp, ckp, cvp, mp, rowsp, hp, logitsp;
    long long batch, slots, slot, keys, mask_batch;
    int dt;
    if (!PyArg_ParseTuple(args, "OKiLKKKKLLLKLKKK", &capsule, &xp, &dt, &batch, &cp, &sp, &ckp, &cvp, &slots,
                          &slot, &keys, &mp, &mask_batch, &rowsp, &hp, &logitsp))
        return NULL;
    const attention_plan *p = PyCapsule_GetPointer(capsule, PLAN_CAPSULE);
    if (!p || !check_sizes(batch, 1, keys) || !check_dtypes(dt, dt, dt)) return NULL;
    if (slot < 0 || slot >= slots || keys > slots || (mask_batch != 1 && mask_batch != batch))
        return PyErr_Format(PyExc_ValueError,
                            "bad decode step: slot %lld, keys %lld of %lld slots, mask batch %lld of %lld",
                            slot, keys, slots, mask_batch, batch);
    size_t size = dt == BF16 ? 2 : 4;
    int64_t W = p->width, H = p->heads, KV = p->kv_heads, D = p->dim;
    int64_t width[5] = {W, H * D, KV * D, KV * D, H * D}; /* normed x, q, k, v, attention out */
    int64_t total = 0;
    for (int i = 0; i < 5; i++) total += width[i];
    char *scratch = malloc(size * batch * (total + W)), *buf[6];
    if (!scratch) return PyErr_NoMemory();
    buf[0] = scratch;
    for (int i = 1; i < 6; i++) buf[i] = buf[i - 1] + size * batch * width[i - 1];
    char *normed = buf[0], *q = buf[1], *k = buf[2], *v = buf[3], *out = buf[4], *o = buf[5];
    const void *x = (const void *)xp;
    void *rows = (void *)rowsp, *h = (void *)hp, *ck = (void *)ckp, *cv = (void *)cvp;
    attention a = {.batch = batch, .heads = H, .kv_heads = KV, .tokens = 1, .keys = keys, .dim = D,
                   .q = q, .q_dt = dt, .k = ck, .v = cv, .kv_batch_stride = KV * slots * D,
                   .kv_head_stride = slots * D, .kv_dt = dt, .mask = (const uint8_t *)mp,
                   .mask_batch = mask_batch, .sinks = p->sinks, .out = out};
    epilogue e[3];
    for (int i = 0; i < 3; i++)
        e[i] = (epilogue){.n = batch, .bias = p->bias[i], .bias_dt = p->bias_dt[i], .mode = STORE,
                          .y = buf[i + 1], .y_dt = dt, .y_stride = p->qkv[i].out};
    int status;
    Py_BEGIN_ALLOW_THREADS;
    rms_norm(x, dt, batch, W, p->norm_w[0], p->norm_dt[0], p->eps[0], normed);
    status = matmul_many(p->qkv, e, 3, normed, dt);
    if (!status) { /* (the cache is written only once q, k and v are there) */
        rotary(q, dt, batch, H, D, (const float *)cp, (const float *)sp);
        rotary(k, dt, batch, KV, D, (const float *)cp, (const float *)sp);
        for (int64_t b = 0; b < batch; b++)
            for (int64_t j = 0; j < KV; j++) {
                size_t from = (b * KV + j) * D * size;
                size_t to = (b * a.kv_batch_stride + j * a.kv_head_stride + slot * D) * size;
                memcpy((char *)ck + to, k + from, D * size);
                memcpy((char *)cv + to, v + from, D * size);
            }
        status = sink_attention(&a);
    }
    if (!status) status = project(&p->o, p->bias[3], p->bias_dt[3], out, dt, batch, o);
    if (!status) {
        for (int64_t i = 0; i < batch * W; i++) /* one rounding of the fp32 sum, as PyTorch adds */
            store_val(rows, dt, i, load_val(x, dt, i) + load_val(o, dt, i));
        rms_norm(rows, dt, batch, W, p->norm_w[1], p->norm_dt[1], p->eps[1], h);
        status = project(&p->router, p->bias[4], p->bias_dt[4], h, dt, batch, (void *)logitsp);
    }
    Py_END_ALLOW_THREADS;
    free(scratch);
    if (status) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* set_isa(name) -> name actually in use: lets tests run every path the CPU supports. */
static PyObject *py_set_isa(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    __builtin_cpu_init();
    int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    int avx512bf16 = avx512 && __builtin_cpu_supports("avx512bf16");
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    int amx = avx512bf16 && amx_permitted;
    if (!strcmp(name, "best"))
        active_isa = amx ? ISA_AMX : avx512bf16 ? ISA_AVX512BF16 : avx512 ? ISA_AVX512 : avx2 ? ISA_AVX2 : ISA_C;
    else if (!strcmp(name, "amx") && amx) active_isa = ISA_AMX;
    else if (!strcmp(name, "avx512bf16") && avx512bf16) active_isa = ISA_AVX512BF16;
    else if (!strcmp(name, "avx512") && avx512) active_isa = ISA_AVX512;
    else if (!strcmp(name, "avx2") && avx2) active_isa = ISA_AVX2;
    else if (!strcmp(name, "c")) active_isa = ISA_C;
    else return PyErr_Format(PyExc_ValueError, "instruction set %s is not available here", name);
    return PyUnicode_FromString(ISA_NAMES[active_isa]);
}

static PyObject *py_isa(PyObject *self, PyObject *args) { return PyUnicode_FromString(ISA_NAMES[active_isa]); }

static PyObject *py_num_threads(PyObject *self, PyObject *args) {
    int threads = 0;
    if (!PyArg_ParseTuple(args, "|i", &threads)) return NULL;
#ifdef _OPENMP
    if (threads > 0) omp_set_num_threads(threads);
    return PyLong_FromLong(omp_get_max_threads());
#else
    return PyLong_FromLong(1);
#endif
}

static PyMethodDef METHODS[] = {
    {"mxfp4_matmul", py_mxfp4_matmul, METH_VARARGS, "y = x @ dequant(blocks, scales)^T + bias"},
    {"matmul_many", py_matmul_many, METH_VARARGS, "y = x @ W^T + bias (W bf16, or int8 times row scales) for one or more W, in one call"},
    {"mxfp4_moe", py_mxfp4_moe, METH_VARARGS, "routed clamped-SwiGLU MXFP4 experts"},
    {"attention_plan", py_attention_plan, METH_VARARGS, "a block's attention weights for attention_step"},
    {"attention_step", py_attention_step, METH_VARARGS, "a block's decode step up to its experts, in one call"},
    {"rms_norm", py_rms_norm, METH_VARARGS, "RMSNorm of rows, fp32 inside"},
    {"rotary", py_rotary, METH_VARARGS, "NeoX rotary embedding of (tokens, heads, dim) rows, in place"},
    {"sink_attention", py_sink_attention, METH_VARARGS, "attention with per-head sinks over a KV cache"},
    {"set_isa", py_set_isa, METH_VARARGS, "choose 'best', 'amx', 'avx512bf16', 'avx512', 'avx2' or 'c'"},
    {"isa", py_isa, METH_NOARGS, "the instruction set in use"},
    {"num_threads", py_num_threads, METH_VARARGS, "get (or set) the kernels' thread count"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, METHODS};

PyMODINIT_FUNC PyInit__native(void) {
    for (int s = 0; s < 256; s++) {
        SCALES[s] = ldexpf(1.0f, s - 127);
        SCALES_TOP[s] = ldexpf(1.0f, s - 152);
        SCALES_HALF[s] = ldexpf(1.0f, s - 128);
        EXP_SHIFT[s] = (int16_t)((s - 127) * 128);
    }
    for (int k = 0; k < 32; k++) FP4_BF16[k] = f32_to_bf16(FP4_VALUES[k & 15]);
    __builtin_cpu_init();
    prefetch_to_l2 = __builtin_cpu_is("intel");
#ifdef __linux__
    amx_permitted = __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
                    syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#endif
    PyObject *module = PyModule_Create(&MODULE);
    if (!module) return NULL;
    PyObject *best = Py_BuildValue("(s)", "best");
    PyObject *isa = best ? py_set_isa(NULL, best) : NULL;
    Py_XDECREF(best);
    if (!isa) return NULL;
    Py_DECREF(isa);
    PyModule_AddIntConstant(module, "MAX_ROWS", MAX_ROWS);
    PyModule_AddIntConstant(module, "MAX_MANY", MAX_MANY);
    PyModule_AddIntConstant(module, "F32", F32);
    PyModule_AddIntConstant(module, "BF16", BF16);
    return module;
}
