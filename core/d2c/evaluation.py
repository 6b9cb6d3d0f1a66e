"""The ADM / MAR evaluation protocol at scale: every rank samples its batches, one ADM `.npz`.

    npz = sample_to_npz(models, "runs/eval/d2c-b", SamplerConfig(steps=64, cfg=2.9),
                        num_images=50_000, num_classes=1000, batch_size=64, seed=0)   # all ranks
    metrics = evaluate_npz(npz, inception="weights-inception-2015-12-05-6726825d.pth",
                           reference="VIRTUAL_imagenet256_labeled.npz")

Labels are class-balanced (`balanced_labels`: 50 per class at 50k), cut into batches of
`batch_size`; batch b is sampled with seed `seed * 100_003 + b` (as d2c.pipeline.evaluate), so
the images do not depend on how many ranks sample.  Rank r samples batches r, r + world, ...
and writes each atomically: `batches/batch-<b>.npy` (uint8 NHWC), then `batch-<b>.json`
(seconds, warm-up or not, peak memory).  A rerun samples only the batches without a json.
`meta.json` says what was sampled (the models' weight fingerprints and every setting); a folder
holding another configuration's batches is refused.  When every batch is there, one rank
(rank 0 after a barrier in a process group, else the last to finish) streams them into
`samples.npz` (`arr_0` uint8 NHWC, what ADM's evaluator reads; `arr_1` the labels) without
holding them in memory, and writes `speed.json`: seconds per image and rank at the sampling
batch, over every batch but each rank's first (the warm-up: compilation, allocator), CUDA
synchronised, and the largest peak memory of any rank.  `png=True` also writes
`png/<index>.png`.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from d2c.metrics.speed import NFE_KEYS


class EvalError(ValueError):
    """A sample folder or file that cannot be used; the message is one line for the user."""


def _batch(out: Path, b: int, ext: str) -> Path:
    return out / "batches" / f"batch-{b:06d}.{ext}"


def _done(out: Path, b: int) -> bool:
    return _batch(out, b, "json").is_file()


def _fingerprints(models: dict) -> dict:
    from d2c.data.cache import tokenizer_fingerprint
    return {k: tokenizer_fingerprint(m)[:16] for k, m in sorted(models.items())}


def sample_to_npz(models: dict, out, sampler, *, num_images: int, num_classes: int, batch_size: int = 64,
                  seed: int = 0, png: bool = False, rank: Optional[int] = None, world: Optional[int] = None,
                  progress: bool = True, wait: bool = True) -> Optional[Path]:
    """Sample this rank's batches of the evaluation into `out` (d2c_sample's models and
    SamplerConfig), then, once all ranks' batches exist, `out/samples.npz`; returns its path
    (None on a rank that does not wait for the others: wait=False)."""
    from d2c.files import atomic_write, atomic_write_text, write_once
    from d2c.distributed import dist_env
    from d2c.metrics import balanced_labels
    from d2c.metrics.speed import peak_memory
    from d2c.sampling import d2c_sample, family_of_models

    if num_images < 1 or batch_size < 1:
        raise EvalError(f"num_images={num_images} batch_size={batch_size}; allowed: integers >= 1")
    if rank is None or world is None:
        rank, world, _ = dist_env()
    out = Path(out)
    (out / "batches").mkdir(parents=True, exist_ok=True)
    sampler = sampler.for_family(family_of_models(models))
    settings = {"num_images": num_images, "num_classes": num_classes, "batch_size": batch_size, "seed": seed,
                "sample": {k: v for k, v in sorted(dataclasses.asdict(sampler).items()) if v is not None},
                "models": _fingerprints(models)}
    text = json.dumps(settings, sort_keys=True, default=str)
    write_once(out / "meta.json", text)
    if (out / "meta.json").read_text() != text:
        diff = _differs(json.loads((out / "meta.json").read_text()), settings, sampler)
        if diff and any((out / "batches").glob("batch-*.json")):
            raise EvalError(f"{out} holds samples of another configuration ({diff} differs); give a new folder")
        if diff:                 # a run that stopped before its first batch: the folder is still free
            atomic_write_text(out / "meta.json", text)
    labels = balanced_labels(num_images, num_classes)
    num_batches = -(-num_images // batch_size)
    todo = [b for b in range(rank, num_batches, world) if not _done(out, b)]
    device = next(next(iter(models.values())).parameters()).device
    if todo:
        from d2c.progress import Progress
        total = sum(len(labels[b * batch_size:(b + 1) * batch_size]) for b in todo)
        bar = Progress(f"sample {out.name}" + (f" (rank {rank}/{world})" if world > 1 else ""), total, "img",
                       enabled=progress, images_per_unit=1)
        for i, b in enumerate(todo):
            lab = labels[b * batch_size:(b + 1) * batch_size]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            res = d2c_sample(lab, models, sampler, seed=seed * 100_003 + b)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
            arr = np.ascontiguousarray(res.images.permute(0, 2, 3, 1).cpu().numpy())
            atomic_write(_batch(out, b, "npy"), lambda f: np.save(f, arr))
            if png:
                _write_pngs(out / "png", arr, b * batch_size)
            atomic_write_text(_batch(out, b, "json"), json.dumps({
                "batch": b, "images": len(lab), "seconds": seconds, "warmup": i == 0, "rank": rank,
                "world": world, "timings": res.timings, "nfe": res.nfe, "dtypes": res.dtypes,
                **peak_memory(device)}))
            bar.update(len(lab), batch=f"{i + 1}/{len(todo)}")
        bar.close()
    return _complete(out, num_batches, labels, rank, world, wait)


def _differs(old: dict, new: dict, sampler) -> Optional[str]:
    """The first setting of a folder's meta.json that differs from this run's, None if none does.
    A sampler setting an older folder does not name ran at its default; one the family does not
    run (None here) cannot differ."""
    from d2c.sampling import SAMPLER_DEFAULTS
    for k in new:
        if k != "sample" and json.dumps(old.get(k), sort_keys=True, default=str) \
                != json.dumps(new[k], sort_keys=True, default=str):
            return k
    before = old.get("sample") or {}
    for k, v in dataclasses.asdict(sampler).items():
        if v is not None and before.get(k, SAMPLER_DEFAULTS[k]) != v:
            return f"sample.{k}"
    return None


def _write_pngs(folder: Path, arr: np.ndarray, first: int) -> None:
    from PIL import Image

    from d2c.files import atomic_write
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(arr):
        atomic_write(folder / f"{first + i:06d}.png", lambda f, img=img: Image.fromarray(img).save(f, format="PNG"))


def _complete(out: Path, num_batches: int, labels, rank: int, world: int, wait: bool) -> Optional[Path]:
    from d2c.distributed import finish_once
    npz = out / "samples.npz"
    done = finish_once(lambda: _gather(out, num_batches, labels), npz.is_file,
                       lambda: all(_done(out, b) for b in range(num_batches)), rank=rank, world=world, wait=wait,
                       waiting=f"sample: waiting for the other ranks' batches in {out / 'batches'}")
    return npz if done else None


def _gather(out: Path, num_batches: int, labels) -> None:
    """Stream every batch into samples.npz (arr_0 uint8 NHWC, arr_1 labels) and write speed.json."""
    import zipfile

    from d2c.files import atomic_write, atomic_write_text
    parts = [np.load(_batch(out, b, "npy"), mmap_mode="r") for b in range(num_batches)]
    shape = (sum(len(p) for p in parts), *parts[0].shape[1:])
    if shape[0] != len(labels) or any(p.shape[1:] != parts[0].shape[1:] or p.dtype != np.uint8 for p in parts):
        raise EvalError(f"{out / 'batches'}: batches do not add up to {len(labels)} uint8 images of one size; "
                        "remove the folder and sample again")

    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as g:
                np.lib.format.write_array_header_2_0(g, {"descr": "|u1", "fortran_order": False, "shape": shape})
                for p in parts:
                    g.write(np.ascontiguousarray(p).tobytes())
            with zf.open("arr_1.npy", "w") as g:
                np.lib.format.write_array(g, np.asarray(labels, dtype=np.int64))
    atomic_write(out / "samples.npz", write)
    atomic_write_text(out / "speed.json", json.dumps(speed_summary(out, num_batches), indent=1))


def speed_summary(out: Path, num_batches: int) -> dict:
    """The speed part of a result record (d2c.metrics.speed_record's keys), per rank: seconds over
    every batch but each rank's first (all of them if no rank had two), the ranks, and the
    largest peak memory of any rank."""
    recs = [json.loads(_batch(out, b, "json").read_text()) for b in range(num_batches)]
    timed = [r for r in recs if not r["warmup"]] or recs
    seconds, images = sum(r["seconds"] for r in timed), sum(r["images"] for r in timed)
    peak = max(recs, key=lambda r: r["peak_memory_bytes"])
    rec = {"num_images": sum(r["images"] for r in recs), "timed_images": images, "seconds_total": seconds,
           "seconds_per_image": seconds / images, "images_per_second": images / seconds,
           "per": "rank", "ranks": len({(r["world"], r["rank"]) for r in recs}), "batch_size": recs[0]["images"],
           "warmup_excluded": len(timed) < len(recs)}
    # the warm-up batches' time beyond the steady rate: compilation and CUDA-graph capture under
    # compile=True (allocator and kernel selection otherwise), per rank
    warm = [r for r in recs if r["warmup"]]
    if warm and len(timed) < len(recs):
        extra = sum(r["seconds"] - r["images"] * rec["seconds_per_image"] for r in warm) / len(warm)
        rec["compile_seconds"] = max(0.0, extra)
    rec.update({f"{k}_seconds": sum(r["timings"].get(k, 0.0) for r in timed) for k in ("stage1", "stage2", "decode")})
    nfe = {**recs[0]["nfe"]}
    if "diffusion_steps" in nfe:              # batches sampled before the total had its own name
        nfe.setdefault("reverse_steps", nfe.pop("diffusion_steps"))
    rec.update({k: int(nfe.get(k, 0)) for k in NFE_KEYS})
    rec.update({f"{k}_dtype": v for k, v in recs[0]["dtypes"].items()})
    rec.update(peak_memory_bytes=peak["peak_memory_bytes"], peak_memory_kind=peak["peak_memory_kind"])
    return rec


def load_npz_images(path) -> "NpzRows":
    """arr_0 of an ADM-format sample file, checked (uint8 (N, H, W, 3)), as rows read on demand:
    50,000 images at 256 px are 9.8 GB, so neither the metrics nor the grid hold them whole."""
    from d2c.files import NpzRows
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"sample file not found: {path}")
    try:
        arr = NpzRows(path, "arr_0")
    except KeyError:
        raise EvalError(f"{path}: no arr_0 (ADM's sample files hold the images as arr_0)") from None
    except Exception as e:
        raise EvalError(f"{path}: not a readable .npz ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise EvalError(f"{path}: arr_0 is {arr.dtype} {tuple(arr.shape)}; ADM's format is uint8 (N, H, W, 3)")
    return arr


def evaluate_npz(path, *, inception, reference, device="cpu", batch_size: int = 64) -> dict:
    """FID / IS (10 splits) / KID / precision-recall of an ADM-format sample file under
    torch-fidelity's Inception (a local file) against ADM's reference batch (its mu / sigma for
    FID, its arr_0 images for KID and precision / recall), reading both files a batch at a time."""
    from d2c.metrics import compute_metrics
    from d2c.metrics.fidelity import _Uint8Images
    images = load_npz_images(path)
    return compute_metrics(_Uint8Images(images, nhwc=True), mode="imagenet", reference=reference,
                           weights_path=inception, device=device, batch_size=batch_size)
