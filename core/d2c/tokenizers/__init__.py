"""Image tokenizers: LlamaGen's VQ-16 (`vq.VQModel`) and MAR's KL-16 (`kl.AutoencoderKL`).

Both are taming/LDM convolutional autoencoders built from the blocks below.  The blocks keep
the public submodule names (norm1, conv1, nin_shortcut, q/k/v/proj_out, ...) because the
public checkpoints address parameters by them; the two models differ only in how they
arrange the blocks (and so in their state_dict key paths).
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn


def Normalize(ch: int) -> nn.GroupNorm:
    # 32 groups as taming/LDM (every public width is >= 128).  Narrow presets keep >= 4 channels
    # a group: a 1-channel group is instance norm, which erases each image's colour (measured:
    # ch=16 with 16 groups reconstructed grey images, class accuracy 0.33 on its recons)
    return nn.GroupNorm(math.gcd(32, max(1, ch // 4)), ch, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (GN, SiLU, conv3x3) twice; 1x1 shortcut when widths differ."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = Normalize(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = Normalize(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if in_ch != out_ch:
            self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, with 1x1-conv projections."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = Normalize(ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        # (B, 1, hw, c): one head; SDPA's default 1/sqrt(c) scale is the reference's scale
        q, k, v = (p(y).flatten(2).transpose(1, 2).unsqueeze(1) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    """Stride-2 conv3x3 with right/bottom zero padding (the reference's asymmetric padding)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then conv3x3."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def check_images(x, stride: int) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(x.shape)}")
    if x.shape[2] % stride or x.shape[3] % stride:
        raise ValueError(f"image size {tuple(x.shape[2:])} must be divisible by the stride {stride}")
