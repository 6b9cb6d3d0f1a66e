"""One training loop for every stage: KL and VQ tokenizers, stage-1 GPT, stage-2 MAR / D2C.

    batch = source.get(indices of step s)        data order is a function of (seed, step):
    loss  = stage_loss(stage, model, batch)       resume needs no data-loader state
    AdamW (MAR/LlamaGen betas, no decay on 1-D params, biases and the diffusion head),
    linear warmup then constant or cosine, grad clip, EMA, bf16 autocast where supported.

A run lives in one folder (d2c.checkpoint: written atomically, read back by `load_trained`):
`step_XXXXXXX/` checkpoints, `config.json`, TensorBoard scalars in `tb/`, and `DONE` once the
last step is saved.  Resuming restores weights, EMA, optimizer,
step and every RNG, so a resumed run reaches the same weights as an uninterrupted one.
DDP (d2c.distributed): launched by torchrun or SLURM, each rank takes its slice of the global batch.

Failures: SIGTERM (SLURM preemption) finishes the current step, checkpoints it and raises
`Preempted` (a SystemExit: the job exits, a requeued one resumes); a non-finite loss or
gradient either stops with `NonFiniteLoss` after checkpointing the last good state, or skips
the batch (`TrainConfig.on_nonfinite`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import d2c
from d2c.registry import model_class
from d2c.checkpoint import checkpoint_dirs, clean_stale, load_checkpoint, load_into, load_state_dict_file, run_config_json, save_checkpoint
from d2c.files import atomic_write_text
from d2c.config import TrainConfig, make_config, validate
from d2c.data.batches import batch_indices
from d2c.distributed import init_distributed
from d2c.errors import NonFiniteLoss
from d2c.models.gpt import next_token_loss
from d2c.precision import autocast_for, bf16_supported
from d2c.tokenizers.kl import DiagonalGaussian

CONV_STAGES = ("kl", "vq")   # the convolutional tokenizers
PREEMPT_SIGNALS = (signal.SIGTERM,)   # SLURM sends SIGTERM on preemption / scancel, KillWait before SIGKILL

logger = logging.getLogger(__name__)


class Preempted(SystemExit):
    """Raised by train() after a stop request (SIGTERM, or request_stop()) once the step in
    progress is checkpointed: a SystemExit, so `except Exception` handlers do not record it as a
    failure, and the process exits 128 + SIGTERM.  Rerunning train() on the folder resumes."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(128 + signal.SIGTERM)
        self.step, self.checkpoint = step, checkpoint

    def __str__(self):
        return f"preempted: checkpoint {self.checkpoint} at step {self.step}; rerun to resume"


_stop = threading.Event()


def request_stop() -> None:
    """Ask a running train() to checkpoint at the end of its current step and raise Preempted
    (what the SIGTERM handler does; callable from a launcher's own signal handler)."""
    _stop.set()


@contextlib.contextmanager
def _stop_on_signals():
    """SIGTERM sets the stop flag instead of killing mid-step; a second one kills at once
    (the checkpoints are atomic, so that is safe).  The previous handlers come back after, and
    the flag is cleared (not on entry: a request_stop() made just before train() still counts)."""
    if threading.current_thread() is not threading.main_thread():   # signal.signal needs the main thread
        try:
            yield
        finally:
            _stop.clear()
        return

    def handler(signum, frame):
        if _stop.is_set():
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        _stop.set()
    prev = {s: signal.signal(s, handler) for s in PREEMPT_SIGNALS}
    try:
        yield
    finally:
        for s, h in prev.items():
            signal.signal(s, h)
        _stop.clear()

# --------------------------------------------------------------------------- randomness


def step_seed(seed: int, rank: int, step: int) -> int:
    return (seed * 1_000_003 + rank * 7919 + step * 104_729) % (2 ** 63)


# --------------------------------------------------------------------------- losses per stage


