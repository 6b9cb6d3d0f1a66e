"""The ablation harness behind `ablations/run.py`: typed run config, sweep expansion and
validation, one cell = ensure checkpoints -> sample -> metrics -> one result record.

    cell_id   = hash of the resolved run config (every axis that changes a result)
    train_key = hash of the training-relevant part only (recipe stages the family needs + data),
                so sweeping steps / cfg / temperature / diffusion_steps never retrains.

Records: `d2c.results` (schema v1, one atomic JSON file per cell under <results_dir>/records).
Checkpoints: <results_dir>/ckpt (d2c.pipeline.Pipeline root; stages locked across processes).
Sample grids: <results_dir>/grids/<cell_id>.png.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from d2c.checkpoint import stable_hash
from d2c.cli import one_line
from d2c.config import FUSIONS, MODELS, PRESETS, Family, TrainConfig, make_config, preset_kind
from d2c.data.imagefolder import DataConfig, DataError, validate_data_config
from d2c.precision import SAMPLING_PRECISIONS
from d2c.results import ADDED_KEYS, HEAD_KEYS

REPO = Path(__file__).resolve().parents[1]
ABLATIONS = Path(__file__).resolve().parent
logger = logging.getLogger(__name__)

RECIPES = ("small", "tiny", "imagenet")
PAPER_RECIPES = ("imagenet",)   # tokenizers from public files, an image folder, the ADM metrics
# test hooks: a cell that raises, a job process that dies, a cell that raises when seed % 5 == 0
# (one cell in five of a seed sweep: the load test's failure pattern)
FAULTS = ("raise", "exit", "raise_if_seed_mod5")
# Hydra instantiates `_target_` classes (launcher, sweeper): only ours, Hydra's built-in ones and d2c's
TARGET_PREFIXES = ("d2c.", "hydra_plugins.d2c_ablations.", "hydra._internal.core_plugins.")
RESULT_SUBDIRS = ("records", "grids", "ckpt", "cache", "hydra", "samples")   # what a sweep writes under results_dir
GPT_PRESETS = tuple(p for p in PRESETS if preset_kind(p) == "gpt")
MAR_PRESETS = tuple(p for p in PRESETS if preset_kind(p) == "mar")
KL_PRESETS = tuple(p for p in PRESETS if preset_kind(p) == "kl")
VQ_PRESETS = tuple(p for p in PRESETS if preset_kind(p) == "vq")
DATA_OPTIONS = ("shapes", "shapes_tiny", "imagefolder")

DEFAULT_AXES = ("model", "fusion", "steps")   # axes DEFAULT_SWEEP sets; giving one replaces it
# The embedded-default comparison: what `python ablations/run.py` (no axis given) runs.
DEFAULT_SWEEP = (
    ("model=llamagen",),
    ("model=mar", "steps=16,64"),
    ("model=d2c", "fusion=cross_attn,qformer", "steps=16,64"),
)


# The fusion group's knobs (d2c.config.FusionConfig fields) and the fusion kinds each applies to
FUSION_KNOBS = {"num_queries": ("qformer",), "depth": ("qformer",), "layers": ("cross_attn",),
                "d_fuse": ("cross_attn", "qformer")}
KNOB_KEYS = tuple(f"fusion.{k}" for k in FUSION_KNOBS)   # resolved configs and records: flat keys


@dataclass
class FusionAxes:
    """The `fusion` group: `fusion=qformer` picks the kind, `fusion.num_queries=64` a knob.  A
    knob left null is the recipe's stage-2 preset value; one that does not apply to the kind
    (layers for qformer, num_queries for cross_attn, all for mar/llamagen) resolves to null."""
    kind: Optional[str] = None               # none | cross_attn | qformer (None: qformer for d2c, else none)
    num_queries: Optional[int] = None        # qformer: learned queries (1..MAR buffer_size)
    depth: Optional[int] = None              # qformer: blocks of self-attn + cross-attn + MLP
    layers: Optional[List[int]] = None       # cross_attn: decoder block indices that get a sublayer
    d_fuse: Optional[int] = None             # width of the discrete-token embeddings (and the Q-Former)


@dataclass
class TokenizerFiles:
    """recipe=imagenet: the public tokenizers, loaded from local files (never trained), and the
    presets they load into (strict)."""
    kl: Optional[str] = None                 # MAR's kl16.ckpt
    vq: Optional[str] = None                 # LlamaGen's vq_ds16_c2i.pt
    kl_preset: Optional[str] = None          # None: kl_16
    vq_preset: Optional[str] = None          # None: vq_16


@dataclass
class EvalFiles:
    """recipe=imagenet: the ADM protocol's files (DESIGN.md section 3), from local paths."""
    inception: Optional[str] = None          # torch-fidelity's weights-inception-2015-12-05-6726825d.pth
    reference: Optional[str] = None          # ADM's VIRTUAL_imagenet256_labeled.npz (mu, sigma, arr_0)


@dataclass
class InitFiles:
    """recipe=imagenet: public weights that start a stage.  gpt: LlamaGen's c2i GPT is stage 1 as it
    is (never trained).  mar: a MAR checkpoint starts stage 2 (fusion new and zero-init, the rest
    strict) and fine-tunes for train_epochs; train_epochs=0 samples it as it is."""
    gpt: Optional[str] = None                # e.g. LlamaGen's c2i_B_256.pt
    mar: Optional[str] = None                # e.g. MAR-B's checkpoint-last.pth


# groups of plain fields: `tokenizer.kl=PATH`; flat keys in resolved configs and records
FILE_GROUPS = {"tokenizer": TokenizerFiles, "eval": EvalFiles, "init": InitFiles}
FILE_KEYS = tuple(f"{g}.{f.name}" for g, cls in FILE_GROUPS.items() for f in dataclasses.fields(cls))
# where each public file comes from (the one-line error of a missing or wrong file names it)
FILE_SOURCES = {
    "tokenizer.kl": "MAR's kl16.ckpt (github.com/LTH14/mar, README: pretrained VAE)",
    "tokenizer.vq": "LlamaGen's vq_ds16_c2i.pt (github.com/FoundationVision/LlamaGen, README: VQ-VAE models)",
    "eval.inception": "torch-fidelity's weights-inception-2015-12-05-6726825d.pth "
                      "(github.com/toshas/torch-fidelity/releases/tag/v0.2.0)",
    "eval.reference": "ADM's VIRTUAL_imagenet256_labeled.npz (openai/guided-diffusion, evaluations/README.md)",
    "init.gpt": "a LlamaGen c2i GPT checkpoint, e.g. c2i_B_256.pt (github.com/FoundationVision/LlamaGen, README)",
    "init.mar": "a MAR checkpoint, e.g. MAR-B's checkpoint-last.pth (github.com/LTH14/mar, README)",
}


