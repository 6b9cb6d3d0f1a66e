"""MAR's KL-16 VAE (an LDM AutoencoderKL): conv encoder -> mean and log-variance of a diagonal
Gaussian over 16 channels at stride 16 -> conv decoder.  Module names mirror LTH14/mar
`models/vae.py` so that the public `kl16.ckpt` ({"model": state_dict}) loads with strict=True.

MAR trains on `posterior.sample() * 0.2325`; `encode`/`decode` apply that scale so callers
only see model-space latents.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from d2c.config import KLConfig
from d2c.tokenizers import AttnBlock, Downsample, Normalize, ResnetBlock, Upsample, check_images


class DiagonalGaussian:
    """Posterior from moments (B, 2C, h, w) = [mean; logvar] along channels."""

    def __init__(self, moments):
        self.moments = moments
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)   # the reference clamp: exp() stays finite
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None):
        # Noise is drawn on the generator's device, so a CPU generator gives the same
        # latents whatever device the model runs on.
        dev = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=dev, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self):
        return self.mean

    def kl(self):
        """KL to N(0, I), summed over (C, h, w): (B,)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class Encoder(nn.Module):
    """Keys: conv_in, down.{level}.{block,attn,downsample}, mid.{block_1,attn_1,block_2},
    norm_out, conv_out (2*z_channels: mean and logvar).  Attention only at the lowest level
    (KL-16's attn_resolutions=(16,) at 256px)."""

    def __init__(self, config: KLConfig):
        super().__init__()
        ch, mult, n = config.ch, config.ch_mult, config.num_res_blocks
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        c = ch
        for i, m in enumerate(mult):
            last = i == len(mult) - 1
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(n):
                level.block.append(ResnetBlock(c, ch * m, config.dropout))
                c = ch * m
                if last:
                    level.attn.append(AttnBlock(c))
            if not last:
                level.downsample = Downsample(c)
            self.down.append(level)
        self.mid = _mid(c, config.dropout)
        self.norm_out = Normalize(c)
        self.conv_out = nn.Conv2d(c, 2 * config.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """num_res_blocks + 1 res blocks a level, no attention outside the middle.  up[i] is the
    level at resolution index i (up[0] is full resolution), LDM's order; decoding runs it backwards."""

    def __init__(self, config: KLConfig):
        super().__init__()
        ch, mult, n = config.ch, config.ch_mult, config.num_res_blocks
        c = ch * mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, c, 3, padding=1)
        self.mid = _mid(c, config.dropout)
        levels = []
        for i in reversed(range(len(mult))):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()   # attn stays empty
            for _ in range(n + 1):
                level.block.append(ResnetBlock(c, ch * mult[i], config.dropout))
                c = ch * mult[i]
            if i != 0:
                level.upsample = Upsample(c)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(c)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    @property
    def last_layer(self):
        return self.conv_out.weight

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def _mid(c: int, dropout: float) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(c, c, dropout)
    mid.attn_1 = AttnBlock(c)
    mid.block_2 = ResnetBlock(c, c, dropout)
    return mid


class AutoencoderKL(nn.Module):
    """images in [-1, 1] (B, 3, H, W) <-> latents (B, embed_dim, H/stride, W/stride)."""

    def __init__(self, config: KLConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        if config.init_logvar:
            # Start near-deterministic: with logvar 0 the posterior noise (std 1) swamps the small
            # initial means and the decoder first learns the mean image (measured: grey recons).
            with torch.no_grad():
                self.quant_conv.bias[config.embed_dim:].fill_(config.init_logvar)

    @property
    def stride(self) -> int:
        return self.config.stride

    def encode_moments(self, images):
        """-> (B, 2*embed_dim, h, w): [mean; logvar], what MAR's latent cache stores."""
        check_images(images, self.stride)
        return self.quant_conv(self.encoder(images))

    def posterior(self, images) -> DiagonalGaussian:
        return DiagonalGaussian(self.encode_moments(images))

    def encode(self, images, generator: torch.Generator | None = None):
        """-> scaled latents: posterior sample * config.scale."""
        return self.posterior(images).sample(generator) * self.config.scale

    def decode(self, latents):
        """Scaled latents -> images."""
        return self.decode_unscaled(latents / self.config.scale)

    def decode_unscaled(self, z):
        return self.decoder(self.post_quant_conv(z))

    def reconstruct(self, images):
        """images -> decoder(posterior mode): what the tokenizer gives back (rFID)."""
        return self.decode_unscaled(self.posterior(images).mode())

    def forward(self, images, sample_posterior: bool = True, generator: torch.Generator | None = None):
        """-> (reconstruction, posterior); the trainer adds reconstruction + kl_weight * posterior.kl()."""
        post = self.posterior(images)
        z = post.sample(generator) if sample_posterior else post.mode()
        return self.decode_unscaled(z), post