def stage_loss(stage: str, model, batch: dict, config: TrainConfig):
    """(loss, scalars) for one batch; every stage is a plain function of (model, batch)."""
    if stage == "kl":
        x = batch["images"]
        recon, post = model(x)
        # LDM's loss, both terms divided by the pixel count: sum|x - x'| / n + w * KL / n
        # (L1 only: the perceptual and GAN terms need downloaded networks)
        rec = (recon.float() - x).abs().mean()
        kl = post.kl().float().mean() / x[0].numel()
        loss, scalars = rec + config.kl_weight * kl, {"rec": rec.item(), "kl": kl.item()}
        if config.spectral_weight > 0:
            # amplitudes only, phase-free: pixel L1 alone pays for a fine grating it cannot place
            # exactly by blurring it away; this term pays for the texture's energy being there
            # (the perceptual term's job in LDM, which needs a downloaded VGG)
            spec = (torch.fft.rfft2(recon.float(), norm="ortho").abs() - torch.fft.rfft2(x, norm="ortho").abs()).abs().mean()
            loss, scalars["spec"] = loss + config.spectral_weight * spec, spec.item()
        return loss, scalars
    if stage == "vq":
        x = batch["images"]
        recon, losses = model(x)
        rec = F.mse_loss(recon.float(), x)
        loss = rec + sum(v.float() for v in losses.values())
        return loss, {"rec": rec.item(), **{k: v.item() for k, v in losses.items()}}
    if stage == "gpt":
        # through forward() itself (not model.loss), so DDP's hooks see the call
        return next_token_loss(model(batch["codes"], batch["labels"]), batch["codes"]), {}
    if stage == "mar":
        latents = DiagonalGaussian(batch["moments"].float()).sample() * batch["latent_scale"]
        return model(latents, batch["labels"], codes=batch.get("codes")), {}
    raise ValueError(f"stage={stage!r}; allowed: {', '.join(TrainConfig.STAGES)}")


# --------------------------------------------------------------------------- optimizer, EMA