@dataclass
class RunConfig:
    """One cell of a sweep.  Axes first, then where and how it runs."""
    model: str = "d2c"                       # d2c | mar | llamagen
    fusion: FusionAxes = dataclasses.field(default_factory=FusionAxes)   # group: none | cross_attn | qformer
    discrete_model: Optional[str] = None     # stage-1 size preset (gpt_*); None: the recipe's
    mar_model: Optional[str] = None          # stage-2 size preset (mar_*); None: the recipe's
    steps: int = 16                          # MAR iterations
    diffusion_steps: Optional[int] = None    # respaced DDPM steps of the head; None: the preset's
    diffusion_steps_last: Optional[int] = None   # head steps fall linearly to this by the last MAR
                                                 # iteration (DiSA); None: diffusion_steps throughout
    head_sampler: str = "ddpm"               # the head's reverse process: ddpm (MAR's) | ddim (eta 0)
    uncond_refresh: Optional[int] = None     # CFG's unconditional half every k MAR iterations, cached
                                             # between (LazyMAR's condition cache); None: every one
    precision: str = "fp32"                  # sampling compute dtype: fp32 | bf16 | auto (d2c.precision)
    compile: bool = False                    # the samplers' per-step work compiled / replayed as CUDA
                                             # graphs: the fast path on CUDA (compile time reported apart)
    cfg: float = 3.0                         # classifier-free guidance scale (MAR-B: 2.9, LlamaGen-B: 2.0)
    temperature: float = 1.0
    num_images: Optional[int] = None         # images sampled and measured per cell; None: 200 (the small
                                             # recipe's 15-min CPU budget), 50000 at recipe=imagenet (ADM)
    seed: int = 0                            # sampling seed
    data: DataConfig = MISSING               # group: shapes | shapes_tiny | imagefolder
    recipe: str = "small"                    # training recipe: small (embedded default) | tiny (tests)
                                             # | imagenet (paper scale: MAR's and LlamaGen's recipes)
    tokenizer: TokenizerFiles = dataclasses.field(default_factory=TokenizerFiles)   # recipe=imagenet
    eval: EvalFiles = dataclasses.field(default_factory=EvalFiles)                  # recipe=imagenet
    init: InitFiles = dataclasses.field(default_factory=InitFiles)                  # recipe=imagenet
    train_steps: Optional[int] = None        # replaces every stage's optimizer steps (training-relevant)
    train_epochs: Optional[float] = None     # replaces every stage's epochs (recipe=imagenet)
    train_batch_size: Optional[int] = None   # replaces every stage's global batch (imagenet: MAR's lr
                                             # scales as 1e-4 x batch / 256, LlamaGen's stays 1e-4)
    accum_steps: int = 1                     # micro-batches per rank and step (global batch unchanged)
    grad_checkpointing: bool = False         # recompute MAR's activations in backward (MAR-L/H memory)
    batch_size: int = 100                    # sampling batch
    results_dir: str = "results"             # records/, grids/, ckpt/, cache/
    device: Optional[str] = None             # None: cuda if available, else cpu
    threads: Optional[int] = None            # torch threads (None: torch's default)
    fault: Optional[str] = None              # test hook: raise | exit | raise_if_seed_mod5


KEYS = tuple(f.name for f in dataclasses.fields(RunConfig) if f.name not in FILE_GROUPS)
RESOLVED_KEYS = KEYS + KNOB_KEYS + FILE_KEYS   # a resolved config: `fusion` is the kind, the knobs beside it
NOT_IN_CELL_ID = ("results_dir", "device", "threads", "accum_steps", "grad_checkpointing")   # where / how, not what
# axes added after records existed: at their off value (or null: not applicable) they stay out of
# the cell id, so a new axis never reruns a finished cell (d2c.results reads older records so)
OFF_VALUES = ADDED_KEYS
HEAD_SAMPLERS = ("ddpm", "ddim")


