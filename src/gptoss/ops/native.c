/*
 * Native CPU kernels for the two reads that decide decode speed: MXFP4 expert weights and
 * bf16 / int8 dense weights, multiplied by a few fp32 activation rows.
 *
 * Why by hand: PyTorch has no packed-4-bit matmul, and its bf16 matvec reaches about half the
 * memory bandwidth on these machines. Each kernel streams its weight matrix once per call, however
 * many activation rows (up to MAX_ROWS) it serves, with the rows split across OpenMP threads.
 *
 * The module takes plain buffer addresses (Python ints from Tensor.data_ptr()) and sizes, so it
 * builds with nothing but a C compiler and Python's headers. AVX-512 and AVX2 paths are compiled
 * side by side with target attributes and chosen at run time; a portable C path covers the rest.
 * Accumulation is fp32 throughout, like PyTorch's reference.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_ROWS 8 /* activation rows per call: decode batches; prefill takes the GEMM path */
#define BLOCK 32   /* MXFP4 values per block (16 bytes + 1 scale byte) */

static const float FP4_VALUES[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                                     -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
static float SCALES[256]; /* 2^(s - 127) for every scale byte */

static inline float bf16_to_f32(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* ------------------------------------------------------------------ portable C */
static void mxfp4_rows_c(const float *x, int64_t n, int64_t in, const uint8_t *blocks,
                         const uint8_t *scales, int64_t r0, int64_t r1, float *y, int64_t out) {
    int64_t groups = in / BLOCK;
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
            y[t * out + r] = acc;
        }
    }
}

static void bf16_rows_c(const float *x, int64_t n, int64_t in, const uint16_t *w, int64_t r0,
                        int64_t r1, float *y, int64_t out) {
    for (int64_t r = r0; r < r1; r++)
        for (int64_t t = 0; t < n; t++) {
            float acc = 0.0f;
            for (int64_t i = 0; i < in; i++) acc += bf16_to_f32(w[r * in + i]) * x[t * in + i];
            y[t * out + r] = acc;
        }
}

static void int8_rows_c(const float *x, int64_t n, int64_t in, const int8_t *w, const float *wscale,
                        int64_t r0, int64_t r1, float *y, int64_t out) {
    for (int64_t r = r0; r < r1; r++)
        for (int64_t t = 0; t < n; t++) {
            float acc = 0.0f;
            for (int64_t i = 0; i < in; i++) acc += (float)w[r * in + i] * x[t * in + i];
            y[t * out + r] = acc * wscale[r];
        }
}

/* ------------------------------------------------------------------ AVX-512 */
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,fma")))

AVX512 static inline float hsum512(__m512 v) { return _mm512_reduce_add_ps(v); }

/* x is pre-split per block into the 16 even-indexed then the 16 odd-indexed values (see
 * split_even_odd), so that a block's low nibbles multiply the first half and its high nibbles the
 * second: no byte interleaving in the inner loop. vpermps reads only the low 4 bits of each index,
 * so the low nibble needs no mask. */
AVX512 static void mxfp4_rows_avx512(const float *x, int64_t n, int64_t in, const uint8_t *blocks,
                                     const uint8_t *scales, int64_t r0, int64_t r1, float *y,
                                     int64_t out) {
    const __m512 table = _mm512_loadu_ps(FP4_VALUES);
    int64_t groups = in / BLOCK;
    for (int64_t r = r0; r < r1; r++) {
        __m512 acc[MAX_ROWS], acc2[MAX_ROWS];
        for (int64_t t = 0; t < n; t++) acc[t] = acc2[t] = _mm512_setzero_ps();
        const uint8_t *rb = blocks + r * groups * 16;
        const uint8_t *rs = scales + r * groups;
        for (int64_t g = 0; g < groups; g++) {
            __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(rb + g * 16)));
            __m512 w_even = _mm512_permutexvar_ps(codes, table);
            __m512 w_odd = _mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), table);
            __m512 scale = _mm512_set1_ps(SCALES[rs[g]]);
            for (int64_t t = 0; t < n; t++) {
                /* each block's partial dot is its own short chain, so blocks overlap; two
                 * accumulators alternate so that consecutive blocks do not wait on each other */
                const float *xg = x + t * in + g * BLOCK;
                __m512 part = _mm512_mul_ps(w_even, _mm512_loadu_ps(xg));
                part = _mm512_fmadd_ps(w_odd, _mm512_loadu_ps(xg + 16), part);
                if (g & 1) acc2[t] = _mm512_fmadd_ps(part, scale, acc2[t]);
                else acc[t] = _mm512_fmadd_ps(part, scale, acc[t]);
            }
        }
        for (int64_t t = 0; t < n; t++) y[t * out + r] = hsum512(_mm512_add_ps(acc[t], acc2[t]));
    }
}

