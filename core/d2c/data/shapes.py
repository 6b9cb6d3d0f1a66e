"""The embedded default dataset: class-conditional 32x32 RGB shapes, made from a seed.

Each class is a *layout* (where the mass of the image is: a disk, a ring, stripes, ...),
which the coarse discrete tokens should capture; each sample also carries *fine detail*
(a random high-frequency grating inside the shape, pixel noise, soft edges), which is what
the continuous tokens are for.  Colours are a (background, foreground) pair of the class,
each pair shared by two classes (class c and c + 5), so colour narrows the class to two and
only the layout tells which (chance given the right colours: 0.5; untrained models: 0.1).
Deterministic: the same (n, seed, size) gives the same bytes on any machine.

Why it is this data (each measured on shapes v4 with the embedded recipe, cfg 3, 200 images, 16 steps):
- The shapes are large (radius 0.65-0.9 of the half-width) and little displaced (centre within
  +-0.15), so that the class is visible on the 8x8 token grid: the feature net's accuracy on
  images pooled to 8x8 is 0.89 (0.74 with smaller, more displaced shapes).
- Colour is the class's pair, not free per image.  With a free pair per image the small stage-2
  models, trained for minutes, could not learn layout next to colour (MAR class accuracy 0.205,
  LlamaGen 0.975); with the class's pair MAR reaches 0.855, D2C cross-attn 0.915, Q-Former
  0.835, LlamaGen 0.985 (FID 15.3 / 8.1 / 15.7 / 0.8).  Grey images with one fixed pair give
  MAR 0.885: layout alone is learnable in the budget.
"""
from __future__ import annotations

import math

import torch

CLASSES = ("disk", "square", "triangle", "ring", "cross",
           "h_stripes", "v_stripes", "checker", "two_disks", "diagonal")
NUM_CLASSES = len(CLASSES)
VERSION = 5          # bump when the generator's output changes: caches and runs key on it
# (background, foreground) RGB pairs in [0, 1], contrasting in lightness and hue
PALETTE = torch.tensor([[[0.10, 0.10, 0.35], [0.95, 0.85, 0.30]], [[0.90, 0.90, 0.85], [0.70, 0.10, 0.15]],
                        [[0.15, 0.35, 0.15], [0.95, 0.60, 0.85]], [[0.95, 0.75, 0.55], [0.10, 0.30, 0.60]],
                        [[0.20, 0.20, 0.20], [0.40, 0.90, 0.90]]], dtype=torch.float64)


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


# cos(pi f u) over u in [-1, 1]: f/2 cycles per image, periods of 10.7 to 5.3 px at 32 px.
# At (6, 12) (periods 2.7-5.3 px, shapes v4) neither 600-step tokenizer kept the grating (high-pass
# energy of the reconstructions 25% of the real images' for KL, 21% for VQ; detail rFID 23.6 vs
# 26.1): continuous tokens had nothing to add.  At (3, 6) KL keeps 61% and VQ 40% (detail rFID
# 2.8 vs 15.2, KL with its spectral loss term), the gap VQ-16 vs KL-16 shows on ImageNet.
GRATING_FREQ = (3.0, 6.0)


def make_shapes(n: int, seed: int = 0, size: int = 32, labels: torch.Tensor | None = None,
                return_detail: bool = False):
    """n images uint8 (n, 3, size, size) and labels int64 (n,), balanced over classes.
    return_detail: also the grating of each image as (n, 3) float32 targets in [-1, 1]: its
    frequency rescaled from GRATING_FREQ, and cos 2 theta, sin 2 theta of its orientation theta
    (theta and theta + pi draw the same grating up to phase)."""
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

    # colours: the class's (background, foreground) pair; two classes share each pair
    k = labels % len(PALETTE)
    bg = PALETTE[k, 0][:, :, None, None].expand(n, 3, size, size)
    fg = PALETTE[k, 1][:, :, None, None]

    # fine detail: an oriented grating inside the shape (random frequency/phase) + pixel noise
    freq, theta, phase = u(*GRATING_FREQ, 1, 1, 1), u(0, math.pi, 1, 1, 1), u(0, 2 * math.pi, 1, 1, 1)
    grating = torch.cos(math.pi * freq * (torch.cos(theta) * xx[:, None] + torch.sin(theta) * yy[:, None]) + phase)
    fg = fg + 0.18 * grating
    img = bg * (1 - mask) + fg * mask
    img = img + 0.03 * torch.randn(img.shape, generator=g, dtype=torch.float64)
    img = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    if not return_detail:
        return img, labels.long()
    lo, hi = GRATING_FREQ
    f, t = freq.reshape(n), theta.reshape(n)
    detail = torch.stack([(f - lo) / (hi - lo) * 2 - 1, torch.cos(2 * t), torch.sin(2 * t)], 1).float()
    return img, labels.long(), detail


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
