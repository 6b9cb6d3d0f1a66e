"""One training loop for every stage: KL and VQ tokenizers, stage-1 GPT, stage-2 MAR / D2C.

    batch = source.get(indices of step s)        data order is a function of (seed, step):
    loss  = stage_loss(stage, model, batch)       resume needs no data-loader state
    AdamW (MAR/LlamaGen betas, no decay on 1-D params, biases and the diffusion head),
    linear warmup then constant or cosine, grad clip, EMA, bf16 autocast where supported.

A run lives in one folder: `step_XXXXXXX/` checkpoints (written to a temp folder, fsynced,
renamed, so a crash never leaves a half checkpoint), `config.json`, TensorBoard scalars in
`tb/`, and `DONE` once the last step is saved.  Resuming restores weights, EMA, optimizer,
step and every RNG, so a resumed run reaches the same weights as an uninterrupted one.
DDP: launched by torchrun or SLURM (env vars), each rank takes its slice of the global batch.

Failures: SIGTERM (SLURM preemption) finishes the current step, checkpoints it and raises
`Preempted` (a SystemExit: the job exits, a requeued one resumes); a non-finite loss or
gradient either stops with `NonFiniteLoss` after checkpointing the last good state, or skips
the batch (`TrainConfig.on_nonfinite`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import d2c
from d2c.checkpoint import (CheckpointError, atomic_write_text, fsync_path, load_into, load_state_dict_file,
                            safe_torch_load, save_safetensors)
from d2c.config import TrainConfig, make_config, validate
from d2c.models.gpt import next_token_loss
from d2c.tokenizers.kl import DiagonalGaussian

CONV_STAGES = ("kl", "vq")   # the convolutional tokenizers
PREEMPT_SIGNALS = (signal.SIGTERM,)   # SLURM sends SIGTERM on preemption / scancel, KillWait before SIGKILL


class NonFiniteLoss(FloatingPointError):
    """Training hit a non-finite loss or gradient norm; the message is one line (step, folder),
    and the folder's newest checkpoint is the state just before that step."""


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

# --------------------------------------------------------------------------- data sources


