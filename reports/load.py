"""Result records -> flat DataFrames: one row per record (`load`), one per cell with seeds
aggregated (`cells`); the column schema and the sort order every table and figure shares."""
from __future__ import annotations

import json
import math
import sys

import pandas as pd

from d2c.config import FAMILY_NAMES, FUSIONS
from d2c.results import RecordError, read_records, record_path

# (column, header, format, higher is better)
METRICS = (
    ("fid", "FID", ".2f", False),
    ("fid_detail", "FID-detail", ".2f", False),
    ("spectral_distance", "Spec. dist.", ".3f", False),
    ("is_mean", "IS", ".2f", True),
    ("precision", "Prec.", ".3f", True),
    ("recall", "Rec.", ".3f", True),
    ("class_accuracy", "Cls. acc.", ".3f", True),
    ("rfid_kl", "rFID KL", ".2f", False),
    ("rfid_vq", "rFID VQ", ".2f", False),
    ("images_per_second", "img/s", ".4g", True),
    ("seconds_per_image", "s/img", ".4g", False),
)
SPEED_PLAIN = ("seconds_per_image", "images_per_second", "seconds_total",
               "stage1_seconds", "stage2_seconds", "decode_seconds")
STAGES = ("stage1", "stage2", "decode")
VALUES = tuple(m[0] for m in METRICS) + tuple(f"{s}_s_img" for s in STAGES)
# axis -> (config column, title, families it does not apply to); rows with the axis unset are left out
# too (the harness nulls axes that do not apply: steps for llamagen, discrete_model for mar)
AXES = {
    "fusion": ("fusion", "Fusion type", ("llamagen",)),
    "discrete_model": ("discrete_model", "Discrete model size", ("mar",)),
    "mar_model": ("mar_model", "Continuous model size", ("llamagen",)),
    "steps": ("steps", "MAR steps", ("llamagen",)),
    "head_sampler": ("head_sampler", "Head sampler", ("llamagen",)),
    "precision": ("config.precision", "Sampling precision", ()),   # `precision` is the metric
    "cfg": ("cfg", "CFG scale", ()),
    # the fusion knobs (null where they do not apply to a record's fusion kind)
    "fusion.num_queries": ("fusion.num_queries", "Q-Former queries", ()),
    "fusion.depth": ("fusion.depth", "Q-Former depth", ()),
    "fusion.layers": ("fusion.layers", "Cross-attention layers", ()),
    "fusion.d_fuse": ("fusion.d_fuse", "Fusion width", ()),
}
VARIED_ONLY = ("mar_model", "fusion.num_queries", "fusion.depth", "fusion.layers", "fusion.d_fuse")   # a table only when swept
SIZE_ORDER = ("tiny", "xs", "s", "small", "b", "base", "m", "medium", "l", "large", "xl", "xxl", "h", "huge")
META = ("file", "cell_id", "status", "error", "family", "seed", "grid", "git_commit", "started_at",
        "finished_at", "hardware", "setting")
# what a number measures: the embedded default, or ImageNet-256 under the ADM protocol (recipe=imagenet);
# tables and figures never put the two together
SETTINGS = {"embedded": "embedded default", "imagenet": "ImageNet-256 (recipe=imagenet)"}
# metric keys a record may carry (anything else in metrics goes to `metrics.<key>`)
_TOKENIZER_METRICS = ("rfid", "rfid_detail", "spectral_distance", "high_pass_ratio", "l1")   # d2c.metrics.detail
_METRIC_KEYS = {"fid", "is_mean", "is_std", "kid_mean", "kid_std", "precision", "recall", "class_accuracy",
                "fid_detail", "spectral_distance", "high_pass_ratio",
                *(f"{m}_{kind}" for m in _TOKENIZER_METRICS for kind in ("kl", "vq"))}
RESERVED = set(META) | set(VALUES) | set(SPEED_PLAIN) | _METRIC_KEYS | {"n", "seeds"}
DASH = "–"
# config keys that say where a run wrote, not what it computed: never a table column or grouping key
WHERE_IT_RAN = ("results_dir",)


def log(msg: str) -> None:
    print(f"make_tables: {msg}", file=sys.stderr)



def _obj(rec: dict, key: str) -> dict:
    v = rec.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise RecordError(f"{key} must be an object, got {type(v).__name__}")
    return v


def _num(v, key: str) -> float:
    if v is None:
        return math.nan
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RecordError(f"{key}={v!r} is not a number")
    return float(v)


