#!/usr/bin/env python
"""Ablation sweeps over D2C, MAR and LlamaGen on one Hydra config tree.

    python ablations/run.py                                        # the embedded-default comparison
    python ablations/run.py -m fusion=cross_attn,qformer steps=16,32,64
    python ablations/run.py -m fusion=cross_attn,qformer steps=16,32,64 --plan   # the cells; runs nothing
    python ablations/run.py -m search=front model=mar,d2c fusion=cross_attn budget=40   # speed-vs-FID fronts
    python ablations/run.py recipe=imagenet ... --cache-only     # the token cache only (all ranks of a job)
    python ablations/run.py recipe=imagenet ... --train-only     # the stages only (= d2c-train ...)
    python ablations/run.py -m model=mar steps=8,32 hydra/launcher=submitit_slurm \
        hydra.launcher.partition=gpu hydra.launcher.gpus_per_node=1

Axes: model, fusion (+ fusion.num_queries, .depth, .layers, .d_fuse), discrete_model, mar_model, every
d2c.sampling.SamplerConfig field (steps, cfg, temperature, diffusion_steps, head_sampler, stage1_top_k,
...), num_images, data, seed (and recipe, train_steps, train_epochs, tokenizer.kl, eval.reference,
results_dir, ...: see ablations/d2c_harness/schema.py RunConfig).
Every cell of the sweep is composed and checked before anything runs: a bad key, value or
combination prints `error: <key>=<value>: ... allowed: ...` and exits with status 2 (the
d2c.cli.exit_on_user_error contract); so do a `_target_` outside d2c / this harness's plugins,
a results_dir with '..' components and a symlink in the results tree (records -> elsewhere).
One record per cell in <results_dir>/records/<cell_id>.json (schema: core/d2c/results.py);
finished cells are skipped when the sweep runs again.  Exit status 1 if any cell failed.
search=front (budget=N, search_batch=K) searches each family's sampler settings for its
speed-vs-FID front instead of running the grid: ablations/d2c_harness/search.py.
Here the command is planned once (every cell composed, resolved and keyed), the plan handed to
the d2c sweeper as a file, and the summary printed from the records after the sweep.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from d2c import require  # noqa: E402
from d2c.cli import exit_on_user_error  # noqa: E402

with exit_on_user_error():     # the core package alone: one line naming the extra
    hydra = require("hydra", "the sweep (ablations/run.py, d2c-sweep)")
from omegaconf import DictConfig  # noqa: E402

import d2c_harness as H  # noqa: E402


def register() -> None:
    """Hydra's plugin scan first (it re-executes the stock submitit config module), then our
    sweeper / launcher nodes over the stock ones, then the run schema and data group."""
    from hydra.core.plugins import Plugins
    Plugins.instance()
    import hydra_plugins.d2c_ablations as plugins
    plugins.register()
    H.register_configs()


register()
logger = logging.getLogger("d2c.cell")
PASS_THROUGH = ("--help", "-h", "--hydra-help", "--version", "--cfg", "-c", "--info", "-i", "--resolve",
                "--package", "-p", "--shell-completion", "-sc")


@hydra.main(version_base=None, config_path="conf", config_name="config")
def task(config: DictConfig):
    """One cell (runs inside the launcher's job)."""
    import d2c_harness as H
    logging.captureWarnings(True)   # the library's warnings (skipped batches, bad images) in the job log
    c = H.resolve(config)
    cell_id, train_key = H.keys(c)
    which = f"cell {cell_id[:8]}"
    try:     # k of N: the job's number in the sweep of the cells left to run
        from hydra.core.hydra_config import HydraConfig
        which = f"cell {HydraConfig.get().job.num + 1} of {os.environ['D2C_SWEEP_CELLS']} ({cell_id[:8]})"
    except Exception:
        pass
    logger.info(f"{which}: {H.describe(c)} | {H.cell_work(c)}")
    t0 = time.perf_counter()
    rec = H.run_cell(c, cell_id, train_key)
    if rec:
        m = rec.get("metrics") or {}
        tail = (f"fid {m['fid']:.3f}, {rec['speed']['images_per_second']:.1f} img/s" if rec["status"] == "ok"
                and "fid" in m else rec.get("error") or "")
        logger.info(f"{which} {rec['status']} in {time.perf_counter() - t0:.0f} s: {tail}")
    return {"cell_id": cell_id, "status": rec.get("status") if rec else None}


def _validate(args: list[str]) -> list[dict]:
    from hydra import compose, initialize_config_dir
    for a in args:   # nothing from the command line chooses what Hydra instantiates
        key, _, value = a.partition("=")
        if "_target_" in key:
            H.check_target(key.lstrip("+~"), value)
    with initialize_config_dir(config_dir=str(HERE / "conf"), version_base=None):
        cells = H.plan(args)
        hydra_args = [a for a in args if a.lstrip("+~").startswith("hydra")]
        try:
            hc = compose(config_name="config", overrides=hydra_args + cells[0]["overrides"],
                         return_hydra_config=True).hydra
        except Exception as e:
            raise H.hydra_error(e, hydra_args) from None
        # the launcher and sweeper Hydra will instantiate (presets in slurm/conf included)
        for node in ("launcher", "sweeper"):
            H.check_target(f"hydra.{node}._target_", hc[node].get("_target_"))
        for results_dir in {c["config"]["results_dir"] for c in cells}:
            H.check_results_tree(results_dir)
    return cells


def _print_plan(cells: list[dict]) -> None:
    """--plan: the cells the command would run, each with its keys and resolved config."""
    from d2c.results import is_finished
    print(f"plan: {len(cells)} cells, {len({c['train_key'] for c in cells})} training config(s); nothing run")
    for c in cells:
        state = "done" if is_finished(c["config"]["results_dir"], c["cell_id"], c["train_key"]) else "todo"
        print(f"  [{state}] {c['cell_id']} train {c['train_key']}  {H.describe(c['config'])}")
        print(f"      {json.dumps(c['config'], sort_keys=True, default=str)}")


def _environment() -> None:
    # jobs started by submitit (local processes or SLURM) import the harness and its Hydra plugins
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(HERE) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), *paths])
    if not sys.stderr.isatty():   # logs and SLURM files: no progress bars redrawn in place
        os.environ.setdefault("TQDM_DISABLE", "1")