def _int_min(lo: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _number(ok):
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and ok(v)


def _or_null(check):
    return lambda v: v is None or check(v)


def _path(v) -> bool:
    return isinstance(v, str) and bool(v.strip()) and "\0" not in v


def _block_list(v) -> bool:
    return isinstance(v, list) and len(v) > 0 and len(set(v)) == len(v) and all(map(_int_min(0), v))


# key -> (rule, the `allowed:` text of its one-line error); resolve() checks in this order
RULES = {
    "model": (lambda v: v in MODELS, ", ".join(MODELS)),
    "recipe": (lambda v: v in RECIPES, ", ".join(RECIPES)),
    "fusion": (_or_null(lambda v: v in FUSIONS), ", ".join(FUSIONS)),
    "fusion.num_queries": (_or_null(_int_min(1)), "integers >= 1 (up to the MAR buffer_size) or null"),
    "fusion.depth": (_or_null(_int_min(1)), "integers >= 1 or null"),
    "fusion.layers": (_or_null(_block_list), "lists of distinct MAR decoder block indices, e.g. [0,2], or null"),
    "fusion.d_fuse": (_or_null(_int_min(1)), "integers >= 1 (a multiple of the fusion heads) or null"),
    "discrete_model": (_or_null(lambda v: v in GPT_PRESETS), ", ".join(GPT_PRESETS) + " (or null: the recipe's)"),
    "mar_model": (_or_null(lambda v: v in MAR_PRESETS), ", ".join(MAR_PRESETS) + " (or null: the recipe's)"),
    "steps": (_int_min(1), "integers >= 1"),
    "num_images": (_int_min(1), "integers >= 1"),
    "batch_size": (_int_min(1), "integers >= 1"),
    "diffusion_steps": (_or_null(_int_min(1)), "integers >= 1 or null"),
    "diffusion_steps_last": (_or_null(_int_min(1)), "integers >= 1 or null"),
    "head_sampler": (lambda v: v in HEAD_SAMPLERS, ", ".join(HEAD_SAMPLERS)),
    "uncond_refresh": (_or_null(_int_min(1)), "integers >= 1 or null"),
    "precision": (lambda v: v in SAMPLING_PRECISIONS, ", ".join(SAMPLING_PRECISIONS)),
    "compile": (lambda v: isinstance(v, bool), "true, false"),
    "train_steps": (_or_null(_int_min(1)), "integers >= 1 or null"),
    "train_epochs": (_or_null(_number(lambda v: v >= 0)), "numbers >= 0 (0: init.* weights as they are) or null"),
    "train_batch_size": (_or_null(_int_min(1)), "integers >= 1 or null"),
    "accum_steps": (_int_min(1), "integers >= 1 (dividing the per-rank batch)"),
    "grad_checkpointing": (lambda v: isinstance(v, bool), "true, false"),
    "tokenizer.kl": (_or_null(_path), "a file path (" + FILE_SOURCES["tokenizer.kl"] + ") or null"),
    "tokenizer.vq": (_or_null(_path), "a file path (" + FILE_SOURCES["tokenizer.vq"] + ") or null"),
    "tokenizer.kl_preset": (_or_null(lambda v: v in KL_PRESETS), ", ".join(KL_PRESETS) + " (or null: kl_16)"),
    "tokenizer.vq_preset": (_or_null(lambda v: v in VQ_PRESETS), ", ".join(VQ_PRESETS) + " (or null: vq_16)"),
    "eval.inception": (_or_null(_path), "a file path (" + FILE_SOURCES["eval.inception"] + ") or null"),
    "eval.reference": (_or_null(_path), "a file path (" + FILE_SOURCES["eval.reference"] + ") or null"),
    "init.gpt": (_or_null(_path), "a file path (" + FILE_SOURCES["init.gpt"] + ") or null"),
    "init.mar": (_or_null(_path), "a file path (" + FILE_SOURCES["init.mar"] + ") or null"),
    "threads": (_or_null(_int_min(1)), "integers >= 1 or null"),
    "seed": (_int_min(0), "integers >= 0"),
    "cfg": (_number(lambda v: v >= 0), "numbers >= 0"),
    "temperature": (_number(lambda v: v > 0), "numbers > 0"),
    "fault": (_or_null(lambda v: v in FAULTS), ", ".join(FAULTS) + " or null"),
    "device": (_or_null(lambda v: v == "cpu" or str(v).startswith("cuda")), "cpu, cuda, cuda:N or null"),
}


def allowed(key: str) -> str:
    """The allowed values of a key, as the one-line error prints them."""
    if key in RULES:
        return RULES[key][1]
    if key.startswith("data."):
        f = key.split(".", 1)[1]
        return {"name": ", ".join(DataConfig.NAMES), "root": "a folder path",
                "image_size": "integers >= 1 or null", "num_images": "integers >= 1",
                "seed": "integers", "on_bad": "skip, error"}.get(
            f, "fields " + ", ".join(x.name for x in dataclasses.fields(DataConfig)))
    return {
        "data": ", ".join(DATA_OPTIONS), "results_dir": "a folder path",
        "_target_": "classes in " + ", ".join(p + "*" for p in TARGET_PREFIXES),
    }.get(key, "keys " + ", ".join(KEYS) + ", fusion.<knob> (" + ", ".join(FUSION_KNOBS) + "), data.<field>, "
          + ", ".join(FILE_KEYS) + ", hydra/launcher=..., hydra.launcher.<field>")


class ConfigError(ValueError):
    """One line: `<key>=<value>: allowed: ...`."""

    def __init__(self, key, value, why: str | None = None, message: str | None = None):
        self.key, self.value = key, value
        super().__init__(message or f"{key}={value}: {why + '; ' if why else ''}allowed: {allowed(key)}")


def register_configs() -> None:
    """The run schema and the data group (ablations/run.py also registers the Hydra plugins)."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for kind in FUSIONS:
        cs.store(group="fusion", name=kind, node=FusionAxes(kind=kind))
    cs.store(group="data", name="shapes", node=DataConfig())
    cs.store(group="data", name="shapes_tiny", node=DataConfig(num_images=64, seed=5))
    cs.store(group="data", name="imagefolder", node=DataConfig(name="imagefolder"))


# --------------------------------------------------------------------------- resolve + keys


def _fusion_for_model(c: dict) -> None:
    """fusion defaulted per model (d2c: qformer, else none) and checked against it."""
    if c["model"] == "d2c":
        c["fusion"] = c["fusion"] or "qformer"
        if c["fusion"] == "none":
            raise ConfigError("fusion", "none", "model=d2c needs discrete conditioning (fusion=none is model=mar)")
    elif c["fusion"] not in (None, "none"):
        raise ConfigError("fusion", c["fusion"], f"model={c['model']} has no fusion; use model=d2c or fusion=none")
    else:
        c["fusion"] = "none"


# what a size preset (discrete_model, mar_model) takes from the recipe's stage: what the data and
# the tokenizers fix (token grid, latent width, classes, vocabulary); width, depth, head from the preset
SIZE_FIT = {"gpt": ("vocab_size", "block_size", "num_classes"),
            "mar": ("img_size", "vae_stride", "patch_size", "vae_embed_dim", "class_num")}


def sized_stage(stage: TrainConfig, preset: Optional[str]) -> TrainConfig:
    """A recipe's GPT or MAR TrainConfig at the size `preset`, fitted to the recipe's data."""
    if not preset or preset == stage.preset:
        return stage
    base = make_config(stage.preset, **stage.overrides)
    fit = {k: getattr(base, k) for k in SIZE_FIT[stage.stage]}
    if stage.stage == "mar":   # the stage-1 vocabulary the fusion embeds
        fit["fusion"] = {**stage.overrides.get("fusion", {}), "codebook_size": base.fusion.codebook_size}
    return dataclasses.replace(stage, preset=preset, overrides={**stage.overrides, **fit})


def _stage2_preset(c: dict):
    """The cell's stage-2 MARConfig (mar_model applied) with the knobs at their preset values."""
    stage = sized_stage(fitted_stages(c)["mar"], c["mar_model"])
    return stage.preset, make_config(stage.preset, **stage.overrides)


def preset_values(c: dict) -> dict:
    """Axes whose off value is the recipe's preset, at that value: mar_model, and the fusion knobs
    that apply to a D2C cell's kind.  At these values a key stays out of the cell id (the cell
    that omits it, as before the axis existed) and out of `describe`."""
    out = {"mar_model": recipe_stages(c["recipe"])["mar"].preset}
    if c["model"] == "d2c":
        _, mar = _stage2_preset(c)
        for knob, kinds in FUSION_KNOBS.items():
            if c["fusion"] in kinds:
                v = getattr(mar.fusion, knob)
                if knob == "layers":   # null in FusionConfig: a sublayer after every decoder block
                    v = list(range(mar.decoder_depth)) if v is None else sorted(v)
                out[f"fusion.{knob}"] = v
    return out


def fusion_overrides(c: dict, preset: dict | None = None) -> dict:
    """The knobs of a resolved config that differ from the preset (FusionConfig fields): what
    training sees."""
    preset = preset_values(c) if preset is None else preset
    out = {k.split(".", 1)[1]: c[k] for k in KNOB_KEYS if c[k] is not None and c[k] != preset.get(k)}
    if "layers" in out:
        out["layers"] = tuple(out["layers"])
    return out


def _at_off_value(k: str, v, preset: dict) -> bool:
    return (k in OFF_VALUES and v in (OFF_VALUES[k], None)) or (k in preset and v == preset[k])


def _fusion_knobs(c: dict) -> None:
    """Knobs that apply to the cell's fusion kind: the preset's value where null (records say what
    ran); the others null.  The resulting stage-2 config is checked here (num_queries <= buffer_size,
    layer indices < decoder_depth, d_fuse a multiple of the heads), before anything runs."""
    for knob, kinds in FUSION_KNOBS.items():
        key = f"fusion.{knob}"
        if c["fusion"] not in kinds:
            c[key] = None
        elif c[key] is not None and knob == "layers":
            c[key] = sorted(c[key])
    if c["model"] != "d2c":
        return
    values = preset_values(c)
    for key in KNOB_KEYS:
        if key in values and c[key] is None:
            c[key] = values[key]
    preset, mar = _stage2_preset(c)
    try:
        make_config(preset, fusion={**dataclasses.asdict(mar.fusion), "kind": c["fusion"],
                                    **fusion_overrides(c, values)})
    except ValueError as e:
        key, _, rest = str(e).partition("=")
        value, _, why = rest.partition("; ")
        full = key if key.startswith("fusion.") else "fusion"
        raise ConfigError(full, value, message=f"{full}={value}: {why} (stage-2 preset {preset})") from None


@functools.lru_cache(maxsize=64)
def _file_problem(key: str, path: str, preset: Optional[str], overrides: str, stamp: tuple) -> Optional[str]:
    """Why a public file cannot serve as `key` (None: it can), reading as little as it must;
    memoised per file state, so a sweep checks each file once.  overrides: the preset's fitted
    fields, as JSON (hashable)."""
    try:
        if key.startswith(("tokenizer.", "init.")):
            from d2c.checkpoint import check_pretrained
            check_pretrained(preset, path, **json.loads(overrides))
        elif key == "eval.inception":
            from d2c.metrics.fidelity import _check_inception_weights
            _check_inception_weights(path)
        else:
            import numpy as np
            if not path.endswith(".npz"):
                return "not an .npz file"
            with np.load(path) as z:         # lazy: the keys only, never arr_0's images
                missing = [k for k in ("mu", "sigma") if k not in z.files]
            if missing:
                return f"no {' / '.join(missing)} in it (ADM's reference batch holds mu, sigma and arr_0)"
    except ValueError as e:                  # CheckpointError, MetricsError (the key names the file)
        return one_line(e).removeprefix(f"{path}: ")
    except Exception as e:                   # a zip that is not an npz, an unreadable file
        return one_line(e, with_type=True)
    return None


def _paper_files(c: dict) -> None:
    """recipe=imagenet: an image folder and the files the cell needs, each checked before anything
    runs (missing or wrong: one line naming the key, the file and where it comes from); the
    presets at their defaults.  Other recipes train their tokenizers: no file keys."""
    if c["recipe"] not in PAPER_RECIPES:
        if c["train_epochs"] == 0:
            raise ConfigError("train_epochs", 0, f"0 epochs trains nothing; only recipe={','.join(PAPER_RECIPES)} "
                                                 "with init.gpt / init.mar starts from weights")
        for k in FILE_KEYS:
            if c[k] is not None:
                raise ConfigError(k, c[k], f"only recipe={','.join(PAPER_RECIPES)} loads files (the small and tiny "
                                           "recipes train their tokenizers and measure with the embedded nets)")
        return
    if c["data"].get("name") != "imagefolder":
        raise ConfigError("recipe", c["recipe"], message=f"recipe={c['recipe']}: needs data=imagefolder "
                                                         "data.root=<the ImageNet train folder>")
    c["tokenizer.kl_preset"] = c["tokenizer.kl_preset"] or "kl_16"
    c["tokenizer.vq_preset"] = c["tokenizer.vq_preset"] or "vq_16"
    fam = family_of(c)
    if not fam.has_stage1:       # weights of a stage the family lacks: not applicable (one cell)
        c["init.gpt"] = None
    if not fam.has_stage2:
        c["init.mar"] = None
    if c["train_epochs"] == 0:
        for key, has in (("init.gpt", fam.has_stage1), ("init.mar", fam.has_stage2)):
            if has and c[key] is None:
                raise ConfigError("train_epochs", 0, f"0 epochs trains nothing: model={c['model']} needs {key}=<file>")
    stages = fitted_stages(c)
    fits = {"tokenizer.kl": (c["tokenizer.kl_preset"], {}), "tokenizer.vq": (c["tokenizer.vq_preset"], {}),
            "eval.inception": (None, {}), "eval.reference": (None, {})}
    for key, stage, size in (("init.gpt", "gpt", "discrete_model"), ("init.mar", "mar", "mar_model")):
        if c[key] is not None:   # the file's model: the cell's size preset fitted to the recipe, no fusion
            st = sized_stage(stages[stage], c[size])
            ov = {**st.overrides, **({"fusion": {**st.overrides.get("fusion", {}), "kind": "none"}}
                                     if stage == "mar" else {})}
            fits[key] = (st.preset, ov)
    needed = {"tokenizer.kl": fam.has_stage2, "tokenizer.vq": fam.has_stage1, "eval.inception": True,
              "eval.reference": True, "init.gpt": False, "init.mar": False}
    for key, need in needed.items():
        if c[key] is None:
            if need:
                raise ConfigError(key, None, message=f"{key}=null: recipe={c['recipe']} model={c['model']} needs "
                                                     f"it: {key}=<path to {FILE_SOURCES[key]}>")
            continue
        path = Path(c[key]).expanduser().resolve()
        c[key] = str(path)
        try:
            st = path.stat()
            stamp = (st.st_size, st.st_mtime_ns)
        except OSError:
            raise ConfigError(key, c[key], message=f"{key}={c[key]}: no such file; get {FILE_SOURCES[key]}") from None
        preset, overrides = fits[key]
        why = _file_problem(key, c[key], preset, json.dumps(overrides, sort_keys=True, default=list), stamp)
        if why:
            raise ConfigError(key, c[key], message=f"{key}={c[key]}: {why} (expected {FILE_SOURCES[key]}"
                                                   + (f", loading into {preset})" if preset else ")"))
    size = c["data"].get("image_size") or 256
    strides = {k: make_config(c[f"tokenizer.{k}_preset"]).stride for k in ("kl", "vq")}
    for k, stride in strides.items():
        if size % stride:
            raise ConfigError("data.image_size", size, f"not a multiple of the {c[f'tokenizer.{k}_preset']} "
                                                       f"stride {stride}")
    if c["model"] == "d2c" and strides["kl"] * make_config(recipe_stages(c["recipe"])["mar"].preset).patch_size \
            != strides["vq"]:
        raise ConfigError("tokenizer.vq_preset", c["tokenizer.vq_preset"],
                          f"D2C needs the two token grids aligned: VQ stride {strides['vq']} vs KL stride {strides['kl']}")


def resolve(config) -> dict:
    """Check a composed config (DictConfig or dict) and return the resolved run config: fusion
    defaulted per model, axes that do not apply to a model set to null.  Raises ConfigError."""
    if isinstance(config, DictConfig):
        config = OmegaConf.masked_copy(config, [k for k in config.keys() if k != "hydra"])
        c = OmegaConf.to_container(config, resolve=True)
    else:
        c = dict(config)
    c.pop("hydra", None)
    check_no_targets(c)
    if isinstance(c.get("fusion"), dict):   # the composed group -> the kind and flat knob keys
        fu = c.pop("fusion")
        unknown = sorted(set(fu) - {"kind", *FUSION_KNOBS})
        if unknown:
            raise ConfigError(f"fusion.{unknown[0]}", fu[unknown[0]], "unknown key")
        c.update({"fusion": fu.get("kind"), **{f"fusion.{k}": fu.get(k) for k in FUSION_KNOBS}})
    for group, cls in FILE_GROUPS.items():   # tokenizer.kl, eval.reference, ...
        if isinstance(c.get(group), dict):
            fields = c.pop(group)
            unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
            if unknown:
                raise ConfigError(f"{group}.{unknown[0]}", fields[unknown[0]], "unknown key")
            c.update({f"{group}.{k}": v for k, v in fields.items()})
    unknown = sorted(set(c) - set(RESOLVED_KEYS))
    if unknown:
        raise ConfigError(unknown[0], c[unknown[0]], "unknown key")
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)
                if f.name not in ("data", "fusion", *FILE_GROUPS)}
    c = {**defaults, "fusion": None, **dict.fromkeys(KNOB_KEYS), **dict.fromkeys(FILE_KEYS), **c}
    if c["num_images"] is None:   # the protocol's count at paper scale: 50 a class (ADM, MAR, LlamaGen)
        c["num_images"] = 50_000 if c["recipe"] in PAPER_RECIPES else 200
    for key, (ok, _) in RULES.items():
        if not ok(c[key]):
            raise ConfigError(key, c[key])
        if key == "fusion":
            _fusion_for_model(c)
    data = c.get("data")
    if not isinstance(data, dict):
        raise ConfigError("data", data)
    try:
        validate_data_config(DataConfig(**data))
    except DataError as e:
        key = str(e).split("=", 1)[0].split()[0]
        raise ConfigError(key, None, message=str(e)) from None
    c["cfg"], c["temperature"] = float(c["cfg"]), float(c["temperature"])
    # axes that do not apply to a model: null, so such cells are one cell
    model = c["model"]
    if model == "llamagen":
        for k in ("steps", "diffusion_steps") + HEAD_KEYS:
            c[k] = None
    if model == "mar":
        c["discrete_model"] = None
    elif c["discrete_model"] is None:
        c["discrete_model"] = recipe_stages(c["recipe"])["gpt"].preset
    if model == "llamagen":
        c["mar_model"] = None
    elif c["mar_model"] is None:
        c["mar_model"] = recipe_stages(c["recipe"])["mar"].preset
    _paper_files(c)
    _fusion_knobs(c)
    c["results_dir"] = str(check_results_dir(c["results_dir"]).resolve())
    return c


