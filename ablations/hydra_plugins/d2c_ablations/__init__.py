"""Hydra plugins of the ablation harness (found by Hydra's scan of the `hydra_plugins` namespace
when `ablations/` is on sys.path, which `ablations/run.py` arranges, also for its jobs):

  hydra/sweeper=d2c          runs the plan ablations/run.py made (hydra.sweeper.plan: the
                             validated cells as JSON): skips finished cells, launches the rest in
                             ONE launcher call, writes a failed record for a job that died without
                             one, saves multirun.yaml in the sweep dir.  It imports nothing of the
                             harness (run.py plans before and summarises after).
  hydra/launcher=submitit_slurm / submitit_local
                             the stock hydra-submitit-launcher configs with a launcher that waits
                             for every job, prints state changes, and turns a job that died (killed,
                             cancelled, node failure) into a failed result instead of raising.
                             The job callable follows submitit's checkpoint protocol: on the
                             timeout / preemption signal (USR2) training checkpoints at the end
                             of its step (d2c.train.request_stop), then checkpoint() returns a
                             DelayedSubmission of the same cell and submitit requeues it; the
                             requeued job resumes from that checkpoint.  SIGTERM (scancel, SLURM
                             preemption) checkpoints too (d2c.train) and exits without a record.
  search path                slurm/conf (launcher presets such as hydra/launcher=local_cluster).
"""
import json
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

import hydra_plugins.hydra_submitit_launcher.config as _stock
from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.search_path_plugin import SearchPathPlugin
from hydra.plugins.sweeper import Sweeper
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher

REPO = Path(__file__).resolve().parents[3]
logger = logging.getLogger("d2c.sweep")   # main process: Hydra's log; jobs: the job's log
SACCT_SHIM = REPO / "slurm" / "bin"


class D2CSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append("d2c-slurm", f"file://{REPO / 'slurm' / 'conf'}")


# --------------------------------------------------------------------------- launchers


