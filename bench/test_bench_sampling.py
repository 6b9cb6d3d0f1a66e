"""Sampler steps and end-to-end sampling: one MAR iteration, one GPT decode step, and images/s
of LlamaGen, MAR and D2C at 16/32/64 MAR steps (tiny presets), plus MAR-64 vs D2C-16 at
MAR-B/GPT-B sizes (batch 1, random weights: speed only).

Base sizes on CPU use D2C_BENCH_BASE_DIFF_STEPS diffusion steps (default 10, not the paper's
100) to keep the CPU suite under 10 minutes; the head's cost is the same for MAR and D2C (every
token is denoised once), so fewer diffusion steps *raise* the D2C/MAR speed ratio: the JSON
records the count.  `--gpu` runs the base sizes on CUDA with 100 steps."""
import functools
import os

import pytest
import torch

import d2c
from conftest import key
from d2c.flops import sampling_flops
from d2c.sampling import SamplerConfig, d2c_sample

BASE_DIFF = int(os.environ.get("D2C_BENCH_BASE_DIFF_STEPS", "10"))
CFG = 2.0


@functools.lru_cache(maxsize=None)
def _models(size: str, device: str):
    torch.manual_seed(0)
    if size == "tiny":
        names = dict(gpt="gpt_tiny", mar="mar_tiny", kl="kl_tiny", vq="vq_tiny")
        fusion_kw = {}
    else:
        names = dict(gpt="gpt_b", mar="mar_base", kl="kl_16", vq="vq_16")
        fusion_kw = {}
    gpt = d2c.build(names["gpt"]).to(device).eval()
    mar = d2c.build(names["mar"]).to(device).eval()
    d2c_mar = d2c.build(names["mar"], fusion="qformer", **fusion_kw).to(device).eval()
    kl = d2c.build(names["kl"]).to(device).eval()
    vq = d2c.build(names["vq"]).to(device).eval()
    with torch.no_grad():   # zero-init outputs would make the samplers degenerate; speed only
        for m in (gpt, mar.diffloss, d2c_mar.diffloss):
            for p in m.parameters():
                p.normal_(0, 0.02)
    return dict(gpt=gpt, mar=mar, d2c=d2c_mar, kl=kl, vq=vq)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------ steps
@pytest.mark.parametrize("variant", ["eager", "compiled"])
def test_mar_iteration_tiny(benchmark, variant):
    """One MAR round at batch 8 with CFG: encoder/decoder on 16 of 64 known tokens, then the head
    on the 4 tokens of that round (20 diffusion steps)."""
    benchmark.group = "mar iteration tiny b8"
    key(benchmark, f"mar-iter/{variant}/tiny")
    m = _models("tiny", "cpu")["mar"]
    b, L = 8, m.seq_len
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2 * b, L, m.token_embed_dim, generator=g)
    mask = torch.ones(2 * b, L, dtype=torch.bool)
    mask[:, :16] = False
    labels = torch.arange(2 * b) % 10
    drop = torch.arange(2 * b) >= b
    cond = torch.compile(m.condition, dynamic=True) if variant == "compiled" else m.condition
    impl = "compiled" if variant == "compiled" else "eager"

    def run():
        z = cond(tokens, labels, mask, drop=drop)
        zz = torch.cat([z[:b, 16:20].reshape(-1, z.shape[-1]), z[b:, 16:20].reshape(-1, z.shape[-1])])
        m.diffloss.sample(zz, 1.0, CFG, generator=g, impl=impl)

    with torch.inference_mode():
        run()
        run()
        benchmark.pedantic(run, rounds=10, iterations=1)


