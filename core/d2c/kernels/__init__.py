"""Triton kernels, each beside its plain-PyTorch reference and behind one dispatch function:
attention.py (flash attention) and adaln_mlp.py (the diffusion head's fused AdaLN block).

Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (the tests); the flag
is read when `@triton.jit` runs, so it must be set before these modules are imported.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - triton ships with the pinned torch; be safe anyway
    triton = tl = None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available(device) -> bool:
    """Whether a Triton kernel can run for tensors on `device` (CUDA, or CPU under the interpreter)."""
    return triton is not None and (torch.device(device).type == "cuda" or interpreting())
