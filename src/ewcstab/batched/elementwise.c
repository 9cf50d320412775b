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
 * (4x less memory to read than gathering their float copies; the same values as torch's x.float() / 255). */
void ewc_gather_bytes(float *restrict out, const uint8_t *restrict bytes, const int64_t *restrict rows, int64_t n,
                      int64_t width) {
    for (int64_t i = 0; i < n && i < GATHER_AHEAD; i++)
        for (int64_t k = 0; k < width; k += 64) __builtin_prefetch(bytes + rows[i] * width + k);
    for (int64_t i = 0; i < n; i++) {
        if (i + GATHER_AHEAD < n)
            for (int64_t k = 0; k < width; k += 64) __builtin_prefetch(bytes + rows[i + GATHER_AHEAD] * width + k);
        const uint8_t *src = bytes + rows[i] * width;
        float *dst = out + i * width;
        for (int64_t k = 0; k < width; k++) dst[k] = (float)src[k] / 255.0f;
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
