"""The ablation harness (ablations/run.py): the design-card sweep on tiny presets, skip-finished,
resume after SIGKILL, concurrent cells training a shared stage once, failed cells, and the
one-line error for invalid configs (property-based)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "ablations" / "run.py"
TINY = ["recipe=tiny", "data=shapes_tiny", "num_images=20", "batch_size=10"]
sys.path.insert(0, str(REPO / "ablations"))


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    return env


@pytest.fixture(scope="session")
def metrics_cache(tmp_path_factory):
    """A metrics cache made once for the session (the layout and detail feature nets, the real
    reference set's features and spectrum: about a minute) and copied into each results dir's
    cache, so that no sweep below makes them again."""
    from d2c.data.shapes import make_shapes
    from d2c.metrics import compute_metrics
    from d2c.metrics.detail import detail_metrics
    d = tmp_path_factory.mktemp("metrics_cache")
    images = make_shapes(20, seed=3)[0]
    compute_metrics(images, cache_dir=d)
    detail_metrics(images, cache_dir=d)
    return d


def _results(tmp_path, metrics_cache, name="results"):
    rd = tmp_path / name
    shutil.copytree(metrics_cache, rd / "cache", dirs_exist_ok=True)   # makes rd too
    return rd


def run(args, rd=None, timeout=300, **kw):
    cmd = [sys.executable, str(RUN), *args] + ([f"results_dir={rd}"] if rd else [])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=kw.get("cwd", REPO))


def records(rd):
    from d2c.results import read_records
    return read_records(rd, on_bad=lambda e: pytest.fail(str(e)))


def kill_when(args: list[str], ready, timeout: float, what: str) -> None:
    """Start a command in its own session and SIGKILL it (all its processes) once ready() holds."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(), cwd=REPO,
                            start_new_session=True)
    try:
        deadline = time.time() + timeout
        while not ready():
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, f"{what} within {timeout} s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def trained(out: str) -> list[str]:
    return re.findall(r"^(?:\[[^]]*\] )?training (\S+) ->", out, re.M)


@pytest.mark.slow
def test_cache_only_then_train_only_then_the_cell(tmp_path, metrics_cache):
    """The separate jobs of a cluster run: --cache-only makes the tokenizers and the token cache,
    --train-only (d2c-train) the stages on top of it, the cell itself then trains nothing."""
    rd = _results(tmp_path, metrics_cache)
    p = run(["--cache-only", "model=mar", "steps=2", *TINY], rd)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert sorted(trained(p.stdout)) == ["kl", "vq"] and "cache ready for model=mar" in p.stdout
    assert len(list(rd.glob("cache/tokens-*/meta.json"))) == 1 and not (rd / "records").exists()
    p = run(["--train-only", "-m", "model=mar", "steps=2,3", *TINY], rd)    # one training config
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert trained(p.stdout) == ["mar"] and not (rd / "records").exists()
    p = run(["model=mar", "steps=2", *TINY], rd)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert trained(p.stdout) == [] and [r["status"] for r in records(rd)] == ["ok"]
    p = run(["--train-only", "model=mar", "steps=0", *TINY], rd)
    assert p.returncode == 2 and p.stderr.startswith("error: steps=0")


