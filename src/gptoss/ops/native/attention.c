/* The decode-time row operations: RMSNorm, the rotary embedding, sink attention over the KV cache,
 * and a block's attention half of a decode step in one call (attention_step). */
#include "avx512.h"

/* ------------------------------------------------------------------ decode-time helpers
 * RMSNorm and attention over the KV cache. For the few tokens of a decode step PyTorch spends
 * more time dispatching their dozen small operators per layer than computing them; these do the
 * same arithmetic (fp32 throughout, rounded where the reference rounds) in one call each. */

/* A row of n values in dtype dt, as fp32. */
static inline void load_row(const void *p, int dt, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i++) out[i] = load_val(p, dt, i);
}

/* y = (w · (x · rsqrt(mean(x²) + eps))) per row, in x's dtype; w in w_dt. */
void rms_norm(const void *x, int dt, int64_t rows, int64_t dim, const void *w, int w_dt, float eps,
              void *y) {
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


/* What one query row sees: the keys at positions p >= 0 with 0 <= q - p < window, key s at keys[s],
 * or at position s when keys is NULL (see `attention`). */
typedef struct {
    int64_t q;
    const int64_t *keys;
    int64_t window;
} sight;

INLINE int sees(const sight *v, int64_t s) {
    int64_t p = v->keys ? v->keys[s] : s, d = v->q - p;
    return p >= 0 && d >= 0 && d < v->window;
}

/* The sight of query token t of batch row b. */
INLINE sight sight_of(const attention *a, int64_t b, int64_t t) {
    return (sight){a->q_pos[b * a->tokens + t], a->k_pos ? a->k_pos + b * a->keys : NULL, a->window};
}

/* The three steps of one query row, portable and AVX-512 (dim a multiple of 16): the scores of
 * query q (fp32) against the keys it sees (the others -inf); the softmax beside the head's
 * sink, its probabilities rounded to bf16 when the values are bf16 (the reference multiplies in
 * their dtype); and acc = Σ p[s] · v[s], accumulated in fp32. A head's keys and values come in
 * pages of `page` positions, page i at pages[i] (rows of dim): a contiguous cache is one page, a
 * paged one its blocks. Keys are visited in position order whatever the paging, so the sums are
 * the same numbers either way. */
typedef struct {
    void (*scores)(const float *q, const char *const *pages, int64_t page, int kv_dt, int64_t keys,
                   int64_t dim, const sight *seen, float root, float *scores);
    void (*softmax)(float *p, int64_t keys, float sink, int round_bf16);
    void (*weighted)(const float *p, const char *const *pages, int64_t page, int kv_dt, int64_t keys,
                     int64_t dim, float *acc);
} attention_steps;

static void key_scores_c(const float *q, const char *const *pages, int64_t page, int kv_dt, int64_t keys,
                         int64_t dim, const sight *seen, float root, float *scores) {
    for (int64_t first = 0, i = 0; first < keys; first += page, i++) {
        int64_t n = keys - first < page ? keys - first : page;
        for (int64_t s = 0; s < n; s++) {
            int visible = sees(seen, first + s);
            float dot = 0.0f;
            for (int64_t d = 0; d < dim && visible; d++) dot += q[d] * load_val(pages[i], kv_dt, s * dim + d);
            scores[first + s] = visible ? dot / root : -INFINITY;
        }
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

static void weighted_values_c(const float *p, const char *const *pages, int64_t page, int kv_dt, int64_t keys,
                              int64_t dim, float *acc) {
    for (int64_t first = 0, i = 0; first < keys; first += page, i++) {
        int64_t n = keys - first < page ? keys - first : page;
        for (int64_t s = 0; s < n; s++)
            for (int64_t d = 0; d < dim && p[first + s] != 0.0f; d++)
                acc[d] += p[first + s] * load_val(pages[i], kv_dt, s * dim + d);
    }
}

AVX512_INLINE __m512 load16_f32(const void *p, int dt, int64_t i) {
    if (dt == BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i))), 16));
    return _mm512_loadu_ps((const float *)p + i);
}

