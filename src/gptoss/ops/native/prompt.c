/* A prompt's busy experts on CPUs with AVX-512 BF16 but no AMX tiles: decode a run of weight rows
 * once, multiply it with all the expert's tokens. */
#include "avx512.h"

/* Weight rows [r0, r1) against the n bf16 activation rows x (AS_BF16), as a GEMM on vdpbf16ps. Per
 * 32 weight rows, their MXFP4 blocks are decoded once into a thread buffer in pair-major order
 * (pair p of the 32 rows side by side: buffer[p][i] = weights 2p and 2p+1 of row i, 16 rows'
 * blocks transposed in registers), so that one vector holds a pair of columns of 16 rows; every
 * group of up to 8 tokens then takes 2 × 8 accumulators over the pairs, each product the exact
 * bf16 product of a broadcast activation pair (the token rows as they lie) and summed in fp32, as
 * the chunked kernel sums them in another order. mxfp4_bf16_avx512 decodes the weights again for
 * every 8 tokens; here an expert's tokens share one decoding, which at a prompt's 16-64 tokens an
 * expert made it the faster kernel (benchmarks/NOTES.md, issue 33). Rows with scale bytes outside
 * 2..252 take mxfp4_bf16_avx512, as does a call whose buffer could not be had. */
AVX512BF16_INLINE void gemm_tokens(const int N, const uint32_t *x, int64_t pairs, const uint32_t *wb,
                                   float (*sums)[32], int64_t t) {
    __m512 acc[2][8];
    for (int j = 0; j < N; j++) acc[0][j] = acc[1][j] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; p++) {
        __m512bh w0 = as_bh(_mm512_load_si512((const void *)(wb + p * 32)));
        __m512bh w1 = as_bh(_mm512_load_si512((const void *)(wb + p * 32 + 16)));
#pragma GCC unroll 8
        for (int j = 0; j < N; j++) {
            __m512bh b = as_bh(_mm512_set1_epi32((int)x[j * pairs + p]));
            acc[0][j] = _mm512_dpbf16_ps(acc[0][j], w0, b);
            acc[1][j] = _mm512_dpbf16_ps(acc[1][j], w1, b);
        }
    }
    for (int j = 0; j < N; j++) {
        float out[32];
        _mm512_storeu_ps(out, acc[0][j]);
        _mm512_storeu_ps(out + 16, acc[1][j]);
        for (int i = 0; i < 32; i++) sums[i][t + j] = out[i];
    }
}

AVX512BF16 void mxfp4_bf16_gemm(const void *xv, int64_t n, const weights *w, int64_t r0, int64_t r1,
                                const epilogue *e) {
    static _Thread_local void *w_buf;
    static _Thread_local size_t w_have;
    int64_t in = w->in, groups = in / BLOCK, pairs = in / 2;
    const uint8_t *blocks = w->w, *scales = w->scales;
    uint32_t *wb = scratch(&w_buf, &w_have, (size_t)pairs * 32 * sizeof(uint32_t));
    if (!wb || !rows_safe(scales + r0 * groups, (r1 - r0) * groups)) {
        for (int64_t t0 = 0; t0 < n; t0 += MAX_ROWS) {
            epilogue part = rows_epilogue(e, t0, min64(MAX_ROWS, n - t0));
            mxfp4_bf16_avx512((const uint16_t *)xv + t0 * in, part.n, w, r0, r1, &part);
        }
        return;
    }
    const uint32_t *x = xv;
    const __m512i table = _mm512_loadu_si512((const void *)FP4_BF16);
    float sums[32][32], gate[32];
    for (int64_t rs = r0; rs < r1; rs += 32) {
        int64_t rows = min64(32, r1 - rs);
        for (int64_t h = 0; h < 2; h++)
            for (int64_t g = 0; g < groups; g++) {
                __m512i r[16];
                for (int64_t i = 0; i < 16; i++) {
                    int64_t row = 16 * h + i, at = (rs + row) * groups + g;
                    r[i] = row < rows ? mxfp4_block_bf16(blocks + at * 16, scales[at], table) : _mm512_setzero_si512();
                }
                transpose16(r); /* r[j]: pair 16g + j of the 16 rows */
                for (int64_t j = 0; j < 16; j++) _mm512_store_si512((void *)(wb + (16 * g + j) * 32 + 16 * h), r[j]);
            }
        for (int64_t t0 = 0; t0 < n; t0 += 32) {
            int64_t count = min64(32, n - t0);
            for (int64_t t = 0; t < count; t += 8) {
#define TOKENS(N) gemm_tokens(N, x + (t0 + t) * pairs, pairs, wb, sums, t)
                SWITCH_ROWS(min64(8, count - t), TOKENS);
#undef TOKENS
            }
            epilogue part = rows_epilogue(e, t0, count);
            tile_finish_rows(&part, rs, rows, sums, gate);
        }
    }
}