@pytest.mark.slow
def test_design_card_sweep_tiny_then_skip(tmp_path, metrics_cache):
    """`-m fusion=cross_attn,qformer steps=...`: every cell one record, each stage trained once
    (sampling axes never retrain); run again: every cell skipped, nothing trained."""
    rd = _results(tmp_path, metrics_cache)
    p = run(["-m", "fusion=cross_attn,qformer", "steps=2,3", *TINY], rd)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert sorted(trained(p.stdout)) == sorted(["kl", "vq", "gpt", "d2c_cross_attn", "d2c_qformer"])
    recs = records(rd)
    assert len(recs) == 4 and {r["status"] for r in recs} == {"ok"}
    assert {(r["family"], r["config"]["steps"]) for r in recs} == {
        (f, s) for f in ("d2c_cross_attn", "d2c_qformer") for s in (2, 3)}
    assert len({r["train_key"] for r in recs}) == 2
    for r in recs:
        assert (rd / r["grid"]).is_file() and r["metrics"]["fid"] > 0 and r["speed"]["mar_steps"] == r["config"]["steps"]
        assert r["versions"]["torch"] and r["hardware"]["cpu_cores"] and r["seed"] == 0 and "git_commit" in r
    assert "4 ok, 0 failed of 4 cells" in p.stdout and str(rd / "records") in p.stdout
    # as Hydra's own sweeper: the sweep's config beside its jobs; and the plan the sweep ran
    (sweep_dir,) = [d for d in (rd / "hydra").iterdir() if d.is_dir()]
    assert "fusion=cross_attn,qformer" in (sweep_dir / "multirun.yaml").read_text()
    (plan,) = (rd / "hydra").glob("plan-*.json")
    assert sorted(c["cell_id"] for c in json.loads(plan.read_text())) == sorted(r["cell_id"] for r in recs)
    again = run(["-m", "fusion=cross_attn,qformer", "steps=2,3", *TINY], rd)
    assert again.returncode == 0 and "4 already done (skipped), 0 to run" in again.stdout
    assert trained(again.stdout) == [] and len(records(rd)) == 4


@pytest.mark.slow
def test_failed_cell_is_recorded_and_others_finish(tmp_path, metrics_cache):
    rd = _results(tmp_path, metrics_cache)
    p = run(["-m", "model=mar", "steps=2", "fault=raise,null", *TINY], rd)
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    recs = {r["config"]["fault"]: r for r in records(rd)}
    assert recs["raise"]["status"] == "failed" and "fault injected" in recs["raise"]["error"]
    assert "\n" not in recs["raise"]["error"]
    assert recs[None]["status"] == "ok"
    assert "1 ok, 1 failed of 2 cells" in p.stdout and "fault injected" in p.stdout
    # a failed cell is retried by the next run, the finished one skipped
    again = run(["-m", "model=mar", "steps=2", "fault=raise,null", *TINY], rd)
    assert "1 already done (skipped), 1 to run" in again.stdout


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path, metrics_cache):
    """SIGKILL the sweep while a stage trains (after its first checkpoint); the rerun resumes
    from that checkpoint and writes exactly one whole record."""
    rd = _results(tmp_path, metrics_cache)
    args = [sys.executable, str(RUN), "model=mar", "steps=2", "train_steps=30", *TINY, f"results_dir={rd}"]
    kill_when(args, lambda: list(rd.glob("ckpt/kl-*/step_*/state.pt")), 240, "no checkpoint")
    assert not (rd / "records").exists() or not list((rd / "records").iterdir())
    p = run(["model=mar", "steps=2", "train_steps=30", *TINY], rd)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert re.search(r"^(?:\[[^]]*\] )?training kl -> .* \(resuming from step_\d+\)", p.stdout, re.M), p.stdout[-3000:]
    assert sorted(trained(p.stdout)) == ["kl", "mar", "vq"]
    recs = records(rd)
    assert len(recs) == 1 and recs[0]["status"] == "ok"
    assert sorted(x.name for x in (rd / "records").iterdir()) == [f"{recs[0]['cell_id']}.json"]


