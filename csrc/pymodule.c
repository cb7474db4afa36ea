/* pymodule.c — the CPython/NumPy binding of the core, kept thin.
 *
 * It converts arguments with PyArray_FROM_OTF, checks that every buffer is as
 * large as the core will read or write, releases the GIL and calls the core.
 * Friendlier checks (names, messages about the user's intent) live in Python. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "mechscope.h"

/* ---- the Model type: a config plus references to the weight arrays ---------- */

typedef struct {
    PyObject_HEAD
    ms_model model;
    ms_block *blocks;
    PyObject *arrays; /* list holding a reference to every weight array */
} ModelObject;

static void Model_dealloc(ModelObject *self) {
    ms_workspace_free(self->model.workspace);
    ms_workspace_free(self->model.grad_workspace);
    free(self->blocks);
    Py_XDECREF(self->arrays);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Take weights[name] as a C-contiguous float32 array of exactly n elements;
 * returns its data, keeps a reference in self->arrays. NULL with an exception set. */
static const float *take_weight(ModelObject *self, PyObject *weights, const char *name, size_t n) {
    PyObject *obj = PyDict_GetItemString(weights, name); /* borrowed */
    if (!obj) {
        PyErr_Format(PyExc_ValueError, "weights: %s is missing", name);
        return NULL;
    }
    PyArrayObject *arr = (PyArrayObject *)PyArray_FROM_OTF(obj, NPY_FLOAT32, NPY_ARRAY_IN_ARRAY);
    if (!arr) return NULL;
    if ((size_t)PyArray_SIZE(arr) != n) {
        PyErr_Format(PyExc_ValueError, "weights: %s has %zd elements, the config needs %zu", name,
                     PyArray_SIZE(arr), n);
        Py_DECREF(arr);
        return NULL;
    }
    int rc = PyList_Append(self->arrays, (PyObject *)arr); /* the list now owns a reference */
    Py_DECREF(arr);
    if (rc < 0) return NULL;
    return (const float *)PyArray_DATA(arr);
}

/* Take weights[name], a weight matrix of exactly n numbers: float16 arrays and
 * uint16 arrays (the bits of bfloat16 numbers, which NumPy has no type for) are
 * kept as they are, 2 bytes per number (*half, *dtype); anything else is taken as
 * float32 (*f). Returns 0, or -1 with an exception set. */
static int take_matrix(ModelObject *self, PyObject *weights, const char *name, size_t n, const float **f,
                       const uint16_t **half, ms_dtype *dtype) {
    PyObject *obj = PyDict_GetItemString(weights, name); /* borrowed */
    *f = NULL, *half = NULL, *dtype = MS_F32;
    if (obj && PyArray_Check(obj) &&
        (PyArray_TYPE((PyArrayObject *)obj) == NPY_FLOAT16 || PyArray_TYPE((PyArrayObject *)obj) == NPY_UINT16)) {
        int type = PyArray_TYPE((PyArrayObject *)obj);
        PyArrayObject *arr = (PyArrayObject *)PyArray_FROM_OTF(obj, type, NPY_ARRAY_IN_ARRAY);
        if (!arr) return -1;
        if ((size_t)PyArray_SIZE(arr) != n) {
            PyErr_Format(PyExc_ValueError, "weights: %s has %zd elements, the config needs %zu", name,
                         PyArray_SIZE(arr), n);
            Py_DECREF(arr);
            return -1;
        }
        int rc = PyList_Append(self->arrays, (PyObject *)arr); /* the list now owns a reference */
        Py_DECREF(arr);
        if (rc < 0) return -1;
        *half = (const uint16_t *)PyArray_DATA(arr);
        *dtype = type == NPY_FLOAT16 ? MS_F16 : MS_BF16;
        return 0;
    }
    *f = take_weight(self, weights, name, n);
    return *f ? 0 : -1;
}

/* the int (or float) config[key]; -1 with an exception set if absent or not a number */
static int config_int(PyObject *config, const char *key, int *out) {
    PyObject *v = PyDict_GetItemString(config, key); /* borrowed */
    if (!v) {
        PyErr_Format(PyExc_ValueError, "config: %s is missing", key);
        return -1;
    }
    long x = PyLong_AsLong(v);
    if (x == -1 && PyErr_Occurred()) return -1;
    if (x < INT32_MIN || x > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "config: %s out of range", key);
        return -1;
    }
    *out = (int)x;
    return 0;
}

static int config_float(PyObject *config, const char *key, float *out) {
    PyObject *v = PyDict_GetItemString(config, key);
    if (!v) {
        PyErr_Format(PyExc_ValueError, "config: %s is missing", key);
        return -1;
    }
    double x = PyFloat_AsDouble(v);
    if (x == -1.0 && PyErr_Occurred()) return -1;
    *out = (float)x;
    return 0;
}

/* config[key], when present: one integer in [lo, hi] per layer, into out[n_layers].
 * 1 when present, 0 when absent, -1 with an exception set. */
static int config_per_layer(PyObject *config, const char *key, int n_layers, long lo, long hi, int *out) {
    PyObject *v = PyDict_GetItemString(config, key); /* borrowed */
    if (!v) return 0;
    PyObject *seq = PySequence_Fast(v, "config: a per-layer entry must be a sequence");
    if (!seq) return -1;
    int st = 1;
    if (PySequence_Fast_GET_SIZE(seq) != n_layers) {
        PyErr_Format(PyExc_ValueError, "config: %s must have one entry per layer (%d)", key, n_layers);
        st = -1;
    }
    for (int l = 0; l < n_layers && st == 1; l++) {
        long x = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, l));
        if (x == -1 && PyErr_Occurred()) {
            st = -1;
        } else if (x < lo || x > hi) {
            PyErr_Format(PyExc_ValueError, "config: %s holds integers from %ld to %ld, one per layer", key, lo, hi);
            st = -1;
        } else {
            out[l] = (int)x;
        }
    }
    Py_DECREF(seq);
    return st;
}

/* config["rope_local_layers"] (0 or 1 per layer) into blocks[l].rope_local and
 * config["attn_windows"] (0, or the sliding window, per layer) into blocks[l].attn_window */
static int config_layers(PyObject *config, ms_block *blocks, int n_layers) {
    int *x = malloc(sizeof(int) * (size_t)(n_layers > 0 ? n_layers : 1));
    if (!x) {
        PyErr_NoMemory();
        return -1;
    }
    int st = config_per_layer(config, "rope_local_layers", n_layers, 0, 1, x);
    for (int l = 0; st == 1 && l < n_layers; l++) blocks[l].rope_local = x[l];
    if (st >= 0) st = config_per_layer(config, "attn_windows", n_layers, 0, INT_MAX, x);
    for (int l = 0; st == 1 && l < n_layers; l++) blocks[l].attn_window = x[l];
    free(x);
    return st < 0 ? -1 : 0;
}

/* Model(config, weights): config a dict of the ms_config fields (plus linear_trans:
 * 1 when every linear matrix is [out, in] as nn.Linear, 0 for [in, out] as
 * Conv1D); weights a dict of float32 arrays under the core's names (see model.py:
 * q|k|v fused in attn.w_qkv, gate|up fused in a gated mlp.w_in). */
