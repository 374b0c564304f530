/* lmkern._core bindings for lmkern.kv: validate, fill the params struct, release the GIL, call.
 * The Python layer (lmkern.kv) has produced the SPEC's messages; the checks here keep a direct call
 * from reading or writing outside an array. */
#include "arrays.h"
#include "lmkern/kv.h"

#define LK_RUN(call, fn)                   \
    do {                                   \
        lk_status st_;                     \
        Py_BEGIN_ALLOW_THREADS             \
        st_ = (call);                      \
        Py_END_ALLOW_THREADS               \
        if (lk_raise_status(st_, fn) < 0) goto fail; \
    } while (0)

static int lk_kv_check_quant(const char *fn, int bits, Py_ssize_t G) {
    if (bits != 2 && bits != 4 && bits != 8) {
        PyErr_Format(PyExc_ValueError, "%s: bits must be one of 2, 4, 8; got %d", fn, bits);
        return -1;
    }
    if (G < 1 || G % (8 / bits)) {
        PyErr_Format(PyExc_ValueError, "%s: group_size must be a positive multiple of %d; got %zd", fn, 8 / bits, G);
        return -1;
    }
    return 0;
}

/* dims of codes and scale for x (B, T, H, D) */
static int lk_kv_quant_dims(const char *fn, npy_intp B, npy_intp T, npy_intp H, npy_intp D, int bits, Py_ssize_t G,
                            int channel, npy_intp *cd, npy_intp *sd) {
    const int per = 8 / bits;
    if ((channel ? T : D) % G) {
        PyErr_Format(PyExc_ValueError, "%s: the grouped axis must be a multiple of group_size = %zd", fn, G);
        return -1;
    }
    cd[0] = sd[0] = B; cd[2] = sd[2] = H;
    cd[1] = channel ? T / per : T; cd[3] = channel ? D : D / per;
    sd[1] = channel ? T / G : T; sd[3] = channel ? D : D / G;
    return 0;
}

/* _core.kv_quantize(x, codes, scale, zero, bits, group_size, channel) */
static PyObject *py_kv_quantize(PyObject *self, PyObject *args) {
    static const char *fn = "kv.quantize";
    PyObject *x_o, *c_o, *s_o, *z_o;
    int bits, channel;
    Py_ssize_t G;
    if (!PyArg_ParseTuple(args, "OOOOinp", &x_o, &c_o, &s_o, &z_o, &bits, &G, &channel)) return NULL;
    PyObject *result = NULL;
    PyArrayObject *x = NULL, *c = NULL, *s = NULL, *z = NULL;
    if (lk_kv_check_quant(fn, bits, G) < 0) return NULL;
    if (!(x = lk_float_in(x_o, lk_float_typenum(x_o), fn, "x"))) goto fail;
    npy_intp any[4] = {-1, -1, -1, -1};
    if (lk_check_dims(fn, "x", x, "(B, T, H, D)", 4, any) < 0) goto fail;
    npy_intp cd[4], sd[4];
    if (lk_kv_quant_dims(fn, PyArray_DIM(x, 0), PyArray_DIM(x, 1), PyArray_DIM(x, 2), PyArray_DIM(x, 3), bits, G,
                         channel, cd, sd) < 0) goto fail;
    if (!(c = lk_out(c_o, NPY_UINT8, fn, "codes", 4, cd))) goto fail;
    if (!(s = lk_out(s_o, NPY_FLOAT32, fn, "scale", 4, sd))) goto fail;
    if (!(z = lk_out(z_o, NPY_FLOAT32, fn, "zero", 4, sd))) goto fail;
    lk_kv_quant_params p = {lk_dtype_of(x), PyArray_DIM(x, 0), PyArray_DIM(x, 1), PyArray_DIM(x, 2), PyArray_DIM(x, 3),
                            G, bits, channel, PyArray_DATA(x), PyArray_DATA(c), PyArray_DATA(s), PyArray_DATA(z)};
    LK_RUN(lk_kv_quantize_cpu(&p), fn);
    result = Py_NewRef(Py_None);
fail:
    Py_XDECREF(x); Py_XDECREF(c); Py_XDECREF(s); Py_XDECREF(z);
    return result;
}

