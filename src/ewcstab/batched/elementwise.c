/* The element-wise work of one training step around the optimizer, for R stacked runs, in single passes
 * over the flat buffers (ewcstab.batched.native explains the layout and why each formula is as it is).
 *
 * ewc_gradient, per element (g: the task gradient of the products):
 *   pen = (theta - anchor) * twice_coef        penalty gradient 2 c (theta - theta*)   [with anchor]
 *   gt  = g + pen                              the full loss's gradient, written back into grad
 *   sums[r] += (g^2, pen^2, gt^2)              telemetry norms: float lanes, joined in double per block
 *   old = theta                                SI's parameters before the step          [with old]
 * ewc_si_accumulate, per element after the optimizer step:
 *   accum = accum - (theta - old) * g          SI's path integral w += -g delta_theta
 * ewc_adam_step: all of it in one pass, Adam included (read g, theta, anchor, coef, m, v; write theta, m, v):
 *   gt = g + (theta - anchor) * twice_coef, the sums as above, then torch's fused CPU Adam on gt
 *   (aten/src/ATen/native/cpu/FusedAdamKernel.cpp, float, no weight decay / amsgrad / maximize) and
 *   SI's accum = accum - (theta_new - theta) * gt [with accum].
 * Compiled with -ffp-contract=off: the very float operations, in the order, of the PyTorch ops they replace;
 * the multiply-adds torch's build fuses are written out as fmaf (see adam_element).
 */
#include <math.h>
#include <stdint.h>

#define LANES 16
#define BLOCK 1024 /* elements summed in float lanes before joining the run's double sums */

/* One block's float lanes of the three sums of squares, joined into the run's double sums s[3]. */
static inline __attribute__((always_inline)) void join_lanes(const float *l0, const float *l1, const float *l2,
                                                             double *s) {
    for (int j = 0; j < LANES; j++) {
        s[0] += l0[j];
        s[1] += l1[j];
        s[2] += l2[j];
    }
}

static inline __attribute__((always_inline)) void gradient_chunk(
    int64_t n, float *grad, const float *theta, const float *anchor, const float *coef, float *old, double *sums,
    const int PEN, const int COPY) {
    double s[3] = {0.0, 0.0, 0.0};
    int64_t i = 0;
    while (i < n) {
        int64_t stop = i + BLOCK < n ? i + BLOCK : n;
        float l0[LANES] = {0}, l1[LANES] = {0}, l2[LANES] = {0};
        for (; i + LANES <= stop; i += LANES) {
            for (int j = 0; j < LANES; j++) {
                int64_t k = i + j;
                float g = grad[k];
                float pen = PEN ? (theta[k] - anchor[k]) * coef[k] : 0.0f;
                float gt = g + pen;
                l0[j] += g * g;
                l1[j] += pen * pen;
                l2[j] += gt * gt;
                if (PEN) grad[k] = gt;
                if (COPY) old[k] = theta[k];
            }
        }
        for (; i < stop; i++) {
            float g = grad[i];
            float pen = PEN ? (theta[i] - anchor[i]) * coef[i] : 0.0f;
            float gt = g + pen;
            l0[0] += g * g;
            l1[0] += pen * pen;
            l2[0] += gt * gt;
            if (PEN) grad[i] = gt;
            if (COPY) old[i] = theta[i];
        }
        join_lanes(l0, l1, l2, s);
    }
    sums[0] += s[0];
    sums[1] += s[1];
    sums[2] += s[2];
}

static inline __attribute__((always_inline)) void gradient_all(
    int64_t n_params, int64_t runs, const int64_t *sizes, float *grad, const float *theta, const float *anchor,
    const float *coef, float *old, double *sums, const int PEN, const int COPY) {
    int64_t off = 0;
    for (int64_t p = 0; p < n_params; p++)
        for (int64_t r = 0; r < runs; r++) {
            gradient_chunk(sizes[p], grad + off, theta + off, PEN ? anchor + off : 0, PEN ? coef + off : 0,
                           COPY ? old + off : 0, sums + 3 * r, PEN, COPY);
            off += sizes[p];
        }
}

/* The flat buffers hold, parameter-major, runs tensors of sizes[p] elements for each of the n_params
 * parameters; sums (runs, 3) receives each run's sums of squares (added to). anchor/coef NULL: no
 * penalty (grad is left as it is); old NULL: no copy. */
