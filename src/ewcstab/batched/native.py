"""The training step's element-wise work around the optimizer in single native passes (``elementwise.c``).

Per step the stacked engine has, besides the products and the optimizer: the penalty gradient
2 c (theta - theta*), its sum with the task gradient, three telemetry norms (task, penalty, full
gradient) and, for SI, a copy of the parameters before the step and the path integral
w += -g delta_theta after it. As PyTorch ops that is ~10 passes over the (R * P,) buffers and a dozen
Python-level calls; ``ewc_gradient`` does the first part in one pass (reading g, theta, anchor and
coefficients, writing the full gradient) and ``ewc_si_accumulate`` the last in another.

Results equal the PyTorch ops bitwise: the penalty gradient, its sum and SI's update are the same float
operations in the same order (compiled with -ffp-contract=off, so no multiply-add is fused). The
telemetry norms sum in float lanes joined in double per block of 1,024, so they equal torch's
``_foreach_norm`` to rounding; they only feed telemetry (the clipped variant clips on torch's own norm).

``ewc_mlp_grad`` goes further, on one thread: the whole forward and backward of the stacked MLPs in one call
(``NativeMlpStep``), with the very kernels the PyTorch ops end in, taken from libtorch_cpu (its BLAS ``sgemm``,
called with the arguments torch's addmm/bmm pass it, and Sleef's ``expf``/``logf``), and the reduction orders of
ATen's log_softmax and sum kernels replayed. ``mlp_kernels`` finds which vector widths this build's kernels use
and checks each piece and the whole step bitwise against ``stack.cross_entropy_step`` before the engine uses it.
Per step that replaces ~30 PyTorch calls (~0.2-0.3 ms of dispatch and small kernels, as much as a run's whole
optimizer pass) with one.

The library is compiled with the C compiler (``$CC``, else ``cc``) into ``$EWCSTAB_NATIVE_CACHE`` (default
``~/.cache/ewcstab``), named by a hash of the source, flags, compiler and CPU, and moved into place
atomically (jobs on a cluster may build it at once). No compiler, a failed build, a non-CPU device, or
``EWCSTAB_NATIVE=0``: the engine uses the PyTorch ops instead (same training numbers), and says so once
in the log. Run records name the path in ``elementwise`` ("native" or "torch").
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from ewcstab.models.mlp import LEAKY_SLOPE

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("elementwise.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC")

_p, _i = ctypes.c_void_p, ctypes.c_int64


def enabled() -> bool:
    return os.environ.get("EWCSTAB_NATIVE", "1") not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    return Path(os.environ.get("EWCSTAB_NATIVE_CACHE") or Path.home() / ".cache" / "ewcstab")


def _cpu_identity() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = info.splitlines()
        return next((line for line in lines if line.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return platform.processor() + platform.machine()


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled ``elementwise.c`` (built once per source, compiler and CPU), or None (see module doc)."""
    if not enabled():
        log.info("native element-wise step disabled (EWCSTAB_NATIVE=0): using PyTorch ops")
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.warning("native element-wise step unavailable (no C compiler): using PyTorch ops (same numbers, slower)")
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
        identity = "\0".join([SOURCE.read_text(), *FLAGS, version, _cpu_identity()])
        key = hashlib.sha256(identity.encode()).hexdigest()[:16]
        target = cache_dir() / f"elementwise-{key}.so"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                subprocess.run([compiler, *FLAGS, "-o", str(built), str(SOURCE), "-lm"], capture_output=True,
                               text=True, check=True)
                os.replace(built, target)  # atomic: concurrent builders each move a complete file
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        log.warning("native element-wise step failed to build (%s): using PyTorch ops", detail.strip()[:500])
        return None
    lib.ewc_gradient.restype = None
    lib.ewc_gradient.argtypes = [_i, _i, _p, _p, _p, _p, _p, _p, _p]
    lib.ewc_si_accumulate.restype = None
    lib.ewc_si_accumulate.argtypes = [_i, _p, _p, _p, _p]
    lib.ewc_gather_bytes.restype = None
    lib.ewc_gather_bytes.argtypes = [_p, _p, _p, _i, _i]
    lib.ewc_adam_step.restype = ctypes.c_int
    lib.ewc_adam_step.argtypes = [_i, _i, _p, *[_p] * 7, _p, _p, *[ctypes.c_double] * 5, _i]
    lib.ewc_set_kernels.restype = ctypes.c_int
    lib.ewc_set_kernels.argtypes = [_p] * 5
    lib.ewc_log_softmax.restype = None
    lib.ewc_log_softmax.argtypes = [_p, _p, _i, _i, _i, _p]
    lib.ewc_cross_entropy_backward.restype = None
    lib.ewc_cross_entropy_backward.argtypes = [_p, _p, _p, _i, _i, ctypes.c_float, _i, _i, _p]
    lib.ewc_column_sums.restype = None
    lib.ewc_column_sums.argtypes = [_p, _i, _i, _p, _i, _p]
    lib.ewc_mlp_workspace.restype = _i
    lib.ewc_mlp_workspace.argtypes = [_i, _p, _i, _i]
    lib.ewc_mlp_grad.restype = ctypes.c_int
    lib.ewc_mlp_grad.argtypes = [_i, _p, _i, _i, _p, _p, _p, _p, _p, _p, ctypes.c_float, _i, _i, _i]
    return lib


