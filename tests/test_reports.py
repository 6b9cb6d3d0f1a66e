"""reports/make_tables.py: tables round-trip the records, Pareto front, figures (bad, empty, partial
and older inputs, axis tables: test_reports_inputs.py)."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from d2c.results import write_record
from d2c_reports import load as L
from d2c_reports import make_tables as mt
from d2c_reports import page, tables

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "reports" / "make_tables.py"

CPU, GPU = "Test CPU 9000", None
FUSION = {"llamagen": None, "mar": "none", "d2c_cross_attn": "cross_attn", "d2c_qformer": "qformer"}


def record(family="d2c_qformer", steps=16, cfg=2.0, seed=0, fid=10.0, gpu=GPU, status="ok", grid=None, **kw):
    """A complete schema-1 record; metric values derive from `fid` so every cell differs."""
    cid = f"{family}-s{steps}-c{cfg}-seed{seed}-{gpu or 'cpu'}"
    spi = 0.01 * (steps or 20) + 0.05 + 0.001 * seed
    rec = {
        "schema": 1, "cell_id": cid, "train_key": "tk", "status": status, "error": None, "family": family,
        "config": {"model": "llamagen" if family == "llamagen" else family.split("_")[0], "fusion": FUSION[family],
                   "discrete_model": None if family == "mar" else "gpt_tiny", "steps": steps,
                   "diffusion_steps": 50, "head_sampler": "ddpm", "precision": "fp32", "cfg": cfg, "temperature": 1.0, "num_images": 100,
                   "data": {"name": "shapes", "root": None, "image_size": None, "num_images": 10000, "seed": 0,
                            "on_bad": "skip"},
                   "seed": seed, "recipe": "small", "train_steps": None, "batch_size": 100,
                   "results_dir": f"/somewhere/{seed}", "device": None, "threads": None, "fault": None},
        "metrics": {"fid": fid, "is_mean": 3.0 + fid / 10, "is_std": 0.1, "kid_mean": 0.01, "kid_std": 0.001,
                    "precision": 0.5 + fid / 1000, "recall": 0.4 - fid / 1000, "class_accuracy": 0.9 - fid / 500,
                    "fid_detail": 2 * fid + 1, "spectral_distance": fid / 100, "high_pass_ratio": 0.5,
                    "rfid_kl": 1 + fid / 50, "rfid_vq": 3 + fid / 50},
        "speed": {"num_images": 100, "seconds_total": 100 * spi, "seconds_per_image": spi,
                  "images_per_second": 1 / spi, "stage1_seconds": 20 * spi, "stage2_seconds": 70 * spi,
                  "decode_seconds": 10 * spi, "ar_steps": 64, "mar_steps": steps, "diffusion_steps": 50,
                  "peak_memory_bytes": 1 << 30, "peak_memory_kind": "cpu_peak_rss_process_lifetime"},
        "train_seconds": {},
        "hardware": {"cpu_model": CPU, "gpu_name": gpu, "cpu_cores": 2, "torch": "2.14.1"},
        "versions": {"python": "3.12.0", "torch": "2.14.1", "d2c": "0.1.0"},
        "git_commit": "abc1234", "seed": seed, "grid": grid,
        "started_at": "2025-01-02T03:04:05+00:00", "finished_at": "2025-01-02T03:09:05+00:00",
    }
    if family == "llamagen":  # as the harness resolves it: no MAR steps, no diffusion head
        rec["config"]["steps"] = rec["config"]["diffusion_steps"] = rec["config"]["head_sampler"] = None
    if status == "failed":
        rec["error"], rec["metrics"] = "RuntimeError: boom", {}
    rec.update(kw)
    return rec


def fid_of(family, steps, cfg, seed):
    return {"llamagen": 30.0, "mar": 20.0, "d2c_cross_attn": 12.0, "d2c_qformer": 10.0}[family] \
        + 64 / (steps or 64) + cfg + 0.5 * seed


def sweep():
    """3 seeds x families x steps (cfg 2.0) + a cfg sweep for qformer, and one failed run."""
    recs = []
    for fam in L.FAMILY_NAMES:
        for steps in ((None,) if fam == "llamagen" else (4, 16, 64)):
            for seed in range(3):
                recs.append(record(fam, steps, 2.0, seed, fid_of(fam, steps, 2.0, seed)))
    recs += [record("d2c_qformer", 16, c, 0, fid_of("d2c_qformer", 16, c, 0)) for c in (1.0, 4.0)]
    recs.append(record("mar", 256, 2.0, 0, status="failed"))
    return recs


def write_grid(path: Path):
    import matplotlib.pyplot as plt
    path.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, np.random.default_rng(0).random((16, 16, 3)))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One full run of make_tables on a sweep with a second hardware group and grids."""
    res = tmp_path_factory.mktemp("results")
    recs = sweep()
    for r in recs[:2]:  # two grids
        r["grid"] = f"grids/{r['cell_id']}.png"
        write_grid(res / r["grid"])
    recs[2]["grid"] = "grids/missing.png"
    recs.append(record("d2c_qformer", 16, 2.0, 0, 5.0, gpu="Test GPU H1"))  # same cell, other hardware
    for r in recs:
        write_record(res, r)
    rc = mt.main(["--results", str(res), "--out", str(res / "report")])
    return res, res / "report", recs, rc


