"""The paper-scale commands, each torchrun- and srun-aware (every rank runs the same line):

    d2c-sample   --mar ckpt/d2c_qformer-.../ --gpt c2i_B_256.pt --kl kl16.ckpt --out runs/eval/d2c-b \
                 --num-images 50000 --steps 64 --cfg 2.9 [--png]      # -> runs/eval/d2c-b/samples.npz
                 (a flag per d2c.sampling.SamplerConfig field: --stage1-top-k, --uncond-refresh, ...)
    d2c-evaluate --npz runs/eval/d2c-b/samples.npz --inception weights-inception-2015-12-05-6726825d.pth \
                 --reference VIRTUAL_imagenet256_labeled.npz          # -> runs/eval/d2c-b/metrics.json
(also `python -m d2c.commands sample|evaluate ...`).  A model is a run folder of ours (its
config.json names the preset; EMA weights) or a public file loaded into `--<model>-preset`.
The family is what is given: --gpt + --mar (D2C), --mar (MAR), --gpt + --vq (LlamaGen).
User errors: one line, exit 2 (d2c.cli).  Training one stage is the harness cell
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
                                 "(every rank of the job samples its batches; a rerun fills in the missing ones).")
    for kind in ("gpt", "mar", "kl", "vq"):
        ap.add_argument(f"--{kind}", help=f"{kind}: a run folder or a public file")
        ap.add_argument(f"--{kind}-preset", default=None, help=f"preset of a {kind} file (default {PRESET_DEFAULTS[kind]})")
    ap.add_argument("--fusion", default=None, help="load a MAR file as D2C with this fusion (zero-init)")
    ap.add_argument("--out", required=True, help="folder for batches/, samples.npz, speed.json (png/)")
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
    with exit_on_user_error():
        _sample(args)


def _sample(args):
    from d2c.distributed import init_distributed
    from d2c.evaluation import EvalError, sample_to_npz
    from d2c.sampling import sampler_from_args
    if not (args.mar or (args.gpt and args.vq)):
        raise EvalError("give --mar (MAR; + --gpt: D2C) or --gpt with --vq (LlamaGen)")
    if args.mar and not args.kl:
        raise EvalError("--mar needs --kl (the KL tokenizer decodes its latents)")
    device = _device(args.device)
    init_distributed(device)
    models = {}
    for kind in ("gpt", "mar", "kl", "vq"):
        path = getattr(args, kind)
        if path and not (kind == "vq" and args.mar):
            models[kind] = load_model(kind, path, getattr(args, f"{kind}_preset"), device, args.fusion)
    if "mar" in models and "gpt" in models and getattr(models["mar"], "fusion", None) is None:
        raise EvalError("--gpt with a plain MAR: D2C needs a fused stage 2 (a D2C run folder, or --fusion for a MAR file)")
    num_classes = args.num_classes or (models["gpt"].config.num_classes if "gpt" in models
                                       else models["mar"].config.class_num)
    npz = sample_to_npz(models, args.out, sampler_from_args(args), num_images=args.num_images,
                        num_classes=num_classes, batch_size=args.batch_size, seed=args.seed, png=args.png)
    from d2c.distributed import dist_env
    if dist_env()[0] == 0:
        print(f"wrote {npz} ({args.num_images} images); speed: {Path(args.out) / 'speed.json'}", flush=True)


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
