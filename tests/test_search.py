"""search=front (ablations/d2c_harness/search.py): the bases and their spaces, proposals as
ordinary cells, the Pareto front against brute force, the one-line errors, and a tiny search end
to end, killed mid-way and resumed."""
import json
import random
import re
import sys
from pathlib import Path

import pytest

from test_ablations import RUN, TINY, _results, kill_when, metrics_cache, records, run  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ablations"))


@pytest.fixture
def hydra_dir():
    from hydra import initialize_config_dir
    with initialize_config_dir(config_dir=str(REPO / "ablations" / "conf"), version_base=None):
        import d2c_harness as H
        H.register_configs()
        yield H


def test_split_args_one_line_errors():
    import d2c_harness as H
    sc, rest = H.split_search_args(["search=front", "budget=7", "model=mar", "search_batch=2"])
    assert (sc.search, sc.budget, sc.search_batch, rest) == ("front", 7, 2, ["model=mar"])
    assert H.split_search_args(["model=mar"])[0] == H.SearchConfig()
    for bad, start in ((["search=grid"], "search=grid: allowed: front"), (["search=front", "budget=0"], "budget=0"),
                       (["search=front", "budget=4,8"], "budget=4,8"), (["budget=4"], "budget=4: only with search=front"),
                       (["search=front", "search_batch=x"], "search_batch=x")):
        with pytest.raises(H.ConfigError) as e:
            H.split_search_args(bad)
        assert str(e.value).startswith(start) and "\n" not in str(e.value)


def test_bases_spaces_and_the_default_proposal(hydra_dir):
    """model=mar,d2c fusion=cross_attn: two bases (fusion applies to the D2C cells), each space the
    settings its family runs; the first proposal is the plain sweep's default cell."""
    H = hydra_dir
    from d2c_harness import search as S
    bases = H.search_bases(["model=mar,d2c", "fusion=cross_attn", *TINY])
    assert [b["config"]["model"] for b in bases] == ["mar", "d2c"] and bases[1]["config"]["fusion"] == "cross_attn"
    mar, d2c = (b["space"] for b in bases)
    assert "stage1_temperature" not in mar and "stage1_temperature" in d2c
    assert mar["steps"] == [1, 2, 4, 8, 16, 32, 64] and mar["diffusion_steps"] == [2, 3, 5, 10, 20]   # 64 tokens, head 20
    for b in bases:
        default = H.plan([f"model={b['config']['model']}", *([f"fusion={b['config']['fusion']}"] * (b is bases[1])),
                          *TINY])[0]
        assert S.cell_of(b, S.settings_of(b, S.default_params(b)))["cell_id"] == default["cell_id"]
    llamagen = H.search_bases(["model=llamagen", "cfg=2.0", *TINY])[0]["space"]
    assert sorted(llamagen) == ["precision", "stage1_temperature"][not S._bf16(None):]   # cfg fixed on the command line
    # bf16 only where the device has the units for it (a cell elsewhere would be refused)
    assert ("precision" in mar) == S._bf16(None) and S._bf16("cuda")
    # unguided, the unconditional half never runs: its refresh period is no setting of its own
    b = bases[0]
    params = {**S.default_params(b), "cfg": b["space"]["cfg"].index(1.0), "uncond_refresh": 2}
    assert S.settings_of(b, params)["uncond_refresh"] is None
    params["cfg"] = b["space"]["cfg"].index(2.0)
    assert S.settings_of(b, params)["uncond_refresh"] == 4
    # the space at ImageNet scale: 256 tokens, MAR-B's 100 head steps
    facts = {"tokens": 256, "head_steps": 100}
    assert S.SPACE["steps"](facts) == (4, 8, 16, 32, 64, 128, 256) and S.SPACE["diffusion_steps"](facts)[-1] == 100
    with pytest.raises(H.ConfigError, match=r"^steps=8,16: search=front searches"):
        H.search_bases(["model=mar", "steps=8,16", *TINY])
    with pytest.raises(H.ConfigError, match=r"^seed=0,1: a search samples at one seed"):
        H.search_bases(["model=mar", "seed=0,1", *TINY])


