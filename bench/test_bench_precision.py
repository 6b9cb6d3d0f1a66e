"""bf16 vs fp32 for sampling: where bf16 autocast pays on this device (the rule behind
d2c.precision.BF16_MIN_WIDTH), and the MAR-B sampler at the configuration of the reference
speed check (random weights, batch 4, 8 MAR iterations, 25 diffusion steps, cfg 2.9 linear).

A Linear of width W on 512 rows (a MAR round's tokens x CFG) under bf16 autocast pays the
weight cast every call, as sampling does; the ratios fp32 / bf16 are in the JSON's d2c_bars.
Measured (Xeon with AMX, 2 threads, medians): Linear fp32 / bf16 = 2.08 / 2.52 / 3.49 / 4.21 /
4.63 at width 128 / 256 / 512 / 768 / 1024; MAR-B sampler 32.7 s fp32, 11.8 s bf16 = 2.77x.
"""
import functools

import pytest
import torch

import d2c
from d2c.sampling import SamplerConfig
from conftest import key

WIDTHS = (128, 256, 512, 768, 1024)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("width", WIDTHS)
def test_linear_cpu(benchmark, width, dtype):
    benchmark.group = f"linear w{width} rows 512 cpu"
    key(benchmark, f"prec/linear/{dtype}-w{width}", device="cpu")
    torch.manual_seed(0)
    lin = torch.nn.Linear(width, 4 * width).eval()
    x = torch.randn(512, width)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bf16" else torch.no_grad
    with torch.inference_mode():
        def run():
            with ctx():
                lin(x)
        run()
        benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)


@functools.lru_cache(maxsize=None)
def _mar_b():
    torch.manual_seed(0)
    m = d2c.build("mar_base").eval()
    with torch.no_grad():           # zero-init outputs would make the sampler degenerate; speed only
        for p in m.diffloss.parameters():
            p.normal_(0, 0.02)
    return m


# dtype, and uncond_refresh (the condition cache, also a sampling-speed lever at this size)
MAR_B_VARIANTS = {"fp32": ("fp32", None), "bf16": ("bf16", None), "fp32-uncond2": ("fp32", 2),
                  "bf16-uncond2": ("bf16", 2)}


@pytest.mark.parametrize("variant", list(MAR_B_VARIANTS))
def test_mar_b_sampler_cpu(benchmark, variant):
    benchmark.group = "MAR-B sampler b4 8 it 25 diff cfg 2.9"
    dtype, uncond_refresh = MAR_B_VARIANTS[variant]
    key(benchmark, f"prec/mar-b/{variant}", images=4, device="cpu", mar_steps=8, diffusion_steps=25)
    from d2c.precision import autocast_for
    m = _mar_b()
    labels = torch.arange(4)
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32

    def run():
        with autocast_for(dt, "cpu"):
            m.sample_tokens(labels, SamplerConfig(steps=8, cfg=2.9, cfg_schedule="linear", diffusion_steps=25,
                                                  uncond_refresh=uncond_refresh),
                            generator=torch.Generator().manual_seed(0))
    run()
    benchmark.pedantic(run, rounds=2, iterations=1)