AVX512 static void bf16_rows_avx512(const float *x, int64_t n, int64_t in, const uint16_t *w,
                                    int64_t r0, int64_t r1, float *y, int64_t out) {
    int64_t pair_end = in - in % 32;
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *wr = w + r * in;
        __m512 acc[MAX_ROWS], acc2[MAX_ROWS];
        for (int64_t t = 0; t < n; t++) acc[t] = acc2[t] = _mm512_setzero_ps();
        for (int64_t i = 0; i < pair_end; i += 32) {
            __m512i raw = _mm512_loadu_si512((const void *)(wr + i));
            /* bf16 → fp32 is a 16-bit left shift: even halves by shifting, odd ones by masking */
            __m512 w_lo = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
            __m512 w_hi = _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(0xFFFF0000)));
            for (int64_t t = 0; t < n; t++) {
                acc[t] = _mm512_fmadd_ps(w_lo, _mm512_loadu_ps(x + t * in + i), acc[t]);
                acc2[t] = _mm512_fmadd_ps(w_hi, _mm512_loadu_ps(x + t * in + i + 16), acc2[t]);
            }
        }
        for (int64_t t = 0; t < n; t++) {
            float s = hsum512(_mm512_add_ps(acc[t], acc2[t]));
            for (int64_t i = pair_end; i < in; i++) s += bf16_to_f32(wr[i]) * x[t * in + i];
            y[t * out + r] = s;
        }
    }
}

AVX512 static void int8_rows_avx512(const float *x, int64_t n, int64_t in, const int8_t *w,
                                    const float *wscale, int64_t r0, int64_t r1, float *y,
                                    int64_t out) {
    int64_t vec_end = in - in % 16;
    __mmask16 tail = (__mmask16)((1u << (in % 16)) - 1);
    for (int64_t r = r0; r < r1; r++) {
        const int8_t *wr = w + r * in;
        __m512 acc[MAX_ROWS];
        for (int64_t t = 0; t < n; t++) acc[t] = _mm512_setzero_ps();
        for (int64_t i = 0; i <= vec_end; i += 16) {
            __m128i raw = i < vec_end ? _mm_loadu_si128((const __m128i *)(wr + i))
                                      : _mm_maskz_loadu_epi8(tail, wr + i);
            __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
            for (int64_t t = 0; t < n; t++) {
                __m512 xv = i < vec_end ? _mm512_loadu_ps(x + t * in + i)
                                        : _mm512_maskz_loadu_ps(tail, x + t * in + i);
                acc[t] = _mm512_fmadd_ps(wv, xv, acc[t]);
            }
        }
        for (int64_t t = 0; t < n; t++) y[t * out + r] = hsum512(acc[t]) * wscale[r];
    }
}

/* ------------------------------------------------------------------ AVX2 */
#define AVX2 __attribute__((target("avx2,fma")))