static int Model_init(ModelObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"config", "weights", NULL};
    ms_config c = {0};
    PyObject *config = NULL, *weights = NULL;
    int act = 0, norm = 0, trans = 0, padding_idx = -1;
    float rope_scale = 1.0f, embed_scale = 1.0f, attn_scale = 0.0f, attn_softcap = 0.0f, logit_softcap = 0.0f;
    char name[160];
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O!", kwlist, &PyDict_Type, &config, &PyDict_Type,
                                     &weights))
        return -1;
    if (config_int(config, "n_layers", &c.n_layers) || config_int(config, "d_model", &c.d_model) ||
        config_int(config, "n_heads", &c.n_heads) || config_int(config, "n_kv_heads", &c.n_kv_heads) ||
        config_int(config, "d_head", &c.d_head) || config_int(config, "d_mlp", &c.d_mlp) ||
        config_int(config, "d_vocab", &c.d_vocab) || config_int(config, "n_ctx", &c.n_ctx) ||
        config_float(config, "ln_eps", &c.ln_eps) || config_int(config, "norm", &norm) ||
        config_int(config, "activation", &act) || config_int(config, "gated_mlp", &c.gated_mlp) ||
        config_int(config, "parallel", &c.parallel) || config_int(config, "rotary_dim", &c.rotary_dim) ||
        config_float(config, "rope_scale", &rope_scale) ||
        config_int(config, "scale_attn_weights", &c.scale_attn_weights) ||
        config_int(config, "scale_attn_by_inverse_layer", &c.scale_attn_by_inverse_layer) ||
        config_int(config, "linear_trans", &trans))
        return -1;
    if (PyDict_GetItemString(config, "qk_norm") && config_int(config, "qk_norm", &c.qk_norm)) return -1;
    if (PyDict_GetItemString(config, "rotary_interleaved") &&
        config_int(config, "rotary_interleaved", &c.rotary_interleaved))
        return -1;
    if (PyDict_GetItemString(config, "embed_scale") && config_float(config, "embed_scale", &embed_scale))
        return -1;
    if (PyDict_GetItemString(config, "padding_idx") && config_int(config, "padding_idx", &padding_idx)) return -1;
    if (PyDict_GetItemString(config, "post_norms") && config_int(config, "post_norms", &c.post_norms)) return -1;
    c.input_norms = 1;
    if (PyDict_GetItemString(config, "input_norms") && config_int(config, "input_norms", &c.input_norms)) return -1;
    if ((PyDict_GetItemString(config, "attn_scale") && config_float(config, "attn_scale", &attn_scale)) ||
        (PyDict_GetItemString(config, "attn_softcap") && config_float(config, "attn_softcap", &attn_softcap)) ||
        (PyDict_GetItemString(config, "logit_softcap") && config_float(config, "logit_softcap", &logit_softcap)))
        return -1;
    c.expert_renormalize = 1;
    if (PyDict_GetItemString(config, "expert_renormalize") &&
        config_int(config, "expert_renormalize", &c.expert_renormalize))
        return -1;
    if (PyDict_GetItemString(config, "n_experts") &&
        (config_int(config, "n_experts", &c.n_experts) || config_int(config, "experts_per_token", &c.experts_per_token)))
        return -1;
    if (c.n_experts < 0 || c.n_experts > 100000 || (c.n_experts && !c.gated_mlp)) {
        PyErr_SetString(PyExc_ValueError, "config: n_experts must be within [0, 100000], and experts gated MLPs");
        return -1;
    }
    if (PyDict_GetItemString(config, "d_shared") && config_int(config, "d_shared", &c.d_shared)) return -1;
    if (c.d_shared < 0 || c.d_shared > (1 << 24) || (c.d_shared && !c.n_experts)) {
        PyErr_SetString(PyExc_ValueError, "config: d_shared must be within [0, 2^24], and > 0 only with experts");
        return -1;
    }
    if (c.n_layers < 1 || c.n_heads < 1 || c.n_kv_heads < 1 || c.d_model < 1 || c.d_head < 1 ||
        c.d_mlp < 1 || c.d_vocab < 1 || c.n_ctx < 1 || c.n_layers > 100000 || c.rotary_dim < 0 ||
        c.n_heads % c.n_kv_heads) {
        PyErr_SetString(PyExc_ValueError, "config: sizes must be positive, n_heads a multiple of n_kv_heads");
        return -1;
    }
    c.activation = (ms_activation)act;
    c.norm = (ms_norm_kind)norm;
    free(self->blocks);
    self->blocks = NULL;
    Py_XSETREF(self->arrays, PyList_New(0));
    if (!self->arrays) return -1;
    self->blocks = calloc((size_t)c.n_layers, sizeof(ms_block));
    if (!self->blocks) {
        PyErr_NoMemory();
        return -1;
    }
    if (config_layers(config, self->blocks, c.n_layers)) return -1;
    size_t C = (size_t)c.d_model, F = (size_t)c.d_mlp, V = (size_t)c.d_vocab;
    size_t QD = (size_t)c.n_heads * c.d_head, KD = (size_t)c.n_kv_heads * c.d_head, QW = QD + 2 * KD;
    size_t FW = F * (c.gated_mlp ? 2 : 1);
    size_t E = c.n_experts ? (size_t)c.n_experts : 1; /* a mixture's matrices: E experts' stacked */
    ms_model *m = &self->model;
    ms_workspace_free(m->workspace); /* __init__ may run twice */
    ms_workspace_free(m->grad_workspace);
    m->workspace = ms_workspace_new();
    m->grad_workspace = ms_workspace_new();
    if (!m->workspace || !m->grad_workspace) {
        PyErr_NoMemory();
        return -1;
    }
    m->cfg = c;
    m->blocks = self->blocks;
    m->rope_scale = rope_scale;
    m->embed_scale = embed_scale;
    m->padding_idx = padding_idx;
    m->attn_scale = attn_scale, m->attn_softcap = attn_softcap, m->logit_softcap = logit_softcap;
    m->wpe = m->rope_inv_freq = m->rope_inv_freq_local = m->lnf_b = NULL;
#define TAKE(dst, key, n) \
    if (!((dst) = take_weight(self, weights, key, n))) return -1
#define TAKE_OPT(dst, key, n) \
    if (PyDict_GetItemString(weights, key)) TAKE(dst, key, n)
#define TAKE_MATRIX(f, h, dt, key, n) \
    if (take_matrix(self, weights, key, n, &(f), &(h), &(dt))) return -1
    TAKE_MATRIX(m->wte, m->wte16, m->wte_dtype, "embed", V * C);
    if (c.rotary_dim) {
        TAKE(m->rope_inv_freq, "rope_inv_freq", (size_t)c.rotary_dim / 2);
        TAKE_OPT(m->rope_inv_freq_local, "rope_inv_freq_local", (size_t)c.rotary_dim / 2);
    } else {
        TAKE(m->wpe, "pos_embed", (size_t)c.n_ctx * C);
    }
    TAKE(m->lnf_w, "ln_final.w", C);
    TAKE_OPT(m->lnf_b, "ln_final.b", C);
    m->unembed = m->wte, m->unembed16 = m->wte16, m->unembed_dtype = m->wte_dtype;
    if (PyDict_GetItemString(weights, "unembed"))
        TAKE_MATRIX(m->unembed, m->unembed16, m->unembed_dtype, "unembed", V * C);
    m->unembed_b = NULL;
    TAKE_OPT(m->unembed_b, "unembed.b", V);
    for (int l = 0; l < c.n_layers; l++) {
        ms_block *b = &self->blocks[l];
        const float *wqkv, *bqkv = NULL, *win, *bin = NULL;
        const uint16_t *hqkv, *hin;
        ms_dtype dqkv, din;
#define NAME(suffix) (snprintf(name, sizeof name, "blocks.%d.%s", l, suffix), name)
        b->ln1_w = b->ln2_w = NULL;
        if (c.input_norms) {
            TAKE(b->ln1_w, NAME("ln1.w"), C);
            TAKE_OPT(b->ln1_b, NAME("ln1.b"), C);
            TAKE(b->ln2_w, NAME("ln2.w"), C);
            TAKE_OPT(b->ln2_b, NAME("ln2.b"), C);
        }
        TAKE_MATRIX(wqkv, hqkv, dqkv, NAME("attn.w_qkv"), C * QW);
        TAKE_OPT(bqkv, NAME("attn.b_qkv"), QW);
        TAKE_MATRIX(b->o.w, b->o.w16, b->o.dtype, NAME("attn.w_o"), QD * C);
        TAKE_OPT(b->o.b, NAME("attn.b_o"), C);
        if (c.qk_norm) {
            TAKE(b->q_norm_w, NAME("attn.q_norm.w"), c.qk_norm == 2 ? QD : (size_t)c.d_head);
            TAKE(b->k_norm_w, NAME("attn.k_norm.w"), c.qk_norm == 2 ? KD : (size_t)c.d_head);
        }
        if (c.post_norms) {
            TAKE(b->ln1_post_w, NAME("ln1_post.w"), C);
            TAKE(b->ln2_post_w, NAME("ln2_post.w"), C);
        }
        TAKE_MATRIX(win, hin, din, NAME("mlp.w_in"), E * C * FW);
        if (!c.n_experts) TAKE_OPT(bin, NAME("mlp.b_in"), FW);
        TAKE_MATRIX(b->mlp_out.w, b->mlp_out.w16, b->mlp_out.dtype, NAME("mlp.w_out"), E * F * C);
        if (c.n_experts) {
            TAKE_MATRIX(b->router.w, b->router.w16, b->router.dtype, NAME("mlp.w_router"), C * E);
            b->router.ld = trans ? (int)C : (int)E;
            b->router.trans = trans;
            b->expert_in_stride = C * FW;
            b->expert_out_stride = F * C;
        }
        if (c.d_shared) { /* gate | up stacked (as a gated MLP's), out, the gate's weights */
            size_t S = (size_t)c.d_shared;
            const float *sw;
            const uint16_t *sh;
            ms_dtype sd;
            TAKE_MATRIX(sw, sh, sd, NAME("mlp.shared.w_in"), C * 2 * S);
            size_t up = trans ? S * C : S;
            int ld = trans ? (int)C : (int)(2 * S);
            b->shared_gate = (ms_linear_weight){.w = sw, .ld = ld, .trans = trans, .dtype = sd, .w16 = sh};
            b->shared_in = (ms_linear_weight){.w = sw ? sw + up : NULL, .ld = ld, .trans = trans, .dtype = sd,
                                              .w16 = sh ? sh + up : NULL};
            TAKE_MATRIX(b->shared_out.w, b->shared_out.w16, b->shared_out.dtype, NAME("mlp.shared.w_out"), S * C);
            b->shared_out.ld = trans ? (int)S : (int)C;
            b->shared_out.trans = trans;
            TAKE_MATRIX(b->shared_router.w, b->shared_router.w16, b->shared_router.dtype, NAME("mlp.shared.w_router"),
                        C);
            b->shared_router.ld = trans ? (int)C : 1;
            b->shared_router.trans = trans;
        }
        if (!c.n_experts) TAKE_OPT(b->mlp_out.b, NAME("mlp.b_out"), C);
#undef NAME
        /* column blocks of the fused matrices: a column offset in [in, out], a row
         * offset in [out, in] */
        size_t qs = trans ? QD * C : QD, ks = trans ? KD * C : KD, fs = trans ? F * C : F;
        int ld_qkv = trans ? (int)C : (int)QW, ld_in = trans ? (int)C : (int)FW;
        /* pointer arithmetic only on the pointer that is set (the other is NULL) */
#define LIN(f, h, dt, off, bias, stride) ((ms_linear_weight){.w = (f) ? (f) + (off) : NULL, .b = (bias), .ld = (stride), \
                                     .trans = trans, .dtype = (dt), .w16 = (h) ? (h) + (off) : NULL})
        b->q = LIN(wqkv, hqkv, dqkv, 0, bqkv, ld_qkv);
        b->k = LIN(wqkv, hqkv, dqkv, qs, bqkv ? bqkv + QD : NULL, ld_qkv);
        b->v = LIN(wqkv, hqkv, dqkv, qs + ks, bqkv ? bqkv + QD + KD : NULL, ld_qkv);
        b->o.ld = trans ? (int)QD : (int)C;
        b->o.trans = trans;
        if (c.gated_mlp) {
            b->mlp_gate = LIN(win, hin, din, 0, bin, ld_in);
            b->mlp_in = LIN(win, hin, din, fs, bin ? bin + F : NULL, ld_in);
        } else {
            b->mlp_in = LIN(win, hin, din, 0, bin, ld_in);
        }
