"""Ablation tables (one per axis) as Markdown and LaTeX (booktabs), and the Pareto front."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from d2c.results import pareto_indices
from d2c_reports.load import AXES, DASH, METRICS, VARIED_ONLY, config_columns, order_key

def pareto_front(df: pd.DataFrame, x: str, y: str, higher_x: bool = True, lower_y: bool = True) -> pd.DataFrame:
    """Rows not dominated by any other row (d2c.results.pareto_indices), sorted by x."""
    xv = pd.to_numeric(df[x], errors="coerce").to_numpy(float) * (1 if higher_x else -1)  # maximise
    yv = pd.to_numeric(df[y], errors="coerce").to_numpy(float) * (1 if lower_y else -1)   # minimise
    mask = np.zeros(len(df), bool)
    mask[pareto_indices(xv, yv)] = True
    return df[mask].sort_values(x, kind="stable")


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
    if sub.empty or (axis in VARIED_ONLY and sub[col].nunique() < 2):
        return None
    confs = [k for k in config_columns(sub) if k != col]
    varying = [k for k in confs if sub.groupby("family", dropna=False)[k].nunique(dropna=False).max() > 1]
    fixed = {k: sub[k].iloc[0] for k in confs if sub[k].nunique(dropna=False) == 1 and sub[k].notna().all()}
    sub = sub.sort_values(varying + [col, "family"], key=order_key, kind="stable")
    keep = [col, "family", *varying, "n"] + [x for m in METRICS for x in (m[0], f"{m[0]}_std")]
    return Table(axis, title, hardware, sub[keep].reset_index(drop=True), [col, "family", *varying], fixed)


def value_text(v) -> str:
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
        cells_ = [value_text(row[k]) for k in t.id_cols] + [str(int(row["n"]))]
        cells_ += [(_cell(row, m, spec), bool(best[m].iloc[i])) for m, _, spec, _ in METRICS]
        body.append(cells_)
    return header, body


def caption(t: Table) -> str:
    fixed = ", ".join(f"{k}={value_text(v)}" for k, v in t.fixed.items())
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
    lines = [f"% {tex_escape(caption(t))}", f"\\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(map(tex_escape, header)) + r" \\", r"\midrule"]
    for r in body:
        out = [tex_escape(x) if isinstance(x, str) else
               (f"\\textbf{{{tex_escape(x[0])}}}" if x[1] and x[0] != DASH else tex_escape(x[0])) for x in r]
        lines.append(" & ".join(out) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"