AVX2 static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AVX2 static void mxfp4_rows_avx2(const float *x, int64_t n, int64_t in, const uint8_t *blocks,
                                 const uint8_t *scales, int64_t r0, int64_t r1, float *y,
                                 int64_t out) {
    const __m256 magnitudes = _mm256_loadu_ps(FP4_VALUES); /* codes 0-7; bit 3 is the sign */
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m256i seven = _mm256_set1_epi32(7);
    int64_t groups = in / BLOCK;
    for (int64_t r = r0; r < r1; r++) {
        __m256 acc[MAX_ROWS];
        for (int64_t t = 0; t < n; t++) acc[t] = _mm256_setzero_ps();
        const uint8_t *rb = blocks + r * groups * 16;
        const uint8_t *rs = scales + r * groups;
        for (int64_t g = 0; g < groups; g++) {
            __m128i packed = _mm_loadu_si128((const __m128i *)(rb + g * 16));
            __m128i lo = _mm_and_si128(packed, low4);
            __m128i hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low4);
            __m128i codes[2] = {_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi)};
            __m256 scale = _mm256_set1_ps(SCALES[rs[g]]);
            __m256 w[4];
            for (int q = 0; q < 4; q++) {
                __m128i c8 = q % 2 ? _mm_srli_si128(codes[q / 2], 8) : codes[q / 2];
                __m256i c = _mm256_cvtepu8_epi32(c8);
                __m256 mag = _mm256_permutevar8x32_ps(magnitudes, _mm256_and_si256(c, seven));
                __m256i sign = _mm256_slli_epi32(_mm256_srli_epi32(c, 3), 31);
                w[q] = _mm256_xor_ps(mag, _mm256_castsi256_ps(sign));
            }
            for (int64_t t = 0; t < n; t++) {
                const float *xg = x + t * in + g * BLOCK;
                __m256 part = _mm256_mul_ps(w[0], _mm256_loadu_ps(xg));
                for (int q = 1; q < 4; q++) part = _mm256_fmadd_ps(w[q], _mm256_loadu_ps(xg + 8 * q), part);
                acc[t] = _mm256_fmadd_ps(part, scale, acc[t]);
            }
        }
        for (int64_t t = 0; t < n; t++) y[t * out + r] = hsum256(acc[t]);
    }
}

AVX2 static void bf16_rows_avx2(const float *x, int64_t n, int64_t in, const uint16_t *w,
                                int64_t r0, int64_t r1, float *y, int64_t out) {
    int64_t vec_end = in - in % 8;
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *wr = w + r * in;
        __m256 acc[MAX_ROWS];
        for (int64_t t = 0; t < n; t++) acc[t] = _mm256_setzero_ps();
        for (int64_t i = 0; i < vec_end; i += 8) {
            __m128i raw = _mm_loadu_si128((const __m128i *)(wr + i));
            __m256 wv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
            for (int64_t t = 0; t < n; t++)
                acc[t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * in + i), acc[t]);
        }
        for (int64_t t = 0; t < n; t++) {
            float s = hsum256(acc[t]);
            for (int64_t i = vec_end; i < in; i++) s += bf16_to_f32(wr[i]) * x[t * in + i];
            y[t * out + r] = s;
        }
    }
}

AVX2 static void int8_rows_avx2(const float *x, int64_t n, int64_t in, const int8_t *w,
                                const float *wscale, int64_t r0, int64_t r1, float *y, int64_t out) {
    int64_t vec_end = in - in % 8;
    for (int64_t r = r0; r < r1; r++) {
        const int8_t *wr = w + r * in;
        __m256 acc[MAX_ROWS];
        for (int64_t t = 0; t < n; t++) acc[t] = _mm256_setzero_ps();
        for (int64_t i = 0; i < vec_end; i += 8) {
            __m128i raw = _mm_loadl_epi64((const __m128i *)(wr + i));
            __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
            for (int64_t t = 0; t < n; t++)
                acc[t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * in + i), acc[t]);
        }
        for (int64_t t = 0; t < n; t++) {
            float s = hsum256(acc[t]);
            for (int64_t i = vec_end; i < in; i++) s += (float)wr[i] * x[t * in + i];
            y[t * out + r] = s * wscale[r];
        }
    }
}