/* _core.kv_dequantize(codes, scale, zero, out, bits, group_size, channel): out (B, T, H, D) float32/64 */
static PyObject *py_kv_dequantize(PyObject *self, PyObject *args) {
    static const char *fn = "kv.dequantize";
    PyObject *x_o, *c_o, *s_o, *z_o;
    int bits, channel;
    Py_ssize_t G;
    if (!PyArg_ParseTuple(args, "OOOOinp", &c_o, &s_o, &z_o, &x_o, &bits, &G, &channel)) return NULL;
    PyObject *result = NULL;
    PyArrayObject *x = NULL, *c = NULL, *s = NULL, *z = NULL;
    if (lk_kv_check_quant(fn, bits, G) < 0) return NULL;
    npy_intp any[4] = {-1, -1, -1, -1};
    if (!PyArray_Check(x_o)) { PyErr_Format(PyExc_TypeError, "%s: out must be an ndarray", fn); return NULL; }
    if (!(x = lk_out(x_o, PyArray_TYPE((PyArrayObject *)x_o) == NPY_FLOAT64 ? NPY_FLOAT64 : NPY_FLOAT32, fn, "out", 4, any)))
        goto fail;
    npy_intp cd[4], sd[4];
    if (lk_kv_quant_dims(fn, PyArray_DIM(x, 0), PyArray_DIM(x, 1), PyArray_DIM(x, 2), PyArray_DIM(x, 3), bits, G,
                         channel, cd, sd) < 0) goto fail;
    if (!(c = lk_typed_in(c_o, NPY_UINT8, fn, "codes")) || lk_check_dims(fn, "codes", c, "(codes)", 4, cd) < 0) goto fail;
    if (!(s = lk_typed_in(s_o, NPY_FLOAT32, fn, "scale")) || lk_check_dims(fn, "scale", s, "(groups)", 4, sd) < 0) goto fail;
    if (!(z = lk_typed_in(z_o, NPY_FLOAT32, fn, "zero")) || lk_check_dims(fn, "zero", z, "(groups)", 4, sd) < 0) goto fail;
    lk_kv_quant_params p = {lk_dtype_of(x), PyArray_DIM(x, 0), PyArray_DIM(x, 1), PyArray_DIM(x, 2), PyArray_DIM(x, 3),
                            G, bits, channel, PyArray_DATA(x), PyArray_DATA(c), PyArray_DATA(s), PyArray_DATA(z)};
    LK_RUN(lk_kv_dequantize_cpu(&p), fn);
    result = Py_NewRef(Py_None);
fail:
    Py_XDECREF(x); Py_XDECREF(c); Py_XDECREF(s); Py_XDECREF(z);
    return result;
}

/* _core.kv_attend(q, out, lse, k_codes, k_scale, k_zero, k_res, v_codes, v_scale, v_zero, v_res,
 *                 lens, qk, qv, q_pos, kv_pos, bits, group_size, causal, scale)
 * float arrays float32; cache arrays in the layout of lk_kv_attend_params. */