/* D: the head size, a compile-time 64 (every gpt-oss member) or 0 for `dim` at run time. */
AVX512_INLINE void key_scores_avx512_d(const int D, const float *q, const char *const *pages, int64_t page,
                                       int kv_dt, int64_t keys, int64_t dim, const sight *seen,
                                       float root, float *scores) {
    if (D) dim = D;
    for (int64_t first = 0, i = 0; first < keys; first += page, i++) {
        int64_t n = keys - first < page ? keys - first : page;
        const void *k = pages[i];
        for (int64_t s = 0; s < n; s++) {
            if (!sees(seen, first + s)) {
                scores[first + s] = -INFINITY;
                continue;
            }
            __m512 acc = _mm512_setzero_ps();
            for (int64_t d = 0; d < dim; d += 16)
                acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), load16_f32(k, kv_dt, s * dim + d), acc);
            scores[first + s] = _mm512_reduce_add_ps(acc) / root;
        }
    }
}

AVX512 static void key_scores_avx512(const float *q, const char *const *pages, int64_t page, int kv_dt,
                                     int64_t keys, int64_t dim, const sight *seen, float root,
                                     float *scores) {
    if (dim == 64) key_scores_avx512_d(64, q, pages, page, kv_dt, keys, dim, seen, root, scores);
    else key_scores_avx512_d(0, q, pages, page, kv_dt, keys, dim, seen, root, scores);
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

AVX512_INLINE void weighted_values_avx512_d(const int D, const float *p, const char *const *pages,
                                            int64_t page, int kv_dt, int64_t keys, int64_t dim, float *acc) {
    if (D) { /* the row's sums stay in registers, across pages */
        __m512 sums[16];
        for (int i = 0; i < D / 16; i++) sums[i] = _mm512_setzero_ps();
        for (int64_t first = 0, j = 0; first < keys; first += page, j++) {
            int64_t n = keys - first < page ? keys - first : page;
            const void *v = pages[j];
            for (int64_t s = 0; s < n; s++) {
                if (p[first + s] == 0.0f) continue;
                __m512 ps = _mm512_set1_ps(p[first + s]);
                for (int i = 0; i < D / 16; i++) sums[i] = _mm512_fmadd_ps(ps, load16_f32(v, kv_dt, s * D + 16 * i), sums[i]);
            }
        }
        for (int i = 0; i < D / 16; i++) _mm512_storeu_ps(acc + 16 * i, _mm512_add_ps(_mm512_loadu_ps(acc + 16 * i), sums[i]));
        return;
    }
    for (int64_t first = 0, j = 0; first < keys; first += page, j++) {
        int64_t n = keys - first < page ? keys - first : page;
        const void *v = pages[j];
        for (int64_t s = 0; s < n; s++) {
            if (p[first + s] == 0.0f) continue;
            __m512 ps = _mm512_set1_ps(p[first + s]);
            for (int64_t d = 0; d < dim; d += 16)
                _mm512_storeu_ps(acc + d, _mm512_fmadd_ps(ps, load16_f32(v, kv_dt, s * dim + d), _mm512_loadu_ps(acc + d)));
        }
    }
}

AVX512 static void weighted_values_avx512(const float *p, const char *const *pages, int64_t page, int kv_dt,
                                          int64_t keys, int64_t dim, float *acc) {
    if (dim == 64) weighted_values_avx512_d(64, p, pages, page, kv_dt, keys, dim, acc);
    else weighted_values_avx512_d(0, p, pages, page, kv_dt, keys, dim, acc);
}

/* Pages covering an attention's keys: the cache's blocks, or the whole contiguous cache as one. */
static int64_t page_count(const attention *a) {
    return a->k_pages ? (a->keys + a->page - 1) / a->page : 1;
}

/* One query row of sink_attention. work: room for keys + 2·dim floats, then 2 · page_count pointers. */
static void attend_row(const attention *a, const attention_steps *steps, int64_t b, int64_t h, int64_t t,
                       float *work) {
    int64_t D = a->dim, S = a->keys, kh = h / (a->heads / a->kv_heads), n = page_count(a);
    size_t q_size = a->q_dt == BF16 ? 2 : 4, kv_size = a->kv_dt == BF16 ? 2 : 4;
    float *scores = work, *q = work + S, *acc = work + S + D;
    const char **kp = (const char **)(work + S + 2 * D), **vp = kp + n;
    load_row((const char *)a->q + ((b * a->heads + h) * a->tokens + t) * D * q_size, a->q_dt, D, q);
    int64_t page = S;
    if (a->k_pages) {
        page = a->page;
        size_t head = kh * page * D * kv_size;
        for (int64_t i = 0; i < n; i++) {
            kp[i] = (const char *)(intptr_t)a->k_pages[b * a->pages + i] + head;
            vp[i] = (const char *)(intptr_t)a->v_pages[b * a->pages + i] + head;
        }
    } else {
        int64_t offset = (b * a->kv_batch_stride + kh * a->kv_head_stride) * kv_size;
        kp[0] = (const char *)a->k + offset;
        vp[0] = (const char *)a->v + offset;
    }
    sight seen = sight_of(a, b, t);
    steps->scores(q, kp, page, a->kv_dt, S, D, &seen, sqrtf((float)D), scores);
    steps->softmax(scores, S, a->sinks[h], a->kv_dt == BF16);
    for (int64_t d = 0; d < D; d++) acc[d] = 0.0f;
    steps->weighted(scores, vp, page, a->kv_dt, S, D, acc);
    char *out = (char *)a->out + ((b * a->heads + h) * a->tokens + t) * D * kv_size;
    for (int64_t d = 0; d < D; d++) store_val(out, a->kv_dt, d, acc[d]);
}

/* ------------------------------------------------- bf16 attention in tiles (AVX-512 BF16)
 * With bf16 queries, keys and values (the model's dtype) the query heads that share a key/value
 * head are taken together, with up to QUERY_TOKENS tokens of them (one "unit": G·Tq query rows),
 * against the keys in tiles of 32 positions: a tile of keys is transposed once in registers so that
 * one vector holds a pair of dimensions of 16 keys, and every row of the unit multiplies it with
 * vdpbf16ps (exact bf16 products, fp32 sums); the values of a tile are laid out once as pairs of
 * positions and every row's probabilities (already rounded to bf16, as the reference rounds them)
 * weight them the same way. Per row the steps stay those of attend_row: all its scores, then the
 * softmax beside the sink (softmax_avx512, the same lanes), then the weighted values, so there is no
 * (T, S) score matrix (a unit holds G·Tq rows of scores) and no online rescaling, and a row's numbers
 * do not depend on the unit it is in, the batch beside it or the paging of the cache: its sums run
 * over its key positions in order, tiles fixed at multiples of 32 from position 0. Keys a row may
 * not see outside the span of its first and last visible key are skipped whole (they add exact
 * zeros). */
#define KEY_TILE 32
#define UNIT_SCORES (1 << 18) /* score floats a unit may hold (1 MiB): the tokens a unit takes */
/* ... but at least this many tokens (while the unit's rows allow): every unit reads its head's keys
 * and values once, so past 8k keys (a 20b head's 8 MiB at 32k) fewer, larger units read less than
 * score rows kept in L2 save (benchmarks/NOTES.md, issue 33). */
#define UNIT_MIN_TOKENS 4
#define UNIT_ROWS 64

/* Where key positions [s0, s0 + n) of the unit's head lie: pages of `page` positions (rows of D
 * bf16), one division for the run. */
INLINE void kv_rows(const char *const *pages, int64_t page, int64_t D, int64_t s0, int64_t n,
                    const uint16_t **rows) {
    int64_t i = s0 / page, o = s0 % page;
    for (int64_t j = 0; j < n; j++) {
        rows[j] = (const uint16_t *)pages[i] + o * D;
        if (++o == page) i++, o = 0;
    }
}

/* The rows of the next tile, asked for into L2 while this one is multiplied: a decode step reads
 * every key and value once, from DRAM, and a tile's rows lie in one or two blocks of the cache,
 * whose 4 KiB pages the hardware prefetchers do not cross. Into L1, or further ahead, measured
 * slower (benchmarks/NOTES.md, issue 33). */
INLINE void prefetch_tile(const char *const *pages, int64_t page, int64_t D, int64_t s0, int64_t last) {
    const uint16_t *rows[KEY_TILE];
    int64_t n = last - s0 < KEY_TILE ? last - s0 : KEY_TILE;
    if (n <= 0) return;
    kv_rows(pages, page, D, s0, n, rows);
    for (int64_t j = 0; j < n; j++)
        for (int64_t b = 0; b < D * 2; b += 64) _mm_prefetch((const char *)rows[j] + b, _MM_HINT_T1);
}

/* Keys at rows[0 .. n), n ≤ 16, as D/2 vectors: kt[j] holds dimensions 2j, 2j+1 of each key
 * (zeros past n). */
AVX512BF16_INLINE void key_tile(const uint16_t *const *rows, int64_t D, int64_t n, __m512i *kt) {
    for (int64_t c = 0; c < D / 32; c++) {
        __m512i r[16];
        for (int i = 0; i < 16; i++)
            r[i] = i < n ? _mm512_loadu_si512(rows[i] + 32 * c) : _mm512_setzero_si512();
        transpose16(r);
        for (int i = 0; i < 16; i++) kt[16 * c + i] = r[i];
    }
}

/* Scores of N rows (their queries as D/2 bf16 pairs) against the two halves of a key tile, divided
 * by root, -inf for the keys a row does not see (bit j of seen[r] clear for key s0 + j); into score
 * rows at the tile's positions. */
AVX512BF16_INLINE void tile_scores(const int N, const uint32_t *const *q, const uint32_t *seen,
                                   float *const *scores, const __m512i *kt, int64_t D, int64_t s0,
                                   int64_t n, float root) {
    __m512 acc[2][8];
    for (int r = 0; r < N; r++) acc[0][r] = acc[1][r] = _mm512_setzero_ps();
    const __m512i *kt1 = kt + D / 2;
    for (int64_t j = 0; j < D / 2; j++) {
        __m512bh k0 = as_bh(kt[j]), k1 = as_bh(kt1[j]);
#pragma GCC unroll 8
        for (int r = 0; r < N; r++) {
            __m512bh b = as_bh(_mm512_set1_epi32((int)q[r][j]));
            acc[0][r] = _mm512_dpbf16_ps(acc[0][r], k0, b);
            acc[1][r] = _mm512_dpbf16_ps(acc[1][r], k1, b);
        }
    }
    const __m512 none = _mm512_set1_ps(-INFINITY), div = _mm512_set1_ps(root);
    for (int r = 0; r < N; r++)
        for (int h = 0; h < 2 && 16 * h < n; h++) {
            int64_t m = n - 16 * h >= 16 ? 16 : n - 16 * h;
            __mmask16 live = (__mmask16)((1u << m) - 1);
            __mmask16 visible = (__mmask16)(seen[r] >> (16 * h)) & live;
            __m512 v = _mm512_mask_div_ps(none, visible, acc[h][r], div);
            _mm512_mask_storeu_ps(scores[r] + s0 + 16 * h, live, v);
        }
}

/* acc[r] (D fp32) += Σ p[r][s] · v[s] over a tile's position pairs: vp[i · D/16 + c] holds
 * dimensions 16c .. 16c+15 of positions 2i (low words) and 2i+1 (high words), pp[r][i] row r's two
 * bf16 probabilities of pair i. Two column chunks at a time: 2·N independent sums hide the latency
 * of vdpbf16ps and share each broadcast probability. */
AVX512BF16_INLINE void tile_values(const int N, const __m512i *vp, const uint32_t (*pp)[KEY_TILE / 2],
                                   float *const *acc, int64_t D, int64_t pairs) {
    const int64_t C = D / 16;
    for (int64_t c = 0; c < C; c += 2) {
        __m512 sum[2][8];
        for (int r = 0; r < N; r++) {
            sum[0][r] = _mm512_loadu_ps(acc[r] + 16 * c);
            sum[1][r] = _mm512_loadu_ps(acc[r] + 16 * c + 16);
        }
        for (int64_t i = 0; i < pairs; i++) {
            __m512bh v0 = as_bh(vp[i * C + c]), v1 = as_bh(vp[i * C + c + 1]);
#pragma GCC unroll 8
            for (int r = 0; r < N; r++) {
                __m512bh p = as_bh(_mm512_set1_epi32((int)pp[r][i]));
                sum[0][r] = _mm512_dpbf16_ps(sum[0][r], v0, p);
                sum[1][r] = _mm512_dpbf16_ps(sum[1][r], v1, p);
            }
        }
        for (int r = 0; r < N; r++) {
            _mm512_storeu_ps(acc[r] + 16 * c, sum[0][r]);
            _mm512_storeu_ps(acc[r] + 16 * c + 16, sum[1][r]);
        }
    }
}

/* The first and one past the last of `keys` keys a query sees ([0, 0) for none). A full layer's
 * keys (positions 0 .. keys-1) give it by arithmetic, every key between the two seen; explicit
 * positions (a sliding layer's ring, then a chunk's new keys: a few hundred) are scanned, once per
 * query token against the G·D multiply-adds per key of its heads' scores. */
static void visible_span(const sight *v, int64_t keys, int64_t *lo, int64_t *hi) {
    int64_t a = 0, b = keys;
    if (!v->keys) {
        a = v->window > v->q ? 0 : v->q - v->window + 1;
        b = v->q < keys ? v->q + 1 : keys;
    } else {
        while (a < keys && !sees(v, a)) a++;
        while (b > a && !sees(v, b - 1)) b--;
    }
    *lo = a < b ? a : 0, *hi = a < b ? b : 0;
}

/* Which of a tile's keys [s0, s0 + n) a query with span [lo, hi) sees: bit j for key s0 + j. All
 * of the span for a full layer's keys; explicit positions compared 8 at a time. */
AVX512BF16_INLINE uint32_t tile_sight(const sight *v, int64_t lo, int64_t hi, int64_t s0, int64_t n) {
    int64_t a = lo > s0 ? lo : s0, b = hi < s0 + n ? hi : s0 + n;
    if (a >= b) return 0;
    uint32_t span = (uint32_t)(((1ull << (b - a)) - 1) << (a - s0));
    if (!v->keys) return span;
    const __m512i q = _mm512_set1_epi64(v->q), window = _mm512_set1_epi64(v->window);
    const __m512i zero = _mm512_setzero_si512();
    uint32_t bits = 0;
    for (int64_t i = 0; i < n; i += 8) {
        __mmask8 live = n - i >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << (n - i)) - 1);
        __m512i p = _mm512_maskz_loadu_epi64(live, v->keys + s0 + i), d = _mm512_sub_epi64(q, p);
        __mmask8 ok = _mm512_mask_cmpge_epi64_mask(live, p, zero);
        ok = _mm512_mask_cmpge_epi64_mask(ok, d, zero);
        ok = _mm512_mask_cmplt_epi64_mask(ok, d, window);
        bits |= (uint32_t)ok << i;
    }
    return bits & span;
}

