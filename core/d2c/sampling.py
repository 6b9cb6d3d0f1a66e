"""The sampler as one value (`SamplerConfig`), the two stages chained (`d2c_sample`) and its
baselines by leaving a stage out; the result (`SampleResult`) and image grids.  Each stage's
sampler lives beside its model and reads its settings from the SamplerConfig: stage 1 in
`d2c.models.generate` (LlamaGen layout), stage 2 as `MAR.sample_tokens` (MAR's layout).  One
`torch.Generator` drives both, on whatever device the models live on.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import time
import typing
from dataclasses import dataclass, field
from typing import Optional

import torch

from d2c.config import MODELS, Family
from d2c.models.generate import GPT_CFG_SCHEDULES, gpt_generate
from d2c.precision import DTYPE_NAMES, SAMPLING_PRECISIONS, autocast_for, sampling_dtype
from d2c.rules import boolean, int_min, number, one_of, or_null

# ============================================================================ the sampler
STAGE1, STAGE2, BOTH = "stage1", "stage2", "both"     # which stage reads a setting
CFG_SCHEDULES = ("linear", "constant")
HEAD_SAMPLERS = ("ddpm", "ddim")


def _setting(default, stage: str, rule, allowed: str, help: str):
    """A SamplerConfig field: its default, the stage that reads it, its rule and the `allowed:`
    text of its one-line error, and its help (d2c-sample's flags and the harness's axes)."""
    return field(default=default, metadata={"stage": stage, "rule": rule, "allowed": allowed, "help": help})


@dataclass(frozen=True)
class SamplerConfig:
    """Every sampling setting, once.  A harness cell is (recipe, sampler), `d2c-sample` has a flag
    per field, and each stage's sampler reads the fields it uses: a new setting is a field here
    and the code of the model that uses it.  None marks a setting that the family does not run
    (`for_family`), so samplers that differ only there are the same sampler."""
    # stage 2: MAR's sampler (Li et al. 2024, sec. 3.4) and its diffusion head
    steps: Optional[int] = _setting(16, STAGE2, int_min(1), "integers >= 1", "MAR iterations")
    cfg: Optional[float] = _setting(
        3.0, BOTH, number(lambda v: v >= 0), "numbers >= 0",
        "classifier-free guidance scale (stage 1's too unless stage1_cfg; MAR-B: 2.9, LlamaGen GPT-B: 2.0)")
    cfg_schedule: Optional[str] = _setting(
        "linear", STAGE2, one_of(CFG_SCHEDULES), ", ".join(CFG_SCHEDULES),
        "stage 2's guidance: linear in the revealed fraction (MAR's) or constant")
    temperature: Optional[float] = _setting(1.0, STAGE2, number(lambda v: v > 0), "numbers > 0",
                                            "the diffusion head's temperature (MAR's tau)")
    diffusion_steps: Optional[int] = _setting(None, STAGE2, or_null(int_min(1)), "integers >= 1 or null",
                                              "respaced reverse steps of the head per token (null: the preset's)")
    diffusion_steps_last: Optional[int] = _setting(
        None, STAGE2, or_null(int_min(1)), "integers >= 1 or null",
        "the head's steps fall linearly to this by the last MAR iteration (DiSA); null: constant")
    head_sampler: Optional[str] = _setting("ddpm", STAGE2, one_of(HEAD_SAMPLERS), ", ".join(HEAD_SAMPLERS),
                                           "the head's reverse process: ddpm (MAR's) or ddim (eta 0)")
    uncond_refresh: Optional[int] = _setting(
        None, STAGE2, or_null(int_min(1)), "integers >= 1 or null",
        "CFG's unconditional half every k MAR iterations, cached between (LazyMAR); null: every one")
    # stage 1: LlamaGen's sampler
    stage1_cfg: Optional[float] = _setting(None, STAGE1, or_null(number(lambda v: v >= 0)),
                                           "numbers >= 0 or null", "stage 1's guidance scale (null: cfg)")
    stage1_cfg_schedule: Optional[str] = _setting(
        "constant", STAGE1, one_of(GPT_CFG_SCHEDULES), ", ".join(GPT_CFG_SCHEDULES),
        "stage 1's guidance: constant (LlamaGen's) or linear in the generated fraction")
    stage1_temperature: Optional[float] = _setting(1.0, STAGE1, number(lambda v: v >= 0),
                                                   "numbers >= 0 (0: greedy)", "stage 1's temperature")
    stage1_top_k: Optional[int] = _setting(0, STAGE1, int_min(0), "integers >= 0 (0: off)",
                                           "stage 1 samples among the k likeliest codes")
    stage1_top_p: Optional[float] = _setting(1.0, STAGE1, number(lambda v: 0 < v <= 1), "numbers in (0, 1]",
                                             "stage 1 samples in the nucleus of this mass (1: off)")
    # both stages
    precision: Optional[str] = _setting("fp32", BOTH, one_of(SAMPLING_PRECISIONS), ", ".join(SAMPLING_PRECISIONS),
                                        "compute dtype of the model forwards (d2c.precision)")
    compile: Optional[bool] = _setting(False, BOTH, boolean, "true, false",
                                       "compile the per-step work, replayed as CUDA graphs on CUDA")

    def __post_init__(self):
        self.check()
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if setting_type(f.name) is float and v is not None:
                object.__setattr__(self, f.name, float(v))   # 2 and 2.0: one value, one cell id

    def check(self, stage1: bool = False, stage2: bool = False) -> None:
        """Every value against its rule; None passes only for a stage that does not run."""
        runs = {STAGE1: stage1, STAGE2: stage2, BOTH: True}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if (v is not None or runs[f.metadata["stage"]]) and not f.metadata["rule"](v):
                raise ValueError(f"{f.name}={v}: allowed: {f.metadata['allowed']}")

    @property
    def stage1_guidance(self) -> float:
        return self.cfg if self.stage1_cfg is None else self.stage1_cfg

    def for_family(self, family) -> SamplerConfig:
        """The settings a family runs, the others None (a Family, or a model name: llamagen has
        no stage 2, mar no stage 1).  Stage 1 alone is guided by `cfg`, so its own scale moves
        there; a stage-1 scale equal to cfg is no scale of its own."""
        stage1, stage2 = stages_of(family)
        out = {f.name: None for f in dataclasses.fields(self) if not runs(f.name, family)}
        if stage1 and not stage2:
            out["cfg"] = self.stage1_guidance
        if stage1 and (not stage2 or self.stage1_cfg == self.cfg):
            out["stage1_cfg"] = None
        return dataclasses.replace(self, **out)


def family_of_models(models: dict) -> str:
    """The family a d2c_sample models dict samples: gpt + mar is d2c, mar alone mar, gpt + vq llamagen."""
    return "d2c" if {"gpt", "mar"} <= set(models) else "mar" if "mar" in models else "llamagen"


def stages_of(family) -> tuple[bool, bool]:
    """(runs stage 1, runs stage 2) of a Family or a model name."""
    if isinstance(family, Family):
        return family.has_stage1, family.has_stage2
    if family not in MODELS:
        raise ValueError(f"model={family!r}; allowed: {', '.join(MODELS)}")
    return family != "mar", family != "llamagen"


def runs(name: str, family) -> bool:
    """Whether a family (or model name) runs the sampler setting `name`."""
    stage1, stage2 = stages_of(family)
    return {STAGE1: stage1, STAGE2: stage2, BOTH: True}[setting_stage(name)]


SAMPLER_KEYS = tuple(f.name for f in dataclasses.fields(SamplerConfig))
SAMPLER_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SamplerConfig)}
SAMPLER_RULES = {f.name: (f.metadata["rule"], f.metadata["allowed"]) for f in dataclasses.fields(SamplerConfig)}


@functools.cache
def setting_type(name: str) -> type:
    """int, float, str or bool: a field's type without its Optional (None marks not run)."""
    hint = typing.get_type_hints(SamplerConfig)[name]
    return next(a for a in typing.get_args(hint) if a is not type(None))


