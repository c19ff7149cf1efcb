/* Which kernel serves a call (the active instruction set, the weight kind, the activations' dtype
 * and row count), the activations laid out as it reads them, and the weight tiles spread over the
 * threads. Also the tables and the instruction-set choice made at import. */
#include "common.h"
#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>
#define ARCH_REQ_XCOMP_PERM 0x1023 /* arch_prctl: ask for an extended state component */
#define XFEATURE_XTILEDATA 18      /* the AMX tile data */
#endif

int prefetch_to_l2, amx_permitted;
static const char *ISA_NAMES[] = {"c", "avx2", "avx512", "avx512bf16", "amx"};
float SCALES[256], SCALES_TOP[256], SCALES_HALF[256];
int16_t EXP_SHIFT[256];
uint16_t FP4_BF16[32];

/* The tables and what this CPU and Linux allow, once at import. */
void init_tables(void) {
    for (int s = 0; s < 256; s++) {
        SCALES[s] = ldexpf(1.0f, s - 127);
        SCALES_TOP[s] = ldexpf(1.0f, s - 152);
        SCALES_HALF[s] = ldexpf(1.0f, s - 128);
        EXP_SHIFT[s] = (int16_t)((s - 127) * 128);
    }
    for (int k = 0; k < 32; k++) FP4_BF16[k] = f32_to_bf16(FP4_VALUES[k & 15]);
    __builtin_cpu_init();
    prefetch_to_l2 = __builtin_cpu_is("intel");
#ifdef __linux__
    amx_permitted = __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
                    syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#endif
}

/* Make `name` ('best', 'amx', 'avx512bf16', 'avx512', 'avx2' or 'c') the active instruction set:
 * 0, or -1 when this CPU lacks it. */
int select_isa(const char *name) {
    __builtin_cpu_init();
    int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    int avx512bf16 = avx512 && __builtin_cpu_supports("avx512bf16");
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    int amx = avx512bf16 && amx_permitted;
    if (!strcmp(name, "best"))
        active_isa = amx ? ISA_AMX : avx512bf16 ? ISA_AVX512BF16 : avx512 ? ISA_AVX512 : avx2 ? ISA_AVX2 : ISA_C;
    else if (!strcmp(name, "amx") && amx) active_isa = ISA_AMX;
    else if (!strcmp(name, "avx512bf16") && avx512bf16) active_isa = ISA_AVX512BF16;
    else if (!strcmp(name, "avx512") && avx512) active_isa = ISA_AVX512;
    else if (!strcmp(name, "avx2") && avx2) active_isa = ISA_AVX2;
    else if (!strcmp(name, "c")) active_isa = ISA_C;
    else return -1;
    return 0;
}

const char *isa_name(void) { return ISA_NAMES[active_isa]; }

/* The kernel for an expert's `count` tokens in an MoE call that chose `kernel` and `layout` for its
 * busiest expert, and the layout it reads (*layout, updated): the prompt kernel decodes a tile for
 * its rows whatever their number, and below MAX_ROWS + 1 the chunked kernel (same activation layout)
 * is faster; with bf16 activations an expert of up to QUADS_MAX_ROWS tokens takes the four-block
 * decode kernel, as it would alone (a batch of decode steps spreads its rows over the experts: most
 * get 1-3 while the busiest gets more; benchmarks/NOTES.md). `in`: as choose_kernel's, for the
 * rows of both projections. */
row_fn expert_kernel(row_fn kernel, enum layout *layout, int64_t count, int64_t in) {
    if (*layout == AS_BF16 && count <= QUADS_MAX_ROWS) {
        enum layout few;
        row_fn decode = choose_kernel(MXFP4, BF16, count, in, &few);
        if (decode == mxfp4_quads_avx512) {
            *layout = few;
            return decode;
        }
    }
    if (kernel == mxfp4_amx && count < AMX_MIN_TOKENS) return mxfp4_bf16_avx512;
    if (kernel == mxfp4_bf16_gemm && count < GEMM_MIN_TOKENS) return mxfp4_bf16_avx512;
    return kernel == mxfp4_f32_avx2_gemm && count <= MAX_ROWS ? mxfp4_f32_avx2 : kernel;
}

/* Whether kernel takes all of a call's activation rows at once rather than MAX_ROWS at a time. */
static int takes_all_rows(row_fn kernel) {
    return kernel == mxfp4_f32_avx2_gemm || kernel == bf16w_f32_avx2_gemm || kernel == int8w_f32_avx2_gemm ||
           kernel == mxfp4_amx || kernel == mxfp4_bf16_gemm;
}

/* ------------------------------------------------------------------ dispatch */
enum isa active_isa = ISA_C;

/* The kernel for a weight kind and activation dtype on the active ISA, and the layout it wants
 * its activations in, for n activation rows of length `in`. */
