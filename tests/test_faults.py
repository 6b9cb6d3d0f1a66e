"""Faults at the harness level (ablations/run.py): every fault is injected.

  record writes   SIGKILL in the middle of writing a record -> the old record or none, never half;
                  a rerun leaves exactly one whole record per cell and no temp files
  preemption      SIGTERM mid-training -> checkpoint, exit without a record, rerun resumes;
                  USR2 in a submitit job -> checkpoint, submitit checkpoint() requeues the same
                  cell, the requeued job resumes and writes the record
  load            50 cells, one in five failing, through the launcher, in bounded time
  security        no `_target_` outside d2c / our plugins, no '..' in results_dir, cell ids are
                  plain file names, no writes through a symlink in the results tree
  user errors     one line, exit 2 (d2c.cli.exit_on_user_error)
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_ablations import TINY, _env, _results, metrics_cache, records, run  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "ablations" / "run.py"
sys.path.insert(0, str(REPO / "ablations"))

import d2c_harness as H  # noqa: E402
from d2c.results import RecordError, is_finished, read_record, read_records, record_path, write_record  # noqa: E402

# A driver around the real code: os.replace into a `records/` folder (the commit of an atomic
# record write) cuts the temp file short (a write interrupted half-way), says so, and hangs
# on the N-th record, where the test SIGKILLs it.  Mode `record`: one write_record; mode `run`:
# ablations/run.py with the remaining arguments.
_DRIVER = r'''
import os, runpy, sys, time
from pathlib import Path
real_replace, count = os.replace, [0]
HANG_ON = int(os.environ["HANG_ON_RECORD"])

def replace(src, dst, *a, **k):
    if Path(dst).parent.name == "records" and str(dst).endswith(".json"):
        count[0] += 1
        if count[0] == HANG_ON:
            with open(src, "r+b") as f:
                f.truncate(os.path.getsize(src) // 2)
            print("HANGING", src, flush=True)
            time.sleep(600)
    return real_replace(src, dst, *a, **k)
os.replace = replace
if sys.argv[1] == "record":
    import json
    from d2c.results import write_record
    write_record(sys.argv[2], json.loads(sys.argv[3]))
else:
    sys.argv = [sys.argv[2], *sys.argv[3:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
'''


def _drive(tmp_path, args, hang_on=1, timeout=120):
    """Start the driver, wait for HANGING, SIGKILL its process group; returns the output."""
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER)
    p = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env={**_env(), "HANG_ON_RECORD": str(hang_on)}, cwd=REPO, start_new_session=True)
    out, deadline = [], time.time() + timeout
    try:
        while time.time() < deadline:
            line = p.stdout.readline()
            if not line and p.poll() is not None:
                pytest.fail("driver ended before hanging:\n" + "".join(out)[-3000:])
            out.append(line)
            if line.startswith("HANGING"):
                break
        else:
            pytest.fail("driver did not reach the record write:\n" + "".join(out)[-3000:])
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    return "".join(out)


def _record(cell_id="cellA", status="ok", **kw):
    return {"schema": 1, "cell_id": cell_id, "train_key": "tk", "status": status, "error": None,
            "family": "mar", "config": {"seed": 0}, "metrics": {"fid": 1.0}, "speed": {}, **kw}


def _files(rd):
    return sorted(p.name for p in (rd / "records").iterdir())


# --------------------------------------------------------------------------- 1. record writes


def test_sigkill_mid_record_write_keeps_old_record_and_next_write_cleans(tmp_path):
    """SIGKILL while a record is replaced: the old record is still whole, the cut temp file is
    not counted as a record; the next write removes it (its writer is dead) and leaves one file."""
    rd = tmp_path / "r"
    write_record(rd, _record(status="failed", error="first try"))
    out = _drive(tmp_path, ["record", str(rd), json.dumps(_record(status="ok"))])
    tmps = [n for n in _files(rd) if n != "cellA.json"]
    assert len(tmps) == 1 and tmps[0].startswith(".cellA.json.tmp-"), (_files(rd), out)
    recs = read_records(rd, on_bad=lambda e: pytest.fail(str(e)))
    assert [r["status"] for r in recs] == ["failed"] and recs[0]["error"] == "first try"
    assert not is_finished(rd, "cellA")                         # so the sweep retries it
    with pytest.raises(json.JSONDecodeError):                   # the temp really is half a record
        json.loads((rd / "records" / tmps[0]).read_text())
    # a temp file of a writer on another host: kept while fresh (it may be alive), removed when stale
    other = rd / "records" / ".cellB.json.tmp-othernode-1"
    other.write_text("{")
    write_record(rd, _record(status="ok"))
    assert _files(rd) == [".cellB.json.tmp-othernode-1", "cellA.json"]
    assert read_record(rd / "records" / "cellA.json")["status"] == "ok"
    old = time.time() - 3600
    os.utime(other, (old, old))
    write_record(rd, _record(cell_id="cellC"))
    assert _files(rd) == ["cellA.json", "cellC.json"]


def test_sigkill_during_sweep_record_write_then_rerun_one_record_per_cell(tmp_path):
    """A real sweep (3 cells that fail fast, no training) killed while writing its 2nd record:
    one record and one temp file; the rerun writes every cell's record exactly once, no temps."""
    rd = tmp_path / "r"
    args = ["-m", "model=mar", "steps=2", "fault=raise", "seed=0,1,2", *TINY, f"results_dir={rd}"]
    _drive(tmp_path, ["run", str(RUN), *args], hang_on=2)
    names = _files(rd)
    assert len([n for n in names if not n.startswith(".")]) == 1 and len(names) == 2, names
    assert len(read_records(rd, on_bad=lambda e: pytest.fail(str(e)))) == 1
    p = run(args, timeout=180)
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]   # every cell failed (fault=raise)
    recs = records(rd)
    assert sorted(r["config"]["seed"] for r in recs) == [0, 1, 2]
    assert _files(rd) == sorted(f"{r['cell_id']}.json" for r in recs)   # no temp file, nothing twice
    assert "0 ok, 3 failed of 3 cells" in p.stdout and len(re.findall(r"^failed: ", p.stdout, re.M)) == 3