def setting_stage(name: str) -> str:
    return SamplerConfig.__dataclass_fields__[name].metadata["stage"]


def add_sampler_flags(parser: argparse.ArgumentParser) -> None:
    """A flag per SamplerConfig field (`--diffusion-steps-last 8`, `--compile`), its default and
    help from the field; `none` sets an optional one to None."""
    for f in dataclasses.fields(SamplerConfig):
        flag, kind = "--" + f.name.replace("_", "-"), setting_type(f.name)
        help = f"{f.metadata['help']} (default {f.default}; allowed: {f.metadata['allowed']})"
        if kind is bool:
            parser.add_argument(flag, dest=f.name, default=f.default, action=argparse.BooleanOptionalAction, help=help)
        else:
            parser.add_argument(flag, dest=f.name, default=f.default, help=help, metavar=kind.__name__.upper(),
                                type=lambda s, kind=kind: None if s.lower() in ("none", "null") else kind(s))


def sampler_from_args(args: argparse.Namespace) -> SamplerConfig:
    return SamplerConfig(**{k: getattr(args, k) for k in SAMPLER_KEYS})


# ============================================================================ D2C (both)
@dataclass
class SampleResult:
    images: torch.Tensor            # uint8 (B, 3, H, W)
    codes: torch.Tensor | None      # stage-1 codes (B, T), when stage 1 ran
    latents: torch.Tensor | None    # stage-2 latents (B, C, h, w), when stage 2 ran
    timings: dict = field(default_factory=dict)   # seconds: stage1, stage2, decode, total
    nfe: dict = field(default_factory=dict)       # network evaluations per kind
    dtypes: dict = field(default_factory=dict)    # compute dtype per stage that ran: "bf16" | "fp32"


