"""Weights in and out: public checkpoint files, our safetensors, and the run folders of training
(`step_XXXXXXX/` checkpoints, `config.json`, `DONE`), written through d2c.files' atomic writer.
Loading never unpickles code: safetensors, or `torch.load(weights_only=True)` for the public
`.pt`/`.ckpt` containers."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import shutil
from pathlib import Path

import torch

from d2c.files import atomic_write, fsync_path

# Containers of the public files: LlamaGen GPT/VQ {"model": sd}; MAR {"model", "model_ema", ...};
# KL-16 {"model": sd}.  MAR's published samples use the EMA weights, so they win.
_CONTAINER_KEYS = ("model_ema", "model", "module", "state_dict", "ema")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message is one line for the user."""


def load_state_dict_file(path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:  # truncated or not safetensors
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {first})") from None
    return unwrap(safe_torch_load(path), str(path))


def safe_torch_load(path, mmap: bool = False):
    """torch.load(weights_only=True) with one-line CheckpointErrors: a pickle that names any
    global outside torch's tensor allow-list (and argparse.Namespace) is refused before it runs."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        # MAR's and LlamaGen's training scripts also store their argparse `args`; a Namespace only
        # sets attributes, so it is allowed while every other global stays refused.
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as e:     # the pre-zip torch.save format cannot be mapped
                if not mmap or "mmap" not in str(e):
                    raise
                return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: refused to load, the file holds more than tensors "
                              f"(weights_only=True: {first})") from None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {first})") from None


def unwrap(obj, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in _CONTAINER_KEYS:
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{source}: no state dict of tensors found (looked under {_CONTAINER_KEYS})")
    # DDP / torch.compile prefixes
    for prefix in ("module.", "_orig_mod."):
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def check_keys(model: torch.nn.Module, sd: dict, strict: bool = True, source: str = "checkpoint",
               new: tuple = ()) -> None:
    """The one readable error of a state dict that does not fit `model` (which may live on the
    meta device): the first shape mismatch, or (strict) the missing / unexpected keys.  `new`:
    prefixes of modules the file may lack (a D2C fusion on a MAR file), keeping their init."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.startswith(new or "\0")]
    unexpected = [k for k in sd if k not in own]
    shapes = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in own
              if k in sd and sd[k].shape != own[k].shape]
    if shapes:
        k, got, want = shapes[0]
        raise CheckpointError(f"{source}: shape mismatch at {k}: checkpoint {got} vs model {want} "
                              f"({len(shapes)} mismatching tensor(s)); wrong preset?")
    if strict and (missing or unexpected):
        def head(keys):
            return ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")
        raise CheckpointError(f"{source}: keys do not match {type(model).__name__}: "
                              f"missing [{head(missing)}]; unexpected [{head(unexpected)}]")


def load_into(model: torch.nn.Module, sd: dict, strict: bool = True, source: str = "checkpoint",
              new: tuple = ()):
    """load_state_dict with one readable error: missing/unexpected keys and the first shape
    mismatch; modules under the prefixes `new` may be absent from `sd` (check_keys)."""
    check_keys(model, sd, strict, source, new)
    model.load_state_dict(sd, strict=strict and not new)
    return model


def check_pretrained(preset: str, path, new: tuple = (), **overrides) -> None:
    """Whether `path` loads into `preset` (strict), reading only what it must: the safetensors
    header, or a memory-mapped torch container; the model is built on the meta device.  Raises
    the CheckpointError that loading would raise, before anything runs."""
    from d2c.registry import build

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    sd = _meta_state(path) if path.suffix == ".safetensors" else unwrap(safe_torch_load(path, mmap=True), str(path))
    with torch.device("meta"):
        model = build(preset, **overrides)
    check_keys(model, sd, True, str(path), new)


def _meta_state(path: Path) -> dict:
    """A safetensors file's keys and shapes (its header) as meta tensors."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {first})") from None


def check_trained(out, ema: bool = True) -> dict:
    """Whether run folder `out` loads (load_trained), reading its config.json and its newest
    checkpoint's safetensors header only; returns the config.json.  Raises CheckpointError."""
    from d2c.registry import build
    out = Path(out)
    try:
        meta = json.loads((out / "config.json").read_text())
        preset, model_cfg = meta["train"]["preset"], meta["model"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{out}: not a run folder of ours (its config.json: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    dirs = checkpoint_dirs(out)
    if not dirs:
        raise CheckpointError(f"{out}: no checkpoint (step_*/) found; train the stage first")
    f = dirs[-1] / ("ema.safetensors" if ema else "model.safetensors")
    with torch.device("meta"):
        model = build(preset, **_overrides_from_json(model_cfg, preset))
    check_keys(model, _meta_state(f), True, str(f))
    return meta


def save_safetensors(model_or_sd, path) -> None:
    from safetensors.torch import save
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, torch.nn.Module) else model_or_sd
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(save(sd)))


