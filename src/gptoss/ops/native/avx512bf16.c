/* AVX-512 BF16 kernels: bf16 activations against MXFP4, bf16 and int8 weights (vdpbf16ps). */
#include "avx512.h"

AVX512BF16 void mxfp4_bf16_avx512(const void *x, int64_t n, const weights *w, int64_t r0,
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

/* Rows [r0, r1) sixteen at a time (inside a kernel: r0, r1 and e in scope): FILL(N, r, count)
 * leaves rows r..r+count-1's fp32 partial sums, one vector per activation row, in lanes[t][0..count);
 * one REDUCE (lane i: the sum of v[i]'s lanes) makes the sixteen rows' sums and finish_rows16
 * finishes them: per row far fewer instructions than a horizontal sum and the scalar finish_row. */
#define SIXTEEN_ROWS(N, FILL, REDUCE)                                                             \
    do {                                                                                          \
        __m512 lanes[MAX_ROWS][16], sums[MAX_ROWS];                                               \
        for (int64_t r = r0; r < r1; r += 16) {                                                   \
            int count = r1 - r < 16 ? (int)(r1 - r) : 16;                                         \
            FILL(N, r, count);                                                                    \
            for (int t = 0; t < (N); t++) {                                                       \
                for (int i = count; i < 16; i++) lanes[t][i] = _mm512_setzero_ps();               \
                sums[t] = REDUCE(lanes[t]);                                                       \
            }                                                                                     \
            finish_rows16(N, e, r, count, sums);                                                  \
        }                                                                                         \
    } while (0)

AVX512BF16 void mxfp4_quads_avx512(const void *x, int64_t n, const weights *w, int64_t r0,
                                          int64_t r1, const epilogue *e) {
#define FILL(N, r, count) \
    for (int i = 0; i < (count); i++) mxfp4_quads_row(N, x, w, (r) + i, lanes, i)
#define BODY(N) SIXTEEN_ROWS(N, FILL, lane_sums16)
    SWITCH_ROWS(n, BODY)
#undef BODY
#undef FILL
}

/* Row r against the N (1 to 4) activation rows: its fp32 partial sums into lanes[t][slot]. */
AVX512BF16_INLINE void bf16w_bf16_row(const int N, const uint16_t *x, const weights *w, int64_t r,
                                      __m512 (*lanes)[16], int slot) {
    const int U = STREAMS(N);
    int64_t in = w->in, full = in - in % 32;
    __mmask32 tail = (__mmask32)((1ull << (in % 32)) - 1);
    const uint16_t *wr = (const uint16_t *)w->w + r * in;
    __m512 acc[4][MAX_ROWS];
#pragma GCC unroll 8
    for (int t = 0; t < N; t++)
        for (int u = 0; u < U; u++) acc[u][t] = _mm512_setzero_ps();
    for (int64_t i0 = 0; i0 < full; i0 += U * 32) {
#pragma GCC unroll 4
        for (int u = 0; u < U; u++) {
            int64_t i = i0 + u * 32;
            if (U > 1 && i >= full) break;
            if (prefetch_to_l2 || N >= 3) _mm_prefetch((const char *)(wr + i) + PF_L2_DIST, _MM_HINT_T1);
            __m512i wv = _mm512_loadu_si512((const void *)(wr + i));
#pragma GCC unroll 8
            for (int t = 0; t < N; t++)
                acc[u][t] = _mm512_dpbf16_ps(acc[u][t], as_bh(wv), as_bh(_mm512_loadu_si512((const void *)(x + t * in + i))));
        }
    }
    if (full < in) {
        __m512i wv = _mm512_maskz_loadu_epi16(tail, wr + full);
#pragma GCC unroll 8
        for (int t = 0; t < N; t++)
            acc[0][t] = _mm512_dpbf16_ps(acc[0][t], as_bh(wv), as_bh(_mm512_maskz_loadu_epi16(tail, x + t * in + full)));
    }
#pragma GCC unroll 8
    for (int t = 0; t < N; t++) {
        __m512 sum = acc[0][t];
        for (int u = 1; u < U; u++) sum = _mm512_add_ps(sum, acc[u][t]);
        lanes[t][slot] = sum;
    }
}

/* Five or more activation rows (compute-bound): blocks of four weight rows against groups of up
 * to BF16_GROUP activation rows, 24 accumulators of the 32 registers, so that each load feeds four
 * or six products (a weight row pair against eight rows fed one or two, and stayed near half the
 * vdpbf16ps rate even from cache). The row goes in chunks of BF16_CHUNK values, so that a block's
 * chunk of weights (8 KiB) and the activation rows' (16 KiB for 8 rows) stay in L1 while every
 * group passes over them; the sums wait in memory between chunks. Each (weight row, activation
 * row) pair is one chain of products in the row's order whatever the blocking, so a row's sums
 * are those of a single pass over it. The first group asks for the next block's weights
 * (contiguous after this block's) into L2, a block ahead, so that a tile's rows come from memory
 * while the block before them is multiplied. */
#define BF16_GROUP 6
#define BF16_CHUNK 1024

/* Weight rows wr .. (R of them) against activation rows x .. (G of them), values [k0, k1) of the
 * rows (k1 past the end: to the end, the tail of a length not a multiple of 32 included): the sums
 * so far, s[q][t] (from zero when k0 is 0), carried on. */
AVX512BF16_INLINE void bf16w_bf16_block(const int R, const int G, const uint16_t *x, int64_t in, int64_t k0,
                                        int64_t k1, const uint16_t *wr, int ahead, __m512 (*s)[MAX_ROWS]) {
    int64_t full = in - in % 32, end = k1 < full ? k1 : full;
    __mmask32 tail = (__mmask32)((1ull << (in % 32)) - 1);
    __m512 acc[4][BF16_GROUP];
#pragma GCC unroll 6
    for (int t = 0; t < G; t++)
        for (int q = 0; q < R; q++) acc[q][t] = k0 ? s[q][t] : _mm512_setzero_ps();
    for (int64_t i = k0; i < end; i += 32) {
        __m512i wv[4];
#pragma GCC unroll 4
        for (int q = 0; q < R; q++) {
            if (ahead) _mm_prefetch((const char *)(wr + (R + q) * in + i), _MM_HINT_T1);
            wv[q] = _mm512_loadu_si512((const void *)(wr + q * in + i));
        }
#pragma GCC unroll 6
        for (int t = 0; t < G; t++) {
            __m512i xv = _mm512_loadu_si512((const void *)(x + t * in + i));
#pragma GCC unroll 4
            for (int q = 0; q < R; q++) acc[q][t] = _mm512_dpbf16_ps(acc[q][t], as_bh(wv[q]), as_bh(xv));
        }
    }
    if (k1 >= in && full < in) {
        __m512i wv[4];
        for (int q = 0; q < R; q++) wv[q] = _mm512_maskz_loadu_epi16(tail, wr + q * in + full);
#pragma GCC unroll 6
        for (int t = 0; t < G; t++) {
            __m512i xv = _mm512_maskz_loadu_epi16(tail, x + t * in + full);
            for (int q = 0; q < R; q++) acc[q][t] = _mm512_dpbf16_ps(acc[q][t], as_bh(wv[q]), as_bh(xv));
        }
    }
#pragma GCC unroll 6
    for (int t = 0; t < G; t++)
        for (int q = 0; q < R; q++) s[q][t] = acc[q][t];
}

/* Activation rows [t0, t0 + g) against the block (g ≤ BF16_GROUP, a constant in each case). */
#define BLOCK_GROUP(R, g, t0, ahead)                                                               \
    switch (g) {                                                                                   \
    case 1: bf16w_bf16_block(R, 1, x + (t0) * in, in, k0, k1, wr, ahead, part[t0]); break;         \
    case 2: bf16w_bf16_block(R, 2, x + (t0) * in, in, k0, k1, wr, ahead, part[t0]); break;         \
    case 3: bf16w_bf16_block(R, 3, x + (t0) * in, in, k0, k1, wr, ahead, part[t0]); break;         \
    case 4: bf16w_bf16_block(R, 4, x + (t0) * in, in, k0, k1, wr, ahead, part[t0]); break;         \
    case 5: bf16w_bf16_block(R, 5, x + (t0) * in, in, k0, k1, wr, ahead, part[t0]); break;         \
    default: bf16w_bf16_block(R, 6, x + (t0) * in, in, k0, k1, wr, ahead, part[t0]); break;        \
    }

/* Weight rows r .. r+R-1 (of the call's [r, r1)) against all N activation rows: row r+q's sums
 * against activation row t into lanes[t][slot + q]. */
AVX512BF16_INLINE void bf16w_bf16_rows_many(const int N, const int R, const uint16_t *x, const weights *w,
                                            int64_t r, int64_t r1, __m512 (*lanes)[16], int slot) {
    int64_t in = w->in;
    const uint16_t *wr = (const uint16_t *)w->w + r * in;
    __m512 part[MAX_ROWS][4][MAX_ROWS]; /* [t0][q][t]: the sums of the group from row t0 */
    int ahead = r + 2 * R <= r1;
    for (int64_t k0 = 0; k0 < in; k0 += BF16_CHUNK) {
        int64_t k1 = k0 + BF16_CHUNK;
        for (int t0 = 0; t0 < N; t0 += BF16_GROUP) {
            int g = N - t0 < BF16_GROUP ? N - t0 : BF16_GROUP;
            BLOCK_GROUP(R, g, t0, ahead && t0 == 0)
        }
    }
    for (int t0 = 0; t0 < N; t0 += BF16_GROUP)
        for (int q = 0; q < R; q++)
            for (int t = 0; t < BF16_GROUP && t0 + t < N; t++) lanes[t0 + t][slot + q] = part[t0][q][t];
}
#undef BLOCK_GROUP

/* The lane sums of 16 vectors, as one vector (lane i: v[i]'s), each by the tree of GCC's
 * _mm512_reduce_add_ps (lanes j + 8, then j + 4, then j + 2, then the last two), so that a row
 * comes out as it did when its sum was reduced alone. */
AVX512BF16_INLINE __m512 reduce_add16(const __m512 *v) {
    __m512 a[8], b[4], c[2];
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++) /* 128-bit lanes: v[2i]'s lanes j + (j+8), j < 8, then v[2i+1]'s */
        a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)),
                             _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)));
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++) /* 128-bit lane k: v[4i+k]'s sums j + (j+4), j < 4 */
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)));
#pragma GCC unroll 2
    for (int i = 0; i < 2; i++) { /* 128-bit lane k: v[8i+k]'s two sums, then v[8i+4+k]'s */
        __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(b[2 * i]), _mm512_castps_pd(b[2 * i + 1]));
        __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(b[2 * i]), _mm512_castps_pd(b[2 * i + 1]));
        c[i] = _mm512_add_ps(_mm512_castpd_ps(hi), _mm512_castpd_ps(lo));
    }
    /* lane 4k + m: v[4m + k]'s sum */
    __m512 d = _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    return _mm512_permutexvar_ps(order, d);
}

