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


def compiled(module, name: str):
    """`module.name` under torch.compile(dynamic=True), cached on the module: dynamic shapes
    cover the changing KV length (GPT) and kept-token counts (MAR) without recompiling."""
    cache = module.__dict__.setdefault("_d2c_compiled", {})
    if name not in cache:
        cache[name] = torch.compile(getattr(module, name), dynamic=True)
    return cache[name]