#undef LIN
        b->mlp_out.ld = trans ? (int)F : (int)C;
        b->mlp_out.trans = trans;
    }
#undef TAKE
#undef TAKE_OPT
#undef TAKE_MATRIX
    ms_error err = {{0}};
    ms_status st;
    Py_BEGIN_ALLOW_THREADS
    st = ms_model_check(m, &err);
    Py_END_ALLOW_THREADS
    if (st) {
        PyErr_SetString(PyExc_ValueError, err.message);
        return -1;
    }
    return 0;
}

/* ---- running a plan --------------------------------------------------------- */

/* Convert obj to an array of the given type and contiguity with at least min_size
 * elements; the reference goes into keep. Returns the data pointer, or NULL. */
static void *as_array(PyObject *keep, PyObject *obj, int type, int flags, npy_intp min_size,
                      const char *what, npy_intp *size_out) {
    if (obj == Py_None) {
        if (size_out) *size_out = 0;
        return NULL;
    }
    /* index arrays are copied: the core checks them, then reads them without the GIL,
     * and another thread must not be able to change them in between */
    if (type == NPY_INT32) flags |= NPY_ARRAY_ENSURECOPY;
    PyArrayObject *arr = (PyArrayObject *)PyArray_FROM_OTF(obj, type, flags);
    if (!arr) return NULL;
    if (PyArray_SIZE(arr) < min_size) {
        PyErr_Format(PyExc_ValueError, "%s: has %zd elements, needs %zd", what, PyArray_SIZE(arr),
                     min_size);
        Py_DECREF(arr);
        return NULL;
    }
    if (size_out) *size_out = PyArray_SIZE(arr);
    int rc = PyList_Append(keep, (PyObject *)arr);
    Py_DECREF(arr);
    if (rc < 0) return NULL;
    /* an empty selection still needs a non-NULL pointer */
    return PyArray_SIZE(arr) ? PyArray_DATA(arr) : (void *)"";
}

/* ---- calls into the core that may take long -------------------------------------
 *
 * Ctrl-C must stop a long run or sweep within a second, but Python handles signals
 * only in its main thread, with the GIL. So a call that may take long runs on a
 * thread of its own while the calling thread waits, waking every 20 ms to run the
 * signal handlers (PyErr_CheckSignals); if one raises (KeyboardInterrupt), the
 * run's stop flag is set, the core returns MS_ERR_INTERRUPTED at its next check
 * (between layers, matrix panels, attention heads, sweep chunks), and the
 * exception propagates. The model is left as it was. Short calls run inline. */

/* A Python callable the core calls back (hooks, sweep progress), possibly from the
 * compute thread: the exception it raises is kept here for the calling thread. */
typedef struct {
    PyObject *fn;
    PyObject *exc_type, *exc_value, *exc_tb;
} py_callback;

/* with the GIL held: fn's exception, if any, into cb (it then is no longer set) */
static void keep_exception(py_callback *cb) {
    Py_CLEAR(cb->exc_type);
    Py_CLEAR(cb->exc_value);
    Py_CLEAR(cb->exc_tb);
    PyErr_Fetch(&cb->exc_type, &cb->exc_value, &cb->exc_tb);
}

/* with the GIL held: raise the kept exception (returns 1), or return 0 */
static int restore_exception(py_callback *cb) {
    if (!cb->exc_type) return 0;
    PyErr_Restore(cb->exc_type, cb->exc_value, cb->exc_tb); /* steals the references */
    cb->exc_type = cb->exc_value = cb->exc_tb = NULL;
    return 1;
}

static void drop_exception(py_callback *cb) {
    Py_CLEAR(cb->exc_type);
    Py_CLEAR(cb->exc_value);
    Py_CLEAR(cb->exc_tb);
}

typedef struct {
    ms_status (*fn)(void *arg, ms_error *err);
    void *arg;
    ms_error *err;
    volatile int stop; /* the plan's stop flag */
    ms_status st;
    int done;
    pthread_mutex_t lock;
    pthread_cond_t cond;
} core_call;

static void *core_call_main(void *p) {
    core_call *c = p;
    ms_status st = c->fn(c->arg, c->err);
    pthread_mutex_lock(&c->lock);
    c->st = st;
    c->done = 1;
    pthread_cond_signal(&c->cond);
    pthread_mutex_unlock(&c->lock);
    return NULL;
}

/* Call c->fn(c->arg) without the GIL; on its own thread if it may take long. Returns
 * its status; c->stop is nonzero if a signal handler raised (the exception is set). */
static ms_status call_core(core_call *c, int may_take_long) {
    ms_status st;
    pthread_t id;
    int threaded = may_take_long && pthread_mutex_init(&c->lock, NULL) == 0;
    if (threaded && pthread_cond_init(&c->cond, NULL) != 0) {
        pthread_mutex_destroy(&c->lock);
        threaded = 0;
    }
    if (threaded && pthread_create(&id, NULL, core_call_main, c) != 0) {
        pthread_cond_destroy(&c->cond);
        pthread_mutex_destroy(&c->lock);
        threaded = 0;
    }
    if (!threaded) {
        Py_BEGIN_ALLOW_THREADS
        st = c->fn(c->arg, c->err);
        Py_END_ALLOW_THREADS
        return st;
    }
    PyThreadState *ts = PyEval_SaveThread();
    pthread_mutex_lock(&c->lock);
    while (!c->done) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_nsec += 20 * 1000 * 1000;
        if (until.tv_nsec >= 1000000000L) until.tv_sec++, until.tv_nsec -= 1000000000L;
        pthread_cond_timedwait(&c->cond, &c->lock, &until);
        if (c->done || c->stop) continue;
        pthread_mutex_unlock(&c->lock);
        PyEval_RestoreThread(ts);
        if (PyErr_CheckSignals() < 0) c->stop = 1; /* the handler's exception stays set */
        ts = PyEval_SaveThread();
        pthread_mutex_lock(&c->lock);
    }
    pthread_mutex_unlock(&c->lock);
    pthread_join(id, NULL);
    PyEval_RestoreThread(ts);
    pthread_cond_destroy(&c->cond);
    pthread_mutex_destroy(&c->lock);
    return c->st;
}

static int call_python_hook(void *ctx, int id, ms_site site, int layer, float *value) {
    (void)site, (void)layer, (void)value; /* Python holds the arrays and knows the site by id */
    py_callback *cb = ctx;
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *res = PyObject_CallFunction(cb->fn, "i", id);
    int failed = res == NULL;
    Py_XDECREF(res);
    if (failed) keep_exception(cb);
    PyGILState_Release(g);
    return failed;
}

/* One action from the tuple
 * (kind, site, layer, row, src_row, a, b, c, value, value2, rank, out, id). */
static int parse_action(PyObject *keep, PyObject *t, ms_action *a, const ms_model *m, int R, int T) {
    PyObject *oa, *ob, *oc, *ov, *ov2, *oout;
    int kind, site;
    if (!PyArg_ParseTuple(t, "iiiiiOOOOOiOi", &kind, &site, &a->layer, &a->row, &a->src_row, &oa,
                          &ob, &oc, &ov, &ov2, &a->rank, &oout, &a->id))
        return -1;
    if (site < 0 || site >= MS_N_SITES || kind < 0 || kind > MS_DO_PROJECT_ROW) {
        PyErr_SetString(PyExc_ValueError, "action: unknown site or kind");
        return -1;
    }
    a->kind = (ms_action_kind)kind;
    a->site = (ms_site)site;
    npy_intp na, nb, nc, nv, nv2;
    int fl = NPY_ARRAY_IN_ARRAY;
    if (!(a->a = as_array(keep, oa, NPY_INT32, fl, 0, "action index a", &na)) && PyErr_Occurred()) return -1;
    if (!(a->b = as_array(keep, ob, NPY_INT32, fl, 0, "action index b", &nb)) && PyErr_Occurred()) return -1;
    if (!(a->c = as_array(keep, oc, NPY_INT32, fl, 0, "action index c", &nc)) && PyErr_Occurred()) return -1;
    a->n_a = (int)na, a->n_b = (int)nb, a->n_c = (int)nc;
    if (!(a->value = as_array(keep, ov, NPY_FLOAT32, fl, 0, "action value", &nv)) && PyErr_Occurred()) return -1;
    if (!(a->value2 = as_array(keep, ov2, NPY_FLOAT32, fl, 0, "action value2", &nv2)) && PyErr_Occurred()) return -1;
    /* sizes the core will read */
    npy_intp rows = a->row < 0 ? R : 1;
    npy_intp box = ms_site_is_attention(a->site) ? na * nb * nc : na * nb;
    npy_intp need = 0, need2 = 0;
    if (a->kind == MS_DO_SET || a->kind == MS_DO_ADD) need = rows * box;
    if (a->kind == MS_DO_SCALE) need = 1;
    if (a->kind == MS_DO_PROJECT) need = nb * (npy_intp)(a->rank > 0 ? a->rank : 1), need2 = rows * box;
    if (a->kind == MS_DO_PROJECT_ROW) need = nb * (npy_intp)(a->rank > 0 ? a->rank : 1);
    if (nv < need || nv2 < need2) {
        PyErr_Format(PyExc_ValueError, "action value: has %zd (and %zd) elements, needs %zd (and %zd)",
                     nv, nv2, need, need2);
        return -1;
    }
    npy_intp out_need = 0;
    if (a->kind == MS_DO_CACHE || a->kind == MS_DO_CALLBACK)
        out_need = ms_site_is_attention(a->site)
                       ? (npy_intp)R * m->cfg.n_heads * T * T
                       : (npy_intp)R * T * ms_site_width(&m->cfg, a->site);
    if (oout != Py_None) {
        if (!PyArray_Check(oout) || PyArray_TYPE((PyArrayObject *)oout) != NPY_FLOAT32 ||
            !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)oout) ||
            !PyArray_ISWRITEABLE((PyArrayObject *)oout) || PyArray_SIZE((PyArrayObject *)oout) < out_need) {
            PyErr_Format(PyExc_ValueError, "action out: needs a writeable C-contiguous float32 array of %zd elements", out_need);
            return -1;
        }
        if (PyList_Append(keep, oout) < 0) return -1;
        a->out = (float *)PyArray_DATA((PyArrayObject *)oout);
    } else {
        a->out = NULL;
    }
    return 0;
}