def main(argv=None) -> int:
    _environment()
    args = [a for a in (sys.argv[1:] if argv is None else argv) if a not in ("-m", "--multirun")]
    plan_only = "--plan" in args
    prepare = next((w for w in H.PREPARE if f"--{w}-only" in args), None)
    args = [a for a in args if a != "--plan" and a not in {f"--{w}-only" for w in H.PREPARE}]
    if any(a.split("=")[0] in PASS_THROUGH for a in args):
        sys.argv = [sys.argv[0], *args]
        task()
        return 0
    try:
        # user errors (H.ConfigError is a ValueError): one line `error: ...`, exit 2
        with exit_on_user_error():
            # absolute results_dir: jobs may start in another directory ('..' refused before resolving)
            rd = next((a.partition("=")[2] for a in args if a.startswith("results_dir=")), "results")
            rd = H.check_results_dir(rd).resolve()
            args = [a for a in args if not a.startswith("results_dir=")] + [f"results_dir={rd}"]
            search, args = H.split_search_args(args)
            cells = _validate(args)
    except SystemExit as e:
        return e.code
    if prepare:
        return _prepare(cells, prepare)
    if search.search:
        return _search(args, search, rd, plan_only)
    if plan_only:
        _print_plan(cells)
        return 0
    _launch(cells, args, rd)
    from d2c.distributed import dist_env
    if dist_env()[0] != 0:   # a job's tasks all run the sweep (plain srun): the summary is rank 0's
        return 0
    return 1 if H.print_summary(cells, rd) else 0


def _launch(cells: list[dict], args: list[str], rd: Path, sweep_dir: Path | None = None) -> None:
    """One launcher call of planned cells (the d2c sweeper skips the finished ones)."""
    extra = [f"hydra.sweep.dir={_hydra_quote(sweep_dir)}"] if sweep_dir else []
    sys.argv = [sys.argv[0], "--multirun", *args, *extra, f"hydra.sweeper.plan={_hydra_quote(_write_plan(cells, rd))}"]
    task()


def _search(args: list[str], search, rd: Path, plan_only: bool) -> int:
    """search=front: rounds of proposals, each round one launcher call (its own sweep folder
    under the command's), then the seed confirmations; the fronts printed at the end."""
    from hydra import initialize_config_dir
    from d2c.progress import setup_logging
    setup_logging(force=True)
    planning = lambda: initialize_config_dir(config_dir=str(HERE / "conf"), version_base=None)  # noqa: E731
    if plan_only:
        with exit_on_user_error(), planning():
            for b in H.search_bases(args):
                print(f"search {b['search_id'][:8]}: {H.describe(b['config'])}; budget {search.budget}; "
                      "searching " + ", ".join(f"{k} in {v}" for k, v in b["space"].items()))
        return 0
    given = next((a.partition("=")[2] for a in args if a.startswith("hydra.sweep.dir=")), None)
    root = Path(given) if given else rd / "hydra" / f"search-{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    args = [a for a in args if not a.startswith("hydra.sweep.dir=")]
    with exit_on_user_error():
        return 1 if H.run_search(args, search, lambda cells, tag: _launch(cells, args, rd, root / tag), planning) else 0


def _prepare(cells: list[dict], what: str) -> int:
    """--cache-only / --train-only: each training configuration of the cells once, in this process
    (a torchrun / srun job's ranks together); no sampling, no records."""
    from d2c.progress import setup_logging
    setup_logging(force=True)
    seen = set()
    with exit_on_user_error():
        for c in cells:
            if c["train_key"] in seen:
                continue
            seen.add(c["train_key"])
            made = H.prepare_cell(c["config"], what)
            logger.info(f"{what} ready for {H.describe(c['config'])}: " + ", ".join(made))
    return 0


def train_main(argv=None) -> int:
    """d2c-train: the stages the cells need, trained (or found), nothing sampled."""
    return main(["--train-only", *(sys.argv[1:] if argv is None else argv)])


def _write_plan(cells: list[dict], results_dir: Path) -> Path:
    """The validated cells for the sweeper (hydra/sweeper=d2c): what it launches, how it names
    them, and the record it writes for a cell whose job dies without one."""
    from d2c.files import atomic_write_text
    from d2c.results import safe_subdir
    env = H.record_env()
    plan = [{"overrides": c["overrides"], "cell_id": c["cell_id"], "train_key": c["train_key"],
             "results_dir": c["config"]["results_dir"], "describe": H.describe(c["config"]),
             "failed_record": H.failed_record(c, "", env)} for c in cells]
    folder = safe_subdir(results_dir, "hydra")
    path = folder / f"plan-{time.strftime('%Y-%m-%d_%H-%M-%S')}-{os.getpid()}.json"
    atomic_write_text(path, json.dumps(plan, sort_keys=True, default=str))
    return path


def _hydra_quote(path: Path) -> str:
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


if __name__ == "__main__":
    sys.exit(main())