static PyObject *py_kv_attend(PyObject *self, PyObject *args) {
    static const char *fn = "QuantizedKVCache.attend";
    PyObject *o[16];
    int bits, causal;
    Py_ssize_t G;
    double scale;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOOOOOOinpd", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &o[7], &o[8],
                          &o[9], &o[10], &o[11], &o[12], &o[13], &o[14], &o[15], &bits, &G, &causal, &scale))
        return NULL;
    PyObject *result = NULL;
    PyArrayObject *a[16] = {NULL};
    if (lk_kv_check_quant(fn, bits, G) < 0) return NULL;
    static const char *names[16] = {"q", "out", "lse", "k_codes", "k_scale", "k_zero", "k_res", "v_codes", "v_scale",
                                    "v_zero", "v_res", "lens", "qk", "qv", "q_pos", "kv_pos"};
    npy_intp any5[5] = {-1, -1, -1, -1, -1};
    if (!(a[0] = lk_typed_in(o[0], NPY_FLOAT32, fn, "q")) || lk_check_dims(fn, "q", a[0], "(B, N, Hq, D)", 4, any5) < 0)
        goto fail;
    if (!(a[3] = lk_typed_in(o[3], NPY_UINT8, fn, "k_codes")) ||
        lk_check_dims(fn, "k_codes", a[3], "(B, Hkv, k_groups, D, G/per)", 5, any5) < 0) goto fail;
    if (!(a[10] = lk_typed_in(o[10], NPY_FLOAT32, fn, "v_res")) ||
        lk_check_dims(fn, "v_res", a[10], "(B, Hkv, v_res_cap, E)", 4, any5) < 0) goto fail;
    if (!(a[7] = lk_typed_in(o[7], NPY_UINT8, fn, "v_codes")) ||
        lk_check_dims(fn, "v_codes", a[7], "(B, Hkv, v_cap, E/per)", 4, any5) < 0) goto fail;
    if (!(a[6] = lk_typed_in(o[6], NPY_FLOAT32, fn, "k_res")) ||
        lk_check_dims(fn, "k_res", a[6], "(B, Hkv, k_res_cap, D)", 4, any5) < 0) goto fail;
    const int per = 8 / bits;
    const npy_intp B = PyArray_DIM(a[0], 0), N = PyArray_DIM(a[0], 1), Hq = PyArray_DIM(a[0], 2), D = PyArray_DIM(a[0], 3);
    const npy_intp Hkv = PyArray_DIM(a[3], 1), KG = PyArray_DIM(a[3], 2), E = PyArray_DIM(a[10], 3);
    const npy_intp VC = PyArray_DIM(a[7], 2), KRC = PyArray_DIM(a[6], 2), VRC = PyArray_DIM(a[10], 2);
    if (Hkv == 0 || Hq % Hkv || E % G) {
        PyErr_Format(PyExc_ValueError, "%s: Hq must be a multiple of Hkv > 0 and E of group_size", fn);
        goto fail;
    }
    npy_intp kcd[5] = {B, Hkv, KG, D, G / per}, ksd[4] = {B, Hkv, KG, D}, krd[4] = {B, Hkv, KRC, D};
    npy_intp vcd[4] = {B, Hkv, VC, E / per}, vsd[4] = {B, Hkv, VC, E / G}, vrd[4] = {B, Hkv, VRC, E};
    npy_intp od[4] = {B, N, Hq, E}, ld[3] = {B, N, Hq}, bd[1] = {B}, qpd[2] = {B, N}, kpd[2] = {B, -1};
    if (lk_check_dims(fn, "k_codes", a[3], "(B, Hkv, k_groups, D, G/per)", 5, kcd) < 0) goto fail;
    if (lk_check_dims(fn, "k_res", a[6], "(B, Hkv, k_res_cap, D)", 4, krd) < 0) goto fail;
    if (lk_check_dims(fn, "v_codes", a[7], "(B, Hkv, v_cap, E/per)", 4, vcd) < 0) goto fail;
    if (lk_check_dims(fn, "v_res", a[10], "(B, Hkv, v_res_cap, E)", 4, vrd) < 0) goto fail;
    const int fidx[4] = {4, 5, 8, 9};
    for (int t = 0; t < 4; t++) {
        const int i = fidx[t];
        if (!(a[i] = lk_typed_in(o[i], NPY_FLOAT32, fn, names[i])) ||
            lk_check_dims(fn, names[i], a[i], "(scales)", 4, i < 8 ? ksd : vsd) < 0) goto fail;
    }
    if (!(a[1] = lk_out(o[1], NPY_FLOAT32, fn, "out", 4, od))) goto fail;
    if (o[2] != Py_None && !(a[2] = lk_out(o[2], NPY_FLOAT32, fn, "lse", 3, ld))) goto fail;
    for (int i = 11; i < 16; i++) {
        if (!(a[i] = lk_index_in(o[i], fn, names[i]))) {
            if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "%s: %s is required", fn, names[i]);
            goto fail;
        }
        if (lk_check_dims(fn, names[i], a[i], i < 14 ? "(B,)" : i == 14 ? "(B, N)" : "(B, pos_cap)", i < 14 ? 1 : 2,
                          i < 14 ? bd : i == 14 ? qpd : kpd) < 0) goto fail;
    }
    const npy_intp PC = PyArray_DIM(a[15], 1);
    const int64_t *lens = PyArray_DATA(a[11]), *qk = PyArray_DATA(a[12]), *qv = PyArray_DATA(a[13]);
    for (npy_intp b = 0; b < B; b++) {
        const int64_t L = lens[b];
        if (L < 0 || L > PC || L > VC || qk[b] < 0 || qk[b] > L || qk[b] % G || qk[b] > KG * G || L - qk[b] > KRC ||
            qv[b] < qk[b] || qv[b] > L || L - qv[b] > VRC) {
            PyErr_Format(PyExc_ValueError, "%s: inconsistent cache state in row %zd", fn, (Py_ssize_t)b);
            goto fail;
        }
    }
    lk_kv_attend_params p = {0};
    p.B = B; p.N = N; p.Hq = Hq; p.Hkv = Hkv; p.D = D; p.E = E; p.G = G;
    p.bits = bits; p.causal = causal; p.scale = scale;
    p.q = PyArray_DATA(a[0]); p.out = PyArray_DATA(a[1]); p.lse = a[2] ? PyArray_DATA(a[2]) : NULL;
    p.k_codes = PyArray_DATA(a[3]); p.k_scale = PyArray_DATA(a[4]); p.k_zero = PyArray_DATA(a[5]);
    p.k_res = PyArray_DATA(a[6]); p.v_codes = PyArray_DATA(a[7]); p.v_scale = PyArray_DATA(a[8]);
    p.v_zero = PyArray_DATA(a[9]); p.v_res = PyArray_DATA(a[10]);
    p.k_groups = KG; p.k_res_cap = KRC; p.v_cap = VC; p.v_res_cap = VRC; p.pos_cap = PC;
    p.lens = lens; p.qk = qk; p.qv = qv; p.q_pos = PyArray_DATA(a[14]); p.kv_pos = PyArray_DATA(a[15]);
    LK_RUN(lk_kv_attend_cpu(&p), fn);
    result = Py_NewRef(Py_None);