/* tokens [rows, pos] as int32 and the mask (or NULL), both kept alive by keep */
static int parse_tokens(PyObject *keep, PyObject *otok, PyObject *omask, int *n_rows, int *n_pos,
                        const int32_t **tokens, const int32_t **mask) {
    /* a copy, as for every index array (see as_array) */
    PyArrayObject *tok = (PyArrayObject *)PyArray_FROM_OTF(otok, NPY_INT32, NPY_ARRAY_IN_ARRAY | NPY_ARRAY_ENSURECOPY);
    if (!tok) return -1;
    int rc = PyList_Append(keep, (PyObject *)tok);
    Py_DECREF(tok); /* the keep list holds it */
    if (rc < 0) return -1;
    if (PyArray_NDIM(tok) != 2 || PyArray_DIM(tok, 0) < 1 || PyArray_DIM(tok, 1) < 1 ||
        PyArray_DIM(tok, 0) > INT32_MAX / 2 || PyArray_DIM(tok, 1) > INT32_MAX / 2) {
        PyErr_SetString(PyExc_ValueError, "tokens: expected a non-empty 2-D array [batch, pos]");
        return -1;
    }
    *n_rows = (int)PyArray_DIM(tok, 0);
    *n_pos = (int)PyArray_DIM(tok, 1);
    *tokens = PyArray_DATA(tok);
    *mask = as_array(keep, omask, NPY_INT32, NPY_ARRAY_IN_ARRAY, PyArray_SIZE(tok), "attention_mask", NULL);
    if (!*mask && PyErr_Occurred()) return -1;
    return 0;
}

/* A list of action tuples -> a calloc'ed array (freed by the caller), *n its length. */
static ms_action *parse_actions(PyObject *keep, PyObject *oactions, const ms_model *m, int R, int T,
                                int *n) {
    *n = 0;
    PyObject *seq = PySequence_Fast(oactions, "actions: expected a list");
    if (!seq) return NULL;
    int rc = PyList_Append(keep, seq);
    Py_DECREF(seq);
    if (rc < 0) return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    if (count > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "actions: too many");
        return NULL;
    }
    ms_action *actions = calloc((size_t)count + 1, sizeof(ms_action));
    if (!actions) {
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++)
        if (parse_action(keep, PySequence_Fast_GET_ITEM(seq, i), &actions[i], m, R, T) < 0) {
            free(actions);
            return NULL;
        }
    *n = (int)count;
    return actions;
}

/* The metric's arguments for B rows. */
static int parse_metric(PyObject *keep, int kind, PyObject *opos, PyObject *ocorrect, PyObject *owrong,
                        PyObject *oref, npy_intp B, npy_intp V, ms_metric *mt) {
    if (kind < MS_METRIC_LOGIT_DIFF || kind > MS_METRIC_ACCURACY) {
        PyErr_SetString(PyExc_ValueError, "metric: unknown kind");
        return -1;
    }
    mt->kind = (ms_metric_kind)kind;
    if (!(mt->pos = as_array(keep, opos, NPY_INT32, NPY_ARRAY_IN_ARRAY, B, "metric positions", NULL))) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "metric positions: missing");
        return -1;
    }
    mt->correct = as_array(keep, ocorrect, NPY_INT32, NPY_ARRAY_IN_ARRAY, B, "answer tokens", NULL);
    if (!mt->correct && PyErr_Occurred()) return -1;
    mt->wrong = as_array(keep, owrong, NPY_INT32, NPY_ARRAY_IN_ARRAY, B, "wrong tokens", NULL);
    if (!mt->wrong && PyErr_Occurred()) return -1;
    mt->ref_logprob = as_array(keep, oref, NPY_FLOAT32, NPY_ARRAY_IN_ARRAY, B * V,
                               "reference log-probabilities", NULL);
    if (!mt->ref_logprob && PyErr_Occurred()) return -1;
    return 0;
}

/* A new float32 array of the given shape, also kept alive by keep. Borrowed. */
static PyArrayObject *new_output(PyObject *keep, int nd, npy_intp *dims) {
    PyArrayObject *arr = (PyArrayObject *)PyArray_SimpleNew(nd, dims, NPY_FLOAT32);
    if (!arr) return NULL;
    int rc = PyList_Append(keep, (PyObject *)arr);
    Py_DECREF(arr);
    return rc < 0 ? NULL : arr;
}

/* The Python exception for a failed run: the one a signal handler raised (c->stop),
 * else the hook's own, else one from the message. */
static void raise_status(ms_status st, const ms_error *err, core_call *c, py_callback *cb) {
    if (c->stop) { /* KeyboardInterrupt (or whatever the handler raised) is set */
        drop_exception(cb);
        return;
    }
    if (restore_exception(cb) && st == MS_ERR_CALLBACK) return;
    PyErr_Clear();
    if (st == MS_ERR_INTERRUPTED) PyErr_SetNone(PyExc_KeyboardInterrupt);
    else PyErr_SetString(st == MS_ERR_MEMORY ? PyExc_MemoryError : PyExc_ValueError, err->message);
}

static ms_status run_plan(void *arg, ms_error *err) {
    void **a = arg; /* {model, plan} */
    return ms_run(a[0], a[1], err);
}

/* matmul FLOPs of a plan, roughly: to tell whether it may take long */
static double plan_flops(const ms_model *m, const ms_plan *p) {
    const ms_config *c = &m->cfg;
    double tokens = (double)p->n_rows * p->n_pos, C = c->d_model, F = c->d_mlp;
    double per_token = c->n_layers * (2.0 * (4.0 * C * C + 2.0 * C * F) + 4.0 * p->n_pos * C);
    double logit_rows = (double)p->n_rows * p->n_logit_pos + (p->metric.kind ? p->n_rows : 0);
    return tokens * per_token + logit_rows * 2.0 * C * c->d_vocab;
}

/* A recorded run state (keys and values of every token, for runs that resume it),
 * held by a capsule whose context is the model that recorded it. */
#define STATE_CAPSULE "mechscope._core.state"

static void free_state_capsule(PyObject *capsule) {
    ms_state *st = PyCapsule_GetPointer(capsule, STATE_CAPSULE);
    if (st) {
        ms_state_free(st);
        free(st);
    }
}

/* resuming rows of a run: every row r continues row r of `ostate` (a state capsule
 * this model recorded) from padded position start_pos[r] on, from the embedding; a
 * state with more rows than the run keeps its last rows as they are (the rows a
 * Source added to the recording run, which later steps of a generation leave out) */
static int parse_resume(PyObject *keep, ModelObject *self, PyObject *ostate, PyObject *ostart, ms_plan *plan) {
    if (!PyCapsule_IsValid(ostate, STATE_CAPSULE) || PyCapsule_GetContext(ostate) != (void *)self) {
        PyErr_SetString(PyExc_ValueError, "state: not a state this model recorded");
        return -1;
    }
    const ms_state *st = PyCapsule_GetPointer(ostate, STATE_CAPSULE);
    if (st->n_rows < plan->n_rows) {
        PyErr_Format(PyExc_ValueError, "state: recorded for %d rows, fewer than the run's %d", st->n_rows,
                     plan->n_rows);
        return -1;
    }
    npy_intp n = 0;
    plan->start_pos = as_array(keep, ostart, NPY_INT32, NPY_ARRAY_IN_ARRAY, 0, "start_pos", &n);
    if (!plan->start_pos) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "start_pos: needed with a state");
        return -1;
    }
    if (n != plan->n_rows) {
        PyErr_Format(PyExc_ValueError, "start_pos: expected %d positions, got %zd", plan->n_rows, n);
        return -1;
    }
    npy_intp dims[1] = {plan->n_rows};
    PyArrayObject *rows = (PyArrayObject *)PyArray_ZEROS(1, dims, NPY_INT32, 0);
    PyArrayObject *layers = (PyArrayObject *)PyArray_ZEROS(1, dims, NPY_INT32, 0);
    int ok = rows && layers && PyList_Append(keep, (PyObject *)rows) == 0 &&
             PyList_Append(keep, (PyObject *)layers) == 0;
    Py_XDECREF(rows);
    Py_XDECREF(layers);
    if (!ok) return -1;
    int32_t *row = PyArray_DATA(rows), *layer = PyArray_DATA(layers);
    for (int r = 0; r < plan->n_rows; r++) row[r] = r, layer[r] = -1;
    plan->base = st;
    plan->base_row = row;
    plan->start_layer = layer;
    return 0;
}

