/* The decode step on CPU in one C call: what codellm.decode.decode_tokens computes with int8 weights.
 *
 * A decode step moves 1-16 tokens through the model. Every tensor is tiny, so the PyTorch step spends
 * most of its time launching ~200 operations; here one call runs the whole step. Weights are int8 with
 * one scale per output row (the Decoder's matrices); activations, norms, attention and the KV cache are
 * float32. Matrix rows and attention heads are shared out over the OpenMP threads (the same runtime and
 * threads as PyTorch's, where PyTorch uses OpenMP).
 *
 * Python side: codellm/kernel.py. The tensors stay owned by Python; a Model holds their addresses and
 * must not outlive them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_TOKENS 16
#define MAX_HEAD_DIM 512
#define CAPSULE_NAME "codellm._decode_kernel.Model"

typedef struct {
    const int8_t *weight; /* packed in blocks of rows, see block_sums */
    const float *scale;   /* (rows,) */
    int rows, in;
} Matrix;

typedef struct {
    int n_layer, n_head, d_model, d_ff, vocab, context, qk_norm;
    float norm_eps, head_eps; /* d_model * eps and head_dim * eps: the folded norms sum, not average */
    const float *embed;       /* (vocab, d_model) */
    Matrix *matrices;         /* per layer: qkv, proj, up, down; then the lm_head */
    const float **rotary;     /* per layer: cos, sin tables (context, 2, head_dim), q then k */
    float **caches;           /* per layer: keys, values (n_head, context, head_dim) */
    float *work;              /* scratch for MAX_TOKENS tokens */
} Model;

/* ------------------------------------------------------------------ int8 rows times float32 vectors */

/* Matrices come packed in blocks of 16 rows: block b holds, for each input k, the weights of rows
 * 16b..16b+15 side by side (rows padded with zeros to a multiple of 16). A block's sums then build up in
 * one vector per input vector, with no sums across a vector's lanes at the end.
 *
 * sums[t * stride + row] = sum_k W[row][k] * x[t][k] for the rows of blocks first..first+count-1 and
 * n = 1..4 input vectors: plain C, and x86 vector code where the CPU has it (compilers turn the plain
 * loop into slow widening sequences). */
#define BLOCK 16

