/* lmkern._cuda bindings of lmkern.parscale: the two kernels of aggregate around the framework's GEMMs
 * (kernels/cuda/parscale_aggregate.cu).  The Python layer (lmkern/_cuda_parscale.py) has checked
 * shapes, dtypes and devices; here sizes and pointers are checked again so no call can make a kernel
 * read or write outside what it was given. */
#include <string.h>

#include "bindings.h"
#include "lmkern/parscale.h"

/* parscale_bias_silu(device, stream, dtype, Hh, R, x, bias, out): out[o, r] = silu(x[o, r] + bias[o]),
 * x (Hh, R) C-contiguous of dtype, out (Hh, R) C-contiguous float32 (may be x when dtype is float32). */
static PyObject *py_parscale_bias_silu(PyObject *self, PyObject *args, PyObject *kwargs) {
    static const char *fn = "cuda.parscale_bias_silu";
    static char *kwlist[] = {"device", "stream", "dtype", "Hh", "R", "x", "bias", "out", NULL};
    int device = 0;
    void *stream = NULL, *x = NULL, *bias = NULL, *out = NULL;
    const char *dtype = "float32";
    long long Hh = 0, R = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|iO&sLLO&O&O&", kwlist, &device, lk_cu_ptr_arg, &stream, &dtype,
                                     &Hh, &R, lk_cu_ptr_arg, &x, lk_cu_ptr_arg, &bias, lk_cu_ptr_arg, &out))
        return NULL;
    lk_parscale_bias_silu_params p;
    memset(&p, 0, sizeof p);
    if (lk_cu_parse_dtype(fn, dtype, &p.dtype) < 0) return NULL;
    if (Hh < 0 || R < 0) {
        PyErr_Format(PyExc_ValueError, "%s: bad sizes Hh = %lld, R = %lld", fn, Hh, R);
        return NULL;
    }
    if (Hh * R > 0 && (!x || !out)) {
        PyErr_Format(PyExc_ValueError, "%s: null device pointer", fn);
        return NULL;
    }
    if (out == x && x && p.dtype != LK_F32) {
        PyErr_Format(PyExc_ValueError, "%s: out may be x only for float32", fn);
        return NULL;
    }
    p.Hh = Hh; p.R = R; p.x = x; p.bias = bias;
    LK_CU_LAUNCH(fn, device, lk_parscale_bias_silu_cuda(&p, (float *)out, (lk_stream)stream));
    Py_RETURN_NONE;
}

/* parscale_mix(device, stream, dtype, P, B, T, Hd, h, h_stride, z, b2, smoothing, y, y_stride, weights):
 * h (P·B, T, Hd) and y (B, T, Hd) of dtype with element strides (3-tuples, feature stride 1);
 * z (P, B·T) float32 C-contiguous; b2 (P,) of dtype or None; weights (B·T, P) float32 or None. */
static PyObject *py_parscale_mix(PyObject *self, PyObject *args, PyObject *kwargs) {
    static const char *fn = "cuda.parscale_mix";
    static char *kwlist[] = {"device", "stream", "dtype", "P", "B", "T", "Hd", "h", "h_stride", "z", "b2",
                             "smoothing", "y", "y_stride", "weights", NULL};
    int device = 0;
    void *stream = NULL, *h = NULL, *z = NULL, *b2 = NULL, *y = NULL, *weights = NULL;
    const char *dtype = "float32";
    long long P = 1, B = 0, T = 0, Hd = 0;
    int64_t hs[3] = {0, 0, 1}, ys[3] = {0, 0, 1};
    double smoothing = 0.0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|iO&sLLLLO&O&O&O&dO&O&O&", kwlist, &device, lk_cu_ptr_arg,
                                     &stream, &dtype, &P, &B, &T, &Hd, lk_cu_ptr_arg, &h, lk_cu_strides3, hs,
                                     lk_cu_ptr_arg, &z, lk_cu_ptr_arg, &b2, &smoothing, lk_cu_ptr_arg, &y,
                                     lk_cu_strides3, ys, lk_cu_ptr_arg, &weights))
        return NULL;
    lk_parscale_mix_params p;
    memset(&p, 0, sizeof p);
    if (lk_cu_parse_dtype(fn, dtype, &p.dtype) < 0) return NULL;
    if (P < 1 || P > LK_PARSCALE_CUDA_MAX_P || B < 0 || T < 0 || Hd < 0) {
        PyErr_Format(PyExc_ValueError, "%s: bad sizes P = %lld (1 .. %d), B = %lld, T = %lld, Hd = %lld", fn, P,
                     LK_PARSCALE_CUDA_MAX_P, B, T, Hd);
        return NULL;
    }
    if (Hd > 1 && (hs[2] != 1 || ys[2] != 1)) {
        PyErr_Format(PyExc_ValueError, "%s: the feature axis of h and y must be contiguous", fn);
        return NULL;
    }
    if (!(smoothing >= 0.0 && smoothing <= 1.0)) {
        char num[32];   /* PyErr_Format has no %g (Python 3.12 raises SystemError on it) */
        snprintf(num, sizeof num, "%g", smoothing);
        PyErr_Format(PyExc_ValueError, "%s: smoothing must be in [0, 1]; got %s", fn, num);
        return NULL;
    }
    if (B * T > 0 && (!z || (Hd > 0 && (!h || !y)))) {
        PyErr_Format(PyExc_ValueError, "%s: null device pointer", fn);
        return NULL;
    }
    lk_parscale_mix_cuda_layout l;
    l.B = B; l.T = T;
    l.h_stride[0] = hs[0]; l.h_stride[1] = hs[1];
    l.y_stride[0] = ys[0]; l.y_stride[1] = ys[1];
    p.P = P; p.R = B * T; p.Hd = Hd; p.h = h; p.z = z; p.b2 = b2; p.smoothing = smoothing; p.y = y;
    p.weights = (float *)weights;
    LK_CU_LAUNCH(fn, device, lk_parscale_mix_cuda(&p, &l, (lk_stream)stream));
    Py_RETURN_NONE;
}

PyMethodDef lk_cuda_parscale_methods[] = {
    {"parscale_bias_silu", (PyCFunction)(void (*)(void))py_parscale_bias_silu, METH_VARARGS | METH_KEYWORDS,
     "parscale_bias_silu(device, stream, dtype, Hh, R, x, bias, out): out = silu(x + bias[:, None]) in float32."},
    {"parscale_mix", (PyCFunction)(void (*)(void))py_parscale_mix, METH_VARARGS | METH_KEYWORDS,
     "parscale_mix(device, stream, dtype, P, B, T, Hd, h, h_stride, z, b2, smoothing, y, y_stride, weights): "
     "the smoothed softmax over P of z + b2 and the weighted sum of the P streams of h."},
    {NULL, NULL, 0, NULL},
};