def _sacct_works() -> bool:
    try:
        r = subprocess.run(["sacct", "--parsable2", "-n", "-j", "1"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


def ensure_sacct() -> None:
    """Without accounting `sacct` fails and submitit would wait forever for a job that died without
    a result; put our shim (answers from `scontrol show job`) first on PATH then."""
    if shutil.which("sbatch") and not _sacct_works() and str(SACCT_SHIM) not in os.environ["PATH"].split(":"):
        os.environ["PATH"] = f"{SACCT_SHIM}:{os.environ['PATH']}"


class _Robust:
    """launch() of the stock submitit launchers, except that it waits for every job, prints each
    job's state changes, and returns a failed JobReturn for a job that ended without a result.
    The job callable (__call__, checkpoint) handles preemption; see the module docstring."""

    poll_s = 2.0

    def __call__(self, *args):
        """One job = one cell.  submitit's own USR2 handler would checkpoint + requeue + exit at
        once, mid training step; ours asks d2c.train to stop after its current step with a
        checkpoint (Preempted), and only then hands over to submitit's handler (which calls
        self.checkpoint() and requeues).  A USR2 outside training lets the cell finish (sampling
        is short; the next training stage, if any, stops at its first step)."""
        import signal
        import d2c.train as T
        usr = signal.SIGUSR2
        got = []

        def on_usr(signum, frame):
            got.append(signum)
            T.request_stop()
        try:
            submitit_handler = signal.signal(usr, on_usr)
        except ValueError:   # not the main thread (in-process tests): no signal handling
            return super().__call__(*args)
        try:
            return super().__call__(*args)
        except T.Preempted:
            if got and callable(submitit_handler):
                logger.warning(f"preempted (signal {signal.Signals(got[0]).name}): checkpoint written; requeuing")
                signal.signal(usr, submitit_handler)
                submitit_handler(got[0], None)   # checkpoint() + requeue + exit (rank 0; returns on others)
            raise   # SIGTERM (scancel / SLURM preemption): exit 143 without a record; a rerun resumes
        finally:
            signal.signal(usr, submitit_handler)
            T._stop.clear()   # a stop requested outside training must not leak into a later job

    def checkpoint(self, *args, **kwargs):
        """submitit's checkpoint protocol: requeue this same callable with the same cell (the
        training checkpoint on disk is the state; the cell's overrides are the arguments)."""
        import submitit
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit
        from hydra.core.singleton import Singleton
        from hydra.core.utils import filter_overrides
        from omegaconf import OmegaConf

        if self._EXECUTOR == "slurm":
            ensure_sacct()
        params = dict(self.params)
        init = {"folder": params.pop("submitit_folder")}
        if "max_num_timeout" in params:
            init[f"{self._EXECUTOR}_max_num_timeout"] = params.pop("max_num_timeout")
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        base = set(OmegaConf.structured(_stock.BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in params.items()})
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        args = [(list(ov), "hydra.sweep.dir", initial_job_idx + i, f"job_id_for_{initial_job_idx + i}",
                 Singleton.get_state()) for i, ov in enumerate(job_overrides)]
        jobs = executor.map_array(self, *zip(*args))
        names = [" ".join(filter_overrides(ov)) for ov in job_overrides]
        for j, n in zip(jobs, names):
            logger.info(f"  submitted job {j.job_id}: {n}")
        states = {}
        pending = set(range(len(jobs)))
        while pending:
            for i in sorted(pending):
                j = jobs[i]
                done = j.done()
                st = j.state
                if states.get(i) != st and not done:
                    states[i] = st
                    logger.info(f"  job {j.job_id} {st}: {names[i]}")
                if done:
                    pending.discard(i)
                    logger.info(f"  job {j.job_id} finished ({j.state}): {names[i]}")
            if pending:
                time.sleep(self.poll_s)
        out = []
        for j in jobs:
            try:
                out.append(j.results()[0])
            except Exception as e:  # killed, cancelled, failed node, lost result
                ret = JobReturn()
                ret.status = JobStatus.FAILED
                msg = str(e).strip().splitlines()
                ret._return_value = RuntimeError(f"job {j.job_id} ({j.state}): {type(e).__name__}: "
                                                 f"{msg[0] if msg else ''}")
                out.append(ret)
        return out


class D2CSlurmLauncher(_Robust, SlurmLauncher):
    pass


class D2CLocalLauncher(_Robust, LocalLauncher):
    pass


@dataclass
class D2CSlurmConf(_stock.SlurmQueueConf):
    """hydra/launcher=submitit_slurm: every field of the stock one (partition, gpus_per_node, nodes,
    tasks_per_node, timeout_min, mem_gb, account, qos, ...); preemption and timeouts requeue
    (submitit checkpoint), up to max_num_timeout times for timeouts."""
    _target_: str = "hydra_plugins.d2c_ablations.D2CSlurmLauncher"
    submitit_folder: str = "${hydra.sweep.dir}/.submitit/%j"
    max_num_timeout: int = 3
    signal_delay_s: int = 120


@dataclass
class D2CLocalConf(_stock.LocalQueueConf):
    _target_: str = "hydra_plugins.d2c_ablations.D2CLocalLauncher"


# --------------------------------------------------------------------------- sweeper


@dataclass
class D2CSweeperConf:
    _target_: str = "hydra_plugins.d2c_ablations.D2CSweeper"
    plan: Optional[str] = None      # the validated cells, a JSON file ablations/run.py writes


class D2CSweeper(Sweeper):
    """Run the plan ablations/run.py made and validated: skip finished cells, launch the rest in
    one launcher call, turn a job that died without a record into a failed record.  It imports
    nothing of the harness: each planned cell carries its overrides, ids, description and the
    failed record to write if its job is lost."""

    def __init__(self, plan: Optional[str] = None) -> None:
        self.plan = plan
        self.config = self.launcher = self.hydra_context = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        from hydra.core.plugins import Plugins
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        from omegaconf import OmegaConf

        from d2c.results import is_finished, now_iso, read_record, record_path, write_record

        if not self.plan:
            raise ValueError("hydra/sweeper=d2c runs the cells that ablations/run.py plans "
                             "(hydra.sweeper.plan); start the sweep with ablations/run.py")
        cells = json.loads(Path(self.plan).read_text())
        sweep_dir = Path(self.config.hydra.sweep.dir)   # as Hydra's own sweeper: the sweep's config
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        todo = [c for c in cells if not is_finished(c["results_dir"], c["cell_id"], c["train_key"])]
        trains = len({c["train_key"] for c in todo})
        results_dir = cells[0]["results_dir"] if cells else "."
        logger.info(f"sweep: {len(cells)} cells, {len(cells) - len(todo)} already done (skipped), "
                    f"{len(todo)} to run, {trains} training config(s); results in {results_dir}")
        for c in cells:
            logger.info(f"  [{'todo' if c in todo else 'done'}] {c['cell_id'][:8]} {c['describe']}")
        if not todo:
            return []
        os.environ["D2C_SWEEP_CELLS"] = str(len(todo))   # a job's log says "cell k of N" (k: hydra.job.num)
        rets = self.launcher.launch([c["overrides"] for c in todo], initial_job_idx=0)
        for c, r in zip(todo, rets):
            if r.status == JobStatus.COMPLETED:
                continue
            try:
                ok = read_record(record_path(c["results_dir"], c["cell_id"]))["status"] == "ok"
            except Exception:
                ok = False
            if not ok:
                msg = str(r._return_value).strip().splitlines()
                error = msg[0] if msg else type(r._return_value).__name__
                write_record(c["results_dir"], {**c["failed_record"], "error": error[:500], "finished_at": now_iso()})
                logger.error(f"  FAILED {c['cell_id'][:8]} {c['describe']}: {error}")
        return [rets]


def register() -> None:
    """Store our sweeper and launcher nodes.  Call after Hydra's plugin scan (which re-executes
    the stock plugin's config module): ablations/run.py does."""
    cs = ConfigStore.instance()
    cs.store(group="hydra/sweeper", name="d2c", node=D2CSweeperConf, provider="d2c_ablations")
    cs.store(group="hydra/launcher", name="submitit_slurm", node=D2CSlurmConf, provider="d2c_ablations")
    cs.store(group="hydra/launcher", name="submitit_local", node=D2CLocalConf, provider="d2c_ablations")


register()
