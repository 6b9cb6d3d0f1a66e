#!/usr/bin/env python
"""Result records -> ablation tables (Markdown + LaTeX), seaborn figures, sample-grid pages, one report.

    python reports/make_tables.py                              # reads results/, writes results/report/
    python reports/make_tables.py --results R --out O

Rules: measured rows come only from the records (d2c.results, schema 1); published numbers
(reports/published.csv) get their own section and are never mixed in; runs on different hardware
(cpu_model + gpu_name) are never averaged together; several seeds of one cell show as
"mean ± std (n)".  A malformed record is named and skipped.  Exit 0 (also for no records),
2 when the results path does not exist.
"""
from __future__ import annotations

import argparse
import hashlib
import html
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

HERE = Path(__file__).resolve().parent
try:
    from d2c.config import FAMILY_NAMES, FUSIONS
    from d2c.results import RecordError, read_records, record_path
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(HERE.parent / "core"))
    from d2c.config import FAMILY_NAMES, FUSIONS
    from d2c.results import RecordError, read_records, record_path

# Fixed family colours (seaborn "colorblind"), the same in every figure.
PALETTE = {"llamagen": "#d55e00", "mar": "#0173b2", "d2c_cross_attn": "#de8f05", "d2c_qformer": "#029e73"}
EXTRA_COLOURS = ("#cc78bc", "#ca9161", "#fbafe4", "#949494", "#ece133", "#56b4e9")
# (column, header, format, higher is better)
METRICS = (
    ("fid", "FID", ".2f", False),
    ("is_mean", "IS", ".2f", True),
    ("precision", "Prec.", ".3f", True),
    ("recall", "Rec.", ".3f", True),
    ("class_accuracy", "Cls. acc.", ".3f", True),
    ("images_per_second", "img/s", ".4g", True),
    ("seconds_per_image", "s/img", ".4g", False),
)
SPEED_PLAIN = ("seconds_per_image", "images_per_second", "seconds_total",
               "stage1_seconds", "stage2_seconds", "decode_seconds")
STAGES = ("stage1", "stage2", "decode")
STAGE_COLOURS = ("#56b4e9", "#0173b2", "#949494")
VALUES = tuple(m[0] for m in METRICS) + tuple(f"{s}_s_img" for s in STAGES)
# axis -> (config column, title, families it does not apply to); rows with the axis unset are left out
# too (the harness nulls axes that do not apply: steps for llamagen, discrete_model for mar)
AXES = {
    "fusion": ("fusion", "Fusion type", ("llamagen",)),
    "discrete_model": ("discrete_model", "Discrete model size", ("mar",)),
    "steps": ("steps", "MAR steps", ("llamagen",)),
    "cfg": ("cfg", "CFG scale", ()),
}
SIZE_ORDER = ("tiny", "xs", "s", "small", "b", "base", "m", "medium", "l", "large", "xl", "xxl", "h", "huge")
META = ("file", "cell_id", "status", "error", "family", "seed", "grid", "git_commit", "started_at",
        "finished_at", "hardware")
# metric keys a record may carry (anything else in metrics goes to `metrics.<key>`)
_METRIC_KEYS = {"fid", "is_mean", "is_std", "kid_mean", "kid_std", "precision", "recall", "class_accuracy"}
RESERVED = set(META) | set(VALUES) | set(SPEED_PLAIN) | _METRIC_KEYS | {"n", "seeds"}
DASH = "–"
# config keys that say where a run wrote, not what it computed: never a table column or grouping key
WHERE_IT_RAN = ("results_dir",)


def log(msg: str) -> None:
    print(f"make_tables: {msg}", file=sys.stderr)


# ---------------------------------------------------------------- load

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
           "hardware": hardware_label(hw)}
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
    """ok runs -> one row per (hardware, family, config without seed): mean, `<v>_std` over seeds, n."""
    ok = runs[runs["status"] == "ok"] if len(runs) else runs
    if ok.empty:
        return pd.DataFrame(columns=["hardware", "family", "n", "seeds", *VALUES])
    keys = ["hardware", "family"] + [c for c in _configs(ok)]
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


