"""A task's training images on transparent huge pages, for the stacked engine's random-row gather.

``data.build_tasks`` places every CPU task's byte images here once, when the tasks are built (a copy of 47 MB
costs ~75 ms, mostly page faults: paid per training call it was ~2% of a batch's task at 600 steps).

Each training step gathers 100 random 784-byte rows per run from a task's 47 MB of byte images
(``native.NativeGradient.gather_bytes``). With 4 KB pages nearly every row costs a TLB miss on top of its
cache misses; with 2 MB pages the whole array fits the TLB. Measured on the development Xeon (one thread, 4 runs,
in the training loop): the gather ~0.058 -> ~0.045 ms per run and step. The flat parameter/optimizer buffers,
which are streamed in order, measured no faster on huge pages and stay plain tensors. Linux gives an anonymous
mapping huge pages where asked (``madvise(MADV_HUGEPAGE)``: /sys/kernel/mm/transparent_hugepage/enabled
"madvise" or "always"); elsewhere, and under 2 MB, this is a plain tensor. Only where the bytes live changes.
"""

from __future__ import annotations

import mmap

import torch
from torch import Tensor

HUGE_PAGE = 2 << 20


def empty(numel: int, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """An uninitialised (numel,) tensor; on a CPU and from 2 MB on, 2 MB-aligned memory advised to huge pages."""
    nbytes = numel * dtype.itemsize
    if torch.device(device).type != "cpu" or nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(numel, dtype=dtype, device=device)
    buf = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel without transparent huge pages: plain pages
        pass
    start = torch.frombuffer(buf, dtype=torch.uint8, count=1).data_ptr()
    # the tensor keeps ``buf`` alive; the mapping is released with the tensor's storage
    return torch.frombuffer(buf, dtype=dtype, count=numel, offset=-start % HUGE_PAGE)


def copy_of(tensor: Tensor) -> Tensor:
    """A contiguous copy of ``tensor`` in a buffer from ``empty``, of the same shape."""
    out = empty(tensor.numel(), tensor.device, tensor.dtype)
    return out.copy_(tensor.reshape(-1)).view(tensor.shape)