# --------------------------------------------------------------------------- security checks


def check_no_targets(node, where: str = "") -> None:
    """A cell config never instantiates anything: a `_target_` anywhere in it is refused (the
    typed schema has none; one there came from a crafted config or override)."""
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{where}.{k}" if where else str(k)
            if k == "_target_":
                raise ConfigError(key, v, message=f"{key}={v}: a run config instantiates nothing; "
                                                  "_target_ keys are not allowed")
            check_no_targets(v, key)
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            check_no_targets(v, f"{where}[{i}]")


def check_target(key: str, target) -> None:
    """Hydra instantiates the launcher / sweeper from their `_target_`: only classes of d2c, of
    this harness's plugin and Hydra's own core plugins (basic launcher / sweeper)."""
    if not isinstance(target, str) or not target.startswith(TARGET_PREFIXES):
        raise ConfigError("_target_", target, message=f"{key}={target}: refusing to instantiate it; "
                                                       f"allowed: {allowed('_target_')}")


def check_results_dir(value) -> Path:
    """results_dir without '..' components: it is the declared root of everything a sweep writes,
    so it must say where it is (an absolute path is fine), not climb out of somewhere else."""
    raw = str(value)
    if not raw.strip() or "\0" in raw:
        raise ConfigError("results_dir", value, "empty or not a path")
    if ".." in Path(raw).parts:
        raise ConfigError("results_dir", value, "'..' components are not allowed (they can point outside "
                                                "the declared root); give the folder itself, e.g. an absolute path")
    return Path(raw).expanduser()


