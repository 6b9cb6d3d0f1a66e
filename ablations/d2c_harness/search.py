"""search=front: each family's speed-vs-FID Pareto front over its sampler settings.

    python ablations/run.py -m search=front model=mar,d2c fusion=cross_attn budget=40

The command's cells without their sampler settings are the *bases* (one per family and training
configuration).  For each base, Optuna's multi-objective TPE sampler (Watanabe et al. 2023,
arXiv 2304.11127; optuna.samplers.TPESampler) proposes sampler settings from SPACE, `budget`
times, minimising FID and maximising images per second; the first proposal is the family's
default sampler.  A sampler setting given on the command line is fixed, not searched.

Every proposal is an ordinary cell: its overrides are planned by the sweep's own rules (sweep.plan),
so it has the same id and record as the same cell in a grid sweep, and a finished cell is read,
never run again.  The search's state is one JSON file per base, <results_dir>/searches/<id>.json:
the proposals in order (settings and cell ids), written before their cells launch; the values
live in the cells' records.  A killed search therefore resumes where it stopped (the proposals
in flight run first), and a finished one, run again, launches nothing.

Seeds (the front is only as good as its noise): once the budget is spent, every point on the
seed-s front runs again at seed s + 1 (`confirmed`), and the report draws fronts over the
seed means with their spread (reports/: fronts figure, "speed at equal FID" table).
"""
from __future__ import annotations

import contextlib
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from d2c.files import atomic_write_text, stable_hash
from d2c.results import pareto_indices
from d2c.rules import int_min, or_null
from d2c.sampling import SAMPLER_KEYS, runs

from .resolved import _stage2_preset, describe
from .schema import ConfigError, family_of
from .sweep import parse, plan, task_args

logger = logging.getLogger("d2c.search")

SEARCHES = ("front",)


@dataclass(frozen=True)
class SearchConfig:
    """The search keys of a command line (not cell axes: they say how cells are chosen)."""
    search: Optional[str] = None     # front: the Pareto search; null: the grid the command names
    budget: int = 24                 # proposals per base (confirmation runs come on top)
    search_batch: int = 1            # proposals launched together (a cluster's parallel jobs)


# key -> (rule, the `allowed:` text of its one-line error)
SEARCH_RULES = {
    "search": (or_null(lambda v: v in SEARCHES), ", ".join(SEARCHES) + " or null (the grid the command names)"),
    "budget": (int_min(1), "integers >= 1 (cells searched per family; seed confirmations come on top)"),
    "search_batch": (int_min(1), "integers >= 1 (cells launched together, e.g. a cluster's parallel jobs)"),
}

