"""The token cache: every image and its horizontal flip through the tokenizers, once.

    cache = build_token_cache(dataset, "runs/cache", kl=kl, vq=vq, batch_size=64)   # d2c.data.cache_build
    b = cache.get_batch(indices, flip)          # {"moments", "codes", "labels", "flips"}
    latents = sample_latents(b["moments"], scale, generator)

Like MAR's cached training (`main_cache.py`), the KL posterior *moments* are stored (mean and
log-variance, not a sample), so every read draws a fresh posterior sample.  The VQ codes of
the same image and its flip are stored beside them (stage 1 trains on them; stage 2 is
teacher-forced with them).  The flip is `torch.flip(image, dims=[-1])` (width axis) before
encoding.

This module holds the format, the key and the reader; d2c.data.cache_build writes a cache.

On-disk format, one folder `<out_dir>/tokens-<key[:16]>/`:
    plan.json     key, num_rows, shard_size (fixed by the first build; a resume keeps it)
    shard-00000/  one folder per shard, rows [s * shard_size, (s + 1) * shard_size):
        moments.npy   (n, 2, 2*C, h, w) float32 (or float16 with moments_dtype): [:, f] is flip f,
                      channels [mean; logvar] as AutoencoderKL.encode_moments returns them
        codes.npy     (n, 2, h, w) int16 when the codebook has <= 32767 entries, else int32
        labels.npy    (n,) int64; -1 marks an unreadable image left out (readers skip those rows)
        shard.json    the shard's image size, array shapes and unreadable rows (written last)
    meta.json     version, key, key_parts (what the key hashes), num_rows, num_valid, num_bad,
                  image_size, kl_scale, codebook_size, classes, shard_size, num_shards, and per
                  array its shape and dtype over all shards; written last
Arrays are written through `np.lib.format.open_memmap` a batch at a time and read back with
mmap_mode="r", so ImageNet (1.28M images) never sits in memory.  A shard is written into
`.tmp-shard-<s>-<host>-<pid>` and renamed when flushed and fsynced.  A complete cache with the
same key is opened, never rebuilt.  The key is a SHA-256 of: the dataset identity (its
`identity()` if it has one, else a hash of in-memory images and labels), the tokenizer configs
and weights (usage statistics such as VQ's `codebook_used` left out), the image size and the
stored dtype.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from d2c.files import json_default, stable_hash

FORMAT_VERSION = 2
MOMENTS_DTYPES = ("float32", "float16")
# Buffers that record training statistics and never change what a tokenizer outputs.
_IGNORED_STATE = ("codebook_used",)


class CacheError(ValueError):
    """A token cache that cannot be used; the message is one line for the user."""


# --------------------------------------------------------------------------- key


def tokenizer_fingerprint(model) -> Optional[str]:
    """SHA-256 of a tokenizer's class, config and weights (device- and order-independent)."""
    if model is None:
        return None
    h = hashlib.sha256()
    h.update(type(model).__name__.encode())
    config = model.config
    h.update(json.dumps(config, default=json_default, sort_keys=True).encode())
    sd = model.state_dict()
    for name in sorted(sd):
        if name.split(".")[-1] in _IGNORED_STATE:
            continue
        t = sd[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def dataset_identity(dataset) -> dict:
    """What names the images: `dataset.identity()` if defined, else a content hash of in-memory
    `images` and `labels` tensors (the embedded shapes dataset)."""
    ident = getattr(dataset, "identity", None)
    if callable(ident):
        return ident()
    images, labels = getattr(dataset, "images", None), getattr(dataset, "labels", None)
    if isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor):
        h = hashlib.sha256()
        for t in (images, labels):
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}|{tuple(t.shape)}\n".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        return {"kind": type(dataset).__name__, "num_images": len(labels), "content_sha256": h.hexdigest()}
    raise CacheError(f"cannot identify dataset {type(dataset).__name__} for the cache key: give it an "
                     f"identity() method or pass dataset_id=")


def token_cache_key(dataset, kl=None, vq=None, *, image_size: Optional[int] = None,
                    moments_dtype: str = "float32", dataset_id=None) -> tuple[str, dict]:
    """(key, key_parts).  image_size None = read from the first item."""
    if kl is None and vq is None:
        raise CacheError("build_token_cache needs at least one tokenizer (kl= or vq=)")
    if moments_dtype not in MOMENTS_DTYPES:
        raise CacheError(f"moments_dtype={moments_dtype!r}; allowed: {', '.join(MOMENTS_DTYPES)}")
    if image_size is None:
        image_size = list(dataset[0][0].shape[-2:])
    parts = {
        "version": FORMAT_VERSION,
        "dataset": dataset_id if dataset_id is not None else dataset_identity(dataset),
        "image_size": image_size,
        "kl": tokenizer_fingerprint(kl),
        "vq": tokenizer_fingerprint(vq),
        "moments_dtype": moments_dtype if kl is not None else None,
        "flip": "torch.flip(dims=[-1])",
    }
    key = stable_hash(parts, length=64)
    return key, parts


def cache_path(out_dir, key: str) -> Path:
    return Path(out_dir) / f"tokens-{key[:16]}"


def is_complete(path, key: Optional[str] = None) -> bool:
    meta = Path(path) / "meta.json"
    try:
        m = json.loads(meta.read_text())
    except (OSError, ValueError):
        return False
    return bool(m.get("complete")) and (key is None or m.get("key") == key)


def shard_dir(path, s: int) -> Path:
    return Path(path) / f"shard-{s:05d}"


def shard_done(path, s: int) -> bool:
    return (shard_dir(path, s) / "shard.json").is_file()


# --------------------------------------------------------------------------- read