def _flat(d: dict, prefix: str = "") -> dict:
    """Nested config -> dotted scalar keys (lists as JSON text, so every value is hashable)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, list) else v
    return out


def hardware_label(hw: dict) -> str:
    return f"{hw.get('cpu_model') or 'unknown CPU'} | {hw.get('gpu_name') or 'no GPU'}"


def flatten(rec: dict, source: str) -> dict:
    """One record -> one flat row (config keys bare, metrics bare, speed extras `speed.*`,
    hardware `hw.*`, versions `ver.*`).  Raises RecordError on wrong types."""
    if not isinstance(rec["family"], str):
        raise RecordError(f"family={rec['family']!r} is not a string")
    config, metrics, speed = _obj(rec, "config"), _obj(rec, "metrics"), _obj(rec, "speed")
    hw, ver = _obj(rec, "hardware"), _obj(rec, "versions")
    row = {"file": source, "cell_id": str(rec["cell_id"]), "status": rec["status"], "error": rec.get("error"),
           "family": rec["family"], "grid": rec.get("grid"), "git_commit": rec.get("git_commit"),
           "started_at": rec.get("started_at"), "finished_at": rec.get("finished_at"),
           "hardware": hardware_label(hw), "setting": "imagenet" if config.get("recipe") == "imagenet" else "embedded"}
    seed = rec.get("seed", config.get("seed"))
    row["seed"] = seed if seed is not None else config.get("seed")
    for k, v in _flat(config).items():
        if k != "seed":
            row[f"config.{k}" if k in RESERVED else k] = v
    for k, v in metrics.items():
        row[k if k in _METRIC_KEYS else f"metrics.{k}"] = _num(v, f"metrics.{k}")
    for k, v in speed.items():
        if k in SPEED_PLAIN:
            row[k] = _num(v, f"speed.{k}")
        elif not isinstance(v, (dict, list)):
            row[f"speed.{k}"] = v
    for k, v in hw.items():
        row[f"hw.{k}"] = v if not isinstance(v, (dict, list)) else json.dumps(v)
    for k, v in ver.items():
        row[f"ver.{k}"] = v if not isinstance(v, (dict, list)) else json.dumps(v)
    # per-image stage times: the stage totals cover the timed images (speed.num_images)
    n = speed.get("num_images")
    if not isinstance(n, (int, float)) or isinstance(n, bool) or n <= 0:
        tot, spi = row.get("seconds_total", math.nan), row.get("seconds_per_image", math.nan)
        n = tot / spi if spi and spi > 0 and math.isfinite(tot) else config.get("num_images")
    for s in STAGES:
        t = row.get(f"{s}_seconds", math.nan)
        row[f"{s}_s_img"] = t / n if isinstance(n, (int, float)) and n and n > 0 else math.nan
    return row


def load(results_dir) -> tuple[pd.DataFrame, list[str]]:
    """Every record -> one row of a flat DataFrame; returns (runs, messages about skipped files)."""
    problems: list[str] = []
    recs = read_records(results_dir, on_bad=lambda e: problems.append(str(e)))
    rows = []
    for rec in recs:
        src = str(record_path(results_dir, rec["cell_id"]))
        try:
            rows.append(flatten(rec, src))
        except RecordError as e:
            problems.append(f"{src}: {e}")
    df = pd.DataFrame(rows)
    for c in VALUES:
        if c not in df:
            df[c] = math.nan
    return df, problems


def cells(runs: pd.DataFrame) -> pd.DataFrame:
    """ok runs -> one row per (setting, hardware, family, config without seed): mean, `<v>_std`
    over seeds, n."""
    ok = runs[runs["status"] == "ok"] if len(runs) else runs
    if ok.empty:
        return pd.DataFrame(columns=["setting", "hardware", "family", "n", "seeds", *VALUES])
    keys = ["setting", "hardware", "family"] + [c for c in config_columns(ok)]
    rows = []
    for key, g in ok.groupby(keys, dropna=False, sort=False):
        row = dict(zip(keys, key))
        row["n"] = len(g)
        row["seeds"] = ",".join(sorted(map(str, g["seed"].tolist())))
        for c in VALUES:
            v = pd.to_numeric(g[c], errors="coerce").astype(float)
            row[c] = v.mean()
            row[f"{c}_std"] = v.std(ddof=1) if v.count() > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def config_columns(df: pd.DataFrame) -> list[str]:
    """Config columns of a runs/cells frame: everything that is not metadata, a value or an extra."""
    metric_like = set(VALUES) | {f"{v}_std" for v in VALUES} | set(SPEED_PLAIN)
    out = []
    for c in df.columns:
        if not (c in RESERVED or c in metric_like or c in _METRIC_KEYS or c in WHERE_IT_RAN
                or c.startswith(("speed.", "hw.", "ver.", "metrics."))):
            out.append(c)
    return out


def order_key(s: pd.Series) -> pd.Series:
    """Sort key: families and fusions in their natural order, model sizes by size, numbers as
    numbers, anything else as text."""
    if s.name == "family":
        return s.map(lambda v: "%02d%s" % family_rank(str(v)))
    if s.name == "fusion":
        return s.map(lambda v: f"{FUSIONS.index(v):02d}" if v in FUSIONS else f"99{v}")
    num = pd.to_numeric(s, errors="coerce")
    if num.notna().sum() == s.notna().sum():
        return num
    if s.name in ("discrete_model", "mar_model"):
        def rank(v):
            suffix = str(v).rsplit("_", 1)[-1].lower()
            return f"{SIZE_ORDER.index(suffix):02d}" if suffix in SIZE_ORDER else f"99{v}"
        return s.map(rank)
    return s.astype(str)


def family_rank(f: str):
    return (FAMILY_NAMES.index(f) if f in FAMILY_NAMES else len(FAMILY_NAMES), f)
