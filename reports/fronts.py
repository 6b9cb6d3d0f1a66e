"""Speed-vs-FID fronts: each family's Pareto front over the sampler settings it ran, the table
"speed at equal FID", and the fronts figure.

A point is a cell with its seeds averaged (load.cells).  A point is *confirmed* when it ran with
two seeds or more (search=front confirms its front so); a family's front is drawn over its
confirmed points, or over all of them (marked "one seed") when none is confirmed.  Speed at equal
FID: the target is the best FID of the weakest family, a quality every family reaches (or
--target-fid); for each family the fastest front point within the seed spread of it (FID <=
target + pooled seed std), and its speed over the slowest of those points.  Where some fronts
are confirmed, only those are compared.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from d2c.sampling import SAMPLER_KEYS, SamplerConfig
from d2c_reports.load import RESERVED, config_columns, family_rank
from d2c_reports.tables import pareto_front, value_text

# a front point's id: the family's letter and its rank by speed (L1 is LlamaGen's fastest)
LETTERS = {"llamagen": "L", "mar": "M", "d2c_cross_attn": "X", "d2c_qformer": "Q"}
METRIC_NAMES = {"fid": "FID", "fid_detail": "FID-detail"}
SPEED = "images_per_second"


def sampler_column(key: str) -> str:
    return f"config.{key}" if key in RESERVED else key


def searched_cells(results_dir) -> set[str]:
    """Cell ids of the search=front proposals and confirmations under results_dir/searches."""
    out = set()
    for p in sorted(Path(results_dir, "searches").glob("*.json")):
        try:
            st = json.loads(p.read_text())
            out |= {t["cell_id"] for t in st.get("trials", [])}
            out |= {c["confirm_id"] for c in st.get("confirm", [])}
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def settings_text(row, skip=()) -> str:
    """The sampler settings of a point that differ from its family's default, as the overrides
    that reproduce it (`steps=8 diffusion_steps=10`); "default" for the default sampler."""
    model = row.get("model")
    default = SamplerConfig().for_family(model) if model in ("d2c", "mar", "llamagen") else SamplerConfig()
    parts = []
    for k in (k for k in SAMPLER_KEYS if k not in skip):
        col = sampler_column(k)
        if col not in row.index:
            continue
        v, d = row[col], getattr(default, k)
        if value_text(None if pd.isna(v) else v) != value_text(d):
            parts.append(f"{k}={value_text(v)}".replace("=–", "=null"))
    return " ".join(parts) or "default"


def steps_sweep(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs of each family's MAR-steps sweep: those whose other sampler settings are the ones
    that ran at the most step counts (the default sampler first on a tie)."""
    if runs.empty:
        return runs
    other = runs.apply(settings_text, axis=1, skip=("steps",))
    steps = runs["steps"] if "steps" in runs else pd.Series(None, index=runs.index)
    counts = pd.DataFrame({"family": runs["family"], "other": other, "steps": steps}) \
        .groupby(["family", "other"], dropna=False)["steps"].nunique(dropna=False).reset_index()
    counts["rank"] = list(zip(-counts["steps"], counts["other"] != "default"))
    base = counts.sort_values("rank", kind="stable").drop_duplicates("family").set_index("family")["other"]
    return runs[other == runs["family"].map(base)]


def points(c: pd.DataFrame) -> pd.DataFrame:
    """The cells of one hardware and setting as front points: `group` (family + the training
    axes, e.g. model sizes, that differ between groups of the family), `settings`, `confirmed`."""
    c = c[np.isfinite(c[SPEED].astype(float)) & (c[SPEED].astype(float) > 0)].copy()
    if c.empty:
        return c.assign(group=[], settings=[], confirmed=[])
    sampler_cols = {sampler_column(k) for k in SAMPLER_KEYS}
    train_cols = [k for k in config_columns(c) if k not in sampler_cols and k != "family"]
    key = c[train_cols].map(lambda v: value_text(None if (not isinstance(v, (list, str)) and pd.isna(v)) else v)) \
        if train_cols else pd.DataFrame(index=c.index)
    varies = [k for k in train_cols if (key.assign(family=c["family"]).groupby("family")[k].nunique() > 1).any()]
    c["group"] = [" ".join([f, *(f"{k}={key.at[i, k]}" for k in varies)]) for i, f in zip(c.index, c["family"])]
    c["settings"] = [settings_text(r) for _, r in c.iterrows()]
    c["confirmed"] = c["n"] >= 2
    return c


