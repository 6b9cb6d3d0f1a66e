"""The training loop: it learns, it checkpoints atomically, it resumes exactly, DDP matches."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import d2c
from d2c.config import TrainConfig
from d2c.data.shapes import make_shapes
from d2c.checkpoint import load_trained
from d2c.data.batches import ImageSource, TokenSource, batch_indices
from d2c.train import lr_at, param_groups, train


class MemoryCache:
    """In-memory stand-in with TokenCache's get_batch contract (codes / moments per flip)."""

    def __init__(self, n=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.codes = torch.randint(0, 512, (n, 2, 8, 8), generator=g)
        self.moments = torch.randn(n, 2, 8, 8, 8, generator=g) * 0.5
        self.labels = torch.randint(0, 10, (n,), generator=g)

    def __len__(self):
        return len(self.labels)

    def get_batch(self, idx, flip):
        f = flip.long()
        return {"codes": self.codes[idx, f], "moments": self.moments[idx, f], "labels": self.labels[idx]}


def train_config(**kw):
    base = dict(stage="gpt", preset="gpt_tiny", batch_size=8, train_steps=6, lr=3e-3, warmup_steps=1,
                ema_decay=0.9, ckpt_every=2, log_every=1, progress=False, tensorboard=False,
                precision="fp32", overrides={"resid_dropout_p": 0.0, "ffn_dropout_p": 0.0,
                                             "token_dropout_p": 0.0, "class_dropout_prob": 0.0})
    base.update(kw)
    return TrainConfig(**base)


def _weights(run, ema=False):
    return load_trained(run, ema=ema).state_dict()


def test_lr_schedule_and_decay_groups():
    config = TrainConfig(lr=1.0, warmup_steps=10, train_steps=110, schedule="cosine", min_lr=0.1)
    assert lr_at(0, config) == pytest.approx(0.1) and lr_at(9, config) == pytest.approx(1.0)
    assert lr_at(60, config) == pytest.approx(0.55) and lr_at(110, config) == pytest.approx(0.1)
    mar = d2c.build("mar_tiny")
    decay, no_decay = param_groups(mar, 0.02)
    names = {id(p): n for n, p in mar.named_parameters()}
    assert all(p.ndim >= 2 and "diffloss" not in names[id(p)] for p in decay["params"])
    assert any("diffloss" in names[id(p)] and p.ndim == 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(mar.parameters()))


def test_batches_cover_each_epoch_once():
    seen = torch.cat([batch_indices(s, 40, 8, seed=3)[0] for s in range(5)])
    assert sorted(seen.tolist()) == list(range(40))
    assert not torch.equal(batch_indices(5, 40, 8, 3)[0], batch_indices(0, 40, 8, 3)[0])


@pytest.mark.parametrize("stage,preset", [("kl", "kl_tiny"), ("vq", "vq_tiny"), ("gpt", "gpt_tiny"), ("mar", "mar_tiny")])
def test_one_step_changes_weights_and_few_steps_lower_loss(tmp_path, stage, preset):
    """Overfit one fixed batch: the loss must go down (fixed batch: dataset == one batch)."""
    from d2c.train import stage_loss
    if stage in ("kl", "vq"):
        im, lab = make_shapes(8, seed=0)
        src = ImageSource(im, lab)
    else:
        src = TokenSource(MemoryCache(n=8))
    ov = {"mar": {"fusion": "qformer", "vae_embed_dim": 4}}.get(stage, {})
    config = TrainConfig(stage=stage, preset=preset, batch_size=8, train_steps=1, lr=2e-3, warmup_steps=1,
                      progress=False, tensorboard=False, precision="fp32", ema_decay=0.0, overrides=ov)
    extra = {"latent_scale": 1.0} if stage == "mar" else None
    torch.manual_seed(0)
    init = d2c.build(preset, **ov).state_dict()
    train(config, src, tmp_path / "a", extra_batch=extra)
    after = load_trained(tmp_path / "a", ema=False).state_dict()
    changed = [k for k in init if init[k].is_floating_point() and not torch.equal(init[k], after[k])]
    # MAR's DiffLoss output starts at zero, so on step 1 only the head (and decayed matrices)
    # can move; the other stages update most tensors at once
    frac = 0.2 if stage == "mar" else 0.5
    assert len(changed) > frac * len([k for k in init if init[k].is_floating_point()])
    if stage == "mar":
        assert any(k.startswith("diffloss.net.final_layer.linear") for k in changed)

    # a few more steps on the same batch: the loss on that batch (same randomness) goes down
    def loss_of(model):
        torch.manual_seed(123)
        batch = {**src.get(torch.arange(8), torch.zeros(8, dtype=torch.bool)), **(extra or {})}
        model.train()
        with torch.no_grad():
            return stage_loss(stage, model, batch, config)[0].item()
    before = loss_of(load_trained(tmp_path / "a", ema=False))
    train(TrainConfig(**{**config.__dict__, "train_steps": 12}), src, tmp_path / "a", extra_batch=extra)
    assert loss_of(load_trained(tmp_path / "a", ema=False)) < 0.9 * before


def test_resume_equals_uninterrupted(tmp_path):
    src = TokenSource(MemoryCache())
    # dropout on: resume must also restore the randomness, not only weights and optimizer
    config = train_config(overrides={"resid_dropout_p": 0.1})
    train(config, src, tmp_path / "full")
    train(train_config(overrides={"resid_dropout_p": 0.1}, train_steps=4), src, tmp_path / "part")  # "crash" after step 4
    train(config, src, tmp_path / "part")                                                  # resume to 6
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ea, eb = _weights(tmp_path / "full", ema=True), _weights(tmp_path / "part", ema=True)
    for k in ea:
        assert torch.equal(ea[k], eb[k]), k
    assert sorted(p.name for p in (tmp_path / "full").glob("step_*")) == ["step_0000004", "step_0000006"]


def test_crash_during_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    src = TokenSource(MemoryCache())
    train(train_config(train_steps=2), src, tmp_path / "r")
    good = _weights(tmp_path / "r")
    import d2c.checkpoint as C
    real = C.save_safetensors
    calls = {"n": 0}

    def dying(obj, path):
        calls["n"] += 1
        if calls["n"] == 2:               # the EMA file of the next checkpoint: half written, then dead
            path.write_bytes(b"\x00" * 17)
            raise KeyboardInterrupt("killed")
        return real(obj, path)
    monkeypatch.setattr(C, "save_safetensors", dying)
    with pytest.raises(KeyboardInterrupt):
        train(train_config(train_steps=4), src, tmp_path / "r")
    monkeypatch.setattr(C, "save_safetensors", real)
    loaded = _weights(tmp_path / "r")      # the previous checkpoint, intact
    for k in good:
        assert torch.equal(good[k], loaded[k])
    train(train_config(train_steps=4), src, tmp_path / "r")   # and the run still completes
    assert json.loads((tmp_path / "r" / "DONE").read_text())["train_steps"] == 4


_KILL_SCRIPT = r"""
import sys, torch
sys.path.insert(0, {tests!r})
from test_train import MemoryCache, train_config
from d2c.data.batches import TokenSource
from d2c.train import train
train(train_config(train_steps=400, ckpt_every=1, keep_checkpoints=2), TokenSource(MemoryCache()), {out!r})
"""


@pytest.mark.slow
def test_sigkill_at_random_points_always_leaves_a_loadable_checkpoint(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT.format(tests=os.path.dirname(__file__), out=str(tmp_path / "r")))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(__file__)) + "/core",
                                                         os.environ.get("PYTHONPATH", "")])}
    g = torch.Generator().manual_seed(0)
    run, last = tmp_path / "r", 0

    def newest():
        return max([int(p.name[5:]) for p in run.glob("step_*")] or [0])
    for i in range(4):
        p = subprocess.Popen([sys.executable, str(script)], env=env)
        deadline = time.time() + 120
        while newest() <= last and time.time() < deadline and p.poll() is None:
            time.sleep(0.05)
        time.sleep(0.5 * torch.rand(1, generator=g).item())   # then die at a random point
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert not list(run.glob(".tmp_step_*/DONE"))
        load_trained(run)                                      # must always load
        assert newest() > last                                 # each restart resumed and progressed
        last = newest()