/* Work of one thread: scores UNIT_SCORES floats and more (see tiled_work_size). */
typedef struct {
    float *scores, *acc;
    uint32_t (*pp)[KEY_TILE / 2];
    __m512i *kt, *vp;
    const char **kp, **vpages;
} tile_work;

static size_t tiled_work_size(const attention *a, int64_t rows) {
    return sizeof(float) * rows * (a->keys + a->dim) + sizeof(uint32_t) * rows * KEY_TILE / 2 +
           64 * (a->dim + KEY_TILE / 2 * a->dim / 16) + 2 * sizeof(char *) * page_count(a) + 64;
}

static void tiled_work_layout(const attention *a, int64_t rows, void *base, tile_work *w) {
    char *p = (char *)(((uintptr_t)base + 63) & ~(uintptr_t)63);
    w->kt = (__m512i *)p, p += 64 * a->dim;
    w->vp = (__m512i *)p, p += 64 * KEY_TILE / 2 * (a->dim / 16);
    w->scores = (float *)p, p += sizeof(float) * rows * a->keys;
    w->acc = (float *)p, p += sizeof(float) * rows * a->dim;
    w->pp = (uint32_t (*)[KEY_TILE / 2])p, p += sizeof(uint32_t) * rows * KEY_TILE / 2;
    w->kp = (const char **)p, w->vpages = w->kp + page_count(a);
}

