"""A composed config -> the resolved cell: its sampler, its recipe and its two keys.

    cell_id   = hash of the resolved run config (every axis that changes a result)
    train_key = hash of the training-relevant part only (recipe stages the family needs + data),
                so sweeping the sampler (steps, cfg, temperature, ...) never retrains.

Resolving defaults the fusion per model, sets every setting the cell's family does not run to
null (SamplerConfig.for_family: two cells with two ids never sample the same images), fills the
size presets and fusion knobs from the recipe, and checks a paper-scale cell's files.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from d2c.files import stable_hash
from d2c.cli import one_line
from d2c.config import make_config
from d2c.data.imagefolder import DataConfig, DataError, validate_data_config
from d2c.recipes import PAPER_RECIPES, Pretrained, Recipe, fitted_stages, mar_config, mar_lr, recipe_stages, sized_stage
from d2c.sampling import SAMPLER_KEYS, SamplerConfig

from .schema import (FILE_GROUPS, FILE_KEYS, FILE_SOURCES, FUSION_KNOBS, KNOB_KEYS, NOT_IN_CELL_ID, OFF_VALUES,
                     RESOLVED_KEYS, RULES, ConfigError, RunConfig, check_no_targets, check_results_dir, family_of)

# sampler keys that cells made before their family's null existed hashed at this value though the
# family never ran them (LlamaGen's stage-2 temperature): hashed so still, the cell keeps its id
LEGACY_IN_ID = {"temperature": 1.0}


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


def fitted(c: dict) -> dict:
    """The recipe's stages fitted to the cell's tokenizers and crop (at paper scale)."""
    return fitted_stages(c["recipe"], c["tokenizer.kl_preset"], c["tokenizer.vq_preset"], c["data"].get("image_size"))


def sampler_of(c: dict) -> SamplerConfig:
    """The SamplerConfig of a resolved config."""
    return SamplerConfig(**{k: c[k] for k in SAMPLER_KEYS})


def _stage2_preset(c: dict):
    """The cell's stage-2 MARConfig (mar_model applied) with the knobs at their preset values."""
    stage = sized_stage(fitted(c)["mar"], c["mar_model"])
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


@functools.lru_cache(maxsize=8)
def _image_folder_counts(root: str, stamp: int) -> tuple[int, int]:
    """(classes, images) of an image folder, scanned once per plan (memoised per folder state)."""
    from d2c.data.imagefolder import index_image_folder
    classes, samples = index_image_folder(root)
    return len(classes), len(samples)


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
    stages = fitted(c)
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
    if data.get("name") == "imagefolder" and c["train_epochs"] != 0:   # a cell that trains reads the folder
        root = Path(data["root"]).expanduser().resolve()
        try:
            _image_folder_counts(str(root), root.stat().st_mtime_ns if root.is_dir() else 0)
        except DataError as e:
            raise ConfigError("data.root", data["root"], message=f"data.root={data['root']}: "
                              f"{one_line(e).removeprefix('dataset root ')}") from None
    # what the family does not run: null, so such cells are one cell
    c.update(dataclasses.asdict(sampler_of(c).for_family(c["model"])))
    model = c["model"]
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


def build_recipe(c: dict):
    """The d2c.recipes.Recipe of a resolved config (sizes, training lengths and batch applied)."""
    stages = fitted(c)
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
    preset = preset_values(c)
    cell = {k: v for k, v in c.items() if k not in NOT_IN_CELL_ID and not _at_off_value(k, v, preset)}
    cell.update({k: v for k, v in LEGACY_IN_ID.items() if k in cell and cell[k] is None})
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


