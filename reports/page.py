"""The report folder: tables, figures and grid pages written per hardware, one report.md with
the run metadata, failures and published numbers, and an HTML twin of every page."""
from __future__ import annotations

import hashlib
import html
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from d2c_reports import figures
from d2c_reports import fronts as F
from d2c_reports.load import AXES, DASH, SETTINGS, VARIED_ONLY, cells, config_columns, family_rank, log, order_key
from d2c_reports.tables import axis_table, caption, table_latex, table_markdown, value_text

def slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")[:40].strip("-")
    return f"{s or 'x'}-{hashlib.sha1(str(text).encode()).hexdigest()[:6]}"


def md_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "_none_\n"
    esc = lambda v: value_text(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
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
        runs=("cell_id", "size"), **{c[3:]: (c, lambda s: ", ".join(sorted({value_text(v) for v in s}))) for c in hwcols})
    out += [md_table(hw.reset_index()), "### Versions", ""]
    vcols = [c for c in runs.columns if c.startswith("ver.")]
    if vcols:
        v = runs[vcols].map(value_text).value_counts().rename("runs").reset_index()
        v.columns = [c.removeprefix("ver.") if isinstance(c, str) else c for c in v.columns]
        out.append(md_table(v))
    else:
        out.append("_no version information in the records_\n")
    out += ["### Code commits", ""]
    commits = runs["git_commit"].map(value_text).value_counts().rename("runs").reset_index()
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
    g["_steps"] = g["steps"].map(value_text)
    for (fam, steps), grp in g.groupby(["family", "_steps"], sort=False):
        page = out / "grids" / f"{slug(fam)}_steps-{re.sub(r'[^0-9A-Za-z.]+', '_', steps)}.md"
        var = [k for k in config_columns(grp) if k != "steps" and grp[k].nunique(dropna=False) > 1]
        lines = [f"# Sample grids: {fam}, steps {steps}", "", "[back to the report](../report.md)", ""]
        for _, r in grp.sort_values(["hardware", *var, "seed"], key=order_key, kind="stable").iterrows():
            img = results_dir / str(r["grid"])
            head = ", ".join([f"{k}={value_text(r[k])}" for k in var] + [f"seed={value_text(r['seed'])}", r["status"]])
            lines += [f"## {head}", "", f"{r['hardware']}, record `{Path(r['file']).name}`", ""]
            lines.append(f"![{fam} steps {steps} seed {value_text(r['seed'])}]({_rel(img, page.parent)})" if img.is_file()
                         else f"grid file missing: `{img}`")
            lines.append("")
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text("\n".join(lines))
        pages.append((f"{fam}, steps {steps} ({len(grp)} grid{'s' * (len(grp) > 1)})", page))
    pages.sort(key=lambda p: (family_rank(p[0].split(",")[0]), p[1].name))
    return pages


def _figure(wrote: dict, md: list, name: str, title: str, fn, base: Path, hw: str, out: Path) -> None:
    """One figure into the page (a plotting failure costs only that figure)."""
    try:
        paths = fn(base / name)
    except Exception as e:  # noqa: BLE001
        figures.close_all()
        log(f"figure {name} ({hw}) skipped: {type(e).__name__}: {e}")
        paths = None
    if not paths:
        md += [f"_{title}: no data_", ""]
        return
    wrote["figures"] += paths
    md += [f"![{title}]({_rel(paths[0], out)})", "", f"{title} ([PDF]({_rel(paths[1], out)}))", ""]