class TokenCache(torch.utils.data.Dataset):
    """A built cache.  Item i: (moments (2C, h, w) float32 | None, codes (h, w) int64 | None,
    label int, flipped bool), i over the readable images only.

    flip: "random" (draw with `generator`, a torch.Generator), 0 or 1 (always that view).
    `cache[i, f]` asks for view f explicitly.  mmap=False reads the arrays into memory (tiny
    datasets); the default maps every shard's arrays (ImageNet)."""

    def __init__(self, path, flip="random", generator: Optional[torch.Generator] = None, mmap: bool = True):
        self.path = Path(path)
        if not is_complete(self.path):
            raise CacheError(f"not a complete token cache: {self.path} (no meta.json with complete=true)")
        self.meta = json.loads((self.path / "meta.json").read_text())
        if self.meta.get("version") != FORMAT_VERSION:
            raise CacheError(f"{self.path}: cache format version {self.meta.get('version')}, "
                             f"this code reads {FORMAT_VERSION}; rebuild it")
        if flip not in ("random", 0, 1):
            raise CacheError(f"flip={flip!r}; allowed: 'random', 0, 1")
        self.flip, self.generator = flip, generator
        self.shard_size, mode = self.meta["shard_size"], "r" if mmap else None
        shards = [shard_dir(self.path, s) for s in range(self.meta["num_shards"])]
        # per array, its part in every shard (None in a shard without a readable image)
        self.shards = {name: None if spec is None else
                       [np.load(d / spec["file"], mmap_mode=mode) if (d / spec["file"]).exists() else None
                        for d in shards]
                       for name, spec in self.meta["arrays"].items()}
        lab = np.concatenate(self.shards["labels"])
        self.rows = np.nonzero(lab >= 0)[0] if self.meta["num_bad"] else None   # logical -> row
        self.labels = torch.from_numpy(np.array(lab if self.rows is None else lab[self.rows], dtype=np.int64))

    key = property(lambda self: self.meta["key"])
    scale = property(lambda self: self.meta["kl_scale"])
    num_classes = property(lambda self: self.meta["num_classes"])

    def __len__(self):
        return len(self.labels)

    def _row(self, idx: np.ndarray) -> np.ndarray:
        return idx if self.rows is None else self.rows[idx]

    def _gather(self, name: str, rows: np.ndarray, f: np.ndarray):
        """array[rows, f] across the shards, as float32 (moments) or int64 (codes)."""
        spec = self.meta["arrays"][name]
        if spec is None:
            return None
        out = np.empty((len(rows), *spec["shape"][2:]), dtype=np.float32 if name == "moments" else np.int64)
        s, local = np.divmod(rows, self.shard_size)
        for k in np.unique(s):
            sel = np.nonzero(s == k)[0]
            out[sel] = self.shards[name][k][local[sel], f[sel]]
        return torch.from_numpy(out)

    def _flips(self, n: int, flip, generator) -> torch.Tensor:
        if flip is None:
            flip = self.flip
        if isinstance(flip, str):
            if flip != "random":
                raise CacheError(f"flip={flip!r}; allowed: 'random', 0, 1 or a tensor of 0/1")
            return torch.randint(0, 2, (n,), generator=generator or self.generator).bool()
        if isinstance(flip, (int, bool)) or (isinstance(flip, torch.Tensor) and flip.dim() == 0):
            return torch.full((n,), bool(int(flip)))
        flip = torch.as_tensor(flip).reshape(-1).bool()
        if flip.numel() != n:
            raise CacheError(f"{flip.numel()} flips for {n} indices")
        return flip

    def get_batch(self, indices, flip=None, generator: Optional[torch.Generator] = None) -> dict:
        """indices (B,) -> {"moments": float32 (B, 2C, h, w) | None, "codes": int64 (B, h, w) | None,
        "labels": int64 (B,), "flips": bool (B,)}.  flip: None (the cache's setting), 0/1, or a
        (B,) bool/int tensor chosen by the trainer."""
        idx = np.asarray(torch.as_tensor(indices).reshape(-1).cpu().numpy(), dtype=np.int64)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"token cache index out of range 0..{n - 1}")
        idx = np.where(idx < 0, idx + n, idx)
        flips = self._flips(len(idx), flip, generator)
        rows, f = self._row(idx), flips.numpy().astype(np.int64)
        return {"labels": self.labels[torch.from_numpy(idx)], "flips": flips,
                "moments": self._gather("moments", rows, f), "codes": self._gather("codes", rows, f)}

    def __getitem__(self, i):
        flip = None
        if isinstance(i, tuple):
            i, flip = i
        b = self.get_batch(torch.tensor([int(i)]), flip)
        return (None if b["moments"] is None else b["moments"][0],
                None if b["codes"] is None else b["codes"][0],
                int(b["labels"][0]), bool(b["flips"][0]))


def sample_latents(moments: torch.Tensor, scale: float, generator: Optional[torch.Generator] = None):
    """Posterior sample * scale from cached moments (B, 2C, h, w), as MAR does on every read."""
    from d2c.tokenizers.kl import DiagonalGaussian
    return DiagonalGaussian(moments.float()).sample(generator) * scale


def open_token_cache(out_dir, dataset, *, kl=None, vq=None, moments_dtype: str = "float32",
                     dataset_id=None, **kwargs) -> Optional[TokenCache]:
    """The complete cache for this key if one exists, else None (never builds)."""
    key, _ = token_cache_key(dataset, kl, vq, moments_dtype=moments_dtype, dataset_id=dataset_id)
    path = cache_path(out_dir, key)
    return TokenCache(path, **kwargs) if is_complete(path, key) else None