@functools.cache
def bytes_convert_exactly() -> bool:
    """Whether the native byte -> float conversion gives torch's ``x_u8.float().div_(255.0)`` for all 256
    bytes (``ewcstab.data.load_split``'s), i.e. gathering a task's ``train_bytes`` gives its ``train_x``."""
    lib = library()
    if lib is None:
        return False
    every = torch.arange(256, dtype=torch.uint8)
    got = torch.empty(256)
    rows = torch.zeros(1, dtype=torch.int64)
    lib.ewc_gather_bytes(got.data_ptr(), every.data_ptr(), rows.data_ptr(), 1, 256)
    return torch.equal(got, every.float().div_(255.0))


#: Parameter sizes of the self-check: vector tails of every length for both widths, and a long body.
_CHECK_SIZES = (*range(1, 34), 4099)


def adam_width() -> int | None:
    """The vector width (8 or 16 floats) for which ``ewc_adam_step`` gives, bitwise, what this torch build's
    ``torch._fused_adam_`` gives (fresh and long-running moments, gradients from 1e-12 to 1e2, zeros); None
    when neither does (another torch build or CPU) or without the library: the engine then keeps torch's own
    Adam kernel."""
    lib = library()
    return None if lib is None else _matching_width(lib)


@functools.cache
def _matching_width(lib: ctypes.CDLL) -> int | None:
    gen = torch.Generator().manual_seed(0)
    n = sum(_CHECK_SIZES)
    sizes = (ctypes.c_int64 * len(_CHECK_SIZES))(*_CHECK_SIZES)
    steps = (1.0, 2.0, 3.0, 10.0, 1000.0, 20000.0)
    grads = [torch.randn(n, generator=gen) * 10 ** (torch.rand(n, generator=gen) * 14 - 12) for _ in steps]
    for g in grads[::2]:
        g[::5] = 0.0
    start = torch.randn(n, generator=gen)
    for width in (8, 16):
        theta, m, v = start.clone(), torch.zeros(n), torch.zeros(n)
        ref = [start.clone(), torch.zeros(n), torch.zeros(n)]
        ref_lists = [list(t.split(_CHECK_SIZES)) for t in ref]
        sums, norms = torch.zeros(3, dtype=torch.float64), torch.zeros(3)
        same = True
        for step, g in zip(steps, grads):
            state = torch.tensor(step)
            torch._fused_adam_(ref_lists[0], list(g.split(_CHECK_SIZES)), ref_lists[1], ref_lists[2], [],
                               [state] * len(_CHECK_SIZES), lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0,
                               eps=1e-8, amsgrad=False, maximize=False)
            lib.ewc_adam_step(len(_CHECK_SIZES), 1, sizes, g.data_ptr(), theta.data_ptr(), m.data_ptr(), v.data_ptr(),
                              None, None, None, sums.data_ptr(), norms.data_ptr(), 1e-3, 0.9, 0.999, 1e-8, step,
                              width)
            same = same and all(torch.equal(a, b) for a, b in zip((theta, m, v), ref))
        if same:
            return width
    log.warning("native Adam step does not match this torch build's fused Adam bitwise: using torch's kernel")
    return None


