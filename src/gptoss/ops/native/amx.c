#include "avx512.h"

/* ------------------------------------------------------------------ AMX: prompts through the experts */
#define AMX_TILE_BYTES 1024 /* a tile register holds 16 rows of 64 bytes */


typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config;


/* Weight rows [r0, r1) against the n bf16 activation rows x (AS_BF16), with AMX tile multiplies
 * (tdpbf16ps: 16 x 16 outputs, 32 products each, exact bf16 products summed in fp32). The weights are
 * the A operand: a block of 16 rows decodes to 16 rows of 32 bf16 values in their own order (the
 * scale folded into the exponent, as mxfp4_bf16_avx512_rows does), with no transposition; the
 * activations are the B operand, rearranged once per call into pairs of values per token (B[p][t]
 * = x[t][2p], x[t][2p+1]; tokens padded to 16 with zeros). Per 32 weight rows: their blocks decoded
 * once into a thread buffer, then every pair of 16-token chunks gets four accumulator tiles
 * (2 x 16 rows by 2 x 16 tokens), stored, and finished row by row. Rows with scale bytes outside
 * 2..252 take mxfp4_bf16_avx512, as does a call whose buffers could not be had.
 * Decoding the blocks is most of its time, the tile products little (benchmarks/NOTES.md, "AMX"). */
AMX void mxfp4_amx(const void *xv, int64_t n, const weights *w, int64_t r0, int64_t r1, const epilogue *e) {
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
            tile_finish_rows(&part, rs, rows, sums, gate);
        }
    }
    _tile_release();
}