static PyObject *Model_run(ModelObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"tokens", "mask", "actions", "logit_pos", "logits", "hook",
                             "metric", "metric_pos", "correct", "wrong", "ref_logprob",
                             "state", "start_pos", "record", "capacity", NULL};
    PyObject *otok, *omask = Py_None, *oactions = Py_None, *olpos = Py_None, *ologits = Py_None,
                    *hook = Py_None, *opos = Py_None, *ocorrect = Py_None, *owrong = Py_None,
                    *oref = Py_None, *ostate = Py_None, *ostart = Py_None;
    int metric = 0, record = 0, capacity = 0;
    PyObject *keep = NULL, *result = NULL, *capsule = NULL;
    ms_state *recorded = NULL;
    ms_action *actions = NULL;
    PyArrayObject *metric_out = NULL;
    ms_plan plan = {0};
    ms_error err = {{0}};
    py_callback hook_cb = {0};
    void *run_args[2] = {&self->model, &plan};
    core_call call = {run_plan, run_args, &err, 0, MS_OK, 0};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|OOOOOiOOOOOOpi", kwlist, &otok, &omask, &oactions,
                                     &olpos, &ologits, &hook, &metric, &opos, &ocorrect, &owrong,
                                     &oref, &ostate, &ostart, &record, &capacity))
        return NULL;
    if (!(keep = PyList_New(0))) goto fail; /* every converted array, alive until the end */
    if (parse_tokens(keep, otok, omask, &plan.n_rows, &plan.n_pos, &plan.tokens, &plan.mask) < 0)
        goto fail;
    if (ostate != Py_None && parse_resume(keep, self, ostate, ostart, &plan) < 0) goto fail;
    if (ostate == Py_None && ostart != Py_None) {
        PyErr_SetString(PyExc_ValueError, "start_pos: only with a state");
        goto fail;
    }
    if (record && ostate != Py_None) {
        /* a run that resumes a state and records appends its tokens to that state, in place */
        plan.record = (ms_state *)plan.base;
    } else if (record) {
        /* the capsule owns the state once the run has filled it */
        if (!(recorded = calloc(1, sizeof *recorded))) {
            PyErr_NoMemory();
            goto fail;
        }
        plan.record = recorded;
        plan.record_capacity = capacity;
    } else if (capacity) {
        PyErr_SetString(PyExc_ValueError, "capacity: only for a run that records a new state");
        goto fail;
    }
    if (oactions != Py_None) {
        if (!(actions = parse_actions(keep, oactions, &self->model, plan.n_rows, plan.n_pos, &plan.n_actions)))
            goto fail;
        plan.actions = actions;
    }
    if (olpos != Py_None) {
        npy_intp nl = 0;
        plan.logit_pos = as_array(keep, olpos, NPY_INT32, NPY_ARRAY_IN_ARRAY, 0, "logit_pos", &nl);
        if (!plan.logit_pos) goto fail;
        if (nl % plan.n_rows) {
            PyErr_SetString(PyExc_ValueError, "logit_pos: expected [batch, n] positions");
            goto fail;
        }
        plan.n_logit_pos = (int)(nl / plan.n_rows);
        npy_intp need = nl * self->model.cfg.d_vocab;
        if (!PyArray_Check(ologits) || PyArray_TYPE((PyArrayObject *)ologits) != NPY_FLOAT32 ||
            !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)ologits) ||
            !PyArray_ISWRITEABLE((PyArrayObject *)ologits) || PyArray_SIZE((PyArrayObject *)ologits) < need) {
            PyErr_Format(PyExc_ValueError, "logits: needs a writeable C-contiguous float32 array of %zd elements", need);
            goto fail;
        }
        plan.logits = PyArray_DATA((PyArrayObject *)ologits);
    }
    if (hook != Py_None) {
        plan.callback = call_python_hook;
        plan.callback_ctx = &hook_cb;
        hook_cb.fn = hook;
    }
    plan.n_threads = ms_get_num_threads();
    if (metric != MS_METRIC_NONE) {
        npy_intp B = plan.n_rows;
        if (parse_metric(keep, metric, opos, ocorrect, owrong, oref, B, self->model.cfg.d_vocab, &plan.metric) < 0)
            goto fail;
        if (!(metric_out = new_output(keep, 1, &B))) goto fail;
        plan.metric_out = PyArray_DATA(metric_out);
    }

    plan.stop = &call.stop;
    /* about a second of work on one slow core at 2^30 FLOP/s */
    ms_status st = call_core(&call, plan_flops(&self->model, &plan) > (double)(1 << 28));
    if (st || call.stop) {
        raise_status(st, &err, &call, &hook_cb);
        goto fail;
    }
    if (record && ostate != Py_None) { /* the state appended to */
        result = Py_BuildValue("(OO)", metric_out ? (PyObject *)metric_out : Py_None, ostate);
        goto fail;
    }
    if (record) {
        if (!(capsule = PyCapsule_New(recorded, STATE_CAPSULE, free_state_capsule))) goto fail;
        recorded = NULL;
        if (PyCapsule_SetContext(capsule, self) < 0) goto fail;
        result = Py_BuildValue("(OO)", metric_out ? (PyObject *)metric_out : Py_None, capsule);
        goto fail; /* the tuple holds its own references */
    }
    result = metric_out ? (PyObject *)metric_out : Py_None;
    Py_INCREF(result);
fail:
    if (recorded) { /* a run that failed frees what it recorded (ms_run) */
        ms_state_free(recorded);
        free(recorded);
    }
    Py_XDECREF(capsule);
    free(actions);
    Py_XDECREF(keep);
    return result;
}

/* progress of a sweep, reported to a Python callable between chunks */
static int call_python_progress(void *ctx, int done, int total) {
    py_callback *cb = ctx;
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *res = PyObject_CallFunction(cb->fn, "ii", done, total);
    int failed = res == NULL;
    Py_XDECREF(res);
    if (failed) keep_exception(cb);
    PyGILState_Release(g);
    return failed;
}

static ms_status run_sweep(void *arg, ms_error *err) {
    void **a = arg; /* {model, sweep plan, out, base_out} */
    return ms_sweep(a[0], a[1], a[2], a[3], err);
}

/* One write from the tuple (site, layer, a0, na, b0, nb, c0, nc, source): the source
 * is the site's full value [rows, ...] in the padded layout. */
static int parse_write(PyObject *keep, PyObject *t, ms_write *w, const ms_model *m, int B, int T) {
    PyObject *osrc;
    int site;
    if (!PyArg_ParseTuple(t, "iiiiiiiiO", &site, &w->layer, &w->a0, &w->na, &w->b0, &w->nb, &w->c0,
                          &w->nc, &osrc))
        return -1;
    if (site < 0 || site >= MS_N_SITES) {
        PyErr_SetString(PyExc_ValueError, "write: unknown site");
        return -1;
    }
    w->site = (ms_site)site;
    npy_intp size = 0;
    w->source = as_array(keep, osrc, NPY_FLOAT32, NPY_ARRAY_IN_ARRAY, 0, "write source", &size);
    if (!w->source) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "write: no source");
        return -1;
    }
    npy_intp row = ms_site_is_attention(w->site) ? (npy_intp)m->cfg.n_heads * T * T
                                                 : (npy_intp)T * ms_site_width(&m->cfg, w->site);
    if (size == row * B) w->source_rows = B;
    else if (size == row) w->source_rows = 1;
    else {
        PyErr_Format(PyExc_ValueError, "write source: has %zd elements, expected %zd (all rows) or %zd (one row)",
                     size, row * B, row);
        return -1;
    }
    return 0;
}

static PyObject *Model_sweep(ModelObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"tokens", "mask", "base_actions", "writes", "patches", "metric", "pos",
                             "correct", "wrong", "ref_logprob", "chunk_bytes", "progress", NULL};
    PyObject *otok, *omask, *obase, *owrites, *opatch, *opos, *ocorrect, *owrong, *oref, *progress;
    int metric;
    Py_ssize_t chunk_bytes;
    PyObject *keep = NULL, *result = NULL;
    ms_action *base_actions = NULL;
    ms_write *writes = NULL;
    ms_patch *patches = NULL;
    ms_sweep_plan s = {0};
    ms_error err = {{0}};
    py_callback progress_cb = {0};
    void *sweep_args[4] = {&self->model, &s, NULL, NULL};
    core_call call = {run_sweep, sweep_args, &err, 0, MS_OK, 0};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOiOOOOnO", kwlist, &otok, &omask, &obase,
                                     &owrites, &opatch, &metric, &opos, &ocorrect, &owrong, &oref,
                                     &chunk_bytes, &progress))
        return NULL;
    if (!(keep = PyList_New(0))) return NULL;
    if (parse_tokens(keep, otok, omask, &s.n_rows, &s.n_pos, &s.tokens, &s.mask) < 0) goto fail;
    if (!(base_actions = parse_actions(keep, obase, &self->model, s.n_rows, s.n_pos, &s.n_base_actions)))
        goto fail;
    s.base_actions = base_actions;

    PyObject *seq = PySequence_Fast(owrites, "writes: expected a list");
    if (!seq) goto fail;
    if (PyList_Append(keep, seq) < 0) { Py_DECREF(seq); goto fail; }
    Py_DECREF(seq);
    Py_ssize_t n_writes = PySequence_Fast_GET_SIZE(seq);
    if (n_writes > INT32_MAX) { PyErr_SetString(PyExc_ValueError, "writes: too many"); goto fail; }
    if (!(writes = calloc((size_t)n_writes + 1, sizeof(ms_write)))) { PyErr_NoMemory(); goto fail; }
    for (Py_ssize_t i = 0; i < n_writes; i++)
        if (parse_write(keep, PySequence_Fast_GET_ITEM(seq, i), &writes[i], &self->model, s.n_rows, s.n_pos) < 0)
            goto fail;
    s.n_writes = (int)n_writes;
    s.writes = writes;

    /* patches: [n, 2] int32 (first write, number of writes) */
    npy_intp np2 = 0;
    const int32_t *pd = as_array(keep, opatch, NPY_INT32, NPY_ARRAY_IN_ARRAY, 0, "patches", &np2);
    if (!pd || np2 % 2) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "patches: expected [n, 2] ints");
        goto fail;
    }
    s.n_patches = (int)(np2 / 2);
    if (!(patches = calloc((size_t)s.n_patches + 1, sizeof(ms_patch)))) { PyErr_NoMemory(); goto fail; }
    for (int i = 0; i < s.n_patches; i++) patches[i] = (ms_patch){pd[2 * i], pd[2 * i + 1]};
    s.patches = patches;

    if (parse_metric(keep, metric, opos, ocorrect, owrong, oref, s.n_rows, self->model.cfg.d_vocab, &s.metric) < 0)
        goto fail;
    s.chunk_bytes = chunk_bytes > 0 ? (size_t)chunk_bytes : 1;
    if (progress != Py_None) {
        s.progress = call_python_progress;
        s.progress_ctx = &progress_cb;
        progress_cb.fn = progress;
    }
    s.n_threads = ms_get_num_threads();
    npy_intp dims[2] = {s.n_patches, s.n_rows};
    PyArrayObject *out = new_output(keep, 2, dims), *base = new_output(keep, 1, &dims[1]);
    if (!out || !base) goto fail;
    sweep_args[2] = PyArray_DATA(out);
    sweep_args[3] = PyArray_DATA(base);
    s.stop = &call.stop;
    ms_status st = call_core(&call, 1); /* sweeps are long, as a rule */
    if (st || call.stop) {
        raise_status(st, &err, &call, &progress_cb);
        goto fail;
    }
    result = Py_BuildValue("(OO)", out, base); /* new references to both */