void ewc_gradient(int64_t n_params, int64_t runs, const int64_t *sizes, float *grad, const float *theta,
                  const float *anchor, const float *coef, float *old, double *sums) {
    int pen = anchor != 0 && coef != 0;
    if (pen && old)
        gradient_all(n_params, runs, sizes, grad, theta, anchor, coef, old, sums, 1, 1);
    else if (pen)
        gradient_all(n_params, runs, sizes, grad, theta, anchor, coef, old, sums, 1, 0);
    else if (old)
        gradient_all(n_params, runs, sizes, grad, theta, anchor, coef, old, sums, 0, 1);
    else
        gradient_all(n_params, runs, sizes, grad, theta, anchor, coef, old, sums, 0, 0);
}

void ewc_si_accumulate(int64_t n, float *accum, const float *theta, const float *old, const float *grad) {
    for (int64_t i = 0; i < n; i++) accum[i] = accum[i] - (theta[i] - old[i]) * grad[i];
}

#define GATHER_AHEAD 4 /* rows prefetched ahead of the one converted: the rows are random, the prefetcher blind */

/* out[i, :] = bytes[rows[i], :] / 255 as float: a batch of byte images gathered and converted in one pass
 * (4x less memory to read than gathering their float copies). The division is a multiplication by 1/255 and one
 * fma correction (Markstein's), which gives the correctly rounded quotient, i.e. torch's x.float() / 255, for
 * every byte (native.bytes_convert_exactly checks all 256) at a fraction of the divider's cost. */
void ewc_gather_bytes(float *restrict out, const uint8_t *restrict bytes, const int64_t *restrict rows, int64_t n,
                      int64_t width) {
    for (int64_t i = 0; i < n && i < GATHER_AHEAD; i++)
        for (int64_t k = 0; k < width; k += 64) __builtin_prefetch(bytes + rows[i] * width + k);
    for (int64_t i = 0; i < n; i++) {
        if (i + GATHER_AHEAD < n)
            for (int64_t k = 0; k < width; k += 64) __builtin_prefetch(bytes + rows[i + GATHER_AHEAD] * width + k);
        const uint8_t *src = bytes + rows[i] * width;
        float *dst = out + i * width;
        for (int64_t k = 0; k < width; k++) {
            float v = (float)src[k], q = v * (1.0f / 255.0f);
            dst[k] = fmaf(fmaf(-q, 255.0f, v), 1.0f / 255.0f, q);
        }
    }
}

/* Adam's per-step constants exactly as FusedAdamKernel.cpp forms them: in double from the float step, then
 * rounded to float where its Vectorized<float> kernel broadcasts them. */
typedef struct {
    float c1, c2, beta2, bc2_sqrt, eps, step_size, neg_step_size;
} adam_consts;

/* One element of torch's fused Adam. Its vectorised body (BODY) and its scalar tail (the last size % width
 * elements of each tensor) contract differently under torch's compiler flags; both forms are written out:
 *   m = fma(c1, g - m, m)                       (exp_avg.lerp_(grad, 1 - beta1), both)
 *   v = fma(c2 g, g, v beta2)  |  fma(v, beta2, (c2 g) g)     body | tail
 *   d = sqrt(v) / sqrt(bc2) + eps
 *   theta = theta + (-ss m) / d  |  theta - (ss m) / d         body | tail   (ss = lr / bc1)
 * native.adam_width() checks the result bitwise against torch._fused_adam_ before the engine uses it. */
static inline __attribute__((always_inline)) float adam_element(
    float g, float theta, float *m, float *v, const adam_consts *k, const int BODY) {
    float mn = fmaf(k->c1, g - *m, *m);
    float vn = BODY ? fmaf(k->c2 * g, g, *v * k->beta2) : fmaf(*v, k->beta2, (k->c2 * g) * g);
    *m = mn;
    *v = vn;
    float d = sqrtf(vn) / k->bc2_sqrt + k->eps;
    return BODY ? theta + (k->neg_step_size * mn) / d : theta - (k->step_size * mn) / d;
}