@pytest.mark.slow
def test_concurrent_cells_train_shared_stages_once(tmp_path, metrics_cache):
    rd = _results(tmp_path, metrics_cache)
    procs = [subprocess.Popen([sys.executable, str(RUN), "model=d2c", f"steps={s}", *TINY, f"results_dir={rd}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=REPO)
             for s in (2, 3)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    all_trained = trained(outs[0]) + trained(outs[1])
    assert sorted(all_trained) == sorted(["kl", "vq", "gpt", "d2c_qformer"]), all_trained
    recs = records(rd)
    assert len(recs) == 2 and len({r["train_key"] for r in recs}) == 1


@pytest.mark.slow
def test_fusion_knob_sweep_trains_each_variant(tmp_path, metrics_cache):
    """`fusion.num_queries=4,8` (8: mar_tiny's): two stage-2 models, one with 4 learned queries;
    records carry the values that ran; the same sweep without the knob is already done."""
    from d2c.checkpoint import load_trained
    rd = _results(tmp_path, metrics_cache)
    args = ["-m", "model=d2c", "fusion=qformer", "steps=2", *TINY]
    p = run([*args, "fusion.num_queries=4,8"], rd)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert sorted(r["config"]["fusion.num_queries"] for r in records(rd)) == [4, 8]
    models = [load_trained(d) for d in sorted((rd / "ckpt").glob("d2c_qformer-*")) if d.is_dir()]
    assert sorted(m.fusion.queries.shape[1] for m in models) == [4, 8]
    again = run(args, rd)
    assert again.returncode == 0 and trained(again.stdout + again.stderr) == [] and len(records(rd)) == 2


# --------------------------------------------------------------------------- invalid configs


def test_invalid_config_cli_one_line_exit_2(tmp_path):
    p = run(["-m", "model=mar", "fusion=qformer", "steps=1,2"], tmp_path / "r")
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and p.stderr.startswith("error: fusion=qformer:")
    assert "allowed: none" in p.stderr and not (tmp_path / "r").exists()
    p = run(["nosuchkey=3"], tmp_path / "r")
    assert p.returncode == 2 and p.stderr.startswith("error: nosuchkey=3: unknown key") and "\n" not in p.stderr.strip()


from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import d2c_harness as H  # noqa: E402
from d2c.config import FUSIONS, MODELS  # noqa: E402
from d2c.precision import SAMPLING_PRECISIONS  # noqa: E402
from d2c.recipes import RECIPES  # noqa: E402
from d2c.sampling import HEAD_SAMPLERS  # noqa: E402

_word = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)
_bad_key = _word.filter(lambda k: k not in H.KEYS and not k.startswith("hydra") and k != "data")
_junk = st.one_of(_word, st.integers(-1000, 1000).map(str), st.floats(allow_nan=False, allow_infinity=False).map(str))
_int_keys = ("steps", "num_images", "batch_size")
_bad_value = st.one_of(
    st.tuples(st.sampled_from(_int_keys), st.one_of(st.integers(-100, 0).map(str), _word.filter(lambda w: w not in ("null",)), st.just("1.5"))),
    st.tuples(st.just("model"), _word.filter(lambda w: w not in MODELS and w != "null")),
    st.tuples(st.just("fusion"), _word.filter(lambda w: w not in FUSIONS and w != "null")),
    st.tuples(st.just("discrete_model"), _word.filter(lambda w: w not in H.GPT_PRESETS and w != "null")),
    st.tuples(st.just("data"), _word.filter(lambda w: w not in H.DATA_OPTIONS)),
    st.tuples(st.just("temperature"), st.floats(-10, 0).map(str)),
    st.tuples(st.just("cfg"), st.floats(-10, -0.01).map(str)),
    st.tuples(st.just("seed"), st.integers(-100, -1).map(str)),
    st.tuples(st.just("recipe"), _word.filter(lambda w: w not in RECIPES)),
    st.tuples(st.just("head_sampler"), _word.filter(lambda w: w not in HEAD_SAMPLERS)),
    st.tuples(st.just("precision"), _word.filter(lambda w: w not in SAMPLING_PRECISIONS)),
    st.tuples(st.sampled_from(("diffusion_steps_last", "uncond_refresh")),
              st.one_of(st.integers(-100, 0).map(str), st.just("1.5"), _word.filter(lambda w: w != "null"))),
    st.tuples(st.just("mar_model"), _word.filter(lambda w: w not in H.MAR_PRESETS and w != "null")),
    st.tuples(st.sampled_from(("fusion.num_queries", "fusion.depth", "fusion.d_fuse")),
              st.one_of(st.integers(-100, 0).map(str), st.just("1.5"), _word.filter(lambda w: w != "null"))),
    st.tuples(st.just("fusion.num_queries"), st.integers(17, 1000).map(str)),   # > mar_small's buffer_size 16
    st.tuples(st.just("fusion.d_fuse"), st.integers(1, 1000).filter(lambda v: v % 4).map(str)),   # 4 heads
    st.tuples(st.just("fusion.layers"), st.sampled_from(("[]", "[0,0]", "[-1]", "[3]", "[0,9]", "abc", "[a]", "1.5"))),
    st.tuples(st.sampled_from(("fusion.kind", "fusion.num_heads", "fusion.codebook_size")), st.just("4")),
    st.tuples(st.just("fusion"), st.sampled_from(("cross_attn", "qformer"))),
)


@pytest.fixture(scope="module")
def run_mod():
    import importlib
    return importlib.import_module("run")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(("key", "value")), key=_bad_key, junk=_junk, kv=_bad_value,
       good=st.lists(st.sampled_from(["steps=2,3", "cfg=1.5", "fusion=cross_attn,qformer", "seed=1"]), max_size=2))
def test_invalid_configs_one_line_exit_2(run_mod, monkeypatch, capsys, tmp_path, kind, key, junk, kv, good):
    """Random bad keys / values / combinations (mixed with good sweep axes): exit 2, one line on
    stderr naming the key and the allowed values, and nothing launched."""
    monkeypatch.setattr(run_mod, "task", lambda: pytest.fail("launched despite an invalid config"))
    monkeypatch.setattr(run_mod, "_environment", lambda: None)   # no env changes in the test process
    if kind == "key":
        bad, name = f"{key}={junk}", key
    else:
        name, val = kv
        bad = f"{name}={val}"
    args = [a for a in good if a.split("=")[0] != name]
    if kind == "value" and name == "fusion" and val in ("cross_attn", "qformer"):
        args = [a for a in args if not a.startswith("fusion")] + ["model=mar"]
    argv = ["-m", *args, bad, f"results_dir={tmp_path / 'r'}"]
    assert run_mod.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith(f"error: {name}="), err
    assert "allowed" in err, err
    assert not (tmp_path / "r").exists()


def test_plan_flag_prints_the_cells_and_trains_nothing(run_mod, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(run_mod, "task", lambda: pytest.fail("--plan launched the sweep"))
    monkeypatch.setattr(run_mod, "_environment", lambda: None)
    rd = tmp_path / "r"
    assert run_mod.main(["-m", "fusion=cross_attn,qformer", "steps=2,4", *TINY, f"results_dir={rd}", "--plan"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan: 4 cells, 2 training config(s); nothing run")
    rows = [ln for ln in out.splitlines() if ln.startswith("  [todo] ")]
    assert len(rows) == 4 and all("model=d2c" in ln for ln in rows)
    assert sorted(re.search(r"fusion=(\w+) steps=(\d+)", ln).groups() for ln in rows) == \
        [("cross_attn", "2"), ("cross_attn", "4"), ("qformer", "2"), ("qformer", "4")]
    assert not rd.exists()                                   # nothing trained, nothing written


def test_fusion_knobs_plan():
    """The fusion group's knobs: a value equal to the preset's (mar_tiny: 8 queries, depth 1,
    d_fuse 64, decoder blocks 0-1) is the cell without the knob; another value is a new cell with
    a new train key; records carry the values that ran; a knob that does not apply is null; a knob
    alone keeps the default comparison (the Q-Former cells get the value)."""
    from hydra import initialize_config_dir
    H.register_configs()
    ids = lambda cells: [(c["cell_id"], c["train_key"]) for c in cells]  # noqa: E731
    with initialize_config_dir(config_dir=str(REPO / "ablations" / "conf"), version_base=None):
        default = H.plan([*TINY])
        assert ids(H.plan([*TINY, "fusion.num_queries=8", "fusion.depth=1", "fusion.layers=[1,0]",
                           "fusion.d_fuse=64"])) == ids(default)
        swept = H.plan([*TINY, "fusion.num_queries=4,8"])
        new = [c for c in swept if (c["cell_id"], c["train_key"]) not in ids(default)]
        assert len(swept) == len(default) + 2 and {c["config"]["steps"] for c in new} == {16, 64}
        assert all(c["config"]["fusion"] == "qformer" and c["config"]["fusion.num_queries"] == 4 for c in new)
        assert len({c["train_key"] for c in new}) == 1
        assert new[0]["train_key"] not in {k for _, k in ids(default)}
        assert "fusion.num_queries=4" in H.describe(new[0]["config"])
        qf = next(c for c in default if c["config"]["fusion"] == "qformer")["config"]
        assert (qf["fusion.num_queries"], qf["fusion.depth"], qf["fusion.layers"], qf["fusion.d_fuse"]) == (8, 1, None, 64)
        ca = H.plan([*TINY, "model=d2c", "fusion=cross_attn", "steps=2", "fusion.num_queries=4", "fusion.layers=[1]"])
        plain = H.plan([*TINY, "model=d2c", "fusion=cross_attn", "steps=2"])
        assert ca[0]["config"]["fusion.num_queries"] is None and ca[0]["config"]["fusion.layers"] == [1]
        assert plain[0]["config"]["fusion.layers"] == [0, 1] and ca[0]["train_key"] != plain[0]["train_key"]
        assert H.build_recipe(ca[0]["config"]).stages["mar"].overrides["fusion"] == {"layers": (1,)}
        mar = H.plan([*TINY, "model=mar,llamagen", "fusion.d_fuse=32"])
        assert ids(mar) == ids(H.plan([*TINY, "model=mar,llamagen"]))
        assert all(c["config"][k] is None for c in mar for k in H.KNOB_KEYS)


def test_mar_model_axis_sizes_stage_two():
    """mar_model: the recipe's preset is the cell without it; another size keeps the recipe's token
    grid, latent width, classes and stage-1 vocabulary (both MAR stages: trunk and fine-tune),
    with width, depth and fusion defaults from the size preset; LlamaGen has no stage 2."""
    import torch
    import d2c
    from hydra import initialize_config_dir
    H.register_configs()
    ids = lambda cells: [(c["cell_id"], c["train_key"]) for c in cells]  # noqa: E731
    with initialize_config_dir(config_dir=str(REPO / "ablations" / "conf"), version_base=None):
        small = H.plan(["model=mar,d2c", "steps=16"])
        assert ids(H.plan(["model=mar,d2c", "steps=16", "mar_model=mar_small"])) == ids(small)
        base = H.plan(["model=mar,d2c", "steps=16", "mar_model=mar_base"])
        assert not set(ids(base)) & set(ids(small)) and all(c["config"]["mar_model"] == "mar_base" for c in base)
        d2c_base = next(c for c in base if c["config"]["model"] == "d2c")
        assert "mar_model=mar_base" in H.describe(d2c_base["config"]) and d2c_base["config"]["fusion.num_queries"] == 64
        recipe = H.build_recipe(d2c_base["config"])
        assert recipe.stages["mar_trunk"].preset == recipe.stages["mar"].preset == "mar_base"
        with torch.device("meta"):
            m = d2c.build("mar_base", **{**recipe.stages["mar"].overrides, "fusion": {
                **recipe.stages["mar"].overrides["fusion"], "kind": "qformer"}})
        small_cfg = d2c.config.make_config("mar_small")
        assert (m.config.encoder_embed_dim, m.seq_len, m.config.class_num, m.config.vae_embed_dim) == \
            (768, small_cfg.seq_len, small_cfg.class_num, small_cfg.vae_embed_dim)
        assert m.fusion.code_emb.num_embeddings == small_cfg.fusion.codebook_size + 1
        llama = H.plan(["model=llamagen", "mar_model=mar_base"])
        assert llama[0]["config"]["mar_model"] is None and ids(llama) == ids(H.plan(["model=llamagen"]))


def test_plan_keys_sampling_axes_share_train_key():
    from hydra import initialize_config_dir
    H.register_configs()
    with initialize_config_dir(config_dir=str(REPO / "ablations" / "conf"), version_base=None):
        cells = H.plan(["steps=2,4", "cfg=1.0,2.0", "temperature=0.9", "diffusion_steps=5,null", *TINY])
        default = H.plan([*TINY])
        llama = H.plan(["model=llamagen", "steps=2,4,8"])
    assert len(cells) == 8 and len({c["cell_id"] for c in cells}) == 8
    assert len({c["train_key"] for c in cells}) == 1
    fams = sorted(H.family_of(c["config"]).name for c in default)
    assert fams == sorted(["llamagen", "mar", "mar", "d2c_cross_attn", "d2c_cross_attn", "d2c_qformer", "d2c_qformer"])
    assert len(llama) == 1 and llama[0]["config"]["steps"] is None  # steps do not apply: one cell


def test_acceleration_axis_at_its_off_value_keeps_the_cell_id():
    """head_sampler=ddpm / diffusion_steps_last=null (today's sampler) is the cell that omits them,
    so finished cells stay finished when an axis is added; other values are new cells on the same
    checkpoints; llamagen has no head."""
    from hydra import initialize_config_dir
    H.register_configs()
    with initialize_config_dir(config_dir=str(REPO / "ablations" / "conf"), version_base=None):
        plain = H.plan(["model=mar", "steps=2", *TINY])
        ddpm = H.plan(["model=mar", "steps=2", "head_sampler=ddpm", "precision=fp32", *TINY])
        bf16 = H.plan(["model=mar", "steps=2", "precision=bf16", *TINY])
        llama_bf16 = H.plan(["model=llamagen", "precision=fp32,bf16", *TINY])
        both = H.plan(["model=mar", "steps=2", "head_sampler=ddpm,ddim", *TINY])
        llama = H.plan(["model=llamagen", "head_sampler=ddpm,ddim", *TINY])
        schedule = H.plan(["model=mar", "steps=2", "diffusion_steps=20", "diffusion_steps_last=null,5", *TINY])
        constant = H.plan(["model=mar", "steps=2", "diffusion_steps=20", *TINY])
        lazy = H.plan(["model=d2c", "steps=2", "uncond_refresh=null,1,2", *TINY])
        d2c = H.plan(["model=d2c", "steps=2", *TINY])
        llama_lazy = H.plan(["model=llamagen", "uncond_refresh=null,2", *TINY])
        compiled = H.plan(["model=mar", "steps=2", "compile=false,true", *TINY])
    assert [c["cell_id"] for c in ddpm] == [c["cell_id"] for c in plain]
    by_c = {c["config"]["compile"]: c for c in compiled}
    assert by_c[False]["cell_id"] == plain[0]["cell_id"] != by_c[True]["cell_id"]
    assert by_c[True]["train_key"] == plain[0]["train_key"] and "compile=True" in H.describe(by_c[True]["config"])
    assert bf16[0]["cell_id"] != plain[0]["cell_id"] and bf16[0]["train_key"] == plain[0]["train_key"]
    assert len(llama_bf16) == 2                              # precision applies to stage 1 too
    assert len({c["cell_id"] for c in both}) == 2 and len({c["train_key"] for c in both}) == 1
    assert {c["config"]["head_sampler"] for c in both} == {"ddpm", "ddim"}
    assert sorted("head_sampler=ddim" in H.describe(c["config"]) for c in both) == [False, True]
    assert len(llama) == 1 and llama[0]["config"]["head_sampler"] is None
    assert llama[0]["config"]["diffusion_steps_last"] is None
    by_last = {c["config"]["diffusion_steps_last"]: c for c in schedule}
    assert set(by_last) == {None, 5} and by_last[None]["cell_id"] == constant[0]["cell_id"] != by_last[5]["cell_id"]
    assert "diffusion_steps_last=5" in H.describe(by_last[5]["config"])
    by_k = {c["config"]["uncond_refresh"]: c for c in lazy}
    assert by_k[None]["cell_id"] == d2c[0]["cell_id"] and len({c["cell_id"] for c in lazy}) == 3
    assert len({c["train_key"] for c in lazy}) == 1 and "uncond_refresh=2" in H.describe(by_k[2]["config"])
    assert len(llama_lazy) == 1 and llama_lazy[0]["config"]["uncond_refresh"] is None


@pytest.mark.slow
def test_default_comparison_tiny(tmp_path, metrics_cache):
    """`run.py` with no axis: LlamaGen, MAR and both D2C fusions at the default step counts (on the
    tiny recipe here), one record each, and the table + where records and grids are."""
    rd = _results(tmp_path, metrics_cache)
    p = run([*TINY], rd)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    recs = records(rd)
    fams = sorted((r["family"], r["config"]["steps"] or 0) for r in recs)
    assert fams == sorted([("llamagen", 0)] + [(f, s) for f in ("mar", "d2c_cross_attn", "d2c_qformer") for s in (16, 64)])
    assert all(r["status"] == "ok" for r in recs)
    llama = next(r for r in recs if r["family"] == "llamagen")
    assert llama["speed"]["mar_steps"] == 0 and llama["speed"]["ar_steps"] > 0
    assert "7 ok, 0 failed of 7 cells" in p.stdout and f"grids: {rd / 'grids'}" in p.stdout


def test_summary_shows_the_axes_that_differ_between_its_cells():
    def rec(i, **config):
        base = {"steps": 16, "cfg": 3.0, "temperature": 1.0, "diffusion_steps": None, "head_sampler": "ddpm", "seed": 0}
        return {"cell_id": f"{i:08d}", "family": "mar", "status": "ok", "config": {**base, **config},
                "metrics": {"fid": 10.0 + i}, "speed": {"images_per_second": 1.0}}
    same = H.summary_table([rec(0), rec(1), {**rec(2), "family": "llamagen", "config": {"head_sampler": None}}])
    assert "head_sampler" not in same and "diffusion_steps" not in same
    df = H.summary_table([rec(0, head_sampler="ddim", diffusion_steps=10), rec(1), rec(2, diffusion_steps=25)])
    assert df["head_sampler"].tolist() == ["ddim", "ddpm", "ddpm"]
    assert df["diffusion_steps"].tolist()[::2] == [10, 25] and df["diffusion_steps"].isna().tolist() == [False, True, False]
    assert list(df.columns[:5]) == ["cell", "family", "steps", "diffusion_steps", "head_sampler"]


def test_a_record_from_before_a_training_change_is_stale(tmp_path, monkeypatch):
    """Same cell id, but the stages it would use are trained differently now (a new version of
    the embedded data, an edited preset): its old record no longer counts as done."""
    import dataclasses

    import d2c.config as C
    import d2c.data.shapes as S
    from hydra import initialize_config_dir

    from d2c.results import is_finished, write_record
    H.register_configs()
    args = ["model=d2c", "fusion=cross_attn", "steps=2", *TINY, f"results_dir={tmp_path}"]
    with initialize_config_dir(config_dir=str(REPO / "ablations" / "conf"), version_base=None):
        cell = H.plan(args)[0]
        with monkeypatch.context() as m:
            m.setattr(S, "VERSION", S.VERSION + 1)
            new_data = H.plan(args)[0]
        with monkeypatch.context() as m:
            m.setitem(C.PRESETS, "kl_tiny", dataclasses.replace(C.PRESETS["kl_tiny"], ch=48))
            new_preset = H.plan(args)[0]
        again = H.plan(args)[0]
    rec = {**H.base_record(cell["config"], cell["cell_id"], cell["train_key"]), "status": "ok"}
    write_record(tmp_path, rec)
    assert new_data["cell_id"] == new_preset["cell_id"] == cell["cell_id"]
    assert len({cell["train_key"], new_data["train_key"], new_preset["train_key"]}) == 3
    assert again["train_key"] == cell["train_key"]
    assert is_finished(tmp_path, cell["cell_id"], cell["train_key"])
    assert not is_finished(tmp_path, cell["cell_id"], new_data["train_key"])
    assert not is_finished(tmp_path, cell["cell_id"], new_preset["train_key"])