def check_results_tree(results_dir) -> None:
    """Before anything runs: every folder the sweep writes under results_dir is a real folder
    inside it (a symlink there, e.g. records -> /tmp/elsewhere, is refused: one line, exit 2)."""
    from d2c.results import RecordError, safe_subdir
    for name in RESULT_SUBDIRS:
        try:
            safe_subdir(results_dir, name, create=False)
        except RecordError as e:
            raise ConfigError("results_dir", results_dir, message=f"results_dir={results_dir}: {e}") from None


def family_of(c: dict) -> Family:
    return Family(c["model"], c["fusion"])


def _tiny_stages() -> dict:
    common = dict(batch_size=16, train_steps=3, lr=1e-3, warmup_steps=1, ema_decay=0.5, progress=False,
                  tensorboard=False, precision="fp32", scale_batches=2, ckpt_every=5, log_every=5)
    return {"kl": TrainConfig(stage="kl", preset="kl_tiny", **common),
            "vq": TrainConfig(stage="vq", preset="vq_tiny", **common),
            "gpt": TrainConfig(stage="gpt", preset="gpt_tiny", **common),
            "mar": TrainConfig(stage="mar", preset="mar_tiny", **common)}


def _imagenet_stages() -> dict:
    """The published recipes (DESIGN.md section 3), in epochs.  Stage 2, MAR's: AdamW (0.9, 0.95),
    wd 0.02, lr 1e-4 x batch / 256 at MAR's global batch 2048 (64 a GPU on 32 GPUs in its README),
    100 warmup epochs then constant, clip 3.0, EMA 0.9999, bf16, 400 epochs.  Stage 1, LlamaGen's
    GPT: lr 1e-4 constant, wd 0.05, betas (0.9, 0.95), batch 256, clip 1.0, bf16, 300 epochs, no
    EMA (decay 0: the EMA copy is the weights).  Both presets carry the 0.1 label / token dropout."""
    common = dict(precision="bf16", ckpt_every=2000, log_every=100)
    return {"gpt": TrainConfig(stage="gpt", preset="gpt_b", batch_size=256, lr=1e-4, weight_decay=0.05,
                               grad_clip=1.0, ema_decay=0.0, train_epochs=300, warmup_epochs=0, **common),
            "mar": TrainConfig(stage="mar", preset="mar_base", batch_size=2048, lr=mar_lr(2048),
                               weight_decay=0.02, grad_clip=3.0, ema_decay=0.9999, train_epochs=400,
                               warmup_epochs=100, **common)}