def _configs(df: pd.DataFrame) -> list[str]:
    """Config columns of a runs/cells frame: everything that is not metadata, a value or an extra."""
    metric_like = set(VALUES) | {f"{v}_std" for v in VALUES} | set(SPEED_PLAIN)
    out = []
    for c in df.columns:
        if not (c in RESERVED or c in metric_like or c in _METRIC_KEYS or c in WHERE_IT_RAN
                or c.startswith(("speed.", "hw.", "ver.", "metrics."))):
            out.append(c)
    return out


def _order_key(s: pd.Series) -> pd.Series:
    """Sort key: families and fusions in their natural order, model sizes by size, numbers as
    numbers, anything else as text."""
    if s.name == "family":
        return s.map(lambda v: "%02d%s" % _family_rank(str(v)))
    if s.name == "fusion":
        return s.map(lambda v: f"{FUSIONS.index(v):02d}" if v in FUSIONS else f"99{v}")
    num = pd.to_numeric(s, errors="coerce")
    if num.notna().sum() == s.notna().sum():
        return num
    if s.name == "discrete_model":
        def rank(v):
            suffix = str(v).rsplit("_", 1)[-1].lower()
            return f"{SIZE_ORDER.index(suffix):02d}" if suffix in SIZE_ORDER else f"99{v}"
        return s.map(rank)
    return s.astype(str)


def pareto_front(df: pd.DataFrame, x: str, y: str, higher_x: bool = True, lower_y: bool = True) -> pd.DataFrame:
    """Rows not dominated by any other row (at least as good on both, strictly better on one),
    sorted by x.  Non-finite points are ignored; exact duplicates of a front point stay on it."""
    xv = pd.to_numeric(df[x], errors="coerce").to_numpy(float) * (1 if higher_x else -1)  # maximise
    yv = pd.to_numeric(df[y], errors="coerce").to_numpy(float) * (1 if lower_y else -1)   # minimise
    idx = np.flatnonzero(np.isfinite(xv) & np.isfinite(yv))
    order = idx[np.argsort(-xv[idx], kind="stable")]
    keep, best, i = [], math.inf, 0  # best: min y over points with strictly larger x
    while i < len(order):
        j = i
        while j < len(order) and xv[order[j]] == xv[order[i]]:
            j += 1
        grp = order[i:j]
        m = yv[grp].min()
        if m < best:
            keep.extend(int(g) for g in grp if yv[g] == m)
        best, i = min(best, m), j
    mask = np.zeros(len(df), bool)
    mask[keep] = True
    return df[mask].sort_values(x, kind="stable")


# ---------------------------------------------------------------- tables

@dataclass
class Table:
    axis: str
    title: str
    hardware: str
    df: pd.DataFrame                 # id columns, n, metric means and `<m>_std`
    id_cols: list
    fixed: dict = field(default_factory=dict)   # config constant over the whole table


def axis_table(c: pd.DataFrame, axis: str, hardware: str) -> Table | None:
    """Cells of one hardware group where the axis applies, sorted so each sweep over the axis is
    contiguous.  Shown: the axis, family, and config columns that vary within some family."""
    col, title, skip = AXES[axis]
    if col not in c:
        return None
    sub = c[~c["family"].isin(skip) & c[col].notna()]
    if sub.empty:
        return None
    confs = [k for k in _configs(sub) if k != col]
    varying = [k for k in confs if sub.groupby("family", dropna=False)[k].nunique(dropna=False).max() > 1]
    fixed = {k: sub[k].iloc[0] for k in confs if sub[k].nunique(dropna=False) == 1 and sub[k].notna().all()}
    sub = sub.sort_values(varying + [col, "family"], key=_order_key, kind="stable")
    keep = [col, "family", *varying, "n"] + [x for m in METRICS for x in (m[0], f"{m[0]}_std")]
    return Table(axis, title, hardware, sub[keep].reset_index(drop=True), [col, "family", *varying], fixed)


