"""Generators: gpt (stage 1), mar + diffloss (stage 2), fusion (how stage 2 sees stage 1)."""
from __future__ import annotations

import torch


def check_ids(x: torch.Tensor, hi: int, what: str, note: str = "") -> None:
    """One-line ValueError when integer ids (class labels, codes) leave [0, hi], instead of an
    index error deep inside an embedding.  One host sync; skipped while torch.compile traces."""
    if x.dtype.is_floating_point or x.dtype == torch.bool:
        raise ValueError(f"{what} must be an integer tensor, got {x.dtype}")
    if x.numel() == 0 or torch.compiler.is_compiling():
        return
    lo_v, hi_v = torch.stack([x.min(), x.max()]).tolist()
    if lo_v < 0 or hi_v > hi:
        raise ValueError(f"{what} must be in [0, {hi}]{note}; got values in [{lo_v}, {hi_v}]")


def compiled(module, name: str, dynamic: bool = True):
    """`module.name` under torch.compile, cached on the module.  dynamic=True: one graph covers
    the changing kept-token counts of MAR's rounds (the CPU path: a compile costs 5-46 s there).
    dynamic=False: one graph per shape, for a caller that pads its shapes to a few buckets (the
    CUDA path: static shapes let inductor specialise its kernels)."""
    cache = module.__dict__.setdefault("_d2c_compiled", {})
    if (name, dynamic) not in cache:
        if not dynamic:   # buckets x (CFG batch, uncond_refresh's half batch) can pass dynamo's 8
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        cache[(name, dynamic)] = torch.compile(getattr(module, name), dynamic=dynamic)
    return cache[(name, dynamic)]


_FN_CACHE: dict = {}


def compiled_fn(fn):
    """A plain function under torch.compile(dynamic=True), compiled once per process."""
    if fn not in _FN_CACHE:
        _FN_CACHE[fn] = torch.compile(fn, dynamic=True)
    return _FN_CACHE[fn]