row_fn choose_kernel(int kind, int x_dt, int64_t n, int64_t in, enum layout *layout) {
    if (active_isa >= ISA_AVX512BF16 && x_dt == BF16 && kind == MXFP4 && in % (2 * BLOCK) == 0 && n <= QUADS_MAX_ROWS) {
        *layout = AS_BF16_QUADS;
        return mxfp4_quads_avx512;
    }
    if (active_isa >= ISA_AVX512 && x_dt == BF16 && kind == INT8W && in % BLOCK == 0) {
        *layout = AS_I16_GROUPS;
        return int8w_i16_avx512;
    }
    if (active_isa >= ISA_AVX512BF16 && x_dt == BF16) {
        *layout = AS_BF16;
        return kind == MXFP4 ? mxfp4_bf16_avx512 : kind == BF16W ? bf16w_bf16_avx512 : int8w_bf16_avx512;
    }
    if (active_isa >= ISA_AVX512) {
        *layout = kind == INT8W ? AS_F32 : AS_F32_SPLIT;
        return kind == MXFP4 ? mxfp4_f32_avx512 : kind == BF16W ? bf16w_f32_avx512 : int8w_f32_avx512;
    }
    if (active_isa == ISA_AVX2 && kind == MXFP4 && x_dt == BF16 && n == 1 && in % (2 * BLOCK) == 0) {
        *layout = AS_I16_PAIRS;
        return mxfp4_i16_avx2;
    }
    if (active_isa == ISA_AVX2) {
        *layout = kind == INT8W ? AS_F32 : AS_F32_SPLIT;
        if (n > MAX_ROWS) return kind == MXFP4 ? mxfp4_f32_avx2_gemm : kind == BF16W ? bf16w_f32_avx2_gemm : int8w_f32_avx2_gemm;
        if (kind == MXFP4) return mxfp4_f32_avx2;
        return kind == BF16W ? bf16w_f32_avx2 : int8w_f32_avx2;
    }
    *layout = AS_F32;
    return kind == MXFP4 ? mxfp4_c : kind == BF16W ? bf16w_c : int8w_c;
}

size_t layout_size(enum layout layout) { return layout == AS_BF16 || layout == AS_BF16_QUADS ? 2 : 4; }

/* Rows rows[0..n) of x (dtype x_dt, row length in; rows NULL: 0..n) into dst in `layout`. */
void write_activations(const void *x, int x_dt, int64_t in, const int64_t *rows, int64_t n,
                              enum layout layout, void *dst) {
    for (int64_t t = 0; t < n; t++) {
        int64_t base = (rows ? rows[t] : t) * in;
        if (layout == AS_I16_PAIRS) { /* bf16 input too */
            write_i16_pairs((const uint16_t *)x + base, in, (uint8_t *)dst + t * in * 4);
            continue;
        }
        if (layout == AS_I16_GROUPS) { /* bf16 input too */
            write_i16_groups((const uint16_t *)x + base, in, (uint8_t *)dst + t * in * 4);
            continue;
        }
        if (layout == AS_BF16) { /* only chosen for bf16 input */
            memcpy((uint16_t *)dst + t * in, (const uint16_t *)x + base, 2 * in);
            continue;
        }
        if (layout == AS_BF16_QUADS) { /* bf16 input too */
            for (int64_t i = 0; i < in; i++)
                ((uint16_t *)dst)[t * in + layout_column(layout, i, in)] = ((const uint16_t *)x)[base + i];
            continue;
        }
        float *out = (float *)dst + t * in;
        int64_t full = layout == AS_F32_SPLIT ? in - in % BLOCK : 0;
        for (int64_t g = 0; g < full; g += BLOCK)
            for (int j = 0; j < BLOCK / 2; j++) {
                out[g + j] = load_val(x, x_dt, base + g + 2 * j);
                out[g + BLOCK / 2 + j] = load_val(x, x_dt, base + g + 2 * j + 1);
            }
        for (int64_t i = full; i < in; i++) out[i] = load_val(x, x_dt, base + i);
    }
}

/* Weight rows [r0, r1) against every chunk of MAX_ROWS of the n activation rows x (in `layout`), or
 * all n at once for a kernel that takes_all_rows: the tile is read from memory once and from cache
 * for the other chunks. */
void tile_chunks(row_fn kernel, const void *x, size_t x_size, int64_t n, const weights *w,
                        int64_t r0, int64_t r1, const epilogue *e) {
    int64_t step = takes_all_rows(kernel) ? n : MAX_ROWS;
    for (int64_t t0 = 0; t0 < n; t0 += step) {
        epilogue chunk = rows_epilogue(e, t0, min64(step, n - t0));
        kernel((const char *)x + t0 * w->in * x_size, chunk.n, w, r0, r1, &chunk);
    }
}

int64_t tile_count(int64_t rows, int64_t step) { return (rows + step - 1) / step; }

/* y_i = epilogue_i(x @ W_i^T) for n rows, for `count` weights of one kind and row length that read
 * the same activations (a layer's q, k and v projections): the activations are laid out once and
 * the tiles of all the weights share one parallel region, so a decode step pays one fork and join
 * for the three. 0 on success, -1 when memory ran out. Weight tiles go to threads (guided, see the
 * top of the file). */
int matmul_many(const weights *w, const epilogue *e, int count, const void *x, int x_dt) {
    enum layout layout;
    row_fn kernel = choose_kernel(w[0].kind, x_dt, e[0].n, w[0].in, &layout);
    void *owned = NULL;
    const void *xa = x;
    if (!(layout == AS_BF16 || (layout == AS_F32 && x_dt == F32))) { /* rearranged or converted */
        if (!(owned = line_aligned(layout_size(layout) * e[0].n * w[0].in))) return -1;
        write_activations(x, x_dt, w[0].in, NULL, e[0].n, layout, owned);
        xa = owned;
    }
    int64_t first[MAX_MANY + 1] = {0}; /* weight i's tiles are first[i] .. first[i + 1] - 1 */
    for (int i = 0; i < count; i++) first[i + 1] = first[i] + tile_count(w[i].out, TILE);
#ifdef _OPENMP
#pragma omp parallel for schedule(guided)
#endif
    for (int64_t tile = 0; tile < first[count]; tile++) {
        int i = 0;
        while (tile >= first[i + 1]) i++;
        int64_t r0 = (tile - first[i]) * TILE;
        tile_chunks(kernel, xa, layout_size(layout), e[i].n, &w[i], r0, min64(w[i].out, r0 + TILE), &e[i]);
    }
    free(owned);
    return 0;
}