fail:
    free(base_actions);
    free(writes);
    free(patches);
    Py_XDECREF(keep);
    return result;
}

/* ---- gradients ----------------------------------------------------------------- */

/* the weight-gradient arrays of a call (every array of its dict, including one the
 * core never adds to, such as a tied unembedding's), which the run zeroes first */
typedef struct {
    float **data;
    size_t *size;
    int n;
} grad_arrays;

static ms_status run_grad(void *arg, ms_error *err) {
    void **a = arg; /* {model, plan, grad plan, weight-gradient arrays} */
    const grad_arrays *all = a[3];
    for (int i = 0; i < all->n; i++) ms_zero_floats(all->data[i], all->size[i]);
    return ms_grad(a[0], a[1], a[2], err);
}

/* 1 if obj is a C-contiguous float32 array (writeable if asked) of n elements (n < 0:
 * any), else 0 with a ValueError */
static int is_float_array(PyObject *obj, const char *name, npy_intp n, int writeable) {
    if (!PyArray_Check(obj) || PyArray_TYPE((PyArrayObject *)obj) != NPY_FLOAT32 ||
        !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)obj) || (writeable && !PyArray_ISWRITEABLE((PyArrayObject *)obj)) ||
        (n >= 0 && PyArray_SIZE((PyArrayObject *)obj) != n)) {
        if (n >= 0)
            PyErr_Format(PyExc_ValueError, "%s: needs a %sC-contiguous float32 array of %zd elements", name,
                         writeable ? "writeable " : "", n);
        else
            PyErr_Format(PyExc_ValueError, "%s: needs a %sC-contiguous float32 array", name, writeable ? "writeable " : "");
        return 0;
    }
    return 1;
}

/* grads[name]: a writeable C-contiguous float32 array of exactly n elements, or NULL
 * (absent: that gradient is not wanted); *bad set on a wrong array (exception set).
 * parse_weight_grads has kept a reference to every array of grads already. */
static float *grad_array(PyObject *grads, const char *name, size_t n, int *bad) {
    PyObject *obj = PyDict_GetItemString(grads, name); /* borrowed */
    if (!obj) return NULL;
    if (!is_float_array(obj, name, (npy_intp)n, 1)) {
        *bad = 1;
        return NULL;
    }
    return (float *)PyArray_DATA((PyArrayObject *)obj);
}

/* the gradient of a block of a fused matrix: the same offset into the gradient's buffer */
static float *same_offset(float *grad_base, const float *block, const float *base) {
    return grad_base && block ? grad_base + (block - base) : NULL;
}

/* weight gradients under the core's names (as Model_init's weights) -> wg, whose
 * blocks are calloc'ed, and all (every array of the dict, to zero), both freed by
 * the caller */
static int parse_weight_grads(PyObject *keep, PyObject *grads, const ms_model *m, ms_weight_grad *wg,
                              grad_arrays *all) {
    const ms_config *c = &m->cfg;
    size_t C = (size_t)c->d_model, F = (size_t)c->d_mlp, V = (size_t)c->d_vocab;
    size_t QD = (size_t)c->n_heads * c->d_head, KD = (size_t)c->n_kv_heads * c->d_head, QW = QD + 2 * KD;
    size_t FW = F * (c->gated_mlp ? 2 : 1);
    int bad = 0;
    char name[160];
    if (!PyDict_Check(grads)) {
        PyErr_SetString(PyExc_TypeError, "weight gradients: expected a dict");
        return -1;
    }
    wg->blocks = calloc((size_t)c->n_layers, sizeof(ms_block_grad));
    size_t n_arrays = (size_t)PyDict_Size(grads) + 1;
    all->data = malloc(sizeof(float *) * n_arrays);
    all->size = malloc(sizeof(size_t) * n_arrays);
    if (!wg->blocks || !all->data || !all->size) {
        PyErr_NoMemory();
        return -1;
    }
    PyObject *key, *value; /* borrowed */
    Py_ssize_t at = 0;
    while (PyDict_Next(grads, &at, &key, &value)) {
        if (!is_float_array(value, "weight gradients", -1, 1) || PyList_Append(keep, value) < 0) return -1;
        all->data[all->n] = (float *)PyArray_DATA((PyArrayObject *)value);
        all->size[all->n++] = (size_t)PyArray_SIZE((PyArrayObject *)value);
    }
    wg->wte = grad_array(grads, "embed", V * C, &bad);
    if (m->wpe) wg->wpe = grad_array(grads, "pos_embed", (size_t)c->n_ctx * C, &bad);
    wg->lnf_w = grad_array(grads, "ln_final.w", C, &bad);
    if (m->lnf_b) wg->lnf_b = grad_array(grads, "ln_final.b", C, &bad);
    wg->unembed = m->unembed == m->wte ? wg->wte : grad_array(grads, "unembed", V * C, &bad);
    if (m->unembed_b) wg->unembed_b = grad_array(grads, "unembed.b", V, &bad);
    for (int l = 0; l < c->n_layers && !bad; l++) {
        const ms_block *b = &m->blocks[l];
        ms_block_grad *g = &wg->blocks[l];
#define NAME(suffix) (snprintf(name, sizeof name, "blocks.%d.%s", l, suffix), name)
        if (b->ln1_w) g->ln1_w = grad_array(grads, NAME("ln1.w"), C, &bad);
        if (b->ln1_b) g->ln1_b = grad_array(grads, NAME("ln1.b"), C, &bad);
        float *wqkv = grad_array(grads, NAME("attn.w_qkv"), C * QW, &bad);
        float *bqkv = b->q.b ? grad_array(grads, NAME("attn.b_qkv"), QW, &bad) : NULL;
        g->q = (ms_linear_grad){same_offset(wqkv, b->q.w, b->q.w), same_offset(bqkv, b->q.b, b->q.b)};
        g->k = (ms_linear_grad){same_offset(wqkv, b->k.w, b->q.w), same_offset(bqkv, b->k.b, b->q.b)};
        g->v = (ms_linear_grad){same_offset(wqkv, b->v.w, b->q.w), same_offset(bqkv, b->v.b, b->q.b)};
        g->o.w = grad_array(grads, NAME("attn.w_o"), QD * C, &bad);
        if (b->o.b) g->o.b = grad_array(grads, NAME("attn.b_o"), C, &bad);
        if (c->qk_norm) {
            g->q_norm_w = grad_array(grads, NAME("attn.q_norm.w"), c->qk_norm == 2 ? QD : (size_t)c->d_head, &bad);
            g->k_norm_w = grad_array(grads, NAME("attn.k_norm.w"), c->qk_norm == 2 ? KD : (size_t)c->d_head, &bad);
        }
        if (b->ln2_w) g->ln2_w = grad_array(grads, NAME("ln2.w"), C, &bad);
        if (b->ln2_b) g->ln2_b = grad_array(grads, NAME("ln2.b"), C, &bad);
        if (c->post_norms) {
            g->ln1_post_w = grad_array(grads, NAME("ln1_post.w"), C, &bad);
            g->ln2_post_w = grad_array(grads, NAME("ln2_post.w"), C, &bad);
        }
        const ms_linear_weight *first = c->gated_mlp ? &b->mlp_gate : &b->mlp_in;
        size_t E = c->n_experts ? (size_t)c->n_experts : 1; /* a mixture's experts are stacked */
        if (c->n_experts) g->router.w = grad_array(grads, NAME("mlp.w_router"), C * E, &bad);
        float *win = grad_array(grads, NAME("mlp.w_in"), E * C * FW, &bad);
        float *bin = first->b ? grad_array(grads, NAME("mlp.b_in"), FW, &bad) : NULL;
        g->mlp_in = (ms_linear_grad){same_offset(win, b->mlp_in.w, first->w), same_offset(bin, b->mlp_in.b, first->b)};
        if (c->gated_mlp)
            g->mlp_gate = (ms_linear_grad){same_offset(win, b->mlp_gate.w, first->w),
                                           same_offset(bin, b->mlp_gate.b, first->b)};
        g->mlp_out.w = grad_array(grads, NAME("mlp.w_out"), E * F * C, &bad);
        if (b->mlp_out.b) g->mlp_out.b = grad_array(grads, NAME("mlp.b_out"), C, &bad);
        if (c->d_shared) {
            size_t S = (size_t)c->d_shared;
            float *sw = grad_array(grads, NAME("mlp.shared.w_in"), C * 2 * S, &bad);
            g->shared_gate.w = sw;
            g->shared_in.w = same_offset(sw, b->shared_in.w, b->shared_gate.w);
            g->shared_out.w = grad_array(grads, NAME("mlp.shared.w_out"), S * C, &bad);
            g->shared_router.w = grad_array(grads, NAME("mlp.shared.w_router"), C, &bad);
        }
#undef NAME
    }
    return bad ? -1 : 0;
}

/* grad(tokens, mask, actions, n_metric_rows, metric, metric_pos, correct, wrong, ref_logprob,
 *      cross_entropy, sites, weight_grads, start_block=-1, start_resid=None) -> (value,
 * metric [n_metric_rows]); sites is a list of (site, layer, out) and weight_grads a dict
 * of arrays (or None) that the gradients overwrite. start_resid [rows, pos, d_model]: the
 * rows' hook_resid_pre at start_block, where the run then starts (ms_plan). */
