/* AVX-512 helpers shared by avx512.c, avx512bf16.c, amx.c and attention.c (inlined where used). */
#ifndef GPTOSS_NATIVE_AVX512_H
#define GPTOSS_NATIVE_AVX512_H
#include "common.h"

/* With 5 or more activation rows the AVX-512 kernels are compute-bound and take weight rows two
 * at a time (R = 2), so that every activation load feeds two products (bf16 weights against bf16
 * rows: four, bf16w_bf16_block). With fewer (decode) they are bound by memory and take one row at
 * a time: a single sequential stream per thread is what the hardware prefetchers follow best (two
 * interleaved rows read at half the speed from DRAM).
 * U independent accumulator streams per (row, weight row) hide the FMA latency where rows are few;
 * 1 to 4 rows take the same 4, so that a row's sums are made in the same order whether it is
 * alone or one of up to 4 (a speculative verify pass feeds its tokens as such rows and must get
 * one-token decoding's numbers, bit for bit). */
#define STREAMS(N) ((N) <= 4 ? 4 : 1)

/* Weight rows [r0, r1), in pairs when N > 4; BODY(N, R, r) handles rows r .. r+R-1. */
#define ROW_PAIRS(N, BODY)                                                                     \
    do {                                                                                       \
        int64_t r = r0;                                                                        \
        if ((N) > 4)                                                                           \
            for (; r + 2 <= r1; r += 2) BODY(N, 2, r);                                         \
        for (; r < r1; r++) BODY(N, 1, r);                                                     \
    } while (0)

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
static __attribute__((unused)) void mxfp4_block_f32(const uint16_t *x, int64_t in, int64_t n, const uint8_t *b, uint8_t s,
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

/* A thread's buffer of at least `need` bytes, kept for its next call: an MoE prompt makes hundreds
 * of calls a layer, and malloc would serve buffers this size with fresh pages (mmap) every time. */
static inline void *scratch(void **buf, size_t *have, size_t need) {
    if (*have < need) {
        free(*buf);
        *buf = line_aligned(need);
        *have = *buf ? need : 0;
    }
    return *buf;
}

/* finish_row for rows [r, r + rows) and e's (at most 32) tokens, row i's sums at sums[i]: a
 * gate_up's SwiGLU 16 tokens at a time with exp512 (the scalar expf took ~14% of mxfp4_amx's
 * time), the other modes row by row. (amx.c, prompt.c) */
AVX512_INLINE void tile_finish_rows(const epilogue *e, int64_t r, int64_t rows, float (*sums)[32], float *gate) {
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

/* 16 rows of 16 dwords transposed in place: r[c] becomes column c (attention.c, prompt.c). */
AVX512BF16_INLINE void transpose16(__m512i *r) {
    __m512i t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* r[4i + m], lane L: column 4L + m of rows 4i .. 4i+3 */
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int m = 0; m < 4; m++) {
        __m512i u0 = _mm512_shuffle_i32x4(r[m], r[4 + m], _MM_SHUFFLE(1, 0, 1, 0));
        __m512i u1 = _mm512_shuffle_i32x4(r[m], r[4 + m], _MM_SHUFFLE(3, 2, 3, 2));
        __m512i v0 = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], _MM_SHUFFLE(1, 0, 1, 0));
        __m512i v1 = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], _MM_SHUFFLE(3, 2, 3, 2));
        t[m] = _mm512_shuffle_i32x4(u0, v0, _MM_SHUFFLE(2, 0, 2, 0));
        t[4 + m] = _mm512_shuffle_i32x4(u0, v0, _MM_SHUFFLE(3, 1, 3, 1));
        t[8 + m] = _mm512_shuffle_i32x4(u1, v1, _MM_SHUFFLE(2, 0, 2, 0));
        t[12 + m] = _mm512_shuffle_i32x4(u1, v1, _MM_SHUFFLE(3, 1, 3, 1));
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
}

#endif
