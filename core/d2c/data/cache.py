"""The token cache: every image and its horizontal flip through the tokenizers, once.

    cache = build_token_cache(dataset, "runs/cache", kl=kl, vq=vq, batch_size=64)
    b = cache.get_batch(indices, flip)          # {"moments", "codes", "labels", "flips"}
    latents = sample_latents(b["moments"], scale, generator)

Like MAR's cached training (`main_cache.py`), the KL posterior *moments* are stored (mean and
log-variance, not a sample), so every read draws a fresh posterior sample.  The VQ codes of
the same image and its flip are stored beside them (stage 1 trains on them; stage 2 is
teacher-forced with them).  The flip is `torch.flip(image, dims=[-1])` (width axis) before
encoding.

Built in shards of `shard_size` consecutive images.  Every rank of a job (torchrun's RANK /
WORLD_SIZE or SLURM's SLURM_PROCID / SLURM_NTASKS) builds shards rank, rank + world, ...; a
finished shard is renamed into place and never rebuilt, so a killed build resumes at the first
unfinished shard.  The last rank to finish (rank 0 after a barrier in a process group) writes
meta.json, which makes the cache complete.  The arrays do not depend on the number of ranks.

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
import os
import shutil
import socket
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from d2c.checkpoint import fsync_path, json_default, pid_alive, stable_hash, write_once

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


# --------------------------------------------------------------------------- build


# --------------------------------------------------------------------------- build

# ImageNet-1k in 129 shards (~640 MiB of float32 moments each): a kill loses under one shard a rank
SHARD_SIZE = 10_000


def shard_dir(path, s: int) -> Path:
    return Path(path) / f"shard-{s:05d}"


def shard_done(path, s: int) -> bool:
    return (shard_dir(path, s) / "shard.json").is_file()


class _Rows(torch.utils.data.Dataset):
    """(index, image, label), or (index, None, None) for an image the dataset could not read."""

    def __init__(self, dataset, lo: int = 0, hi: Optional[int] = None):
        self.dataset, self.lo = dataset, lo
        self.hi = len(dataset) if hi is None else hi
        self.fetch = getattr(dataset, "get_or_none", None) or dataset.__getitem__

    def __len__(self):
        return self.hi - self.lo

    def __getitem__(self, k):
        i = self.lo + k
        out = self.fetch(i)
        return (i, None, None) if out is None else (i, out[0], out[1])


def _collate(items):
    idx = [i for i, _, _ in items]
    good = [(i, x, y) for i, x, y in items if x is not None]
    if not good:
        return idx, [], None, None
    return (idx, [i for i, _, _ in good], torch.stack([x for _, x, _ in good]),
            torch.tensor([int(y) for _, _, y in good], dtype=torch.int64))


def _tmp_name(prefix: str) -> str:
    return f"{prefix}-{socket.gethostname()}-{os.getpid()}"


def _remove_stale_tmp(folder: Path, prefix: str) -> None:
    """`<prefix>...-<host>-<pid>` folders of killed writers on this host (their pid is gone)."""
    host = socket.gethostname()
    for p in folder.glob(f"{prefix}-*"):
        rest, _, pid = p.name.rpartition("-")
        if rest.endswith(f"-{host}") and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _plan(path: Path, key: str, n: int, shard_size: int) -> int:
    """The shard size of this cache: fixed by the first build (plan.json), kept by every resume."""
    path.mkdir(parents=True, exist_ok=True)
    write_once(path / "plan.json", json.dumps({"version": FORMAT_VERSION, "key": key, "num_rows": n,
                                                "shard_size": int(shard_size)}))
    plan = json.loads((path / "plan.json").read_text())
    if plan.get("key") != key or plan.get("num_rows") != n or plan.get("version") != FORMAT_VERSION:
        raise CacheError(f"{path}/plan.json belongs to another cache build (key, size or version differ); "
                         f"remove {path}")
    return int(plan["shard_size"])


def _model_device(model):
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def build_token_cache(dataset, out_dir, *, kl=None, vq=None, batch_size: int = 64, device=None,
                      progress: bool = True, num_workers: int = 0, moments_dtype: str = "float32",
                      dataset_id=None, shard_size: int = SHARD_SIZE, rank: Optional[int] = None,
                      world: Optional[int] = None, wait: bool = True) -> Optional["TokenCache"]:
    """Encode every image and its horizontal flip with `kl` (moments) and/or `vq` (codes) into
    `<out_dir>/tokens-<key16>/`, or open it if a complete cache with the same key exists.

    rank, world: which shards this process builds (default: the job's, d2c.distributed.dist_env).
    In a process group the ranks meet at a barrier and rank 0 completes the cache; without one
    the last rank to finish does, and the others wait for it (`wait=False`: return None instead).
    device: where the tokenizers run (default: where their weights are; they are moved there
    if given).  Arrays are written on CPU.  Tokenizers run in eval mode (restored afterwards).
    dataset_id: any JSON-able value naming the dataset, replacing `dataset_identity(dataset)`.
    """
    from d2c.distributed import dist_env

    out_dir = Path(out_dir)
    key, parts = token_cache_key(dataset, kl, vq, moments_dtype=moments_dtype, dataset_id=dataset_id)
    final = cache_path(out_dir, key)
    if is_complete(final, key):
        return TokenCache(final)
    if rank is None or world is None:
        rank, world, _ = dist_env()
    if not 0 <= rank < world:
        raise CacheError(f"rank {rank} of world {world}: need 0 <= rank < world")
    if shard_size < 1:
        raise CacheError(f"shard_size={shard_size}; allowed: integers >= 1")
    n = len(dataset)
    if n == 0:
        raise CacheError("cannot cache an empty dataset")
    shard_size = _plan(final, key, n, shard_size)
    num_shards = -(-n // shard_size)
    _remove_stale_tmp(final, ".tmp-shard")
    todo = [s for s in range(rank, num_shards, world) if not shard_done(final, s)]
    if todo:
        from tqdm.auto import tqdm

        models = [m for m in (kl, vq) if m is not None]
        dev = torch.device(device) if device is not None else _model_device(models[0])
        was_training = [m.training for m in models]
        for m in models:
            m.to(dev).eval()
        total = sum(min(n, (s + 1) * shard_size) - s * shard_size for s in todo)
        bar = tqdm(total=total, desc=f"token cache (rank {rank}/{world}, {len(todo)} shards)" if world > 1
                   else f"token cache ({len(todo)} shards)", unit="img", disable=not progress, dynamic_ncols=True)
        try:
            with torch.inference_mode():
                for s in todo:
                    _write_shard(dataset, final, s, shard_size, kl, vq, batch_size, dev, num_workers,
                                 moments_dtype, bar)
        finally:
            bar.close()
            for m, t in zip(models, was_training):
                m.train(t)
    return _complete(dataset, final, key, parts, num_shards, shard_size, rank, world, wait, kl, vq)


def _write_shard(dataset, path: Path, s: int, shard_size: int, kl, vq, batch_size, dev, num_workers,
                 moments_dtype, bar) -> None:
    lo, hi = s * shard_size, min(len(dataset), (s + 1) * shard_size)
    tmp = path / _tmp_name(f".tmp-shard-{s:05d}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        loader = torch.utils.data.DataLoader(_Rows(dataset, lo, hi), batch_size=batch_size, shuffle=False,
                                             num_workers=num_workers, collate_fn=_collate)
        labels = np.lib.format.open_memmap(tmp / "labels.npy", mode="w+", dtype=np.int64, shape=(hi - lo,))
        labels[:] = -1
        moments = codes = None
        image_size, bad = None, []
        for idx, good, x, y in loader:
            bad += sorted(set(idx) - set(good))
            bar.update(len(idx))
            if not good:
                continue
            if image_size is None:
                image_size = list(x.shape[-2:])
            elif list(x.shape[-2:]) != image_size:
                raise CacheError(f"images of different sizes in one dataset: {image_size} and {list(x.shape[-2:])}")
            rows = np.asarray(good) - lo
            x = x.to(dev, non_blocking=True).float()
            views = (x, torch.flip(x, dims=[-1]))
            if kl is not None:
                m = torch.stack([kl.encode_moments(v).float().cpu() for v in views], dim=1)
                if moments is None:
                    moments = np.lib.format.open_memmap(tmp / "moments.npy", mode="w+", dtype=moments_dtype,
                                                        shape=(hi - lo,) + tuple(m.shape[1:]))
                moments[rows] = m.numpy().astype(moments_dtype)
            if vq is not None:
                c = torch.stack([vq.encode(v).cpu() for v in views], dim=1)
                if codes is None:
                    cdt = np.int16 if vq.config.codebook_size <= np.iinfo(np.int16).max else np.int32
                    codes = np.lib.format.open_memmap(tmp / "codes.npy", mode="w+", dtype=cdt,
                                                      shape=(hi - lo,) + tuple(c.shape[1:]))
                codes[rows] = c.numpy()
            labels[rows] = y.numpy()
        arrays = {}
        for name, arr in (("labels", labels), ("moments", moments), ("codes", codes)):
            if arr is not None:
                arr.flush()
                arrays[name] = {"shape": list(arr.shape), "dtype": str(arr.dtype)}
                fsync_path(tmp / f"{name}.npy")
        del labels, moments, codes, arr     # close the maps before the rename
        info = {"shard": s, "rows": [lo, hi], "image_size": image_size, "bad": bad, "arrays": arrays}
        with open(tmp / "shard.json", "w") as f:
            json.dump(info, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_path(tmp)
        try:
            os.rename(tmp, shard_dir(path, s))
        except OSError:
            if not shard_done(path, s):      # else another process finished the same shard first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        fsync_path(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _complete(dataset, final: Path, key, parts, num_shards, shard_size, rank, world, wait, kl, vq):
    from d2c.distributed import finish_once
    done = finish_once(lambda: _write_meta(dataset, final, key, parts, num_shards, shard_size, kl, vq),
                       lambda: is_complete(final, key),
                       lambda: all(shard_done(final, s) for s in range(num_shards)),
                       rank=rank, world=world, wait=wait,
                       waiting=f"token cache: waiting for the other ranks' shards in {final}")
    return TokenCache(final) if done else None


def _write_meta(dataset, final: Path, key, parts, num_shards, shard_size, kl, vq) -> None:
    """meta.json over all finished shards (identical content whichever rank writes it)."""
    from d2c.checkpoint import atomic_write_text

    infos = [json.loads((shard_dir(final, s) / "shard.json").read_text()) for s in range(num_shards)]
    n = infos[-1]["rows"][1]
    sizes = {tuple(i["image_size"]) for i in infos if i["image_size"] is not None}
    if len(sizes) > 1:
        raise CacheError(f"images of different sizes in one dataset: {sorted(sizes)}")
    bad = [b for i in infos for b in i["bad"]]
    if len(bad) == n:
        raise CacheError(f"no readable images in the dataset ({n} unreadable)")
    arrays = {}
    for name in ("labels", "moments", "codes"):
        specs = {(tuple(i["arrays"][name]["shape"][1:]), i["arrays"][name]["dtype"])
                 for i in infos if name in i["arrays"]}
        if len(specs) > 1:
            raise CacheError(f"token cache shards disagree on {name}: {sorted(specs)}; remove {final}")
        if specs:
            trailing, dtype = specs.pop()
            arrays[name] = {"file": f"{name}.npy", "shape": [n, *trailing], "dtype": dtype}
        else:
            arrays[name] = None
    if bad:
        samples = getattr(dataset, "samples", None)
        first = samples[bad[0]][0] if samples else f"index {bad[0]}"
        warnings.warn(f"token cache: left out {len(bad)} unreadable image(s) of {n} (first: {first})", stacklevel=4)
    labels = np.concatenate([np.load(shard_dir(final, s) / "labels.npy") for s in range(num_shards)])
    valid = labels[labels >= 0]
    classes = getattr(dataset, "classes", None)
    meta = {
        "version": FORMAT_VERSION,
        "complete": True,
        "key": key,
        "key_parts": parts,
        "num_rows": n,
        "num_valid": int(valid.size),
        "num_bad": len(bad),
        "num_classes": len(classes) if classes else int(valid.max()) + 1,
        "classes": list(classes) if classes is not None else None,
        "image_size": list(sizes.pop()),
        "kl_scale": float(kl.config.scale) if kl is not None else None,
        "codebook_size": int(vq.config.codebook_size) if vq is not None else None,
        "flips": 2,
        "shard_size": shard_size,
        "num_shards": num_shards,
        "arrays": arrays,
    }
    atomic_write_text(final / "meta.json", json.dumps(meta, indent=1, default=json_default))


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
