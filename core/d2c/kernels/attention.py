"""The one attention of the project: every model calls `attention()`.

Shapes: q (B, H, Lq, D), k and v (B, H, Lk, D), any strides.  `key_padding_mask` (B, Lk) is
True where a key is *kept*.  `causal` aligns the last query with the last key (bottom-right):
query i sees key j iff j <= i + (Lk - Lq), which is what a KV-cache decode step needs when
Lq < Lk.  A query row that sees no key at all returns zeros (every backend agrees on that;
plain softmax would give NaN).

Backends
  reference  plain math in float32/float64: the oracle of the tests.
  sdpa       torch.nn.functional.scaled_dot_product_attention (CPU default; training on GPU).
  triton     `_attn_fwd` below: FlashAttention-style forward (Dao et al. 2022, alg. 1): one
             program per (query block, batch*head), online softmax over key blocks, so the
             Lq x Lk score matrix never exists in memory.  Forward only: when autograd needs a
             graph or dropout is on, `auto` falls back to SDPA.
Choice: explicit `backend=` > `attention_backend(...)` context > env D2C_ATTENTION > auto.
auto = triton for CUDA tensors, sdpa otherwise.  DESIGN.md suggested "triton whenever
TRITON_INTERPRET=1"; tests/conftest.py sets that flag for the whole suite, and the interpreter
is 400-4000x slower, so here the interpreter path runs only when asked for explicitly.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.nn.functional as F

from d2c.precision import accum_dtype

from d2c.kernels import tl, triton, triton_available

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


# ------------------------------------------------------------------------------ Triton kernel
if triton is not None:
    @triton.jit
    def _attn_fwd(Q, K, V, O, KPM, sm_scale,
                  sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                  sob, soh, som, sod, smb,
                  H, LQ, LK, D,
                  CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, FP32_IEEE: tl.constexpr,
                  DOT_F32: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < LQ
        d_ok = offs_d < D
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        # softmax in base 2: exp(x) = exp2(x log2 e), folded into the scale once
        qk_scale = sm_scale * 1.4426950408889634
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)      # running row max
        l_i = tl.zeros([BLOCK_M], tl.float32)                    # running row sum of exp
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        shift = LK - LQ                                          # bottom-right causal alignment
        hi = LK
        if CAUSAL:
            # key blocks past the last query of this block are fully masked: skip them
            hi = tl.minimum(LK, (pid_m + 1) * BLOCK_M + shift)
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh
        for start in range(0, hi, BLOCK_N):
            kn = start + offs_n
            n_ok = kn < LK
            kt = tl.load(k_base + kn[None, :] * skn + offs_d[:, None] * skd,
                         mask=n_ok[None, :] & d_ok[:, None], other=0.0)          # (D, N)
            if DOT_F32:
                kt = kt.to(tl.float32)
            if FP32_IEEE:
                s = tl.dot(q, kt, input_precision="ieee")
            else:
                s = tl.dot(q, kt)
            s = s * qk_scale
            ok = n_ok[None, :]
            if HAS_KPM:
                kp = tl.load(KPM + b * smb + kn, mask=n_ok, other=0)
                ok = ok & (kp != 0)[None, :]
            if CAUSAL:
                ok = ok & (kn[None, :] <= offs_m[:, None] + shift)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # rows with nothing visible yet keep m = -inf; subtract 0 there so exp2 gives 0, not NaN
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_safe)
            p = tl.math.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vt = tl.load(v_base + kn[:, None] * svn + offs_d[None, :] * svd,
                         mask=n_ok[:, None] & d_ok[None, :], other=0.0)          # (N, D)
            if DOT_F32:
                vt = vt.to(tl.float32)
            if FP32_IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(V.dtype.element_ty).to(vt.dtype), vt)
            m_i = m_new
        # a row that saw no key has l = 0 and acc = 0: write 0
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
                 out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@torch.compiler.disable
def attention_triton(q, k, v, *, causal: bool = False, key_padding_mask=None, scale=None, out=None,
                     block_m: int | None = None, block_n: int | None = None):
    """The Triton forward; `out` (B, H, Lq, D) lets tests hand in a poisoned buffer."""
    if not triton_available(q.device):
        raise RuntimeError("attention backend 'triton' needs CUDA tensors or TRITON_INTERPRET=1 "
                           "set before d2c.kernels is imported")
    B, H, LQ, D = q.shape
    LK = k.shape[-2]
    if k.shape != (B, H, LK, D) or v.shape != (B, H, LK, D):
        raise ValueError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; "
                         "k and v must be (B, H, Lk, D) with q's B, H, D")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if key_padding_mask is not None:
        kpm = key_padding_mask.to(device=q.device)
        kpm = (kpm.bool() if kpm.dtype != torch.bool else kpm).view(torch.uint8)
        if kpm.shape != (B, LK):
            kpm = kpm.expand(B, LK)
        smb = kpm.stride(0)
        if kpm.stride(1) != 1:
            kpm, smb = kpm.contiguous(), LK
    else:
        kpm, smb = q, 0                                                   # never read
    # tl.dot wants >= 16 rows; bigger blocks amortise the interpreter's per-program cost
    bm = block_m or min(64 if q.is_cuda else 128, max(16, _next_pow2(LQ)))
    bn = block_n or min(64 if q.is_cuda else 128, max(16, _next_pow2(LK)))
    bd = max(16, _next_pow2(D))
    grid = (triton.cdiv(LQ, bm), B * H)
    fp32_ieee = q.dtype in (torch.float32, torch.float64) and not torch.backends.cuda.matmul.allow_tf32
    # Triton 3.8's interpreter returns garbage from tl.dot on bf16/fp16 operands: upcast there
    # (loads, stores and the rounding of p to v's dtype still run in the input dtype)
    dot_f32 = not q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    _attn_fwd[grid](q, k, v, out, kpm, scale,
                    *q.stride(), *k.stride(), *v.stride(), *out.stride(), smb,
                    H, LQ, LK, D,
                    CAUSAL=bool(causal), HAS_KPM=key_padding_mask is not None, FP32_IEEE=fp32_ieee, DOT_F32=dot_f32,
                    BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
                    **({"num_warps": 4 if bd <= 64 else 8, "num_stages": 2} if q.is_cuda else {}))
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


def resolve_backend(q, *, backend=None, needs_grad: bool = False, dropout_p: float = 0.0) -> str:
    """Which backend `attention()` runs for these inputs (exposed for tests and benches)."""
    name = backend or _override or os.environ.get(_ENV) or "auto"
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} (from {'D2C_ATTENTION' if not backend and not _override else 'argument'}); "
                         f"allowed: {', '.join(BACKENDS)}")
    if name == "auto":
        # inside torch.compile, SDPA: inductor lowers it to its own fused kernels, while a
        # hand-written launch would be traced as an opaque call (or break the graph)
        ok = (q.is_cuda and not torch.compiler.is_compiling() and triton is not None
              and not needs_grad and dropout_p == 0.0 and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and q.shape[-1] <= 256)
        return "triton" if ok else "sdpa"
    if name == "triton" and (needs_grad or dropout_p > 0.0):
        return "sdpa"          # forward-only kernel without dropout: training takes SDPA's backward
    return name


def attention(q, k, v, *, causal: bool = False, key_padding_mask=None, dropout_p: float = 0.0,
              scale=None, backend: str | None = None):
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    name = resolve_backend(q, backend=backend, needs_grad=needs_grad, dropout_p=dropout_p)
    if name == "triton":
        return attention_triton(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    if name == "reference":
        if dropout_p > 0.0:
            raise ValueError("attention backend 'reference' has no dropout; use sdpa for training")
        return attention_reference(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    return _attention_sdpa(q, k, v, causal, key_padding_mask, dropout_p, scale)