/* Element k: the full gradient, its squares into the lanes, Adam (BODY: the vectorised form), SI. */
#define ADAM_ONE(k, L, BODY_FORM)                                                                           \
    do {                                                                                                   \
        float g_ = grad[k];                                                                                \
        float pen_ = PEN ? (theta[k] - anchor[k]) * coef[k] : 0.0f;                                        \
        float gt_ = g_ + pen_;                                                                             \
        l0[L] += g_ * g_;                                                                                  \
        l1[L] += pen_ * pen_;                                                                              \
        l2[L] += gt_ * gt_;                                                                                \
        float before_ = theta[k];                                                                          \
        float after_ = adam_element(gt_, before_, m + (k), v + (k), c, BODY_FORM);                         \
        theta[k] = after_;                                                                                 \
        if (SI) accum[k] = accum[k] - (after_ - before_) * gt_;                                            \
    } while (0)

static inline __attribute__((always_inline)) void adam_chunk(
    int64_t n, const float *restrict grad, float *restrict theta, float *restrict m, float *restrict v,
    const float *restrict anchor, const float *restrict coef, float *restrict accum, const adam_consts *c,
    double *sums, const int PEN, const int SI, const int WIDTH) {
    int64_t body = n - n % WIDTH;
    double s[3] = {0.0, 0.0, 0.0};
    int64_t i = 0;
    while (i < n) {
        int64_t stop = i + BLOCK < n ? i + BLOCK : n;
        float l0[LANES] = {0}, l1[LANES] = {0}, l2[LANES] = {0};
        for (; i + LANES <= stop && i + LANES <= body; i += LANES)
            for (int j = 0; j < LANES; j++) ADAM_ONE(i + j, j, 1);
        for (; i < stop; i++) {
            if (i < body)
                ADAM_ONE(i, 0, 1);
            else
                ADAM_ONE(i, 0, 0);
        }
        join_lanes(l0, l1, l2, s);
    }
    sums[0] += s[0];
    sums[1] += s[1];
    sums[2] += s[2];
}

static inline __attribute__((always_inline)) void adam_all(
    int64_t n_params, int64_t runs, const int64_t *sizes, float *grad, float *theta, float *m, float *v,
    const float *anchor, const float *coef, float *accum, const adam_consts *c, double *sums, const int PEN,
    const int SI, const int WIDTH) {
    int64_t off = 0;
    for (int64_t p = 0; p < n_params; p++)
        for (int64_t r = 0; r < runs; r++) {
            adam_chunk(sizes[p], grad + off, theta + off, m + off, v + off, PEN ? anchor + off : 0,
                       PEN ? coef + off : 0, SI ? accum + off : 0, c, sums + 3 * r, PEN, SI, WIDTH);
            off += sizes[p];
        }
}

#define ADAM_CASES(WIDTH)                                                                                  \
    if (pen && si)                                                                                         \
        adam_all(n_params, runs, sizes, grad, theta, m, v, anchor, coef, accum, &c, sums, 1, 1, WIDTH);   \
    else if (pen)                                                                                          \
        adam_all(n_params, runs, sizes, grad, theta, m, v, anchor, coef, accum, &c, sums, 1, 0, WIDTH);   \
    else if (si)                                                                                           \
        adam_all(n_params, runs, sizes, grad, theta, m, v, anchor, coef, accum, &c, sums, 0, 1, WIDTH);   \
    else                                                                                                   \
        adam_all(n_params, runs, sizes, grad, theta, m, v, anchor, coef, accum, &c, sums, 0, 0, WIDTH);

/* One Adam step (lr, beta1, beta2, eps; step: the step count after this step) of every run on the full
 * gradient g + 2 c (theta - theta*) [anchor/coef NULL: no penalty], each (parameter, run) tensor with
 * torch's vector width (8 or 16) for its body/tail split; grad (the task gradient) is left as it is.
 * norms (runs, 3) receives each run's L2 norms of the task, penalty and full gradient (sums: scratch of
 * the same shape). Returns 0, or -1 for a width other than 8 or 16 (nothing done). */
int ewc_adam_step(int64_t n_params, int64_t runs, const int64_t *sizes, float *grad, float *theta, float *m, float *v,
                  const float *anchor, const float *coef, float *accum, double *sums, float *norms, double lr,
                  double beta1, double beta2, double eps, double step, int64_t width) {
    if (width != 8 && width != 16) return -1;
    for (int64_t i = 0; i < 3 * runs; i++) sums[i] = 0.0;
    double bc1 = 1 - pow(beta1, step), bc2 = 1 - pow(beta2, step);
    double step_size = lr / bc1;
    adam_consts c = {(float)(1 - beta1), (float)(1 - beta2), (float)beta2, (float)sqrt(bc2), (float)eps,
                     (float)step_size, (float)(-step_size)};
    int pen = anchor != 0 && coef != 0, si = accum != 0;
    if (width == 8) {
        ADAM_CASES(8)
    } else {
        ADAM_CASES(16)
    }
    for (int64_t i = 0; i < 3 * runs; i++) norms[i] = (float)sqrt(sums[i]);
    return 0;
}