fail:
    for (int i = 0; i < 16; i++) Py_XDECREF(a[i]);
    return result;
}

/* _core.kv_attention_mass(q, k, out, q_pos, kv_pos, kv_lens, causal, normalize, reduce, scale) */
static PyObject *py_kv_attention_mass(PyObject *self, PyObject *args) {
    static const char *fn = "kv.attention_mass";
    PyObject *q_o, *k_o, *out_o, *qp_o, *kp_o, *l_o;
    int causal, normalize, reduce;
    double scale;
    if (!PyArg_ParseTuple(args, "OOOOOOppid", &q_o, &k_o, &out_o, &qp_o, &kp_o, &l_o, &causal, &normalize, &reduce, &scale))
        return NULL;
    PyObject *result = NULL;
    PyArrayObject *q = NULL, *k = NULL, *out = NULL, *qp = NULL, *kp = NULL, *lens = NULL;
    npy_intp any[4] = {-1, -1, -1, -1};
    if (!(q = lk_typed_in(q_o, NPY_FLOAT32, fn, "q")) || lk_check_dims(fn, "q", q, "(B, N, Hq, D)", 4, any) < 0) goto fail;
    const npy_intp B = PyArray_DIM(q, 0), N = PyArray_DIM(q, 1), Hq = PyArray_DIM(q, 2), D = PyArray_DIM(q, 3);
    npy_intp kd[4] = {B, -1, -1, D};
    if (!(k = lk_typed_in(k_o, NPY_FLOAT32, fn, "k")) || lk_check_dims(fn, "k", k, "(B, M, Hkv, D)", 4, kd) < 0) goto fail;
    const npy_intp M = PyArray_DIM(k, 1), Hkv = PyArray_DIM(k, 2);
    if (reduce < 0 || reduce > 3 || (Hkv == 0 ? Hq != 0 : Hq % Hkv)) {
        PyErr_Format(PyExc_ValueError, "%s: bad reduce or head counts", fn);
        goto fail;
    }
    npy_intp od[3] = {B, M, reduce == LK_REDUCE_NONE ? Hq : Hkv}, qpd[2] = {B, N}, kpd[2] = {B, M}, ld[1] = {B};
    if (!(out = lk_out(out_o, NPY_FLOAT32, fn, "out", 3, od))) goto fail;
    if (!(qp = lk_index_in(qp_o, fn, "q_pos")) || lk_check_dims(fn, "q_pos", qp, "(B, N)", 2, qpd) < 0) goto fail;
    if (!(kp = lk_index_in(kp_o, fn, "kv_pos")) || lk_check_dims(fn, "kv_pos", kp, "(B, M)", 2, kpd) < 0) goto fail;
    if (!(lens = lk_index_in(l_o, fn, "kv_lens")) || lk_check_dims(fn, "kv_lens", lens, "(B,)", 1, ld) < 0) goto fail;
    if (lk_check_range(fn, "kv_lens", lens, 0, M) < 0) goto fail;
    lk_kv_mass_params p = {B, N, M, Hq, Hkv, D, causal, normalize, reduce, scale, PyArray_DATA(q), PyArray_DATA(k),
                           PyArray_DATA(out), PyArray_DATA(qp), PyArray_DATA(kp), PyArray_DATA(lens)};
    LK_RUN(lk_kv_mass_cpu(&p), fn);
    result = Py_NewRef(Py_None);
fail:
    if (!result && !PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "%s: q_pos, kv_pos and kv_lens are required", fn);
    Py_XDECREF(q); Py_XDECREF(k); Py_XDECREF(out); Py_XDECREF(qp); Py_XDECREF(kp); Py_XDECREF(lens);
    return result;
}