# --------------------------------------------------------------------------- run folders
def checkpoint_dirs(out: Path) -> list[Path]:
    """The complete checkpoints of a run folder, oldest first."""
    return sorted(p for p in out.glob("step_*") if p.is_dir() and (p / "state.pt").is_file())


def save_checkpoint(out: Path, step: int, model, ema_shadow: dict, opt, keep: int, extra: dict | None = None):
    """Folder step_XXXXXXX with model/ema safetensors + state.pt (optimizer, step, RNG);
    written under a temp name and renamed, so only complete checkpoints carry the final name."""
    final = out / f"step_{step:07d}"
    tmp = out / f".tmp_step_{step:07d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_safetensors(model, tmp / "model.safetensors")
    save_safetensors(ema_shadow, tmp / "ema.safetensors")
    torch.save({"step": step, "optimizer": opt.state_dict(), **(extra or {})}, tmp / "state.pt")
    fsync_path(tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(out)
    for old in checkpoint_dirs(out)[:-keep]:
        # rename first: a kill during rmtree leaves a dot-folder (cleaned later), never a
        # half-deleted step_* folder that still looks like a checkpoint
        trash = out / f".del_{old.name}_{os.getpid()}"
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return final


def load_checkpoint(out: Path, model, opt) -> tuple[int, dict, dict]:
    """Restore the newest checkpoint of `out` into model and optimizer; returns (step, EMA
    shadow, state extras).  A damaged one is one line naming the folder and how to go on."""
    ckpts = checkpoint_dirs(out)
    last = ckpts[-1]
    try:
        load_into(model, load_state_dict_file(last / "model.safetensors"), source=str(last))
        shadow = load_state_dict_file(last / "ema.safetensors")
        state = safe_torch_load(last / "state.pt")
    except CheckpointError as e:
        # checkpoints are written atomically, so this is outside damage: say so, and how to go on
        hint = f"; move {last} away to resume from {ckpts[-2].name}" if len(ckpts) > 1 else ""
        raise CheckpointError(f"cannot resume: {e}{hint}") from None
    opt.load_state_dict(state["optimizer"])
    return state["step"], shadow, state


def clean_stale(out: Path) -> None:
    """Leftovers of a killed writer (temp checkpoint folders, half-pruned ones, temp files).
    Safe: one writer per run folder (the pipeline's stage lock; DDP writes from rank 0 only)."""
    for p in [*out.glob(".tmp_step_*"), *out.glob(".del_step_*")]:
        shutil.rmtree(p, ignore_errors=True)
    for p in out.glob(".*.tmp[0-9]*"):
        if p.is_file():
            p.unlink(missing_ok=True)


def run_config_json(train_cfg, model_cfg) -> dict:
    return {"train": dataclasses.asdict(train_cfg), "model": dataclasses.asdict(model_cfg)}


def is_done(out) -> bool:
    return (Path(out) / "DONE").is_file()


def load_trained(out, ema: bool = True, device="cpu"):
    """The model of a finished (or interrupted) run, EMA weights by default, in eval mode."""
    from d2c.registry import build
    out = Path(out)
    meta = json.loads((out / "config.json").read_text())
    tc = meta["train"]
    model = build(tc["preset"], **_overrides_from_json(meta["model"], tc["preset"]))
    dirs = checkpoint_dirs(out)
    if not dirs:
        raise FileNotFoundError(f"{out}: no checkpoint (step_*/) found; train the stage first")
    load_into(model, load_state_dict_file(dirs[-1] / ("ema.safetensors" if ema else "model.safetensors")),
              source=str(dirs[-1]))
    return model.to(device).eval()


def _overrides_from_json(model_cfg: dict, preset: str) -> dict:
    """Every saved model field, tuples restored, so the rebuilt model equals the trained one."""
    from d2c.config import make_config
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