def _val(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return DASH
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() and abs(v) < 1e15 else f"{v:g}"
    return str(v)


def _best(df: pd.DataFrame) -> dict:
    """metric -> boolean mask of the rows holding its best mean (ties all marked)."""
    out = {}
    for m, _, _, higher in METRICS:
        v = pd.to_numeric(df[m], errors="coerce")
        out[m] = (v == (v.max() if higher else v.min())) & v.notna() if v.notna().any() else v.notna() & False
    return out


def _cell(row, m, spec) -> str:
    mean, std = row[m], row[f"{m}_std"]
    if pd.isna(mean):
        return DASH
    s = format(mean, spec)
    return s + (f" ± {format(std, std_spec(spec))}" if row["n"] > 1 and pd.notna(std) else "")


def std_spec(spec: str) -> str:
    """Spread format: as the mean for fixed decimals, two significant digits for `g` formats."""
    return ".2g" if spec.endswith("g") else spec


def _rows(t: Table):
    """Header and body cells (text) plus the best-value mask per metric column."""
    header = [*t.id_cols, "n"] + [m[1] for m in METRICS]
    best = _best(t.df)
    body = []
    for i, row in t.df.iterrows():
        cells_ = [_val(row[k]) for k in t.id_cols] + [str(int(row["n"]))]
        cells_ += [(_cell(row, m, spec), bool(best[m].iloc[i])) for m, _, spec, _ in METRICS]
        body.append(cells_)
    return header, body


def _caption(t: Table) -> str:
    fixed = ", ".join(f"{k}={_val(v)}" for k, v in t.fixed.items())
    return (f"{t.title} ({t.hardware}). Mean ± std over seeds (n seeds); best per column in bold "
            f"(lower is better for FID and s/img)." + (f" Fixed: {fixed}." if fixed else ""))


def table_markdown(t: Table) -> str:
    header, body = _rows(t)
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, header)) + " |",
             "|" + "|".join("---" if i < len(t.id_cols) else "---:" for i in range(len(header))) + "|"]
    for r in body:
        out = [esc(x) if isinstance(x, str) else (f"**{esc(x[0])}**" if x[1] and x[0] != DASH else esc(x[0]))
               for x in r]
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(s: str) -> str:
    s = "".join(_TEX.get(ch, ch) for ch in str(s))
    return s.replace("±", r"$\pm$").replace(DASH, "--")