static PyObject *Model_grad(ModelObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"tokens", "mask", "actions", "n_metric_rows", "metric", "metric_pos", "correct",
                             "wrong", "ref_logprob", "cross_entropy", "sites", "weight_grads", "start_block",
                             "start_resid", "seeds", NULL};
    PyObject *otok, *omask, *oactions, *opos, *ocorrect, *owrong, *oref, *osites, *ograds, *ostart = Py_None;
    PyObject *oseeds = Py_None;
    int n_metric_rows, metric, cross_entropy, start_block = -1;
    PyObject *keep = NULL, *result = NULL;
    ms_action *actions = NULL;
    ms_grad_site *gsites = NULL;
    ms_grad_seed *gseeds = NULL;
    ms_weight_grad wg = {0};
    grad_arrays all = {0};
    ms_plan plan = {0};
    ms_grad_plan gp = {0};
    ms_error err = {{0}};
    py_callback none_cb = {0};
    double value = 0.0;
    void *grad_args[4] = {&self->model, &plan, &gp, &all};
    core_call call = {run_grad, grad_args, &err, 0, MS_OK, 0};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOiiOOOOiOO|iOO", kwlist, &otok, &omask, &oactions,
                                     &n_metric_rows, &metric, &opos, &ocorrect, &owrong, &oref, &cross_entropy, &osites,
                                     &ograds, &start_block, &ostart, &oseeds))
        return NULL;
    if (!(keep = PyList_New(0))) return NULL;
    if (parse_tokens(keep, otok, omask, &plan.n_rows, &plan.n_pos, &plan.tokens, &plan.mask) < 0) goto fail;
    if (ostart != Py_None) {
        PyArrayObject *start = (PyArrayObject *)PyArray_FROM_OTF(ostart, NPY_FLOAT32, NPY_ARRAY_IN_ARRAY);
        if (!start) goto fail;
        int bad = PyList_Append(keep, (PyObject *)start);
        Py_DECREF(start);
        if (bad < 0) goto fail;
        if (PyArray_NDIM(start) != 3 || PyArray_DIM(start, 0) != plan.n_rows || PyArray_DIM(start, 1) != plan.n_pos ||
            PyArray_DIM(start, 2) != self->model.cfg.d_model) {
            PyErr_Format(PyExc_ValueError, "start_resid: expected shape [%d, %d, %d]", plan.n_rows, plan.n_pos,
                         self->model.cfg.d_model);
            goto fail;
        }
        plan.start_resid = PyArray_DATA(start);
        plan.start_block = start_block;
    }
    if (!(actions = parse_actions(keep, oactions, &self->model, plan.n_rows, plan.n_pos, &plan.n_actions)))
        goto fail;
    plan.actions = actions;
    plan.n_threads = ms_get_num_threads();
    if (n_metric_rows < 1 || n_metric_rows > plan.n_rows) {
        PyErr_SetString(PyExc_ValueError, "n_metric_rows: out of range");
        goto fail;
    }
    gp.n_metric_rows = n_metric_rows;
    gp.cross_entropy = cross_entropy != 0;
    if (!cross_entropy && metric != MS_METRIC_NONE &&
        parse_metric(keep, metric, opos, ocorrect, owrong, oref, plan.n_rows, self->model.cfg.d_vocab, &gp.metric) < 0)
        goto fail;
    if (oseeds != Py_None) {
        PyObject *sseq = PySequence_Fast(oseeds, "seeds: expected a list");
        if (!sseq) goto fail;
        if (PyList_Append(keep, sseq) < 0) { Py_DECREF(sseq); goto fail; }
        Py_DECREF(sseq);
        Py_ssize_t n_seeds = PySequence_Fast_GET_SIZE(sseq);
        if (!(gseeds = calloc((size_t)n_seeds + 1, sizeof(ms_grad_seed)))) { PyErr_NoMemory(); goto fail; }
        for (Py_ssize_t i = 0; i < n_seeds; i++) {
            int site, layer;
            PyObject *ovalue;
            if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(sseq, i), "iiO", &site, &layer, &ovalue)) goto fail;
            if (site < 0 || site >= MS_N_SITES || ms_site_is_attention((ms_site)site)) {
                PyErr_SetString(PyExc_ValueError, "seeds: expected a token site");
                goto fail;
            }
            npy_intp need = (npy_intp)plan.n_rows * plan.n_pos * ms_site_width(&self->model.cfg, (ms_site)site);
            const float *v = as_array(keep, ovalue, NPY_FLOAT32, NPY_ARRAY_IN_ARRAY, need, "seeds: value", NULL);
            if (!v) {
                if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "seeds: value missing");
                goto fail;
            }
            gseeds[i] = (ms_grad_seed){(ms_site)site, layer, v};
        }
        gp.n_seeds = (int)n_seeds;
        gp.seeds = gseeds;
    }
    npy_intp B = n_metric_rows;
    PyArrayObject *metric_out = new_output(keep, 1, &B);
    if (!metric_out) goto fail;
    gp.metric_out = PyArray_DATA(metric_out);
    gp.value_out = &value;

    PyObject *seq = PySequence_Fast(osites, "sites: expected a list");
    if (!seq) goto fail;
    if (PyList_Append(keep, seq) < 0) { Py_DECREF(seq); goto fail; }
    Py_DECREF(seq);
    Py_ssize_t n_sites = PySequence_Fast_GET_SIZE(seq);
    if (!(gsites = calloc((size_t)n_sites + 1, sizeof(ms_grad_site)))) { PyErr_NoMemory(); goto fail; }
    for (Py_ssize_t i = 0; i < n_sites; i++) {
        int site, layer;
        PyObject *oout;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "iiO", &site, &layer, &oout)) goto fail;
        if (site < 0 || site >= MS_N_SITES) {
            PyErr_SetString(PyExc_ValueError, "sites: unknown site");
            goto fail;
        }
        npy_intp need = ms_site_is_attention((ms_site)site)
                            ? (npy_intp)plan.n_rows * self->model.cfg.n_heads * plan.n_pos * plan.n_pos
                            : (npy_intp)plan.n_rows * plan.n_pos * ms_site_width(&self->model.cfg, (ms_site)site);
        if (!PyArray_Check(oout) || PyArray_TYPE((PyArrayObject *)oout) != NPY_FLOAT32 ||
            !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)oout) || !PyArray_ISWRITEABLE((PyArrayObject *)oout) ||
            PyArray_SIZE((PyArrayObject *)oout) < need) {
            PyErr_Format(PyExc_ValueError, "sites: output needs a writeable C-contiguous float32 array of %zd elements",
                         need);
            goto fail;
        }
        if (PyList_Append(keep, oout) < 0) goto fail;
        gsites[i] = (ms_grad_site){(ms_site)site, layer, PyArray_DATA((PyArrayObject *)oout)};
    }
    gp.n_sites = (int)n_sites;
    gp.sites = gsites;
    if (ograds != Py_None) {
        if (parse_weight_grads(keep, ograds, &self->model, &wg, &all) < 0) goto fail;
        gp.weights = &wg;
    }
    plan.stop = &call.stop;
    double flops = 3.0 * plan_flops(&self->model, &plan);
    ms_status st = call_core(&call, flops > (double)(1 << 28));
    if (st || call.stop) {
        raise_status(st, &err, &call, &none_cb);
        goto fail;
    }
    result = Py_BuildValue("(dO)", value, metric_out);
fail:
    free(actions);
    free(gsites);
    free(gseeds);
    free(wg.blocks);
    free(all.data);
    free(all.size);
    Py_XDECREF(keep);
    return result;
}

/* The attention mask [batch, pos] of a workspace estimate, converted to int32 and placed
 * in the plan; the caller releases the returned reference. NULL with an exception set. */
static PyArrayObject *plan_mask(PyObject *ormask, ms_plan *plan) {
    PyArrayObject *mask = (PyArrayObject *)PyArray_FROM_OTF(ormask, NPY_INT32, NPY_ARRAY_IN_ARRAY);
    if (!mask) return NULL;
    if (PyArray_NDIM(mask) != 2) {
        Py_DECREF(mask);
        PyErr_SetString(PyExc_ValueError, "attention_mask: expected [batch, pos]");
        return NULL;
    }
    plan->n_rows = (int)PyArray_DIM(mask, 0);
    plan->n_pos = (int)PyArray_DIM(mask, 1);
    plan->mask = PyArray_DATA(mask);
    return mask;
}

static PyObject *Model_grad_workspace_bytes(ModelObject *self, PyObject *args) {
    PyObject *ormask;
    if (!PyArg_ParseTuple(args, "O", &ormask)) return NULL;
    ms_plan plan = {0};
    ms_grad_plan gp = {0};
    PyArrayObject *mask = plan_mask(ormask, &plan);
    if (!mask) return NULL;
    size_t bytes = ms_grad_workspace_bytes(&self->model, &plan, &gp);
    Py_DECREF(mask);
    return PyLong_FromSize_t(bytes);
}

static PyObject *Model_workspace_bytes(ModelObject *self, PyObject *args) {
    PyObject *ormask;
    int n_logit_pos;
    if (!PyArg_ParseTuple(args, "Oi", &ormask, &n_logit_pos)) return NULL;
    ms_plan plan = {0};
    PyArrayObject *mask = plan_mask(ormask, &plan);
    if (!mask) return NULL;
    plan.n_logit_pos = n_logit_pos;
    size_t bytes = ms_run_workspace_bytes(&self->model, &plan);
    Py_DECREF(mask);
    return PyLong_FromSize_t(bytes);
}

