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


/* The three steps of one query row, portable and AVX-512 (dim a multiple of 16): the scores of
 * query q (fp32) against the keys the mask allows (the others -inf); the softmax beside the head's
 * sink, its probabilities rounded to bf16 when the values are bf16 (the reference multiplies in
 * their dtype); and acc = Σ p[s] · v[s], accumulated in fp32. A head's keys and values come in
 * pages of `page` positions, page i at pages[i] (rows of dim): a contiguous cache is one page, a
 * paged one its blocks. Keys are visited in position order whatever the paging, so the sums are
 * the same numbers either way. */
typedef struct {
    void (*scores)(const float *q, const char *const *pages, int64_t page, int kv_dt, int64_t keys,
                   int64_t dim, const uint8_t *mask, float root, float *scores);
    void (*softmax)(float *p, int64_t keys, float sink, int round_bf16);
    void (*weighted)(const float *p, const char *const *pages, int64_t page, int kv_dt, int64_t keys,
                     int64_t dim, float *acc);
} attention_steps;

static void key_scores_c(const float *q, const char *const *pages, int64_t page, int kv_dt, int64_t keys,
                         int64_t dim, const uint8_t *mask, float root, float *scores) {
    for (int64_t first = 0, i = 0; first < keys; first += page, i++) {
        int64_t n = keys - first < page ? keys - first : page;
        for (int64_t s = 0; s < n; s++) {
            float dot = 0.0f;
            for (int64_t d = 0; d < dim && mask[first + s]; d++) dot += q[d] * load_val(pages[i], kv_dt, s * dim + d);
            scores[first + s] = mask[first + s] ? dot / root : -INFINITY;
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
                                       int kv_dt, int64_t keys, int64_t dim, const uint8_t *mask,
                                       float root, float *scores) {
    if (D) dim = D;
    for (int64_t first = 0, i = 0; first < keys; first += page, i++) {
        int64_t n = keys - first < page ? keys - first : page;
        const void *k = pages[i];
        for (int64_t s = 0; s < n; s++) {
            if (!mask[first + s]) {
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
                                     int64_t keys, int64_t dim, const uint8_t *mask, float root,
                                     float *scores) {
    if (dim == 64) key_scores_avx512_d(64, q, pages, page, kv_dt, keys, dim, mask, root, scores);
    else key_scores_avx512_d(0, q, pages, page, kv_dt, keys, dim, mask, root, scores);
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
    const uint8_t *mask = a->mask + ((a->mask_batch > 1 ? b : 0) * a->tokens + t) * S;
    steps->scores(q, kp, page, a->kv_dt, S, D, mask, sqrtf((float)D), scores);
    steps->softmax(scores, S, a->sinks[h], a->kv_dt == BF16);
    for (int64_t d = 0; d < D; d++) acc[d] = 0.0f;
    steps->weighted(scores, vp, page, a->kv_dt, S, D, acc);
    char *out = (char *)a->out + ((b * a->heads + h) * a->tokens + t) * D * kv_size;
    for (int64_t d = 0; d < D; d++) store_val(out, a->kv_dt, d, acc[d]);
}

/* 0, or -1 when memory ran out. Query rows go to threads once there is enough work: from ~32K
 * multiply-adds a product, which puts a 20b decode step over a few hundred keys on every thread
 * (benchmarks/NOTES.md). */
int sink_attention(const attention *a) {
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
 * (kv_heads, page, dim)), row b's new k and v written at position slots[b], the queries attending
 * their first `keys` positions under mask (mask_batch, 1, 1, keys). Out, in dt: rows =
 * x + o(attention), h = RMSNorm2(rows), logits = router(h). 0, or -1 when memory ran out. */
int attention_step(const attention_plan *p, const void *x, int dt, int64_t batch, const float *cos,
                   const float *sin, const int64_t *k_pages, const int64_t *v_pages, int64_t pages,
                   int64_t page, const int64_t *slots, int64_t keys, const uint8_t *mask, int64_t mask_batch,
                   void *rows, void *h, void *logits) {
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
                   .page = page, .kv_dt = dt, .mask = mask, .mask_batch = mask_batch, .sinks = p->sinks,
                   .out = out};
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