/* _core.kv_keep_topk(scores, idx, sink, recent): scores (B, M, H) float32/64, idx (B, K, H) int64 */
static PyObject *py_kv_keep_topk(PyObject *self, PyObject *args) {
    static const char *fn = "kv.keep_topk";
    PyObject *s_o, *i_o;
    Py_ssize_t sink, recent;
    if (!PyArg_ParseTuple(args, "OOnn", &s_o, &i_o, &sink, &recent)) return NULL;
    PyObject *result = NULL;
    PyArrayObject *s = NULL, *idx = NULL;
    npy_intp any[3] = {-1, -1, -1};
    if (!(s = lk_float_in(s_o, lk_float_typenum(s_o), fn, "scores")) ||
        lk_check_dims(fn, "scores", s, "(B, M, H)", 3, any) < 0) goto fail;
    npy_intp idd[3] = {PyArray_DIM(s, 0), -1, PyArray_DIM(s, 2)};
    if (!(idx = lk_out(i_o, NPY_INT64, fn, "idx", 3, idd))) goto fail;
    const npy_intp K = PyArray_DIM(idx, 1), M = PyArray_DIM(s, 1);
    if (K > M || sink < 0 || recent < 0 || (sink + recent > K && K < M)) {
        PyErr_Format(PyExc_ValueError, "%s: need K <= M and sink + recent <= K", fn);
        goto fail;
    }
    lk_kv_topk_params p = {lk_dtype_of(s), PyArray_DIM(s, 0), M, PyArray_DIM(s, 2), K, sink, recent,
                           PyArray_DATA(s), PyArray_DATA(idx)};
    LK_RUN(lk_kv_keep_topk_cpu(&p), fn);
    result = Py_NewRef(Py_None);
fail:
    Py_XDECREF(s); Py_XDECREF(idx);
    return result;
}

