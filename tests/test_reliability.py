"""Reliability: every fault is injected, and each one must be loud (one line, a d2c error type,
exit 2 at the CLI), local (nothing already written is damaged) and recoverable (a rerun completes
with the weights of an uninterrupted run).  Crash safety, non-finite losses, determinism; bad
inputs and security: test_bad_inputs.py."""
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import d2c
import d2c.train as T
from d2c.checkpoint import load_state_dict_file
from d2c.config import TrainConfig, validate
from d2c.checkpoint import is_done, load_trained
from d2c.data.batches import TokenSource
from d2c.errors import NonFiniteLoss
from d2c.train import Preempted, train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1",
       "PYTHONPATH": os.pathsep.join([str(ROOT / "core"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}


from test_train import MemoryCache  # noqa: E402  (in-memory TokenCache stand-in)


def train_config(**kw):
    base = dict(stage="gpt", preset="gpt_tiny", batch_size=8, train_steps=4, lr=3e-3, warmup_steps=1,
                ema_decay=0.9, ckpt_every=2, log_every=1, progress=False, tensorboard=False,
                precision="fp32", overrides={"resid_dropout_p": 0.1})   # dropout on: RNG must resume too
    base.update(kw)
    return TrainConfig(**base)


def src():
    return TokenSource(MemoryCache(n=32))


def weights(run, ema=False):
    return load_trained(run, ema=ema).state_dict()


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def one_line(exc_info, *needles):
    msg = str(exc_info.value)
    assert "\n" not in msg and msg.strip(), msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs every recovery is compared with: 4 steps and 5 steps."""
    root = tmp_path_factory.mktemp("ref")
    train(train_config(), src(), root / "r4")
    train(train_config(train_steps=5), src(), root / "r5")
    return {4: (weights(root / "r4"), weights(root / "r4", ema=True)), 5: (weights(root / "r5"), None)}


# =============================================================================== 1. crash safety

_DIE_SCRIPT = r"""
import os, signal, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
import d2c.checkpoint as C
import d2c.train as T
from test_reliability import train_config, src
point, out = sys.argv[1], Path(sys.argv[2])
calls = {"sf": 0, "save": 0, "fsync": 0}
die = lambda: os.kill(os.getpid(), signal.SIGKILL)

real_sf = C.save_safetensors
def sf(obj, path):                      # calls 1, 2: checkpoint 2 (model, ema); 3, 4: checkpoint 4
    calls["sf"] += 1
    if (point, calls["sf"]) in (("model_half", 3), ("ema_half", 4)):
        from safetensors.torch import save
        blob = save({k: v.contiguous() for k, v in (obj.state_dict() if hasattr(obj, "state_dict") else obj).items()})
        Path(path).with_name(f".{Path(path).name}.tmp{os.getpid()}").write_bytes(blob[: len(blob) // 2])
        die()
    return real_sf(obj, path)
C.save_safetensors = sf

real_save = torch.save
def tsave(obj, f, *a, **k):             # state.pt of checkpoint 4: half written, then dead
    calls["save"] += 1
    if point == "state_half" and calls["save"] == 2:
        real_save(obj, f, *a, **k)
        Path(f).write_bytes(Path(f).read_bytes()[:100])
        die()
    return real_save(obj, f, *a, **k)
C.torch.save = tsave

real_fsync = C.fsync_path
def fsync(p):                            # checkpoint 4 renamed into place, folder not yet fsynced
    real_fsync(p)
    if point == "after_rename" and Path(p) == out and (out / "step_0000004").exists():
        die()
C.fsync_path = fsync

real_rmtree = C.shutil.rmtree
def rmtree(p, *a, **k):                  # pruning step_2 (keep=1): one file gone, then dead
    if point == "prune" and ".del_step_0000002" in str(p):
        next(Path(p).iterdir()).unlink()
        die()
    return real_rmtree(p, *a, **k)
C.shutil.rmtree = rmtree

T.train(train_config(keep_checkpoints=1 if point == "prune" else 2), src(), out)
"""


@pytest.mark.parametrize("point,survivor", [("model_half", 2), ("ema_half", 2), ("state_half", 2),
                                            ("after_rename", 4), ("prune", 4)])
def test_sigkill_during_checkpoint_write(tmp_path, reference, point, survivor):
    """A real process SIGKILLed at each stage of writing checkpoint 4: the newest complete
    checkpoint loads, stale temp folders are cleaned, and the rerun equals the uninterrupted run."""
    script = tmp_path / "die.py"
    script.write_text(_DIE_SCRIPT)
    run = tmp_path / "r"
    p = subprocess.run([sys.executable, str(script), point, str(run)], env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    steps = sorted(d.name for d in run.glob("step_*"))
    assert steps[-1] == f"step_{survivor:07d}", steps
    load_trained(run)                                    # the last good checkpoint loads
    assert not (run / "DONE").exists()
    left = {"prune": ".del_step_0000002_"}.get(point, ".tmp_step_0000004_" if "half" in point else None)
    assert [q.name.startswith(left) for q in run.iterdir() if q.name.startswith(".")] == ([True] if left else [])
    train(train_config(), src(), run)                            # the requeued run completes ...
    assert_same(weights(run), reference[4][0])           # ... exactly as if never killed
    assert_same(weights(run, ema=True), reference[4][1])
    assert not [q.name for q in run.iterdir() if q.name.startswith(".")]   # leftovers cleaned


_TERM_SCRIPT = r"""
import sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
import d2c.train as T
from test_reliability import train_config, src
real = T.lr_at
def slow_lr(step, config):                  # ~20 steps/s, and a sign of life for the test
    time.sleep(0.05)
    if step == 3:
        Path(sys.argv[2]).write_text("running")
    return real(step, config)
T.lr_at = slow_lr
T.train(train_config(train_steps=400, ckpt_every=1000), src(), sys.argv[1])
"""


def test_sigterm_checkpoints_and_requeued_run_resumes(tmp_path):
    """SLURM preemption: SIGTERM mid-run -> the step in progress finishes, a checkpoint is written
    there, exit 128+15 with one line; the requeued run resumes and equals an uninterrupted one."""
    script = tmp_path / "term.py"
    script.write_text(_TERM_SCRIPT)
    run, alive = tmp_path / "r", tmp_path / "alive"
    p = subprocess.Popen([sys.executable, str(script), str(run), str(alive)], env=ENV,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not alive.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err and "stop requested (SIGTERM)" in err
    (ck,) = run.glob("step_*")                            # ckpt_every=1000: only the preemption one
    n = int(ck.name[5:])
    assert 4 <= n < 400 and not (run / "DONE").exists()
    load_trained(run)
    train(train_config(train_steps=n + 2, ckpt_every=1000), src(), run)                 # requeued: resumes at n
    train(train_config(train_steps=n + 2, ckpt_every=1000), src(), tmp_path / "full")    # never interrupted
    assert_same(weights(run), weights(tmp_path / "full"))
    assert_same(weights(run, ema=True), weights(tmp_path / "full", ema=True))


def test_request_stop_raises_preempted_after_checkpoint(tmp_path, reference, monkeypatch):
    """The in-process hook a launcher calls (what the SIGTERM handler does): Preempted is a
    SystemExit (an `except Exception` does not swallow it), the checkpoint exists when it is raised,
    and the previous SIGTERM handler is back afterwards."""
    real = T.lr_at

    def stop_at_2(step, config):
        if step == 2:
            T.request_stop()
        return real(step, config)
    monkeypatch.setattr(T, "lr_at", stop_at_2)
    mine = lambda *a: None  # noqa: E731
    prev = signal.signal(signal.SIGTERM, mine)
    try:
        with pytest.raises(Preempted) as e:
            try:
                train(train_config(ckpt_every=1000), src(), tmp_path / "r")
            except Exception:            # a harness's failure handler must not see a preemption
                pytest.fail("Preempted caught as an Exception")
        assert isinstance(e.value, SystemExit) and e.value.code == 128 + signal.SIGTERM
        assert e.value.step == 3 and e.value.checkpoint == tmp_path / "r" / "step_0000003"
        assert (e.value.checkpoint / "state.pt").is_file() and "rerun to resume" in str(e.value)
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, prev)
    monkeypatch.setattr(T, "lr_at", real)
    train(train_config(), src(), tmp_path / "r")
    assert_same(weights(tmp_path / "r"), reference[4][0])


def test_stop_during_the_last_step_finishes_then_exits(tmp_path, monkeypatch):
    real = T.lr_at
    monkeypatch.setattr(T, "lr_at", lambda step, config: (T.request_stop() if step == 3 else None) or real(step, config))
    with pytest.raises(Preempted) as e:
        train(train_config(), src(), tmp_path / "r")
    assert e.value.step == 4 and is_done(tmp_path / "r")     # the requeued job finds it finished
    assert not T._stop.is_set()


def _ddp_stop_worker(rank, world, port, out):
    """Rank 1 alone sees a NaN loss at step 1 (skip); rank 0 alone is asked to stop at step 3."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    real_lr, real_loss, now = T.lr_at, T.stage_loss, {}

    def lr(step, config):
        now["step"] = step
        if rank == 0 and step == 3:
            T.request_stop()
        return real_lr(step, config)

    def loss_fn(*a):
        loss, sc = real_loss(*a)
        return (loss * float("nan") if rank == 1 and now["step"] == 1 else loss), sc
    T.lr_at, T.stage_loss = lr, loss_fn
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            train(train_config(train_steps=8, ckpt_every=1000, on_nonfinite="skip"), src(), out, device="cpu")
    except Preempted as e:
        Path(out, f"rank{rank}").write_text(str(e.step))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_agree_on_skip_and_stop(tmp_path):
    """A NaN on one rank, a stop request on another: every rank takes the same branch (no
    collective hangs), all stop after the same step, and the checkpoint is there."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    torch.multiprocessing.spawn(_ddp_stop_worker, args=(2, port, str(out)), nprocs=2, join=True)
    assert [(out / f"rank{r}").read_text() for r in (0, 1)] == ["4", "4"]
    state = torch.load(out / "step_0000004" / "state.pt", weights_only=True)
    assert state["step"] == 4 and state["skipped"] == [1] and not (out / "DONE").exists()


# =========================================================================== 2. non-finite loss


def _poison(monkeypatch, bad_steps, kind="loss"):
    """stage_loss returns NaN (or a finite loss with a NaN gradient) at the given steps."""
    real, state = T.stage_loss, {"step": None}
    real_lr = T.lr_at

    def lr(step, config):                   # lr_at is called once per step, before the loss
        state["step"] = step
        return real_lr(step, config)

    def loss_fn(stage, model, batch, config):
        loss, sc = real(stage, model, batch, config)
        if state["step"] in bad_steps:
            p = next(model.parameters())
            if kind == "loss":
                loss = loss * float("nan")
            else:                        # d sqrt(x)/dx at 0 is inf: loss stays finite, grad is NaN
                loss = loss + torch.sqrt((p * 0).abs().sum())
        return loss, sc
    monkeypatch.setattr(T, "lr_at", lr)
    monkeypatch.setattr(T, "stage_loss", loss_fn)


def test_nonfinite_stop_saves_last_good_state(tmp_path, reference, monkeypatch):
    run = tmp_path / "r"
    _poison(monkeypatch, {5})
    with pytest.raises(NonFiniteLoss) as e:
        train(train_config(train_steps=6, ckpt_every=4), src(), run)
    one_line(e, "non-finite loss nan at step 5", "step_0000005", "on_nonfinite=skip")
    assert sorted(p.name for p in run.glob("step_*")) == ["step_0000004", "step_0000005"]
    assert_same(weights(run), reference[5][0])     # the state before the bad step, bad update not applied
    assert not (run / "DONE").exists()
    monkeypatch.undo()
    train(train_config(train_steps=6, ckpt_every=4), src(), run)     # the cause fixed: the rerun resumes at 5
    assert json.loads((run / "DONE").read_text()) == {"train_steps": 6, "skipped_steps": []}


def test_nonfinite_at_first_step_writes_nothing(tmp_path, monkeypatch):
    _poison(monkeypatch, {0})
    with pytest.raises(NonFiniteLoss) as e:
        train(train_config(), src(), tmp_path / "r")
    one_line(e, "at step 0", "nothing saved")
    assert not list((tmp_path / "r").glob("step_*"))


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_nonfinite_skip_drops_the_batch(tmp_path, monkeypatch, kind):
    run = tmp_path / "r"
    _poison(monkeypatch, {2, 3}, kind)
    with pytest.warns(RuntimeWarning, match="grad norm nan" if kind == "grad" else "loss nan") as rec:
        train(train_config(train_steps=5, ckpt_every=1, keep_checkpoints=10, on_nonfinite="skip"), src(), run)
    assert sum("batch skipped" in str(w.message) for w in rec) == 2
    assert json.loads((run / "DONE").read_text())["skipped_steps"] == [2, 3]
    # no optimizer step, no EMA update: the states after steps 2, 3 and 4 are identical
    for f in ("model.safetensors", "ema.safetensors"):
        a, b, c = (load_state_dict_file(run / f"step_{s:07d}" / f) for s in (2, 3, 4))
        assert_same(a, b), assert_same(a, c)
    st = [torch.load(run / f"step_{s:07d}" / "state.pt", weights_only=True) for s in (2, 4)]
    assert_same(st[0]["optimizer"]["state"][0], st[1]["optimizer"]["state"][0])
    assert st[1]["skipped"] == [2, 3]
    assert all(torch.isfinite(v).all() for v in weights(run).values())


def test_nonfinite_skip_is_bounded(tmp_path, monkeypatch):
    _poison(monkeypatch, {1, 2, 3})
    with pytest.raises(NonFiniteLoss) as e, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        train(train_config(on_nonfinite="skip", max_consecutive_skips=2), src(), tmp_path / "r")
    one_line(e, "at step 3", "3 batches in a row", "max_consecutive_skips=2")


def test_train_config_switches_validated():
    with pytest.raises(ValueError, match=r"^on_nonfinite='ignore'; allowed: stop, skip$"):
        validate(train_config(on_nonfinite="ignore"))
    with pytest.raises(ValueError, match=r"^max_consecutive_skips=0; allowed: integers >= 1$"):
        validate(train_config(max_consecutive_skips=0))


# ============================================================================== 3. determinism


def test_training_is_bit_identical(tmp_path):
    config = train_config(stage="mar", preset="mar_tiny", train_steps=2, overrides={"fusion": "qformer"})
    for name in ("a", "b"):
        train(config, src(), tmp_path / name, extra_batch={"latent_scale": 1.0})
    assert_same(weights(tmp_path / "a"), weights(tmp_path / "b"))


def test_samples_are_bit_identical_for_a_seed():
    from d2c.sampling import SamplerConfig, d2c_sample
    sampler = SamplerConfig(steps=2, cfg=2.0)
    torch.manual_seed(1)
    gpt, vq, kl = d2c.build("gpt_tiny").eval(), d2c.build("vq_tiny").eval(), d2c.build("kl_tiny").eval()
    mar = d2c.build("mar_tiny", fusion="qformer", diffusion_steps=4).eval()
    labels = torch.arange(2)
    for models in (dict(gpt=gpt, mar=mar, kl=kl), dict(gpt=gpt, vq=vq)):   # D2C (both stages), LlamaGen
        runs = []
        for _ in range(2):
            torch.manual_seed(12345 + len(runs))      # the global RNG must not matter
            runs.append(d2c_sample(labels, models, sampler, seed=7))
        assert torch.equal(runs[0].images, runs[1].images) and torch.equal(runs[0].codes, runs[1].codes)
        if "mar" in models:
            assert torch.equal(runs[0].latents, runs[1].latents)
            assert not torch.equal(runs[0].images, d2c_sample(labels, models, sampler, seed=8).images)


def test_metrics_are_bit_identical(tmp_path):
    """Same images, same config -> the same numbers, also when the feature net is retrained
    from scratch in another cache folder."""
    from d2c import metrics as M
    from d2c.data.shapes import make_shapes
    net_config = M.FeatureNetConfig(n_train=256, train_steps=10, batch_size=32)
    images, labels = make_shapes(120, seed=3)
    ref, _ = make_shapes(120, seed=4)
    out = []
    for cache in ("c1", "c2"):
        kw = dict(cache_dir=tmp_path / cache, feature_net=net_config)
        m = M.compute_metrics(images, reference=ref, kid_subset_size=50, isc_splits=2, **kw)
        m["class_accuracy"] = M.class_accuracy(images, labels, config=net_config, cache_dir=tmp_path / cache)
        out.append(m)
    assert out[0] == out[1] and all(np.isfinite(v) for v in out[0].values())
