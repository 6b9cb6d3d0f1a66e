"""The result store: one record per run, the one schema `ablations/` writes and `reports/` reads.

Layout: `<results_dir>/records/<cell_id>.json`, one JSON object per file, written atomically
(temp file, fsync, rename).  One file per cell makes concurrent writers (SLURM array jobs)
safe without a lock and makes "is this cell finished?" a file-exists check; a crash (even
SIGKILL mid-write) leaves either the previous file or the whole new one, plus at most a hidden
`.<cell_id>.json.tmp-<host>-<pid>` that readers never count and the next write removes (its
writer is dead on this host, or it is older than STALE_TMP_S).
A cell id is one file-name component (no separators, no leading dot), and `records/` must be
a real folder inside `results_dir` (a symlink there is refused, never written through).

Schema version 1 (`SCHEMA_VERSION`), keys of a record:

    schema        int    1
    cell_id       str    hash of the full run config (sampling axes included): the file name
    train_key     str    hash of the training-relevant config only (shared by cells that train the same models)
    status        str    "ok" | "failed"
    error         str    one-line error of a failed run, else null
    family        str    llamagen | mar | d2c_cross_attn | d2c_qformer
    config        dict   the run's axes: model, fusion (the kind), fusion.num_queries / .depth / .layers /
                         .d_fuse (the values that ran; null where they do not apply), discrete_model,
                         every d2c.sampling.SamplerConfig field (steps, diffusion_steps per token, cfg,
                         temperature, stage1_top_k, ...: null where the family does not run it),
                         num_images, data, seed (+ anything else the harness resolves); a key of
                         ADDED_KEYS that a record predates reads as the value it implies (a fusion
                         knob: null, the preset's value unrecorded)
    metrics       dict   fid, is_mean, is_std, kid_mean, kid_std, precision, recall, class_accuracy
                         (floats; absent when not computed, e.g. for a failed run)
    speed         dict   d2c.metrics.speed_record: num_images, seconds_total, seconds_per_image,
                         images_per_second, stage1_seconds, stage2_seconds, decode_seconds,
                         ar_steps, mar_steps, reverse_steps (the head's reverse steps summed over
                         MAR's rounds; `diffusion_steps` in older records), peak_memory_bytes,
                         peak_memory_kind
    train_seconds dict   seconds spent training each stage inside this run (empty when reused)
    hardware      dict   d2c.metrics.hardware_info (cpu_model, gpu_name, torch, triton, ...)
    versions      dict   python, torch, torchvision, triton, torch_fidelity, d2c
    git_commit    str    commit of the code that ran (null outside a git checkout); "+dirty" suffix if modified
    seed          int    the sampling seed (also in config)
    grid          str    path of the sample grid PNG, relative to results_dir (or null)
    started_at    str    ISO-8601 UTC
    finished_at   str    ISO-8601 UTC
"""
from __future__ import annotations

import json
import os
import platform
import re
import socket
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

from d2c.files import atomic_write_text, json_default, pid_alive
from d2c.sampling import SAMPLER_DEFAULTS, runs

SCHEMA_VERSION = 1
# schema-1 records held these sampling keys from the start; every other SamplerConfig field was
# added since
FIRST_SAMPLER_KEYS = ("steps", "diffusion_steps", "cfg", "temperature")
# config keys added after schema-1 records existed -> the value an older record implies: the
# sampler's default (null where the record's family does not run the setting), the others below.
# The harness keeps them out of the cell id at these values, so an older record is the same cell.
ADDED_KEYS = {"mar_model": None, "fusion.num_queries": None, "fusion.depth": None, "fusion.layers": None,
              "fusion.d_fuse": None, "train_epochs": None, "train_batch_size": None, "tokenizer.kl": None,
              "tokenizer.vq": None, "tokenizer.kl_preset": None, "tokenizer.vq_preset": None,
              "eval.inception": None, "eval.reference": None, "init.gpt": None, "init.mar": None,
              **{k: v for k, v in SAMPLER_DEFAULTS.items() if k not in FIRST_SAMPLER_KEYS}}
REQUIRED = ("schema", "cell_id", "status", "family", "config")
STATUSES = ("ok", "failed")
# one file-name component: no '/', no '\\', no leading '.' (so never '..', never a hidden temp name)
CELL_ID = re.compile(r"[^./\\\x00-\x1f][^/\\\x00-\x1f]{0,159}")   # + ".json" + temp suffix < 255
STALE_TMP_S = 60.0   # a record is a few KB: a temp file this old belongs to a writer that died


class RecordError(ValueError):
    """A record file that is not a valid schema-1 record (the message names the file)."""


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_cell_id(cell_id) -> str:
    """A cell id names files (records/<id>.json, grids/<id>.png): one plain path component."""
    if not isinstance(cell_id, str) or not CELL_ID.fullmatch(cell_id):
        raise RecordError(f"cell_id={cell_id!r}: not a plain file name (allowed: up to 160 characters without "
                          f"'/', '\\' or control characters, not starting with '.')")
    return cell_id


def record_path(results_dir, cell_id: str) -> Path:
    return Path(results_dir) / "records" / f"{check_cell_id(cell_id)}.json"


