/* Declarations shared by the native kernels' files: the tables, the description of a kernel call
 * (weights, epilogue), the instruction-set attributes and what each file provides. See api.c for
 * the module and README-style overview of the files. */
#ifndef GPTOSS_NATIVE_COMMON_H
#define GPTOSS_NATIVE_COMMON_H
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* syscall(), as Python.h asks for it in api.c */
#endif
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_ROWS 8 /* activation rows per kernel call; more rows are processed in chunks */
#define BLOCK 32   /* MXFP4 values per block (16 bytes + 1 scale byte) */
#define TILE 32    /* weight rows per unit of work handed to a thread (even: SwiGLU pairs) */
/* Bytes ahead of the MXFP4 and int8 streams that the kernels ask the cache for (MXFP4 scales, 1/16
 * as many bytes, PF_DIST / 16 ahead): the hardware prefetchers alone leave two threads at about 3/4
 * of the read rate this reaches; the more bandwidth, the more bytes must be in flight, hence 8 KiB
 * (benchmarks/NOTES.md, "Prefetch distances"). */
#ifndef PF_DIST
#define PF_DIST 8192
#endif
/* On Intel CPUs the AVX-512 decode kernels ask for their weights into L2 (_MM_HINT_T1), PF_L2_DIST
 * ahead, the bf16 matvec included; on AMD, into L1 PF_DIST ahead (the MXFP4 and int8 kernels; the
 * bf16 matvec keeps up without with 1-2 rows, and with 3-4 asks for them into L2 as on Intel). Each
 * measured best on its vendor's machines (benchmarks/NOTES.md). */
#define PF_L2_DIST 16384
extern int prefetch_to_l2; /* set at import: whether the CPU is Intel's */
#define PREFETCH_WEIGHTS(p)                                                                        \
    (prefetch_to_l2 ? _mm_prefetch((const char *)(p) + PF_L2_DIST, _MM_HINT_T1)                    \
                    : _mm_prefetch((const char *)(p) + PF_DIST, _MM_HINT_T0))
#define PREFETCH_SCALES(p) /* MXFP4 scales: 1/16 as far */                                        \
    (prefetch_to_l2 ? _mm_prefetch((const char *)(p) + PF_L2_DIST / 16, _MM_HINT_T1)               \
                    : _mm_prefetch((const char *)(p) + PF_DIST / 16, _MM_HINT_T0))
#define INLINE static inline __attribute__((always_inline))

enum dtype { F32 = 0, BF16 = 1 };
enum kind { MXFP4 = 0, BF16W = 1, INT8W = 2 };