/* One activation row to four (decode): one weight row at a time, sixteen finished at once (a little
 * faster from memory). With 3-4 rows the products take as long as the row's read, and the hardware
 * prefetchers alone let the two run one after the other: the weights are asked for into L2
 * PF_L2_DIST ahead (~2x at 4 rows). More rows (compute-bound): blocks of four weight rows against
 * groups of the activation rows (bf16w_bf16_block), sixteen rows finished at once as well, their
 * sums reduced as each row's alone was. */
AVX512BF16 void bf16w_bf16_avx512(const void *x, int64_t n, const weights *w, int64_t r0,
                                         int64_t r1, const epilogue *e) {
#define ONE_BY_ONE(N, r, count) \
    for (int i = 0; i < (count); i++) bf16w_bf16_row(N, x, w, (r) + i, lanes, i)
#define IN_FOURS(N, r, count)                                                                       \
    do {                                                                                           \
        int i = 0;                                                                                 \
        for (; i + 4 <= (count); i += 4) bf16w_bf16_rows_many(N, 4, x, w, (r) + i, r1, lanes, i);  \
        for (; i < (count); i++) bf16w_bf16_rows_many(N, 1, x, w, (r) + i, r1, lanes, i);         \
    } while (0)
#define BODY(N)                                                                                    \
    if ((N) <= 4) SIXTEEN_ROWS(N, ONE_BY_ONE, lane_sums16);                                        \
    else SIXTEEN_ROWS(N, IN_FOURS, reduce_add16);
    SWITCH_ROWS(n, BODY)
#undef BODY
#undef IN_FOURS
#undef ONE_BY_ONE
}

/* int8 weights become bf16 exactly (|w| ≤ 127 needs 7 significant bits, bf16 has 8): sign-extend
 * and convert 32 of them to fp32, pack to bf16, then the same dot products; the row's scale
 * multiplies the sum. The conversion makes this as busy per byte as the MXFP4 kernels, so it asks
 * for its weights PF_DIST ahead as they do (the bf16 kernel, a fraction of the work per byte, keeps
 * up with the hardware prefetchers alone at 1-2 rows; benchmarks/NOTES.md). */
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
 * Not sixteen rows at a time as bf16w_bf16_avx512: for int8 weights that measured slower. */
AVX512BF16 void int8w_bf16_avx512(const void *x, int64_t n, const weights *w, int64_t r0,
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
