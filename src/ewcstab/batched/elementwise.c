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
 * Compiled with -ffp-contract=off: the very float operations, in the order, of the PyTorch ops they replace.
 */
#include <stdint.h>

#define LANES 16
#define BLOCK 1024 /* elements summed in float lanes before joining the run's double sums */

static inline __attribute__((always_inline)) void gradient_chunk(
    int64_t n, float *grad, const float *theta, const float *anchor, const float *coef, float *old, double *sums,
    const int PEN, const int COPY) {
    double s0 = 0.0, s1 = 0.0, s2 = 0.0;
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
        for (int j = 0; j < LANES; j++) {
            s0 += l0[j];
            s1 += l1[j];
            s2 += l2[j];
        }
    }
    sums[0] += s0;
    sums[1] += s1;
    sums[2] += s2;
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

/* out[i, :] = bytes[rows[i], :] / 255 as float: a batch of byte images gathered and converted in one pass
 * (4x less memory to read than gathering their float copies; the same values as torch's x.float() / 255). */
void ewc_gather_bytes(float *out, const uint8_t *bytes, const int64_t *rows, int64_t n, int64_t width) {
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *src = bytes + rows[i] * width;
        float *dst = out + i * width;
        for (int64_t k = 0; k < width; k++) dst[k] = (float)src[k] / 255.0f;
    }
}