static PyMethodDef Model_methods[] = {
    {"run", (PyCFunction)(void (*)(void))Model_run, METH_VARARGS | METH_KEYWORDS,
     "run(tokens, mask=None, actions=None, logit_pos=None, logits=None, hook=None)\n"
     "Execute one plan; results are written into the arrays passed in."},
    {"sweep", (PyCFunction)(void (*)(void))Model_sweep, METH_VARARGS | METH_KEYWORDS,
     "sweep(tokens, mask, base_actions, writes, patches, metric, pos, correct, wrong, ref_logprob,\n"
     "      chunk_bytes, progress)\n"
     "-> (float32 [n_patches, batch], float32 [batch]): the metric of every row under every\n"
     "patch, and of the unpatched base run."},
    {"grad", (PyCFunction)(void (*)(void))Model_grad, METH_VARARGS | METH_KEYWORDS,
     "grad(tokens, mask, actions, n_metric_rows, metric, metric_pos, correct, wrong, ref_logprob,\n"
     "     cross_entropy, sites, weight_grads, start_block, start_resid, seeds) -> (value, float32 [n_metric_rows])\n"
     "Forward and backward pass; site gradients and weight gradients (+=) written into the arrays given."},
    {"grad_workspace_bytes", (PyCFunction)Model_grad_workspace_bytes, METH_VARARGS,
     "grad_workspace_bytes(mask) -> bytes of working memory a gradient run needs"},
    {"workspace_bytes", (PyCFunction)Model_workspace_bytes, METH_VARARGS,
     "workspace_bytes(mask, n_logit_pos) -> bytes of working memory a run needs"},
    {NULL, NULL, 0, NULL}};

static PyTypeObject ModelType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "mechscope._core.Model",
    .tp_basicsize = sizeof(ModelObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A GPT-2-family model over float32 weight arrays (see mechscope.Model).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Model_init,
    .tp_dealloc = (destructor)Model_dealloc,
    .tp_methods = Model_methods,
};

/* ---- module functions --------------------------------------------------------- */

static PyObject *py_set_num_threads(PyObject *mod, PyObject *arg) {
    (void)mod;
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 1 || n > 1024) {
        PyErr_SetString(PyExc_ValueError, "n: expected a thread count from 1 to 1024");
        return NULL;
    }
    ms_set_num_threads((int)n);
    Py_RETURN_NONE;
}

static PyObject *py_get_num_threads(PyObject *mod, PyObject *unused) {
    (void)mod, (void)unused;
    return PyLong_FromLong(ms_get_num_threads());
}

static PyObject *py_blas_info(PyObject *mod, PyObject *unused) {
    (void)mod, (void)unused;
    return Py_BuildValue("(sss)", ms_blas_config(), ms_blas_corename(), ms_kernels_name());
}

/* fma_peak() -> (GFLOP/s, instructions): the multiply-add peak on ms.get_num_threads() threads */
static PyObject *py_fma_peak(PyObject *mod, PyObject *unused) {
    (void)mod, (void)unused;
    const char *instructions = "";
    double gflops;
    int n_threads = ms_get_num_threads();
    Py_BEGIN_ALLOW_THREADS
    gflops = ms_fma_peak(n_threads, &instructions);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(ds)", gflops, instructions);
}

/* adamw(p, g, m, v, decay, beta1, beta2, eps, step_size, bc2_sqrt, grad_scale): one AdamW
 * step, in place (g itself is not changed) */
static PyObject *py_adamw(PyObject *mod, PyObject *args) {
    (void)mod;
    PyObject *op, *og, *om, *ov;
    ms_adamw_args a;
    if (!PyArg_ParseTuple(args, "OOOOfffffff", &op, &og, &om, &ov, &a.decay, &a.beta1, &a.beta2, &a.eps,
                          &a.step_size, &a.bc2_sqrt, &a.grad_scale))
        return NULL;
    if (!is_float_array(op, "param", -1, 1)) return NULL;
    npy_intp n = PyArray_SIZE((PyArrayObject *)op);
    if (!is_float_array(og, "grad", n, 0) || !is_float_array(om, "exp_avg", n, 1) ||
        !is_float_array(ov, "exp_avg_sq", n, 1))
        return NULL;
    float *p = PyArray_DATA((PyArrayObject *)op), *m = PyArray_DATA((PyArrayObject *)om);
    float *v = PyArray_DATA((PyArrayObject *)ov);
    const float *g = PyArray_DATA((PyArrayObject *)og);
    int n_threads = ms_get_num_threads();
    Py_BEGIN_ALLOW_THREADS
    ms_adamw(p, g, m, v, (size_t)n, &a, n_threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* gated_post(x, activation) -> out: x a float32 array [n, 2F] (gate | up), out [n, F] =
 * act(gate) * up with the core's activation of that code */
static PyObject *py_gated_post(PyObject *mod, PyObject *args) {
    (void)mod;
    PyObject *ox, *out = NULL;
    int act;
    if (!PyArg_ParseTuple(args, "Oi", &ox, &act)) return NULL;
    if (act < 0 || act >= MS_N_ACTIVATIONS) {
        PyErr_Format(PyExc_ValueError, "activation: unknown code %d", act);
        return NULL;
    }
    PyArrayObject *x = (PyArrayObject *)PyArray_FROM_OTF(ox, NPY_FLOAT32, NPY_ARRAY_IN_ARRAY);
    if (!x) return NULL;
    if (PyArray_NDIM(x) != 2 || PyArray_DIM(x, 1) % 2 || PyArray_DIM(x, 0) > INT32_MAX || PyArray_DIM(x, 1) > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "x: expected [n, 2F] (gate | up)");
        goto fail;
    }
    npy_intp dims[2] = {PyArray_DIM(x, 0), PyArray_DIM(x, 1) / 2};
    out = PyArray_SimpleNew(2, dims, NPY_FLOAT32);
    if (!out) goto fail;
    int n = (int)dims[0], F = (int)dims[1], n_threads = ms_get_num_threads();
    const float *xd = PyArray_DATA(x);
    float *od = PyArray_DATA((PyArrayObject *)out);
    Py_BEGIN_ALLOW_THREADS
    if (n && F) ms_gated_post(od, xd, n, F, (ms_activation)act, n_threads);
    Py_END_ALLOW_THREADS
    Py_DECREF(x);
    return out;
fail:
    Py_DECREF(x);
    return NULL;
}

/* sum_of_squares(arrays) -> float: the sum of the squares of every element of a
 * list of float32 arrays, in float64 */
static PyObject *py_sum_of_squares(PyObject *mod, PyObject *arg) {
    (void)mod;
    PyObject *seq = PySequence_Fast(arg, "arrays: expected a list of float32 arrays");
    if (!seq) return NULL;
    double total = 0.0;
    int n_threads = ms_get_num_threads(), failed = 0;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq) && !failed; i++) {
        PyObject *a = PySequence_Fast_GET_ITEM(seq, i); /* borrowed */
        if (!is_float_array(a, "arrays", -1, 0)) {
            failed = 1;
            break;
        }
        const float *x = PyArray_DATA((PyArrayObject *)a);
        size_t n = (size_t)PyArray_SIZE((PyArrayObject *)a);
        double s = 0.0;
        Py_BEGIN_ALLOW_THREADS
        failed = ms_sum_of_squares(x, n, n_threads, &s);
        Py_END_ALLOW_THREADS
        if (failed) PyErr_NoMemory();
        total += s;
    }
    Py_DECREF(seq);
    return failed ? NULL : PyFloat_FromDouble(total);
}

static PyMethodDef module_methods[] = {
    {"sum_of_squares", py_sum_of_squares, METH_O, "sum_of_squares(arrays) -> float"},
    {"gated_post", py_gated_post, METH_VARARGS, "gated_post(x [n, 2F], activation code) -> act(gate) * up [n, F]"},
    {"adamw", py_adamw, METH_VARARGS, "adamw(p, g, m, v, decay, beta1, beta2, eps, step_size, bc2_sqrt, grad_scale)"},
    {"set_num_threads", py_set_num_threads, METH_O, "set_num_threads(n)"},
    {"get_num_threads", py_get_num_threads, METH_NOARGS, "get_num_threads() -> int"},
    {"fma_peak", py_fma_peak, METH_NOARGS, "fma_peak() -> (GFLOP/s, instructions)"},
    {"blas_info", py_blas_info, METH_NOARGS, "blas_info() -> (BLAS config, BLAS kernels, mechscope's attention kernels)"},
    {NULL, NULL, 0, NULL}};

static int module_exec(PyObject *m) {
    if (_import_array() < 0) return -1;
    if (PyType_Ready(&ModelType) < 0) return -1;
    Py_INCREF(&ModelType);
    if (PyModule_AddObject(m, "Model", (PyObject *)&ModelType) < 0) {
        Py_DECREF(&ModelType);
        return -1;
    }
    static const char *site_names[MS_N_SITES] = {
        "hook_embed", "hook_pos_embed", "hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized",
        "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k",
        "attn.hook_attn_scores", "attn.hook_pattern",
        "attn.hook_z", "ln1_post.hook_scale", "ln1_post.hook_normalized", "hook_attn_out", "hook_resid_mid",
        "ln2.hook_scale", "ln2.hook_normalized", "mlp.hook_expert_weights", "mlp.hook_pre", "mlp.hook_pre_linear",
        "mlp.hook_post", "ln2_post.hook_scale", "ln2_post.hook_normalized", "hook_mlp_out", "hook_resid_post",
        "ln_final.hook_scale", "ln_final.hook_normalized"};
    PyObject *names = PyTuple_New(MS_N_SITES);
    if (!names) return -1;
    for (int i = 0; i < MS_N_SITES; i++) {
        PyObject *s = PyUnicode_FromString(site_names[i]);
        if (!s) { Py_DECREF(names); return -1; }
        PyTuple_SET_ITEM(names, i, s); /* steals s */
    }
    if (PyModule_AddObject(m, "SITES", names) < 0) {
        Py_DECREF(names);
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot module_slots[] = {{Py_mod_exec, module_exec}, {0, NULL}};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, .m_name = "mechscope._core",
    .m_doc = "mechscope's compute core: transformer forward passes (GPT-2, Llama, Qwen2, Qwen3, Mixtral, Qwen3-MoE, GPT-NeoX) with cached and intervened sites.",
    .m_size = 0, .m_methods = module_methods, .m_slots = module_slots};

PyMODINIT_FUNC PyInit__core(void) { return PyModuleDef_Init(&moduledef); }
