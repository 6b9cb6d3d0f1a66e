"""The report's figures (seaborn): each family's speed-vs-FID front, FID vs MAR steps, stage
times, sample grids.  Each saved as PNG and PDF."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from d2c_reports.load import STAGES, config_columns, family_rank, order_key  # noqa: E402
from d2c_reports.tables import value_text  # noqa: E402

# Fixed family colours (seaborn "colorblind"), the same in every figure.
PALETTE = {"llamagen": "#cc78bc", "mar": "#0173b2", "d2c_cross_attn": "#de8f05", "d2c_qformer": "#029e73"}
EXTRA_COLOURS = ("#d55e00", "#ca9161", "#fbafe4", "#949494", "#ece133", "#56b4e9")
STAGE_COLOURS = ("#56b4e9", "#0173b2", "#949494")
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
    if "id" in d:   # front points: their ids and families (the front table gives their settings)
        labels = [f"{r['id']} {r['group']}" for _, r in d.iterrows()]
    else:
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
    ok = runs[(runs["status"] == "ok") & runs["grid"].notna()] if "grid" in runs else runs.iloc[:0]
    if ok.empty:
        return None
    ok = ok.assign(_steps=ok["steps"] if "steps" in ok else None)
    picks = []
    for (fam, steps), grp in ok.groupby(["family", "_steps"], sort=False, dropna=False):
        r = grp.sort_values("seed", kind="stable").iloc[0]
        if (results_dir / str(r["grid"])).is_file():
            picks.append((family_rank(fam), -1 if pd.isna(steps) else steps, r))
    panels = []
    for *_, r in sorted(picks, key=lambda p: p[:2])[:max_panels]:
        steps = "" if pd.isna(r.get("steps")) else f", {value_text(r['steps'])} steps"
        fid = f"FID {r['fid']:.1f}" if "fid" in r and pd.notna(r["fid"]) else ""
        panels.append((f"{r['family']}{steps}\n{fid}", results_dir / str(r["grid"])))
    return grid_panels(panels, base)


def grid_panels(panels: list[tuple[str, Path]], base: Path) -> list[Path] | None:
    """Sample-grid PNGs side by side (at most four a row), each under its title."""
    from PIL import Image
    panels = [(t, p) for t, p in panels if Path(p).is_file()]
    if not panels:
        return None
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, path) in zip(axes.flat, panels):
        ax.imshow(np.asarray(Image.open(path).convert("RGB")))
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, base)


# ---------------------------------------------------------------- fronts


def place_labels(ax, xs, ys, texts, fontsize: int = 8) -> list:
    """Annotate each point with its text at the first of a few offsets where the label's box
    overlaps no label placed before it nor leaves the axes (else the least-overlapping offset)."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    offsets = [(5, 5, "left", "bottom"), (5, -5, "left", "top"), (-5, 5, "right", "bottom"),
               (-5, -5, "right", "top"), (0, 9, "center", "bottom"), (0, -9, "center", "top"),
               (12, 0, "left", "center"), (-12, 0, "right", "center"), (10, 16, "left", "bottom"),
               (-10, -16, "right", "top"), (10, -16, "left", "top"), (-10, 16, "right", "bottom")]
    placed, boxes = [], []

    def overlap(b) -> float:
        area = sum(max(0, min(b.x1, o.x1) - max(b.x0, o.x0)) * max(0, min(b.y1, o.y1) - max(b.y0, o.y0)) for o in boxes)
        outside = b.width * b.height - max(0, min(b.x1, frame.x1) - max(b.x0, frame.x0)) \
            * max(0, min(b.y1, frame.y1) - max(b.y0, frame.y0))
        return area + outside

    for x, y, t in zip(xs, ys, texts):
        best = None
        for dx, dy, ha, va in offsets:
            a = ax.annotate(t, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, va=va, fontsize=fontsize,
                            zorder=5)
            b = a.get_window_extent(renderer).expanded(1.05, 1.1)
            cost = overlap(b)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, a, b)
            else:
                a.remove()
            if cost == 0:
                break
        placed.append(best[1])
        boxes.append(best[2])
    return placed


def fronts(p: pd.DataFrame, base: Path, metric: str = "fid") -> list[Path] | None:
    """Each family's front (line, mean over seeds with ± std bars, points labelled by id) over
    the faint cloud of every setting it ran; the legend outside the axes."""
    from d2c_reports.fronts import METRIC_NAMES, SPEED
    from d2c_reports.fronts import fronts as front_points
    if p.empty or metric not in p:
        return None
    p = p[np.isfinite(p[metric].astype(float))]
    f = front_points(p, metric)
    if f.empty:
        return None
    groups = list(dict.fromkeys(f["group"]))
    pal = family_palette([g.split()[0] for g in groups])
    colours = {g: pal.get(g.split()[0]) or EXTRA_COLOURS[i % len(EXTRA_COLOURS)] for i, g in enumerate(groups)}
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for g in groups:
        d, fr = p[p["group"] == g], f[f["group"] == g]
        ax.scatter(d[SPEED], d[metric], s=14, color=colours[g], alpha=0.22, lw=0, zorder=1)
        one = bool(fr["one_seed"].iloc[0])
        ax.errorbar(fr[SPEED], fr[metric], yerr=fr[f"{metric}_std"].fillna(0), color=colours[g], lw=1.8,
                    ls="--" if one else "-", marker="o", ms=5, capsize=2, zorder=3,
                    label=g + (" (one seed)" if one else ""))
    ax.scatter([], [], s=14, color="grey", alpha=0.35, lw=0, label="every setting run (faint)")
    # the axes frame the fronts (faint points far above them are cut); log where values span decades
    lo = (f[metric] - f[f"{metric}_std"].fillna(0)).astype(float).min()
    hi = (f[metric] + f[f"{metric}_std"].fillna(0)).astype(float).max()
    lo = lo if lo > 0 else f[metric].astype(float).min()
    for axis, v in ((ax.xaxis, p[SPEED]), (ax.yaxis, f[metric])):
        v = v.astype(float)
        if v.min() > 0 and v.max() / v.min() > (4 if axis is ax.xaxis else 8):
            (ax.set_xscale if axis is ax.xaxis else ax.set_yscale)("log")
            axis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=12))
            axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda t, _: f"{t:g}"))
    if ax.get_yscale() == "log":
        ax.set_ylim(lo / 1.4, hi * 1.4)
    else:
        pad = 0.12 * (hi - lo) or 1.0
        ax.set_ylim(max(0.0, lo - pad), hi + pad)
    name = METRIC_NAMES.get(metric, metric)
    ax.set(xlabel="images per second (higher is better)", ylabel=f"{name} (lower is better)",
           title=f"Speed vs {name}: each family's front over its sampler settings")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, frameon=False)
    place_labels(ax, f[SPEED].tolist(), f[metric].tolist(), f["id"].tolist())
    return _save(fig, base)
