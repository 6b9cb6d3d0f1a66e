"""The embedded default dataset: class-conditional 32x32 RGB shapes, made from a seed.

Each class is a *layout* (where the mass of the image is: a disk, a ring, stripes, ...),
which the coarse discrete tokens should capture; each sample also carries *fine detail*
(a random high-frequency grating inside the shape, pixel noise, soft edges), which is what
the continuous tokens are for.  Colours are random per sample, so colour alone never tells
the class.  Deterministic: the same (n, seed, size) gives the same bytes on any machine.

Version 2 made the shapes larger (radius 0.65-0.9 of the half-width, was 0.45-0.7) and
less displaced (centre within +-0.15, was +-0.25), so that the class is visible on the
8x8 token grid: the feature net's class accuracy on images average-pooled to 8x8 and
upsampled went from 0.74 to 0.89 (full resolution: 1.00 both), and LlamaGen-small samples
(same recipe, cfg 3) from 0.40 to 0.59.
"""
from __future__ import annotations

import math

import torch

CLASSES = ("disk", "square", "triangle", "ring", "cross",
           "h_stripes", "v_stripes", "checker", "two_disks", "diagonal")
NUM_CLASSES = len(CLASSES)
VERSION = 2          # bump when the generator's output changes: caches and runs key on it


def _layout(c: int, dx, dy, r):
    """Soft (0..1) foreground mask of class c; dx, dy are offsets from the shape centre."""
    soft = 1.5 / dx.shape[-1]  # ~1.5 px edge softness in [-1, 1] units

    def inside(sd):  # signed distance (negative inside) -> soft mask
        return torch.sigmoid(-sd / soft)

    dist = torch.sqrt(dx ** 2 + dy ** 2)
    wave = 2 * math.pi / (r * 0.9)  # stripe period follows the shape scale
    name = CLASSES[c]
    if name == "disk":
        return inside(dist - r)
    if name == "square":
        return inside(torch.maximum(dx.abs(), dy.abs()) - r * 0.85)
    if name == "triangle":
        return inside(torch.maximum(dy - r * 0.6, (dx.abs() * 1.7 - dy) / 2 - r * 0.5))
    if name == "ring":
        return inside((dist - r * 0.75).abs() - r * 0.22)
    if name == "cross":
        return inside(torch.minimum(torch.maximum(dx.abs() - r * 0.28, dy.abs() - r),
                                    torch.maximum(dy.abs() - r * 0.28, dx.abs() - r)))
    if name == "h_stripes":
        return torch.sigmoid(torch.cos(wave * dy) * 6)
    if name == "v_stripes":
        return torch.sigmoid(torch.cos(wave * dx) * 6)
    if name == "checker":
        return torch.sigmoid(torch.cos(wave * dx) * torch.cos(wave * dy) * 8)
    if name == "two_disks":
        return torch.maximum(inside(torch.sqrt((dx - r * 0.55) ** 2 + (dy - r * 0.55) ** 2) - r * 0.42),
                             inside(torch.sqrt((dx + r * 0.55) ** 2 + (dy + r * 0.55) ** 2) - r * 0.42))
    if name == "diagonal":
        return inside((dx - dy).abs() / math.sqrt(2) - r * 0.35)
    raise AssertionError(name)


def make_shapes(n: int, seed: int = 0, size: int = 32, labels: torch.Tensor | None = None):
    """n images uint8 (n, 3, size, size) and labels int64 (n,), balanced over classes."""
    g = torch.Generator().manual_seed(seed)
    if labels is None:
        labels = torch.arange(n) % NUM_CLASSES
        labels = labels[torch.randperm(n, generator=g)]

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(n, *shape, generator=g, dtype=torch.float64)

    lin = torch.linspace(-1, 1, size, dtype=torch.float64)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    xx, yy = xx[None], yy[None]
    cx, cy, r = u(-0.15, 0.15, 1, 1), u(-0.15, 0.15, 1, 1), u(0.65, 0.9, 1, 1)
    mask = torch.empty(n, 1, size, size, dtype=torch.float64)
    for c in range(NUM_CLASSES):
        rows = labels == c
        mask[rows, 0] = _layout(c, xx - cx[rows], yy - cy[rows], r[rows])

    # colours: background a smooth two-colour gradient, foreground a third colour far from it
    bg0, bg1 = u(0.0, 1.0, 3, 1, 1), u(0.0, 1.0, 3, 1, 1)
    ang = u(0, 2 * math.pi, 1, 1, 1)
    t = (0.5 + 0.5 * (torch.cos(ang) * xx[:, None] + torch.sin(ang) * yy[:, None]) / math.sqrt(2))
    bg = bg0 * (1 - t) + bg1 * t
    fg = (bg0 + bg1) / 2 + 0.5
    fg = torch.remainder(fg + u(-0.15, 0.15, 3, 1, 1), 1.0)

    # fine detail: an oriented grating inside the shape (random frequency/phase) + pixel noise
    freq, theta, phase = u(6.0, 12.0, 1, 1, 1), u(0, math.pi, 1, 1, 1), u(0, 2 * math.pi, 1, 1, 1)
    grating = torch.cos(math.pi * freq * (torch.cos(theta) * xx[:, None] + torch.sin(theta) * yy[:, None]) + phase)
    fg = fg + 0.18 * grating
    img = bg * (1 - mask) + fg * mask
    img = img + 0.03 * torch.randn(img.shape, generator=g, dtype=torch.float64)
    img = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return img, labels.long()


class ShapesDataset(torch.utils.data.Dataset):
    """Images as float tensors in [-1, 1] (the tokenizers' input range) and int labels."""

    def __init__(self, n: int = 10000, seed: int = 0, size: int = 32):
        self.n, self.seed, self.size = n, seed, size
        self.images, self.labels = make_shapes(n, seed, size)

    def identity(self) -> dict:
        """What the token-cache key hashes: the generator's arguments define every byte."""
        return {"name": "shapes", "version": VERSION, "n": self.n, "seed": self.seed, "size": self.size}

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i].float() / 127.5 - 1.0, self.labels[i]
