/*
 * Native CPU kernels for the reads that decide CPU speed: MXFP4 expert weights and bf16 / int8
 * dense weights, multiplied by fp32 or bf16 activation rows.
 *
 * Why by hand: PyTorch has no packed-4-bit matmul, and its bf16 matvec reaches about half the
 * memory bandwidth on these machines. Each kernel streams a tile of weight rows once per chunk of
 * up to MAX_ROWS activation rows. Tiles go to OpenMP threads with a guided schedule: long runs of
 * neighbouring tiles first (one sequential stream per thread, which the hardware prefetchers follow
 * best: up to 1.4x the read rate of tile-by-tile handing out here), then smaller runs, so that a
 * thread another job slows down still takes less of the work.
 *
 * The module takes plain buffer addresses (Python ints from Tensor.data_ptr()), sizes and dtype
 * codes, so it builds with nothing but a C compiler and Python's headers. This file is that
 * binding, and nothing else: it checks the arguments and calls the kernels, without the GIL. AVX-512 (with or without
 * BF16 dot products) and AVX2 paths are compiled side by side with target attributes and chosen at
 * run time, AMX tiles for a prompt's experts where Linux grants them; a portable C path covers the
 * rest. Accumulation is fp32 throughout, like PyTorch's, except that one bf16 row against MXFP4
 * weights on AVX2, and bf16 rows against int8 weights on AVX-512, sum each block exactly in
 * integers after rounding the rows to 16-bit block floats (mxfp4_i16_avx2, int8w_i16_avx512).
 *
 * Row counts 1..MAX_ROWS are compile-time constants inside each kernel (one specialisation per
 * count), so the accumulators stay in registers.
 *
 * An MoE layer's experts run in one call (moe): tokens grouped by expert, each chosen expert's
 * gate_up projection with the bias and clamped SwiGLU applied to the sums as they are made, then
 * the down projections summing every expert's weighted output into the token rows. Prefill goes
 * the same way: many tokens per expert are chunks of MAX_ROWS against a weight tile in cache (on
 * AVX2, all of them at once against a tile decoded a column chunk at a time: avx2_gemm). With
 * bf16 activations that is as fast as PyTorch's bf16 GEMM alone at a 128-token prompt's ~16 tokens
 * per expert, before any dequantization is paid for. Where the CPU has AMX tiles, a prompt's
 * experts decode their weights to bf16 tiles and multiply them on AMX (mxfp4_amx); with AVX-512 BF16
 * and no AMX, an expert's many tokens share one decoding of its rows (mxfp4_bf16_gemm).
 *
 * The files, one concern each (ggml-cpu's shape): common.h (tables, the kernel-call description,
 * declarations), dispatch.c (which kernel serves a call, activation layouts, the threads' tiles),
 * generic.c (portable C, the reference), avx2.c, avx512.c, avx512bf16.c and amx.c (one instruction
 * set each; avx512.h their shared inline helpers), prompt.c (a prompt's experts as a GEMM), moe.c (the routed experts of a layer in one
 * call), attention.c (RMSNorm, rotary, sink attention and a block's attention half of a decode step).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "common.h"

static int check_sizes(long long n, long long in, long long out) {
    if (n < 1 || in < 1 || out < 1) {
        PyErr_Format(PyExc_ValueError, "sizes must be positive, got n=%lld in=%lld out=%lld", n, in, out);
        return 0;
    }
    return 1;
}

static int check_dtypes(int a, int b, int c) {
    if ((a != F32 && a != BF16) || (b != F32 && b != BF16) || (c != F32 && c != BF16)) {
        PyErr_SetString(PyExc_ValueError, "dtype codes are 0 (float32) or 1 (bfloat16)");
        return 0;
    }
    return 1;
}

static PyObject *run_matmul(weights *w, unsigned long long xp, int x_dt, long long n,
                            unsigned long long biasp, int bias_dt, unsigned long long yp, int y_dt) {
    if (!check_sizes(n, w->in, w->out) || !check_dtypes(x_dt, bias_dt, y_dt)) return NULL;
    epilogue e = {.n = n, .bias = (const void *)biasp, .bias_dt = bias_dt, .mode = STORE,
                  .y = (void *)yp, .y_dt = y_dt, .y_stride = w->out};
    int status;
    Py_BEGIN_ALLOW_THREADS;
    status = matmul_many(w, &e, 1, (const void *)xp, x_dt);
    Py_END_ALLOW_THREADS;
    if (status) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* mxfp4_matmul(x, x_dt, n, in, blocks, scales, out, bias, bias_dt, y, y_dt):
 * y[n, out] = x[n, in] @ dequant(blocks, scales)^T + bias */