def fronts(p: pd.DataFrame, metric: str = "fid") -> pd.DataFrame:
    """Each group's front on (speed, metric): over its confirmed points, else over all of them
    (`one_seed`); ids by speed within the family (L1, M1, M2, ...)."""
    out = []
    groups = sorted(p["group"].unique(), key=lambda g: family_rank(g.split()[0])) if len(p) else []
    for gi, g in enumerate(groups):
        d = p[(p["group"] == g) & np.isfinite(p[metric].astype(float))]
        conf = d[d["confirmed"]]
        f = pareto_front(conf if len(conf) else d, SPEED, metric).sort_values(SPEED, ascending=False)
        fam = g.split()[0]
        same = [x for x in groups if x.split()[0] == fam]
        letter = LETTERS.get(fam, fam[:1].upper()) + ("abcdefgh"[same.index(g)] if len(same) > 1 else "")
        out.append(f.assign(id=[f"{letter}{i + 1}" for i in range(len(f))], one_seed=not len(conf)))
    return pd.concat(out) if out else p.iloc[:0].assign(id=[], one_seed=[])


def seed_spread(p: pd.DataFrame, metric: str) -> float:
    """Pooled std over seeds of the confirmed points (0 when none has two seeds)."""
    s = p.loc[p["confirmed"], f"{metric}_std"].astype(float)
    s = s[np.isfinite(s)]
    return float(math.sqrt((s ** 2).mean())) if len(s) else 0.0


def equal_quality(p: pd.DataFrame, metric: str = "fid", target: float | None = None):
    """(table, target, spread, reference group): per group, the fastest front point whose metric
    is within the seed spread of the target, and its speed over the slowest such point's (the
    reference group's)."""
    f = fronts(p, metric)
    if f.empty:
        return pd.DataFrame(), None, 0.0, None
    spread = seed_spread(p, metric)
    judged = f[~f["one_seed"]] if (~f["one_seed"]).any() else f   # confirmed fronts, where there are some
    if target is None:     # the best of the weakest family: a quality every family reaches
        target = float(judged.groupby("group")[metric].min().max())
    rows, picks = [], {}
    for g, d in judged.groupby("group", sort=False):
        ok = d[d[metric].astype(float) <= target + spread]
        if len(ok):
            picks[g] = ok.sort_values(SPEED, ascending=False).iloc[0]
    if not picks:
        return pd.DataFrame(), target, spread, None
    ref = min(picks, key=lambda g: picks[g][SPEED])   # the slowest family there
    for g, d in f.groupby("group", sort=False):
        best = d.loc[d[metric].astype(float).idxmin()]
        r = picks.get(g)
        if g not in set(judged["group"]):
            rows.append({"family": g, "point": "–", "settings": "one seed only: not compared"})
            continue
        row = {"family": g, "point": r["id"] if r is not None else "–",
               "settings": r["settings"] if r is not None else f"none within (best {best[metric]:.2f}, {best['id']})",
               METRIC_NAMES.get(metric, metric): _pm(r, metric), "img/s": _pm(r, SPEED),
               "seeds": int(r["n"]) if r is not None else None,
               f"speed vs {ref}": (f"{r[SPEED] / picks[ref][SPEED]:.2f}x" if r is not None and ref in picks else "–")}
        rows.append(row)
    return pd.DataFrame(rows), target, spread, ref


def _pm(r, col) -> str:
    if r is None or pd.isna(r[col]):
        return "–"
    spec = ".2f" if col != SPEED else ".3g"
    std = r.get(f"{col}_std")
    return format(r[col], spec) + (f" ± {std:.2g}" if r["n"] > 1 and pd.notna(std) else "")


def front_table(p: pd.DataFrame, metric: str = "fid") -> pd.DataFrame:
    """Every front point: id, family, settings, the metric and speed (mean ± std), seeds."""
    f = fronts(p, metric)
    if f.empty:
        return pd.DataFrame()
    return pd.DataFrame({"point": f["id"], "family": f["group"], "settings": f["settings"],
                         METRIC_NAMES.get(metric, metric): [_pm(r, metric) for _, r in f.iterrows()],
                         "img/s": [_pm(r, SPEED) for _, r in f.iterrows()], "seeds": f["n"].astype(int)})