def test_every_value_of_the_space_is_a_valid_cell(hydra_dir):
    """Each searched value, alone and at the space's extremes, plans as a cell of its own id."""
    from d2c_harness import search as S
    for b in hydra_dir.search_bases(["model=mar,d2c,llamagen", *TINY]):
        ids = set()
        for k, values in b["space"].items():
            for i in range(len(values)):
                params = {**S.default_params(b), k: i}
                ids.add(S.cell_of(b, S.settings_of(b, params))["cell_id"])
        for pick in (min, max):
            params = {k: pick(range(len(v))) for k, v in b["space"].items()}
            ids.add(S.cell_of(b, S.settings_of(b, params))["cell_id"])
        assert len(ids) >= sum(len(v) - 1 for v in b["space"].values())


def test_front_indices_match_brute_force():
    from d2c.results import pareto_indices
    rng = random.Random(0)
    for _ in range(200):
        pts = [(rng.choice([1.0, 2.0, 3.0, rng.random()]), rng.choice([1.0, 5.0, rng.random()]))
               for _ in range(rng.randint(1, 12))]
        want = {i for i, (f, s) in enumerate(pts)
                if not any(g <= f and t >= s and (g < f or t > s) for g, t in pts)}
        got = pareto_indices([s for _, s in pts], [f for f, _ in pts])
        assert set(got) == want
        assert [pts[i][1] for i in got] == sorted((pts[i][1] for i in got), reverse=True)


@pytest.mark.slow
def test_tiny_search_killed_then_resumed(tmp_path, metrics_cache):
    """A budget-4 search of MAR on the tiny recipe, SIGKILLed after its second proposal's record:
    the rerun runs the proposals left and the seed confirmations, reusing every finished cell; a
    third run launches nothing.  Its cells are ordinary cells (a grid sweep sees them done)."""
    rd = _results(tmp_path, metrics_cache)
    args = ["-m", "search=front", "model=mar", "budget=4", *TINY, f"results_dir={rd}"]
    kill_when([sys.executable, str(RUN), *args], lambda: len(list(rd.glob("records/*.json"))) >= 2, 400,
              "no second record")
    before = {p.name: p.stat().st_mtime_ns for p in rd.glob("records/*.json")}
    (state,) = rd.glob("searches/*.json")
    assert 2 <= len(json.loads(state.read_text())["trials"]) <= 3
    p = run(args[:-1], rd, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout + p.stderr
    st = json.loads(state.read_text())
    assert len(st["trials"]) == 4 and len({t["cell_id"] for t in st["trials"]}) == 4
    assert st["trials"][0]["settings"]["steps"] == 16 and st["trials"][0]["settings"]["cfg"] == 3.0   # the default first
    recs = {r["cell_id"]: r for r in records(rd)}
    assert all(recs[t["cell_id"]]["status"] == "ok" and recs[t["cell_id"]]["seed"] == 0 for t in st["trials"])
    assert st["confirm"] and all(recs[c["confirm_id"]]["seed"] == 1 for c in st["confirm"])
    assert len(recs) == 4 + len(st["confirm"])
    assert {n: t for n, t in before.items()} == {p.name: p.stat().st_mtime_ns for p in rd.glob("records/*.json")
                                                  if p.name in before}   # finished cells not rerun
    assert re.search(r"^front of model=mar", p.stdout, re.M) and re.search(r"img/s +FID", p.stdout), out[-2000:]
    again = run(args[:-1], rd)
    assert again.returncode == 0 and "Launching" not in again.stdout + again.stderr
    assert len(records(rd)) == len(recs)
    plan = run(["model=mar", "--plan", *TINY], rd)   # the default proposal is the plain sweep's cell
    assert plan.returncode == 0 and re.search(rf"\[done\] {st['trials'][0]['cell_id']}", plan.stdout), plan.stdout


def test_a_batch_of_proposals_is_distinct_cells(hydra_dir, tmp_path):
    """search_batch=K: K proposals at once, the default sampler first, no cell twice (TPE's
    constant liar keeps pending proposals apart); reproducible from the same state."""
    from d2c_harness import search as S
    (b,) = hydra_dir.search_bases(["model=d2c", "fusion=cross_attn", *TINY, f"results_dir={tmp_path}"])
    st = S.load_state(b)
    first = S._propose(b, st, 4)
    ids = [t["cell_id"] for t in first]
    assert len(set(ids)) == 4 and first[0]["params"] == S.default_params(b)
    st["trials"] += [{k: t[k] for k in ("params", "settings", "cell_id")} for t in first]
    a, b2 = S._propose(b, st, 3), S._propose(b, st, 3)
    assert [t["cell_id"] for t in a] == [t["cell_id"] for t in b2] and not {t["cell_id"] for t in a} & set(ids)
