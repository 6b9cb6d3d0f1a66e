"""The one attention of the project: every model calls `attention()`.

Shapes: q (B, H, Lq, D), k and v (B, H, Lk, D), any strides.  `key_padding_mask` (B, Lk) is
True where a key is *kept*.  `causal` aligns the last query with the last key (bottom-right):
query i sees key j iff j <= i + (Lk - Lq), which is what a KV-cache decode step needs when
Lq < Lk.  A query row that sees no key at all returns zeros (every backend agrees on that;
plain softmax would give NaN).

Backends
  reference  plain math in float32/float64: the oracle of the tests.
  sdpa       torch.nn.functional.scaled_dot_product_attention (CPU default; training on GPU).
  triton     forward only (when autograd needs a graph or dropout is on, SDPA runs instead):
             attention_triton.py, a FlashAttention-2 forward and a split-K decode kernel.
Choice: explicit `backend=` > `attention_backend(...)` context > env D2C_ATTENTION > auto.
auto = on CUDA, per `attention_case`, the backend ATTENTION_DISPATCH records as measured fastest
(SDPA for every case until a GPU run says otherwise); sdpa otherwise.  Not "triton whenever
TRITON_INTERPRET=1": tests/conftest.py sets that flag for the whole suite, and the interpreter
is 400-4000x slower (docs/design.md section 6), so here the interpreter path runs only when
asked for explicitly.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.nn.functional as F

from d2c.precision import accum_dtype

from d2c.kernels import on_cuda, triton
from d2c.kernels.attention_triton import attention_triton, is_decode

BACKENDS = ("auto", "reference", "sdpa", "triton")
_ENV = "D2C_ATTENTION"
_override: str | None = None


def _bool_mask(lq: int, lk: int, causal: bool, key_padding_mask, device):
    """(B or 1, 1, Lq, Lk) mask, True = may attend, or None when nothing is masked."""
    mask = None
    if causal:
        q_pos = torch.arange(lq, device=device)[:, None] + (lk - lq)
        mask = (torch.arange(lk, device=device)[None, :] <= q_pos)[None, None]
    if key_padding_mask is not None:
        kp = key_padding_mask[:, None, None, :].bool()
        mask = kp if mask is None else (mask & kp)
    return mask


def attention_reference(q, k, v, *, causal: bool = False, key_padding_mask=None, scale=None):
    """softmax(q k^T * scale + mask) v in float32 (float64 for float64 inputs); rows that see
    no key give 0."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    dt = accum_dtype(q.dtype)
    s = torch.einsum("bhqd,bhkd->bhqk", q.to(dt), k.to(dt)) * scale
    mask = _bool_mask(q.shape[-2], k.shape[-2], causal, key_padding_mask, q.device)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    if mask is not None:
        p = p.nan_to_num(0.0)                                   # fully masked rows: 0, not NaN
    return torch.einsum("bhqk,bhkd->bhqd", p, v.to(dt)).to(q.dtype)


def _attention_sdpa(q, k, v, causal, key_padding_mask, dropout_p, scale):
    lq, lk = q.shape[-2], k.shape[-2]
    if key_padding_mask is None and (not causal or lq == lk):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal and lq > 1,
                                              scale=scale)
    if causal and lq == 1 and key_padding_mask is None:  # one query sees the whole cache
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    mask = _bool_mask(lq, lk, causal, key_padding_mask, q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    if causal and lq > lk:
        out = out.nan_to_num(0.0)                               # rows with no visible key: 0
    return out


# ------------------------------------------------------------------------------ dispatch
@contextlib.contextmanager
def attention_backend(name: str):
    """Force a backend inside a block (tests, benchmarks): `with attention_backend("triton"): ...`."""
    global _override
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r}; allowed: {', '.join(BACKENDS)}")
    prev, _override = _override, name
    try:
        yield
    finally:
        _override = prev


ATTENTION_CASES = ("unmasked", "padded", "causal", "decode", "cross")

# What `auto` runs on CUDA for fp16 / bf16 inputs, per `attention_case`: the faster of SDPA and
# the Triton kernels, measured by bench/gpu_check.py (attention_timing: bf16, batch 32, 12 heads,
# head dim 64, CUDA events, medians) on one H200, torch 2.11 / triton 3.6, 2026-12-04, main
# 64b8ad0.  Triton time / SDPA time of the kernel then (one tile, no padded-block skip, no
# split-K): unmasked MAR-B decoder L320 1.25, padded MAR-B encoder 1.04, causal GPT-B L257 1.49,
# decode 1x257 2.01, cross 320x256 1.61 (L1024 1.57, L4096 causal 1.77): SDPA everywhere.  The
# present kernels (padded blocks skipped, split-K decode, autotuned tiles) are not measured on a
# GPU yet, so every case stays SDPA; a GPU run of bench/gpu_check.py prints this table, measured,
# to paste here.  fp32 always takes SDPA (not measured; Triton's exact fp32 dot has no tensor cores).
ATTENTION_DISPATCH = {"unmasked": "sdpa", "padded": "sdpa", "causal": "sdpa", "decode": "sdpa", "cross": "sdpa"}


def attention_case(lq: int, lk: int, causal: bool = False, key_padding_mask=None) -> str:
    """The case of ATTENTION_DISPATCH a call falls in: "decode" (`is_decode`: a KV-cache step,
    masked or not), else "padded" (a key-padding mask), "causal",
    "cross" (Lq != Lk, unmasked), "unmasked"."""
    if is_decode(lq, lk):
        return "decode"
    if key_padding_mask is not None:
        return "padded"
    if causal:
        return "causal"
    return "cross" if lq != lk else "unmasked"


def resolve_backend(q, k=None, *, causal: bool = False, key_padding_mask=None, backend=None,
                    needs_grad: bool = False, dropout_p: float = 0.0) -> str:
    """Which backend `attention()` runs for these inputs (exposed for tests and benches); `k`
    (its length), `causal` and `key_padding_mask` pick auto's case (k None: Lk = Lq)."""
    name = backend or _override or os.environ.get(_ENV) or "auto"
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} (from {'D2C_ATTENTION' if not backend and not _override else 'argument'}); "
                         f"allowed: {', '.join(BACKENDS)}")
    if name == "auto":
        # inside torch.compile, SDPA: inductor lowers it to its own fused kernels, while a
        # hand-written launch would be traced as an opaque call (or break the graph)
        ok = (on_cuda(q) and not torch.compiler.is_compiling() and triton is not None
              and not needs_grad and dropout_p == 0.0 and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256)
        if not ok:
            return "sdpa"
        lq = q.shape[-2]
        return ATTENTION_DISPATCH[attention_case(lq, lq if k is None else k.shape[-2], causal, key_padding_mask)]
    if name == "triton" and (needs_grad or dropout_p > 0.0):
        return "sdpa"          # forward-only kernel without dropout: training takes SDPA's backward
    return name


def attention(q, k, v, *, causal: bool = False, key_padding_mask=None, dropout_p: float = 0.0,
              scale=None, backend: str | None = None):
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    name = resolve_backend(q, k, causal=causal, key_padding_mask=key_padding_mask, backend=backend,
                           needs_grad=needs_grad, dropout_p=dropout_p)
    if name == "triton":
        return attention_triton(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    if name == "reference":
        if dropout_p > 0.0:
            raise ValueError("attention backend 'reference' has no dropout; use sdpa for training")
        return attention_reference(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    return _attention_sdpa(q, k, v, causal, key_padding_mask, dropout_p, scale)