/* ------------------------------------------------------------------------------------------------------------
 * The MLP's forward and backward for R stacked runs in one call (ewc_mlp_grad): what stack.cross_entropy_step
 * does with a dozen PyTorch ops, here with the very kernels those ops end in, called straight:
 *   - the products: torch's BLAS sgemm (exported by libtorch_cpu; set by ewc_set_kernels), with the arguments
 *     torch's addmm/bmm pass it (MKL_VERBOSE shows them): forward SGEMM(T, N, out, B, in) onto the bias rows
 *     (beta 1), weight gradient SGEMM(N, T, in, out, B), input gradient SGEMM(N, N, in, B, out);
 *   - leaky ReLU and its backward: a > 0 ? a : a * slope, exactly torch's kernels;
 *   - log_softmax over the last dim and its backward with Sleef's expf/logf (torch's own vector functions, exported
 *     by libtorch_cpu), replaying the lane order of ATen's vec::reduce_all / map_reduce_all for torch's vector
 *     width (8 or 16 floats) and, for grad - exp(logp) * sum, whether torch's build fused it into one fma;
 *   - nll_loss's backward (-1/B at each target) and the bias gradients: ATen's cascade sum over the batch
 *     (SumKernel.cpp: multi_row_sum / row_sum, as vectorized_outer_sum assigns them to the columns).
 * native.mlp_config() checks each piece and the whole against the PyTorch ops before the engine uses it. The loss
 * (telemetry only) is summed in double. */
#include <immintrin.h>

typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *, const float *,
                         const float *, const int *, const float *, const int *, const float *, float *, const int *);
typedef __m256 (*vf8_fn)(__m256);
static sgemm_fn k_sgemm = 0;
static vf8_fn k_exp8 = 0, k_log8 = 0;
#ifdef __AVX512F__
typedef __m512 (*vf16_fn)(__m512);
static vf16_fn k_exp16 = 0, k_log16 = 0;
#endif

/* torch's sgemm and Sleef's expf/logf for 8 (and 16) lanes; returns the widths available as a bit set (8: 1, 16: 2). */
int ewc_set_kernels(void *sgemm, void *exp8, void *log8, void *exp16, void *log16) {
    k_sgemm = (sgemm_fn)sgemm;
    k_exp8 = (vf8_fn)exp8;
    k_log8 = (vf8_fn)log8;
    int widths = (sgemm && exp8 && log8) ? 1 : 0;
#ifdef __AVX512F__
    k_exp16 = (vf16_fn)exp16;
    k_log16 = (vf16_fn)log16;
    if (sgemm && exp16 && log16) widths |= 2;
#endif
    return widths;
}

/* out[0..V) = exp or log of in[0..V), V lanes at once (Sleef is element-wise: a lane's result is its own). */
static void lanes_apply(int is_log, int64_t width, const float *in, float *out) {
#ifdef __AVX512F__
    if (width == 16) {
        _mm512_storeu_ps(out, (is_log ? k_log16 : k_exp16)(_mm512_loadu_ps(in)));
        return;
    }
#endif
    _mm256_storeu_ps(out, (is_log ? k_log8 : k_exp8)(_mm256_loadu_ps(in)));
}

/* _mm256/_mm512_max_ps (the second operand unless the first is larger) made NaN-propagating as vec::maximum. */
static inline float vec_maximum(float a, float b) {
    if (a != a || b != b) return NAN;
    return a > b ? a : b;
}

static inline float reduce_op(int is_max, float a, float b) { return is_max ? vec_maximum(a, b) : a + b; }

/* vec::reduce_all(op, v, size) for torch's vector width: in order below the width, else lane-wise over
 * vectors (the partial last one into its first lanes) and the shuffle tree of VecReduceAllSIMD. */