/* Query tokens [t0, t0 + tq) of the heads sharing key/value head kh of batch row b. */
AVX512BF16 static void attend_unit(const attention *a, int64_t b, int64_t kh, int64_t t0, int64_t tq,
                                   const tile_work *w) {
    int64_t D = a->dim, S = a->keys, G = a->heads / a->kv_heads, R = G * tq, n = page_count(a);
    int64_t page = S;
    if (a->k_pages) {
        page = a->page;
        size_t head = kh * page * D * 2;
        for (int64_t i = 0; i < n; i++) {
            w->kp[i] = (const char *)(intptr_t)a->k_pages[b * a->pages + i] + head;
            w->vpages[i] = (const char *)(intptr_t)a->v_pages[b * a->pages + i] + head;
        }
    } else {
        int64_t offset = (b * a->kv_batch_stride + kh * a->kv_head_stride) * 2;
        w->kp[0] = (const char *)a->k + offset;
        w->vpages[0] = (const char *)a->v + offset;
    }
    /* rows r = tt·G + g: query head kh·G + g at token t0 + tt */
    const uint32_t *q[UNIT_ROWS];
    sight seen[UNIT_ROWS];
    uint32_t bits[UNIT_ROWS];
    float *scores[UNIT_ROWS], *acc[UNIT_ROWS];
    int64_t lo[UNIT_ROWS], hi[UNIT_ROWS], first = S, last = 0;
    for (int64_t r = 0; r < R; r++) {
        int64_t t = t0 + r / G, h = kh * G + r % G;
        q[r] = (const uint32_t *)a->q + ((b * a->heads + h) * a->tokens + t) * D / 2;
        seen[r] = sight_of(a, b, t);
        scores[r] = w->scores + r * S;
        acc[r] = w->acc + r * D;
        if (r % G == 0) visible_span(&seen[r], S, &lo[r], &hi[r]);
        else lo[r] = lo[r - 1], hi[r] = hi[r - 1];
        if (lo[r] < hi[r]) first = lo[r] < first ? lo[r] : first, last = hi[r] > last ? hi[r] : last;
        for (int64_t d = 0; d < D; d++) acc[r][d] = 0.0f;
    }
    first -= first % KEY_TILE;
    const uint16_t *rows[KEY_TILE];
    float root = sqrtf((float)D);
    for (int64_t s0 = first; s0 < last; s0 += KEY_TILE) {
        int64_t m = last - s0 < KEY_TILE ? last - s0 : KEY_TILE;
        prefetch_tile(w->kp, page, D, s0 + KEY_TILE, last);
        kv_rows(w->kp, page, D, s0, m, rows);
        key_tile(rows, D, m < 16 ? m : 16, w->kt);
        key_tile(rows + 16, D, m > 16 ? m - 16 : 0, w->kt + D / 2);
        for (int64_t r = 0; r < R; r += G) { /* (the heads of a token see alike) */
            uint32_t b = tile_sight(&seen[r], lo[r], hi[r], s0, m);
            for (int64_t g = 0; g < G; g++) bits[r + g] = b;
        }
        for (int64_t r = 0; r < R; r += 8) {
#define SCORES(N) tile_scores(N, q + r, bits + r, scores + r, w->kt, D, s0, m, root)
            SWITCH_ROWS(R - r < 8 ? R - r : 8, SCORES);
#undef SCORES
        }
    }
    for (int64_t r = 0; r < R; r++) { /* the softmax over 16-aligned spans: the lanes of the whole row */
        int64_t from = lo[r] - lo[r] % 16;
        softmax_avx512(scores[r] + from, hi[r] - from, a->sinks[kh * G + r % G], 1);
        lo[r] = from;
    }
    for (int64_t s0 = first; s0 < last; s0 += KEY_TILE) {
        int64_t m = last - s0 < KEY_TILE ? last - s0 : KEY_TILE, pairs = (m + 1) / 2;
        prefetch_tile(w->vpages, page, D, s0 + KEY_TILE, last);
        kv_rows(w->vpages, page, D, s0, m, rows);
        for (int64_t i = 0; i < pairs; i++) {
            const uint16_t *v0 = rows[2 * i], *v1 = 2 * i + 1 < m ? rows[2 * i + 1] : NULL;
            for (int64_t c = 0; c < D / 16; c++) {
                __m512i low = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(v0 + 16 * c)));
                __m512i high = v1 ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(v1 + 16 * c)))
                                  : _mm512_setzero_si512();
                w->vp[i * (D / 16) + c] = _mm512_or_si512(low, _mm512_slli_epi32(high, 16));
            }
        }
        for (int64_t r = 0; r < R; r++) { /* probabilities outside the row's span are zeros */
            int64_t a0 = lo[r] > s0 ? lo[r] : s0, a1 = hi[r] < s0 + m ? hi[r] : s0 + m;
            uint32_t live = a0 < a1 ? (uint32_t)(((1ull << (a1 - a0)) - 1) << (a0 - s0)) : 0;
            __m512 p0 = _mm512_maskz_loadu_ps((__mmask16)live, scores[r] + s0);
            __m512 p1 = _mm512_maskz_loadu_ps((__mmask16)(live >> 16), scores[r] + s0 + 16);
            /* (exact: the probabilities are bf16 values already) */
            _mm512_storeu_si512(w->pp[r], _mm512_castps_si512((__m512)_mm512_cvtne2ps_pbh(p1, p0)));
        }
        for (int64_t r = 0; r < R; r += 8) {
#define VALUES(N) tile_values(N, w->vp, w->pp + r, acc + r, D, pairs)
            SWITCH_ROWS(R - r < 8 ? R - r : 8, VALUES);
#undef VALUES
        }
    }
    for (int64_t r = 0; r < R; r++) {
        int64_t t = t0 + r / G, h = kh * G + r % G;
        uint16_t *out = (uint16_t *)a->out + ((b * a->heads + h) * a->tokens + t) * D;
        for (int64_t d = 0; d < D; d++) out[d] = f32_to_bf16(acc[r][d]);
    }
}