# --------------------------------------------------------------------------- 2. preemption


def _launcher():
    from hydra_plugins.d2c_ablations import D2CLocalLauncher
    return D2CLocalLauncher(submitit_folder="unused")


def test_job_checkpoint_returns_delayed_submission_of_same_cell():
    import submitit
    job = _launcher()
    args = (["model=mar", "seed=3"], "hydra.sweep.dir", 4, "job_id_for_4", {})
    d = job.checkpoint(*args)
    assert isinstance(d, submitit.helpers.DelayedSubmission)
    assert d.function is job and d.args == args and d.kwargs == {}


def test_usr2_in_job_checkpoints_training_then_hands_over_to_submitit(tmp_path, monkeypatch):
    """submitit's timeout / preemption signal inside a job: training finishes its step and
    checkpoints (Preempted), then submitit's own handler runs (it calls checkpoint() and
    requeues); handlers and the stop flag are restored afterwards."""
    import d2c.train as T
    from d2c.checkpoint import is_done
    from test_reliability import train_config, src

    # the stock launcher class our launcher calls through super(): taken from the MRO, because
    # Hydra's plugin scan may have re-imported its module (a fresh class object) in this process
    LocalLauncher = next(c for c in type(_launcher()).__mro__ if c.__name__ == "LocalLauncher")

    calls = []

    def submitit_handler(signum, frame):   # stands in for SignalHandler.checkpoint_and_try_requeue
        calls.append(signum)
        raise SystemExit(144)              # what submitit's local requeue does

    real_lr = T.lr_at

    def usr2_at_2(step, config):
        if step == 2:
            os.kill(os.getpid(), signal.SIGUSR2)
        return real_lr(step, config)

    def job_body(self, *args):             # the stock job callable: here, one training run
        T.train(train_config(train_steps=6, ckpt_every=1000), src(), tmp_path / "run")
        return "finished"
    monkeypatch.setattr(T, "lr_at", usr2_at_2)
    monkeypatch.setattr(LocalLauncher, "__call__", job_body)
    prev = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        with pytest.raises(SystemExit) as e:
            _launcher()(["seed=1"], "hydra.sweep.dir", 0, "job_id_for_0", {})
        assert e.value.code == 144 and calls == [signal.SIGUSR2]
        assert [p.name for p in (tmp_path / "run").glob("step_*")] == ["step_0000003"]
        assert signal.getsignal(signal.SIGUSR2) is submitit_handler and not T._stop.is_set()
        # the requeued job resumes and finishes
        monkeypatch.setattr(T, "lr_at", real_lr)
        assert _launcher()(["seed=1"], "hydra.sweep.dir", 0, "job_id_for_0", {}) == "finished"
        assert is_done(tmp_path / "run") and calls == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, prev)


