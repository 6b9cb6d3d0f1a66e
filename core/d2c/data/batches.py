"""What a training step reads: in-memory images (tokenizer stages) or cached tokens (GPT, MAR),
and which samples a step takes.  The data order is a function of (seed, step), so a resumed run
needs no data-loader state."""
from __future__ import annotations

import torch


class ImageSource:
    """Images held in memory (the embedded default): uint8 (N, 3, H, W) and labels (N,)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels.long()

    def __len__(self):
        return len(self.labels)

    def get(self, idx, flip):
        x = self.images[idx].float() / 127.5 - 1.0
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return {"images": x.contiguous(memory_format=torch.channels_last), "labels": self.labels[idx]}


class TokenSource:
    """Cached tokenizer outputs (d2c.data.cache.TokenCache): KL moments and/or VQ codes."""

    def __init__(self, cache, latent_scale: float = 1.0):
        self.cache, self.latent_scale = cache, latent_scale

    def __len__(self):
        return len(self.cache)

    def get(self, idx, flip):
        b = self.cache.get_batch(idx, flip)
        out = {"labels": b["labels"].long()}
        if b.get("moments") is not None:
            out["moments"] = b["moments"]
        if b.get("codes") is not None:
            out["codes"] = b["codes"].long().flatten(1)
        return out


def batch_indices(step: int, n: int, batch: int, seed: int):
    """Global batch of `step`: a fresh permutation every epoch, drop_last, and one flip bit per
    sample (horizontal-flip augmentation, as MAR's cache of image + flip is used)."""
    per_epoch = n // batch
    if per_epoch == 0:
        raise ValueError(f"batch_size={batch} is larger than the dataset ({n} items)")
    epoch, pos = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    flips = torch.rand(n, generator=g) < 0.5
    sel = perm[pos * batch:(pos + 1) * batch]
    return sel, flips[sel]
