/* AVX-512 kernels (no BF16 dot products): fp32 activations against MXFP4, bf16 and int8 weights, and
 * bf16 activations against int8 weights as 16-bit block floats. */
#include "avx512.h"

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

AVX512 void mxfp4_f32_avx512(const void *x, int64_t n, const weights *w, int64_t r0,
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

AVX512 void bf16w_f32_avx512(const void *x, int64_t n, const weights *w, int64_t r0,
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

AVX512 void int8w_f32_avx512(const void *x, int64_t n, const weights *w, int64_t r0,
                                    int64_t r1, const epilogue *e) {
    float gate[MAX_ROWS];
#define ROWS(N, R, r) int8w_f32_avx512_rows(N, R, x, w, r, e, gate)
#define BODY(N) ROW_PAIRS(N, ROWS)
    SWITCH_ROWS(n, BODY)
#undef BODY
#undef ROWS
}

/* int8 weights against bf16 activation rows as 16-bit block floats (AS_I16_GROUPS, the scheme of
 * mxfp4_i16_avx2: each group of 32 as integers q · d, exact within 2^7 of the group's largest |x|,
 * others within 2^-15 of it), on any AVX-512 CPU. int8_to_bf16 spends five conversions on every 32
 * weights to feed one vdpbf16ps, which left int8w_bf16_avx512 at half of what memory delivers. Here
 * one vpmovsxbw widens 32 weights and vpmaddwd multiplies them with the activations' integers: every
 * lane sums two products exactly (|sum| ≤ 2 · 127 · 32640 < 2^24, so its conversion is exact too),
 * and one multiply-add applies the group's d. The row's scale multiplies the sum. Figures:
 * benchmarks/NOTES.md, "int8 against bf16 rows". */
AVX512_INLINE void int8w_i16_sums(const int N, const int R, const uint8_t *x, const weights *w, int64_t r,
                                  __m512 (*s)[MAX_ROWS]) {
    /* two chains of multiply-adds hide their latency; 1 to 4 rows alike (see STREAMS) */
    const int U = N <= 4 ? 2 : 1;
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

AVX512 void int8w_i16_avx512(const void *x, int64_t n, const weights *w, int64_t r0, int64_t r1,
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
