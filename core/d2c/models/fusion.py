"""Fusion: how the MAR stage sees the stage-1 discrete tokens (docs/design.md section 4).

The D2C paper (arXiv 2503.17155) names two modules, cross-attention and Q-Former, but not
their placement; ours:
  cross_attn  pre-LN cross-attention sublayer after chosen MAR decoder blocks, queries =
              continuous tokens, keys/values = discrete-token embeddings, zero-init output
              so training starts from plain MAR.
  qformer     `num_queries` learned queries, `depth` blocks of [self-attn, cross-attn to the
              discrete embeddings, MLP]; the outputs are added to the MAR buffer slots (which
              hold the class embedding), so every encoder and decoder layer attends to them.
The embeddings (code + position) are LayerNorm'ed before any key/value projection: at their
N(0, 0.02) init they stayed ~0.05 after 300 steps, so cross-attention stayed uniform and the
codes barely mattered (eps-MSE with true vs shuffled codes, all tokens masked: 0.35 vs 0.39
after 300 steps; with the norm 0.31 vs 0.42 after 150).
For CFG the discrete condition is dropped together with the class: dropped rows see the
null code (row `codebook_size` of the table) everywhere.
None of these parameters exist for kind == "none": MAR checkpoints load strict.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from d2c.config import MARConfig
from d2c.kernels.attention import attention
from d2c.models.vit import Mlp


class Attention(nn.Module):
    """Multi-head attention; self-attention when `kv` is None."""

    def __init__(self, dim: int, num_heads: int, kv_dim: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(kv_dim or dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, kv=None):
        b, n, d = x.shape
        kv = x if kv is None else kv
        h = self.num_heads
        q = self.q(x).view(b, n, h, d // h).transpose(1, 2)
        k, v = self.kv(kv).view(b, kv.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        return self.proj(attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class CrossAttnLayer(nn.Module):
    """x + proj(CrossAttn(LN(x), disc)), zero-init so it starts as the identity."""

    def __init__(self, dim: int, d_fuse: int, num_heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, kv_dim=d_fuse)
        nn.init.zeros_(self.attn.proj.weight)
        nn.init.zeros_(self.attn.proj.bias)

    def forward(self, x, disc):
        return x + self.attn(self.norm(x), disc)


class QFormerBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = Attention(dim, num_heads)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, q, disc):
        q = q + self.self_attn(self.norm1(q))
        q = q + self.cross_attn(self.norm2(q), disc)
        return q + self.mlp(self.norm3(q))


class Fusion(nn.Module):
    """The discrete-token embedding, and the two hooks MAR calls (identity unless a kind needs them)."""
    kind = "none"

    def __init__(self, config: MARConfig):
        super().__init__()
        fu = config.fusion
        self.codebook_size = fu.codebook_size
        # +1 row: the null code used for CFG's unconditional branch and for label drop
        self.code_emb = nn.Embedding(fu.codebook_size + 1, fu.d_fuse)
        self.code_pos = nn.Parameter(torch.zeros(1, config.seq_len, fu.d_fuse))
        nn.init.normal_(self.code_emb.weight, std=0.02)
        nn.init.normal_(self.code_pos, std=0.02)
        self.norm_disc = nn.LayerNorm(fu.d_fuse, eps=1e-6)

    def embed(self, codes, drop=None):
        """codes (B, T) long, or None for all-null; drop (B,) bool replaces a row by null codes."""
        if codes is None:
            raise ValueError("this model was built with fusion; pass the stage-1 codes (B, T)")
        if codes.dim() == 3:
            codes = codes.flatten(1)
        if drop is not None:
            codes = torch.where(drop[:, None], torch.full_like(codes, self.codebook_size), codes)
        return self.norm_disc(self.code_emb(codes) + self.code_pos)

    def fill_buffer(self, buf, disc):
        """MAR encoder's buffer slots (B, buffer_size, E), which hold the class embedding."""
        return buf

    def after_decoder_block(self, i: int, x, disc):
        """MAR decoder's tokens after block i."""
        return x


class CrossAttnFusion(Fusion):
    kind = "cross_attn"

    def __init__(self, config: MARConfig):
        super().__init__(config)
        fu = config.fusion
        layers = range(config.decoder_depth) if fu.layers is None else fu.layers
        self.layer_ids = [int(i) for i in layers]
        self.cross = nn.ModuleDict({str(i): CrossAttnLayer(config.decoder_embed_dim, fu.d_fuse, fu.num_heads)
                                    for i in self.layer_ids})

    def after_decoder_block(self, i: int, x, disc):
        key = str(i)
        return self.cross[key](x, disc) if key in self.cross else x


class QFormerFusion(Fusion):
    kind = "qformer"

    def __init__(self, config: MARConfig):
        super().__init__(config)
        fu = config.fusion
        self.queries = nn.Parameter(torch.zeros(1, fu.num_queries, fu.d_fuse))
        nn.init.normal_(self.queries, std=0.02)
        self.blocks = nn.ModuleList([QFormerBlock(fu.d_fuse, fu.num_heads, fu.mlp_ratio) for _ in range(fu.depth)])
        self.norm = nn.LayerNorm(fu.d_fuse, eps=1e-6)
        self.out = nn.Linear(fu.d_fuse, config.encoder_embed_dim)
        nn.init.zeros_(self.out.weight)  # start as plain MAR, like the cross-attn sublayers
        nn.init.zeros_(self.out.bias)

    def buffer(self, disc):
        """(B, num_queries, encoder_embed_dim): the queries after the Q-Former blocks."""
        q = self.queries.expand(disc.shape[0], -1, -1)
        for blk in self.blocks:
            q = blk(q, disc)
        return self.out(self.norm(q))

    def fill_buffer(self, buf, disc):
        q = self.buffer(disc).to(buf.dtype)
        return torch.cat([buf[:, :q.shape[1]] + q, buf[:, q.shape[1]:]], dim=1)


def build_fusion(config: MARConfig) -> Fusion | None:
    """The fusion module of `config.fusion.kind`; None for "none" (no parameters: MAR loads strict)."""
    kinds = {"cross_attn": CrossAttnFusion, "qformer": QFormerFusion}
    if config.fusion.kind == "none":
        return None
    if config.fusion.kind not in kinds:
        raise ValueError(f"fusion.kind={config.fusion.kind!r}; allowed: none, {', '.join(kinds)}")
    return kinds[config.fusion.kind](config)
