"""reports/make_tables.py on awkward inputs: malformed, empty, failed-only and partial records,
records that predate an axis, an unwritable report folder, knob and acceleration labels, and
ImageNet cells beside the embedded ones."""
from __future__ import annotations

import json
import re
import subprocess
import sys

from d2c.results import write_record
from d2c_reports import load as L
from d2c_reports import make_tables as mt
from d2c_reports import page
from test_reports import CPU, GPU, SCRIPT, mean_std, parse_md_table, record


def test_malformed_records_named_and_skipped(tmp_path, capsys):
    good = record()
    write_record(tmp_path, good)
    recs = tmp_path / "records"
    (recs / "badjson.json").write_text("{not json")
    (recs / "schema2.json").write_text(json.dumps({**record(), "cell_id": "schema2", "schema": 2}))
    (recs / "nokeys.json").write_text(json.dumps({"schema": 1, "cell_id": "nokeys"}))
    (recs / "array.json").write_text("[1, 2]")
    bad_metric = record(cell_id="badmetric")
    bad_metric["metrics"]["fid"] = "twelve"
    (recs / "badmetric.json").write_text(json.dumps(bad_metric))
    bad_hw = record(cell_id="badhw", hardware="a string")
    (recs / "badhw.json").write_text(json.dumps(bad_hw))
    assert mt.main(["--results", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    for name in ("badjson.json", "schema2.json", "nokeys.json", "array.json", "badmetric.json", "badhw.json"):
        assert re.search(rf"skipped malformed record: .*{name}", err), name
    assert "Traceback" not in err
    md = (tmp_path / "report" / "report.md").read_text()
    assert "**1 ok**" in md and "6 malformed" in md and "badjson.json" in md


def test_empty_results(tmp_path, capsys):
    assert mt.main(["--results", str(tmp_path), "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "no valid result records" in err
    md = (tmp_path / "o" / "report.md").read_text()
    assert "No measured results yet" in md and "## Published numbers" in md and "MAR-B" in md


def test_only_failed_runs(tmp_path, capsys):
    write_record(tmp_path, record(status="failed"))
    assert mt.main(["--results", str(tmp_path)]) == 0
    assert "no successful runs" in capsys.readouterr().err
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Failed runs" in md and "## Measured" not in md


def test_partial_results_missing_optional_keys(tmp_path):
    """ok records without metrics/speed/hardware/versions/grid still make tables, dashes for gaps."""
    r = record()
    for k in ("metrics", "speed", "hardware", "versions", "grid", "git_commit", "started_at", "seed"):
        r.pop(k)
    r["config"].pop("discrete_model")
    write_record(tmp_path, r)
    assert mt.main(["--results", str(tmp_path)]) == 0
    hw = tmp_path / "report" / "tables" / page.slug(L.hardware_label({}))
    t = parse_md_table(hw / "steps.md")
    assert t["FID"].tolist() == [L.DASH] and t["n"].tolist() == ["1"]


def test_unwritable_report_folder(tmp_path, capsys):
    write_record(tmp_path, record())
    (tmp_path / "blocker").write_text("a file where the report folder should go")
    assert mt.main(["--results", str(tmp_path), "--out", str(tmp_path / "blocker")]) == 1
    assert "cannot write the report" in capsys.readouterr().err


def test_cli_missing_path_and_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, str(SCRIPT), "--results", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "does not exist" in p.stderr and "Traceback" not in p.stderr


def test_md_to_html_subset():
    h = page.md_to_html("# T\n\npara **b** `c` [x](p.md) ![i](a%20b.png)\n\n| a | b |\n|---|---:|\n| 1 \\| 2 | 3 |\n"
                      "\n- one\n- two\n")
    assert "<h1>T</h1>" in h and "<strong>b</strong>" in h and "<code>c</code>" in h
    assert '<a href="p.html">x</a>' in h and '<img alt="i" src="a%20b.png">' in h
    assert "<td>1 | 2</td>" in h and h.count("<li>") == 2


def test_fusion_knob_table_only_when_swept(tmp_path):
    """A Q-Former query sweep gets its own table (Q-Former cells only, one row per value) beside
    the fusion table, which it does not overwrite (file names of dotted axes)."""
    recs = [record("d2c_cross_attn", 16, 2.0, 0, 12.0)]
    recs[0]["config"].update({"fusion.layers": [0, 1, 2], "fusion.d_fuse": 128})
    for q, fid in ((4, 9.0), (16, 10.0)):
        for seed in (0, 1):
            r = record("d2c_qformer", 16, 2.0, seed, fid + seed, cell_id=f"qf{q}-{seed}")
            r["config"].update({"fusion.num_queries": q, "fusion.depth": 2, "fusion.d_fuse": 128})
            recs.append(r)
    for r in recs:
        write_record(tmp_path, r)
    assert mt.main(["--results", str(tmp_path), "--out", str(tmp_path / "report")]) == 0
    hw = tmp_path / "report" / "tables" / page.slug(L.hardware_label({"cpu_model": CPU, "gpu_name": GPU}))
    t = parse_md_table(hw / "fusion_num_queries.md")
    assert t["fusion.num_queries"].tolist() == ["4", "16"] and set(t["family"]) == {"d2c_qformer"}
    assert [mean_std(v)[0] for v in t["FID"]] == [9.5, 10.5] and t["n"].tolist() == ["2", "2"]
    assert set(parse_md_table(hw / "fusion.md")["fusion"]) == {"cross_attn", "qformer"}
    for knob in ("depth", "layers", "d_fuse"):   # one value each: no table
        assert not (hw / f"fusion_{knob}.md").exists()
    assert "### Q-Former queries" in (tmp_path / "report" / "report.md").read_text()


def test_records_that_predate_an_axis_read_as_its_off_value(tmp_path):
    """A record written before head_sampler / diffusion_steps_last existed reads as today's
    sampler (null for LlamaGen, which has no head), so old and new records form one table."""
    from d2c.results import ADDED_KEYS, read_record, record_path
    old, llama, new = record(seed=1), record(family="llamagen", steps=None), record(seed=2)
    for r in (old, llama):
        for k in ADDED_KEYS:
            r["config"].pop(k, None)
    new["config"].update(head_sampler="ddim", diffusion_steps_last=5)
    for r in (old, llama, new):
        write_record(tmp_path, r)
    got = {r["cell_id"]: read_record(record_path(tmp_path, r["cell_id"]))["config"] for r in (old, llama, new)}
    assert (got[old["cell_id"]]["head_sampler"], got[old["cell_id"]]["diffusion_steps_last"]) == ("ddpm", None)
    assert (got[llama["cell_id"]]["head_sampler"], got[llama["cell_id"]]["diffusion_steps_last"]) == (None, None)
    assert got[old["cell_id"]]["precision"] == got[llama["cell_id"]]["precision"] == "fp32"
    assert (got[new["cell_id"]]["head_sampler"], got[new["cell_id"]]["diffusion_steps_last"]) == ("ddim", 5)
    runs, problems = L.load(tmp_path)
    assert not problems and sorted(runs["head_sampler"].fillna("-")) == ["-", "ddim", "ddpm"]


def test_imagenet_cells_in_their_own_section_beside_the_published_rows(tmp_path):
    """recipe=imagenet records never share a table or figure with the embedded default: their own
    section per hardware, and a labelled table after the published numbers."""
    recs = [record("mar", 16, 2.0, 0, 20.0), record("d2c_qformer", 16, 2.0, 0, 10.0)]
    im = record("mar", 16, 2.9, 0, 2.5, cell_id="mar-b-imagenet")
    im["config"].update(recipe="imagenet", mar_model="mar_base", train_epochs=0.0,
                        data={**im["config"]["data"], "name": "imagefolder", "root": "/data/imagenet/train"})
    for r in recs + [im]:
        write_record(tmp_path, r)
    assert mt.main(["--results", str(tmp_path), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    hw = L.hardware_label({"cpu_model": CPU, "gpu_name": GPU})
    assert f"## Measured: {hw}" in text and f"## Measured at ImageNet-256 (recipe=imagenet): {hw}" in text
    embedded = parse_md_table(tmp_path / "report" / "tables" / page.slug(hw) / "steps.md")
    assert sorted(mean_std(v)[0] for v in embedded["FID"]) == [10.0, 20.0]          # not the 2.5
    imagenet = parse_md_table(tmp_path / "report" / "tables" / page.slug(f"imagenet {hw}") / "steps.md")
    assert [mean_std(v)[0] for v in imagenet["FID"]] == [2.5]
    published = text[text.index("## Published numbers"):]
    assert "### Measured by this harness at ImageNet-256" in published and "mar_base" in published
    assert published.index("MAR-B") < published.index("### Measured by this harness")