def answer_md(ch: pd.DataFrame, rh: pd.DataFrame, hw: str, figs: Path, out: Path, results_dir: Path, wrote: dict,
              target: float | None = None) -> list[str]:
    """The report's answer for one hardware and setting: each family's speed-vs-FID front, the
    speed at equal FID (and FID-detail), the front's points, and the chosen points' samples."""
    p = F.points(ch)
    if p.empty:
        return []
    md = []
    for metric in ("fid", "fid_detail"):
        name = F.METRIC_NAMES[metric]
        if metric not in p or not p[metric].notna().any():
            continue
        _figure(wrote, md, "fronts" if metric == "fid" else "fronts_detail",
                f"Speed vs {name}: fronts (mean over seeds, bars ± std; faint: every setting run)",
                lambda b, m=metric: figures.fronts(p, b, m), figs, hw, out)
        t, tgt, spread, ref = F.equal_quality(p, metric, target if metric == "fid" else None)
        if t.empty:
            continue
        why = "given" if target is not None and metric == "fid" else "the best of the weakest family: every family reaches it"
        md += [f"**Speed at equal {name}**: target {name} {tgt:.2f} ({why}), within the pooled seed std "
               f"{spread:.2f}; for each family its fastest front point there, and its speed over {ref}'s.", "",
               md_table(t)]
        if metric == "fid_detail":
            md += [f"**The {name} fronts' points** (ids of the {name} figure):", "", md_table(F.front_table(p, metric))]
        if metric == "fid":
            picks = t[t["point"] != DASH]
            front = F.fronts(p, metric)
            md += ["**The fronts' points** (settings: what differs from the family's default sampler, as the "
                   "overrides that reproduce it; points of one seed are not confirmed):", "",
                   md_table(F.front_table(p, metric))]
            panels = []
            rp = F.points(rh[rh["status"] == "ok"].assign(n=1)) if len(rh) else rh
            for _, r in picks.iterrows():
                pt = front[front["id"] == r["point"]].iloc[0]
                match = rp[(rp["group"] == pt["group"]) & (rp["settings"] == pt["settings"])] if len(rp) else rp
                if len(match) and "grid" in match:
                    first = match.sort_values("seed", kind="stable").iloc[0]
                    if pd.notna(first["grid"]):
                        panels.append((f"{pt['id']} {pt['group']}\n{name} {pt[metric]:.1f}, {pt[F.SPEED]:.3g} img/s",
                                       results_dir / str(first["grid"])))
            _figure(wrote, md, "equal_fid_samples", f"Samples of the points at equal {name} (first seed)",
                    lambda b: figures.grid_panels(panels, b), figs, hw, out)
            compared = front[~front["one_seed"]] if (~front["one_seed"]).any() else front
            _figure(wrote, md, "stage_times", "Time per stage of the compared fronts' points",
                    lambda b: figures.stages(compared, b), figs, hw, out)
    return md