def _wait_for(pred, proc, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        if proc.poll() is not None:
            pytest.fail(f"process ended before {what}:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"no {what} within {timeout} s")


@pytest.mark.slow
def test_sigterm_mid_training_checkpoints_no_record_then_rerun_resumes(tmp_path, metrics_cache):
    rd = _results(tmp_path, metrics_cache)
    args = ["model=mar", "steps=2", "train_steps=30", *TINY, f"results_dir={rd}"]
    proc = subprocess.Popen([sys.executable, str(RUN), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=_env(), cwd=REPO, start_new_session=True)
    try:
        _wait_for(lambda: list(rd.glob("ckpt/kl-*/step_*/state.pt")), proc, 240, "first checkpoint")
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "stop requested (SIGTERM)" in out and "Traceback" not in out, out[-3000:]
    assert not (rd / "records").exists() or not list((rd / "records").iterdir())
    assert not list(rd.glob("ckpt/kl-*/DONE"))                      # stopped mid-stage, checkpoint kept
    p = run(args, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert re.search(r"^(?:\[[^]]*\] )?training kl -> .* \(resuming from step_\d+\)", p.stdout, re.M), p.stdout[-3000:]
    recs = records(rd)
    assert len(recs) == 1 and recs[0]["status"] == "ok" and _files(rd) == [f"{recs[0]['cell_id']}.json"]


def _children(pid: int) -> list[int]:
    kids = []
    for t in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(x) for x in (t / "children").read_text().split()]
    return kids


@pytest.mark.slow
def test_usr2_preemption_through_submitit_local_requeues_and_resumes(tmp_path, metrics_cache):
    """The real thing through submitit: USR2 to the job's task while it trains -> checkpoint,
    checkpoint() + requeue (submitit's local controller restarts the task), the requeued task
    resumes from the checkpoint, and the sweep ends with the one record."""
    rd = _results(tmp_path, metrics_cache)
    args = ["-m", "model=mar", "steps=2", "train_steps=30", *TINY, "hydra/launcher=submitit_local",
            f"results_dir={rd}"]
    proc = subprocess.Popen([sys.executable, str(RUN), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=_env(), cwd=REPO, start_new_session=True)
    try:
        _wait_for(lambda: list(rd.glob("ckpt/kl-*/step_*/state.pt")), proc, 240, "first checkpoint")
        (ctrl,) = [c for c in _children(proc.pid)]                 # submitit's local controller
        (task,) = _children(ctrl)                                   # the job's task process
        os.kill(task, signal.SIGUSR2)
        out = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out[-3000:]
    log = "".join(f.read_text() for f in rd.glob("hydra/*/.submitit/*/*_log.*"))
    assert "preempted (signal SIGUSR2): checkpoint written; requeuing" in log, log[-3000:]
    assert "Requeued job" in log, log[-3000:]
    assert re.search(r"^(?:\[[^]]*\] )?training kl -> .* \(resuming from step_\d+\)", log, re.M), log[-3000:]
    recs = records(rd)
    assert len(recs) == 1 and recs[0]["status"] == "ok" and "1 ok, 0 failed of 1 cells" in out


# --------------------------------------------------------------------------- 3. load


@pytest.mark.slow
def test_load_50_cells_one_in_five_failing(tmp_path, metrics_cache):
    """50 cells (seed 0..49, shared training: trained once) through the launcher, every 5th
    failing: all 50 records, the failures are exactly seeds % 5 == 0, and the summary lists
    exactly those; bounded wall time."""
    rd = _results(tmp_path, metrics_cache)
    t0 = time.perf_counter()
    p = run(["-m", "model=llamagen", "recipe=tiny", "data=shapes_tiny", "num_images=10", "batch_size=10",
             "seed=range(0,50)", "fault=raise_if_seed_mod5"], rd, timeout=600)
    wall = time.perf_counter() - t0
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    recs = records(rd)
    assert len(recs) == 50 and len(_files(rd)) == 50
    failed = sorted(r["config"]["seed"] for r in recs if r["status"] == "failed")
    assert failed == list(range(0, 50, 5))
    assert all(r["status"] == "ok" for r in recs if r["config"]["seed"] % 5)
    assert sorted(re.findall(r"^(?:\[[^]]*\] )?training (\S+) ->", p.stdout, re.M)) == ["gpt", "kl", "vq"]   # once
    listed = re.findall(r"^failed: (\w{8}) .*: RuntimeError: fault injected", p.stdout, re.M)
    assert sorted(listed) == sorted(r["cell_id"][:8] for r in recs if r["status"] == "failed")
    assert "40 ok, 10 failed of 50 cells" in p.stdout
    assert wall < 300, f"50 tiny cells took {wall:.0f} s"


# --------------------------------------------------------------------------- 4/5. security, user errors


@pytest.fixture
def run_mod(monkeypatch):
    import importlib
    mod = importlib.import_module("run")
    monkeypatch.setattr(mod, "task", lambda: pytest.fail("launched despite a refused config"))
    monkeypatch.setattr(mod, "_environment", lambda: None)
    return mod


def _refused(run_mod, capsys, argv, *needles):
    assert run_mod.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: "), err
    for n in needles:
        assert n in err, (n, err)
    return err


@pytest.mark.parametrize("override", ["hydra.launcher._target_=os.system", "hydra.sweeper._target_=builtins.exec",
                                      "+hydra.launcher._target_=subprocess.Popen"])
def test_target_outside_d2c_refused(run_mod, capsys, tmp_path, override):
    _refused(run_mod, capsys, [override, *TINY, f"results_dir={tmp_path / 'r'}"],
             "_target_=", "refusing to instantiate")
    assert not (tmp_path / "r").exists()


def test_target_in_cell_config_refused():
    c = {"model": "mar", "recipe": "tiny", "data": {"name": "shapes", "_target_": "os.system"}}
    with pytest.raises(H.ConfigError, match=r"^data\._target_=os\.system: .*not allowed$"):
        H.resolve(c)
    with pytest.raises(H.ConfigError, match="refusing to instantiate"):
        H.check_target("hydra.launcher._target_", "os.system")
    H.check_target("hydra.launcher._target_", "hydra_plugins.d2c_ablations.D2CLocalLauncher")
    H.check_target("hydra.launcher._target_", "hydra._internal.core_plugins.basic_launcher.BasicLauncher")


@pytest.mark.parametrize("value", ["../outside", "results/../../etc", "/tmp/x/../y"])
def test_results_dir_with_dotdot_refused(run_mod, capsys, tmp_path, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    _refused(run_mod, capsys, [*TINY, f"results_dir={value}"], f"results_dir={value}", "'..'")
    with pytest.raises(H.ConfigError):
        H.resolve({"model": "mar", "data": {"name": "shapes"}, "results_dir": value})


def test_records_symlink_outside_refused(run_mod, capsys, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    rd = tmp_path / "r"
    rd.mkdir()
    (rd / "records").symlink_to(outside)
    _refused(run_mod, capsys, [*TINY, f"results_dir={rd}"], "records is a symlink", str(outside))
    with pytest.raises(RecordError, match="symlink") as e:      # and at write time too
        write_record(rd, _record())
    assert "\n" not in str(e.value) and list(outside.iterdir()) == []
    (rd / "records").unlink()
    (rd / "grids").symlink_to(outside)
    _refused(run_mod, capsys, [*TINY, f"results_dir={rd}"], "grids is a symlink")


@pytest.mark.parametrize("cell_id", ["../evil", "a/b", "..", ".hidden", "a\\b", "", "x" * 161, "a\nb", 7])
def test_crafted_cell_ids_cannot_make_paths(tmp_path, cell_id):
    with pytest.raises(RecordError, match="cell_id="):
        record_path(tmp_path, cell_id)
    with pytest.raises(RecordError, match="cell_id="):
        write_record(tmp_path, _record(cell_id=cell_id))
    assert not (tmp_path / "evil").exists() and not (tmp_path / "records").exists()
    # a crafted record file in the store is skipped (reported), never followed
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "x.json").write_text(json.dumps(_record(cell_id=cell_id)))
    bad = []
    assert read_records(tmp_path, on_bad=bad.append) == [] and len(bad) == 1


def test_user_errors_one_line_exit_2_with_traceback_opt_in(run_mod, capsys, tmp_path, monkeypatch):
    """run.py follows d2c.cli.exit_on_user_error: one line, exit 2; D2C_TRACEBACK=1 re-raises."""
    _refused(run_mod, capsys, ["steps=0", f"results_dir={tmp_path / 'r'}"], "steps=0", "allowed")
    _refused(run_mod, capsys, ["results_dir="], "results_dir=")
    monkeypatch.setenv("D2C_TRACEBACK", "1")
    with pytest.raises(H.ConfigError):
        run_mod.main(["steps=0", f"results_dir={tmp_path / 'r'}"])
