"""The run schema and its rules: what a cell's config may hold, each key's rule and the text of
its one-line error (`<key>=<value>: allowed: ...`), and the checks that keep a sweep inside its
declared results folder and away from arbitrary `_target_` classes.

A cell is (recipe, sampler): the sampling axes are d2c.sampling.SamplerConfig's fields, with
their defaults and rules from there; the rest says what trains (model, sizes, recipe, data,
files) and where and how the cell runs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from d2c.config import FUSIONS, MODELS, PRESETS, Family, preset_kind
from d2c.data.imagefolder import DataConfig
from d2c.recipes import RECIPES
from d2c.results import ADDED_KEYS
from d2c.rules import boolean, int_min, number, or_null
from d2c.sampling import SAMPLER_RULES, SamplerConfig, setting_type

REPO = Path(__file__).resolve().parents[2]
# test hooks: a cell that raises, a job process that dies, a cell that raises when seed % 5 == 0
# (one cell in five of a seed sweep: the load test's failure pattern)
FAULTS = ("raise", "exit", "raise_if_seed_mod5")
# Hydra instantiates `_target_` classes (launcher, sweeper): only ours, Hydra's built-in ones and d2c's
TARGET_PREFIXES = ("d2c.", "hydra_plugins.d2c_ablations.", "hydra._internal.core_plugins.")
RESULT_SUBDIRS = ("records", "grids", "ckpt", "cache", "hydra", "samples", "searches")   # what a sweep writes under results_dir
GPT_PRESETS = tuple(p for p in PRESETS if preset_kind(p) == "gpt")
MAR_PRESETS = tuple(p for p in PRESETS if preset_kind(p) == "mar")
KL_PRESETS = tuple(p for p in PRESETS if preset_kind(p) == "kl")
VQ_PRESETS = tuple(p for p in PRESETS if preset_kind(p) == "vq")
DATA_OPTIONS = ("shapes", "shapes_tiny", "imagefolder")

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
    """recipe=imagenet: the ADM protocol's files (docs/design.md section 3), from local paths."""
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


# the sampling axes: one per SamplerConfig field, its default from there (None marks a setting
# the cell's family does not run, so every one is Optional to Hydra; the rules say where null is allowed)
SamplerAxes = dataclasses.make_dataclass(
    "SamplerAxes", [(f.name, Optional[setting_type(f.name)], dataclasses.field(default=f.default))
                    for f in dataclasses.fields(SamplerConfig)])


@dataclass
class RunConfig(SamplerAxes):
    """One cell of a sweep: the sampler's axes (SamplerAxes), what trains, then where and how it runs."""
    model: str = "d2c"                       # d2c | mar | llamagen
    fusion: FusionAxes = dataclasses.field(default_factory=FusionAxes)   # group: none | cross_attn | qformer
    discrete_model: Optional[str] = None     # stage-1 size preset (gpt_*); None: the recipe's
    mar_model: Optional[str] = None          # stage-2 size preset (mar_*); None: the recipe's
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


def _path(v) -> bool:
    return isinstance(v, str) and bool(v.strip()) and "\0" not in v


def _block_list(v) -> bool:
    return isinstance(v, list) and len(v) > 0 and len(set(v)) == len(v) and all(map(int_min(0), v))


# key -> (rule, the `allowed:` text of its one-line error); resolve() checks in this order
RULES = {
    "model": (lambda v: v in MODELS, ", ".join(MODELS)),
    "recipe": (lambda v: v in RECIPES, ", ".join(RECIPES)),
    "fusion": (or_null(lambda v: v in FUSIONS), ", ".join(FUSIONS)),
    "fusion.num_queries": (or_null(int_min(1)), "integers >= 1 (up to the MAR buffer_size) or null"),
    "fusion.depth": (or_null(int_min(1)), "integers >= 1 or null"),
    "fusion.layers": (or_null(_block_list), "lists of distinct MAR decoder block indices, e.g. [0,2], or null"),
    "fusion.d_fuse": (or_null(int_min(1)), "integers >= 1 (a multiple of the fusion heads) or null"),
    "discrete_model": (or_null(lambda v: v in GPT_PRESETS), ", ".join(GPT_PRESETS) + " (or null: the recipe's)"),
    "mar_model": (or_null(lambda v: v in MAR_PRESETS), ", ".join(MAR_PRESETS) + " (or null: the recipe's)"),
    **SAMPLER_RULES,
    "num_images": (int_min(1), "integers >= 1"),
    "batch_size": (int_min(1), "integers >= 1"),
    "train_steps": (or_null(int_min(1)), "integers >= 1 or null"),
    "train_epochs": (or_null(number(lambda v: v >= 0)), "numbers >= 0 (0: init.* weights as they are) or null"),
    "train_batch_size": (or_null(int_min(1)), "integers >= 1 or null"),
    "accum_steps": (int_min(1), "integers >= 1 (dividing the per-rank batch)"),
    "grad_checkpointing": (boolean, "true, false"),
    "tokenizer.kl": (or_null(_path), "a file path (" + FILE_SOURCES["tokenizer.kl"] + ") or null"),
    "tokenizer.vq": (or_null(_path), "a file path (" + FILE_SOURCES["tokenizer.vq"] + ") or null"),
    "tokenizer.kl_preset": (or_null(lambda v: v in KL_PRESETS), ", ".join(KL_PRESETS) + " (or null: kl_16)"),
    "tokenizer.vq_preset": (or_null(lambda v: v in VQ_PRESETS), ", ".join(VQ_PRESETS) + " (or null: vq_16)"),
    "eval.inception": (or_null(_path), "a file path (" + FILE_SOURCES["eval.inception"] + ") or null"),
    "eval.reference": (or_null(_path), "a file path (" + FILE_SOURCES["eval.reference"] + ") or null"),
    "init.gpt": (or_null(_path), "a file path (" + FILE_SOURCES["init.gpt"] + ") or null"),
    "init.mar": (or_null(_path), "a file path (" + FILE_SOURCES["init.mar"] + ") or null"),
    "threads": (or_null(int_min(1)), "integers >= 1 or null"),
    "seed": (int_min(0), "integers >= 0"),
    "fault": (or_null(lambda v: v in FAULTS), ", ".join(FAULTS) + " or null"),
    "device": (or_null(lambda v: v == "cpu" or str(v).startswith("cuda")), "cpu, cuda, cuda:N or null"),
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

