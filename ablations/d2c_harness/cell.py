"""One cell: ensure checkpoints -> sample -> metrics -> one result record; and the summary of
a sweep's cells from their records.

Records: `d2c.results` (schema v1, one atomic JSON file per cell under <results_dir>/records).
Checkpoints: <results_dir>/ckpt (d2c.pipeline.Pipeline root; stages locked across processes).
Sample grids: <results_dir>/grids/<cell_id>.png.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from d2c.cli import one_line
from d2c.recipes import PAPER_RECIPES
from d2c.sampling import SAMPLER_KEYS, setting_type

from .resolved import build_recipe, describe, sampler_of
from .schema import OFF_VALUES, REPO, family_of

logger = logging.getLogger(__name__)


def record_env() -> dict:
    """Where a record was made: hardware, package versions, git commit (the same for every cell
    a process writes)."""
    from d2c.metrics import hardware_info
    from d2c.results import git_commit, versions
    return {"hardware": hardware_info(), "versions": versions(), "git_commit": git_commit(REPO)}


def base_record(c: dict, cell_id: str, train_key: str, env: dict | None = None) -> dict:
    from d2c.results import SCHEMA_VERSION
    return {"schema": SCHEMA_VERSION, "cell_id": cell_id, "train_key": train_key, "status": "failed",
            "error": None, "family": family_of(c).name, "config": c, "metrics": {}, "speed": {},
            "train_seconds": {}, **(env or record_env()), "seed": c["seed"], "grid": None}


def _distributed() -> tuple[int, int]:
    """(rank, world): exports submitit's torch.distributed variables inside a multi-task job."""
    try:
        import submitit
        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    except Exception:
        pass
    from d2c.distributed import dist_env
    rank, world, _ = dist_env()
    return rank, world


def open_pipeline(c: dict, world: int):
    """The cell's d2c.pipeline.Pipeline, with every rank of a multi-rank job in the process group
    before the first stage (see pipeline._stage_lock)."""
    import torch
    from d2c.pipeline import Pipeline
    if c["threads"]:
        torch.set_num_threads(c["threads"])
    pipe = Pipeline(build_recipe(c), root=c["results_dir"], device=c["device"])
    if world > 1:
        from d2c.distributed import init_distributed
        import torch.distributed as dist
        init_distributed(pipe.device)
        dist.barrier()
    return pipe


PREPARE = ("cache", "train")   # run.py --cache-only / --train-only (d2c-train): a cell's first steps


def prepare_cell(c: dict, what: str) -> list[str]:
    """Only the token cache (`cache`: the tokenizers, trained or loaded, and the cache of the
    data) or everything the cell's family trains (`train`), in this process; every rank of a
    torchrun / srun job takes part (cache shards, DDP).  Returns the folders it made or found."""
    rank, world = _distributed()
    pipe = open_pipeline(c, world)
    if what == "cache":
        cache = pipe.cache()
        return [str(d) for d in pipe._dirs.values()] + [str(cache.path)]
    pipe.models(family_of(c))
    return [str(d) for d in pipe._dirs.values()]


def cell_work(c: dict) -> str:
    """What a cell will do, for its first log line (the pipeline logs each stage as it trains it,
    resumes it or finds it trained)."""
    fam = family_of(c)
    stages = [s for s, has in (("gpt", fam.has_stage1), ("mar", fam.has_stage2)) if has]
    public = [s for s in stages if c.get(f"init.{s}")]
    if c["train_epochs"] == 0:
        work = "trains nothing (public " + ", ".join(f"{s} {Path(c[f'init.{s}']).name}" for s in public) + ")"
    else:
        fresh = ["tokenizers"] * (c["recipe"] not in PAPER_RECIPES) + [s for s in stages if s not in public]
        work = "; ".join(([f"fine-tunes {', '.join(public)}"] if public else [])
                         + ([f"trains (or reuses) {', '.join(fresh)}"] if fresh else []))
    return f"{work}; samples {c['num_images']} images, batch {c['batch_size']}, seed {c['seed']}"