def build_report(runs, problems, results_dir: Path, out: Path, published_path: Path,
                 target_fid: float | None = None) -> dict:
    """Writes every table, figure, grid page and report.md/.html; returns what it wrote.  The
    page opens with its answer (fronts, speed at equal FID) and ends with the run metadata."""
    out.mkdir(parents=True, exist_ok=True)
    figures.theme()
    c = cells(runs)
    # the axis tables and step plots: the grid's cells (a search's proposals live in the fronts)
    searched = F.searched_cells(results_dir)
    if len(runs) and searched:
        default = runs.apply(F.settings_text, axis=1) == "default"
        grid_runs = runs[~runs["cell_id"].isin(searched) | default]
    else:
        grid_runs = runs
    cg = cells(grid_runs)
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
    groups = sorted(set(zip(c["setting"], c["hardware"])), key=lambda g: (g[0] != "embedded", g)) if not c.empty else []
    for setting, hw in groups:    # the answer first: one per setting and hardware
        hs = slug(hw) if setting == "embedded" else slug(f"{setting} {hw}")
        ans = answer_md(c[(c["hardware"] == hw) & (c["setting"] == setting)],
                        runs[(runs["hardware"] == hw) & (runs["setting"] == setting)], hw, out / "figures" / hs, out,
                        results_dir, wrote, target_fid)
        if ans:
            md += [f"## Speed vs FID: {hw}" if setting == "embedded" else f"## Speed vs FID at {SETTINGS[setting]}: {hw}",
                   ""] + ans
    if not c.empty:
        c.to_csv(out / "cells.csv", index=False)
        runs.to_csv(out / "runs.csv", index=False)
        md += ["Every number below is a mean ± std over seeds (n = seeds) of runs on the **same hardware**; "
               "runs on different hardware are never averaged together. Raw data: [runs.csv](runs.csv) "
               "(one row per record), [cells.csv](cells.csv) (one row per cell).", ""]
    for setting, hw in groups:    # one section per setting and hardware: never averaged or mixed
        ch = cg[(cg["hardware"] == hw) & (cg["setting"] == setting)] if not cg.empty else cg
        rh = grid_runs[(grid_runs["hardware"] == hw) & (grid_runs["setting"] == setting)]
        hs = slug(hw) if setting == "embedded" else slug(f"{setting} {hw}")
        md += [f"## Measured: {hw}" if setting == "embedded" else f"## Measured at {SETTINGS[setting]}: {hw}", ""]
        for axis in AXES:
            t = axis_table(ch, axis, hw)
            if t is None and axis in VARIED_ONLY:
                continue
            if t is None:
                md += [f"### {AXES[axis][1]}", "", f"_no records with config.{AXES[axis][0].removeprefix('config.')} on this hardware_", ""]
                continue
            base = out / "tables" / hs / axis.replace(".", "_")   # with_suffix would eat ".num_queries"
            base.parent.mkdir(parents=True, exist_ok=True)
            mdt = table_markdown(t)
            base.with_suffix(".md").write_text(f"# {t.title}\n\n{caption(t)}\n\n{mdt}")
            base.with_suffix(".tex").write_text(table_latex(t))
            wrote["tables"] += [base.with_suffix(".md"), base.with_suffix(".tex")]
            md += [f"### {t.title}", "", caption(t), "", mdt,
                   f"[Markdown]({_rel(base.with_suffix('.md'), out)}) · [LaTeX]({_rel(base.with_suffix('.tex'), out)})",
                   ""]
        md += ["### Figures", ""]
        rs = F.steps_sweep(rh)   # each family's steps sweep (the other settings of the most step counts)
        cs = cells(rs)
        for name, title, fn in (("fid_vs_steps", "FID vs MAR steps per family",
                                 lambda b: figures.fid_steps(rs, cs, b)),
                                ("sample_grids", "Samples by family (first seed of each family and step count)",
                                 lambda b: figures.sample_grids(rs, results_dir, b))):
            _figure(wrote, md, name, title, fn, out / "figures" / hs, hw, out)
    grids = write_grid_pages(runs, results_dir, out)
    wrote["grids"] = [p for _, p in grids]
    if grids:
        md += ["## Sample grids", ""] + [f"- [{t}]({_rel(p, out)})" for t, p in grids] + [""]
    if n_failed:
        f = runs[runs["status"] == "failed"]
        cols = ["family", *[k for k in ("steps", "cfg", "discrete_model") if k in f], "seed", "hardware", "error", "file"]
        md += ["## Failed runs (not in the tables)", "", md_table(f[cols].map(value_text))]
    if problems:
        md += ["## Malformed records (skipped)", ""] + [f"- `{p}`" for p in problems] + [""]
    md += published_md(published_path, c)
    md += metadata_md(runs)
    (out / "report.md").write_text("\n".join(md))
    for page in [out / "report.md", *wrote["grids"], *[p for p in wrote["tables"] if p.suffix == ".md"]]:
        page.with_suffix(".html").write_text(md_to_html(page.read_text(), title=page.stem))
    return wrote


# what a measured ImageNet row shows beside the published ones
MEASURED_IMAGENET = ("family", "discrete_model", "mar_model", "steps", "diffusion_steps", "cfg",
                     "num_images", "train_epochs", "fid", "is_mean", "precision", "recall", "images_per_second", "n",
                     "hardware")


def published_md(path: Path, c: pd.DataFrame | None = None) -> list[str]:
    out = ["## Published numbers (papers and repositories; NOT measured by this harness)", "",
           "ImageNet 256x256 numbers as stated by the sources below (each row names its paper and the public "
           "repository file; the repository's docs/design.md section 3 lists them). Kept apart from every "
           f"measured row above. Data: `{path.name}`.", ""]
    pub, err = load_published(path)
    if pub is None:
        out += [f"_{err}_", ""]
    else:
        out += [md_table(pub.replace("", None)),
                "D2C (arXiv 2503.17155): no numbers are listed (only the paper's abstract could be checked).", ""]
    im = c[c["setting"] == "imagenet"] if c is not None and not c.empty else None
    if im is not None and not im.empty:
        cols = [k for k in MEASURED_IMAGENET if k in im]
        out += ["### Measured by this harness at ImageNet-256 (beside the published rows, not among them)", "",
                "Cells of `recipe=imagenet` (mean over seeds, n seeds); their sections above hold every axis.", "",
                md_table(im[cols].map(value_text)), ""]
    return out


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