static float reduce_all(int is_max, const float *v, int64_t size, int64_t width) {
    if (size < width) {
        float acc = v[0];
        for (int64_t i = 1; i < size; i++) acc = reduce_op(is_max, acc, v[i]);
        return acc;
    }
    float a[16], b[16];
    for (int64_t l = 0; l < width; l++) a[l] = v[l];
    int64_t d = width;
    for (; d < size - size % width; d += width)
        for (int64_t l = 0; l < width; l++) a[l] = reduce_op(is_max, a[l], v[d + l]);
    for (int64_t l = 0; l < size - d; l++) a[l] = reduce_op(is_max, a[l], v[d + l]);
    /* lane l meets lane l ^ s, for s = 8 (512 bits only), 4, 2, 1; the first operand is the lane's own */
    for (int64_t s = width / 2; s >= 1; s /= 2) {
        for (int64_t l = 0; l < width; l++) b[l] = reduce_op(is_max, a[l], a[l ^ s]);
        for (int64_t l = 0; l < width; l++) a[l] = b[l];
    }
    return a[0];
}

/* out = log_softmax(x) over rows of length D (in place allowed): (x - max) - log(sum exp(x - max)). */
static void log_softmax_rows(const float *x, float *out, int64_t rows, int64_t D, int64_t width, float *scratch) {
    float in[16], res[16];
    float *e = scratch; /* D exponentials */
    for (int64_t i = 0; i < rows; i++) {
        const float *r = x + i * D;
        float mx = reduce_all(1, r, D, width);
        for (int64_t d = 0; d < D; d += width) {
            int64_t n = D - d < width ? D - d : width;
            for (int64_t l = 0; l < width; l++) in[l] = (l < n ? r[d + l] : 0.0f) - mx;
            lanes_apply(0, width, in, res);
            for (int64_t l = 0; l < n; l++) e[d + l] = res[l];
        }
        float sum = reduce_all(0, e, D, width);
        for (int64_t l = 0; l < width; l++) in[l] = sum;
        lanes_apply(1, width, in, res);
        float lse = res[0];
        for (int64_t c = 0; c < D; c++) out[i * D + c] = r[c] - mx - lse;
    }
}

/* d loss / d logits of the mean cross-entropy from the log-probabilities: nll_loss_backward (g = -(1 / B) at the
 * target, 0 elsewhere), then _log_softmax_backward_data: g - exp(logp) * sum(g) (contract: as one fma). */
static void cross_entropy_backward(const float *logp, const int64_t *targets, float *delta, int64_t rows, int64_t D,
                                   float at_target, int64_t width, int contract, float *scratch) {
    float in[16], res[16];
    float *g = scratch;
    for (int64_t i = 0; i < rows; i++) {
        for (int64_t c = 0; c < D; c++) g[c] = 0.0f;
        g[targets[i]] = at_target;
        float sum = reduce_all(0, g, D, width);
        for (int64_t d = 0; d < D; d += width) {
            int64_t n = D - d < width ? D - d : width;
            for (int64_t l = 0; l < width; l++) in[l] = l < n ? logp[i * D + d + l] : 0.0f;
            lanes_apply(0, width, in, res);
            for (int64_t l = 0; l < n; l++)
                delta[i * D + d + l] = contract ? fmaf(-res[l], sum, g[d + l]) : g[d + l] - res[l] * sum;
        }
    }
}

static int64_t ceil_log2(int64_t x) {
    if (x <= 2) return 1;
    int64_t bits = 0;
    for (uint64_t v = (uint64_t)(x - 1); v; v >>= 1) bits++;
    return bits;
}

/* ATen's multi_row_sum for `cols` neighbouring columns at once: the n rows p, p + stride, ... summed in levels of
 * 2^power rows (acc: 4 * cols floats of scratch); leaves the column sums in acc[0 .. cols). Row by row over contiguous
 * columns, so it vectorises; each column's additions are exactly those of ATen's loop. */
