"""Dtype rules shared by every model.

Numerically sensitive arithmetic (norm statistics, softmax and cross-entropy, RoPE angles, the
diffusion schedule and its reverse step) runs in float32 even when the weights or autocast are
bf16, and in float64 when the inputs are float64: float64 is what the tests use to check a
mathematical identity (two code paths that must agree) independently of a CPU's rounding.
"""
from __future__ import annotations

import torch


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every narrower float type computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def upcast(x: torch.Tensor) -> torch.Tensor:
    """x in `accum_dtype(x.dtype)` (no copy when it already is)."""
    return x.to(accum_dtype(x.dtype))