static const float FP4_VALUES[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                                     -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
extern float SCALES[256];       /* 2^(s - 127) for every scale byte */
extern float SCALES_TOP[256];   /* 2^(s - 152) (s >= 3): the AVX2 kernel's scale, see mxfp4_avx2_block */
extern float SCALES_HALF[256];  /* 2^(s - 128): the scale of twice the FP4 values, see mxfp4_i16_avx2 */
extern int16_t EXP_SHIFT[256];  /* (s - 127) << 7: added to a bf16 it multiplies by 2^(s - 127) */
extern uint16_t FP4_BF16[32]; /* the table as bf16 bits, twice: entry k is code k & 15 */

static inline float bf16_to_f32(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as PyTorch does */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7FFFFFFF) > 0x7F800000) return (uint16_t)((bits >> 16) | 0x40); /* quiet NaN */
    return (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

static inline float load_val(const void *p, int dt, int64_t i) {
    return dt == BF16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store_val(void *p, int dt, int64_t i, float v) {
    if (dt == BF16) ((uint16_t *)p)[i] = f32_to_bf16(v);
    else ((float *)p)[i] = v;
}

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* ------------------------------------------------------------------ what a kernel reads and writes */
typedef struct {
    int kind;
    const void *w;      /* MXFP4: blocks (out, in/32, 16); BF16W: (out, in) bf16; INT8W: (out, in) */
    const void *scales; /* MXFP4: (out, in/32) exponent bytes; INT8W: (out,) fp32; else unused */
    int64_t out, in;
} weights;

/* How a kernel wants its activation rows: bf16 as given; fp32 as given; fp32 with each group of 32
 * holding its 16 even-indexed values, then its 16 odd-indexed ones (a tail as it is); bf16 in the
 * order in which mxfp4_quads decodes weights: each run of 128 values (four groups) as four runs of
 * 32, the values whose index is 0, 1, 2, 3 mod 4 in turn, and a last run of 64 (rows of 64·odd
 * length) in the order of mxfp4_pair: the even-indexed values of its first group, then those of
 * the second, then the odd-indexed ones of each; or, for mxfp4_i16_avx2, every pair of groups as
 * 16-bit block floats, 256 bytes (see write_i16_pairs); or, for int8w_i16_avx512, the row's 16-bit
 * block-float integers, then each group's multiplier (see write_i16_groups). */
enum layout { AS_BF16, AS_F32, AS_F32_SPLIT, AS_BF16_QUADS, AS_I16_PAIRS, AS_I16_GROUPS };

/* Where column c of a row of `width` values lies in `layout`. */
static inline int64_t layout_column(int layout, int64_t c, int64_t width) {
    if (layout == AS_F32_SPLIT) {
        int64_t j = c % BLOCK;
        return c - j + (j % 2 ? BLOCK / 2 + j / 2 : j / 2);
    }
    if (layout == AS_BF16_QUADS && c < width - width % (4 * BLOCK)) {
        int64_t j = c % (4 * BLOCK);
        return c - j + (j % 4) * BLOCK + j / 4;
    }
    if (layout == AS_BF16_QUADS) { /* the last 64 of a row of 64·odd length */
        int64_t j = c % (2 * BLOCK), i = j % BLOCK;
        return c - j + (i % 2) * BLOCK + (j / BLOCK) * (BLOCK / 2) + i / 2;
    }
    return c;
}

/* What happens to the fp32 dot products of one weight row r with the n activation rows: each gets
 * the row's bias, then is stored in y (column r), or, for a gate_up projection, joins its pair in the
 * clamped SwiGLU (column r / 2), or, for an expert's down projection, is weighted and added to the
 * output row of its token (fp32). */
enum mode { STORE, SWIGLU, ACCUMULATE };

typedef struct {
    int64_t n;
    const void *bias; /* (out,) or NULL */
    int bias_dt;
    int mode;
    void *y; /* STORE, SWIGLU: (n, y_stride) in y_dt; ACCUMULATE: fp32 (tokens, y_stride) */
    int y_dt;
    int64_t y_stride;
    int y_layout;        /* SWIGLU: the layout the next kernel reads y in */
    int round_bf16;      /* SWIGLU into fp32: round to bf16 first, as bf16 activations are */
    float alpha, limit;  /* SWIGLU */
    const int64_t *token;  /* ACCUMULATE: the output row of each activation row */
    const float *weight;   /* ACCUMULATE: its routing weight */
} epilogue;

/* The clamped SwiGLU of model.clamped_swiglu for one (gate, linear) pair. */
static inline float swiglu(float gate, float linear, float alpha, float limit) {
    gate = gate < limit ? gate : limit;
    linear = linear < -limit ? -limit : linear > limit ? limit : linear;
    return gate / (1.0f + expf(-alpha * gate)) * (linear + 1.0f);
}

/* gate: the previous (even) row's values, kept by the caller between the two rows of a pair. */
static inline void finish_row(const epilogue *e, int64_t r, const float *sums, float *gate) {
    float b = e->bias ? load_val(e->bias, e->bias_dt, r) : 0.0f;
    for (int64_t t = 0; t < e->n; t++) {
        float v = sums[t] + b;
        if (e->mode == STORE) {
            store_val(e->y, e->y_dt, t * e->y_stride + r, v);
        } else if (e->mode == ACCUMULATE) {
            ((float *)e->y)[e->token[t] * e->y_stride + r] += e->weight[t] * v;
        } else if (r % 2 == 0) {
            gate[t] = v;
        } else {
            int64_t c = layout_column(e->y_layout, r / 2, e->y_stride);
            float h = swiglu(gate[t], v, e->alpha, e->limit);
            store_val(e->y, e->y_dt, t * e->y_stride + c, e->round_bf16 ? bf16_to_f32(f32_to_bf16(h)) : h);
        }
    }
}

/* e narrowed to activation rows [t0, t0 + count) of the rows it was made for. */
static inline epilogue rows_epilogue(const epilogue *e, int64_t t0, int64_t count) {
    size_t y_size = e->mode == ACCUMULATE || e->y_dt == F32 ? 4 : 2;
    epilogue rows = *e;
    rows.n = count;
    if (e->mode == ACCUMULATE) {
        rows.token = e->token + t0;
        rows.weight = e->weight + t0;
    } else {
        rows.y = (char *)e->y + t0 * e->y_stride * y_size;
    }
    return rows;
}

/* A kernel: weight rows [r0, r1) against n activation rows x (n, in), in the layout that kernel
 * expects (see write_activations); n is 1..MAX_ROWS except for kernels that takes_all_rows names. */
typedef void (*row_fn)(const void *x, int64_t n, const weights *w, int64_t r0, int64_t r1,
                       const epilogue *e);

#define SWITCH_ROWS(n, BODY)                                                                   \
    switch (n) {                                                                               \
    case 1: BODY(1); break;                                                                    \
    case 2: BODY(2); break;                                                                    \
    case 3: BODY(3); break;                                                                    \
    case 4: BODY(4); break;                                                                    \
    case 5: BODY(5); break;                                                                    \
    case 6: BODY(6); break;                                                                    \
    case 7: BODY(7); break;                                                                    \
    default: BODY(8); break;                                                                   \
    }

/* Memory the kernels read 64 bytes at a time: on a cache line's start, as malloc's 16-byte alignment
 * is not: a load across two lines costs the MXFP4 decode kernel a sixth of its rate from memory. */
static inline void *line_aligned(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

/* ------------------------------------------------------------------ instruction sets */
#define AVX2 __attribute__((target("avx2,fma")))
#define AVX2_INLINE AVX2 INLINE
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define AVX512_INLINE AVX512 INLINE
#define AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512bf16")))
#define AVX512BF16_INLINE AVX512BF16 INLINE
#define AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

/* ISA_AMX: as ISA_AVX512BF16, and an MoE call whose busiest expert has AMX_MIN_TOKENS or more
 * takes mxfp4_amx (moe). */
enum isa { ISA_C = 0, ISA_AVX2 = 1, ISA_AVX512 = 2, ISA_AVX512BF16 = 3, ISA_AMX = 4 };
extern enum isa active_isa;
extern int amx_permitted; /* set at import: Linux lets this process use the tile registers */

/* Weight rows per call in an MoE that takes mxfp4_amx (TILE for the other kernels): the activations
 * are rearranged once per call for all of them. */
#define AMX_ROWS 256
/* The fewest tokens an expert sends through mxfp4_amx; fewer take mxfp4_bf16_avx512 (measured best
 * between 3 and 6, benchmarks/NOTES.md). */
#define AMX_MIN_TOKENS 6
/* The fewest tokens an expert sends through mxfp4_bf16_gemm (AVX-512 BF16 without AMX); fewer take
 * mxfp4_bf16_avx512 (benchmarks/NOTES.md, issue 33). */
#define GEMM_MIN_TOKENS 32

#define QUADS_MAX_ROWS 4 /* activation rows mxfp4_quads_avx512 takes */
#define MAX_MANY 4       /* weights one matmul_many call takes */

/* ------------------------------------------------------------------ the kernels (one file per ISA) */
/* generic.c */
void mxfp4_c(const void *x, int64_t n, const weights *w, int64_t r0, int64_t r1, const epilogue *e);
void bf16w_c(const void *x, int64_t n, const weights *w, int64_t r0, int64_t r1, const epilogue *e);
void int8w_c(const void *x, int64_t n, const weights *w, int64_t r0, int64_t r1, const epilogue *e);
/* avx512.c */
void mxfp4_f32_avx512(const void *x, int64_t n, const weights *w, int64_t r0, int64_t r1, const epilogue *e);
void bf16w_f32_avx512(const void *x, int64_t n, const weights *w, int64_t r0, int64_t r1, const epilogue *e);
void int8w_f32_avx512(const void *x, int64_t n, const weights *w, int64_t r0, int64_t r1, const epilogue *e);
void int8w_i16_avx512(const void *x, int64_t n, const weights *w, int64_t r0, int64_t r1, const epilogue *e);
/* avx512bf16.c */
void mxfp4_bf16_avx512(const void *x, int64_t n, const weights *w, int64_t r0, int64_t r1, const epilogue *e);
void mxfp4_quads_avx512(const void *x, int64_t n, const weights *w, int64_t r0, int64_t r1, const epilogue *e);
void bf16w_bf16_avx512(const void *x, int64_t n, const weights *w, int64_t r0, int64_t r1, const epilogue *e);
void int8w_bf16_avx512(const void *x, int64_t n, const weights *w, int64_t r0, int64_t r1, const epilogue *e);
/* avx2.c */
void mxfp4_f32_avx2(const void *x, int64_t n, const weights *w, int64_t r0, int64_t r1, const epilogue *e);
void mxfp4_i16_avx2(const void *x, int64_t n, const weights *w, int64_t r0, int64_t r1, const epilogue *e);
void bf16w_f32_avx2(const void *x, int64_t n, const weights *w, int64_t r0, int64_t r1, const epilogue *e);
void int8w_f32_avx2(const void *x, int64_t n, const weights *w, int64_t r0, int64_t r1, const epilogue *e);
void mxfp4_f32_avx2_gemm(const void *x, int64_t n, const weights *w, int64_t r0, int64_t r1, const epilogue *e);
void bf16w_f32_avx2_gemm(const void *x, int64_t n, const weights *w, int64_t r0, int64_t r1, const epilogue *e);
void int8w_f32_avx2_gemm(const void *x, int64_t n, const weights *w, int64_t r0, int64_t r1, const epilogue *e);
void write_i16_pairs(const uint16_t *x, int64_t in, uint8_t *dst);
void write_i16_groups(const uint16_t *x, int64_t in, uint8_t *dst);
/* amx.c */
void mxfp4_amx(const void *x, int64_t n, const weights *w, int64_t r0, int64_t r1, const epilogue *e);
/* prompt.c */
void mxfp4_bf16_gemm(const void *x, int64_t n, const weights *w, int64_t r0, int64_t r1, const epilogue *e);

/* ------------------------------------------------------------------ dispatch.c */
void init_tables(void);
int select_isa(const char *name); /* 0, or -1 when that instruction set is not available here */
const char *isa_name(void);
row_fn choose_kernel(int kind, int x_dt, int64_t n, int64_t in, enum layout *layout);
row_fn expert_kernel(row_fn kernel, enum layout *layout, int64_t count, int64_t in);
size_t layout_size(enum layout layout);
void write_activations(const void *x, int x_dt, int64_t in, const int64_t *rows, int64_t n, enum layout layout,
                       void *dst);
void tile_chunks(row_fn kernel, const void *x, size_t x_size, int64_t n, const weights *w, int64_t r0,
                 int64_t r1, const epilogue *e);
int64_t tile_count(int64_t rows, int64_t step);
int matmul_many(const weights *w, const epilogue *e, int count, const void *x, int x_dt);

/* ------------------------------------------------------------------ moe.c */
/* The stacked expert tensors (E experts), as the checkpoint stores them. */
typedef struct {
    int64_t experts, hidden, inter;
    const uint8_t *gate_up_blocks, *gate_up_scales, *down_blocks, *down_scales; /* (E, out, in/32[, 16]) */
    const void *gate_up_bias, *down_bias; /* (E, 2·inter), (E, hidden) */
    int bias_dt;
    float alpha, limit;
} expert_stack;
int moe(const expert_stack *s, const void *x, int dt, int64_t n, int64_t k, const int64_t *idx,
        const void *weight, int weight_dt, void *y);

/* ------------------------------------------------------------------ attention.c */
void rms_norm(const void *x, int dt, int64_t rows, int64_t dim, const void *w, int w_dt, float eps, void *y);
void rotary(void *x, int dt, int64_t tokens, int64_t heads, int64_t dim, const float *cos, const float *sin);
typedef struct {
    int64_t batch, heads, kv_heads, tokens, keys, dim;
    const void *q; /* (batch, heads, tokens, dim) contiguous, q_dt */
    int q_dt;
    const void *k, *v; /* (batch, kv_heads, keys, dim): rows of dim contiguous, kv_dt */
    int64_t kv_batch_stride, kv_head_stride; /* in elements */
    /* Or a paged cache (k_pages not NULL; k, v and the strides unused): row b's keys at positions
     * [i·page, (i+1)·page) lie in the block at byte address k_pages[b·pages + i], laid out
     * (kv_heads, page, dim); the values likewise in v_pages. */
    const int64_t *k_pages, *v_pages;
    int64_t pages, page;
    int kv_dt;
    /* Which keys a query sees, from positions: query t of row b sits at q_pos[b·tokens + t]; key s
     * at k_pos[b·keys + s] (negative: an empty slot), or at position s when k_pos is NULL (a full
     * layer's cache); a query at q sees a key at p >= 0 when 0 <= q - p < window (INT64_MAX: no
     * window). */
    const int64_t *q_pos, *k_pos;
    int64_t window;
    const float *sinks; /* (heads,) */
    void *out;          /* (batch, heads, tokens, dim) in kv_dt */
} attention;
int sink_attention(const attention *a);
/* Everything a block's decode step does before its experts, in one call: RMSNorm, the q, k and v
 * projections, the rotary embedding of q and k, the write of k and v into the KV cache, the sink
 * attention over the cache, the o projection and the residual add, the second RMSNorm and the
 * router's logits. The same kernels in the same order as the separate calls (so the same bits); what
 * one call saves is the Python and PyTorch between them, which at batch 1 costs more than the small
 * kernels themselves: every layer's weight reads have evicted the interpreter's objects from the
 * caches by the time the next layer's glue touches them. The weights and sizes, fixed for a block,
 * go into an attention_plan once (`attention_plan`); a step passes only what changes. */
typedef struct {
    int64_t width, heads, kv_heads, dim;
    const void *norm_w[2];
    int norm_dt[2];
    float eps[2];
    weights qkv[3], o, router; /* o: heads·dim → width; router: width → experts */
    const void *bias[5];       /* q, k, v, o, router: (out,) or NULL */
    int bias_dt[5];
    const float *sinks; /* (heads,) fp32 */
} attention_plan;
int attention_step(const attention_plan *p, const void *x, int dt, int64_t batch, const float *cos,
                   const float *sin, const int64_t *k_pages, const int64_t *v_pages, int64_t pages,
                   int64_t page, const int64_t *slots, int64_t keys, const int64_t *q_pos,
                   const int64_t *k_pos, int64_t window, void *rows, void *h, void *logits);

#endif
