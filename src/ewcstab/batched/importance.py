"""Importances of R stacked MLP runs at once: the closed forms of ``ewcstab.importance`` batched over R.

Each estimator mirrors its single-run counterpart (same formulas, PROTOCOL.md 'Importance methods'),
works on the flat parameter buffer of ``stack.Layout`` and returns a flat buffer of the same layout:

- fisher / mas (``PerSampleReduced``): for a per-sample scalar s_n the per-sample weight gradient of a
  linear layer is the outer product delta_n a_n^T, and r(delta a^T) = r(delta) r(a)^T for r = square
  (fisher) or abs (mas), so the sum over samples is one batched product r(delta)^T r(a) per layer
  (as ``importance.persample``'s ``linear`` backend, batched over R): (R, out, N) @ (R, N, in).
- signal (``Signal``): |W| * mean |layer input|; bias: mean |layer output after its nonlinearity|
  (softmax for the last layer), as ``importance.signal``'s ``_LinearRule``.
- si (``SynapticIntelligence``): the online accumulator w += -g * delta_theta on the flat buffers,
  Omega = w / ((theta_end - theta_start)^2 + xi), as ``importance.si.SI``.

The trainer calls ``begin_task``, ``before_step``, ``after_step``, ``end_task`` and ``select`` (drop
diverged runs) and never asks which method runs (STYLE.md, convention 3).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ewcstab.batched.stack import Layout, forward, run_groups, split
from ewcstab.models.mlp import LEAKY_SLOPE

ScalarGrad = Callable[[Tensor, Tensor], Tensor]  # (logits (M, C), y (M,)) -> d s / d logits (M, C)


def log_likelihood_grad(logits: Tensor, y: Tensor) -> Tensor:
    """d log softmax(z)[y] / dz = onehot(y) - softmax(z), with the kernels autograd uses (fisher)."""
    logp = torch.log_softmax(logits, 1)
    picked = torch.zeros_like(logp).scatter_(1, y.unsqueeze(1), 1.0)  # backward of gather(...).sum()
    return torch.ops.aten._log_softmax_backward_data(picked, logp, 1, logp.dtype)


def squared_output_norm_grad(logits: Tensor, _y: Tensor) -> Tensor:
    """d sum_k softmax(z)_k^2 / dz = p * (2p - sum_k 2 p_k^2), with the kernels autograd uses (mas)."""
    p = torch.softmax(logits, 1)
    return torch.ops.aten._softmax_backward_data(2 * p, p, 1, p.dtype)


class OfflineStacked:
    """Base of the importances computed after a task: no per-step work, no per-run state."""

    native = None  # the engine's native passes (``native.NativeGradient``), None: PyTorch ops

    def step_snapshot(self) -> Tensor | None:
        """A buffer the trainer fills with theta before each step, or None (none needed)."""
        return None

    def path_integral(self) -> Tensor | None:
        """The buffer a fused optimizer step adds -g * delta_theta into (SI), or None (none needed)."""
        return None

    def begin_task(self, layout: Layout, theta: Tensor) -> None:
        pass

    def before_step(self, theta: Tensor, grad: Tensor, grad_changes: bool) -> None:
        pass

    def after_step(self, theta: Tensor) -> None:
        pass

    def select(self, layout: Layout, keep: Tensor) -> None:
        pass

    def end_task(self, layout: Layout, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError


class PerSampleReduced(OfflineStacked):
    """(1/N) sum_n r(d s_n / d theta) for every run, s_n = ``scalar_grad``'s scalar (fisher, mas)."""

    #: samples per pass, as ``importance.persample``'s closed form (the summation order follows it)
    chunk_size = 10_000

    def __init__(self, scalar_grad: ScalarGrad, reduction: Callable[[Tensor], Tensor], label: str = "true") -> None:
        if label not in ("true", "predicted"):
            raise ValueError(f"fisher_label: {label!r} is not allowed; allowed: true, predicted")
        self.scalar_grad = scalar_grad
        self.r = reduction
        self.label = label

    @torch.no_grad()
    def end_task(self, layout: Layout, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        weights, biases = split(layout.views(theta))
        out = layout.zeros(theta.device)
        sums_w, sums_b = split(layout.views(out))
        n = x.shape[0]
        flat_x = x.reshape(n, -1)  # (N, in)
        chunk = min(self.chunk_size, n)
        for group in run_groups(layout.runs, chunk, [w.shape[1] for w in weights]):
            w_g, b_g = [w[group] for w in weights], [b[group] for b in biases]
            for start in range(0, n, chunk):
                self._accumulate(w_g, b_g, flat_x[start : start + chunk], y[start : start + chunk],
                                 [s[group] for s in sums_w], [s[group] for s in sums_b])
        return out.div_(n)

    def _accumulate(self, weights, biases, xc: Tensor, yc: Tensor, sum_w: list[Tensor], sum_b: list[Tensor]) -> None:
        """Add one chunk's sum_n r(delta_n) r(a_n)^T and sum_n r(delta_n) to every layer's sums."""
        runs, m = weights[0].shape[0], xc.shape[0]
        inputs, logits = forward(weights, biases, xc)  # xc (M, in) is shared by every run
        classes = logits.shape[-1]
        if self.label == "predicted":
            target = logits.argmax(-1).reshape(-1)  # each run's own prediction
        else:
            target = yc.repeat(runs)  # (R*M,), run-major like the logits below
        delta = self.scalar_grad(logits.reshape(runs * m, classes), target).view(runs, m, classes)
        for layer in range(len(weights) - 1, -1, -1):
            rd = self.r(delta)  # (R, M, out)
            # (R, M, in); the first layer's input is shared: reduce it once, expand with stride 0
            ra = self.r(inputs[layer]) if layer else self.r(xc).unsqueeze(0).expand(runs, -1, -1)
            sum_w[layer].add_(torch.bmm(rd.transpose(1, 2), ra))  # (R, out, in)
            sum_b[layer].add_(rd.sum(1))
            if layer:
                back = torch.bmm(delta, weights[layer])
                delta = torch.ops.aten.leaky_relu_backward(back, inputs[layer], LEAKY_SLOPE, True)


class Signal(OfflineStacked):
    """Total absolute signal: |W| * mean |input|, bias: mean |activation output| (softmax last)."""

    def __init__(self, chunk_size: int = 1000) -> None:
        self.chunk_size = chunk_size  # as importance.signal.Signal: the summation order follows it

    @torch.no_grad()
    def end_task(self, layout: Layout, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        weights, biases = split(layout.views(theta))
        n = x.shape[0]
        flat_x = x.reshape(n, -1)
        out = layout.zeros(theta.device)
        imp_w, imp_b = split(layout.views(out))
        for group in run_groups(layout.runs, min(self.chunk_size, n), [w.shape[1] for w in weights]):
            w_g, b_g = [w[group] for w in weights], [b[group] for b in biases]
            in_sums: list[Tensor | None] = [None] * len(weights)
            out_sums: list[Tensor | None] = [None] * len(weights)
            for start in range(0, n, self.chunk_size):
                xc = flat_x[start : start + self.chunk_size]
                inputs, logits = forward(w_g, b_g, xc)
                outputs = inputs[1:] + [torch.softmax(logits, -1)]  # after each layer's nonlinearity
                for layer in range(len(weights)):
                    a_in = xc.abs().sum(0) if layer == 0 else inputs[layer].abs().sum(1)  # (in,) shared | (R, in)
                    a_out = outputs[layer].abs().sum(1)  # (R, out)
                    in_sums[layer] = a_in if in_sums[layer] is None else in_sums[layer] + a_in
                    out_sums[layer] = a_out if out_sums[layer] is None else out_sums[layer] + a_out
            for layer, w in enumerate(w_g):
                mean_in = in_sums[layer] / n
                torch.mul(w.abs(), mean_in.unsqueeze(-2), out=imp_w[layer][group])  # (R, out, in) * (R | 1, 1, in)
                torch.div(out_sums[layer], n, out=imp_b[layer][group])
        return out


class SynapticIntelligence:
    """SI's online path integral on the flat buffers (importance.si.SI for R runs at once)."""

    native = None  # the engine's native passes (``native.NativeGradient``), None: PyTorch ops

    def __init__(self, xi: float = 0.1) -> None:
        self.xi = xi
        self.start = self.accum = self.old = self.grad_copy = None
        self._grad: Tensor | None = None

    def step_snapshot(self) -> Tensor | None:
        """theta before the step goes into ``old``: the native gradient pass copies it there on its way
        (the engine asks whenever it runs the native passes, i.e. whenever ``native`` is set)."""
        return self.old if self.native is not None else None

    def path_integral(self) -> Tensor | None:
        """accum, for an optimizer step that forms w += -g delta_theta itself (``StackedAdam.native_step``;
        before_step and after_step are then not called)."""
        return self.accum

    def begin_task(self, layout: Layout, theta: Tensor) -> None:
        self.start = theta.clone()
        self.accum = torch.zeros_like(theta)
        self.old = torch.empty_like(theta)
        self.grad_copy = None

    def before_step(self, theta: Tensor, grad: Tensor, grad_changes: bool) -> None:
        """g is the full loss's gradient before clipping: copied only when clipping will rescale it."""
        if self.native is None:  # else the native gradient pass took the snapshot (step_snapshot)
            self.old.copy_(theta)
        if grad_changes:
            if self.grad_copy is None:
                self.grad_copy = torch.empty_like(grad)
            self._grad = self.grad_copy.copy_(grad)
        else:
            self._grad = grad

    def after_step(self, theta: Tensor) -> None:
        if self.native is not None:  # the same three operations, in one pass
            self.native.si_accumulate(self.accum, theta, self.old, self._grad)
            return
        delta = torch.sub(theta, self.old, out=self.old)  # the old parameters are not needed any more
        delta.mul_(self._grad)
        self.accum.sub_(delta)  # w += -g * delta_theta

    def end_task(self, layout: Layout, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return self.accum / ((theta - self.start).square() + self.xi)

    def select(self, layout: Layout, keep: Tensor) -> None:
        if self.start is None:
            return
        self.start = layout.select(self.start, keep)
        self.accum = layout.select(self.accum, keep)
        self.old = torch.empty_like(self.start)
        self.grad_copy = None


def build_stacked_importance(method: str, fisher_label: str = "true", si_xi: float = 0.1):
    """The batched estimator for a config's method name."""
    factories = {
        "fisher": lambda: PerSampleReduced(log_likelihood_grad, torch.square, fisher_label),
        "mas": lambda: PerSampleReduced(squared_output_norm_grad, torch.abs),
        "signal": Signal,
        "si": lambda: SynapticIntelligence(si_xi),
    }
    try:
        return factories[method]()
    except KeyError:
        raise ValueError(f"method: {method!r} is not allowed; allowed: {', '.join(factories)}") from None
