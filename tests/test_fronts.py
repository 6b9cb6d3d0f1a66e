"""The report's fronts (reports/fronts.py): settings as overrides, fronts over confirmed points,
the speed at equal FID against a brute-force reading of its definition, and a figure whose
labels never overlap and whose legend stays off the data."""
from __future__ import annotations

import math
import random

import pandas as pd
import pytest

from d2c.results import write_record
from d2c_reports import figures
from d2c_reports import fronts as F
from d2c_reports import load as L
from test_reports import record


def _rec(family, steps, seed, fid, ips, **config):
    r = record(family, steps, 2.0, seed, fid)
    r["cell_id"] += "-" + "-".join(f"{k}{v}" for k, v in sorted(config.items())) + f"-{ips:.4f}"
    r["config"].update(config)
    r["speed"].update(images_per_second=ips, seconds_per_image=1 / ips)
    return r


def _points(tmp_path, recs) -> pd.DataFrame:
    for r in recs:
        write_record(tmp_path, r)
    runs, problems = L.load(tmp_path)
    assert not problems
    return F.points(L.cells(runs))


def test_settings_are_the_overrides_that_differ_from_the_default(tmp_path):
    p = _points(tmp_path, [_rec("mar", 16, 0, 10.0, 5.0, cfg=3.0, diffusion_steps=None),
                           _rec("mar", 8, 0, 11.0, 9.0, cfg=3.0, diffusion_steps=10, head_sampler="ddim",
                                diffusion_steps_last=5, uncond_refresh=2, precision="bf16")])
    assert sorted(p["settings"]) == ["default", "steps=8 diffusion_steps=10 diffusion_steps_last=5 head_sampler=ddim "
                                                "uncond_refresh=2 precision=bf16"]
    assert set(p["group"]) == {"mar"}   # no training axis differs: the family alone


def _random_search(rng: random.Random):
    recs = []
    for fam in ("mar", "d2c_cross_attn", "llamagen"):
        for i in range(rng.randint(2, 7)):
            steps = None if fam == "llamagen" else 4 + i
            fid, ips = rng.uniform(5, 30), rng.uniform(0.5, 40)
            seeds = rng.choice([(0,), (0, 1), (0, 1)])
            for s in seeds:
                recs.append(_rec(fam, steps, s, fid + rng.uniform(-2, 2), ips * rng.uniform(0.9, 1.1), cfg=2.0 + i))
    return recs


@pytest.mark.parametrize("case", range(6))
def test_equal_fid_matches_its_definition(tmp_path, case):
    rng = random.Random(case)
    p = _points(tmp_path, _random_search(rng))
    table, target, spread, ref = F.equal_quality(p, "fid")
    f = F.fronts(p, "fid")
    # brute force: each family's front over its confirmed points (all of them when none is)
    for g, d in p.groupby("group"):
        conf = d[d["n"] >= 2]
        pool = conf if len(conf) else d
        front = {i for i, r in pool.iterrows() if not any(
            (o["fid"] <= r["fid"] and o[F.SPEED] >= r[F.SPEED] and (o["fid"] < r["fid"] or o[F.SPEED] > r[F.SPEED]))
            for _, o in pool.iterrows())}
        assert set(f[f["group"] == g].index) == front
    stds = p.loc[p["n"] >= 2, "fid_std"].dropna()
    assert spread == pytest.approx(math.sqrt((stds ** 2).mean()) if len(stds) else 0.0)
    judged = f[~f["one_seed"]] if (~f["one_seed"]).any() else f   # confirmed fronts only, where there are some
    assert target == pytest.approx(max(judged.loc[judged["group"] == g, "fid"].min() for g in set(judged["group"])))
    picks = {g: d[d["fid"] <= target + spread][F.SPEED].max() for g, d in judged.groupby("group")}
    assert ref == min(picks, key=picks.get)   # every family reaches the target: the slowest one there
    for _, row in table.iterrows():
        if row["family"] not in set(judged["group"]):
            assert row["settings"] == "one seed only: not compared"
            continue
        d = f[(f["group"] == row["family"]) & (f["fid"] <= target + spread)]
        if d.empty:
            assert row["point"] == "–"
            continue
        best = d.loc[d[F.SPEED].idxmax()]
        assert row["point"] == best["id"]
        assert row[f"speed vs {ref}"] == f"{best[F.SPEED] / picks[ref]:.2f}x"
    given, *_ = F.equal_quality(p, "fid", target=1e-3)   # a target no family reaches
    assert given.empty


