"""The one attention of the project: every model calls `attention()`.

Shapes: q (B, H, Lq, D), k and v (B, H, Lk, D).  `key_padding_mask` (B, Lk) is True
where a key is *kept*.  `causal` aligns the last query with the last key (bottom-right),
which is what a KV-cache decode step needs when Lq < Lk.
The Triton kernel (issue 6) plugs in behind `attention()`; on CPU the dispatch uses
PyTorch's SDPA, and `attention_reference` is the plain-math oracle for tests.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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
    """softmax(q k^T * scale + mask) v, computed in the input dtype's float upcast."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.einsum("bhqd,bhkd->bhqk", q.float() if q.dtype != torch.float64 else q,
                     k.float() if k.dtype != torch.float64 else k) * scale
    mask = _bool_mask(q.shape[-2], k.shape[-2], causal, key_padding_mask, q.device)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", p, v.to(p.dtype)).to(q.dtype)


def attention(q, k, v, *, causal: bool = False, key_padding_mask=None, dropout_p: float = 0.0,
              scale=None):
    lq, lk = q.shape[-2], k.shape[-2]
    if key_padding_mask is None and (not causal or lq == lk):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal and lq > 1,
                                              scale=scale)
    if causal and lq == 1 and key_padding_mask is None:  # one query sees the whole cache
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    mask = _bool_mask(lq, lk, causal, key_padding_mask, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