def parse_md_table(path: Path) -> pd.DataFrame:
    rows = [ln for ln in path.read_text().splitlines() if ln.startswith("|")]
    split = lambda ln: [c.strip() for c in ln.strip().strip("|").split(" | ")]  # noqa: E731
    return pd.DataFrame([split(r) for r in rows[2:]], columns=split(rows[0]))


def parse_tex_table(path: Path) -> pd.DataFrame:
    text = path.read_text()
    assert r"\toprule" in text and r"\midrule" in text and r"\bottomrule" in text
    body = text.split(r"\toprule")[1].split(r"\bottomrule")[0]
    lines = [ln.removesuffix(r" \\").strip() for ln in body.splitlines() if ln.strip() and ln.strip() != r"\midrule"]
    split = lambda ln: [c.strip() for c in ln.split(" & ")]  # noqa: E731
    return pd.DataFrame([split(r) for r in lines[1:]], columns=split(lines[0]))


def unbold(s: str) -> tuple[str, bool]:
    m = re.fullmatch(r"\*\*(.*)\*\*|\\textbf\{(.*)\}", s)
    return ((m[1] or m[2]), True) if m else (s, False)


def mean_std(s: str):
    s = unbold(s)[0].replace(r"$\pm$", "±")
    parts = [float(p) for p in s.split("±")]
    return parts[0], (parts[1] if len(parts) > 1 else None)


def expected(recs, hw_gpu=GPU):
    ok = [r for r in recs if r["status"] == "ok" and r["hardware"]["gpu_name"] == hw_gpu]
    rows = [{"family": r["family"], "steps": r["config"]["steps"], "cfg": r["config"]["cfg"], **r["metrics"],
             **r["speed"]} for r in ok]
    norm = lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)  # noqa: E731
    return {(k[0], norm(k[1]), float(k[2])): g
            for k, g in pd.DataFrame(rows).groupby(["family", "steps", "cfg"], dropna=False)}


def tol(spec, v):
    if spec.endswith("f"):
        return 0.51 * 10 ** -int(spec[1:-1])
    return abs(v) * 10 ** (1 - int(spec[1:-1])) + 1e-12


def test_exit_code_and_files(built):
    res, out, _, rc = built
    assert rc == 0
    for f in ("report.md", "report.html", "cells.csv", "runs.csv"):
        assert (out / f).stat().st_size > 100


@pytest.mark.parametrize("fmt", ["md", "tex"])
def test_steps_table_round_trips(built, fmt):
    """Every cell of the MAR-steps table equals mean/std/n over the seeds of its records."""
    res, out, recs, _ = built
    hw = page.slug(L.hardware_label({"cpu_model": CPU, "gpu_name": GPU}))
    path = out / "tables" / hw / f"steps.{fmt}"
    t = (parse_md_table if fmt == "md" else parse_tex_table)(path)
    exp = expected(recs)
    assert "llamagen" not in set(t["family"])  # no MAR steps for llamagen
    assert len(t) == 3 * 3 + 2  # 3 families x 3 steps + 2 extra cfg values
    for _, row in t.iterrows():
        key = (row["family"].replace(r"\_", "_"), float(row["steps"]), float(row["cfg"]))
        g = exp[key]
        assert int(row["n"]) == len(g)
        for col, header, spec, _ in L.METRICS:
            m, s = mean_std(row[header])
            assert abs(m - g[col].mean()) <= tol(spec, g[col].mean()), (key, col)
            if len(g) > 1:
                assert abs(s - g[col].std(ddof=1)) <= tol(tables.std_spec(spec), g[col].std(ddof=1)), (key, col)
            else:
                assert s is None


