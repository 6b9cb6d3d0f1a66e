"""Sweeps through a real one-node SLURM on localhost (slurm/local_cluster.sh): every record comes
back, and a job killed on SLURM (cancelled, or a process that dies without a result) is reported
failed instead of waited on forever.

The cluster: `.ci/run` starts it before the suite and stops what it started.  Run alone, the
fixture starts it (root + apt) and stops it afterwards.  If the script reports that it could
not start, these tests FAIL with its message (never skip: a CI without SLURM must be noticed).
"""
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from test_ablations import TINY, _env, _results, metrics_cache, records  # noqa: F401 (fixtures)
from test_paper_scale import paper_files  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "local_cluster.sh"
RUN = REPO / "ablations" / "run.py"
SLURM = ["hydra/launcher=local_cluster"]


def _cluster_state() -> str:
    """squeue / sinfo -R / job states, for failure messages."""
    out = []
    for cmd in (["squeue"], ["sinfo", "-R"], ["scontrol", "show", "job", "-o"]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        out.append(f"$ {' '.join(cmd)}\n{r.stdout[-1500:]}{r.stderr[-500:]}")
    return "\n".join(out)


@pytest.fixture(scope="module")
def cluster():
    st = subprocess.run([str(SCRIPT), "status"], capture_output=True, text=True)
    started = False
    if st.returncode != 0:
        r = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            pytest.fail(f"local SLURM could not start: {(r.stderr or r.stdout).strip()}")
        started = True
    yield
    if started:
        subprocess.run([str(SCRIPT), "stop"], capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_sweep_on_local_slurm_returns_every_record(cluster, tmp_path, metrics_cache):
    rd = _results(tmp_path, metrics_cache)
    p = subprocess.run([sys.executable, str(RUN), "-m", "model=mar", "steps=2,3", *TINY, *SLURM, f"results_dir={rd}"],
                       capture_output=True, text=True, timeout=400, env=_env(), cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert re.search(r"submitted job \d+_0", p.stdout) and "RUNNING" in p.stdout
    recs = records(rd)
    assert len(recs) == 2 and {r["status"] for r in recs} == {"ok"}
    assert {r["config"]["steps"] for r in recs} == {2, 3}
    assert "2 ok, 0 failed of 2 cells" in p.stdout


@pytest.mark.slow
def test_killed_slurm_jobs_are_reported_failed(cluster, tmp_path, metrics_cache):
    """Two cells: one job process dies without a result (fault=exit), one is scancel'ed while it
    trains.  The sweep returns (no endless wait), both cells have failed records."""
    rd = _results(tmp_path, metrics_cache)
    proc = subprocess.Popen([sys.executable, str(RUN), "-m", "model=mar", "steps=2", "fault=exit,null",
                             "train_steps=3000", *TINY, *SLURM, f"results_dir={rd}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=REPO)
    out = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline, cancelled = time.time() + 300, False
        while time.time() < deadline and not cancelled:
            text = "".join(out)
            m = re.search(r"job (\d+_\d+) RUNNING: model=mar steps=2 fault=null", text)
            if m:
                time.sleep(2)
                subprocess.run(["scancel", m.group(1)], check=True)
                cancelled = True
            time.sleep(0.5)
        assert cancelled, "".join(out)[-3000:]
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    text = "".join(out)
    assert proc.returncode == 1, text[-3000:]
    recs = {r["config"]["fault"]: r for r in records(rd)}
    assert set(recs) == {"exit", None}
    assert all(r["status"] == "failed" for r in recs.values()), recs
    assert "CANCELLED" in recs[None]["error"], recs[None]["error"]
    assert recs["exit"]["error"] and "0 ok, 2 failed of 2 cells" in text


@pytest.mark.slow
def test_two_task_job_trains_ddp_through_submitit_env(cluster, tmp_path, metrics_cache):
    """tasks_per_node=2: submitit's distributed environment is exported in each task, the ranks
    train every stage together (DDP, gloo on CPU) and rank 0 writes the one record."""
    rd = _results(tmp_path, metrics_cache)
    try:
        p = subprocess.run([sys.executable, str(RUN), "model=mar", "steps=2", *TINY, *SLURM,
                            "hydra.launcher.tasks_per_node=2", f"results_dir={rd}"],
                           capture_output=True, text=True, timeout=400, env=_env(), cwd=REPO)
    except subprocess.TimeoutExpired:
        pytest.fail("sweep did not finish in 400 s; cluster: " + _cluster_state())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:] + _cluster_state()
    logs = "".join(f.read_text() for f in rd.glob("hydra/*/.submitit/*/*_log.out"))
    for stage in ("kl", "vq", "mar"):   # both ranks entered training of each stage
        assert len(re.findall(rf"^(?:\[[^]]*\] )?training {stage} ->", logs, re.M)) == 2, logs[-3000:]
    recs = records(rd)
    assert len(recs) == 1 and recs[0]["status"] == "ok"


def _sbatch(script, tasks, args, rd, timeout=600):
    """Submit a slurm/paper script with the test cluster's resources (the script's own #SBATCH
    lines overridden on the sbatch line, as a user would) and wait for it; (state, output)."""
    out = rd / f"{script}-%j.out"
    p = subprocess.run(["sbatch", "--parsable", "--partition=debug", "--nodes=1", f"--ntasks-per-node={tasks}",
                        "--gpus-per-node=0", "--cpus-per-task=1", "--mem=2G", "--time=00:20:00", f"--output={out}",
                        str(REPO / "slurm" / "paper" / f"{script}.sbatch"), *args],
                       capture_output=True, text=True, env={**_env(), "D2C_PYTHON": sys.executable}, cwd=REPO)
    assert p.returncode == 0, p.stderr
    job = p.stdout.strip().split(";")[0]
    deadline = time.time() + timeout
    state = "?"
    while time.time() < deadline:
        q = subprocess.run(["scontrol", "show", "job", job, "-o"], capture_output=True, text=True).stdout
        m = re.search(r"JobState=(\w+)", q)
        state = m.group(1) if m else "GONE"
        if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
            break
        time.sleep(1)
    else:
        subprocess.run(["scancel", job])
        pytest.fail(f"{script} job {job} still {state} after {timeout} s; " + _cluster_state())
    text = Path(str(out).replace("%j", job)).read_text() if Path(str(out).replace("%j", job)).exists() else ""
    return state, text


@pytest.mark.slow
def test_paper_scripts_cache_train_eval_as_three_srun_jobs(cluster, tmp_path, paper_files):
    """slurm/paper/{cache,train,eval}.sbatch with two tasks each under plain srun (no submitit, no
    MASTER_ADDR): the ranks build the cache's shards together, train with DDP, sample their
    batches of the ADM protocol, and rank 0 writes the one record."""
    d, args = paper_files
    rd = tmp_path / "results"
    rd.mkdir()
    cell = ["model=d2c", "steps=2", "num_images=8", "batch_size=2", "train_epochs=1", "train_batch_size=4",
            *args, f"results_dir={rd}"]
    state, out = _sbatch("cache", 2, cell, rd)
    assert state == "COMPLETED", out[-3000:]
    assert len(list(rd.glob("cache/tokens-*/shard-*"))) == 1 and "cache ready for model=d2c" in out
    state, out = _sbatch("train", 2, cell, rd)
    assert state == "COMPLETED", out[-3000:]
    for stage in ("gpt", "d2c_qformer"):       # both ranks trained each stage (DDP)
        assert len(re.findall(rf"^(?:\[[^]]*\] )?training {stage} ->", out, re.M)) == 2, out[-3000:]
    assert not (rd / "records").exists()
    state, out = _sbatch("eval", 2, cell, rd)
    assert state == "COMPLETED", out[-3000:]
    assert not re.findall(r"^(?:\[[^]]*\] )?training \S+ ->", out, re.M) and out.count("1 ok, 0 failed of 1 cells") == 1, out[-3000:]
    (rec,) = records(rd)
    assert rec["status"] == "ok" and rec["speed"]["ranks"] == 2 and "fid" in rec["metrics"]
    batches = [json.loads(p.read_text()) for p in rd.glob("samples/*/batches/*.json")]
    assert sorted((b["rank"], b["batch"]) for b in batches) == [(0, 0), (0, 2), (1, 1), (1, 3)]