def test_front_over_confirmed_points_only(tmp_path):
    """A one-seed point better on both axes stays off a front that has confirmed points."""
    recs = [_rec("mar", 8, s, 10.0 + s, 5.0, cfg=2.0) for s in (0, 1)]
    recs += [_rec("mar", 4, 0, 1.0, 50.0, cfg=2.0)]
    p = _points(tmp_path, recs)
    f = F.fronts(p)
    assert list(f["id"]) == ["M1"] and f["n"].tolist() == [2] and not f["one_seed"].any()
    alone = F.fronts(p[p["n"] == 1])
    assert alone["one_seed"].all()


def test_fronts_figure_labels_never_overlap_and_the_legend_is_outside(tmp_path, monkeypatch):
    rng = random.Random(3)
    recs = []
    for fam in ("mar", "d2c_cross_attn", "d2c_qformer"):   # crowded fronts: every point near the others
        for i in range(6):
            fid, ips = 10 + 0.05 * i + rng.random() * 0.02, 5 + 0.04 * i
            recs += [_rec(fam, 4 + i, s, fid + 0.01 * s, ips - 0.3 * ("q" in fam), cfg=float(i)) for s in (0, 1)]
    p = _points(tmp_path, recs)
    figs = []
    monkeypatch.setattr(figures, "_save", lambda fig, base: figs.append(fig) or [base])
    figures.fronts(p, tmp_path / "f")
    fig = figs[0]
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    labels = ax.texts
    f = F.fronts(p)
    assert sorted(t.get_text() for t in labels) == sorted(f["id"])   # ids only: the table holds the settings
    boxes = [t.get_window_extent(renderer) for t in labels]
    for i in range(len(boxes)):
        for j in range(i):
            a, b = boxes[i], boxes[j]
            assert min(a.x1, b.x1) <= max(a.x0, b.x0) or min(a.y1, b.y1) <= max(a.y0, b.y0), \
                (labels[i].get_text(), labels[j].get_text())
    legend = ax.get_legend()
    assert legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1
    entries = {t.get_text() for t in legend.get_texts()}
    assert entries == {"mar", "d2c_cross_attn", "d2c_qformer", "every setting run (faint)"}
    ticks = [t for t in ax.get_xticklabels() if t.get_text()]
    tb = sorted((t.get_window_extent(renderer) for t in ticks), key=lambda b: b.x0)
    assert all(a.x1 <= b.x0 for a, b in zip(tb, tb[1:]))   # tick labels side by side, never on each other


def test_steps_sweep_is_the_setting_run_at_most_step_counts(tmp_path):
    """FID vs MAR steps draws each family's steps sweep, not a search's one-off settings (even one
    confirmed with two seeds)."""
    recs = [_rec("mar", s, 0, 10.0, 5.0, cfg=3.0) for s in (8, 16, 64)]
    recs += [_rec("mar", 4, seed, 9.0, 30.0, cfg=2.5, temperature=0.8) for seed in (0, 1)]
    recs += [_rec("d2c_cross_attn", s, 0, 8.0, 4.0, cfg=4.0) for s in (16, 64)]
    recs += [_rec("d2c_cross_attn", 2, 0, 7.0, 20.0, cfg=2.0)]
    for r in recs:
        write_record(tmp_path, r)
    runs, _ = L.load(tmp_path)
    got = F.steps_sweep(runs)
    assert sorted(zip(got["family"], got["steps"])) == [("d2c_cross_attn", 16), ("d2c_cross_attn", 64),
                                                        ("mar", 8), ("mar", 16), ("mar", 64)]