/* Whether the tiled kernel serves an attention: bf16 throughout, a head of whole 32-dim chunks. */
static int tiled(const attention *a) {
    return active_isa >= ISA_AVX512BF16 && a->q_dt == BF16 && a->kv_dt == BF16 && a->dim % 32 == 0 &&
           a->dim <= 256 && a->heads / a->kv_heads <= UNIT_ROWS;
}

static int tiled_attention(const attention *a) {
    int64_t G = a->heads / a->kv_heads;
    int64_t tq = UNIT_SCORES / (G * a->keys);
    tq = tq < UNIT_MIN_TOKENS ? UNIT_MIN_TOKENS : tq;
    tq = tq > UNIT_ROWS / G ? UNIT_ROWS / G : tq;
    tq = tq > a->tokens ? a->tokens : tq;
    int64_t blocks = (a->tokens + tq - 1) / tq, units = a->batch * a->kv_heads * blocks;
    size_t work_size = tiled_work_size(a, G * tq);
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel if (a->batch * a->heads * a->tokens * a->keys * a->dim > 1 << 15)
#endif
    {
        void *base = malloc(work_size);
        tile_work w;
        if (!base) failed = 1;
        else tiled_work_layout(a, G * tq, base, &w);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t u = 0; u < units; u++) {
            if (!base) continue;
            int64_t blk = u % blocks, kh = u / blocks % a->kv_heads, b = u / blocks / a->kv_heads;
            int64_t t0 = blk * tq;
            attend_unit(a, b, kh, t0, a->tokens - t0 < tq ? a->tokens - t0 : tq, &w);
        }
        free(base);
    }
    return failed ? -1 : 0;
}