@pytest.mark.parametrize("size", ["tiny", "base"])
def test_gpt_decode_step(benchmark, size):
    """One KV-cache decode step, CFG batch 2 x 4, cache half full."""
    benchmark.group = "gpt decode step"
    key(benchmark, f"gpt-step/eager/{size}")
    gpt = _models(size, "cpu")["gpt"]
    b = 8
    n = gpt.config.block_size
    with torch.inference_mode():
        gpt.setup_cache(b, gpt.config.cls_token_num + n)
        gpt.prefill(torch.arange(b) % 10)
        codes = torch.randint(0, gpt.config.vocab_size, (b, n // 2))
        gpt.decode(codes[:, :-1], 1)
        pos = n // 2
        try:
            benchmark.pedantic(lambda: gpt.decode(codes[:, -1:], pos), rounds=20, iterations=1, warmup_rounds=2)
        finally:
            gpt.clear_cache()


# ------------------------------------------------------------------ end to end
def _e2e(benchmark, family, steps, size, batch, device, rounds, diff_steps=None, **sampling):
    ms = _models(size, str(device))
    labels = torch.arange(batch) % (10 if size == "tiny" else 1000)
    sampler = SamplerConfig(cfg=CFG, steps=steps or 16, diffusion_steps=diff_steps, **sampling)
    models = {"llamagen": dict(gpt=ms["gpt"], vq=ms["vq"]), "mar": dict(mar=ms["mar"], kl=ms["kl"])}.get(
        family, dict(gpt=ms["gpt"], mar=ms["d2c"], kl=ms["kl"]))
    # matmul FLOPs of this configuration: conftest turns them into TFLOP/s and the ratio to the floor
    benchmark.extra_info["flops_per_image"] = sampling_flops(models, sampler, batch=batch)["total"]

    def run():
        d2c_sample(labels, models, sampler, seed=0)
        _sync(device)

    if sampler.compile:
        run()                                   # compile outside the timing
    benchmark.pedantic(run, rounds=rounds, iterations=1)


E2E_TINY = [("llamagen", 0), ("mar", 16), ("mar", 32), ("mar", 64), ("d2c", 16), ("d2c", 32), ("d2c", 64)]


@pytest.mark.parametrize("family,steps", E2E_TINY, ids=[f"{f}-{s}" if s else f for f, s in E2E_TINY])
def test_e2e_tiny(benchmark, family, steps):
    benchmark.group = "e2e tiny b8 cfg2"
    name = family if not steps else f"{family}-{steps}"
    key(benchmark, f"e2e/{name}/tiny", images=8, diffusion_steps=20)
    _e2e(benchmark, family, steps or 16, "tiny", 8, "cpu", rounds=3)


# the acceleration axes against their off state (e2e/d2c-16/tiny: ddpm, 20 head steps every round)
ACCEL = {"ddim": dict(head_sampler="ddim"), "disa20to5": dict(diffusion_steps_last=5),
         "uncond2": dict(uncond_refresh=2), "uncond4": dict(uncond_refresh=4)}


@pytest.mark.parametrize("variant", list(ACCEL))
def test_e2e_tiny_d2c16_accelerated(benchmark, variant):
    benchmark.group = "e2e tiny b8 cfg2"
    key(benchmark, f"e2e/d2c-16-{variant}/tiny", images=8, diffusion_steps=20)
    _e2e(benchmark, "d2c", 16, "tiny", 8, "cpu", rounds=3, **ACCEL[variant])


@pytest.mark.slow
def test_e2e_tiny_d2c16_compiled(benchmark):
    benchmark.group = "e2e tiny b8 cfg2"
    key(benchmark, "e2e/d2c-16-compiled/tiny", images=8, diffusion_steps=20)
    _e2e(benchmark, "d2c", 16, "tiny", 8, "cpu", rounds=3, compile=True)


E2E_BASE = [("mar", 64), ("d2c", 16)]


@pytest.mark.parametrize("family,steps", E2E_BASE, ids=[f"{f}-{s}" for f, s in E2E_BASE])
def test_e2e_base_cpu(benchmark, family, steps):
    benchmark.group = f"e2e base b1 cfg2 diffusion {BASE_DIFF}"
    key(benchmark, f"e2e/{family}-{steps}/base", images=1, diffusion_steps=BASE_DIFF)
    _e2e(benchmark, family, steps, "base", 1, "cpu", rounds=1, diff_steps=BASE_DIFF)


E2E_GPU = [("llamagen", 0), ("mar", 16), ("mar", 32), ("mar", 64), ("d2c", 16), ("d2c", 32), ("d2c", 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("family,steps", E2E_GPU, ids=[f"{f}-{s}" if s else f for f, s in E2E_GPU])
def test_e2e_base_gpu(benchmark, family, steps, compile, device):
    benchmark.group = "e2e base gpu b4 cfg2 diffusion 100"
    name = family if not steps else f"{family}-{steps}"
    key(benchmark, f"gpu:e2e/{name}{'-compiled' if compile else ''}/base", images=4, diffusion_steps=100)
    _e2e(benchmark, family, steps or 16, "base", 4, device, rounds=2, diff_steps=100, compile=compile)