static void block_sums_plain(const int8_t *packed, int K, int first, int count, const float *const *x, int n,
                             float *sums, int stride) {
    for (int b = first; b < first + count; b++)
        for (int t = 0; t < n; t++) {
            float acc[BLOCK] = {0};
            const int8_t *w = packed + (size_t)b * K * BLOCK;
            for (int k = 0; k < K; k++)
                for (int r = 0; r < BLOCK; r++) acc[r] += x[t][k] * (float)w[k * BLOCK + r];
            memcpy(sums + (size_t)t * stride + b * BLOCK, acc, sizeof acc);
        }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

/* One input vector: four sums over k = 0, 1, 2, 3 (mod 4) keep four multiply-adds in flight. Several:
 * each column of 16 weights is widened once for all of them (missing ones repeat x[0]). */
__attribute__((target("avx512f"))) static void block_sums_avx512(const int8_t *packed, int K, int first,
                                                                 int count, const float *const *x, int n,
                                                                 float *sums, int stride) {
    const float *x0 = x[0], *x1 = x[n > 1], *x2 = x[n > 2 ? 2 : 0], *x3 = x[n > 3 ? 3 : 0];
#define COLUMN(k) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + (k) * BLOCK))))
    for (int b = first; b < first + count; b++) {
        const int8_t *w = packed + (size_t)b * K * BLOCK;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int k = 0;
        if (n == 1) {
            for (; k + 4 <= K; k += 4) {
                a0 = _mm512_fmadd_ps(COLUMN(k), _mm512_set1_ps(x0[k]), a0);
                a1 = _mm512_fmadd_ps(COLUMN(k + 1), _mm512_set1_ps(x0[k + 1]), a1);
                a2 = _mm512_fmadd_ps(COLUMN(k + 2), _mm512_set1_ps(x0[k + 2]), a2);
                a3 = _mm512_fmadd_ps(COLUMN(k + 3), _mm512_set1_ps(x0[k + 3]), a3);
            }
            for (; k < K; k++) a0 = _mm512_fmadd_ps(COLUMN(k), _mm512_set1_ps(x0[k]), a0);
            a0 = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
        } else {
            for (; k < K; k++) {
                const __m512 column = COLUMN(k);
                a0 = _mm512_fmadd_ps(column, _mm512_set1_ps(x0[k]), a0);
                a1 = _mm512_fmadd_ps(column, _mm512_set1_ps(x1[k]), a1);
                a2 = _mm512_fmadd_ps(column, _mm512_set1_ps(x2[k]), a2);
                a3 = _mm512_fmadd_ps(column, _mm512_set1_ps(x3[k]), a3);
            }
        }
        const __m512 acc[4] = {a0, a1, a2, a3};
        for (int t = 0; t < n; t++) _mm512_storeu_ps(sums + (size_t)t * stride + b * BLOCK, acc[t]);
    }
#undef COLUMN
}

/* The same with 8-wide vectors: each block in two halves. */
__attribute__((target("avx2,fma"))) static void block_sums_avx2(const int8_t *packed, int K, int first, int count,
                                                               const float *const *x, int n, float *sums,
                                                               int stride) {
    const float *x0 = x[0], *x1 = x[n > 1], *x2 = x[n > 2 ? 2 : 0], *x3 = x[n > 3 ? 3 : 0];
#define COLUMN(k) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + (k) * BLOCK))))
    for (int b = first; b < first + count; b++)
        for (int half = 0; half < BLOCK; half += 8) {
            const int8_t *w = packed + (size_t)b * K * BLOCK + half;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            int k = 0;
            if (n == 1) {
                for (; k + 4 <= K; k += 4) {
                    a0 = _mm256_fmadd_ps(COLUMN(k), _mm256_set1_ps(x0[k]), a0);
                    a1 = _mm256_fmadd_ps(COLUMN(k + 1), _mm256_set1_ps(x0[k + 1]), a1);
                    a2 = _mm256_fmadd_ps(COLUMN(k + 2), _mm256_set1_ps(x0[k + 2]), a2);
                    a3 = _mm256_fmadd_ps(COLUMN(k + 3), _mm256_set1_ps(x0[k + 3]), a3);
                }
                for (; k < K; k++) a0 = _mm256_fmadd_ps(COLUMN(k), _mm256_set1_ps(x0[k]), a0);
                a0 = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
            } else {
                for (; k < K; k++) {
                    const __m256 column = COLUMN(k);
                    a0 = _mm256_fmadd_ps(column, _mm256_set1_ps(x0[k]), a0);
                    a1 = _mm256_fmadd_ps(column, _mm256_set1_ps(x1[k]), a1);
                    a2 = _mm256_fmadd_ps(column, _mm256_set1_ps(x2[k]), a2);
                    a3 = _mm256_fmadd_ps(column, _mm256_set1_ps(x3[k]), a3);
                }
            }
            const __m256 acc[4] = {a0, a1, a2, a3};
            for (int t = 0; t < n; t++) _mm256_storeu_ps(sums + (size_t)t * stride + b * BLOCK + half, acc[t]);
        }
#undef COLUMN
}
#endif

typedef void BlockSums(const int8_t *, int, int, int, const float *const *, int, float *, int);

static int always(void) { return 1; }
#if defined(__x86_64__) && defined(__GNUC__)
static int has_avx512(void) { return __builtin_cpu_supports("avx512f"); }
static int has_avx2(void) { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
#endif

static const struct {
    const char *name;
    BlockSums *function;
    int (*cpu_runs)(void);
} variants[] = {
#if defined(__x86_64__) && defined(__GNUC__)
    {"avx512", block_sums_avx512, has_avx512},
    {"avx2", block_sums_avx2, has_avx2},
#endif
    {"plain C", block_sums_plain, always},
};

static BlockSums *block_sums = block_sums_plain;
static const char *block_sums_name = "plain C";

/* The first variant this CPU runs, or the one named (0 on success). */
static int choose_block_sums(const char *name) {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
#endif
    for (size_t i = 0; i < sizeof variants / sizeof variants[0]; i++)
        if ((!name || !strcmp(name, variants[i].name)) && variants[i].cpu_runs()) {
            block_sums = variants[i].function;
            block_sums_name = variants[i].name;
            return 0;
        }
    return -1;
}

/* out (T, rows) = x (T, in) @ W^T, scaled per row; accumulate: out += instead of out =. Each of `team`
 * threads takes a run of blocks (team 1: no OpenMP team at all); sums (4, rows rounded up to BLOCK) is
 * scratch. */
static void multiply(const Matrix *m, const float *x, int T, float *out, int accumulate, float *sums, int team) {
    const int blocks = (m->rows + BLOCK - 1) / BLOCK, stride = blocks * BLOCK;
#pragma omp parallel num_threads(team) if (team > 1)
    {
#ifdef _OPENMP
        const int threads = omp_get_num_threads(), me = omp_get_thread_num();
#else
        const int threads = 1, me = 0;
#endif
        const int first = blocks * me / threads, last = blocks * (me + 1) / threads;
        const int begin = first * BLOCK, end = last * BLOCK < m->rows ? last * BLOCK : m->rows;
        for (int t0 = 0; t0 < T && first < last; t0 += 4) {  /* rows stay in cache for the tokens after four */
            const int n = T - t0 < 4 ? T - t0 : 4;
            const float *xs[4];
            for (int t = 0; t < n; t++) xs[t] = x + (size_t)(t0 + t) * m->in;
            block_sums(m->weight, m->in, first, last - first, xs, n, sums, stride);
            for (int t = 0; t < n; t++) {
                float *o = out + (size_t)(t0 + t) * m->rows;
                const float *sum = sums + (size_t)t * stride;
                for (int row = begin; row < end; row++)
                    o[row] = (accumulate ? o[row] : 0) + sum[row] * m->scale[row];
            }
        }
    }
}

/* ------------------------------------------------------------------------ the rest of a layer */

static inline float dot(const float *a, const float *b, int n) {
    float sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int i = 0; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* out = x / sqrt(sum(x²) + eps), per row of n (the norm's weight and sqrt(n) are in the next matrix). */
static void normalise(const float *x, int T, int n, float eps, float *out) {
    for (int t = 0; t < T; t++) {
        const float *xt = x + (size_t)t * n;
        const float r = 1.0f / sqrtf(dot(xt, xt, n) + eps);
        for (int i = 0; i < n; i++) out[(size_t)t * n + i] = xt[i] * r;
    }
}

/* Rotate one head of q or k in place with its folded tables: u * cos + swap_halves(u) * sin, times
 * 1 / sqrt(sum(u²) + eps) with QK-norm. */
static void rotate(float *u, const float *cos, const float *sin, int D, int qk_norm, float head_eps) {
    float rotated[MAX_HEAD_DIM];
    const float r = qk_norm ? 1.0f / sqrtf(dot(u, u, D) + head_eps) : 1.0f;
    const int half = D / 2;
    for (int i = 0; i < half; i++) {
        rotated[i] = (u[i] * cos[i] + u[i + half] * sin[i]) * r;
        rotated[i + half] = (u[i + half] * cos[i + half] + u[i] * sin[i + half]) * r;
    }
    memcpy(u, rotated, sizeof(float) * D);
}

/* y (D) = softmax(q · keys[0..n)) · values[0..n) for one head. */
static void attend(const float *q, const float *keys, const float *values, int n, int D, float *scores,
                   float *y) {
    float top = -INFINITY, total = 0;
    for (int j = 0; j < n; j++) {
        scores[j] = dot(q, keys + (size_t)j * D, D);
        top = scores[j] > top ? scores[j] : top;
    }
    for (int j = 0; j < n; j++) total += scores[j] = expf(scores[j] - top);
    for (int i = 0; i < D; i++) y[i] = 0;
    for (int j = 0; j < n; j++) {
        const float p = scores[j] / total, *v = values + (size_t)j * D;
#pragma omp simd
        for (int i = 0; i < D; i++) y[i] += p * v[i];
    }
}

/* Logits (T, vocab) for tokens at positions pos..pos+T-1; writes their keys and values to the cache.
 * threads: the OpenMP team's size (0: the calling thread's default, as PyTorch set it). */
static void decode(const Model *m, const long *tokens, int T, int pos, float *logits, int threads) {
#ifdef _OPENMP
    const int team = threads > 0 ? threads : omp_get_max_threads();
#else
    const int team = 1;
#endif
    const int C = m->d_model, H = m->n_head, D = C / H, F = m->d_ff;
    float *x = m->work;                      /* (T, C) residual stream */
    float *normed = x + MAX_TOKENS * C;      /* (T, C) */
    float *qkv = normed + MAX_TOKENS * C;    /* (T, 3C) */
    float *y = qkv + MAX_TOKENS * 3 * C;     /* (T, C) attention output */
    float *hidden = y + MAX_TOKENS * C;      /* (T, F) */
    float *scores = hidden + MAX_TOKENS * F; /* (T, H, context) */
    float *sums = scores + MAX_TOKENS * H * m->context; /* (rows, 4) of the largest matrix */
    for (int t = 0; t < T; t++) memcpy(x + (size_t)t * C, m->embed + (size_t)tokens[t] * C, sizeof(float) * C);
    for (int layer = 0; layer < m->n_layer; layer++) {
        const Matrix *w = m->matrices + 4 * layer;
        const float *cos = m->rotary[2 * layer], *sin = m->rotary[2 * layer + 1];
        float *keys = m->caches[2 * layer], *values = m->caches[2 * layer + 1];
        normalise(x, T, C, m->norm_eps, normed);
        multiply(&w[0], normed, T, qkv, 0, sums, team);
        for (int t = 0; t < T; t++) {
            const size_t p = pos + t, table = p * 2 * D;
            float *row = qkv + (size_t)t * 3 * C;
            for (int h = 0; h < H; h++) {
                float *q = row + h * D, *k = row + C + h * D, *v = row + 2 * C + h * D;
                rotate(q, cos + table, sin + table, D, m->qk_norm, m->head_eps);
                rotate(k, cos + table + D, sin + table + D, D, m->qk_norm, m->head_eps);
                memcpy(keys + (h * m->context + p) * D, k, sizeof(float) * D);
                memcpy(values + (h * m->context + p) * D, v, sizeof(float) * D);
            }
        }
        /* after all writes: token t sees itself and the tokens before it */
#pragma omp parallel for schedule(static) num_threads(team) if (team > 1)
        for (int task = 0; task < T * H; task++) {
            const int t = task / H, h = task % H;
            const size_t head = (size_t)h * m->context * D;
            attend(qkv + (size_t)t * 3 * C + h * D, keys + head, values + head, pos + t + 1, D,
                   scores + (size_t)task * m->context, y + (size_t)t * C + h * D);
        }
        multiply(&w[1], y, T, x, 1, sums, team);
        normalise(x, T, C, m->norm_eps, normed);
        multiply(&w[2], normed, T, hidden, 0, sums, team);
        for (size_t i = 0; i < (size_t)T * F; i++) hidden[i] = hidden[i] > 0 ? hidden[i] * hidden[i] : 0;
        multiply(&w[3], hidden, T, x, 1, sums, team);
    }
    normalise(x, T, C, m->norm_eps, normed);
    multiply(&m->matrices[4 * m->n_layer], normed, T, logits, 0, sums, team);
}

/* ------------------------------------------------------------------------------------------ Python */

static void free_model(Model *m) {
    if (!m) return;
    free(m->matrices);
    free((void *)m->rotary);
    free(m->caches);
    free(m->work);
    free(m);
}

static void free_capsule(PyObject *capsule) { free_model(PyCapsule_GetPointer(capsule, CAPSULE_NAME)); }

static void *address(PyObject *seq, Py_ssize_t i) { return PyLong_AsVoidPtr(PySequence_Fast_GET_ITEM(seq, i)); }

/* new_model(sizes, eps, embed, matrices, rotary, caches): sizes = (n_layer, n_head, d_model, d_ff, vocab,
 * context, qk_norm), eps = (norm_eps, head_eps), embed the address of the embedding table, matrices =
 * ((weight, scale, rows, in), ...) for the 4 * n_layer + 1 matrices, rotary and caches = sequences of
 * 2 * n_layer addresses. */
static PyObject *new_model(PyObject *self, PyObject *args) {
    Model shape = {0};
    PyObject *embed, *matrices, *rotary, *caches;
    if (!PyArg_ParseTuple(args, "(iiiiiii)(ff)OOOO", &shape.n_layer, &shape.n_head, &shape.d_model, &shape.d_ff,
                          &shape.vocab, &shape.context, &shape.qk_norm, &shape.norm_eps, &shape.head_eps, &embed,
                          &matrices, &rotary, &caches))
        return NULL;
    const int D = shape.n_head > 0 ? shape.d_model / shape.n_head : 0;
    if (shape.n_layer < 1 || D < 2 || D > MAX_HEAD_DIM || D % 2 || shape.d_model % shape.n_head ||
        shape.d_ff < 1 || shape.vocab < 1 || shape.context < 1) {
        PyErr_SetString(PyExc_ValueError, "decode kernel: unsupported model shape");
        return NULL;
    }
    const Py_ssize_t n_matrices = 4 * (Py_ssize_t)shape.n_layer + 1;
    PyObject *capsule = NULL;
    PyObject *mats = PySequence_Fast(matrices, "matrices must be a sequence");
    PyObject *rots = mats ? PySequence_Fast(rotary, "rotary must be a sequence") : NULL;
    PyObject *cach = rots ? PySequence_Fast(caches, "caches must be a sequence") : NULL;
    Model *m = cach ? calloc(1, sizeof(Model)) : NULL;
    if (!m) {
        if (cach) PyErr_NoMemory();
        goto done;
    }
    if (PySequence_Fast_GET_SIZE(mats) != n_matrices || PySequence_Fast_GET_SIZE(rots) != 2 * shape.n_layer ||
        PySequence_Fast_GET_SIZE(cach) != 2 * shape.n_layer) {
        PyErr_SetString(PyExc_ValueError, "decode kernel: wrong number of matrices, tables or caches");
        goto done;
    }
    *m = shape;
    m->embed = PyLong_AsVoidPtr(embed);
    m->matrices = calloc(n_matrices, sizeof(Matrix));
    m->rotary = calloc(2 * shape.n_layer, sizeof(float *));
    m->caches = calloc(2 * shape.n_layer, sizeof(float *));
    int widest = shape.vocab > 3 * shape.d_model ? shape.vocab : 3 * shape.d_model;
    widest = (widest > shape.d_ff ? widest : shape.d_ff) + BLOCK;
    m->work = calloc((size_t)MAX_TOKENS * (6 * shape.d_model + shape.d_ff + shape.n_head * shape.context) +
                         4 * (size_t)widest, sizeof(float));
    if (!m->matrices || !m->rotary || !m->caches || !m->work) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n_matrices; i++) {
        Matrix *mat = &m->matrices[i];
        PyObject *weight, *scale;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(mats, i), "OOii", &weight, &scale, &mat->rows, &mat->in))
            goto done;
        mat->weight = PyLong_AsVoidPtr(weight);
        mat->scale = PyLong_AsVoidPtr(scale);
        const int layer_rows[4] = {3 * shape.d_model, shape.d_model, shape.d_ff, shape.d_model};
        const int layer_in[4] = {shape.d_model, shape.d_model, shape.d_model, shape.d_ff};
        const int last = i == n_matrices - 1;
        if (mat->rows != (last ? shape.vocab : layer_rows[i % 4]) || mat->in != (last ? shape.d_model : layer_in[i % 4])) {
            PyErr_Format(PyExc_ValueError, "decode kernel: matrix %zd is %d x %d, not the model's shape", i, mat->rows,
                         mat->in);
            goto done;
        }
    }
    for (Py_ssize_t i = 0; i < 2 * shape.n_layer; i++) {
        m->rotary[i] = address(rots, i);
        m->caches[i] = address(cach, i);
    }
    if (!PyErr_Occurred()) capsule = PyCapsule_New(m, CAPSULE_NAME, free_capsule);
done:
    if (!capsule) free_model(m);
    Py_XDECREF(mats);
    Py_XDECREF(rots);
    Py_XDECREF(cach);
    return capsule;
}

/* decode(model, tokens, pos, logits[, threads]): tokens a sequence of 1..16 ids, logits the address of a
 * float32 (len(tokens), vocab) buffer, threads the OpenMP team's size (0, the default: the calling
 * thread's). Runs without the GIL. */
static PyObject *decode_tokens(PyObject *self, PyObject *args) {
    PyObject *capsule, *tokens_obj, *logits_obj;
    int pos, threads = 0;
    if (!PyArg_ParseTuple(args, "OOiO|i", &capsule, &tokens_obj, &pos, &logits_obj, &threads)) return NULL;
    Model *m = PyCapsule_GetPointer(capsule, CAPSULE_NAME);
    float *logits = PyLong_AsVoidPtr(logits_obj);
    PyObject *seq = m && !PyErr_Occurred() ? PySequence_Fast(tokens_obj, "tokens must be a sequence") : NULL;
    if (!seq) return NULL;
    const Py_ssize_t T = PySequence_Fast_GET_SIZE(seq);
    long tokens[MAX_TOKENS];
    int ok = T >= 1 && T <= MAX_TOKENS && pos >= 0 && pos + T <= m->context;
    for (Py_ssize_t t = 0; ok && t < T; t++) {
        tokens[t] = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, t));
        ok = !PyErr_Occurred() && tokens[t] >= 0 && tokens[t] < m->vocab;
    }
    Py_DECREF(seq);
    if (!ok) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "decode kernel: 1-16 token ids of the vocabulary, within the context");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    decode(m, tokens, (int)T, pos, logits, threads < 0 ? 0 : threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *instructions(PyObject *self, PyObject *args) { return PyUnicode_FromString(block_sums_name); }

/* use_instructions(name): "avx512", "avx2" or "plain C", where the CPU runs it (tests, comparisons). */
static PyObject *use_instructions(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    if (choose_block_sums(name)) return PyErr_Format(PyExc_ValueError, "this CPU or build has no %s products", name);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"new_model", new_model, METH_VARARGS, "Hold the addresses of a model's weights, tables and KV cache."},
    {"decode", decode_tokens, METH_VARARGS, "Logits for 1-16 tokens at positions pos..; writes their keys and values."},
    {"instructions", instructions, METH_NOARGS, "The vector instructions the int8 products use here."},
    {"use_instructions", use_instructions, METH_VARARGS, "Use other vector instructions where the CPU has them."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_decode_kernel", NULL, -1, methods};

PyMODINIT_FUNC PyInit__decode_kernel(void) {
    choose_block_sums(NULL);
    return PyModule_Create(&module);
}