def safe_subdir(results_dir, name: str, create: bool = True) -> Path:
    """`results_dir/name` as a real folder inside results_dir: a symlink (or anything resolving
    outside results_dir) is refused with a one-line RecordError, so no write follows a link out
    of the results tree."""
    root = Path(results_dir)
    sub = root / name
    if sub.is_symlink():
        raise RecordError(f"{sub} is a symlink (to {os.readlink(sub)}); refusing to write through it: "
                          f"make it a real folder inside {root}")
    if sub.exists():
        if not sub.is_dir():
            raise RecordError(f"{sub} exists and is not a folder")
        if not sub.resolve().is_relative_to(root.resolve()):
            raise RecordError(f"{sub} resolves to {sub.resolve()}, outside {root.resolve()}; refusing to write there")
    elif create:
        sub.mkdir(parents=True, exist_ok=True)
    return sub


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def _clean_stale_tmp(folder: Path, now: float | None = None) -> None:
    """Remove temp files of writers that died mid-write (SIGKILL, OOM, node loss): those of a
    dead pid on this host, and any older than STALE_TMP_S (a writer on another node: its pid
    means nothing here, so only age tells).  A live writer's temp file is never touched."""
    now = time.time() if now is None else now
    host = socket.gethostname()
    for p in folder.glob(".*.json.tmp*"):
        who, _, pid = p.name.rpartition(".tmp-")[2].rpartition("-")
        try:
            dead_here = who == host and pid.isdigit() and not pid_alive(int(pid))
            if dead_here or now - p.lstat().st_mtime > STALE_TMP_S:
                p.unlink()
        except FileNotFoundError:   # another writer cleaned it first
            pass


def write_record(results_dir, record: dict) -> Path:
    """Validate and write atomically; an existing record of the same cell is replaced whole."""
    check_record(record, source="record to write")
    folder = safe_subdir(results_dir, "records")
    path = record_path(results_dir, record["cell_id"])
    _clean_stale_tmp(folder)
    atomic_write_text(path, json.dumps(record, sort_keys=True, default=json_default) + "\n", tmp=_tmp_name(path))
    return path


def check_record(rec, source: str = "record") -> dict:
    if not isinstance(rec, dict):
        raise RecordError(f"{source}: not a JSON object")
    missing = [k for k in REQUIRED if k not in rec]
    if missing:
        raise RecordError(f"{source}: missing key(s) {missing}")
    if rec["schema"] != SCHEMA_VERSION:
        raise RecordError(f"{source}: schema={rec['schema']!r}; this code reads schema {SCHEMA_VERSION}")
    try:
        check_cell_id(rec["cell_id"])
    except RecordError as e:
        raise RecordError(f"{source}: {e}") from None
    if rec["status"] not in STATUSES:
        raise RecordError(f"{source}: status={rec['status']!r}; allowed: {', '.join(STATUSES)}")
    for k in ("config", "metrics", "speed"):
        if k in rec and rec[k] is not None and not isinstance(rec[k], dict):
            raise RecordError(f"{source}: {k} must be an object")
    config, speed = rec["config"], rec.get("speed")
    if isinstance(config, dict):
        for k, v in ADDED_KEYS.items():
            config.setdefault(k, v)
        model = {"llamagen": "llamagen", "mar": "mar"}.get(rec["family"], "d2c")
        for k in SAMPLER_DEFAULTS:   # what the family does not run reads as null, as today's records
            if not runs(k, model):
                config[k] = None
    if isinstance(speed, dict) and "diffusion_steps" in speed:   # the head's total before it had its own name
        speed.setdefault("reverse_steps", speed.pop("diffusion_steps"))
    return rec


def read_record(path) -> dict:
    path = Path(path)
    try:
        rec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return check_record(rec, source=str(path))


def read_records(results_dir, on_bad=None) -> list[dict]:
    """Every valid record under `results_dir/records` (sorted by file name).  A malformed file is
    passed to `on_bad(RecordError)` (default: ignored) and skipped, never raised.  Hidden files
    (the `.<id>.json.tmp-<host>-<pid>` of an interrupted write) are not records and are not looked at."""
    folder = Path(results_dir) / "records"
    out = []
    if not folder.is_dir():
        return out
    for p in sorted(folder.glob("*.json")):
        if p.name.startswith("."):
            continue
        try:
            out.append(read_record(p))
        except RecordError as e:
            if on_bad is not None:
                on_bad(e)
    return out


def is_finished(results_dir, cell_id: str, train_key: str | None = None) -> bool:
    """A cell is finished when its record exists and says ok (failed cells are retried) and,
    given `train_key`, was made by models trained as today's are (a record from before a data,
    preset or recipe change is stale: the cell runs again on the new stages)."""
    p = record_path(results_dir, cell_id)
    if not p.is_file():
        return False
    try:
        rec = read_record(p)
    except RecordError:
        return False
    return rec["status"] == "ok" and (train_key is None or rec.get("train_key") == train_key)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "triton", "torch-fidelity", "d2c"):
        try:
            out[name.replace("-", "_")] = version(name)
        except PackageNotFoundError:
            out[name.replace("-", "_")] = None
    return out


def git_commit(repo_dir=None) -> str | None:
    repo_dir = repo_dir or Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_dir,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "")


def pareto_indices(x, y) -> list[int]:
    """Indices of the points (x[i], y[i]) that no other point beats (x at least as high and y at
    least as low, one of them strictly), highest x first; non-finite points are ignored and exact
    duplicates of a front point stay on it.  The speed-vs-FID front: x images/s, y FID."""
    import numpy as np
    xv, yv = np.asarray(x, float), np.asarray(y, float)
    idx = np.flatnonzero(np.isfinite(xv) & np.isfinite(yv))
    order = idx[np.argsort(-xv[idx], kind="stable")]
    keep, best, i = [], float("inf"), 0   # best: min y over points with strictly larger x
    while i < len(order):
        j = i
        while j < len(order) and xv[order[j]] == xv[order[i]]:
            j += 1
        grp = order[i:j]
        m = yv[grp].min()
        if m < best:
            keep.extend(int(g) for g in grp if yv[g] == m)
        best, i = min(best, m), j
    return keep