def param_groups(model, weight_decay: float):
    """Decay only matrices outside the diffusion head: MAR's `add_weight_decay` rule (1-D params,
    biases and DiffLoss undecayed); for LlamaGen it reduces to its dim >= 2 rule."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") or "diffloss" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    t = (step - config.warmup_steps) / max(1, config.train_steps - config.warmup_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


class EMA:
    """ema <- d * ema + (1 - d) * p after every step (MAR: d = 0.9999); buffers copied.

    d is warmed up as min(decay, (1 + n) / (10 + n)) after n updates (the num_updates rule of
    TF's ExponentialMovingAverage): a run of a few hundred steps otherwise keeps its random
    init in the average (measured: KL-small EMA recon L1 0.31 vs 0.25 for the raw weights)."""

    def __init__(self, model, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                       for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model, step: int):
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v.float(), 1.0 - d)
            else:
                self.shadow[k].copy_(v)


# --------------------------------------------------------------------------- the loop


def _train_dtype(device: torch.device, precision: str, stage: str = "") -> torch.dtype:
    # CPU convs run 1.7x slower under bf16 autocast than fp32 (measured, KL-small, 2 cores),
    # while ~6M-param transformers run 1.6-1.9x faster: auto keeps the conv tokenizers in fp32
    # there (narrow transformers are slower in bf16 too: the embedded recipe sets fp32)
    if precision == "fp32" or precision == "auto" and (
            not bf16_supported(device) or device.type == "cpu" and stage in CONV_STAGES):
        return torch.float32
    return torch.bfloat16


def train(config: TrainConfig, source, out, device=None, extra_batch: dict | None = None, init_from=None):
    """Train one stage into folder `out`, resuming from its last checkpoint; returns `out`.

    source: ImageSource (kl, vq) or TokenSource (gpt, mar); extra_batch: constants added to
    every batch (e.g. {"latent_scale": s} for mar); init_from: a finished run of the same
    stage, or a public checkpoint file of it (MAR's checkpoint-last.pth), whose weights start
    this one (a fresh run only; modules it lacks, e.g. a fusion added to a MAR trunk, keep
    their init; any other key or shape difference is an error).
    """
    validate(config)
    out = Path(out)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world, local = init_distributed(device)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    accum = config.accum_steps
    if config.batch_size % (world * accum):
        raise ValueError(f"batch_size={config.batch_size} must be divisible by the {world} ranks x "
                         f"accum_steps={accum}")
    model, model_config, ema, opt = _build(config, device)
    start, skipped, ema = _restore(config, out, model, ema, opt, device, init_from)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        clean_stale(out)
        atomic_write_text(out / "config.json", json.dumps(run_config_json(config, model_config), indent=1))
    ddp = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[local] if device.type == "cuda" else None)
    log = _Log(config, out, rank, start, len(source))
    local_b = config.batch_size // world
    micro = local_b // accum
    saved, in_a_row = start, 0          # step of the newest checkpoint; skipped batches in a row

    def checkpoint(at: int):
        if rank == 0 and at > saved:
            save_checkpoint(out, at, model, ema.shadow, opt, config.keep_checkpoints, {"skipped": skipped})
        if world > 1:
            dist.barrier()  # no rank runs ahead of a checkpoint it might need on resume
        return at

    model.train()
    try:
        with _stop_on_signals():
            for step in range(start, config.train_steps):
                idx, flip = batch_indices(step, len(source), config.batch_size, config.seed)
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, config)
                opt.zero_grad(set_to_none=True)
                gnorm, losses = None, []
                for m in range(accum):   # rank r, micro-batch m: the slice of rank r*accum+m at accum 1
                    sl = slice(rank * local_b + m * micro, rank * local_b + (m + 1) * micro)
                    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                             for k, v in {**source.get(idx[sl], flip[sl]), **(extra_batch or {})}.items()}
                    # Every step's randomness (masks, orders, noise, dropout) is a function of (seed,
                    # slice, step): a resumed run repeats the uninterrupted one exactly, and
                    # accum_steps=k on one rank repeats k ranks.
                    torch.manual_seed(step_seed(config.seed, rank * accum + m, step))
                    with autocast_for(_train_dtype(device, config.precision, config.stage), device):
                        loss, scalars = stage_loss(config.stage, ddp, batch, config)
                    loss_ok = bool(torch.isfinite(loss.detach()))
                    bad, stop_now = _agree(not loss_ok, world, device)
                    losses.append(loss.detach())
                    if bad:
                        break
                    # DDP all-reduces the summed gradients once, in the last micro-batch's backward
                    last = m == accum - 1
                    with contextlib.nullcontext() if last or world == 1 else ddp.no_sync():
                        (loss / accum).backward()
                loss = torch.stack(losses).mean()
                if not bad:
                    if config.grad_clip > 0:
                        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                        bad = not bool(torch.isfinite(gnorm))   # grads are all-reduced: same on every rank
                if bad:
                    what = (f"loss {loss.item()}" if not loss_ok else
                            "loss on another rank" if gnorm is None else f"grad norm {float(gnorm)}")
                    saved = _skip_or_stop(config, out, step, what, in_a_row, saved, skipped, checkpoint, rank)
                    in_a_row += 1
                    opt.zero_grad(set_to_none=True)
                else:
                    opt.step()
                    ema.update(model, step)
                    in_a_row = 0
                done = step + 1
                log.step(done, loss, opt, gnorm, scalars, len(skipped))
                if done % config.ckpt_every == 0 or done == config.train_steps:
                    saved = checkpoint(done)
                if stop_now is None:
                    stop_now = _stop.is_set()
                if stop_now and done < config.train_steps:
                    saved = checkpoint(done)
                    if rank == 0:
                        logger.warning(f"train: stop requested (SIGTERM): checkpoint {out / f'step_{saved:07d}'} "
                                       "written; rerun to resume")
                    raise Preempted(saved, out / f"step_{saved:07d}")
            stopped = bool(stop_now) if config.train_steps > start else _stop.is_set()  # during the last step: finish, then exit
    finally:
        log.close()
    if rank == 0:
        if config.stage == "kl":
            _store_latent_scale(out, config, model_config, ema, source, device)
        atomic_write_text(out / "DONE", json.dumps({"train_steps": config.train_steps, "skipped_steps": skipped}))
    if stopped:
        raise Preempted(config.train_steps, out / f"step_{config.train_steps:07d}")
    return out


def _build(config: TrainConfig, device):
    """Model (same init on every rank), its config, EMA and AdamW."""
    model_config = make_config(config.preset, **dict(config.overrides))
    if config.grad_checkpointing and hasattr(model_config, "grad_checkpointing"):
        model_config = dataclasses.replace(model_config, grad_checkpointing=True)
    torch.manual_seed(config.seed)
    model = model_class(config.stage)(model_config).to(device)
    if config.stage in CONV_STAGES:
        model = model.to(memory_format=torch.channels_last)   # ~1.2x faster convs on CPU (measured)
    ema = EMA(model, config.ema_decay)
    opt = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=tuple(config.betas),
                            fused=device.type == "cuda")
    return model, model_config, ema, opt


def _restore(config: TrainConfig, out: Path, model, ema, opt, device, init_from):
    """(first step, skipped steps, EMA): from the run's newest checkpoint, else from `init_from`'s
    weights: a finished run's folder or a public checkpoint file (missing fusion modules keep
    their zero-init, so a D2C model starts as that MAR), else a fresh start."""
    if out.exists() and checkpoint_dirs(out):
        start, shadow, state = load_checkpoint(out, model, opt)
        ema.shadow = {k: v.to(device) for k, v in shadow.items()}
        return start, list(state.get("skipped", [])), ema
    if init_from is not None:
        init_from = Path(init_from)
        sd = load_state_dict_file(init_from if init_from.is_file() else
                                  checkpoint_dirs(init_from)[-1] / "model.safetensors")
        load_into(model, sd, source=str(init_from), new=("fusion.",))
        ema = EMA(model, config.ema_decay)
    return 0, [], ema


def _agree(bad: bool, world: int, device):
    """(non-finite anywhere, stop requested anywhere or None alone): every rank must take the same
    branches, since backward and barriers are collective."""
    if world == 1:
        return bad, None
    flags = torch.tensor([float(bad), float(_stop.is_set())], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0]), bool(flags[1])


def _skip_or_stop(config, out, step, what, in_a_row, saved, skipped, checkpoint, rank) -> int:
    """A non-finite step: raise NonFiniteLoss after checkpointing the last good state, or (skip
    mode, under the limit) record the skipped step and go on; returns the newest saved step."""
    if config.on_nonfinite == "stop" or in_a_row + 1 > config.max_consecutive_skips:
        # the bad update was never applied: the weights are the state after `step` steps
        saved = checkpoint(step) if step > saved else saved
        why = ("" if config.on_nonfinite == "stop" else
               f" ({in_a_row + 1} batches in a row, max_consecutive_skips={config.max_consecutive_skips})")
        kept = (f"last good state saved as {out / f'step_{saved:07d}'}" if saved > 0
                else "no step completed, nothing saved")
        raise NonFiniteLoss(f"non-finite {what} at step {step}{why} in {out}; {kept}; "
                            f"lower lr, use bf16/fp32, or on_nonfinite=skip")
    skipped.append(step)
    if rank == 0:
        warnings.warn(f"{out}: non-finite {what} at step {step}: batch skipped "
                      f"({len(skipped)} skipped so far)", RuntimeWarning, stacklevel=3)
    return saved


class _Log:
    """Rank 0's progress (d2c.progress: a bar at a terminal, log lines in a job's log: step,
    epoch, loss, lr, img/s, ETA) and TensorBoard scalars, both every log_every steps."""

    def __init__(self, config: TrainConfig, out: Path, rank: int, start: int, num_items: int):
        from d2c.progress import Progress
        self.config, self.rank = config, rank
        self.steps_per_epoch = max(1, num_items // config.batch_size)
        self.writer = None
        if config.tensorboard and rank == 0:
            d2c.require("tensorboard", "TrainConfig.tensorboard=True (logs in <run>/tb)")
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(out / "tb"))
        self.progress = Progress(f"train {config.stage} ({config.preset})", config.train_steps, "steps",
                                 enabled=rank == 0, bar=config.progress, initial=start,
                                 images_per_unit=config.batch_size)
        self.t0, self.last = time.perf_counter(), start

    def step(self, done: int, loss, opt, gnorm, scalars: dict, n_skipped: int):
        config, w = self.config, self.writer
        fields = {}
        scalars_due = done % config.log_every == 0 or done == config.train_steps
        if self.rank == 0 and (scalars_due or self.progress.due()):
            lv = loss.item()
            fields = {"epoch": f"{done / self.steps_per_epoch:.2f}", "loss": lv, "lr": f"{opt.param_groups[0]['lr']:.2e}"}
            if n_skipped:
                fields["skipped"] = n_skipped
        if self.rank == 0 and scalars_due:
            rate = (done - self.last) / max(time.perf_counter() - self.t0, 1e-9)
            self.t0, self.last = time.perf_counter(), done
            if w is not None:
                w.add_scalar(f"{config.stage}/loss", lv, done)
                w.add_scalar(f"{config.stage}/lr", opt.param_groups[0]["lr"], done)
                w.add_scalar(f"{config.stage}/steps_per_s", rate, done)
                w.add_scalar(f"{config.stage}/skipped_steps", n_skipped, done)
                if gnorm is not None:
                    w.add_scalar(f"{config.stage}/grad_norm", float(gnorm), done)
                for k, v in scalars.items():
                    w.add_scalar(f"{config.stage}/{k}", v, done)
        self.progress.update(1, **fields)

    def close(self):
        self.progress.close()
        if self.writer is not None:
            self.writer.close()


@torch.no_grad()
def _store_latent_scale(out: Path, config: TrainConfig, model_config, ema: EMA, source, device):
    """Fit the KL latent scale so that scaled posterior samples have unit std (the rule behind
    LDM's / MAR's 0.2325 for KL-16) and record it in the run's config.json."""
    kl = model_class("kl")(dataclasses.replace(model_config, scale=1.0)).to(device).eval()
    kl.load_state_dict(ema.shadow)
    g = torch.Generator().manual_seed(config.seed)
    zs = []
    for i in range(config.scale_batches):
        idx, flip = batch_indices(i, len(source), min(config.batch_size, len(source)), config.seed + 1)
        x = source.get(idx, flip)["images"].to(device)
        zs.append(kl.encode(x, generator=g).float().flatten())
    scale = float(1.0 / torch.cat(zs).std())
    atomic_write_text(out / "config.json",
                      json.dumps(run_config_json(config, dataclasses.replace(model_config, scale=scale)), indent=1))