class ImageSource:
    """Images held in memory (the embedded default): uint8 (N, 3, H, W) and labels (N,)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels.long()

    def __len__(self):
        return len(self.labels)

    def get(self, idx, flip):
        x = self.images[idx].float() / 127.5 - 1.0
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return {"images": x.contiguous(memory_format=torch.channels_last), "labels": self.labels[idx]}


class TokenSource:
    """Cached tokenizer outputs (d2c.data.cache.TokenCache): KL moments and/or VQ codes."""

    def __init__(self, cache, latent_scale: float = 1.0):
        self.cache, self.latent_scale = cache, latent_scale

    def __len__(self):
        return len(self.cache)

    def get(self, idx, flip):
        b = self.cache.get_batch(idx, flip)
        out = {"labels": b["labels"].long()}
        if b.get("moments") is not None:
            out["moments"] = b["moments"]
        if b.get("codes") is not None:
            out["codes"] = b["codes"].long().flatten(1)
        return out


def step_seed(seed: int, rank: int, step: int) -> int:
    return (seed * 1_000_003 + rank * 7919 + step * 104_729) % (2 ** 63)


def batch_indices(step: int, n: int, batch: int, seed: int):
    """Global batch of `step`: a fresh permutation every epoch, drop_last, and one flip bit per
    sample (horizontal-flip augmentation, as MAR's cache of image + flip is used)."""
    per_epoch = n // batch
    if per_epoch == 0:
        raise ValueError(f"batch_size={batch} is larger than the dataset ({n} items)")
    epoch, pos = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    flips = torch.rand(n, generator=g) < 0.5
    sel = perm[pos * batch:(pos + 1) * batch]
    return sel, flips[sel]


# --------------------------------------------------------------------------- losses per stage


def stage_loss(stage: str, model, batch: dict, cfg: TrainConfig):
    """(loss, scalars) for one batch; every stage is a plain function of (model, batch)."""
    if stage == "kl":
        x = batch["images"]
        recon, post = model(x)
        # LDM's loss, both terms divided by the pixel count: sum|x - x'| / n + w * KL / n
        # (L1 only: the perceptual and GAN terms need downloaded networks)
        rec = (recon.float() - x).abs().mean()
        kl = post.kl().float().mean() / x[0].numel()
        return rec + cfg.kl_weight * kl, {"rec": rec.item(), "kl": kl.item()}
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


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


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


# --------------------------------------------------------------------------- distributed


def dist_env():
    """(rank, world, local_rank) from torchrun's or SLURM's variables; (0, 1, 0) alone."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", 1)) > 1:
        return (int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]),
                int(os.environ.get("SLURM_LOCALID", 0)))
    return 0, 1, 0


def init_distributed(device: torch.device):
    rank, world, local = dist_env()
    if world > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return rank, world, local


# --------------------------------------------------------------------------- checkpoints


def _ckpt_dirs(out: Path):
    return sorted(p for p in out.glob("step_*") if p.is_dir() and (p / "state.pt").is_file())


def save_checkpoint(out: Path, step: int, model, ema: EMA, opt, keep: int, extra: dict | None = None):
    """Folder step_XXXXXXX with model/ema safetensors + state.pt (optimizer, step, RNG);
    written under a temp name and renamed, so only complete checkpoints carry the final name."""
    final = out / f"step_{step:07d}"
    tmp = out / f".tmp_step_{step:07d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_safetensors(model, tmp / "model.safetensors")
    save_safetensors(ema.shadow, tmp / "ema.safetensors")
    torch.save({"step": step, "optimizer": opt.state_dict(), **(extra or {})}, tmp / "state.pt")
    fsync_path(tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(out)
    for old in _ckpt_dirs(out)[:-keep]:
        # rename first: a kill during rmtree leaves a dot-folder (cleaned later), never a
        # half-deleted step_* folder that still looks like a checkpoint
        trash = out / f".del_{old.name}_{os.getpid()}"
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return final


def _clean_stale(out: Path) -> None:
    """Leftovers of a killed writer (temp checkpoint folders, half-pruned ones, temp files).
    Safe: one writer per run folder (the pipeline's stage lock; DDP writes from rank 0 only)."""
    for p in [*out.glob(".tmp_step_*"), *out.glob(".del_step_*")]:
        shutil.rmtree(p, ignore_errors=True)
    for p in out.glob(".*.tmp[0-9]*"):
        if p.is_file():
            p.unlink(missing_ok=True)


def _config_json(cfg: TrainConfig, model_cfg) -> dict:
    return {"train": dataclasses.asdict(cfg), "model": dataclasses.asdict(model_cfg)}


def load_trained(out, ema: bool = True, device="cpu"):
    """The model of a finished (or interrupted) run, EMA weights by default, in eval mode."""
    out = Path(out)
    meta = json.loads((out / "config.json").read_text())
    tc = meta["train"]
    model = d2c.build(tc["preset"], **_overrides_from_json(meta["model"], tc["preset"]))
    dirs = _ckpt_dirs(out)
    if not dirs:
        raise FileNotFoundError(f"{out}: no checkpoint (step_*/) found; train the stage first")
    load_into(model, load_state_dict_file(dirs[-1] / ("ema.safetensors" if ema else "model.safetensors")),
              source=str(dirs[-1]))
    return model.to(device).eval()


def _overrides_from_json(model_cfg: dict, preset: str) -> dict:
    """Every saved model field, tuples restored, so the rebuilt model equals the trained one."""
    base = make_config(preset)
    out = {}
    for f in dataclasses.fields(base):
        if f.name not in model_cfg:
            # a field added after this run was saved: its class default is the behaviour the run had
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            continue
        v = model_cfg[f.name]
        if isinstance(getattr(base, f.name), tuple) and isinstance(v, list):
            v = tuple(v)
        if f.name == "fusion" and isinstance(v, dict) and isinstance(v.get("layers"), list):
            v = {**v, "layers": tuple(v["layers"])}
        out[f.name] = v
    return out


# --------------------------------------------------------------------------- the loop


def _autocast(device: torch.device, precision: str, stage: str = ""):
    if precision == "fp32":
        return contextlib.nullcontext()
    # CPU convs run 1.7x slower under bf16 autocast than fp32 (measured, KL-small, 2 cores),
    # while ~6M-param transformers run 1.6-1.9x faster: auto keeps the conv tokenizers in fp32
    # there (narrow transformers are slower in bf16 too: the embedded recipe sets fp32)
    if precision == "auto" and device.type == "cpu" and stage in CONV_STAGES:
        return contextlib.nullcontext()
    if precision == "auto" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def is_done(out) -> bool:
    return (Path(out) / "DONE").is_file()


def train(cfg: TrainConfig, source, out, device=None, extra_batch: dict | None = None, init_from=None):
    """Train one stage into folder `out`, resuming from its last checkpoint; returns `out`.

    source: ImageSource (kl, vq) or TokenSource (gpt, mar); extra_batch: constants added to
    every batch (e.g. {"latent_scale": s} for mar); init_from: a finished run of the same
    stage whose weights start this one (a fresh run only; modules it lacks, e.g. a fusion
    added to a MAR trunk, keep their init; any other key or shape difference is an error).
    """
    validate(cfg)
    out = Path(out)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world, local = init_distributed(device)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the {world} ranks")
    overrides = dict(cfg.overrides)
    model_cfg = make_config(cfg.preset, **overrides)
    if cfg.grad_checkpointing and hasattr(model_cfg, "grad_checkpointing"):
        model_cfg = dataclasses.replace(model_cfg, grad_checkpointing=True)

    torch.manual_seed(cfg.seed)              # same init on every rank
    model = d2c.model_class(cfg.stage)(model_cfg).to(device)
    if cfg.stage in CONV_STAGES:
        model = model.to(memory_format=torch.channels_last)   # ~1.2x faster convs on CPU (measured)
    ema = EMA(model, cfg.ema_decay)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                            fused=device.type == "cuda")
    start, skipped = 0, []          # skipped: steps whose batch was dropped (on_nonfinite="skip")
    ckpts = _ckpt_dirs(out) if out.exists() else []
    if ckpts:
        last = ckpts[-1]
        try:
            load_into(model, load_state_dict_file(last / "model.safetensors"), source=str(last))
            ema.shadow = {k: v.to(device) for k, v in load_state_dict_file(last / "ema.safetensors").items()}
            state = safe_torch_load(last / "state.pt")
        except CheckpointError as e:
            # checkpoints are written atomically, so this is outside damage: say so, and how to go on
            hint = f"; move {last} away to resume from {ckpts[-2].name}" if len(ckpts) > 1 else ""
            raise CheckpointError(f"cannot resume: {e}{hint}") from None
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
        skipped = list(state.get("skipped", []))
    elif init_from is not None:
        sd = load_state_dict_file(_ckpt_dirs(Path(init_from))[-1] / "model.safetensors")
        missing = [k for k in model.state_dict() if k not in sd]
        if any(not k.startswith("fusion.") for k in missing) or set(sd) - set(model.state_dict()):
            load_into(model, sd, source=str(init_from))     # raises, naming the keys
        load_into(model, sd, strict=False, source=str(init_from))
        ema = EMA(model, cfg.ema_decay)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _clean_stale(out)
        atomic_write_text(out / "config.json", json.dumps(_config_json(cfg, model_cfg), indent=1))

    ddp = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local] if device.type == "cuda" else None)
    writer = None
    if cfg.tensorboard and rank == 0:
        d2c.require("tensorboard", "TrainConfig.tensorboard=True (logs in <run>/tb)")
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out / "tb"))
    bar = None
    if cfg.progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.stage} ({cfg.preset})", dynamic_ncols=True)

    model.train()
    local_b = cfg.batch_size // world
    t0, last_log = time.perf_counter(), start
    saved, in_a_row = start, 0          # step of the newest checkpoint; skipped batches in a row

    def checkpoint(at: int):
        if rank == 0 and at > saved:
            save_checkpoint(out, at, model, ema, opt, cfg.keep_checkpoints, {"skipped": skipped})
        if world > 1:
            dist.barrier()  # no rank runs ahead of a checkpoint it might need on resume
        return at

    try:
        with _stop_on_signals():
            for step in range(start, cfg.steps):
                idx, flip = batch_indices(step, len(source), cfg.batch_size, cfg.seed)
                sl = slice(rank * local_b, (rank + 1) * local_b)
                batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                         for k, v in {**source.get(idx[sl], flip[sl]), **(extra_batch or {})}.items()}
                # Every step's randomness (masks, orders, noise, dropout) is a function of (seed, rank,
                # step): a run resumed from any checkpoint repeats the uninterrupted one exactly.
                torch.manual_seed(step_seed(cfg.seed, rank, step))
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, cfg)
                with _autocast(device, cfg.precision, cfg.stage):
                    loss, scalars = stage_loss(cfg.stage, ddp, batch, cfg)
                loss_ok = bool(torch.isfinite(loss.detach()))
                bad, stop_now = not loss_ok, None
                if world > 1:   # every rank must take the same branches (backward and barriers are collective)
                    flags = torch.tensor([float(bad), float(_stop.is_set())], device=device)
                    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                    bad, stop_now = bool(flags[0]), bool(flags[1])
                opt.zero_grad(set_to_none=True)
                gnorm = None
                if not bad:
                    loss.backward()
                    if cfg.grad_clip > 0:
                        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                        bad = not bool(torch.isfinite(gnorm))   # grads are all-reduced: same on every rank
                if bad:
                    what = (f"loss {loss.item()}" if not loss_ok else
                            "loss on another rank" if gnorm is None else f"grad norm {float(gnorm)}")
                    if cfg.on_nonfinite == "stop" or in_a_row + 1 > cfg.max_consecutive_skips:
                        # the bad update was never applied: the weights are the state after `step` steps
                        saved = checkpoint(step) if step > saved else saved
                        why = ("" if cfg.on_nonfinite == "stop" else
                               f" ({in_a_row + 1} batches in a row, max_consecutive_skips={cfg.max_consecutive_skips})")
                        kept = (f"last good state saved as {out / f'step_{saved:07d}'}" if saved > 0
                                else "no step completed, nothing saved")
                        raise NonFiniteLoss(f"non-finite {what} at step {step}{why} in {out}; {kept}; "
                                            f"lower lr, use bf16/fp32, or on_nonfinite=skip")
                    in_a_row += 1
                    skipped.append(step)
                    opt.zero_grad(set_to_none=True)
                    if rank == 0:
                        warnings.warn(f"{out}: non-finite {what} at step {step}: batch skipped "
                                      f"({len(skipped)} skipped so far)", RuntimeWarning, stacklevel=2)
                else:
                    opt.step()
                    ema.update(model, step)
                    in_a_row = 0
                done = step + 1
                if rank == 0 and (done % cfg.log_every == 0 or done == cfg.steps):
                    lv = loss.item()
                    rate = (done - last_log) / max(time.perf_counter() - t0, 1e-9)
                    t0, last_log = time.perf_counter(), done
                    if writer is not None:
                        writer.add_scalar(f"{cfg.stage}/loss", lv, done)
                        writer.add_scalar(f"{cfg.stage}/lr", opt.param_groups[0]["lr"], done)
                        writer.add_scalar(f"{cfg.stage}/steps_per_s", rate, done)
                        writer.add_scalar(f"{cfg.stage}/skipped_steps", len(skipped), done)
                        if gnorm is not None:
                            writer.add_scalar(f"{cfg.stage}/grad_norm", float(gnorm), done)
                        for k, v in scalars.items():
                            writer.add_scalar(f"{cfg.stage}/{k}", v, done)
                    if bar is not None:
                        bar.set_postfix(loss=f"{lv:.4f}", it_s=f"{rate:.2f}")
                if bar is not None:
                    bar.update(1)
                if done % cfg.ckpt_every == 0 or done == cfg.steps:
                    saved = checkpoint(done)
                if stop_now is None:
                    stop_now = _stop.is_set()
                if stop_now and done < cfg.steps:
                    saved = checkpoint(done)
                    if rank == 0:
                        print(f"train: stop requested (SIGTERM): checkpoint {out / f'step_{saved:07d}'} "
                              f"written; rerun to resume", file=sys.stderr, flush=True)
                    raise Preempted(saved, out / f"step_{saved:07d}")
            stopped = bool(stop_now) if cfg.steps > start else _stop.is_set()  # during the last step: finish, then exit
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    if rank == 0:
        if cfg.stage == "kl":
            _store_latent_scale(out, cfg, model_cfg, ema, source, device)
        atomic_write_text(out / "DONE", json.dumps({"steps": cfg.steps, "skipped_steps": skipped}))
    if stopped:
        raise Preempted(cfg.steps, out / f"step_{cfg.steps:07d}")
    return out


@torch.no_grad()
def _store_latent_scale(out: Path, cfg: TrainConfig, model_cfg, ema: EMA, source, device):
    """Fit the KL latent scale so that scaled posterior samples have unit std (the rule behind
    LDM's / MAR's 0.2325 for KL-16) and record it in the run's config.json."""
    kl = d2c.model_class("kl")(dataclasses.replace(model_cfg, scale=1.0)).to(device).eval()
    kl.load_state_dict(ema.shadow)
    g = torch.Generator().manual_seed(cfg.seed)
    zs = []
    for i in range(cfg.scale_batches):
        idx, flip = batch_indices(i, len(source), min(cfg.batch_size, len(source)), cfg.seed + 1)
        x = source.get(idx, flip)["images"].to(device)
        zs.append(kl.encode(x, generator=g).float().flatten())
    scale = float(1.0 / torch.cat(zs).std())
    atomic_write_text(out / "config.json",
                      json.dumps(_config_json(cfg, dataclasses.replace(model_cfg, scale=scale)), indent=1))