def test_best_marked_per_column(built):
    _, out, _, _ = built
    hw = page.slug(L.hardware_label({"cpu_model": CPU, "gpu_name": GPU}))
    for fmt, parse in (("md", parse_md_table), ("tex", parse_tex_table)):
        t = parse(out / "tables" / hw / f"steps.{fmt}")
        for _, header, _, higher in L.METRICS:
            vals = [mean_std(v)[0] for v in t[header]]
            best = max(vals) if higher else min(vals)
            marked = [unbold(v)[1] for v in t[header]]
            assert marked == [v == best for v in vals], (fmt, header)


def test_cells_frame_equals_records(built):
    """The intermediate DataFrame: means exact, hardware never averaged, failed runs absent."""
    res, _, recs, _ = built
    runs, problems = L.load(res)
    assert problems == [] and len(runs) == len(recs)
    c = L.cells(runs)
    exp = expected(recs)
    cpu_only = c[c["hardware"] == L.hardware_label({"cpu_model": CPU})]
    assert len(cpu_only) == len(exp)
    for _, row in cpu_only.iterrows():
        g = exp[(row["family"], None if pd.isna(row["steps"]) else float(row["steps"]), row["cfg"])]
        assert row["n"] == len(g)
        assert row["fid"] == pytest.approx(g["fid"].mean(), rel=1e-12)
        assert row["images_per_second"] == pytest.approx(g["images_per_second"].mean(), rel=1e-12)
        assert row["stage2_s_img"] == pytest.approx((g["stage2_seconds"] / 100).mean(), rel=1e-12)
    gpu = c[c["hardware"] == L.hardware_label({"cpu_model": CPU, "gpu_name": "Test GPU H1"})]
    assert len(gpu) == 1 and gpu["n"].item() == 1 and gpu["fid"].item() == 5.0
    assert 256 not in set(c["steps"])  # the failed run
    assert "results_dir" not in c.columns  # where a run wrote is not part of its cell
    assert "data.name" in c.columns and set(c["data.name"]) == {"shapes"}


def test_tables_grouped_by_hardware(built):
    _, out, _, _ = built
    gpu_dir = out / "tables" / page.slug(L.hardware_label({"cpu_model": CPU, "gpu_name": "Test GPU H1"}))
    t = parse_md_table(gpu_dir / "steps.md")
    assert len(t) == 1 and t["n"].tolist() == ["1"] and mean_std(t["FID"][0]) == (5.0, None)
    report = (out / "report.md").read_text()
    assert report.count("## Measured: ") == 2


def test_every_axis_table_written(built):
    _, out, _, _ = built
    hw = out / "tables" / page.slug(L.hardware_label({"cpu_model": CPU, "gpu_name": GPU}))
    for axis in L.AXES:
        if axis not in L.VARIED_ONLY:   # the fusion knobs: a table only where one is swept
            assert (hw / f"{axis}.md").is_file() and (hw / f"{axis}.tex").is_file()
    assert not list(hw.glob("fusion_*"))
    fusion = parse_md_table(hw / "fusion.md")
    assert set(fusion["fusion"]) == {"none", "cross_attn", "qformer"}
    dm = parse_md_table(hw / "discrete_model.md")
    assert "mar" not in set(dm["family"]) and "llamagen" in set(dm["family"])
    assert set(parse_md_table(hw / "cfg.md")["cfg"]) == {"1", "2", "4"}
    assert "Cls. acc." in fusion.columns


def is_png(p: Path, min_bytes=2000):
    return p.is_file() and p.stat().st_size > min_bytes and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figures_written(built):
    _, out, _, _ = built
    for hw in (L.hardware_label({"cpu_model": CPU}), L.hardware_label({"cpu_model": CPU, "gpu_name": "Test GPU H1"})):
        for name in ("fronts", "fronts_detail", "fid_vs_steps", "stage_times"):
            base = out / "figures" / page.slug(hw) / name
            assert is_png(base.with_suffix(".png")), base
            assert base.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"
    report = (out / "report.md").read_text()
    assert report.count("![") >= 6 and "fronts.png" in report
    # the answer first (fronts, speed at equal FID), the run metadata last
    heads = re.findall(r"^## (.*)$", report, re.M)
    assert heads[0].startswith("Speed vs FID: ") and heads[-1] == "Run metadata"
    assert report.index("**Speed at equal FID**") < report.index("## Measured: ")
    # the sample grids by family: only where a record's grid file exists (two records have one)
    panels = sorted(out.glob("figures/*/sample_grids.png"))
    assert panels and all(is_png(p) for p in panels) and "sample_grids.png" in report