static PyObject *py_mxfp4_matmul(PyObject *self, PyObject *args) {
    unsigned long long xp, bp, sp, biasp, yp;
    long long n, in, out;
    int x_dt, bias_dt, y_dt;
    if (!PyArg_ParseTuple(args, "KiLLKKLKiKi", &xp, &x_dt, &n, &in, &bp, &sp, &out, &biasp, &bias_dt,
                          &yp, &y_dt))
        return NULL;
    if (in % BLOCK) return PyErr_Format(PyExc_ValueError, "in (%lld) must be a multiple of 32", in);
    weights w = {MXFP4, (const void *)bp, (const void *)sp, out, in};
    return run_matmul(&w, xp, x_dt, n, biasp, bias_dt, yp, y_dt);
}

/* matmul_many(kind, x, x_dt, n, in, [(w, wscale, out, bias, bias_dt, y), ...], y_dt): for each
 * weight, y = x @ W[out, in]^T (int8 kind: times wscale, fp32 per row) + bias; kind 1 (bf16) or 2
 * (int8), up to MAX_MANY weights, in one parallel region. */
static PyObject *py_matmul_many(PyObject *self, PyObject *args) {
    unsigned long long xp;
    long long n, in;
    int kind, x_dt, y_dt;
    PyObject *items;
    if (!PyArg_ParseTuple(args, "iKiLLO!i", &kind, &xp, &x_dt, &n, &in, &PyList_Type, &items, &y_dt)) return NULL;
    Py_ssize_t count = PyList_GET_SIZE(items);
    if (kind != BF16W && kind != INT8W) return PyErr_Format(PyExc_ValueError, "kind is 1 (bf16) or 2 (int8), got %d", kind);
    if (count < 1 || count > MAX_MANY)
        return PyErr_Format(PyExc_ValueError, "1 to %d weights, got %zd", MAX_MANY, count);
    weights w[MAX_MANY];
    epilogue e[MAX_MANY];
    for (Py_ssize_t i = 0; i < count; i++) {
        unsigned long long wp, sp, biasp, yp;
        long long out;
        int bias_dt;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(items, i), "KKLKiK", &wp, &sp, &out, &biasp, &bias_dt, &yp))
            return NULL;
        if (!check_sizes(n, in, out) || !check_dtypes(x_dt, bias_dt, y_dt)) return NULL;
        w[i] = (weights){kind, (const void *)wp, (const void *)sp, out, in};
        e[i] = (epilogue){.n = n, .bias = (const void *)biasp, .bias_dt = bias_dt, .mode = STORE,
                          .y = (void *)yp, .y_dt = y_dt, .y_stride = out};
    }
    int status;
    Py_BEGIN_ALLOW_THREADS;
    status = matmul_many(w, e, (int)count, (const void *)xp, x_dt);
    Py_END_ALLOW_THREADS;
    if (status) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* mxfp4_moe(x, dt, n, k, idx, route_weight, weight_dt, experts, hidden, inter, gate_up_blocks,
 *           gate_up_scales, gate_up_bias, down_blocks, down_scales, down_bias, bias_dt, alpha,
 *           limit, y): x, y (n, hidden) in dt; idx (n, k) int64 expert ids, route_weight (n, k). */
