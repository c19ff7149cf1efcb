/* The routed experts of an MoE layer in one call (moe). */
#include "common.h"

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


/* y (n, hidden) = Σ_j weight[t, j] · expert_{idx[t, j]}(x[t]) for every token t, each expert a
 * clamped-SwiGLU MLP. Tokens are grouped by expert (counting sort); each chosen expert's gate_up
 * projection runs with its SwiGLU applied as the sums are made, then one pass over down-projection
 * rows adds every expert's weighted output (fp32) into the token rows. The rows go to threads in
 * runs of tiles (take_run); a run is one thread's, so no two threads write the same output and each
 * output sums its experts in the same order whatever the schedule. A run is walked expert by expert,
 * one sequential stream each, rather than every expert a tile at a time (a jump every 32 rows),
 * which the prefetchers follow better. One parallel region in all. 0, or -1 when memory ran out. */
int moe(const expert_stack *s, const void *x, int dt, int64_t n, int64_t k, const int64_t *idx,
        const void *route_weight, int weight_dt, void *y) {
    size_t bias_size = s->bias_dt == BF16 ? 2 : 4;
    int64_t pairs = n * k, H = s->hidden, I = s->inter, E = s->experts, m = 0, busiest = 0;
    int64_t *start = calloc(E + 1, sizeof(int64_t)), *token = malloc(sizeof(int64_t) * pairs);
    int64_t *active = malloc(sizeof(int64_t) * E);
    row_fn *kernels = malloc(sizeof(row_fn) * E);              /* of active[j], for its token count */
    enum layout *layouts = malloc(sizeof(enum layout) * E); /* of its rows of xs and hs */
    float *weight = malloc(sizeof(float) * pairs), *acc = line_aligned(sizeof(float) * n * H);
    void *xs = NULL, *hs = NULL;
    uint16_t *hb = NULL; /* AS_I16_PAIRS: the hidden activations in bf16, before their layout */
    enum layout layout = AS_F32;
    row_fn kernel = NULL;
    size_t size = 0;
    int64_t step = TILE; /* weight rows a kernel call takes */
    int ok = start && token && active && kernels && layouts && weight && acc;
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
        /* A kernel and layout for both projections (the rows of both must suit it), chosen for
         * the most tokens an expert has: an expert's rows are read for its own tokens only. A batch
         * of 8 decode tokens spread over the experts takes the decode kernel (MoE +20-50% over the
         * prefill kernel), 8 tokens on the same experts the prefill kernel (~1.4x the decode one).
         * Each expert then takes the one for its own count where that differs (expert_kernel); its
         * rows of the activations are laid out for it. */
        int64_t in = s->inter % (2 * BLOCK) == 0 ? s->hidden : s->inter;
        kernel = choose_kernel(MXFP4, dt, busiest, in, &layout);
        if (active_isa == ISA_AMX && kernel == mxfp4_bf16_avx512 && busiest >= AMX_MIN_TOKENS) kernel = mxfp4_amx;
        if (active_isa == ISA_AVX512BF16 && kernel == mxfp4_bf16_avx512 && busiest >= GEMM_MIN_TOKENS)
            kernel = mxfp4_bf16_gemm;
        step = kernel == mxfp4_amx || kernel == mxfp4_bf16_gemm ? AMX_ROWS : TILE;
        size = layout_size(layout); /* (the same for every expert's layout) */
        for (int64_t j = 0; j < m; j++) {
            layouts[j] = layout;
            kernels[j] = expert_kernel(kernel, &layouts[j], start[active[j] + 1] - start[active[j]], in);
        }
        xs = line_aligned(size * pairs * H);
        hs = line_aligned(size * pairs * I);
        if (layout == AS_I16_PAIRS) hb = malloc(sizeof(uint16_t) * pairs * I);
        ok = xs && hs && (layout != AS_I16_PAIRS || hb);
    }
    if (ok) {
        for (int64_t j = 0; j < m; j++) /* each expert's rows as its kernel reads them */
            write_activations(x, dt, H, token + start[active[j]], start[active[j] + 1] - start[active[j]],
                              layouts[j], (char *)xs + start[active[j]] * H * size);
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
                int64_t j = item / gate_up_tiles, e = active[j], tile = item % gate_up_tiles;
                int64_t first = start[e], count = start[e + 1] - first;
                weights w = {MXFP4, s->gate_up_blocks + e * gate_up_blocks * 16,
                             s->gate_up_scales + e * gate_up_blocks, 2 * I, H};
                epilogue ep = {.bias = (const char *)s->gate_up_bias + e * 2 * I * bias_size,
                               .bias_dt = s->bias_dt, .mode = SWIGLU,
                               .y = blocked ? (void *)(hb + first * I) : (char *)hs + first * I * size,
                               .y_dt = blocked || layout_size(layout) == 2 ? BF16 : F32,
                               .y_stride = I, .y_layout = blocked ? AS_BF16 : layouts[j],
                               .round_bf16 = dt == BF16 && layout_size(layout) != 2, .alpha = s->alpha,
                               .limit = s->limit};
                tile_chunks(kernels[j], (const char *)xs + first * H * size, size, count, &w,
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
                        tile_chunks(kernels[j], (const char *)hs + first * I * size, size, count,
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
    free(kernels);
    free(layouts);
    free(weight);
    free(acc);
    free(xs);
    free(hs);
    free(hb);
    return ok ? 0 : -1;
}