def test_grid_pages(built):
    res, out, recs, _ = built
    pages = sorted((out / "grids").glob("*.md"))
    assert pages
    text = "\n".join(p.read_text() for p in pages)
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == 2
    for p in pages:
        for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", p.read_text()):
            assert is_png((p.parent / link).resolve(), min_bytes=50)
    assert "grid file missing" in text
    assert (out / "grids" / pages[0].with_suffix(".html").name).is_file()


def test_report_metadata_failed_and_published(built):
    res, out, _, _ = built
    md = (out / "report.md").read_text()
    for s in (CPU, "Test GPU H1", "abc1234", "2.14.1", "2025-01-02 03:04:05", "3.12.0",
              "## Failed runs", "RuntimeError: boom"):
        assert s in md, s
    measured, published = md.split("## Published numbers")
    assert "NOT measured" in published and "MAR-B" in published and "2.31" in published
    assert "LlamaGen-B" in published and "5.46" in published
    # sources point inside the repository (docs/design.md) and at public files, nowhere else
    assert "docs/design.md section 3" in published
    assert set(re.findall(r"[\w./-]*design\.md", md, flags=re.I)) == {"docs/design.md"}
    for name in ("MAR-B", "MAR-L", "MAR-H", "LlamaGen"):
        assert name not in measured
    cells_csv = (out / "cells.csv").read_text()
    assert "MAR-B" not in cells_csv and "published" not in cells_csv
    h = (out / "report.html").read_text()
    assert h.startswith("<!doctype html>") and "<table>" in h and "<img " in h and "<strong>" in h


def test_published_csv_sources():
    pub = pd.read_csv(SCRIPT.parent / "published.csv", dtype=str, keep_default_na=False)
    # every row names its paper, its public repository and the section of docs/design.md that cites it
    for src in pub["source"]:
        assert "arXiv " in src and "github.com/" in src and "docs/design.md section 3" in src, src
    assert not pub.duplicated(["model", "mar_iterations", "diffusion_steps"]).any()
    # only rows with a traceable source: one row per model (no MAR-H at 64 iterations / 50 steps)
    assert pub["model"].tolist() == ["MAR-B", "MAR-L", "MAR-H", "LlamaGen-B", "LlamaGen-L", "LlamaGen-XL"]
    assert set(pub.loc[pub["family"] == "mar", "mar_iterations"]) == {"256"}
    got = {r.model: (r.fid, r["is"]) for _, r in pub.iterrows()}
    assert got["MAR-B"] == ("2.31", "281.7") and got["MAR-L"] == ("1.78", "296.0")
    assert got["MAR-H"] == ("1.55", "303.7") and got["LlamaGen-B"][0] == "5.46"
    # LlamaGen's README lists GPT-XL only at 24x24 tokens: no 16x16 FID, left out
    assert got["LlamaGen-L"][0] == "3.80" and got["LlamaGen-XL"][0] == ""
    text = (SCRIPT.parent / "published.csv").read_text()
    assert set(re.findall(r"[\w./-]*design\.md", text, flags=re.I)) == {"docs/design.md"} and "../" not in text


# ---------------------------------------------------------------- Pareto front

def test_pareto_hand_made():
    df = pd.DataFrame({"ips": [1.0, 2.0, 3.0, 2.0, 0.5, 3.0, np.nan, 4.0, 4.0],
                       "fid": [5.0, 6.0, 8.0, 7.0, 4.0, 9.0, 1.0, 8.0, 8.0]},
                      index=list("abcdefghi"))
    front = tables.pareto_front(df, "ips", "fid")
    # e: slowest, best FID; a, b: trade-offs; c dominated by h/i (faster, same FID); d by b; f by c
    # reversed directions (slow and high FID wins): d dominates b, f dominates c and h
    assert list(front.index) == ["e", "a", "b", "h", "i"]
    assert list(tables.pareto_front(df, "ips", "fid", higher_x=False, lower_y=False).index) == ["e", "a", "d", "f"]


def brute_front(xs, ys):
    n = len(xs)
    return {i for i in range(n) if not any(
        xs[j] >= xs[i] and ys[j] <= ys[i] and (xs[j] > xs[i] or ys[j] < ys[i]) for j in range(n))}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), max_size=25))
def test_pareto_matches_brute_force(points):
    df = pd.DataFrame(points, columns=["x", "y"], dtype=float)
    got = set(tables.pareto_front(df, "x", "y").index)
    assert got == brute_front(df["x"].tolist(), df["y"].tolist())