#: Symbols of libtorch_cpu the native MLP step calls: its BLAS sgemm and Sleef's expf/logf for 8 and 16 lanes.
TORCH_KERNELS = ("sgemm_", "Sleef_expf8_u10", "Sleef_logf8_u10", "Sleef_expf16_u10", "Sleef_logf16_u10")


@functools.cache
def _kernel_widths(lib: ctypes.CDLL) -> tuple[int, ...]:
    """Hand torch's own kernels (``TORCH_KERNELS``) to the library; the vector widths it then has them for."""
    path = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        torch_lib = ctypes.CDLL(str(path))  # already loaded by torch: the same handle
    except OSError:
        return ()
    addresses = [ctypes.cast(getattr(torch_lib, name), ctypes.c_void_p).value if hasattr(torch_lib, name) else None
                 for name in TORCH_KERNELS]
    found = lib.ewc_set_kernels(*addresses)
    return tuple(w for bit, w in ((1, 8), (2, 16)) if found & bit)


@dataclasses.dataclass(frozen=True)
class MlpKernels:
    """How this torch build computes the MLP step's small ops: the vector width of its log_softmax and of its sum
    kernel, and whether its log_softmax backward fuses grad - exp(logp) * sum into one multiply-add."""

    softmax_width: int
    contract: bool
    sum_width: int


def mlp_kernels(widths: tuple[int, ...]) -> MlpKernels | None:
    """The settings under which ``ewc_mlp_grad`` gives, bitwise, ``stack.cross_entropy_step``'s gradients for an MLP
    of these layer widths on one thread (checked piece by piece against the PyTorch ops, then whole), or None: no
    library, not one thread (torch then splits its batched products over runs; the native step would not match or
    gain), no exported kernels, or no match (another torch build or BLAS). The engine then keeps the PyTorch ops."""
    lib = library()
    if lib is None or torch.get_num_threads() != 1:
        return None
    return _checked_mlp_kernels(lib, tuple(widths))