def mar_lr(batch: int) -> float:
    """MAR's learning-rate rule: base 1e-4 per 256 images of global batch."""
    return 1e-4 * batch / 256


def recipe_stages(name: str) -> dict:
    from d2c.pipeline import _default_stages
    return {"small": _default_stages, "tiny": _tiny_stages, "imagenet": _imagenet_stages}[name]()


def tokenizer_fit(c: dict) -> dict:
    """recipe=imagenet: what the tokenizer presets and the crop size fix in each stage (token grid,
    vocabulary, latent width); classes stay the presets' 1000."""
    kl, vq = make_config(c["tokenizer.kl_preset"]), make_config(c["tokenizer.vq_preset"])
    size = c["data"].get("image_size") or 256
    return {"gpt": {"vocab_size": vq.codebook_size, "block_size": (size // vq.stride) ** 2},
            "mar": {"img_size": size, "vae_stride": kl.stride, "vae_embed_dim": kl.embed_dim,
                    "fusion": {"codebook_size": vq.codebook_size}}}


def fitted_stages(c: dict) -> dict:
    """The recipe's stages, fitted to the cell's tokenizers at paper scale."""
    stages = recipe_stages(c["recipe"])
    if c["recipe"] in PAPER_RECIPES:
        for name, fit in tokenizer_fit(c).items():
            st = stages[name]
            fusion = {**st.overrides.get("fusion", {}), **fit.pop("fusion", {})}
            stages[name] = dataclasses.replace(st, overrides={**st.overrides, **fit, **({"fusion": fusion} if fusion else {})})
    return stages


def build_recipe(c: dict):
    """The d2c.pipeline.Recipe of a resolved config (sizes, training lengths and batch applied)."""
    from d2c.pipeline import Pretrained, Recipe
    stages = fitted_stages(c)
    paper = c["recipe"] in PAPER_RECIPES
    for k, v in list(stages.items()):
        if c["train_steps"] is not None:       # steps win over the recipe's epochs
            v = dataclasses.replace(v, train_steps=c["train_steps"], train_epochs=None, warmup_epochs=None,
                                    warmup_steps=min(v.warmup_steps, c["train_steps"]))
        elif c["train_epochs"] is not None:
            w = v.warmup_epochs
            v = dataclasses.replace(v, train_epochs=c["train_epochs"],
                                    warmup_epochs=None if w is None else min(w, c["train_epochs"]))
        if c["train_batch_size"] is not None:
            lr = mar_lr(c["train_batch_size"]) if paper and v.stage == "mar" else v.lr
            v = dataclasses.replace(v, batch_size=c["train_batch_size"], lr=lr)
        stages[k] = dataclasses.replace(v, accum_steps=c["accum_steps"], grad_checkpointing=c["grad_checkpointing"])
    stages["gpt"] = sized_stage(stages["gpt"], c["discrete_model"])
    for name in ("mar_trunk", "mar"):
        if name in stages:
            stages[name] = sized_stage(stages[name], c["mar_model"])
    knobs = fusion_overrides(c)
    if knobs:   # the fine-tuned stage only: the shared plain-MAR trunk has no fusion
        mar = stages["mar"]
        fusion = {**mar.overrides.get("fusion", {}), **knobs}
        stages["mar"] = dataclasses.replace(mar, overrides={**mar.overrides, "fusion": fusion})
    pretrained = {k: Pretrained(c[f"tokenizer.{k}_preset"], c[f"tokenizer.{k}"])
                  for k in ("kl", "vq") if c[f"tokenizer.{k}"] is not None}
    init = {k: c[f"init.{k}"] for k in ("gpt", "mar") if c[f"init.{k}"] is not None}
    return Recipe(data=DataConfig(**c["data"]), stages=stages, pretrained=pretrained, init=init)


def keys(c: dict) -> tuple[str, str]:
    """(cell_id, train_key) of a resolved config."""
    from d2c.pipeline import mar_config
    preset = preset_values(c)
    cell = {k: v for k, v in c.items() if k not in NOT_IN_CELL_ID and not _at_off_value(k, v, preset)}
    recipe = build_recipe(c)
    fam = family_of(c)
    # every recipe stage the family depends on (gpt: llamagen and d2c; mar*: mar and d2c, incl.
    # an optional shared `mar_trunk`); the family's stage 2 with its fusion kind
    train = {s: config.identity() for s, config in recipe.stages.items()
             if (fam.has_stage1 or s != "gpt") and (fam.has_stage2 or not s.startswith("mar"))}
    if fam.has_stage2:
        train["stage2"] = mar_config(recipe, fam).identity()
    train["data"] = dataclasses.asdict(recipe.data)
    if recipe.pretrained:   # the files by path (the stage folders' keys hash their weights)
        train["pretrained"] = {k: dataclasses.asdict(p) for k, p in recipe.pretrained.items()}
    if recipe.init:
        train["init"] = recipe.init
    # what the stage folders' keys also hash (d2c.pipeline): the resolved model configs (a preset
    # edited in code) and the generator version of the embedded data (an image folder's files are
    # not scanned here: a changed folder needs a new data.root or results_dir)
    configs = {s: recipe.stages[s] for s in train if s in recipe.stages}
    if fam.has_stage2:
        configs["stage2"] = mar_config(recipe, fam)
    train["models"] = {s: dataclasses.asdict(make_config(config.preset, **config.overrides))
                       for s, config in configs.items()}
    if recipe.data.name == "shapes":
        from d2c.data.shapes import VERSION
        train["shapes_version"] = VERSION
    return stable_hash(cell), stable_hash(train)


def describe(c: dict) -> str:
    parts = [f"model={c['model']}"]
    if c["model"] == "d2c":
        parts.append(f"fusion={c['fusion']}")
    if c["steps"] is not None:
        parts.append(f"steps={c['steps']}")
    off = {**preset_values(c), "diffusion_steps": None, "cfg": 1.0, "temperature": 1.0, "seed": 0}
    for k in ("diffusion_steps", *OFF_VALUES, "cfg", "temperature", "seed"):
        if c[k] is not None and not _at_off_value(k, c[k], off):
            parts.append(f"{k}={c[k]}".replace(" ", ""))   # fusion.layers=[0,2]: one word
    return " ".join(parts)


# --------------------------------------------------------------------------- overrides -> cells

SWEEP_KEYS = set(KEYS) | {"data"} | set(FILE_GROUPS)


def _override_error(raw: str, e: Exception) -> ConfigError:
    key, _, value = raw.partition("=")
    return ConfigError(key.lstrip("+~") or raw, value, "not a valid override")


def parse(args: list[str]):
    """Hydra override objects of the command line; syntax errors -> ConfigError."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    parser = OverridesParser.create()
    out = []
    for a in args:
        try:
            out.extend(parser.parse_overrides([a]))
        except Exception as e:  # hydra's OverrideParseException and friends
            raise _override_error(a, e) from None
    return out


def check_keys(overrides) -> None:
    """Only known keys (no '+' appends, no deletes) before Hydra sees anything."""
    for o in overrides:
        key = o.get_key_element()
        raw = o.input_line
        value = raw.partition("=")[2]
        if key.startswith("hydra"):
            continue
        base = key.split(".", 1)[0]
        if o.is_add() or o.is_force_add() or o.is_delete():
            raise ConfigError(key.lstrip("+~"), value, "appending or deleting keys is not supported")
        if base not in SWEEP_KEYS or ("." in key and base not in ("data", "fusion", *FILE_GROUPS)) \
                or (base in FILE_GROUPS and key not in FILE_KEYS):
            raise ConfigError(key, value, "unknown key")
        if base == "fusion" and "." in key and key.split(".", 1)[1] not in FUSION_KNOBS:
            raise ConfigError(key, value, "unknown key")
        if key == "fusion":   # the group's options (leave fusion out for the per-model default)
            vals = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
            for v in vals:
                if v not in FUSIONS:
                    raise ConfigError("fusion", v)
        if base == "data" and "." in key:
            f = key.split(".", 1)[1]
            if f not in {x.name for x in dataclasses.fields(DataConfig)}:
                raise ConfigError(key, value, "unknown key")
        if key == "data":
            vals = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
            for v in vals:
                if v not in DATA_OPTIONS:
                    raise ConfigError("data", v)
        if o.is_sweep_override() and not o.is_discrete_sweep():
            raise ConfigError(key, value, "only comma lists, range() and choice() sweeps")


def task_args(args: list[str]) -> list[str]:
    """The non-hydra overrides (what Hydra calls the task overrides)."""
    return [o.input_line for o in parse(args) if not o.get_key_element().startswith("hydra")]


def expand(args: list[str]) -> list[list[str]]:
    """Override lists of every cell: the cross product of the sweep overrides, or, when no axis is
    given, the embedded-default comparison (DEFAULT_SWEEP) under the other overrides.
    (`run.py cfg=2 num_images=200` is the default comparison at cfg 2 with 200 images.)"""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    overrides = parse(task_args(args))
    check_keys(overrides)
    given = {o.get_key_element() for o in overrides}   # a fusion knob alone keeps the default sweep
    groups = [()] if given & set(DEFAULT_AXES) else DEFAULT_SWEEP
    cells = []
    for g in groups:
        ovs = parse(list(g)) + overrides
        cells.extend(BasicSweeper.split_arguments(ovs, None)[0])
    return cells


def compose_cell(overrides: list[str], loader=None, master=None):
    """Compose one cell's config (Hydra's own rules) and resolve it; errors -> ConfigError."""
    try:
        if loader is not None:
            config = loader.load_sweep_config(master, list(overrides))
        else:
            from hydra import compose
            config = compose(config_name="config", overrides=list(overrides))
    except ConfigError:
        raise
    except Exception as e:
        raise hydra_error(e, overrides) from None
    return resolve(config)


def hydra_error(e: Exception, overrides) -> ConfigError:
    """Turn Hydra / OmegaConf's multi-line errors into the one line."""
    import re
    msg = f"{e}\n{e.__cause__ or ''}"
    m = re.search(r"full_key: ([\w.]+)", msg) or re.search(r"override '([^']+)'", msg) \
        or re.search(r"Could not find '([\w/]+)/", msg) or re.search(r"Key '([\w.]+)'", msg)
    key = m.group(1) if m else None
    if key is None:
        return ConfigError("config", "?", msg.strip().splitlines()[0])
    if not key.startswith("hydra"):
        key = key.replace("/", ".")
    value = next((o.partition("=")[2] for o in overrides if o.partition("=")[0].lstrip("+~") in (key, key.replace(".", "/"))), "?")
    if key.startswith("hydra"):
        opts = re.findall(r"^\t(\S+)$", msg, re.M)
        if opts:
            return ConfigError(key, value, message=f"{key}={value}: allowed: {', '.join(opts)}")
        return ConfigError(key, value, message=f"{key}={value}: not a field of the selected launcher "
                                               "(SLURM fields need hydra/launcher=submitit_slurm or a slurm/conf preset); "
                                               f"hydra says: {msg.strip().splitlines()[0]}")
    return ConfigError(key, value)


def plan(args: list[str], loader=None, master=None) -> list[dict]:
    """Every cell of a command line, composed, resolved and keyed; duplicates merged.
    Raises ConfigError on the first bad cell (before anything runs)."""
    out, seen = [], set()
    for ovs in expand(args):
        c = compose_cell(ovs, loader, master)
        cell_id, train_key = keys(c)
        if cell_id in seen:
            continue
        seen.add(cell_id)
        out.append({"overrides": list(ovs), "config": c, "cell_id": cell_id, "train_key": train_key})
    return out


# --------------------------------------------------------------------------- one cell


def record_env() -> dict:
    """Where a record was made: hardware, package versions, git commit (the same for every cell
    a process writes)."""
    from d2c.metrics import hardware_info
    from d2c.results import git_commit, versions
    return {"hardware": hardware_info(), "versions": versions(), "git_commit": git_commit(REPO)}


def base_record(c: dict, cell_id: str, train_key: str, env: dict | None = None) -> dict:
    from d2c.results import SCHEMA_VERSION
    return {"schema": SCHEMA_VERSION, "cell_id": cell_id, "train_key": train_key, "status": "failed",
            "error": None, "family": family_of(c).name, "config": c, "metrics": {}, "speed": {},
            "train_seconds": {}, **(env or record_env()), "seed": c["seed"], "grid": None}


def _distributed() -> tuple[int, int]:
    """(rank, world): exports submitit's torch.distributed variables inside a multi-task job."""
    try:
        import submitit
        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    except Exception:
        pass
    from d2c.distributed import dist_env
    rank, world, _ = dist_env()
    return rank, world


def open_pipeline(c: dict, world: int):
    """The cell's d2c.pipeline.Pipeline, with every rank of a multi-rank job in the process group
    before the first stage (see pipeline._stage_lock)."""
    import torch
    from d2c.pipeline import Pipeline
    if c["threads"]:
        torch.set_num_threads(c["threads"])
    pipe = Pipeline(build_recipe(c), root=c["results_dir"], device=c["device"])
    if world > 1:
        from d2c.distributed import init_distributed
        import torch.distributed as dist
        init_distributed(pipe.device)
        dist.barrier()
    return pipe


PREPARE = ("cache", "train")   # run.py --cache-only / --train-only (d2c-train): a cell's first steps


def prepare_cell(c: dict, what: str) -> list[str]:
    """Only the token cache (`cache`: the tokenizers, trained or loaded, and the cache of the
    data) or everything the cell's family trains (`train`), in this process; every rank of a
    torchrun / srun job takes part (cache shards, DDP).  Returns the folders it made or found."""
    rank, world = _distributed()
    pipe = open_pipeline(c, world)
    if what == "cache":
        cache = pipe.cache()
        return [str(d) for d in pipe._dirs.values()] + [str(cache.path)]
    pipe.models(family_of(c))
    return [str(d) for d in pipe._dirs.values()]


def run_cell(c: dict, cell_id: str, train_key: str) -> dict:
    """ensure checkpoints -> sample -> metrics -> record; a failure becomes a failed record.
    Returns the record (rank 0) or {} (other ranks of a multi-task job)."""
    from d2c.results import is_finished, now_iso, read_record, record_path, write_record
    results = Path(c["results_dir"])
    if is_finished(results, cell_id, train_key):
        return read_record(record_path(results, cell_id))
    rank, world = _distributed()
    rec = base_record(c, cell_id, train_key)
    rec["started_at"] = now_iso()
    t0 = time.perf_counter()
    try:
        from d2c.pipeline import evaluate
        from d2c.sampling import save_sample_grid
        if c["fault"] == "exit":
            os._exit(17)        # a job that dies without a record (tests the launcher's reporting)
        if c["fault"] == "raise" or (c["fault"] == "raise_if_seed_mod5" and c["seed"] % 5 == 0):
            raise RuntimeError(f"fault injected by fault={c['fault']}")
        pipe = open_pipeline(c, world)
        fam = family_of(c)
        pipe.models(fam)                      # trains / resumes / reuses (all ranks under DDP)
        sampler = dict(steps=c["steps"], num_images=c["num_images"], batch_size=c["batch_size"], cfg=c["cfg"],
                       temperature=c["temperature"], diffusion_steps=c["diffusion_steps"],
                       diffusion_steps_last=c["diffusion_steps_last"], head_sampler=c["head_sampler"],
                       uncond_refresh=c["uncond_refresh"], precision=c["precision"], compile=c["compile"],
                       seed=c["seed"], progress=False)
        from d2c.results import check_cell_id, safe_subdir
        if c["recipe"] in PAPER_RECIPES:      # the ADM protocol: every rank samples its batches
            from d2c.pipeline import evaluate_adm
            r = evaluate_adm(pipe, fam, safe_subdir(results, "samples") / check_cell_id(cell_id),
                             inception=c["eval.inception"], reference=c["eval.reference"], **sampler)
        elif rank == 0:
            r = evaluate(pipe, fam, **sampler)
        if rank != 0:
            return {}
        imgs = r["images"]
        grid = safe_subdir(results, "grids") / f"{check_cell_id(cell_id)}.png"
        save_sample_grid(imgs, grid)
        rec.update(status="ok", metrics={k: float(v) for k, v in r["metrics"].items()}, speed=r["speed"],
                   grid=str(grid.relative_to(results)))
        rec["train_seconds"] = dict(pipe.timings)
    except Exception as e:  # noqa: BLE001 - every failure becomes the cell's record
        if rank != 0:
            raise
        rec.update(status="failed", error=one_line(e, with_type=True)[:500])
        logger.exception(f"cell {cell_id} failed")
    rec["finished_at"] = now_iso()
    rec["seconds"] = time.perf_counter() - t0
    write_record(results, rec)
    return rec


def failed_record(cell: dict, error: str, env: dict | None = None) -> dict:
    """The record of a cell whose job died without writing one (the sweep writes it)."""
    from d2c.results import now_iso
    rec = base_record(cell["config"], cell["cell_id"], cell["train_key"], env)
    rec.update(error=error[:500], started_at=None, finished_at=now_iso())
    return rec


# --------------------------------------------------------------------------- the summary


# axes shown in the summary only when they differ between its cells
SUMMARY_IF_VARIED = ("discrete_model", "diffusion_steps", *OFF_VALUES, "num_images", "seed")
INT_COLUMNS = ("steps", "diffusion_steps", "diffusion_steps_last", "uncond_refresh", "num_images", "seed",
               "fusion.num_queries", "fusion.depth", "fusion.d_fuse")


def summary_table(records: list[dict]):
    import pandas as pd
    configs = [r.get("config", {}) for r in records]
    # null = the axis does not apply (llamagen's head, mar's stage 1): not a second value
    varied = [k for k in SUMMARY_IF_VARIED if len({repr(c.get(k)) for c in configs if c.get(k) is not None}) > 1]
    rows = []
    for r, c in zip(records, configs):
        m, s = r.get("metrics") or {}, r.get("speed") or {}
        rows.append({"cell": r["cell_id"][:8], "family": r["family"], "steps": c.get("steps"),
                     **{k: c.get(k) for k in varied},
                     "cfg": c.get("cfg"), "temp": c.get("temperature"), "status": r["status"],
                     "fid": m.get("fid"), "fid_detail": m.get("fid_detail"), "is": m.get("is_mean"),
                     "acc": m.get("class_accuracy"),
                     "img/s": s.get("images_per_second"), "error": r.get("error") or ""})
    df = pd.DataFrame(rows)
    for k in INT_COLUMNS:
        if k in df:
            df[k] = df[k].astype("Int64")
    return df


def print_summary(cells: list[dict], results_dir, out=sys.stdout) -> int:
    """Table of this sweep's cells from the store; returns the number of failed/missing cells."""
    from d2c.results import read_record, record_path, RecordError
    import pandas as pd
    recs, bad = [], 0
    for cell in cells:
        try:
            rec = read_record(record_path(cell["config"]["results_dir"], cell["cell_id"]))
        except RecordError:
            rec = {**failed_record(cell, "no record (job lost)")}
        bad += rec["status"] != "ok"
        recs.append(rec)
    df = summary_table(recs)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 70,
                           "display.float_format", "{:.3f}".format):
        print(df.to_string(index=False), file=out)
    ok = len(recs) - bad
    results_dir = Path(results_dir)
    for cell, rec in zip(cells, recs):   # every failure on its own line, with its axes and error
        if rec["status"] != "ok":
            print(f"failed: {cell['cell_id'][:8]} {describe(cell['config'])}: {rec.get('error') or ''}", file=out)
    print(f"{ok} ok, {bad} failed of {len(recs)} cells; records: {results_dir / 'records'}  "
          f"grids: {results_dir / 'grids'}  (schema: core/d2c/results.py)", file=out, flush=True)
    return bad