def run_cell(c: dict, cell_id: str, train_key: str) -> dict:
    """ensure checkpoints -> sample -> metrics -> record; a failure becomes a failed record.
    Returns the record (rank 0) or {} (other ranks of a multi-task job)."""
    from d2c.results import is_finished, now_iso, read_record, record_path, write_record
    results = Path(c["results_dir"])
    if is_finished(results, cell_id, train_key):
        return read_record(record_path(results, cell_id))
    rank, world = _distributed()
    rec = base_record(c, cell_id, train_key)
    rec["started_at"] = now_iso()
    t0 = time.perf_counter()
    try:
        from d2c.pipeline import evaluate
        from d2c.sampling import save_sample_grid
        if c["fault"] == "exit":
            os._exit(17)        # a job that dies without a record (tests the launcher's reporting)
        if c["fault"] == "raise" or (c["fault"] == "raise_if_seed_mod5" and c["seed"] % 5 == 0):
            raise RuntimeError(f"fault injected by fault={c['fault']}")
        pipe = open_pipeline(c, world)
        fam = family_of(c)
        pipe.models(fam)                      # trains / resumes / reuses (all ranks under DDP)
        run = dict(num_images=c["num_images"], batch_size=c["batch_size"], seed=c["seed"], progress=True)
        from d2c.results import check_cell_id, safe_subdir
        if c["recipe"] in PAPER_RECIPES:      # the ADM protocol: every rank samples its batches
            from d2c.pipeline import evaluate_adm
            r = evaluate_adm(pipe, fam, safe_subdir(results, "samples") / check_cell_id(cell_id), sampler_of(c),
                             inception=c["eval.inception"], reference=c["eval.reference"], **run)
        elif rank == 0:
            r = evaluate(pipe, fam, sampler_of(c), **run)
        if rank != 0:
            return {}
        imgs = r["images"]
        grid = safe_subdir(results, "grids") / f"{check_cell_id(cell_id)}.png"
        save_sample_grid(imgs, grid)
        rec.update(status="ok", metrics={k: float(v) for k, v in r["metrics"].items()}, speed=r["speed"],
                   grid=str(grid.relative_to(results)))
        rec["train_seconds"] = dict(pipe.timings)
    except Exception as e:  # noqa: BLE001 - every failure becomes the cell's record
        if rank != 0:
            raise
        rec.update(status="failed", error=one_line(e, with_type=True)[:500])
        logger.exception(f"cell {cell_id} failed")
    rec["finished_at"] = now_iso()
    rec["seconds"] = time.perf_counter() - t0
    write_record(results, rec)
    return rec


def failed_record(cell: dict, error: str, env: dict | None = None) -> dict:
    """The record of a cell whose job died without writing one (the sweep writes it)."""
    from d2c.results import now_iso
    rec = base_record(cell["config"], cell["cell_id"], cell["train_key"], env)
    rec.update(error=error[:500], started_at=None, finished_at=now_iso())
    return rec


# --------------------------------------------------------------------------- the summary


# axes shown in the summary only when they differ between its cells
SUMMARY_IF_VARIED = ("discrete_model", "diffusion_steps", *OFF_VALUES, "num_images", "seed")
INT_COLUMNS = (*(k for k in SAMPLER_KEYS if setting_type(k) is int), "num_images", "seed",
               "fusion.num_queries", "fusion.depth", "fusion.d_fuse")


def summary_table(records: list[dict]):
    import pandas as pd
    configs = [r.get("config", {}) for r in records]
    # null = the axis does not apply (llamagen's head, mar's stage 1): not a second value
    varied = [k for k in SUMMARY_IF_VARIED if len({repr(c.get(k)) for c in configs if c.get(k) is not None}) > 1]
    rows = []
    for r, c in zip(records, configs):
        m, s = r.get("metrics") or {}, r.get("speed") or {}
        rows.append({"cell": r["cell_id"][:8], "family": r["family"], "steps": c.get("steps"),
                     **{k: c.get(k) for k in varied},
                     "cfg": c.get("cfg"), "temp": c.get("temperature"), "status": r["status"],
                     "fid": m.get("fid"), "fid_detail": m.get("fid_detail"), "is": m.get("is_mean"),
                     "acc": m.get("class_accuracy"),
                     "img/s": s.get("images_per_second"), "error": r.get("error") or ""})
    df = pd.DataFrame(rows)
    for k in INT_COLUMNS:
        if k in df:
            df[k] = df[k].astype("Int64")
    return df


def print_summary(cells: list[dict], results_dir, out=sys.stdout) -> int:
    """Table of this sweep's cells from the store; returns the number of failed/missing cells."""
    from d2c.results import read_record, record_path, RecordError
    import pandas as pd
    recs, bad = [], 0
    for cell in cells:
        try:
            rec = read_record(record_path(cell["config"]["results_dir"], cell["cell_id"]))
        except RecordError:
            rec = {**failed_record(cell, "no record (job lost)")}
        bad += rec["status"] != "ok"
        recs.append(rec)
    df = summary_table(recs)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 70,
                           "display.float_format", "{:.3f}".format):
        print(df.to_string(index=False), file=out)
    ok = len(recs) - bad
    results_dir = Path(results_dir)
    for cell, rec in zip(cells, recs):   # every failure on its own line, with its axes and error
        if rec["status"] != "ok":
            print(f"failed: {cell['cell_id'][:8]} {describe(cell['config'])}: {rec.get('error') or ''}", file=out)
    print(f"{ok} ok, {bad} failed of {len(recs)} cells; records: {results_dir / 'records'}  "
          f"grids: {results_dir / 'grids'}  (schema: core/d2c/results.py)", file=out, flush=True)
    return bad