@functools.cache
def _checked_mlp_kernels(lib: ctypes.CDLL, widths: tuple[int, ...]) -> MlpKernels | None:
    available_widths = _kernel_widths(lib)
    gen = torch.Generator().manual_seed(0)
    scratch = torch.empty(max(widths) + 64)  # a row of log_softmax

    def log_softmax_matches(width: int) -> bool:
        for classes in (widths[-1], 3, 10, 17):
            x = torch.randn(64, classes, generator=gen) * 5
            out = torch.empty_like(x)
            lib.ewc_log_softmax(x.data_ptr(), out.data_ptr(), 64, classes, width, scratch.data_ptr())
            if not torch.equal(out, torch.log_softmax(x, 1)):
                return False
        return True

    def backward_matches(width: int, contract: bool) -> bool:
        logp = torch.log_softmax(torch.randn(64, widths[-1], generator=gen) * 5, 1)
        target = torch.randint(0, widths[-1], (64,), generator=gen)
        # total weight 100 (the paper's batch), not a power of two: -1/100 * exp(logp) rounds, fused or not
        want = torch.ops.aten._log_softmax_backward_data(
            torch.ops.aten.nll_loss_backward(torch.ones(()), logp, target, None, 1, -100, torch.full((), 100.0)),
            logp, 1, logp.dtype)
        got = torch.empty_like(logp)
        lib.ewc_cross_entropy_backward(logp.data_ptr(), target.data_ptr(), got.data_ptr(), 64, widths[-1],
                                       -(1.0 / 100.0), width, int(contract), scratch.data_ptr())
        return torch.equal(got, want)

    def sums_match(width: int) -> bool:
        for rows, cols in [(100, w) for w in widths[1:]] + [(37, 300), (1000, 77), (3, 5)]:
            x = torch.randn(2, rows, cols, generator=gen)
            got, partials = torch.empty(cols), torch.empty(16 * cols)
            lib.ewc_column_sums(x[1].data_ptr(), rows, cols, got.data_ptr(), width, partials.data_ptr())
            if not torch.equal(got, torch.sum(x, 1)[1]):
                return False
        return True

    if not available_widths:
        log.info("native MLP step: libtorch_cpu exports no sgemm/Sleef kernels here: using PyTorch ops")
        return None
    softmax = next((w for w in available_widths if log_softmax_matches(w)), None)
    contract = next((c for c in (True, False) if softmax is not None and backward_matches(softmax, c)), None)
    summing = next((w for w in (8, 16) if sums_match(w)), None)
    if softmax is None or contract is None or summing is None:
        log.warning("native MLP step does not match this torch build's kernels: using PyTorch ops")
        return None
    kernels = MlpKernels(softmax, contract, summing)
    from ewcstab.batched.stack import Layout, cross_entropy_step  # the reference the whole step must equal

    for runs, batch in ((2, 100), (3, 7)):
        shapes = [s for a, b in zip(widths[:-1], widths[1:]) for s in ((b, a), (b,))]
        layout = Layout(tuple(f"p{i}" for i in range(len(shapes))), tuple(shapes), runs)
        theta = torch.randn(layout.numel, generator=gen) * 0.1
        want, got = layout.zeros(theta.device), layout.zeros(theta.device)
        x = torch.rand(runs * batch, widths[0], generator=gen)
        y = torch.randint(0, widths[-1], (runs, batch), generator=gen)
        cross_entropy_step(layout.views(theta), layout.views(want), x.view(runs, batch, -1), y)
        step = NativeMlpStep(widths, runs, kernels)
        step(theta, got, x, y)
        if not torch.equal(got, want):
            log.warning("native MLP step's gradients differ from the PyTorch ops': using PyTorch ops")
            return None
    return kernels