static void level_sums(const float *p, int64_t stride, int64_t n, int64_t cols, float *acc) {
    const int64_t levels = 4;
    int64_t power = ceil_log2(n) / levels;
    if (power < 4) power = 4;
    const int64_t step = (int64_t)1 << power, mask = step - 1;
    for (int64_t c = 0; c < levels * cols; c++) acc[c] = 0.0f;
    float *a0 = acc;
    int64_t i = 0;
    while (i + step <= n) {
        for (int64_t j = 0; j < step; j++, i++) {
            const float *row = p + i * stride;
            for (int64_t c = 0; c < cols; c++) a0[c] += row[c];
        }
        for (int64_t j = 1; j < levels; j++) {
            float *lo = acc + (j - 1) * cols, *hi = acc + j * cols;
            for (int64_t c = 0; c < cols; c++) {
                hi[c] += lo[c];
                lo[c] = 0.0f;
            }
            if ((i & (mask << (j * power))) != 0) break;
        }
    }
    for (; i < n; i++) {
        const float *row = p + i * stride;
        for (int64_t c = 0; c < cols; c++) a0[c] += row[c];
    }
    for (int64_t j = 1; j < levels; j++)
        for (int64_t c = 0; c < cols; c++) a0[c] += acc[j * cols + c];
}

/* out[c] = sum over rows of in[row, c] (row stride `stride`) as torch.sum(in, 0) does it, onto zeros:
 * vectorized_outer_sum for at least a vector's width of columns (blocks of 4 vectors by multi_row_sum, the rest by
 * row_sum), else scalar_outer_sum (blocks of 4 columns by multi_row_sum, the rest by row_sum). row_sum: four
 * partial sums over rows 4i + k, the leftover rows into the first, then joined. scratch: 16 * cols floats. */
static void column_sums(const float *in, int64_t rows, int64_t cols, float *out, int64_t width, float *scratch) {
    int64_t block = cols >= width ? 4 * width : 4;
    int64_t blocked = cols - cols % block;
    if (blocked) {
        level_sums(in, cols, rows, blocked, scratch);
        for (int64_t c = 0; c < blocked; c++) out[c] = 0.0f + scratch[c];
    }
    int64_t rest = cols - blocked, quarter = rows / 4;
    if (!rest) return;
    for (int64_t k = 0; k < 4; k++)
        level_sums(in + k * cols + blocked, 4 * cols, quarter, rest, scratch + 4 * k * rest);
    float *part0 = scratch;
    for (int64_t i = quarter * 4; i < rows; i++)
        for (int64_t c = 0; c < rest; c++) part0[c] += in[i * cols + blocked + c];
    for (int64_t k = 1; k < 4; k++)
        for (int64_t c = 0; c < rest; c++) part0[c] += scratch[4 * k * rest + c];
    for (int64_t c = 0; c < rest; c++) out[blocked + c] = 0.0f + part0[c];
}

/* Test entry points for the pieces (native.mlp_config checks each against the PyTorch op). */
void ewc_log_softmax(const float *x, float *out, int64_t rows, int64_t D, int64_t width, float *scratch) {
    log_softmax_rows(x, out, rows, D, width, scratch);
}
void ewc_cross_entropy_backward(const float *logp, const int64_t *targets, float *delta, int64_t rows, int64_t D,
                                float at_target, int64_t width, int64_t contract, float *scratch) {
    cross_entropy_backward(logp, targets, delta, rows, D, at_target, width, (int)contract, scratch);
}
void ewc_column_sums(const float *in, int64_t rows, int64_t cols, float *out, int64_t width, float *scratch) {
    column_sums(in, rows, cols, out, width, scratch);
}

/* Buffers carved from the workspace start on 64-byte boundaries, as torch's allocations do: a BLAS may choose its
 * code path by alignment, and each product must see its operands where the PyTorch ops' products see theirs. */
static inline int64_t aligned(int64_t floats) { return (floats + 15) & ~(int64_t)15; }

/* Floats of workspace ewc_mlp_grad needs (from a 64-byte aligned start): the activations of the hidden layers,
 * the logits, two delta buffers and scratch (a row; the column sums' partial sums). */
int64_t ewc_mlp_workspace(int64_t layers, const int64_t *widths, int64_t runs, int64_t batch) {
    int64_t rows = runs * batch, widest = 0, total = 0;
    for (int64_t l = 1; l < layers; l++) total += aligned(rows * widths[l]);
    for (int64_t l = 0; l <= layers; l++) widest = widths[l] > widest ? widths[l] : widest;
    return total + aligned(rows * widths[layers]) + 2 * aligned(rows * widest) + 16 * widest + 16;
}

/* One step's task gradient of R stacked MLPs (layers Linear layers of widths[0] -> ... -> widths[layers], leaky
 * ReLU between, mean cross-entropy): theta/grad are the flat parameter-major buffers (stack.Layout), x the (R * B,
 * widths[0]) batch run after run, targets (R * B,). Writes every gradient and loss[r] (the run's mean
 * cross-entropy). softmax_width/sum_width: torch's vector width of its log_softmax and sum kernels; contract:
 * whether its log_softmax backward fuses a multiply-add. Returns 0, or -1 without the kernels for that width. */