static PyObject *py_mxfp4_moe(PyObject *self, PyObject *args) {
    unsigned long long xp, ip, wp, gbp, gsp, gbiasp, dbp, dsp, dbiasp, yp;
    long long n, k, experts, hidden, inter;
    int dt, weight_dt, bias_dt;
    float alpha, limit;
    if (!PyArg_ParseTuple(args, "KiLLKKiLLLKKKKKKiffK", &xp, &dt, &n, &k, &ip, &wp, &weight_dt, &experts,
                          &hidden, &inter, &gbp, &gsp, &gbiasp, &dbp, &dsp, &dbiasp, &bias_dt, &alpha,
                          &limit, &yp))
        return NULL;
    if (experts < 1) return PyErr_Format(PyExc_ValueError, "no experts");
    if (!check_sizes(n * k, hidden, inter) || !check_dtypes(dt, weight_dt, bias_dt)) return NULL;
    if (hidden % BLOCK || inter % BLOCK)
        return PyErr_Format(PyExc_ValueError, "hidden (%lld) and inter (%lld) must be multiples of 32",
                            hidden, inter);
    const int64_t *idx = (const int64_t *)ip;
    for (int64_t p = 0; p < n * k; p++)
        if (idx[p] < 0 || idx[p] >= experts)
            return PyErr_Format(PyExc_ValueError, "expert index %lld is outside 0..%lld",
                                (long long)idx[p], experts - 1);
    expert_stack s = {experts, hidden, inter, (const uint8_t *)gbp, (const uint8_t *)gsp,
                      (const uint8_t *)dbp, (const uint8_t *)dsp, (const void *)gbiasp,
                      (const void *)dbiasp, bias_dt, alpha, limit};
    int status;
    Py_BEGIN_ALLOW_THREADS;
    status = moe(&s, (const void *)xp, dt, n, k, idx, (const void *)wp, weight_dt, (void *)yp);
    Py_END_ALLOW_THREADS;
    if (status) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* rms_norm(x, dt, rows, dim, w, w_dt, eps, y) */
static PyObject *py_rms_norm(PyObject *self, PyObject *args) {
    unsigned long long xp, wp, yp;
    long long rows, dim;
    int dt, w_dt;
    float eps;
    if (!PyArg_ParseTuple(args, "KiLLKifK", &xp, &dt, &rows, &dim, &wp, &w_dt, &eps, &yp)) return NULL;
    if (!check_sizes(rows, dim, 1) || !check_dtypes(dt, w_dt, dt)) return NULL;
    Py_BEGIN_ALLOW_THREADS;
    rms_norm((const void *)xp, dt, rows, dim, (const void *)wp, w_dt, eps, (void *)yp);
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}


/* rotary(x, dt, tokens, heads, dim, cos, sin): see rotary; dim even. */
static PyObject *py_rotary(PyObject *self, PyObject *args) {
    unsigned long long xp, cp, sp;
    long long tokens, heads, dim;
    int dt;
    if (!PyArg_ParseTuple(args, "KiLLLKK", &xp, &dt, &tokens, &heads, &dim, &cp, &sp)) return NULL;
    if (!check_sizes(tokens, heads, dim) || !check_dtypes(dt, dt, dt)) return NULL;
    if (dim % 2) return PyErr_Format(PyExc_ValueError, "head dim (%lld) must be even", dim);
    rotary((void *)xp, dt, tokens, heads, dim, (const float *)cp, (const float *)sp);
    Py_RETURN_NONE;
}

/* Which keys the queries see (`attention`): q_pos (batch, tokens) int64, k_pos (batch, keys) int64
 * or 0 (key s at position s), window >= 1 (INT64_MAX: none). 1, or 0 with an exception set. */
static int set_sight(attention *a, unsigned long long q_pos, unsigned long long k_pos, long long window) {
    if (!q_pos || window < 1) {
        PyErr_Format(PyExc_ValueError, "attention needs query positions and a window of at least 1, got %lld",
                     window);
        return 0;
    }
    a->q_pos = (const int64_t *)q_pos, a->k_pos = (const int64_t *)k_pos, a->window = window;
    return 1;
}

/* sink_attention(q, q_dt, batch, heads, tokens, dim, k, v, kv_dt, kv_heads, keys, kv_batch_stride,
 *                kv_head_stride, q_pos, k_pos, window, sinks, out) */
static PyObject *py_sink_attention(PyObject *self, PyObject *args) {
    attention a;
    unsigned long long qp, kp, vp, qpos, kpos, sp, op;
    long long batch, heads, tokens, dim, kv_heads, keys, kv_batch_stride, kv_head_stride, window;
    if (!PyArg_ParseTuple(args, "KiLLLLKKiLLLLKKLKK", &qp, &a.q_dt, &batch, &heads, &tokens, &dim, &kp,
                          &vp, &a.kv_dt, &kv_heads, &keys, &kv_batch_stride, &kv_head_stride, &qpos,
                          &kpos, &window, &sp, &op))
        return NULL;
    if (!check_sizes(batch * heads * tokens, dim, keys) || !check_dtypes(a.q_dt, a.kv_dt, F32)) return NULL;
    if (kv_heads < 1 || heads % kv_heads)
        return PyErr_Format(PyExc_ValueError, "%lld query heads cannot share %lld key/value heads",
                            heads, kv_heads);
    if (!set_sight(&a, qpos, kpos, window)) return NULL;
    a.batch = batch, a.heads = heads, a.kv_heads = kv_heads, a.tokens = tokens, a.keys = keys, a.dim = dim;
    a.q = (const void *)qp, a.k = (const void *)kp, a.v = (const void *)vp;
    a.kv_batch_stride = kv_batch_stride, a.kv_head_stride = kv_head_stride;
    a.k_pages = a.v_pages = NULL, a.pages = a.page = 0;
    a.sinks = (const float *)sp;
    a.out = (void *)op;
    int status;
    Py_BEGIN_ALLOW_THREADS;
    status = sink_attention(&a);
    Py_END_ALLOW_THREADS;
    if (status) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* paged_attention(q, q_dt, batch, heads, tokens, dim, k_pages, v_pages, pages, page, kv_dt, kv_heads,
 *                 keys, q_pos, k_pos, window, sinks, out): sink_attention of `tokens` query tokens a row
 * (a decode step's one, or a prompt chunk's) over a cache in blocks of `page` positions, row b's block i at byte addresses k_pages[b·pages + i] and
 * v_pages[...] (int64 (batch, pages)), each (kv_heads, page, dim) in kv_dt. */
static PyObject *py_paged_attention(PyObject *self, PyObject *args) {
    attention a;
    unsigned long long qp, kpp, vpp, qpos, kpos, sp, op;
    long long batch, heads, tokens, dim, pages, page, kv_heads, keys, window;
    if (!PyArg_ParseTuple(args, "KiLLLLKKLLiLLKKLKK", &qp, &a.q_dt, &batch, &heads, &tokens, &dim, &kpp, &vpp,
                          &pages, &page, &a.kv_dt, &kv_heads, &keys, &qpos, &kpos, &window, &sp, &op))
        return NULL;
    if (!check_sizes(batch * heads * tokens, dim, keys) || !check_dtypes(a.q_dt, a.kv_dt, F32)) return NULL;
    if (kv_heads < 1 || heads % kv_heads)
        return PyErr_Format(PyExc_ValueError, "%lld query heads cannot share %lld key/value heads",
                            heads, kv_heads);
    if (page < 1 || pages < 1 || keys > pages * page)
        return PyErr_Format(PyExc_ValueError, "bad paged attention: keys %lld of %lld blocks of %lld", keys,
                            pages, page);
    if (!set_sight(&a, qpos, kpos, window)) return NULL;
    a.batch = batch, a.heads = heads, a.kv_heads = kv_heads, a.tokens = tokens, a.keys = keys, a.dim = dim;
    a.q = (const void *)qp, a.k = a.v = NULL, a.kv_batch_stride = a.kv_head_stride = 0;
    a.k_pages = (const int64_t *)kpp, a.v_pages = (const int64_t *)vpp, a.pages = pages, a.page = page;
    a.sinks = (const float *)sp;
    a.out = (void *)op;
    int status;
    Py_BEGIN_ALLOW_THREADS;
    status = sink_attention(&a);
    Py_END_ALLOW_THREADS;
    if (status) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

#define PLAN_CAPSULE "gptoss.ops._native.attention_plan"

/* (w, wscale, out, bias, bias_dt) of one weight of `kind` reading rows of `in` values. */
static int parse_weight(PyObject *item, int kind, int64_t in, weights *w, const void **bias, int *bias_dt) {
    unsigned long long wp, sp, biasp;
    long long out;
    if (!PyArg_ParseTuple(item, "KKLKi", &wp, &sp, &out, &biasp, bias_dt)) return 0;
    if (!check_sizes(1, in, out) || !check_dtypes(*bias_dt, F32, F32)) return 0;
    *w = (weights){kind, (const void *)wp, (const void *)sp, out, in};
    *bias = (const void *)biasp;
    return 1;
}

static void free_plan(PyObject *capsule) { free(PyCapsule_GetPointer(capsule, PLAN_CAPSULE)); }

/* attention_plan(width, heads, kv_heads, dim, (norm1, dt, eps), (norm2, dt, eps), kind, (q, k, v),
 *                o, router, sinks) -> capsule; weights as matmul_many's items without y, q k v o of
 * `kind` (1 bf16, 2 int8), the router bf16. The tensors must outlive the capsule. */
static PyObject *py_attention_plan(PyObject *self, PyObject *args) {
    attention_plan p;
    long long width, heads, kv_heads, dim;
    unsigned long long n1, n2, sinks;
    int kind;
    PyObject *q, *k, *v, *o, *router;
    if (!PyArg_ParseTuple(args, "LLLL(Kif)(Kif)i(OOO)OOK", &width, &heads, &kv_heads, &dim, &n1, &p.norm_dt[0],
                          &p.eps[0], &n2, &p.norm_dt[1], &p.eps[1], &kind, &q, &k, &v, &o, &router, &sinks))
        return NULL;
    if (kind != BF16W && kind != INT8W) return PyErr_Format(PyExc_ValueError, "kind is 1 (bf16) or 2 (int8), got %d", kind);
    if (!check_sizes(width, heads, dim) || !check_dtypes(p.norm_dt[0], p.norm_dt[1], F32)) return NULL;
    if (dim % 2 || kv_heads < 1 || heads % kv_heads)
        return PyErr_Format(PyExc_ValueError, "bad attention shapes: dim %lld, heads %lld / %lld", dim, heads, kv_heads);
    p.width = width, p.heads = heads, p.kv_heads = kv_heads, p.dim = dim;
    p.norm_w[0] = (const void *)n1, p.norm_w[1] = (const void *)n2, p.sinks = (const float *)sinks;
    PyObject *items[3] = {q, k, v};
    for (int i = 0; i < 3; i++)
        if (!parse_weight(items[i], kind, width, &p.qkv[i], &p.bias[i], &p.bias_dt[i])) return NULL;
    if (!parse_weight(o, kind, heads * dim, &p.o, &p.bias[3], &p.bias_dt[3]) ||
        !parse_weight(router, BF16W, width, &p.router, &p.bias[4], &p.bias_dt[4]))
        return NULL;
    if (p.qkv[0].out != heads * dim || p.qkv[1].out != kv_heads * dim || p.qkv[2].out != kv_heads * dim ||
        p.o.out != width)
        return PyErr_Format(PyExc_ValueError,
                            "projections (q %lld, k %lld, v %lld, o %lld) do not fit %lld heads, %lld kv "
                            "heads of %lld and width %lld",
                            (long long)p.qkv[0].out, (long long)p.qkv[1].out, (long long)p.qkv[2].out,
                            (long long)p.o.out, heads, kv_heads, dim, width);
    attention_plan *owned = malloc(sizeof p);
    if (!owned) return PyErr_NoMemory();
    *owned = p;
    PyObject *capsule = PyCapsule_New(owned, PLAN_CAPSULE, free_plan);
    if (!capsule) free(owned);
    return capsule;
}

/* attention_step(plan, x, dt, batch, cos, sin, k_pages, v_pages, pages, page, slots, keys, q_pos,
 *                k_pos, window, rows, h, logits): x (batch, width) in dt, one token a row; cos, sin fp32
 * (batch, dim/2) of each row's position; the layer's cache in blocks of `page` positions, row b's
 * block i at byte addresses k_pages[b·pages + i], v_pages[...] (int64 (batch, pages)), each block
 * (kv_heads, page, dim) in dt; row b's new k and v written at position slots[b] (int64 (batch,)),
 * the queries (at positions q_pos (batch,)) attending their first `keys` positions, seen as
 * `attention` says (k_pos (batch, keys) int64 or 0, window). Out, in
 * dt: rows = x + o(attention), h = RMSNorm2(rows), logits = router(h). */
static PyObject *py_attention_step(PyObject *self, PyObject *args) {
    PyObject *capsule;
    unsigned long long xp, cp, sp, kpp, vpp, slotsp, qpos, kpos, rowsp, hp, logitsp;
    long long batch, pages, page, keys, window;
    int dt;
    if (!PyArg_ParseTuple(args, "OKiLKKKKLLKLKKLKKK", &capsule, &xp, &dt, &batch, &cp, &sp, &kpp, &vpp, &pages,
                          &page, &slotsp, &keys, &qpos, &kpos, &window, &rowsp, &hp, &logitsp))
        return NULL;
    const attention_plan *p = PyCapsule_GetPointer(capsule, PLAN_CAPSULE);
    if (!p || !check_sizes(batch, 1, keys) || !check_dtypes(dt, dt, dt)) return NULL;
    const int64_t *slots = (const int64_t *)slotsp;
    if (page < 1 || pages < 1 || keys > pages * page)
        return PyErr_Format(PyExc_ValueError, "bad decode step: keys %lld of %lld blocks of %lld", keys, pages,
                            page);
    if (!qpos || window < 1)
        return PyErr_Format(PyExc_ValueError, "bad decode step: no query positions, or window %lld", window);
    for (int64_t b = 0; b < batch; b++)
        if (slots[b] < 0 || slots[b] >= keys)
            return PyErr_Format(PyExc_ValueError, "bad decode step: row %lld writes position %lld of %lld",
                                (long long)b, (long long)slots[b], keys);
    int status;
    Py_BEGIN_ALLOW_THREADS;
    status = attention_step(p, (const void *)xp, dt, batch, (const float *)cp, (const float *)sp,
                            (const int64_t *)kpp, (const int64_t *)vpp, pages, page, slots, keys,
                            (const int64_t *)qpos, (const int64_t *)kpos, window, (void *)rowsp, (void *)hp,
                            (void *)logitsp);
    Py_END_ALLOW_THREADS;
    if (status) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* set_isa(name) -> name actually in use: lets tests run every path the CPU supports. */
static PyObject *py_set_isa(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    if (select_isa(name)) return PyErr_Format(PyExc_ValueError, "instruction set %s is not available here", name);
    return PyUnicode_FromString(isa_name());
}

static PyObject *py_isa(PyObject *self, PyObject *args) { return PyUnicode_FromString(isa_name()); }

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
    {"matmul_many", py_matmul_many, METH_VARARGS, "y = x @ W^T + bias (W bf16, or int8 times row scales) for one or more W, in one call"},
    {"mxfp4_moe", py_mxfp4_moe, METH_VARARGS, "routed clamped-SwiGLU MXFP4 experts"},
    {"attention_plan", py_attention_plan, METH_VARARGS, "a block's attention weights for attention_step"},
    {"attention_step", py_attention_step, METH_VARARGS, "a block's decode step up to its experts, in one call"},
    {"rms_norm", py_rms_norm, METH_VARARGS, "RMSNorm of rows, fp32 inside"},
    {"rotary", py_rotary, METH_VARARGS, "NeoX rotary embedding of (tokens, heads, dim) rows, in place"},
    {"sink_attention", py_sink_attention, METH_VARARGS,
     "attention with per-head sinks over a KV cache, the keys seen by their positions"},
    {"paged_attention", py_paged_attention, METH_VARARGS,
     "sink attention over cache blocks, the keys seen by their positions"},
    {"set_isa", py_set_isa, METH_VARARGS, "choose 'best', 'amx', 'avx512bf16', 'avx512', 'avx2' or 'c'"},
    {"isa", py_isa, METH_NOARGS, "the instruction set in use"},
    {"num_threads", py_num_threads, METH_VARARGS, "get (or set) the kernels' thread count"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, METHODS};

PyMODINIT_FUNC PyInit__native(void) {
    init_tables();
    PyObject *module = PyModule_Create(&MODULE);
    if (!module) return NULL;
    PyObject *best = Py_BuildValue("(s)", "best");
    PyObject *isa = best ? py_set_isa(NULL, best) : NULL;
    Py_XDECREF(best);
    if (!isa) return NULL;
    Py_DECREF(isa);
    PyModule_AddIntConstant(module, "MAX_ROWS", MAX_ROWS);
    PyModule_AddIntConstant(module, "MAX_MANY", MAX_MANY);
    PyModule_AddIntConstant(module, "F32", F32);
    PyModule_AddIntConstant(module, "BF16", BF16);
    return module;
}
