"""The paper-scale commands, each torchrun- and srun-aware (every rank runs the same line):

    d2c-sample   --mar ckpt/d2c_qformer-.../ --gpt c2i_B_256.pt --kl kl16.ckpt --out runs/eval/d2c-b \
                 --num-images 50000 --steps 64 --cfg 2.9 [--png]      # -> runs/eval/d2c-b/samples.npz
                 (a flag per d2c.sampling.SamplerConfig field: --stage1-top-k, --uncond-refresh, ...)
    d2c-sample   --mar mar_base.pth --kl kl16.ckpt --classes 207,360,387 --grid grid.png   # a row a class
    d2c-evaluate --npz runs/eval/d2c-b/samples.npz --inception weights-inception-2015-12-05-6726825d.pth \
                 --reference VIRTUAL_imagenet256_labeled.npz          # -> runs/eval/d2c-b/metrics.json
(also `python -m d2c.commands sample|evaluate ...`).  A model is a run folder of ours (its
config.json names the preset; EMA weights) or a public file loaded into `--<model>-preset`.
The family is what is given: --gpt + --mar (D2C), --mar (MAR), --gpt + --vq (LlamaGen).
Every argument and file is checked before a model is built or a file written (values, presets,
file headers, class ids); user errors: one line, exit 2 (d2c.cli).  Training one stage is the harness cell
(`ablations/run.py recipe=imagenet ...`), which trains what the cell needs before it samples.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

PRESET_DEFAULTS = {"gpt": "gpt_b", "mar": "mar_base", "kl": "kl_16", "vq": "vq_16"}


def _device(arg):
    from d2c.distributed import local_device
    return torch.device(arg) if arg else local_device()


def load_model(kind: str, path, preset: str | None, device, fusion: str | None = None):
    """A run folder (ckpt/<stage>-<key>/, EMA weights) or a public file at `preset`."""
    import d2c
    from d2c.checkpoint import load_trained
    path = Path(path)
    if path.is_dir():
        return load_trained(path, device=device)
    # a MAR file as D2C: fusion new and zero-init (the model samples as that MAR)
    overrides = {"fusion": fusion} if kind == "mar" and fusion and fusion != "none" else {}
    model = d2c.load_pretrained(preset or PRESET_DEFAULTS[kind], path, new=("fusion.",) if overrides else (),
                                **overrides)
    return model.to(device).eval()


def sample_main(argv=None):
    ap = argparse.ArgumentParser(prog="d2c-sample", description="Sample the ADM protocol's images into an .npz "
                                 "(every rank of the job samples its batches; a rerun fills in the missing ones), "
                                 "or a grid of chosen classes (--classes ... --grid grid.png).")
    for kind in ("gpt", "mar", "kl", "vq"):
        ap.add_argument(f"--{kind}", help=f"{kind}: a run folder or a public file")
        ap.add_argument(f"--{kind}-preset", default=None, help=f"preset of a {kind} file (default {PRESET_DEFAULTS[kind]})")
    ap.add_argument("--fusion", default=None, help="load a MAR file as D2C with this fusion (zero-init)")
    ap.add_argument("--out", help="folder for batches/, samples.npz, speed.json (png/)")
    ap.add_argument("--classes", default=None, help="comma-separated class ids: sample a grid of them (with --grid)")
    ap.add_argument("--grid", default=None, help="the grid's PNG: a row per class of --classes")
    ap.add_argument("--per-class", type=int, default=4, help="images per class in the grid (default 4)")
    ap.add_argument("--num-images", type=int, default=50_000)
    ap.add_argument("--num-classes", type=int, default=None, help="default: the model's")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    from d2c.sampling import add_sampler_flags
    add_sampler_flags(ap)      # every SamplerConfig field: a harness cell replays as flags
    ap.add_argument("--png", action="store_true", help="also write png/<index>.png")
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    from d2c.cli import exit_on_user_error
    from d2c.progress import setup_logging
    setup_logging()
    with exit_on_user_error():
        _sample(args)


def _check_model(kind: str, path: Path, preset: str | None, fusion: str | None) -> tuple[int, bool]:
    """Check a model argument (a run folder: config.json and the newest checkpoint's header; a
    public file: its keys and shapes against the preset, memory-mapped) without building the
    model; returns (its class count, whether it is a fused stage 2)."""
    import dataclasses

    from d2c.checkpoint import check_pretrained, check_trained
    from d2c.config import make_config
    if path.is_dir():
        model = check_trained(path)["model"]
        fused = (model.get("fusion") or {}).get("kind", "none") != "none"
        return model.get("num_classes", model.get("class_num")), fused
    preset = preset or PRESET_DEFAULTS[kind]
    overrides = {"fusion": fusion} if kind == "mar" and fusion and fusion != "none" else {}
    check_pretrained(preset, path, new=("fusion.",) if overrides else (), **overrides)
    config = dataclasses.asdict(make_config(preset, **overrides))
    return config.get("num_classes", config.get("class_num")), (config.get("fusion") or {}).get("kind", "none") != "none"


def _sample_checks(args):
    """Every argument and file of d2c-sample, before anything is built or written; returns
    (sampler, classes of the grid or None, the models' class count)."""
    from d2c.evaluation import EvalError
    from d2c.sampling import sampler_from_args
    sampler = sampler_from_args(args)            # values and their rules (SamplerConfig)
    for name in ("num_images", "batch_size", "per_class") + (("num_classes",) if args.num_classes is not None else ()):
        if getattr(args, name) < 1:
            raise EvalError(f"--{name.replace('_', '-')} {getattr(args, name)}; allowed: integers >= 1")
    if not (args.mar or (args.gpt and args.vq)):
        raise EvalError("give --mar (MAR; + --gpt: D2C) or --gpt with --vq (LlamaGen)")
    if args.mar and not args.kl:
        raise EvalError("--mar needs --kl (the KL tokenizer decodes its latents)")
    if (args.classes is None) != (args.grid is None):
        raise EvalError("--classes and --grid go together (a grid of those classes); without them give --out")
    if args.grid is None and not args.out:
        raise EvalError("give --out (the folder of samples.npz) or --classes with --grid")
    if args.grid is not None and Path(args.grid).suffix.lower() != ".png":
        raise EvalError(f"--grid {args.grid}: allowed: a .png path")
    counts = {}
    for kind in ("gpt", "mar", "kl", "vq"):
        path = getattr(args, kind)
        if path and not (kind == "vq" and args.mar):
            path = Path(path)
            if not path.exists():
                raise EvalError(f"--{kind} {path}: no such file or folder")
            counts[kind], fused = _check_model(kind, path, getattr(args, f"{kind}_preset"), args.fusion)
            if kind == "mar" and args.gpt and not fused:
                raise EvalError("--gpt with a plain MAR: D2C needs a fused stage 2 (a D2C run folder, or --fusion for a MAR file)")
    num_classes = args.num_classes or counts.get("gpt") or counts.get("mar")
    classes = None
    if args.classes is not None:
        try:
            classes = [int(x) for x in args.classes.split(",") if x.strip()]
        except ValueError:
            raise EvalError(f"--classes {args.classes}: allowed: comma-separated class ids") from None
        bad = [k for k in classes if not 0 <= k < num_classes]
        if not classes or bad:
            raise EvalError(f"--classes {args.classes}: allowed: ids in 0..{num_classes - 1} (the model's classes)")
    return sampler, classes, num_classes


def _sample(args):
    from d2c.distributed import init_distributed
    from d2c.evaluation import sample_to_npz
    sampler, classes, num_classes = _sample_checks(args)
    device = _device(args.device)
    init_distributed(device)
    models = {}
    for kind in ("gpt", "mar", "kl", "vq"):
        path = getattr(args, kind)
        if path and not (kind == "vq" and args.mar):
            models[kind] = load_model(kind, path, getattr(args, f"{kind}_preset"), device, args.fusion)
    from d2c.distributed import dist_env
    if classes is not None:
        if dist_env()[0] == 0:
            grid = sample_grid(models, classes, sampler, args.grid, per_class=args.per_class,
                               batch_size=args.batch_size, seed=args.seed)
            print(f"wrote {grid} ({len(classes)} classes x {args.per_class})", flush=True)
        return
    npz = sample_to_npz(models, args.out, sampler, num_images=args.num_images,
                        num_classes=num_classes, batch_size=args.batch_size, seed=args.seed, png=args.png)
    if dist_env()[0] == 0:
        print(f"wrote {npz} ({args.num_images} images); speed: {Path(args.out) / 'speed.json'}", flush=True)


def sample_grid(models: dict, classes, sampler, path, *, per_class: int = 4, batch_size: int = 64,
                seed: int = 0) -> Path:
    """A PNG grid of `classes`, a row of `per_class` samples each (LlamaGen's sample_c2i.py, MAR's
    demo); batch b of the labels is sampled with seed `seed * 100_003 + b`, as the evaluation's."""
    from d2c.sampling import d2c_sample, family_of_models, save_grid
    sampler = sampler.for_family(family_of_models(models))
    labels = torch.tensor(classes).repeat_interleave(per_class)
    images = [d2c_sample(lab, models, sampler, seed=seed * 100_003 + b).images
              for b, lab in enumerate(labels.split(batch_size))]
    return save_grid(torch.cat(images), path, nrow=per_class)


def evaluate_main(argv=None):
    ap = argparse.ArgumentParser(prog="d2c-evaluate", description="FID / IS / KID / precision-recall of an "
                                 "ADM-format .npz, with a local Inception file against ADM's reference batch.")
    ap.add_argument("--npz", required=True, help="samples (arr_0 uint8 NHWC)")
    ap.add_argument("--inception", required=True, help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth")
    ap.add_argument("--reference", required=True, help="ADM's VIRTUAL_imagenet256_labeled.npz")
    ap.add_argument("--out", default=None, help="metrics record (default: metrics.json beside the npz)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    from d2c.cli import exit_on_user_error
    from d2c.progress import setup_logging
    setup_logging()
    with exit_on_user_error():
        _evaluate(args)


def _evaluate(args):
    from d2c.files import atomic_write_text
    from d2c.distributed import dist_env
    from d2c.evaluation import evaluate_npz
    from d2c.metrics import hardware_info
    from d2c.results import now_iso, versions
    if dist_env()[0] != 0:      # one rank measures (the metrics are one pass over the file)
        return
    npz = Path(args.npz)
    metrics = evaluate_npz(npz, inception=args.inception, reference=args.reference,
                           device=_device(args.device), batch_size=args.batch_size)
    speed = npz.parent / "speed.json"
    rec = {"npz": str(npz.resolve()), "reference": str(Path(args.reference).resolve()),
           "inception": str(Path(args.inception).resolve()), "metrics": metrics,
           "speed": json.loads(speed.read_text()) if speed.is_file() else None,
           "hardware": hardware_info(), "versions": versions(), "finished_at": now_iso()}
    out = Path(args.out) if args.out else npz.parent / "metrics.json"
    atomic_write_text(out, json.dumps(rec, indent=1))
    print(" ".join(f"{k}={v:.4g}" for k, v in metrics.items()) + f"  -> {out}", flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    commands = {"sample": sample_main, "evaluate": evaluate_main}
    usage = f"usage: python -m d2c.commands {{{','.join(commands)}}} ... (d2c-sample, d2c-evaluate)"
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return
    if not argv or argv[0] not in commands:
        print(usage, file=sys.stderr)
        raise SystemExit(2)
    commands[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