/* _core.kv_compact(x, idx, out): x (B, M, H, ...) any dtype C-contiguous, idx (B, K, H), out (B, K, H, ...) */
static PyObject *py_kv_compact(PyObject *self, PyObject *args) {
    static const char *fn = "kv.compact";
    PyObject *x_o, *i_o, *out_o;
    if (!PyArg_ParseTuple(args, "OOO", &x_o, &i_o, &out_o)) return NULL;
    PyObject *result = NULL;
    PyArrayObject *x = NULL, *idx = NULL, *out = NULL;
    if (!PyArray_Check(x_o) || !PyArray_Check(out_o)) {
        PyErr_Format(PyExc_TypeError, "%s: x and out must be ndarrays", fn);
        return NULL;
    }
    if (!(x = (PyArrayObject *)PyArray_FROM_OF(x_o, NPY_ARRAY_IN_ARRAY))) goto fail;
    if (PyArray_NDIM(x) < 3) { PyErr_Format(PyExc_ValueError, "%s: x must be (B, M, H, ...)", fn); goto fail; }
    const npy_intp B = PyArray_DIM(x, 0), M = PyArray_DIM(x, 1), H = PyArray_DIM(x, 2);
    npy_intp idd[3] = {B, -1, H};
    if (!(idx = lk_index_in(i_o, fn, "idx")) || lk_check_dims(fn, "idx", idx, "(B, K, H)", 3, idd) < 0) goto fail;
    if (lk_check_range(fn, "idx", idx, 0, M - 1) < 0) goto fail;
    const npy_intp K = PyArray_DIM(idx, 1);
    npy_intp od[NPY_MAXDIMS];
    od[0] = B; od[1] = K; od[2] = H;
    for (int i = 3; i < PyArray_NDIM(x); i++) od[i] = PyArray_DIM(x, i);
    PyArrayObject *oa = (PyArrayObject *)out_o;
    if (PyArray_TYPE(oa) != PyArray_TYPE(x)) { PyErr_Format(PyExc_TypeError, "%s: out dtype differs from x", fn); goto fail; }
    if (!(out = lk_out(out_o, PyArray_TYPE(x), fn, "out", PyArray_NDIM(x), od))) goto fail;
    npy_intp row = PyArray_ITEMSIZE(x);
    for (int i = 3; i < PyArray_NDIM(x); i++) row *= PyArray_DIM(x, i);
    lk_kv_compact_params p = {B, M, K, H, row, PyArray_DATA(x), PyArray_DATA(idx), PyArray_DATA(out)};
    LK_RUN(lk_kv_compact_cpu(&p), fn);
    result = Py_NewRef(Py_None);
fail:
    if (!result && !PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "%s: idx is required", fn);
    Py_XDECREF(x); Py_XDECREF(idx); Py_XDECREF(out);
    return result;
}

PyMethodDef lk_kv_methods[] = {
    {"kv_quantize", py_kv_quantize, METH_VARARGS, "KIVI quantization kernel (see lmkern.kv.quantize)"},
    {"kv_dequantize", py_kv_dequantize, METH_VARARGS, "dequantization kernel (see lmkern.kv.dequantize)"},
    {"kv_attend", py_kv_attend, METH_VARARGS, "fused attention over the KIVI cache (see QuantizedKVCache.attend)"},
    {"kv_attention_mass", py_kv_attention_mass, METH_VARARGS, "attention mass kernel (see lmkern.kv.attention_mass)"},
    {"kv_keep_topk", py_kv_keep_topk, METH_VARARGS, "top-k selection kernel (see lmkern.kv.keep_topk)"},
    {"kv_compact", py_kv_compact, METH_VARARGS, "per-head gather kernel (see lmkern.kv.compact)"},
    {NULL, NULL, 0, NULL},
};
