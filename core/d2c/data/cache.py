"""The token cache: every image and its horizontal flip through the tokenizers, once.

    cache = build_token_cache(dataset, "runs/cache", kl=kl, vq=vq, batch_size=64)
    b = cache.get_batch(indices, flip)          # {"moments", "codes", "labels", "flips"}
    latents = sample_latents(b["moments"], scale, generator)

Like MAR's cached training (`main_cache.py`), the KL posterior *moments* are stored (mean and
log-variance, not a sample), so every read draws a fresh posterior sample.  The VQ codes of
the same image and its flip are stored beside them (stage 1 trains on them; stage 2 is
teacher-forced with them).  The flip is `torch.flip(image, dims=[-1])` (width axis) before
encoding.

On-disk format, one folder `<out_dir>/tokens-<key[:16]>/`:
    meta.json     version, key, key_parts (what the key hashes), num_rows, num_valid, num_bad,
                  image_size, kl_scale, codebook_size, classes, and per array: file, shape, dtype
    moments.npy   (N, 2, 2*C, h, w) float32 (or float16 with moments_dtype): [:, f] is flip f,
                  channels [mean; logvar] as AutoencoderKL.encode_moments returns them
    codes.npy     (N, 2, h, w) int16 when the codebook has <= 32767 entries, else int32
    labels.npy    (N,) int64; -1 marks an unreadable image left out (readers skip those rows)
Arrays are written through `np.lib.format.open_memmap` a batch at a time and read back with
mmap_mode="r", so ImageNet (1.28M images) never sits in memory.  The build writes into a
temporary sibling folder `.tmp-tokens-<key16>-<host>-<pid>`, flushes and fsyncs, writes
meta.json last, and renames: a killed build never leaves a folder at the final path.  A
complete cache with the same key is opened, never rebuilt.  The key is a SHA-256 of: the
dataset identity (its `identity()` if it has one, else a hash of in-memory images and labels),
the tokenizer configs and weights (usage statistics such as VQ's `codebook_used` left out),
the image size and the stored dtype.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from d2c.checkpoint import fsync_path, json_default, pid_alive, stable_hash

FORMAT_VERSION = 1
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


# --------------------------------------------------------------------------- build


class _Rows(torch.utils.data.Dataset):
    """(index, image, label), or (index, None, None) for an image the dataset could not read."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.fetch = getattr(dataset, "get_or_none", None) or dataset.__getitem__

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        out = self.fetch(i)
        return (i, None, None) if out is None else (i, out[0], out[1])


def _collate(items):
    idx = [i for i, _, _ in items]
    good = [(i, x, y) for i, x, y in items if x is not None]
    if not good:
        return idx, [], None, None
    return (idx, [i for i, _, _ in good], torch.stack([x for _, x, _ in good]),
            torch.tensor([int(y) for _, _, y in good], dtype=torch.int64))


def _remove_stale_tmp(out_dir: Path, key: str) -> None:
    """Temp folders of killed builds of this key on this host (their pid is gone)."""
    host = socket.gethostname()
    for p in out_dir.glob(f".tmp-tokens-{key[:16]}-*"):
        h, _, pid = p.name[len(f".tmp-tokens-{key[:16]}-"):].rpartition("-")
        if h == host and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _model_device(model):
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def build_token_cache(dataset, out_dir, *, kl=None, vq=None, batch_size: int = 64, device=None,
                      progress: bool = True, num_workers: int = 0, moments_dtype: str = "float32",
                      dataset_id=None) -> "TokenCache":
    """Encode every image and its horizontal flip with `kl` (moments) and/or `vq` (codes) into
    `<out_dir>/tokens-<key16>/`, or open it if a complete cache with the same key exists.

    device: where the tokenizers run (default: where their weights are; they are moved there
    if given).  Arrays are written on CPU.  Tokenizers run in eval mode (restored afterwards).
    dataset_id: any JSON-able value naming the dataset, replacing `dataset_identity(dataset)`.
    """
    out_dir = Path(out_dir)
    key, parts = token_cache_key(dataset, kl, vq, moments_dtype=moments_dtype, dataset_id=dataset_id)
    final = cache_path(out_dir, key)
    if is_complete(final, key):
        return TokenCache(final)
    if final.exists():
        raise CacheError(f"{final} exists but is not a complete cache for this key; remove it")
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(out_dir, key)
    tmp = out_dir / f".tmp-tokens-{key[:16]}-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()

    models = [m for m in (kl, vq) if m is not None]
    dev = torch.device(device) if device is not None else _model_device(models[0])
    was_training = [m.training for m in models]
    for m in models:
        m.to(dev).eval()
    try:
        with torch.inference_mode():
            _write(dataset, tmp, key, parts, kl, vq, batch_size, dev, progress, num_workers, moments_dtype)
        try:
            os.rename(tmp, final)
        except OSError:
            # another process finished the same key first: keep theirs
            if not is_complete(final, key):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for m, t in zip(models, was_training):
            m.train(t)
    try:
        fsync_path(out_dir)
    except OSError:
        pass
    return TokenCache(final)


