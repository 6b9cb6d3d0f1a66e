"""A command line's overrides -> the plan: every cell composed by Hydra's own rules, resolved
and keyed before anything runs (the first bad cell raises ConfigError: one line, exit 2)."""
from __future__ import annotations

import dataclasses

from d2c.config import FUSIONS
from d2c.data.imagefolder import DataConfig

from .resolved import keys, resolve
from .schema import DATA_OPTIONS, FILE_GROUPS, FILE_KEYS, FUSION_KNOBS, KEYS, ConfigError

DEFAULT_AXES = ("model", "fusion", "steps")   # axes DEFAULT_SWEEP sets; giving one replaces it
# The embedded-default comparison: what `python ablations/run.py` (no axis given) runs.
DEFAULT_SWEEP = (
    ("model=llamagen",),
    ("model=mar", "steps=16,64"),
    ("model=d2c", "fusion=cross_attn,qformer", "steps=16,64"),
)
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
    (`run.py cfg=2 num_images=200` is the default comparison at cfg 2 with 200 images.)
    Across a sweep of several models the fusion group and its knobs apply to the D2C cells only
    (`model=mar,d2c fusion=cross_attn`: MAR, and D2C with cross-attention); a single non-D2C
    model with a fusion is an error (resolve)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    overrides = parse(task_args(args))
    check_keys(overrides)
    given = {o.get_key_element() for o in overrides}   # a fusion knob alone keeps the default sweep
    groups = [()] if given & set(DEFAULT_AXES) else DEFAULT_SWEEP
    models_swept = any(o.get_key_element() == "model" and o.is_sweep_override() for o in overrides)
    cells = []
    for g in groups:
        ovs = parse(list(g)) + overrides
        for cell in BasicSweeper.split_arguments(ovs, None)[0]:
            model = [o.partition("=")[2] for o in cell if o.partition("=")[0] == "model"]
            if models_swept and model and model[-1] != "d2c":
                cell = [o for o in cell if o.partition("=")[0].lstrip("+~").split(".")[0] != "fusion"]
            cells.append(cell)
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