/* ------------------------------------------------------------------ dispatch */
enum isa { ISA_C = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
static enum isa active_isa = ISA_C;
static const char *ISA_NAMES[] = {"c", "avx2", "avx512"};

/* Rows of the output split evenly across threads; each thread streams its own slice of W. */
#ifdef _OPENMP
#define FOR_ROW_SLICES(out, body)                                                      \
    _Pragma("omp parallel") {                                                          \
        int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();                 \
        int64_t r0 = (out) * id / nt, r1 = (out) * (id + 1) / nt;                      \
        body;                                                                          \
    }
#else
#define FOR_ROW_SLICES(out, body) \
    {                             \
        int64_t r0 = 0, r1 = (out); \
        body;                     \
    }
#endif

/* A copy of x (n, in) where each full group of 32 holds its 16 even-indexed values, then its 16
 * odd-indexed ones (the order the AVX-512 kernels decode weights in); a tail stays as it is. */
static float *split_even_odd(const float *x, int64_t n, int64_t in) {
    float *split = malloc(sizeof(float) * n * in);
    if (!split) return NULL;
    int64_t full = in - in % BLOCK;
    for (int64_t t = 0; t < n; t++) {
        const float *src = x + t * in;
        float *dst = split + t * in;
        for (int64_t g = 0; g < full; g += BLOCK)
            for (int j = 0; j < BLOCK / 2; j++) {
                dst[g + j] = src[g + 2 * j];
                dst[g + BLOCK / 2 + j] = src[g + 2 * j + 1];
            }
        memcpy(dst + full, src + full, sizeof(float) * (in - full));
    }
    return split;
}

static void add_bias(float *y, int64_t n, int64_t out, const float *bias) {
    if (!bias) return;
    for (int64_t t = 0; t < n; t++)
        for (int64_t r = 0; r < out; r++) y[t * out + r] += bias[r];
}

static int check_rows(int64_t n) {
    if (n < 1 || n > MAX_ROWS) {
        PyErr_Format(PyExc_ValueError, "native kernels take 1..%d activation rows, got %lld",
                     MAX_ROWS, (long long)n);
        return 0;
    }
    return 1;
}

/* mxfp4_matmul(x, n, in, blocks, scales, out, bias, y): y[n, out] = x[n, in] @ dequant(W)^T + bias */
static PyObject *py_mxfp4_matmul(PyObject *self, PyObject *args) {
    unsigned long long xp, bp, sp, biasp, yp;
    long long n, in, out;
    if (!PyArg_ParseTuple(args, "KLLKKLKK", &xp, &n, &in, &bp, &sp, &out, &biasp, &yp)) return NULL;
    if (!check_rows(n)) return NULL;
    if (in % BLOCK) return PyErr_Format(PyExc_ValueError, "in (%lld) must be a multiple of 32", in);
    const float *x = (const float *)xp;
    const uint8_t *blocks = (const uint8_t *)bp, *scales = (const uint8_t *)sp;
    float *y = (float *)yp;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS;
    float *xs = NULL;
    switch (active_isa) {
    case ISA_AVX512:
        if (!(xs = split_even_odd(x, n, in))) break;
        FOR_ROW_SLICES(out, mxfp4_rows_avx512(xs, n, in, blocks, scales, r0, r1, y, out));
        break;
    case ISA_AVX2:
        FOR_ROW_SLICES(out, mxfp4_rows_avx2(x, n, in, blocks, scales, r0, r1, y, out));
        break;
    default:
        FOR_ROW_SLICES(out, mxfp4_rows_c(x, n, in, blocks, scales, r0, r1, y, out));
    }
    add_bias(y, n, out, (const float *)biasp);
    failed = active_isa == ISA_AVX512 && !xs;
    free(xs);
    Py_END_ALLOW_THREADS;
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* bf16_matmul(x, n, in, w, out, bias, y): y[n, out] = x[n, in] @ W[out, in]^T + bias */
static PyObject *py_bf16_matmul(PyObject *self, PyObject *args) {
    unsigned long long xp, wp, biasp, yp;
    long long n, in, out;
    if (!PyArg_ParseTuple(args, "KLLKLKK", &xp, &n, &in, &wp, &out, &biasp, &yp)) return NULL;
    if (!check_rows(n)) return NULL;
    const float *x = (const float *)xp;
    const uint16_t *w = (const uint16_t *)wp;
    float *y = (float *)yp;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS;
    float *xs = NULL;
    switch (active_isa) {
    case ISA_AVX512:
        if (!(xs = split_even_odd(x, n, in))) break;
        FOR_ROW_SLICES(out, bf16_rows_avx512(xs, n, in, w, r0, r1, y, out));
        break;
    case ISA_AVX2:
        FOR_ROW_SLICES(out, bf16_rows_avx2(x, n, in, w, r0, r1, y, out));
        break;
    default:
        FOR_ROW_SLICES(out, bf16_rows_c(x, n, in, w, r0, r1, y, out));
    }
    add_bias(y, n, out, (const float *)biasp);
    failed = active_isa == ISA_AVX512 && !xs;
    free(xs);
    Py_END_ALLOW_THREADS;
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* int8_matmul(x, n, in, w, wscale, out, bias, y): y = x @ (W[out, in] * wscale[out, None])^T + bias */
static PyObject *py_int8_matmul(PyObject *self, PyObject *args) {
    unsigned long long xp, wp, wsp, biasp, yp;
    long long n, in, out;
    if (!PyArg_ParseTuple(args, "KLLKKLKK", &xp, &n, &in, &wp, &wsp, &out, &biasp, &yp)) return NULL;
    if (!check_rows(n)) return NULL;
    const float *x = (const float *)xp, *wscale = (const float *)wsp;
    const int8_t *w = (const int8_t *)wp;
    float *y = (float *)yp;
    Py_BEGIN_ALLOW_THREADS;
    switch (active_isa) {
    case ISA_AVX512:
        FOR_ROW_SLICES(out, int8_rows_avx512(x, n, in, w, wscale, r0, r1, y, out));
        break;
    case ISA_AVX2:
        FOR_ROW_SLICES(out, int8_rows_avx2(x, n, in, w, wscale, r0, r1, y, out));
        break;
    default:
        FOR_ROW_SLICES(out, int8_rows_c(x, n, in, w, wscale, r0, r1, y, out));
    }
    add_bias(y, n, out, (const float *)biasp);
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}

/* set_isa(name) -> name actually in use: lets tests run every path the CPU supports. */
static PyObject *py_set_isa(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    __builtin_cpu_init();
    int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl");
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (!strcmp(name, "best")) active_isa = avx512 ? ISA_AVX512 : avx2 ? ISA_AVX2 : ISA_C;
    else if (!strcmp(name, "avx512") && avx512) active_isa = ISA_AVX512;
    else if (!strcmp(name, "avx2") && avx2) active_isa = ISA_AVX2;
    else if (!strcmp(name, "c")) active_isa = ISA_C;
    else return PyErr_Format(PyExc_ValueError, "instruction set %s is not available here", name);
    return PyUnicode_FromString(ISA_NAMES[active_isa]);
}

static PyObject *py_num_threads(PyObject *self, PyObject *args) {
    int threads = 0;
    if (!PyArg_ParseTuple(args, "|i", &threads)) return NULL;
#ifdef _OPENMP
    if (threads > 0) omp_set_num_threads(threads);
    return PyLong_FromLong(omp_get_max_threads());
#else
    return PyLong_FromLong(1);
#endif
}

static PyMethodDef METHODS[] = {
    {"mxfp4_matmul", py_mxfp4_matmul, METH_VARARGS, "y = x @ dequant(blocks, scales)^T + bias"},
    {"bf16_matmul", py_bf16_matmul, METH_VARARGS, "y = x @ W^T + bias, W bf16"},
    {"int8_matmul", py_int8_matmul, METH_VARARGS, "y = x @ (W * scale)^T + bias, W int8"},
    {"set_isa", py_set_isa, METH_VARARGS, "choose 'best', 'avx512', 'avx2' or 'c'"},
    {"num_threads", py_num_threads, METH_VARARGS, "get (or set) the kernels' thread count"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, METHODS};

PyMODINIT_FUNC PyInit__native(void) {
    for (int s = 0; s < 256; s++) SCALES[s] = ldexpf(1.0f, s - 127);
    PyObject *module = PyModule_Create(&MODULE);
    if (!module) return NULL;
    PyObject *best = Py_BuildValue("(s)", "best");
    PyObject *isa = best ? py_set_isa(NULL, best) : NULL;
    Py_XDECREF(best);
    if (!isa) return NULL;
    Py_DECREF(isa);
    PyModule_AddIntConstant(module, "MAX_ROWS", MAX_ROWS);
    return module;
}
