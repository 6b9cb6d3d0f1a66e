"""Every stage, in order, for one dataset: the data flow of docs/design.md section 2.

    images -> KL / VQ tokenizers -> token cache -> stage 1 GPT (codes)
                                                -> stage 2 MAR / D2C (moments [+ codes])
A stage's folder is `<root>/ckpt/<stage>-<key>`, the key a hash of its training config and of
everything upstream (data, tokenizer runs), so that changing sampling settings never retrains
and changing a tokenizer retrains what depends on it.  A finished stage (DONE) is reused; an
interrupted one resumes from its last checkpoint.
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch

from d2c.checkpoint import is_done, load_trained
from d2c.files import stable_hash
from d2c.config import Family, TrainConfig, make_config
from d2c.data.batches import ImageSource, TokenSource
from d2c.data.imagefolder import build_dataset
from d2c.recipes import Recipe, mar_config
from d2c.train import train


logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _stage_lock(out: Path):
    """Exclusive flock on `<out>.lock` (released by the kernel if the holder dies).  In a
    multi-rank job the ranks train the stage together (DDP; a lock would deadlock them): barriers
    instead, so that every rank sees the same DONE state (needs the process group set up first)."""
    from d2c.distributed import dist_env
    if dist_env()[1] > 1:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.barrier()
        try:
            yield
        finally:
            if dist.is_initialized():
                dist.barrier()
        return
    import fcntl
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{out}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Pipeline:
    """Lazily trains (or finds) what a family needs and returns the models in eval mode."""

    def __init__(self, recipe: Recipe | None = None, root="outputs", device=None):
        self.recipe = recipe or Recipe()
        self.root = Path(root)
        from d2c.distributed import local_device
        self.device = torch.device(device) if device is not None else local_device()
        self.timings: dict[str, float] = {}   # seconds spent training each stage in this process
        self._dataset = self._cache = None
        self._dirs: dict[str, Path] = {}
        self._ids: dict[str, str] = {}          # what names each tokenizer in its dependants' keys
        self._pretrained: dict = {}
        self._models: dict = {}                 # family -> its d2c_sample models, built once

    @property
    def dataset(self):
        if self._dataset is None:
            self._dataset = build_dataset(self.recipe.data)
        return self._dataset

    def _ensure(self, name: str, config: TrainConfig, upstream: tuple, source_fn, extra=None, init_from=None) -> Path:
        # the resolved model config is hashed too: editing a preset must not reuse old weights;
        # so is the dataset's identity (the token cache's), which names its generator version or files
        from d2c.data.cache import dataset_identity
        source = None
        if config.train_epochs is not None or config.warmup_epochs is not None:
            source = source_fn()
            config = config.in_steps(len(source))
        model_config = make_config(config.preset, **config.overrides)
        data = (self.recipe.data, dataset_identity(self.dataset))
        out = self.root / "ckpt" / f"{name}-{stable_hash([config, model_config, *data, *upstream], length=12)}"
        if not is_done(out):
            with _stage_lock(out):   # concurrent processes (sweep cells) train a stage once
                if not is_done(out):
                    last = sorted(p.name for p in out.glob("step_*")) if out.exists() else []
                    logger.info(f"training {name} -> {out}: {config.train_steps} steps"
                                + (f" (resuming from {last[-1]})" if last else ""))
                    t0 = time.perf_counter()
                    train(config, source or source_fn(), out, device=self.device, extra_batch=extra,
                          init_from=init_from)
                    self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0
        elif name not in self._dirs:
            logger.info(f"reusing {name} -> {out} (trained)")
        self._dirs[name] = out
        return out

    def _images(self):
        ds = self.dataset
        if not hasattr(ds, "images"):
            raise ValueError("training tokenizers needs an in-memory dataset (data.name=shapes); "
                             "for ImageNet load the public KL-16 / VQ-16 weights instead")
        return ImageSource(ds.images, ds.labels)

    def _tokenizer_dir(self, kind: str) -> Path:
        out = self._ensure(kind, self.recipe.stages[kind], (), self._images)
        self._ids[kind] = out.name
        return out

    def has_tokenizer(self, kind: str) -> bool:
        return kind in self.recipe.pretrained or kind in self.recipe.stages

    def tokenizer(self, kind: str):
        """The trained tokenizer stage, or the recipe's public file (loaded once, strict)."""
        if kind not in self.recipe.pretrained:
            return load_trained(self._tokenizer_dir(kind), device=self.device)
        if kind not in self._pretrained:
            from d2c import load_pretrained
            p = self.recipe.pretrained[kind]
            self._pretrained[kind] = load_pretrained(p.preset, p.path).to(self.device).eval()
        return self._pretrained[kind]

    def cache(self):
        """The token cache of the dataset under every tokenizer the recipe has (all ranks of a
        job build it together: d2c.data.cache_build)."""
        if self._cache is None:
            from d2c.data.cache_build import build_token_cache
            kl, vq = (self.tokenizer(k) if self.has_tokenizer(k) else None for k in ("kl", "vq"))
            self._cache = build_token_cache(self.dataset, self.root / "cache", kl=kl, vq=vq,
                                            device=self.device, batch_size=256)
        return self._cache

    def _upstream(self):
        """What names the tokenizers in their dependants' keys: a trained one's folder, a public
        file's weight fingerprint (the one the token cache's key holds).  Builds no cache: a
        cell whose stages exist, or that trains nothing, never encodes the dataset."""
        from d2c.data.cache import tokenizer_fingerprint
        for k in self.recipe.pretrained:
            self._ids[k] = f"{k}-pretrained-{tokenizer_fingerprint(self.tokenizer(k))[:12]}"
        for k in ("kl", "vq"):
            if k in self.recipe.stages and k not in self.recipe.pretrained:
                self._tokenizer_dir(k)
        return tuple(self._ids[k] for k in ("kl", "vq") if k in self._ids)

    def _public(self, config: TrainConfig, path):
        """A stage's model from a public file (strict; `fusion.*` may be new: zero-init)."""
        from d2c import load_pretrained
        logger.info(f"loading {config.stage} <- {path} ({config.preset}; public weights, nothing trained)")
        return load_pretrained(config.preset, path, new=("fusion.",), **config.overrides).to(self.device).eval()

    def gpt(self):
        if "gpt" in self.recipe.init:
            return self._public(self.recipe.stages["gpt"], self.recipe.init["gpt"])
        out = self._ensure("gpt", self.recipe.stages["gpt"], self._upstream(),
                           lambda: TokenSource(self.cache()))
        return load_trained(out, device=self.device)

    def mar(self, family: Family):
        """Stage 2 of a family.  With a `mar_trunk` stage in the recipe, every family starts from
        one shared plain-MAR run of that many steps and trains `mar.train_steps` more (fusion modules
        zero-init, so a D2C model starts as the trunk): all families see the same number of
        steps, and the trunk is paid once instead of three times."""
        config = mar_config(self.recipe, family)
        if "mar" in self.recipe.init and config.train_epochs == 0:   # the public MAR as it is
            return self._public(config, self.recipe.init["mar"])
        scale = self.tokenizer("kl").config.scale
        upstream, init = self._upstream(), None
        if "mar" in self.recipe.init:       # a public MAR starts stage 2
            from d2c.files import file_digest
            init = Path(self.recipe.init["mar"])
            upstream = (*upstream, f"init-{file_digest(init)}")
        elif "mar_trunk" in self.recipe.stages:
            trunk = mar_config(self.recipe, Family("mar"), stage="mar_trunk")
            init = self._ensure("mar_trunk", trunk, upstream, lambda: TokenSource(self.cache()),
                                extra={"latent_scale": scale})
            upstream = (*upstream, init.name)
        out = self._ensure(family.name, config, upstream, lambda: TokenSource(self.cache()),
                           extra={"latent_scale": scale}, init_from=init)
        return load_trained(out, device=self.device)

    def tokenizer_metrics(self) -> dict:
        """Both tokenizers on held-out real shapes (d2c.metrics.detail.reconstruction_metrics),
        keyed `<metric>_kl` / `<metric>_vq` (rfid_kl, rfid_detail_vq, ...); measured once per
        trained tokenizer and kept in its stage folder."""
        import json

        from d2c.files import atomic_write_text
        from d2c.metrics.detail import reconstruction_metrics
        out = {}
        for kind in ("kl", "vq"):
            if kind in self.recipe.pretrained or kind not in self.recipe.stages:
                continue     # measured on the embedded shapes: only for the tokenizers trained on them
            path = self._tokenizer_dir(kind) / "reconstruction.json"
            try:
                m = json.loads(path.read_text())
            except (OSError, ValueError):
                m = reconstruction_metrics(self.tokenizer(kind), cache_dir=self.root / "cache", device=self.device)
                atomic_write_text(path, json.dumps(m, indent=1))
            out.update({f"{k}_{kind}": float(v) for k, v in m.items()})
        return out

    def models(self, family: Family) -> dict:
        """The keyword arguments of d2c_sample for a family (trained, found or loaded once)."""
        if family in self._models:
            return self._models[family]
        models = self._models[family] = {}
        if family.has_stage2:
            models.update(mar=self.mar(family), kl=self.tokenizer("kl"))
        if family.has_stage1:
            models["gpt"] = self.gpt()
        if not family.has_stage2:
            models["vq"] = self.tokenizer("vq")
        return models


