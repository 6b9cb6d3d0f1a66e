"""The report's figures (seaborn): speed vs FID with its Pareto front, FID vs MAR steps,
stage times.  Each saved as PNG and PDF."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from d2c.results import ADDED_KEYS  # noqa: E402
from d2c_reports.load import AXES, STAGES, config_columns, family_rank, order_key  # noqa: E402
from d2c_reports.tables import pareto_front, value_text  # noqa: E402

# Fixed family colours (seaborn "colorblind"), the same in every figure.
PALETTE = {"llamagen": "#d55e00", "mar": "#0173b2", "d2c_cross_attn": "#de8f05", "d2c_qformer": "#029e73"}
EXTRA_COLOURS = ("#cc78bc", "#ca9161", "#fbafe4", "#949494", "#ece133", "#56b4e9")
STAGE_COLOURS = ("#56b4e9", "#0173b2", "#949494")
# the sampling accelerations (d2c.results.ADDED_KEYS: key -> off value) as short point labels
ACCEL_FORMAT = {"head_sampler": "{}", "diffusion_steps_last": "\u2192{}", "uncond_refresh": "u{}", "precision": "{}",
                "compile": "compiled"}


def theme() -> None:
    sns.set_theme(style="whitegrid")


def close_all() -> None:
    plt.close("all")


def family_palette(families) -> dict:
    extra = iter(EXTRA_COLOURS * 10)
    return {f: PALETTE.get(f) or next(extra) for f in sorted(set(families), key=family_rank)}


def _save(fig, base: Path) -> list[Path]:
    base.parent.mkdir(parents=True, exist_ok=True)
    paths = [base.with_suffix(".png"), base.with_suffix(".pdf")]
    fig.savefig(paths[0], dpi=120, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    return paths


def _label(row, cols) -> str:
    return " ".join([row["family"]] + [f"{k}={value_text(row[k])}" for k in cols])


def _varying(df: pd.DataFrame, exclude=()) -> list[str]:
    return [k for k in config_columns(df) if k not in exclude
            and df.groupby("family", dropna=False)[k].nunique(dropna=False).max() > 1]


def accel_text(row) -> str:
    """The accelerations a cell runs with, e.g. "\u21925 ddim u2 bf16"; "" for today's sampler."""
    parts = []
    for k, off in ADDED_KEYS.items():
        v = row.get(AXES[k][0] if k in AXES else k)
        if pd.isna(v) or v == off:
            continue
        parts.append(ACCEL_FORMAT.get(k, k + "={}").format(value_text(v)))
    return " ".join(parts)


def speed_fid(c: pd.DataFrame, base: Path, fid: str = "fid") -> list[Path] | None:
    """Speed vs `fid` (the layout FID, or fid_detail) with its Pareto front."""
    if fid not in c:
        return None
    d = c[np.isfinite(c[fid].astype(float)) & np.isfinite(c["images_per_second"].astype(float))
          & (c["images_per_second"].astype(float) > 0)]
    if d.empty:
        return None
    pal = family_palette(d["family"])
    d = d.assign(sampler=d.apply(lambda r: accel_text(r) or "default", axis=1))
    style = "sampler" if d["sampler"].nunique() > 1 else None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for fam, g in d.groupby("family"):
        ax.errorbar(g["images_per_second"], g[fid], yerr=g[f"{fid}_std"].fillna(0), xerr=g["images_per_second_std"]
                    .fillna(0), fmt="none", ecolor=pal[fam], alpha=0.5, lw=1)
    sns.scatterplot(data=d, x="images_per_second", y=fid, hue="family", hue_order=list(pal), palette=pal,
                    style=style, s=60, ax=ax, zorder=3)
    front = pareto_front(d, "images_per_second", fid)
    ax.plot(front["images_per_second"], front[fid], "k--", lw=1.2, drawstyle="steps-pre",
            label="Pareto front", zorder=2)
    for _, r in d.iterrows():
        text = " ".join(t for t in (value_text(r["steps"]) if pd.notna(r.get("steps")) else "",
                                    "" if r["sampler"] == "default" else r["sampler"]) if t)
        if text:
            ax.annotate(text, (r["images_per_second"], r[fid]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
    x = d["images_per_second"].astype(float)
    if x.max() / x.min() > 20:
        ax.set_xscale("log")
    name = "FID-detail" if fid == "fid_detail" else "FID"
    ax.set(xlabel="images per second (higher is better)", ylabel=f"{name} (lower is better)",
           title=f"Speed vs {name} (labels: MAR steps, accelerations)")
    ax.legend(fontsize=8)
    return _save(fig, base)


def fid_steps(runs_hw: pd.DataFrame, c: pd.DataFrame, base: Path) -> list[Path] | None:
    ok = runs_hw[(runs_hw["status"] == "ok") & (runs_hw["family"] != "llamagen")].copy()
    if "steps" not in ok:
        return None
    ok["steps"] = pd.to_numeric(ok["steps"], errors="coerce")
    ok = ok[ok["steps"].notna() & np.isfinite(ok["fid"].astype(float))]
    if ok.empty:
        return None
    var = _varying(ok, exclude=("steps",))
    ok["variant"] = ok.apply(lambda r: ", ".join(f"{k}={value_text(r[k])}" for k in var) or "default", axis=1)
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


def stages(c: pd.DataFrame, base: Path) -> list[Path] | None:
    cols = [f"{s}_s_img" for s in STAGES]
    d = c[c[cols].notna().any(axis=1)]
    if d.empty:
        return None
    d = d.sort_values(["family"] + _varying(d), key=order_key, kind="stable")
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


def sample_grids(runs: pd.DataFrame, results_dir: Path, base: Path, max_panels: int = 8) -> list[Path] | None:
    """The cells' sample grids side by side, one panel per (family, MAR steps) with its FID: the
    first seed's record of each, families in the report's order, at most `max_panels`."""
    from PIL import Image
    ok = runs[(runs["status"] == "ok") & runs["grid"].notna()] if "grid" in runs else runs.iloc[:0]
    if ok.empty:
        return None
    ok = ok.assign(_steps=ok["steps"] if "steps" in ok else None)
    picks = []
    for (fam, steps), grp in ok.groupby(["family", "_steps"], sort=False, dropna=False):
        r = grp.sort_values("seed", kind="stable").iloc[0]
        if (results_dir / str(r["grid"])).is_file():
            picks.append((family_rank(fam), -1 if pd.isna(steps) else steps, r))
    picks = [r for *_, r in sorted(picks, key=lambda p: p[:2])][:max_panels]
    if not picks:
        return None
    cols = min(4, len(picks))
    rows = -(-len(picks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, picks):
        ax.imshow(np.asarray(Image.open(results_dir / str(r["grid"])).convert("RGB")))
        steps = "" if pd.isna(r.get("steps")) else f", {value_text(r['steps'])} steps"
        fid = f"FID {r['fid']:.1f}" if "fid" in r and pd.notna(r["fid"]) else ""
        ax.set_title(f"{r['family']}{steps}\n{fid}", fontsize=10)
    fig.tight_layout()
    return _save(fig, base)