@contextlib.contextmanager
def _default_dtype(dtype):
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


def _ddp_worker(rank, world, port, out, accum=1):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)      # see the test
    try:
        train(train_config(train_steps=3, lr=1e-2, accum_steps=accum), TokenSource(MemoryCache()), out, device="cpu")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_ddp_gloo_two_processes_equal_one_process(tmp_path, accum):
    """Two ranks with half the batch each (accum=2: in two micro-batches each, synced once a
    step), gradients averaged, equal one process with the whole batch: an identity of the math,
    so both run in float64.  In float32 the half-batch products
    round differently and Adam amplifies that where a gradient is near zero (its update is
    lr g / (|g| + eps): slope up to lr / eps = 1e6), which put one near-zero weight 3.7e-5 off on
    another CPU.  The same bound in float64: 3 steps x 1e6 x 1.1e-16 x |g| <= 1e-9 for |g| <= 3;
    1e-8 keeps a margin, and a real DDP fault (a rank on the wrong slice, summed instead of
    averaged gradients) moves weights by about lr = 1e-2."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(tmp_path / "ddp"), accum), nprocs=2, join=True)
    with _default_dtype(torch.float64):
        train(train_config(train_steps=3, lr=1e-2), TokenSource(MemoryCache()), tmp_path / "one")
        a, b = _weights(tmp_path / "ddp"), _weights(tmp_path / "one")
        init = d2c.build("gpt_tiny").state_dict()
    for k in a:
        assert a[k].dtype == torch.float64 or not a[k].is_floating_point(), k
        torch.testing.assert_close(a[k], b[k], atol=1e-8, rtol=1e-7)
    assert max((a[k] - init[k]).abs().max() for k in a) > 1e-3  # it trained


def test_kl_spectral_term_is_the_l1_of_fft_amplitudes():
    """spectral_weight adds w x mean |(|F recon| - |F x|)| (orthonormal 2-D real FFT) to the KL
    stage's loss, checked against numpy in float64 on fresh random weights and images."""
    import numpy as np

    from d2c.train import stage_loss
    model = d2c.build("kl_tiny").train()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    losses = {}
    for w in (0.0, 0.7):
        torch.manual_seed(5)                      # the same posterior sample for both
        loss, scalars = stage_loss("kl", model, {"images": x}, TrainConfig(stage="kl", spectral_weight=w))
        losses[w] = (loss.item(), scalars)
    torch.manual_seed(5)
    with torch.no_grad():
        recon = model(x)[0].double().numpy()
    amp = lambda a: np.abs(np.fft.rfft2(a, norm="ortho"))  # noqa: E731
    want = np.abs(amp(recon) - amp(x.double().numpy())).mean()
    assert "spec" not in losses[0.0][1] and losses[0.7][1]["spec"] == pytest.approx(want, rel=1e-4)
    assert losses[0.7][0] - losses[0.0][0] == pytest.approx(0.7 * want, rel=1e-3)


