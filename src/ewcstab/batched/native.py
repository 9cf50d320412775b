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

The library is compiled with the C compiler (``$CC``, else ``cc``) into ``$EWCSTAB_NATIVE_CACHE`` (default
``~/.cache/ewcstab``), named by a hash of the source, flags, compiler and CPU, and moved into place
atomically (jobs on a cluster may build it at once). No compiler, a failed build, a non-CPU device, or
``EWCSTAB_NATIVE=0``: the engine uses the PyTorch ops instead (same training numbers), and says so once
in the log. Run records name the path in ``elementwise`` ("native" or "torch").
"""

from __future__ import annotations

import ctypes
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
        self._batch_x: Tensor | None = None

    def gradient(self, grad: Tensor, theta: Tensor, anchor: Tensor | None = None, twice_coef: Tensor | None = None,
                 old: Tensor | None = None) -> Tensor:
        """Add the penalty gradient into ``grad`` (when ``anchor`` and ``twice_coef``), copy theta into ``old``
        (when given); returns the (R, 3) float32 norms of the task gradient, the penalty gradient and their sum."""
        self._sums.zero_()
        args = _checked(grad, theta, anchor, twice_coef, old)
        self._lib.ewc_gradient(self._n_params, self.runs, self._sizes, *args, self._sums.data_ptr())
        return self._sums.sqrt().to(torch.float32)

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
