"""Logs a cluster user reads: a sweep whose stdout is a file (a SLURM .out) gets, through
`logging`, the cell (k of N, id, what it does), training (step, epoch, loss, lr, img/s, ETA),
the token cache and sampling (batch k of K, img/s, ETA); no progress bar is drawn into it."""
import re
import subprocess
import sys

import pytest

from d2c.progress import Progress, hms, log_every
from test_ablations import RUN, TINY, _env, _results, metrics_cache, records  # noqa: F401 (fixtures)


def test_progress_lines_without_a_terminal(caplog, monkeypatch):
    monkeypatch.setenv("D2C_LOG_EVERY", "0")
    caplog.set_level("INFO", logger="d2c.progress")
    with Progress("train mar (mar_tiny)", 4, "steps", images_per_unit=16, initial=1) as p:
        for step in range(2, 5):
            p.update(1, epoch=f"{step / 2:.2f}", loss=0.5 / step, lr=1e-3)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "train mar (mar_tiny): 1/4 steps (25%)"            # resumed at step 1
    assert re.fullmatch(r"train mar \(mar_tiny\): 2/4 steps \(50%\) \| epoch 1\.00 loss 0\.25 lr 0\.001 \| "
                        r"[\d.]+ img/s \| elapsed 0:00:\d\d ETA 0:\d\d:\d\d", lines[1]), lines[1]
    assert "ETA" not in lines[-1] and lines[-1].startswith("train mar (mar_tiny): 4/4 steps (100%)")
    monkeypatch.setenv("D2C_LOG_EVERY", "3600")                       # the period: first and last only
    caplog.clear()
    with Progress("sample", 5, "img", images_per_unit=1) as p:
        for _ in range(5):
            p.update(1)
    assert [r.getMessage().split(":")[1].split("|")[0].strip() for r in caplog.records] == ["0/5 img (0%)",
                                                                                           "5/5 img (100%)"]
    caplog.clear()
    with Progress("quiet", 3, enabled=False) as p:
        p.update(3)
    assert not caplog.records
    assert hms(3725.9) == "1:02:05"
    monkeypatch.setenv("D2C_LOG_EVERY", "soon")
    with pytest.raises(ValueError, match="D2C_LOG_EVERY='soon'; allowed: seconds >= 0"):
        log_every()


@pytest.mark.slow
def test_sweep_log_in_a_file(tmp_path, metrics_cache):
    rd = _results(tmp_path, metrics_cache)
    out = tmp_path / "slurm-1234.out"                 # stdout is a file, as under sbatch
    with open(out, "w") as f:
        p = subprocess.run([sys.executable, str(RUN), "-m", "model=mar,llamagen", "steps=2", *TINY,
                            f"results_dir={rd}"], stdout=f, stderr=subprocess.STDOUT, text=True, timeout=600,
                           env={**_env(), "D2C_LOG_EVERY": "0"})
    log = out.read_text()
    assert p.returncode == 0, log[-3000:]
    assert all(r["status"] == "ok" for r in records(rd)) and len(records(rd)) == 2
    stamp = r"^\[\d\d-\d\d \d\d:\d\d:\d\d\] "
    cells = re.findall(stamp + r"cell (\d) of (\d) \(([0-9a-f]{8})\): model=(\w+).* \| (.*)$", log, re.M)
    assert [(k, n, m) for k, n, _, m, _ in cells] == [("1", "2", "mar"), ("2", "2", "llamagen")], log[-3000:]
    assert all("samples 20 images, batch 10, seed 0" in what and "trains (or reuses) tokenizers" in what
               for *_, what in cells)
    assert len(re.findall(stamp + r"cell \d of 2 \([0-9a-f]{8}\) ok in \d+ s: fid [\d.]+, [\d.]+ img/s$", log, re.M)) == 2
    train = re.findall(stamp + r"train (\w+) \(\w+\): (\d+)/(\d+) steps \(\d+%\) \| epoch [\d.]+ loss [\d.e+-]+ "
                       r"lr [\d.e+-]+ \| [\d.]+ img/s \| elapsed \d+:\d\d:\d\d( ETA \d+:\d\d:\d\d)?$", log, re.M)
    assert {t[0] for t in train} >= {"kl", "vq", "mar", "gpt"}, log[-3000:]
    assert any(eta for *_, eta in train)              # an ETA before the last step
    assert re.search(stamp + r"token cache \S+: \d+/\d+ img \(\d+%\) \| shard 1/1 \| [\d.]+ img/s", log, re.M)
    sample = re.findall(stamp + r"sample (\w+): (\d+)/20 img \(\d+%\) \| batch (\d)/2 \| [\d.]+ img/s \| elapsed "
                        r"\S+( ETA \S+)?$", log, re.M)
    assert {(f, b) for f, _, b, _ in sample} == {("mar", "1"), ("mar", "2"), ("llamagen", "1"), ("llamagen", "2")}
    assert "\r" not in log and "it/s]" not in log     # no bar redrawn into the file
