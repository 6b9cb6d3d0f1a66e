"""Tiny end-to-end sample in seconds: `python -m d2c.demo` (or `d2c-demo`; `make demo`).

Builds the tiny presets with random weights, samples a batch through each family
(LlamaGen, MAR, D2C-qformer), and writes one PNG grid per family.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import d2c
from d2c.sampling import SamplerConfig, d2c_sample, save_grid


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/demo", help="folder for the grids")
    ap.add_argument("--num-images", type=int, default=16)
    ap.add_argument("--steps", type=int, default=16, help="MAR iterations")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from d2c.cli import exit_on_user_error
    with exit_on_user_error():   # user errors: one line on stderr, exit 2
        if args.num_images < 1:
            raise ValueError(f"--num-images={args.num_images}; allowed: integers >= 1")
        _run(args, SamplerConfig(steps=args.steps))


def _run(args, sampler: SamplerConfig):
    torch.manual_seed(args.seed)
    gpt, vq, kl = d2c.build("gpt_tiny").eval(), d2c.build("vq_tiny").eval(), d2c.build("kl_tiny").eval()
    mar = d2c.build("mar_tiny").eval()
    d2c_qf = d2c.build("mar_tiny", fusion="qformer").eval()
    labels = torch.arange(args.num_images) % gpt.config.num_classes
    runs = {"llamagen": dict(gpt=gpt, vq=vq), "mar": dict(mar=mar, kl=kl),
            "d2c_qformer": dict(gpt=gpt, mar=d2c_qf, kl=kl)}
    out = Path(args.out)
    for name, models in runs.items():
        res = d2c_sample(labels, models, sampler, seed=args.seed)
        path = save_grid(res.images, out / f"{name}.png")
        t = res.timings
        print(f"{name:12s} {len(labels) / t['total']:7.1f} img/s  "
              f"stage1 {t.get('stage1', 0):.2f}s stage2 {t.get('stage2', 0):.2f}s decode {t['decode']:.2f}s  "
              f"nfe {res.nfe}  -> {path}")
    print(f"wrote sample grids to {out.resolve()} (random weights: noise; `make run` trains real models)")


if __name__ == "__main__":
    main()