def table_latex(t: Table) -> str:
    """booktabs tabular (\\usepackage{booktabs}); \\input it inside a table environment."""
    header, body = _rows(t)
    spec = "l" * len(t.id_cols) + "r" * (len(header) - len(t.id_cols))
    lines = [f"% {tex_escape(_caption(t))}", f"\\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(map(tex_escape, header)) + r" \\", r"\midrule"]
    for r in body:
        out = [tex_escape(x) if isinstance(x, str) else
               (f"\\textbf{{{tex_escape(x[0])}}}" if x[1] and x[0] != DASH else tex_escape(x[0])) for x in r]
        lines.append(" & ".join(out) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- figures

def family_palette(families) -> dict:
    extra = iter(EXTRA_COLOURS * 10)
    return {f: PALETTE.get(f) or next(extra) for f in sorted(set(families), key=_family_rank)}


def _family_rank(f: str):
    return (FAMILY_NAMES.index(f) if f in FAMILY_NAMES else len(FAMILY_NAMES), f)


def _save(fig, base: Path) -> list[Path]:
    base.parent.mkdir(parents=True, exist_ok=True)
    paths = [base.with_suffix(".png"), base.with_suffix(".pdf")]
    fig.savefig(paths[0], dpi=120, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    return paths


def _label(row, cols) -> str:
    return " ".join([row["family"]] + [f"{k}={_val(row[k])}" for k in cols])


def _varying(df: pd.DataFrame, exclude=()) -> list[str]:
    return [k for k in _configs(df) if k not in exclude
            and df.groupby("family", dropna=False)[k].nunique(dropna=False).max() > 1]


def fig_speed_fid(c: pd.DataFrame, base: Path) -> list[Path] | None:
    d = c[np.isfinite(c["fid"].astype(float)) & np.isfinite(c["images_per_second"].astype(float))
          & (c["images_per_second"].astype(float) > 0)]
    if d.empty:
        return None
    pal = family_palette(d["family"])
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for fam, g in d.groupby("family"):
        ax.errorbar(g["images_per_second"], g["fid"], yerr=g["fid_std"].fillna(0), xerr=g["images_per_second_std"]
                    .fillna(0), fmt="none", ecolor=pal[fam], alpha=0.5, lw=1)
    sns.scatterplot(data=d, x="images_per_second", y="fid", hue="family", hue_order=list(pal), palette=pal,
                    s=60, ax=ax, zorder=3)
    front = pareto_front(d, "images_per_second", "fid")
    ax.plot(front["images_per_second"], front["fid"], "k--", lw=1.2, drawstyle="steps-pre",
            label="Pareto front", zorder=2)
    if "steps" in d:
        for _, r in d[d["family"] != "llamagen"].iterrows():
            if pd.notna(r["steps"]):
                ax.annotate(_val(r["steps"]), (r["images_per_second"], r["fid"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
    x = d["images_per_second"].astype(float)
    if x.max() / x.min() > 20:
        ax.set_xscale("log")
    ax.set(xlabel="images per second (higher is better)", ylabel="FID (lower is better)",
           title="Speed vs FID (labels: MAR steps)")
    ax.legend(fontsize=8)
    return _save(fig, base)


def fig_fid_steps(runs_hw: pd.DataFrame, c: pd.DataFrame, base: Path) -> list[Path] | None:
    ok = runs_hw[(runs_hw["status"] == "ok") & (runs_hw["family"] != "llamagen")].copy()
    if "steps" not in ok:
        return None
    ok["steps"] = pd.to_numeric(ok["steps"], errors="coerce")
    ok = ok[ok["steps"].notna() & np.isfinite(ok["fid"].astype(float))]
    if ok.empty:
        return None
    var = _varying(ok, exclude=("steps",))
    ok["variant"] = ok.apply(lambda r: ", ".join(f"{k}={_val(r[k])}" for k in var) or "default", axis=1)
    pal = family_palette(list(ok["family"]) + list(c["family"]))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    sns.lineplot(data=ok, x="steps", y="fid", hue="family", hue_order=[f for f in pal if f in set(ok["family"])],
                 palette=pal, style="variant" if len(var) else None, errorbar="sd", marker="o", ax=ax)
    for _, r in c[(c["family"] == "llamagen") & np.isfinite(c["fid"].astype(float))].iterrows():
        ax.axhline(r["fid"], color=pal["llamagen"], ls=":", lw=1.2, label=_label(r, _varying(c, exclude=("steps",))))
    if ok["steps"].max() / max(ok["steps"].min(), 1e-9) >= 8:
        ax.set_xscale("log", base=2)
    ax.set(xlabel="MAR steps", ylabel="FID (lower is better)", title="FID vs MAR steps (mean ± std over seeds)")
    ax.legend(fontsize=7)
    return _save(fig, base)


def fig_stages(c: pd.DataFrame, base: Path) -> list[Path] | None:
    cols = [f"{s}_s_img" for s in STAGES]
    d = c[c[cols].notna().any(axis=1)]
    if d.empty:
        return None
    d = d.sort_values(["family"] + _varying(d), key=_order_key, kind="stable")
    labels = [_label(r, _varying(d)) for _, r in d.iterrows()]
    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.32 * len(d)))
    left = np.zeros(len(d))
    for s, col, colour in zip(STAGES, cols, STAGE_COLOURS):
        v = d[col].fillna(0).to_numpy(float)
        ax.barh(range(len(d)), v, left=left, color=colour, label=s)
        left += v
    ax.set_yticks(range(len(d)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="seconds per image", title="Time per stage (mean over seeds)")
    ax.legend(fontsize=8)
    return _save(fig, base)


# ---------------------------------------------------------------- report

def slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")[:40].strip("-")
    return f"{s or 'x'}-{hashlib.sha1(str(text).encode()).hexdigest()[:6]}"


def md_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "_none_\n"
    esc = lambda v: _val(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "|".join("---" for _ in df.columns) + "|"]
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _rel(path: Path, start: Path) -> str:
    return quote(os.path.relpath(path, start).replace(os.sep, "/"))


def load_published(path: Path) -> tuple[pd.DataFrame | None, str | None]:
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False), None
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        return None, f"published numbers unavailable ({path}: {type(e).__name__})"


def metadata_md(runs: pd.DataFrame) -> list[str]:
    if runs.empty:
        return []
    out = ["## Run metadata", "", "### Hardware", ""]
    hwcols = [c for c in ("hw.cpu_model", "hw.gpu_name", "hw.cpu_cores", "hw.gpu_count", "hw.cuda_version",
                          "hw.torch", "hw.platform") if c in runs]
    hw = runs.groupby("hardware", sort=True, dropna=False).agg(
        runs=("cell_id", "size"), **{c[3:]: (c, lambda s: ", ".join(sorted({_val(v) for v in s}))) for c in hwcols})
    out += [md_table(hw.reset_index()), "### Versions", ""]
    vcols = [c for c in runs.columns if c.startswith("ver.")]
    if vcols:
        v = runs[vcols].map(_val).value_counts().rename("runs").reset_index()
        v.columns = [c.removeprefix("ver.") if isinstance(c, str) else c for c in v.columns]
        out.append(md_table(v))
    else:
        out.append("_no version information in the records_\n")
    out += ["### Code commits", ""]
    commits = runs["git_commit"].map(_val).value_counts().rename("runs").reset_index()
    out += [md_table(commits), "### Dates", ""]
    st = pd.to_datetime(runs["started_at"], utc=True, errors="coerce", format="ISO8601")
    fi = pd.to_datetime(runs["finished_at"], utc=True, errors="coerce", format="ISO8601")
    out.append(f"- first run started: {st.min() if st.notna().any() else DASH}")
    out.append(f"- last run finished: {fi.max() if fi.notna().any() else DASH}\n")
    return out


def write_grid_pages(runs: pd.DataFrame, results_dir: Path, out: Path) -> list[tuple[str, Path]]:
    """One page per (family, MAR steps) with every record's sample grid."""
    if runs.empty:
        return []
    g = runs[runs["grid"].notna()].copy()
    if g.empty:
        return []
    if "steps" not in g:
        g["steps"] = None
    pages = []
    g["_steps"] = g["steps"].map(_val)
    for (fam, steps), grp in g.groupby(["family", "_steps"], sort=False):
        page = out / "grids" / f"{slug(fam)}_steps-{re.sub(r'[^0-9A-Za-z.]+', '_', steps)}.md"
        var = [k for k in _configs(grp) if k != "steps" and grp[k].nunique(dropna=False) > 1]
        lines = [f"# Sample grids: {fam}, steps {steps}", "", "[back to the report](../report.md)", ""]
        for _, r in grp.sort_values(["hardware", *var, "seed"], key=_order_key, kind="stable").iterrows():
            img = results_dir / str(r["grid"])
            head = ", ".join([f"{k}={_val(r[k])}" for k in var] + [f"seed={_val(r['seed'])}", r["status"]])
            lines += [f"## {head}", "", f"{r['hardware']}, record `{Path(r['file']).name}`", ""]
            lines.append(f"![{fam} steps {steps} seed {_val(r['seed'])}]({_rel(img, page.parent)})" if img.is_file()
                         else f"grid file missing: `{img}`")
            lines.append("")
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text("\n".join(lines))
        pages.append((f"{fam}, steps {steps} ({len(grp)} grid{'s' * (len(grp) > 1)})", page))
    pages.sort(key=lambda p: (_family_rank(p[0].split(",")[0]), p[1].name))
    return pages


def build_report(runs, problems, results_dir: Path, out: Path, published_path: Path) -> dict:
    """Writes every table, figure, grid page and report.md/.html; returns what it wrote."""
    out.mkdir(parents=True, exist_ok=True)
    sns.set_theme(style="whitegrid")
    c = cells(runs)
    wrote = {"tables": [], "figures": [], "grids": []}
    n_ok = int((runs["status"] == "ok").sum()) if len(runs) else 0
    n_failed = int((runs["status"] == "failed").sum()) if len(runs) else 0
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    md = ["# d2c-bench report", "",
          f"Generated {now} from `{results_dir}` by `reports/make_tables.py`.", "",
          f"Records: **{n_ok} ok**, {n_failed} failed, {len(problems)} malformed (skipped).", ""]
    if runs.empty:
        md += ["**No measured results yet**: no valid record under "
               f"`{results_dir / 'records'}`. Run the harness (ablations/run.py)"
               " and rerun this script.", ""]
    md += metadata_md(runs)
    if not c.empty:
        c.to_csv(out / "cells.csv", index=False)
        runs.to_csv(out / "runs.csv", index=False)
        md += ["Every number below is a mean ± std over seeds (n = seeds) of runs on the **same hardware**; "
               "runs on different hardware are never averaged together. Raw data: [runs.csv](runs.csv) "
               "(one row per record), [cells.csv](cells.csv) (one row per cell).", ""]
    for hw in sorted(c["hardware"].unique()) if not c.empty else []:
        ch, rh, hs = c[c["hardware"] == hw], runs[runs["hardware"] == hw], slug(hw)
        md += [f"## Measured: {hw}", ""]
        for axis in AXES:
            t = axis_table(ch, axis, hw)
            if t is None:
                md += [f"### {AXES[axis][1]}", "", f"_no records with config.{AXES[axis][0]} on this hardware_", ""]
                continue
            base = out / "tables" / hs / axis
            base.parent.mkdir(parents=True, exist_ok=True)
            mdt = table_markdown(t)
            base.with_suffix(".md").write_text(f"# {t.title}\n\n{_caption(t)}\n\n{mdt}")
            base.with_suffix(".tex").write_text(table_latex(t))
            wrote["tables"] += [base.with_suffix(".md"), base.with_suffix(".tex")]
            md += [f"### {t.title}", "", _caption(t), "", mdt,
                   f"[Markdown]({_rel(base.with_suffix('.md'), out)}) · [LaTeX]({_rel(base.with_suffix('.tex'), out)})",
                   ""]
        md += ["### Figures", ""]
        for name, title, fn in (("speed_vs_fid", "Speed vs FID, Pareto front dashed", lambda b: fig_speed_fid(ch, b)),
                                ("fid_vs_steps", "FID vs MAR steps per family", lambda b: fig_fid_steps(rh, ch, b)),
                                ("stage_times", "Time per stage", lambda b: fig_stages(ch, b))):
            try:
                paths = fn(out / "figures" / hs / name)
            except Exception as e:  # a plotting failure must not cost the rest of the report
                plt.close("all")
                log(f"figure {name} ({hw}) skipped: {type(e).__name__}: {e}")
                paths = None
            if not paths:
                md += [f"_{title}: no data_", ""]
                continue
            wrote["figures"] += paths
            md += [f"![{title}]({_rel(paths[0], out)})", "", f"{title} ([PDF]({_rel(paths[1], out)}))", ""]
    grids = write_grid_pages(runs, results_dir, out)
    wrote["grids"] = [p for _, p in grids]
    if grids:
        md += ["## Sample grids", ""] + [f"- [{t}]({_rel(p, out)})" for t, p in grids] + [""]
    if n_failed:
        f = runs[runs["status"] == "failed"]
        cols = ["family", *[k for k in ("steps", "cfg", "discrete_model") if k in f], "seed", "hardware", "error", "file"]
        md += ["## Failed runs (not in the tables)", "", md_table(f[cols].map(_val))]
    if problems:
        md += ["## Malformed records (skipped)", ""] + [f"- `{p}`" for p in problems] + [""]
    md += published_md(published_path)
    (out / "report.md").write_text("\n".join(md))
    for page in [out / "report.md", *wrote["grids"], *[p for p in wrote["tables"] if p.suffix == ".md"]]:
        page.with_suffix(".html").write_text(md_to_html(page.read_text(), title=page.stem))
    return wrote


def published_md(path: Path) -> list[str]:
    out = ["## Published numbers (papers and repositories; NOT measured by this harness)", "",
           "ImageNet 256x256 numbers as stated by the sources below (reference facts recorded in the team's "
           f"DESIGN.md section 3). Kept apart from every measured row above. Data: `{path.name}`.", ""]
    pub, err = load_published(path)
    if pub is None:
        return out + [f"_{err}_", ""]
    out += [md_table(pub.replace("", None)),
            "D2C (arXiv 2503.17155): no numbers are recorded in DESIGN.md, so none are listed.", ""]
    return out


# ---------------------------------------------------------------- markdown -> html

def md_to_html(text: str, title: str = "report") -> str:
    """The report's Markdown as one HTML page (Python-Markdown with tables); links to .md pages
    point at their .html twins."""
    import markdown
    from markdown.extensions import Extension
    from markdown.treeprocessors import Treeprocessor

    class MdLinksToHtml(Treeprocessor):
        def run(self, root):
            for a in root.iter("a"):
                href = a.get("href", "")
                if href.endswith(".md"):
                    a.set("href", href[:-3] + ".html")

    class Links(Extension):
        def extendMarkdown(self, md):
            md.treeprocessors.register(MdLinksToHtml(md), "md_links_to_html", 0)

    body = markdown.markdown(text, extensions=["tables", Links()], output_format="html")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;"
             "text-align:right}img{max-width:100%}")
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + body + "\n</body></html>\n")


# ---------------------------------------------------------------- CLI

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="results", help="results folder of the harness (holds records/)")
    ap.add_argument("--out", default=None, help="report folder (default: <results>/report)")
    ap.add_argument("--published", default=str(HERE / "published.csv"), help="published numbers (CSV)")
    args = ap.parse_args(argv)
    results = Path(args.results)
    if not results.is_dir():
        log(f"results path {str(results)!r} does not exist (or is not a folder); nothing to report")
        return 2
    out = Path(args.out) if args.out else results / "report"
    runs, problems = load(results)
    for p in problems:
        log(f"skipped malformed record: {p}")
    if runs.empty:
        log(f"no valid result records under {results / 'records'}: nothing measured yet")
    try:
        wrote = build_report(runs, problems, results, out, Path(args.published))
    except OSError as e:  # e.g. a read-only report folder
        log(f"cannot write the report to {out}: {e}")
        return 1
    n_ok = int((runs["status"] == "ok").sum()) if len(runs) else 0
    if len(runs) and not n_ok:
        log("no successful runs: the report lists the failed ones only")
    print(f"make_tables: wrote {out / 'report.md'} (+ .html): {n_ok} ok, {len(runs) - n_ok} failed, "
          f"{len(problems)} malformed; {len(wrote['tables'])} table files, {len(wrote['figures'])} figure files, "
          f"{len(wrote['grids'])} grid pages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