# The searched values of each sampler setting (an ordered list: TPE models the index as a number).
# MAR steps: powers of two from 1/64 of the tokens to all of them (MAR's 64 of 256 at ImageNet; on
# the embedded default every front point sat at 1/16, the floor of a first space).
# Head steps: up to the preset's count (MAR's 100 at ImageNet).  DiSA: the head's steps fall to
# this fraction of them by the last MAR iteration (1: constant).  Guidance and temperatures
# bracket MAR-B's 2.9 / 1.0 and LlamaGen GPT-B's 2.0 / 1.0 (docs/design.md section 3).  bf16 only
# where the cell's device has the units for it (d2c.precision.bf16_supported: a CUDA device, a
# CPU with AVX512-BF16 / AMX); elsewhere the cell would be refused.
MAR_STEPS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
HEAD_STEPS = (2, 3, 5, 10, 25, 50, 100)
SPACE = {
    "steps": lambda base: tuple(s for s in MAR_STEPS if base["tokens"] // 64 <= s <= base["tokens"]),
    "diffusion_steps": lambda base: tuple(sorted({s for s in HEAD_STEPS if s < base["head_steps"]}
                                                 | {base["head_steps"]})),
    "diffusion_steps_last": lambda base: (1.0, 0.5, 0.2),
    "head_sampler": lambda base: ("ddpm", "ddim"),
    "uncond_refresh": lambda base: (None, 2, 4),
    "cfg": lambda base: (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0),
    "temperature": lambda base: (0.8, 0.9, 1.0, 1.1, 1.2),
    "stage1_temperature": lambda base: (0.8, 0.9, 1.0, 1.1, 1.2),
    "precision": lambda base: ("fp32", "bf16") if base["bf16"] else ("fp32",),
}


def split_args(args: list[str]) -> tuple[SearchConfig, list[str]]:
    """The search keys out of a command line, checked (ConfigError: one line, exit 2)."""
    given, rest = {}, []
    for a in args:
        key, eq, value = a.partition("=")
        if eq and key in SEARCH_RULES:
            given[key] = value
        else:
            rest.append(a)
    values = {}
    for key, raw in given.items():
        v = None if raw in ("null", "none", "") else int(raw) if raw.lstrip("-").isdigit() else raw
        if not SEARCH_RULES[key][0](v) or (key != "search" and "," in raw):
            raise ConfigError(key, raw, message=f"{key}={raw}: allowed: {SEARCH_RULES[key][1]}")
        values[key] = v
    sc = SearchConfig(**values)
    if sc.search is None and len(given.keys() - {"search"}):
        key = next(iter(given.keys() - {"search"}))
        raise ConfigError(key, given[key], message=f"{key}={given[key]}: only with search=front")
    return sc, rest


# --------------------------------------------------------------------------- bases and the space


def _drop(overrides: list[str], keys) -> list[str]:
    return [o for o in overrides if o.partition("=")[0].lstrip("+~") not in keys]


def _value_text(v) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def bases(args: list[str]) -> list[dict]:
    """The command's cells with the searched sampler settings at their defaults, one per base,
    each with its space.  A sampler setting on the command line is fixed (one value only)."""
    fixed = set()
    for o in parse(task_args(args)):
        key = o.get_key_element()
        if key in SAMPLER_KEYS:
            if o.is_sweep_override():
                raise ConfigError(key, o.input_line.partition("=")[2],
                                  message=f"{o.input_line}: search=front searches the sampler settings; "
                                          f"give {key} one value to fix it, or leave it out to search it")
            fixed.add(key)
        if key == "seed" and o.is_sweep_override():
            raise ConfigError("seed", o.input_line.partition("=")[2],
                              message=f"{o.input_line}: a search samples at one seed (its front is confirmed at "
                                      "the next one)")
    out, seen = [], set()
    for cell in plan(args):
        overrides = _drop(cell["overrides"], set(SPACE) - fixed)
        base_cell = plan(overrides)[0]
        if base_cell["cell_id"] in seen:
            continue
        seen.add(base_cell["cell_id"])
        c = base_cell["config"]
        fam = family_of(c)
        facts = {"tokens": 0, "head_steps": 0, "bf16": _bf16(c["device"])}
        if fam.has_stage2:
            _, mar = _stage2_preset(c)
            facts.update(tokens=mar.seq_len, head_steps=mar.diffusion_steps)
        space = {k: list(SPACE[k](facts)) for k in SPACE if k not in fixed and runs(k, fam)
                 and not (k == "stage1_temperature" and not fam.has_stage1)}
        space = {k: v for k, v in space.items() if len(v) > 1}
        sid = stable_hash({"base": base_cell["cell_id"], "space": space})
        out.append({**base_cell, "overrides": overrides, "space": space, "facts": facts, "search_id": sid})
    return out


def _bf16(device) -> bool:
    """Whether the cells' device samples in bf16 (device=null: CUDA when this machine has it; a
    search planned off the GPU node it runs on names device=cuda to search bf16)."""
    import torch
    from d2c.precision import bf16_supported
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        return True   # planned off the GPU node: the cell's device checks bf16 when it runs
    return bf16_supported(device)


def settings_of(base: dict, params: dict) -> dict:
    """A proposal (an index per searched setting) -> the sampler settings of its cell; a value that
    is the default (the preset's head steps, a constant DiSA schedule) is written as the default,
    so the cell is the one a plain sweep names."""
    s = {k: base["space"][k][i] for k, i in params.items()}
    if "diffusion_steps" in s and s["diffusion_steps"] == base["facts"]["head_steps"]:
        s["diffusion_steps"] = None
    if "diffusion_steps_last" in s:
        frac = s.pop("diffusion_steps_last")
        head = s.get("diffusion_steps") or base["config"]["diffusion_steps"] or base["facts"]["head_steps"]
        last = max(1, round(head * frac))
        s["diffusion_steps_last"] = None if frac == 1.0 or last >= head else last
    if s.get("uncond_refresh") is not None and s.get("cfg", base["config"]["cfg"]) == 1.0:
        s["uncond_refresh"] = None   # unguided (MAR samples no unconditional half): nothing to refresh
    return s


def default_params(base: dict) -> dict:
    """The proposal of the family's default sampler (the base cell's own settings)."""
    c, out = base["config"], {}
    for k, values in base["space"].items():
        v = c[k]
        if k == "diffusion_steps":
            v = v or base["facts"]["head_steps"]
        if k == "diffusion_steps_last":
            v = 1.0 if v is None else v / (c["diffusion_steps"] or base["facts"]["head_steps"])
        out[k] = min(range(len(values)), key=lambda i: abs(values[i] - v) if isinstance(v, (int, float))
                     and values[i] is not None else (values[i] != v))
    return out


def cell_of(base: dict, settings: dict, seed: int | None = None) -> dict:
    """The planned cell of a base with these settings (and seed): the sweep's own rules and ids."""
    extra = [f"{k}={_value_text(v)}" for k, v in settings.items()] + ([f"seed={seed}"] if seed is not None else [])
    keys = set(settings) | ({"seed"} if seed is not None else set())
    cells = plan(_drop(base["overrides"], keys) + extra)
    return cells[0]


# --------------------------------------------------------------------------- state and values


def state_path(results_dir, search_id: str) -> Path:
    from d2c.results import safe_subdir
    return safe_subdir(results_dir, "searches") / f"{search_id}.json"


def load_state(base: dict) -> dict:
    p = state_path(base["config"]["results_dir"], base["search_id"])
    if p.is_file():
        try:
            st = json.loads(p.read_text())
            if st.get("search_id") == base["search_id"]:
                return st
        except (OSError, ValueError):
            pass
        logger.warning(f"search state {p} unreadable: starting that search again (finished cells are reused)")
    return {"search_id": base["search_id"], "describe": describe(base["config"]), "space": base["space"],
            "trials": [], "confirm": []}


def save_state(base: dict, st: dict) -> None:
    atomic_write_text(state_path(base["config"]["results_dir"], base["search_id"]),
                      json.dumps(st, indent=1, sort_keys=True))


def outcome(results_dir, cell_id: str, train_key: str):
    """(fid, images/s) of a finished cell, "failed", or None while it has no current record."""
    from d2c.results import RecordError, read_record, record_path
    try:
        r = read_record(record_path(results_dir, cell_id))
    except RecordError:
        return None
    if r.get("train_key") != train_key:
        return None
    if r["status"] != "ok" or "fid" not in (r.get("metrics") or {}):
        return "failed"
    return float(r["metrics"]["fid"]), float(r["speed"]["images_per_second"])


# --------------------------------------------------------------------------- the search


def _study(base: dict, st: dict, results_dir, train_key: str):
    """An Optuna study holding the state's finished proposals (rebuilt each round from the state
    and the records: the same code path for a fresh search and a resumed one)."""
    import optuna
    from optuna.distributions import IntDistribution
    from optuna.trial import TrialState, create_trial
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    dists = {k: IntDistribution(0, len(v) - 1) for k, v in base["space"].items()}
    seed = base["config"]["seed"] * 100_003 + len(st["trials"])   # reproducible, new draws each round
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True,
                                         n_startup_trials=min(10, max(2, len(st["trials"]) // 3 + 2)))
    study = optuna.create_study(directions=["minimize", "maximize"], sampler=sampler)
    for t in st["trials"]:
        got = outcome(results_dir, t["cell_id"], train_key)
        if isinstance(got, tuple):
            study.add_trial(create_trial(params=t["params"], distributions=dists, values=list(got)))
        else:
            study.add_trial(create_trial(params=t["params"], distributions=dists, state=TrialState.FAIL))
    return study, dists


def _propose(base: dict, st: dict, n: int) -> list[dict]:
    """n new proposals (the default sampler first), each with its planned cell."""
    def trial(params: dict) -> dict:
        settings = settings_of(base, params)
        cell = cell_of(base, settings)
        return {"params": params, "settings": settings, "cell_id": cell["cell_id"], "cell": cell}

    out = [] if st["trials"] else [trial(default_params(base))]
    if len(out) < n:
        study, dists = _study(base, st, base["config"]["results_dir"], base["train_key"])
        seen = {t["cell_id"] for t in st["trials"]} | {t["cell_id"] for t in out}
        while len(out) < n:
            for _ in range(50):   # a proposal of a cell already made costs nothing: ask again
                t = trial(study.ask(dists).params)
                if t["cell_id"] not in seen:
                    break
            out.append(t)
            seen.add(t["cell_id"])
    return out


def run_search(args: list[str], sc: SearchConfig, launch: Callable[[list[dict], str], None],
               planning: Callable = contextlib.nullcontext) -> int:
    """The search over every base of the command; `launch(cells, tag)` runs planned cells (one
    launcher call), `planning()` is the context in which cells compose (Hydra's config dir; not
    held while a launch runs).  Returns the number of bases whose front has no confirmed point."""
    with planning():
        todo = bases(args)
    if not todo:
        raise ConfigError("search", sc.search, message="search=front: the command names no cell")
    for b in todo:
        logger.info(f"search {b['search_id'][:8]}: {describe(b['config'])}, budget {sc.budget}, searching "
                    + ", ".join(f"{k} {'/'.join(map(_value_text, v))}" for k, v in b["space"].items()))
    states = {b["search_id"]: load_state(b) for b in todo}
    rd = todo[0]["config"]["results_dir"]
    rnd, launched = 0, set()
    while True:   # rounds: what is in flight first, then search_batch new proposals a base
        batch, lines = [], []
        with planning():
            _round(todo, states, sc, rd, launched, batch, lines)
        if not batch:
            break
        for line in lines:
            logger.info(line)
        rnd += 1
        launched |= {c["cell_id"] for c in batch}
        launch(_unique(batch), f"search-{rnd}")
    confirm = []
    with planning():
        for b in todo:   # the front of seed s, again at seed s + 1
            confirm += _confirmations(b, states[b["search_id"]], rd)
    if confirm:
        launch(_unique(confirm), "confirm")
    return sum(print_front(b, states[b["search_id"]]) for b in todo)


def _round(todo, states, sc, rd, launched, batch, lines) -> None:
    """One round's cells into `batch`: a base's proposals still in flight (from a killed run),
    else its next search_batch proposals, saved in its state before they launch."""
    for b in todo:
        st = states[b["search_id"]]
        pending = [t for t in st["trials"] if outcome(rd, t["cell_id"], b["train_key"]) is None
                   and t["cell_id"] not in launched]   # launched and still no record: lost, failed
        if pending:   # proposals of a killed run: their cells run again (finished stages reused)
            for t in pending:
                cell = cell_of(b, t["settings"])
                t["cell_id"] = cell["cell_id"]   # the same cell, unless the sweep's ids changed
                batch.append(cell)
            save_state(b, st)
            continue
        left = sc.budget - len(st["trials"])
        if left <= 0:
            continue
        new = _propose(b, st, min(sc.search_batch, left))
        for t in new:
            st["trials"].append({k: t[k] for k in ("params", "settings", "cell_id")})
            lines.append(f"search {b['search_id'][:8]} trial {len(st['trials'])} of {sc.budget}: "
                         f"{describe(t['cell']['config'])}")
            batch.append(t["cell"])
        save_state(b, st)   # before the launch: a kill leaves them to run on resume


def _confirmations(b: dict, st: dict, rd) -> list[dict]:
    """The seed-s front of a base, planned again at seed s + 1 (the cells not yet measured)."""
    done = [(t, outcome(rd, t["cell_id"], b["train_key"])) for t in st["trials"]]
    done = [(t, v) for t, v in done if isinstance(v, tuple)]
    front = [done[i][0] for i in pareto_indices([s for _, (_, s) in done], [f for _, (f, _) in done])]
    seed = b["config"]["seed"] + 1
    st["confirm"], todo = [], []
    for t in front:
        cell = cell_of(b, t["settings"], seed=seed)
        st["confirm"].append({"settings": t["settings"], "cell_id": t["cell_id"], "confirm_id": cell["cell_id"]})
        if outcome(rd, cell["cell_id"], b["train_key"]) is None:
            todo.append(cell)
    save_state(b, st)
    logger.info(f"search {b['search_id'][:8]}: {len(done)} of {len(st['trials'])} proposals measured; "
                f"{len(front)} on the front, {len(todo)} to confirm at seed {seed}")
    return todo


def _unique(cells: list[dict]) -> list[dict]:
    seen, out = set(), []
    for c in cells:
        if c["cell_id"] not in seen:
            seen.add(c["cell_id"])
            out.append(c)
    return out


def print_front(base: dict, st: dict, out=None) -> int:
    """The confirmed front of one base, fastest first; returns 1 when none of it was confirmed."""
    import sys
    out = out or sys.stdout
    rd, key = base["config"]["results_dir"], base["train_key"]
    rows = []
    for p in st["confirm"]:
        a, b = outcome(rd, p["cell_id"], key), outcome(rd, p["confirm_id"], key)
        if not (isinstance(a, tuple) and isinstance(b, tuple)):
            continue
        text = " ".join(f"{k}={_value_text(p['settings'][k])}" for k in SPACE
                        if k in p["settings"] and p["settings"][k] != base["config"].get(k)) or "the default sampler"
        rows.append((0.5 * (a[1] + b[1]), 0.5 * (a[0] + b[0]), abs(a[0] - b[0]), text))
    print(f"front of {st['describe']} ({len(st['trials'])} proposals; FID: mean of seeds "
          f"{base['config']['seed']} and {base['config']['seed'] + 1}, ± half their difference):", file=out)
    for ips, fid, diff, text in sorted(rows, reverse=True):
        print(f"  {ips:8.2f} img/s  FID {fid:7.3f} ± {diff / 2:.3f}  {text}", file=out)
    if not rows:
        print("  (no confirmed point: see the failed cells above)", file=out)
    return 0 if rows else 1
