"""Stage 1: class-conditional GPT over VQ codes (LlamaGen c2i, Sun et al., arXiv 2406.06525).

A Llama decoder: pre-norm RMSNorm (fp32), fused qkv without biases, SwiGLU MLP, 2D RoPE.
The sequence is [class token, code 0, ..., code T-2]; position t predicts code t.
Parameter names and shapes follow FoundationVision/LlamaGen `autoregressive/models/gpt.py`
so its public `c2i_*.pt` files ({"model": sd}) load with strict=True; nothing else
(rope table, KV caches) lives in the state dict.

    model = Transformer(config)
    logits = model(codes, labels)            # (B, T, vocab), teacher forced, fp32
    loss = model.loss(codes, labels)         # CE in fp32
Generation with the KV cache is `d2c.models.generate.gpt_generate` (LlamaGen's generate.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from d2c.config import GPTConfig
from d2c.kernels.attention import attention
from d2c.models import check_ids
from d2c.precision import accum_dtype, upcast


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of k that is >= n (SwiGLU width rounding, as in Llama)."""
    return n if n % k == 0 else n + k - n % k


def check_labels(labels: torch.Tensor, num_classes: int, allow_null: bool = False) -> None:
    """Class ids in [0, num_classes), or up to num_classes (the null class) when `allow_null`."""
    check_ids(labels, num_classes if allow_null else num_classes - 1, "class labels",
              f" (num_classes={num_classes})")


def next_token_loss(logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (B, T, V) against codes (B, T), in fp32 (LlamaGen)."""
    return F.cross_entropy(upcast(logits).flatten(0, 1), codes.flatten())


# ----------------------------------------------------------------------------- 2D RoPE
def rope_2d_table(grid_size: int, head_dim: int, base: float = 10000.0, n_prefix: int = 1):
    """(n_prefix + grid_size**2, head_dim // 2, 2) table of (cos, sin) per rotary pair.

    Pairs [0, head_dim/4) rotate with the token's row, pairs [head_dim/4, head_dim/2) with its
    column, both with frequencies base^(-2i / (head_dim/2)); tokens are in raster order.
    The class-token prefix gets an all-zero table, exactly as LlamaGen: there q and k become
    zero (the class token's key gives logit 0 to every query), which the public weights expect.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    half = head_dim // 2
    freqs = base ** (-torch.arange(0, half, 2, dtype=torch.float64, device="cpu") / half)
    pos = torch.arange(grid_size, dtype=torch.float64, device="cpu")
    ang = torch.outer(pos, freqs)                                   # (grid, head_dim/4)
    rows = ang[:, None, :].expand(grid_size, grid_size, -1)
    cols = ang[None, :, :].expand(grid_size, grid_size, -1)
    ang = torch.cat([rows, cols], dim=-1).flatten(0, 1)             # (grid^2, head_dim/2)
    table = torch.stack([ang.cos(), ang.sin()], dim=-1)
    table = torch.cat([table.new_zeros(n_prefix, half, 2), table])
    return table.float()


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of x (B, S, H, D) by table (S, D/2, 2).
    Computed in fp32 (fp64 for fp64 inputs), returned in x's dtype."""
    dt = accum_dtype(x.dtype)
    x0, x1 = x.to(dt).unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = table.to(dt)[None, :, None].unbind(-1)              # (1, S, 1, D/2)
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2).type_as(x)


# ----------------------------------------------------------------------------- blocks
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = upcast(x)  # the mean square in fp32 even under bf16 autocast
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); hidden = 2/3 of 4*dim rounded up to multiple_of."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = int(2 * 4 * config.dim / 3)
        if config.ffn_dim_multiplier is not None:
            hidden = int(config.ffn_dim_multiplier * hidden)
        hidden = find_multiple(hidden, config.multiple_of)
        self.w1 = nn.Linear(config.dim, hidden, bias=False)
        self.w3 = nn.Linear(config.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, config.dim, bias=False)
        self.ffn_dropout = nn.Dropout(config.ffn_dropout_p)

    def forward(self, x):
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class KVCache:
    """Keys and values of the positions seen so far for one layer, (B, H_kv, max_len, D).
    A plain object (not a module or buffer), so it never reaches the state dict.  Allocated
    on the first write with that write's dtype/device; filled left to right.  A write at a
    tensor position is the static form (gpt-fast's): every slot is returned and the caller masks
    the slots past the position, so a decode step has one shape whatever its position and
    can be replayed as one CUDA graph."""

    def __init__(self, batch: int, max_len: int):
        self.batch, self.max_len = batch, max_len
        self.k = self.v = None

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H_kv, S, D) at positions pos..pos+S-1; return all keys/values 0..pos+S-1."""
        if self.k is None:
            shape = (self.batch, k.shape[1], self.max_len, k.shape[3])
            self.k, self.v = k.new_zeros(shape), v.new_zeros(shape)
        if isinstance(pos, torch.Tensor):                       # static: (S,) positions on the device
            self.k.index_copy_(2, pos, k.to(self.k.dtype))
            self.v.index_copy_(2, pos, v.to(self.v.dtype))
            return self.k, self.v
        end = pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to write up to {end}")
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head or config.n_head
        self.head_dim = config.dim // config.n_head
        self.wqkv = nn.Linear(config.dim, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)
        self.attn_dropout_p = config.attn_dropout_p
        self.resid_dropout = nn.Dropout(config.resid_dropout_p)
        self.kv_cache: KVCache | None = None

    def forward(self, x, freqs, start_pos: int = 0):
        b, s, d = x.shape
        kv = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([d, kv, kv], dim=-1)
        q = apply_rope(q.view(b, s, self.n_head, self.head_dim), freqs).transpose(1, 2)
        k = apply_rope(k.view(b, s, self.n_kv_head, self.head_dim), freqs).transpose(1, 2)
        v = v.view(b, s, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(start_pos, k, v)
        if self.n_kv_head != self.n_head:  # grouped-query attention
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        if isinstance(start_pos, torch.Tensor):
            # static cache, one query at position p: slots 0..p are the past and itself, later
            # slots are masked (filled or not)
            seen = torch.arange(k.shape[2], device=k.device) <= start_pos[-1]
            y = attention(q, k, v, key_padding_mask=seen[None].expand(b, -1))
        else:
            # causal aligns bottom-right: a decode step (s=1) sees the whole cache
            y = attention(q, k, v, causal=True, dropout_p=self.attn_dropout_p if self.training else 0.0)
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(b, s, d)))


class TransformerBlock(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x, freqs, start_pos: int = 0):
        x = x + self.attention(self.attention_norm(x), freqs, start_pos)
        return x + self.feed_forward(self.ffn_norm(x))


class LabelEmbedder(nn.Module):
    """Class table with num_classes + 1 rows; the last row is the null class for CFG.
    Training replaces a label by the null class with probability `dropout_prob` (DiT-style)."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, labels, drop: bool):
        if drop and self.dropout_prob > 0:
            null = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(null, self.num_classes, labels)
        return self.embedding_table(labels).unsqueeze(1)  # (B, 1, dim)


