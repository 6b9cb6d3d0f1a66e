"""Triton kernels, each beside its plain-PyTorch reference and behind one dispatch function:
attention.py (the dispatch; its Triton flash attention in attention_triton.py) and adaln_mlp.py (the diffusion head's fused AdaLN block).

Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (the tests); the flag
is read when `@triton.jit` runs, so it must be set before these modules are imported.

Every launch goes through `launch()`.  Under `record_launches()` nothing runs: the wrappers take
their CUDA branch (`on_cuda`) on CPU tensors and each launch is recorded, so a test can compile
exactly what a GPU would run for Hopper with `d2c.kernels.aot.compile_for_gpu` (Triton lowers to
PTX and a cubin with no GPU present).  That catches what the interpreter cannot, such as a bf16 x fp32 `tl.dot`.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass, field

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - triton ships with the pinned torch; be safe anyway
    triton = tl = None

_RECORD: list | None = None          # the launches of the active record_launches(), else None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def on_cuda(t) -> bool:
    """Whether a wrapper takes its CUDA branch for tensor (or device) `t`: true on CUDA, and for
    every tensor while `record_launches()` is active."""
    if _RECORD is not None:
        return True
    dev = t.device if isinstance(t, torch.Tensor) else torch.device(t)
    return dev.type == "cuda"


def triton_available(device) -> bool:
    """Whether a Triton kernel can run for tensors on `device` (CUDA, or CPU under the interpreter)."""
    return triton is not None and (on_cuda(device) or interpreting())


@dataclass
class Launch:
    """One kernel launch as a GPU would make it: the kernel, its runtime arguments by name, its
    constexprs and launch options (num_warps, num_stages)."""
    kernel: object
    args: dict
    constexprs: dict
    options: dict = field(default_factory=dict)

    @property
    def fn(self):
        """The kernel's Python function (unwrapping an Autotuner and the JIT or interpreter)."""
        fn = self.kernel
        while hasattr(fn, "fn"):
            fn = fn.fn
        return fn

    @property
    def name(self) -> str:
        return self.fn.__name__


def launch(kernel, grid, *args, **kw):
    """kernel[grid](*args, **kw), or its record under `record_launches()`."""
    if _RECORD is None:
        return kernel[grid](*args, **kw)
    names = list(inspect.signature(Launch(kernel, {}, {}).fn).parameters)
    opts = {k: kw.pop(k) for k in ("num_warps", "num_stages") if k in kw}
    _RECORD.append(Launch(kernel, dict(zip(names, args)), kw, opts))
    return None


@contextlib.contextmanager
def record_launches():
    """Record, instead of running, every kernel launch in the block (CUDA branches taken)."""
    global _RECORD
    prev, _RECORD = _RECORD, []
    try:
        yield _RECORD
    finally:
        _RECORD = prev