int ewc_mlp_grad(int64_t layers, const int64_t *widths, int64_t runs, int64_t batch, const float *x,
                 const int64_t *targets, const float *theta, float *grad, float *work, float *loss, float slope,
                 int64_t softmax_width, int64_t contract, int64_t sum_width) {
    if (!k_sgemm || (softmax_width != 8 && softmax_width != 16)) return -1;
#ifdef __AVX512F__
    if (softmax_width == 16 && !(k_exp16 && k_log16)) return -1;
#else
    if (softmax_width == 16) return -1;
#endif
    const float one = 1.0f, zero = 0.0f;
    const int64_t rows = runs * batch, classes = widths[layers];
    int64_t w_off[64], b_off[64];
    const float *acts[65];
    if (layers > 63) return -1;
    int64_t off = 0;
    for (int64_t l = 0; l < layers; l++) {
        w_off[l] = off;
        off += runs * widths[l] * widths[l + 1];
        b_off[l] = off;
        off += runs * widths[l + 1];
    }
    float *wp = work;
    acts[0] = x;
    for (int64_t l = 1; l < layers; l++) {
        acts[l] = wp;
        wp += aligned(rows * widths[l]);
    }
    float *logits = wp;
    wp += aligned(rows * classes);
    int64_t widest = 0;
    for (int64_t l = 0; l <= layers; l++) widest = widths[l] > widest ? widths[l] : widest;
    float *delta = wp, *back = wp + aligned(rows * widest), *scratch = wp + 2 * aligned(rows * widest);
    /* forward: z = bias rows, then z += h W^T per run; leaky ReLU in place but on the logits */
    for (int64_t l = 0; l < layers; l++) {
        int in = (int)widths[l], out = (int)widths[l + 1], b = (int)batch;
        float *z = l + 1 < layers ? (float *)acts[l + 1] : logits;
        for (int64_t r = 0; r < runs; r++) {
            const float *bias = theta + b_off[l] + r * out;
            float *zr = z + r * batch * out;
            for (int64_t i = 0; i < batch; i++)
                for (int64_t c = 0; c < out; c++) zr[i * out + c] = bias[c];
            k_sgemm("T", "N", &out, &b, &in, &one, theta + w_off[l] + r * (int64_t)out * in, &in,
                    acts[l] + r * batch * in, &in, &one, zr, &out);
        }
        if (l + 1 < layers)
            for (int64_t i = 0; i < rows * out; i++) z[i] = z[i] > 0.0f ? z[i] : z[i] * slope;
    }
    /* the loss and d loss / d logits */
    log_softmax_rows(logits, logits, rows, classes, softmax_width, scratch);
    for (int64_t r = 0; r < runs; r++) {
        double s = 0.0;
        for (int64_t i = r * batch; i < (r + 1) * batch; i++) s -= logits[i * classes + targets[i]];
        loss[r] = (float)(s / (double)batch);
    }
    cross_entropy_backward(logits, targets, delta, rows, classes, -(1.0f / (float)batch), softmax_width,
                           (int)contract, scratch);
    /* backward, layer by layer from the top */
    for (int64_t l = layers - 1; l >= 0; l--) {
        int in = (int)widths[l], out = (int)widths[l + 1], b = (int)batch;
        for (int64_t r = 0; r < runs; r++) {
            const float *dr = delta + r * batch * out;
            k_sgemm("N", "T", &in, &out, &b, &one, acts[l] + r * batch * in, &in, dr, &out, &zero,
                    grad + w_off[l] + r * (int64_t)out * in, &in);
            column_sums(dr, batch, out, grad + b_off[l] + r * out, sum_width, scratch);
            if (l > 0)
                k_sgemm("N", "N", &in, &b, &out, &one, theta + w_off[l] + r * (int64_t)out * in, &in, dr, &out,
                        &zero, back + r * batch * in, &in);
        }
        if (l > 0) {
            const float *a = acts[l];
            for (int64_t i = 0; i < rows * in; i++) back[i] = a[i] > 0.0f ? back[i] : back[i] * slope;
            float *t = delta;
            delta = back;
            back = t;
        }
    }
    return 0;
}
