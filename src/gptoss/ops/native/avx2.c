/* AVX2 kernels (fp32 activations; one bf16 row against MXFP4 as 16-bit block floats), and the
 * prompt kernel avx2_gemm for calls of more than MAX_ROWS rows. */
#include "common.h"

/* ------------------------------------------------------------------ AVX2, fp32 activations */

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
 * a chunk at a time had left the hardware prefetchers behind; asking for the scales too gained
 * nothing more (benchmarks/NOTES.md). */
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

AVX2 void mxfp4_f32_avx2(const void *x, int64_t n, const weights *w, int64_t r0, int64_t r1,
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
void write_i16_pairs(const uint16_t *x, int64_t in, uint8_t *dst) {
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
void write_i16_groups(const uint16_t *x, int64_t in, uint8_t *dst) {
    int16_t *values = (int16_t *)dst;
    float *d = (float *)(dst + 2 * in);
    for (int64_t g = 0; g < in / BLOCK; g++) {
        int q[BLOCK];
        d[g] = block_float16(x + g * BLOCK, q);
        for (int i = 0; i < BLOCK; i++) values[g * BLOCK + i] = (int16_t)q[i];
    }
}

/* Weight rows [r0, r1) against one activation row (choose_kernel takes it for n == 1 only). */
AVX2 void mxfp4_i16_avx2(const void *xv, int64_t n, const weights *w, int64_t r0, int64_t r1,
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

AVX2 void bf16w_f32_avx2(const void *x, int64_t n, const weights *w, int64_t r0, int64_t r1,
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

AVX2 void int8w_f32_avx2(const void *x, int64_t n, const weights *w, int64_t r0, int64_t r1,
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
 * MAX_ROWS tokens at a time (benchmarks/NOTES.md, "The AVX2 prompt kernel"). */
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

AVX2 void mxfp4_f32_avx2_gemm(const void *x, int64_t n, const weights *w, int64_t r0, int64_t r1,
                                     const epilogue *e) {
    avx2_gemm(MXFP4, x, n, w, r0, r1, e);
}

AVX2 void bf16w_f32_avx2_gemm(const void *x, int64_t n, const weights *w, int64_t r0, int64_t r1,
                                     const epilogue *e) {
    avx2_gemm(BF16W, x, n, w, r0, r1, e);
}

AVX2 void int8w_f32_avx2_gemm(const void *x, int64_t n, const weights *w, int64_t r0, int64_t r1,
                                     const epilogue *e) {
    avx2_gemm(INT8W, x, n, w, r0, r1, e);
}
