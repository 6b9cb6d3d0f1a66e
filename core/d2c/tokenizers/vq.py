"""LlamaGen's VQ-16 tokenizer: conv encoder -> 1x1 conv to 8 dims -> cosine VQ over 16384
codes -> 1x1 conv -> conv decoder.  Module names mirror LlamaGen's `VQModel` so that the public
`vq_ds16_c2i.pt` ({"model": state_dict}) loads with strict=True.

Reconstruction, perceptual and GAN losses belong to the trainer; `forward` returns the VQ terms.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from d2c.config import VQConfig
from d2c.tokenizers import AttnBlock, Downsample, Normalize, ResnetBlock, Upsample, check_images


class Encoder(nn.Module):
    """Keys: conv_in, conv_blocks.{level}.{res,attn,downsample}, mid.{0,1,2}, norm_out, conv_out.
    Attention follows every res block of the lowest-resolution level only."""

    def __init__(self, config: VQConfig):
        super().__init__()
        ch, mult, n = config.ch, config.ch_mult, config.num_res_blocks
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        c = ch
        for i, m in enumerate(mult):
            last = i == len(mult) - 1
            level = nn.Module()
            level.res, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(n):
                level.res.append(ResnetBlock(c, ch * m, config.dropout))
                c = ch * m
                if last:
                    level.attn.append(AttnBlock(c))
            if not last:
                level.downsample = Downsample(c)
            self.conv_blocks.append(level)
        self.mid = nn.ModuleList([ResnetBlock(c, c, config.dropout), AttnBlock(c), ResnetBlock(c, c, config.dropout)])
        self.norm_out = Normalize(c)
        self.conv_out = nn.Conv2d(c, config.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.conv_blocks:
            for j, res in enumerate(level.res):
                h = res(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Mirror of the encoder with num_res_blocks + 1 res blocks a level.  conv_blocks[0] is the
    lowest resolution (LlamaGen stores the levels in decoding order), and it alone has attention."""

    def __init__(self, config: VQConfig):
        super().__init__()
        ch, mult, n = config.ch, config.ch_mult, config.num_res_blocks
        c = ch * mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, c, 3, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(c, c, config.dropout), AttnBlock(c), ResnetBlock(c, c, config.dropout)])
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(len(mult))):
            level = nn.Module()
            level.res, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(n + 1):
                level.res.append(ResnetBlock(c, ch * mult[i], config.dropout))
                c = ch * mult[i]
                if i == len(mult) - 1:
                    level.attn.append(AttnBlock(c))
            if i != 0:
                level.upsample = Upsample(c)
            self.conv_blocks.append(level)
        self.norm_out = Normalize(c)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    @property
    def last_layer(self):
        """Weight that adaptive GAN-loss weighting differentiates against."""
        return self.conv_out.weight

    def forward(self, z):
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            for j, res in enumerate(level.res):
                h = res(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def entropy_loss(affinity, temperature: float = 0.01):
    """Per-sample entropy minus entropy of the batch-mean assignment (MaskGIT/LlamaGen):
    pushes each vector to one code while spreading the batch over the whole codebook."""
    logits = affinity.reshape(-1, affinity.shape[-1]).float() / temperature
    probs, log_probs = logits.softmax(-1), logits.log_softmax(-1)
    avg = probs.mean(0)
    sample_entropy = -(probs * log_probs).sum(-1).mean()
    avg_entropy = -(avg * torch.log(avg + 1e-5)).sum()
    return sample_entropy - avg_entropy


class VectorQuantizer(nn.Module):
    USAGE_WINDOW = 65536   # length of LlamaGen's `codebook_used` buffer (part of the public keys)

    def __init__(self, config: VQConfig):
        super().__init__()
        self.n_e, self.e_dim = config.codebook_size, config.codebook_embed_dim
        self.beta, self.entropy_ratio, self.l2_norm = config.commit_loss_beta, config.entropy_loss_ratio, config.codebook_l2_norm
        self.embedding = nn.Embedding(self.n_e, self.e_dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / self.n_e, 1.0 / self.n_e)
            if self.l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        # Rolling window of the most recent code indices (stored as float, like the public file).
        self.register_buffer("codebook_used", torch.zeros(self.USAGE_WINDOW))

    def codebook(self):
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def lookup(self, codes):
        """(B, h, w) indices -> (B, e_dim, h, w) code vectors."""
        return self.codebook()[codes].permute(0, 3, 1, 2).contiguous()

    def nearest(self, z):
        """z (N, e_dim) -> (indices (N,), affinity (N, n_e) = minus squared distance)."""
        # fp32 even under autocast: bf16 scores tie between many of the 16384 codes
        with torch.autocast(z.device.type, enabled=False):
            z, e = z.float(), self.codebook().float()
            sim = z @ e.t()
            if self.l2_norm:
                # unit vectors: argmin distance == argmax cosine; leaving out |z|^2 + |e|^2
                # (both ~1) avoids their rounding, which could flip near ties
                return sim.argmax(1), 2 * sim - 2
            affinity = 2 * sim - z.pow(2).sum(1, keepdim=True) - e.pow(2).sum(1)
            return affinity.argmax(1), affinity

    def forward(self, z):
        """z (B, e_dim, h, w) -> (quantized (B, e_dim, h, w), codes (B, h, w), losses)."""
        b, _, h, w = z.shape
        z = z.permute(0, 2, 3, 1)
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        idx, affinity = self.nearest(z.reshape(-1, self.e_dim))
        codes = idx.view(b, h, w)
        z_q = self.lookup(codes)
        zc = z.permute(0, 3, 1, 2)
        losses = {
            "codebook": F.mse_loss(z_q, zc.detach()),
            "commit": self.beta * F.mse_loss(zc, z_q.detach()),
        }
        if self.entropy_ratio > 0:
            losses["entropy"] = self.entropy_ratio * entropy_loss(affinity)
        # Straight-through: value is exactly z_q (x - x == 0), gradient is identity into z.
        quant = (z_q.detach() + (zc - zc.detach())).contiguous()
        if self.training:
            self._record_usage(idx)
        return quant, codes, losses

    @torch.no_grad()
    def _record_usage(self, idx):
        k = min(idx.numel(), self.USAGE_WINDOW)
        buf = self.codebook_used
        buf.copy_(torch.cat([buf[k:], idx[-k:].to(buf.dtype)]))

    def usage(self) -> float:
        """Fraction of the codebook seen in the last USAGE_WINDOW training assignments."""
        return torch.unique(self.codebook_used).numel() / self.n_e


class VQModel(nn.Module):
    """images in [-1, 1] (B, 3, H, W) <-> codes (B, H/stride, W/stride)."""

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    @property
    def stride(self) -> int:
        return self.config.stride

    def quantize_images(self, images):
        check_images(images, self.stride)
        return self.quantize(self.quant_conv(self.encoder(images)))

    @torch.no_grad()
    def encode(self, images):
        """-> codes, LongTensor (B, h, w)."""
        return self.quantize_images(images)[1]

    def decode(self, quant):
        """(B, e_dim, h, w) code vectors -> images."""
        return self.decoder(self.post_quant_conv(quant))

    def decode_codes(self, codes):
        """codes (B, h, w), or (B, h*w) for a square grid -> images (B, 3, h*stride, w*stride)."""
        if codes.dim() == 2:
            side = math.isqrt(codes.shape[1])
            if side * side != codes.shape[1]:
                raise ValueError(f"flat codes of length {codes.shape[1]} are not a square grid; pass (B, h, w)")
            codes = codes.view(codes.shape[0], side, side)
        return self.decode(self.quantize.lookup(codes.long()))

    def reconstruct(self, images):
        """images -> decoder(nearest codes): what the tokenizer gives back (rFID)."""
        return self.decode(self.quantize_images(images)[0])

    def forward(self, images):
        """-> (reconstruction, {"codebook", "commit"[, "entropy"]} already weighted)."""
        quant, _, losses = self.quantize_images(images)
        return self.decode(quant), losses