# --------------------------------------------------------------------------- sample + measure


def _num_classes(models: dict) -> int:
    return models["gpt"].config.num_classes if "gpt" in models else models["mar"].config.class_num


def evaluate(pipe: Pipeline, family: Family, sampler, *, num_images: int = 1000, batch_size: int = 100,
             seed: int = 0, progress: bool = True) -> dict:
    """Sample `num_images` class-balanced images of a family in this process with `sampler` (a
    d2c.sampling.SamplerConfig) and measure them (the embedded default; at paper scale
    evaluate_adm): FID/IS/KID/PR (embedded layout net), class accuracy, the detail metrics
    (fid_detail, spectral_distance, high_pass_ratio), both tokenizers' reconstruction metrics
    (rfid_kl, rfid_vq, ...), and speed (per-stage seconds, NFEs, peak memory).  sampler.compile:
    the first batch compiles and captures; its time beyond the other batches' rate is reported
    apart (speed["compile_seconds"]), the speed from the others."""
    from d2c.metrics import balanced_labels, class_accuracy, compute_metrics, speed_record
    from d2c.metrics.detail import detail_metrics
    from d2c.sampling import SampleResult, d2c_sample

    models = pipe.models(family)
    sampler = sampler.for_family(family)
    labels = balanced_labels(num_images, _num_classes(models))
    images, timings, nfe, first = [], {}, {}, None
    chunks = list(torch.split(labels, batch_size))
    from d2c.progress import Progress
    bar = Progress(f"sample {family.name}", num_images, "img", enabled=progress, images_per_unit=1)
    for i, lab in enumerate(chunks):
        res = d2c_sample(lab, models, sampler, seed=seed * 100_003 + i)
        images.append(res.images)
        bar.update(len(lab), batch=f"{i + 1}/{len(chunks)}")
        if sampler.compile and i == 0 and len(chunks) > 1:
            first = (res.timings["total"], len(lab))          # compilation and graph capture
        else:
            for k, v in res.timings.items():
                timings[k] = timings.get(k, 0.0) + v
        nfe = res.nfe
    bar.close()
    images = torch.cat(images)
    timed = num_images - (first[1] if first else 0)
    speed = speed_record(SampleResult(images, None, None, timings, nfe, res.dtypes), timed, pipe.device)
    if first:
        speed["compile_seconds"] = max(0.0, first[0] - first[1] * speed["seconds_per_image"])
    logger.info(f"measuring {len(images)} images of {family.name}: FID, IS, KID, precision/recall, class accuracy, "
                "detail metrics")
    metrics = compute_metrics(images, mode="embedded", cache_dir=pipe.root / "cache", device=pipe.device)
    metrics["class_accuracy"] = class_accuracy(images, labels, cache_dir=pipe.root / "cache")
    metrics.update(detail_metrics(images, cache_dir=pipe.root / "cache", device=pipe.device))
    metrics.update(pipe.tokenizer_metrics())
    return {"family": family.name, "sampler": sampler, "num_images": num_images,
            "metrics": metrics, "speed": speed, "images": images}