class _Timer:
    """Wall time of a block; waits for queued GPU work so the numbers are honest."""

    def __init__(self, device, out: dict, key: str):
        self.device, self.out, self.key = torch.device(device), out, key

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self):
        self._sync()
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self._sync()
        self.out[self.key] = self.out.get(self.key, 0.0) + time.perf_counter() - self.t0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 in [0, 255], rounding as torchvision's save_image does."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8)


@torch.inference_mode()
def d2c_sample(labels, models: dict, sampler: SamplerConfig = SamplerConfig(), seed: int = 0, *,
               progress: bool = False) -> SampleResult:
    """The two-stage pipeline, and its two baselines by leaving a stage out (`models`' keys):
      D2C       gpt -> codes -> mar(codes) -> latents -> kl.decode
      MAR       mar -> latents -> kl.decode                      (no gpt)
      LlamaGen  gpt -> codes -> vq.decode_codes                  (no mar)
    One generator seeded with `seed` drives both stages, so a seed reproduces a run.  Each stage
    reads its settings from `sampler` (gpt_generate, MAR.sample_tokens).  sampler.precision:
    fp32, bf16, or auto (bf16 for a stage where d2c.precision.sampling_dtype says it is supported
    and faster at the stage's width); model forwards only: logits, the CFG mix, the diffusion
    schedule and step, and the latents stay fp32.  The decoders run fp32.
    """
    unknown = sorted(set(models) - {"gpt", "vq", "mar", "kl"})
    if unknown:
        raise ValueError(f"models: {unknown[0]!r}; allowed: gpt, vq, mar, kl")
    gpt, vq, mar, kl = (models.get(k) for k in ("gpt", "vq", "mar", "kl"))
    if gpt is None and mar is None:
        raise ValueError("d2c_sample needs gpt (stage 1), mar (stage 2), or both")
    if mar is not None and kl is None:
        raise ValueError("stage 2 needs the KL tokenizer (kl=...) to decode latents")
    if mar is None and vq is None:
        raise ValueError("stage 1 alone needs the VQ tokenizer (vq=...) to decode codes")
    sampler.check(stage1=gpt is not None, stage2=mar is not None)
    device = next((mar if mar is not None else gpt).parameters()).device
    labels = torch.as_tensor(labels, device=device, dtype=torch.long)
    gen = torch.Generator(device).manual_seed(seed)
    timings, nfe, dtypes = {}, {}, {}
    codes = latents = None
    t_all = time.perf_counter()
    if gpt is not None:
        dt = sampling_dtype(sampler.precision, device, gpt.config.dim)
        dtypes["stage1"] = DTYPE_NAMES[dt]
        with _Timer(device, timings, "stage1"), autocast_for(dt, device):
            codes, n = gpt_generate(gpt, labels, sampler, generator=gen)
        nfe.update(n)
    if mar is not None:
        use_codes = codes if getattr(mar, "fusion", None) is not None else None
        c = mar.config
        dt = sampling_dtype(sampler.precision, device, min(c.encoder_embed_dim, c.decoder_embed_dim, c.diffloss_w))
        dtypes["stage2"] = DTYPE_NAMES[dt]
        with _Timer(device, timings, "stage2"), autocast_for(dt, device):
            latents, n = mar.sample_tokens(labels, sampler, codes=use_codes, generator=gen, progress=progress)
        nfe.update(n)
    with _Timer(device, timings, "decode"):
        if mar is not None:
            images = kl.decode(latents)
        else:
            h = vq.config.image_size // vq.config.stride
            images = vq.decode_codes(codes.view(codes.shape[0], h, h))
    timings["total"] = time.perf_counter() - t_all
    return SampleResult(to_uint8(images), codes, latents, timings, nfe, dtypes)


def save_grid(images_uint8: torch.Tensor, path, nrow: int = 8):
    """Write a PNG grid of uint8 (B, 3, H, W) images; returns the path."""
    from pathlib import Path

    from PIL import Image
    from torchvision.utils import make_grid

    from d2c.files import atomic_write
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(images_uint8.cpu(), nrow=nrow, padding=2)
    atomic_write(path, lambda f: Image.fromarray(grid.permute(1, 2, 0).numpy()).save(f, format="PNG"))
    return path


def save_sample_grid(images_uint8: torch.Tensor, path):
    """The 10x10 grid of a sampling run: its first 100 images.  Runs sample `balanced_labels`
    (arange % classes), so with 10 classes each column is one class, every class shown."""
    return save_grid(images_uint8[:100], path, nrow=10)