/* 0, or -1 when memory ran out. Query rows go to threads once there is enough work: from ~32K
 * multiply-adds a product, which puts a 20b decode step over a few hundred keys on every thread
 * (benchmarks/NOTES.md). */
int sink_attention(const attention *a) {
    if (tiled(a)) return tiled_attention(a);
    int64_t rows = a->batch * a->heads * a->tokens;
    static const attention_steps portable = {key_scores_c, softmax_c, weighted_values_c};
    static const attention_steps avx512 = {key_scores_avx512, softmax_avx512, weighted_values_avx512};
    const attention_steps *steps = active_isa >= ISA_AVX512 && a->dim % 16 == 0 && a->dim <= 256 ? &avx512 : &portable;
    size_t work_size = sizeof(float) * (a->keys + 2 * a->dim) + 2 * sizeof(char *) * page_count(a);
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel if (rows * a->keys * a->dim > 1 << 15)
#endif
    {
        float *work = malloc(work_size);
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

/* The NeoX "halves" rotation of rows x (tokens, heads, dim) in place: with (a, b) the values i and
 * i + dim/2 of a head, a·cos - b·sin and b·cos + a·sin, each product rounded to fp32 before the sum
 * as the reference's separate operators do (this file is compiled without contraction into fused
 * multiply-adds, -std=c11), then to x's dtype. cos, sin: fp32 (tokens, dim/2). */
void rotary(void *x, int dt, int64_t tokens, int64_t heads, int64_t dim, const float *cos,
            const float *sin) {
    int64_t half = dim / 2;
#ifdef _OPENMP
#pragma omp parallel for if (tokens * heads * dim > 262144)
#endif
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

/* ------------------------------------------------------------- a block's decode step, attention half */
/* Everything a block's decode step does before its experts, in one call: RMSNorm, the q, k and v
 * projections, the rotary embedding of q and k, the write of k and v into the KV cache, the sink
 * attention over the cache, the o projection and the residual add, the second RMSNorm and the
 * router's logits. The same kernels in the same order as the separate calls (so the same bits); what
 * one call saves is the Python and PyTorch between them, which at batch 1 costs more than the small
 * kernels themselves: every layer's weight reads have evicted the interpreter's objects from the
 * caches by the time the next layer's glue touches them. The weights and sizes, fixed for a block,
 * go into an attention_plan once (`attention_plan`); a step passes only what changes. */

/* y (n, out) = x @ w^T + bias in dt: matmul_many's STORE epilogue. */
static int project(const weights *w, const void *bias, int bias_dt, const void *x, int dt, int64_t n, void *y) {
    epilogue e = {.n = n, .bias = bias, .bias_dt = bias_dt, .mode = STORE, .y = y, .y_dt = dt, .y_stride = w->out};
    return matmul_many(w, &e, 1, x, dt);
}

/* attention_step: x (batch, width) in dt, one token a row; cos, sin fp32 (batch, dim/2) of each row's
 * position; the layer's paged cache in dt (k_pages, v_pages (batch, pages) block addresses, each block
 * (kv_heads, page, dim)), row b's new k and v written at position slots[b], the queries (at positions
 * q_pos (batch,)) attending their first `keys` positions, which they see as `attention` says
 * (k_pos (batch, keys) or NULL, window). Out, in dt: rows =
 * x + o(attention), h = RMSNorm2(rows), logits = router(h). 0, or -1 when memory ran out. */
int attention_step(const attention_plan *p, const void *x, int dt, int64_t batch, const float *cos,
                   const float *sin, const int64_t *k_pages, const int64_t *v_pages, int64_t pages,
                   int64_t page, const int64_t *slots, int64_t keys, const int64_t *q_pos,
                   const int64_t *k_pos, int64_t window, void *rows, void *h, void *logits) {
    size_t size = dt == BF16 ? 2 : 4;
    int64_t W = p->width, H = p->heads, KV = p->kv_heads, D = p->dim;
    int64_t width[5] = {W, H * D, KV * D, KV * D, H * D}; /* normed x, q, k, v, attention out */
    int64_t total = 0;
    for (int i = 0; i < 5; i++) total += width[i];
    char *scratch = malloc(size * batch * (total + W)), *buf[6];
    if (!scratch) return -1;
    buf[0] = scratch;
    for (int i = 1; i < 6; i++) buf[i] = buf[i - 1] + size * batch * width[i - 1];
    char *normed = buf[0], *q = buf[1], *k = buf[2], *v = buf[3], *out = buf[4], *o = buf[5];
    attention a = {.batch = batch, .heads = H, .kv_heads = KV, .tokens = 1, .keys = keys, .dim = D,
                   .q = q, .q_dt = dt, .k_pages = k_pages, .v_pages = v_pages, .pages = pages,
                   .page = page, .kv_dt = dt, .q_pos = q_pos, .k_pos = k_pos, .window = window,
                   .sinks = p->sinks, .out = out};
    epilogue e[3];
    for (int i = 0; i < 3; i++)
        e[i] = (epilogue){.n = batch, .bias = p->bias[i], .bias_dt = p->bias_dt[i], .mode = STORE,
                          .y = buf[i + 1], .y_dt = dt, .y_stride = p->qkv[i].out};
    int status;
    rms_norm(x, dt, batch, W, p->norm_w[0], p->norm_dt[0], p->eps[0], normed);
    status = matmul_many(p->qkv, e, 3, normed, dt);
    if (!status) { /* (the cache is written only once q, k and v are there) */
        rotary(q, dt, batch, H, D, cos, sin);
        rotary(k, dt, batch, KV, D, cos, sin);
        for (int64_t b = 0; b < batch; b++) {
            int64_t block = b * pages + slots[b] / page;
            char *ck = (char *)(intptr_t)k_pages[block], *cv = (char *)(intptr_t)v_pages[block];
            for (int64_t j = 0; j < KV; j++) {
                size_t from = (b * KV + j) * D * size, to = (j * page + slots[b] % page) * D * size;
                memcpy(ck + to, k + from, D * size);
                memcpy(cv + to, v + from, D * size);
            }
        }
        status = sink_attention(&a);
    }
    if (!status) status = project(&p->o, p->bias[3], p->bias_dt[3], out, dt, batch, o);
    if (!status) {
        for (int64_t i = 0; i < batch * W; i++) /* one rounding of the fp32 sum, as PyTorch adds */
            store_val(rows, dt, i, load_val(x, dt, i) + load_val(o, dt, i));
        rms_norm(rows, dt, batch, W, p->norm_w[1], p->norm_dt[1], p->eps[1], h);
        status = project(&p->router, p->bias[4], p->bias_dt[4], h, dt, batch, logits);
    }
    free(scratch);
    return status;
}
