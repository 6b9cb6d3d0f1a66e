"""Building the token cache of d2c.data.cache (the format and the reader are there).

    cache = build_token_cache(dataset, "runs/cache", kl=kl, vq=vq, batch_size=64)

Built in shards of `shard_size` consecutive images.  Every rank of a job (torchrun's RANK /
WORLD_SIZE or SLURM's SLURM_PROCID / SLURM_NTASKS) builds shards rank, rank + world, ...; a
finished shard is renamed into place and never rebuilt, so a killed build resumes at the first
unfinished shard.  The last rank to finish (rank 0 after a barrier in a process group) writes
meta.json, which makes the cache complete.  The arrays do not depend on the number of ranks.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from d2c.files import fsync_path, json_default, pid_alive, write_once
from d2c.data.cache import (FORMAT_VERSION, CacheError, TokenCache, cache_path, is_complete, shard_dir, shard_done,
                            token_cache_key)

# ImageNet-1k in 129 shards (~640 MiB of float32 moments each): a kill loses under one shard a rank
SHARD_SIZE = 10_000


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
        from d2c.progress import Progress

        models = [m for m in (kl, vq) if m is not None]
        dev = torch.device(device) if device is not None else _model_device(models[0])
        was_training = [m.training for m in models]
        for m in models:
            m.to(dev).eval()
        total = sum(min(n, (s + 1) * shard_size) - s * shard_size for s in todo)
        bar = Progress(f"token cache {final.name}" + (f" (rank {rank}/{world})" if world > 1 else ""), total, "img",
                       enabled=progress, images_per_unit=1)
        try:
            with torch.inference_mode():
                for i, s in enumerate(todo):
                    bar.fields["shard"] = f"{i + 1}/{len(todo)}"
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
    from d2c.files import atomic_write_text

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