def evaluate_adm(pipe: Pipeline, family: Family, out, sampler, *, num_images: int = 50_000,
                 batch_size: int = 64, seed: int = 0, inception=None, reference=None,
                 progress: bool = True) -> dict | None:
    """The ADM / MAR protocol (d2c.evaluation): every rank of the job samples its batches of
    `num_images` class-balanced images into `out` (a rerun samples only the missing ones), then
    rank 0 measures `out/samples.npz`.  Returns evaluate()'s dict on rank 0 (its images: the
    first 64, for the grid), None on the other ranks."""
    import json

    from d2c.distributed import dist_env
    from d2c.evaluation import evaluate_npz, load_npz_images, sample_to_npz

    models = pipe.models(family)
    sampler = sampler.for_family(family)
    npz = sample_to_npz(models, out, sampler, num_images=num_images, num_classes=_num_classes(models),
                        batch_size=batch_size, seed=seed, progress=progress)
    if dist_env()[0] != 0:
        return None
    logger.info(f"measuring {npz}: FID, IS, KID, precision/recall against {reference}")
    metrics = evaluate_npz(npz, inception=inception, reference=reference, device=pipe.device)
    speed = json.loads((Path(out) / "speed.json").read_text())
    images = torch.from_numpy(load_npz_images(npz)[:64]).permute(0, 3, 1, 2).contiguous()
    return {"family": family.name, "sampler": sampler, "num_images": num_images,
            "metrics": metrics, "speed": speed, "images": images}