# ----------------------------------------------------------------------------- model
class Transformer(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.grid_size = math.isqrt(config.block_size)
        if self.grid_size ** 2 != config.block_size:
            raise ValueError(f"block_size={config.block_size} must be a square (2D RoPE over a grid)")
        if config.cls_token_num != 1:
            raise ValueError(f"cls_token_num={config.cls_token_num}; class-conditional GPT uses 1")
        if config.dim % config.n_head or config.n_head % (config.n_kv_head or config.n_head):
            raise ValueError(f"dim={config.dim}, n_head={config.n_head}, n_kv_head={config.n_kv_head} do not divide")
        self.cls_embedding = LabelEmbedder(config.num_classes, config.dim, config.class_dropout_prob)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout_p)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        # plain attribute, not a buffer: stays fp32 under model.half() and out of the state dict
        self.freqs_cis = rope_2d_table(self.grid_size, config.dim // config.n_head, config.rope_base,
                                       config.cls_token_num)
        self.apply(self._init_weights)
        nn.init.zeros_(self.output.weight)  # zero head: initial loss is exactly ln(vocab)

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=self.config.initializer_range)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def _freqs(self, device) -> torch.Tensor:
        if self.freqs_cis.device != device:
            self.freqs_cis = self.freqs_cis.to(device)
        return self.freqs_cis

    def _trunk(self, h: torch.Tensor, start_pos=0) -> torch.Tensor:
        """Input embeddings at positions start_pos.. -> fp32 logits (B, S, vocab); a tensor
        start_pos (the (S,) positions) takes the static-cache path."""
        if isinstance(start_pos, torch.Tensor):
            freqs = self._freqs(h.device).index_select(0, start_pos)
        else:
            freqs = self._freqs(h.device)[start_pos:start_pos + h.shape[1]]
        h = self.tok_dropout(h)
        for layer in self.layers:
            h = layer(h, freqs, start_pos)
        return upcast(self.output(self.norm(h)))

    def forward(self, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: codes (B, T<=block_size), labels (B,) -> logits (B, T, vocab), where
        logits[:, t] predicts codes[:, t] from the class and codes[:, :t]."""
        b, t = codes.shape
        if not 1 <= t <= self.config.block_size:
            raise ValueError(f"codes length {t}; allowed 1..block_size={self.config.block_size}")
        check_labels(labels, self.config.num_classes)
        check_ids(codes, self.config.vocab_size - 1, "codes", f" (vocab_size={self.config.vocab_size})")
        cls = self.cls_embedding(labels, drop=self.training)
        h = torch.cat([cls, self.tok_embeddings(codes[:, :-1])], dim=1)
        return self._trunk(h)

    def loss(self, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy in fp32."""
        return next_token_loss(self(codes, labels), codes)

    # --- incremental decoding (KV cache) -------------------------------------------------
    def setup_cache(self, batch: int, max_len: int | None = None) -> None:
        max_len = max_len or self.config.cls_token_num + self.config.block_size
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(batch, max_len)

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None

    def prefill(self, labels: torch.Tensor) -> torch.Tensor:
        """Class token (null class allowed) at position 0 into the cache -> logits of code 0 (B, vocab)."""
        check_labels(labels, self.config.num_classes, allow_null=True)
        return self._trunk(self.cls_embedding(labels, drop=False), 0)[:, -1]

    def decode(self, codes: torch.Tensor, pos) -> torch.Tensor:
        """codes (B, S) sitting at positions pos..pos+S-1 (code t sits at position t+1) into the
        cache -> logits (B, vocab) of the code after the last one.  pos a (1,) long tensor on the
        model's device: one code against the whole static cache (shapes independent of pos)."""
        return self._trunk(self.tok_embeddings(codes), pos)[:, -1]
