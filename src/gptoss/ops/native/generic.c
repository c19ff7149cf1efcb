/* The portable C kernels: the reference every ISA kernel is tested against, and the path of CPUs
 * without AVX2. Natural fp32 activations. */
#include "common.h"

void mxfp4_c(const void *xv, int64_t n, const weights *w, int64_t r0, int64_t r1,
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

void bf16w_c(const void *xv, int64_t n, const weights *w, int64_t r0, int64_t r1,
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

void int8w_c(const void *xv, int64_t n, const weights *w, int64_t r0, int64_t r1,
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