class NativeMlpStep:
    """``stack.cross_entropy_step`` for R stacked MLPs of ``widths`` in one native call (``ewc_mlp_grad``)."""

    def __init__(self, widths: tuple[int, ...], runs: int, kernels: MlpKernels) -> None:
        self._lib = library()
        self.runs = runs
        self._widths = (ctypes.c_int64 * len(widths))(*widths)
        self._layers = len(widths) - 1
        self._kernels = kernels
        self._work: dict[int, Tensor] = {}  # batch size -> workspace
        self._loss = torch.empty(runs)

    def __call__(self, theta: Tensor, grad: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """Write the task gradient of every run into ``grad`` (flat, ``stack.Layout``) from x (R * B, in) and the
        labels y (R, B); returns the (R,) mean cross-entropies (a buffer the next call overwrites)."""
        runs, batch = y.shape
        if runs != self.runs or not (y.dtype == torch.int64 and y.is_contiguous()):
            raise ValueError("native MLP step: y must be a contiguous int64 (runs, batch) tensor")
        work = self._work.get(batch)
        if work is None:  # torch's CPU allocator aligns to 64 bytes, as the C code's carving assumes
            work = self._work[batch] = torch.empty(self._lib.ewc_mlp_workspace(self._layers, self._widths, runs, batch))
            if work.data_ptr() % 64:
                raise RuntimeError("native MLP step: the workspace is not 64-byte aligned")
        k = self._kernels
        theta_p, grad_p, x_p = _checked(theta, grad, x)
        done = self._lib.ewc_mlp_grad(self._layers, self._widths, runs, batch, x_p, y.data_ptr(), theta_p, grad_p,
                                      work.data_ptr(), self._loss.data_ptr(), LEAKY_SLOPE, k.softmax_width,
                                      int(k.contract), k.sum_width)
        if done != 0:
            raise RuntimeError("native MLP step: the library lacks torch's kernels for this vector width")
        return self._loss


def available(device: torch.device) -> bool:
    return device.type == "cpu" and library() is not None


def _checked(*tensors: Tensor | None) -> list[int | None]:
    for t in tensors:
        if t is not None and not (t.is_contiguous() and t.dtype == torch.float32 and t.device.type == "cpu"):
            raise ValueError("native element-wise step: buffers must be contiguous float32 CPU tensors")
    return [None if t is None else t.data_ptr() for t in tensors]


class NativeGradient:
    """The native passes over the flat buffers of one batch (``stack.Layout``: ``runs`` tensors of each
    parameter's ``sizes``, parameter-major)."""

    def __init__(self, sizes: list[int], runs: int) -> None:
        lib = library()
        if lib is None:
            raise RuntimeError("the native element-wise step is unavailable (see ewcstab.batched.native)")
        self._lib = lib
        self.runs = runs
        self._sizes = (ctypes.c_int64 * len(sizes))(*sizes)
        self._n_params = len(sizes)
        self._sums = torch.zeros(runs, 3, dtype=torch.float64)
        self._norms = torch.zeros(runs, 3)
        self._adam_buffers: tuple[Tensor | None, ...] = ()  # the last adam_step's buffers and their pointers
        self._adam_pointers: list[int | None] = []
        self._batch_x: Tensor | None = None

    def gradient(self, grad: Tensor, theta: Tensor, anchor: Tensor | None = None, twice_coef: Tensor | None = None,
                 old: Tensor | None = None) -> Tensor:
        """Add the penalty gradient into ``grad`` (when ``anchor`` and ``twice_coef``), copy theta into ``old``
        (when given); returns the (R, 3) float32 norms of the task gradient, the penalty gradient and their sum."""
        self._sums.zero_()
        args = _checked(grad, theta, anchor, twice_coef, old)
        self._lib.ewc_gradient(self._n_params, self.runs, self._sizes, *args, self._sums.data_ptr())
        return self._sums.sqrt().to(torch.float32)

    def adam_step(self, grad: Tensor, theta: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, anchor: Tensor | None,
                  twice_coef: Tensor | None, accum: Tensor | None, lr: float, betas: tuple[float, float], eps: float,
                  step: int) -> Tensor:
        """``gradient``, torch's fused Adam step on the full gradient (``adam_width``) and, with ``accum``, SI's
        path integral accum -= (theta_new - theta) * g, in one pass; ``grad`` keeps the task gradient. Returns the
        (R, 3) norms as ``gradient`` (a buffer the next call overwrites)."""
        width = adam_width()
        if width is None:
            raise RuntimeError("the native Adam step does not match torch's fused Adam here (see adam_width)")
        buffers = (grad, theta, exp_avg, exp_avg_sq, anchor, twice_coef, accum)
        # the same tensors step after step: checked once (at one step per ms, the checks cost ~1%)
        if len(buffers) != len(self._adam_buffers) or any(a is not b for a, b in zip(buffers, self._adam_buffers)):
            self._adam_pointers = _checked(*buffers)
            self._adam_buffers = buffers
        self._lib.ewc_adam_step(self._n_params, self.runs, self._sizes, *self._adam_pointers, self._sums.data_ptr(),
                                self._norms.data_ptr(), lr, *betas, eps, float(step), width)
        return self._norms

    def gather_bytes(self, images: Tensor, rows: Tensor) -> Tensor:
        """images[rows] / 255 as float32 (N, width), from (M, width) uint8 images and (N,) int64 rows."""
        if not (images.dtype == torch.uint8 and images.is_contiguous() and rows.dtype == torch.int64):
            raise ValueError("gather_bytes: images must be contiguous uint8, rows int64")
        rows = rows.contiguous()
        shape = (rows.numel(), images.shape[1])
        if self._batch_x is None or self._batch_x.shape != shape:
            self._batch_x = torch.empty(shape)  # kept: a fresh 1 MB tensor per step costs page faults
        self._lib.ewc_gather_bytes(self._batch_x.data_ptr(), images.data_ptr(), rows.data_ptr(), shape[0], shape[1])
        return self._batch_x

    def si_accumulate(self, accum: Tensor, theta: Tensor, old: Tensor, grad: Tensor) -> None:
        """accum -= (theta - old) * grad, in place (SI's path integral)."""
        self._lib.ewc_si_accumulate(accum.numel(), *_checked(accum, theta, old, grad))