# --------------------------------------------------------------------------- rendezvous under plain srun


@pytest.mark.parametrize("nodes, first", [
    ("gpu07", "gpu07"), ("gpu[07-09,12],cpu1", "gpu07"), ("n[001-004]-ib", "n001-ib"),
    ("rack[1-2]-n[01-04],x9", "rack1-n01"), ("a-[7,9-10],b[1-2]", "a-7"), ("h1,h2", "h1"), ("a[5]", "a5")])
def test_first_host_of_slurm_node_lists(nodes, first):
    from d2c.distributed import first_host
    assert first_host(nodes) == first


def test_rendezvous_from_slurm_variables(monkeypatch):
    """Plain `srun` (no torchrun / submitit variables): the job's first node and a job-id port,
    not 127.0.0.1 (which hangs every node but the first); the environment's own values win."""
    from d2c.distributed import rendezvous
    for k in ("MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_JOB_ID"):
        monkeypatch.delenv(k, raising=False)
    assert rendezvous() == ("127.0.0.1", "29500")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node[12-13]")
    monkeypatch.setenv("SLURM_JOB_ID", "4242421")
    assert rendezvous() == ("node12", str(10000 + 4242421 % 20000))
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.5")
    monkeypatch.setenv("MASTER_PORT", "1234")
    assert rendezvous() == ("10.0.0.5", "1234")


def _srun_worker(rank, job_id, q):
    """A rank as plain `srun --ntasks 2` starts it: SLURM variables only."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)
    os.environ.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                      SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID=str(job_id))
    from d2c.distributed import init_distributed
    try:
        r, w, _ = init_distributed(torch.device("cpu"))
        t = torch.tensor([float(r + 1)])
        torch.distributed.all_reduce(t)
        q.put((r, w, t.item(), os.environ["MASTER_PORT"]))
    finally:
        torch.distributed.destroy_process_group()


def test_two_srun_ranks_meet_without_master_variables():
    import random
    import socket
    for _ in range(100):   # a job id whose port (10000 + id % 20000) is free here
        job_id = random.randrange(1, 10 ** 7)
        port = 10000 + job_id % 20000
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                break
            except OSError:
                continue
    ctx = torch.multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_srun_worker, args=(r, job_id, q)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    got = sorted(q.get(timeout=5) for _ in procs)
    assert got == [(0, 2, 3.0, str(port)), (1, 2, 3.0, str(port))]


def test_gradient_accumulation_equals_the_whole_batch(tmp_path):
    """accum_steps=4: four micro-batches of 2, gradients summed (each loss / 4), one update: the
    same weights as one batch of 8 (float64, dropout off: an identity of the math, as for DDP).
    The stage folder's key does not change with it (it is how a step runs, not what it computes)."""
    from d2c.files import stable_hash
    with _default_dtype(torch.float64):
        train(train_config(train_steps=3, lr=1e-2), TokenSource(MemoryCache()), tmp_path / "one")
        train(train_config(train_steps=3, lr=1e-2, accum_steps=4), TokenSource(MemoryCache()), tmp_path / "acc")
        a, b = _weights(tmp_path / "acc"), _weights(tmp_path / "one")
        init = d2c.build("gpt_tiny").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-10, rtol=1e-9)
    assert max((a[k] - init[k]).abs().max() for k in a) > 1e-3
    assert stable_hash(train_config(accum_steps=4)) == stable_hash(train_config())
    assert stable_hash(train_config(grad_checkpointing=True)) == stable_hash(train_config())   # how, not what
    assert stable_hash(train_config(lr=1.0)) != stable_hash(train_config())
    assert stable_hash(train_config(batch_size=16)) != stable_hash(train_config())
    with pytest.raises(ValueError, match="accum_steps=3"):
        train(train_config(accum_steps=3), TokenSource(MemoryCache()), tmp_path / "bad")
    with pytest.raises(ValueError, match="accum_steps=0"):
        train(train_config(accum_steps=0), TokenSource(MemoryCache()), tmp_path / "bad")