def _write(dataset, tmp: Path, key, parts, kl, vq, batch_size, dev, progress, num_workers, moments_dtype):
    from tqdm.auto import tqdm

    n = len(dataset)
    if n == 0:
        raise CacheError("cannot cache an empty dataset")
    loader = torch.utils.data.DataLoader(_Rows(dataset), batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, collate_fn=_collate)
    labels = np.lib.format.open_memmap(tmp / "labels.npy", mode="w+", dtype=np.int64, shape=(n,))
    labels[:] = -1
    moments = codes = None
    image_size = None
    n_bad = 0
    bar = tqdm(total=n, desc="token cache", unit="img", disable=not progress)
    for idx, good, x, y in loader:
        n_bad += len(idx) - len(good)
        bar.update(len(idx))
        if not good:
            continue
        if image_size is None:
            image_size = list(x.shape[-2:])
        elif list(x.shape[-2:]) != image_size:
            raise CacheError(f"images of different sizes in one dataset: {image_size} and {list(x.shape[-2:])}")
        rows = np.asarray(good)
        x = x.to(dev, non_blocking=True).float()
        views = (x, torch.flip(x, dims=[-1]))
        if kl is not None:
            m = torch.stack([kl.encode_moments(v).float().cpu() for v in views], dim=1)
            if moments is None:
                moments = np.lib.format.open_memmap(tmp / "moments.npy", mode="w+", dtype=moments_dtype,
                                                    shape=(n,) + tuple(m.shape[1:]))
            moments[rows] = m.numpy().astype(moments_dtype)
        if vq is not None:
            c = torch.stack([vq.encode(v).cpu() for v in views], dim=1)
            if codes is None:
                cdt = np.int16 if vq.config.codebook_size <= np.iinfo(np.int16).max else np.int32
                codes = np.lib.format.open_memmap(tmp / "codes.npy", mode="w+", dtype=cdt,
                                                  shape=(n,) + tuple(c.shape[1:]))
            codes[rows] = c.numpy()
        labels[rows] = y.numpy()
    bar.close()
    if n_bad == n:
        raise CacheError(f"no readable images in the dataset ({n} unreadable)")
    if n_bad:
        first = getattr(dataset, "bad", [None])
        warnings.warn(f"token cache: left out {n_bad} unreadable image(s) of {n}"
                      + (f" (first: {first[0]})" if first and first[0] else ""), stacklevel=3)
    arrays = {}
    for name, arr in (("labels", labels), ("moments", moments), ("codes", codes)):
        if arr is None:
            arrays[name] = None
            continue
        arr.flush()
        arrays[name] = {"file": f"{name}.npy", "shape": list(arr.shape), "dtype": str(arr.dtype)}
        del arr
        fsync_path(tmp / f"{name}.npy")
    del labels, moments, codes
    lab = np.load(tmp / "labels.npy", mmap_mode="r")
    valid = lab[lab >= 0]
    classes = getattr(dataset, "classes", None)
    meta = {
        "version": FORMAT_VERSION,
        "complete": True,
        "key": key,
        "key_parts": parts,
        "num_rows": n,
        "num_valid": int(valid.size),
        "num_bad": int(n_bad),
        "num_classes": len(classes) if classes else int(valid.max()) + 1,
        "classes": list(classes) if classes is not None else None,
        "image_size": image_size,
        "kl_scale": float(kl.config.scale) if kl is not None else None,
        "codebook_size": int(vq.config.codebook_size) if vq is not None else None,
        "flips": 2,
        "arrays": arrays,
    }
    del lab
    with open(tmp / "meta.json", "w") as f:
        json.dump(meta, f, indent=1, default=json_default)
        f.flush()
        os.fsync(f.fileno())
    fsync_path(tmp)


# --------------------------------------------------------------------------- read


class TokenCache(torch.utils.data.Dataset):
    """A built cache.  Item i: (moments (2C, h, w) float32 | None, codes (h, w) int64 | None,
    label int, flipped bool), i over the readable images only.

    flip: "random" (draw with `generator`, a torch.Generator), 0 or 1 (always that view).
    `cache[i, f]` asks for view f explicitly.  mmap=False reads the arrays into memory (tiny
    datasets); the default maps them (ImageNet)."""

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
        mode = "r" if mmap else None
        arrays = {}
        for name, spec in self.meta["arrays"].items():
            arrays[name] = None if spec is None else np.load(self.path / spec["file"], mmap_mode=mode)
        self.moments, self.codes, self._labels = arrays["moments"], arrays["codes"], arrays["labels"]
        lab = np.asarray(self._labels)
        self.rows = np.nonzero(lab >= 0)[0] if self.meta["num_bad"] else None   # logical -> row
        self.labels = torch.from_numpy(np.array(lab if self.rows is None else lab[self.rows], dtype=np.int64))

    key = property(lambda self: self.meta["key"])
    scale = property(lambda self: self.meta["kl_scale"])
    num_classes = property(lambda self: self.meta["num_classes"])

    def __len__(self):
        return len(self.labels)

    def _row(self, idx: np.ndarray) -> np.ndarray:
        return idx if self.rows is None else self.rows[idx]

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
        out = {"labels": self.labels[torch.from_numpy(idx)], "flips": flips, "moments": None, "codes": None}
        if self.moments is not None:
            out["moments"] = torch.from_numpy(np.asarray(self.moments[rows, f], dtype=np.float32))
        if self.codes is not None:
            out["codes"] = torch.from_numpy(np.asarray(self.codes[rows, f]).astype(np.int64))
        return out

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
