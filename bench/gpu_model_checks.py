"""gpu_check sections on whole models (run by bench/gpu_check.py): MAR-B through the Triton
attention, stage 1's CUDA-graph decode, end to end per family, the public MAR sampler ratio, and
a training step.  Random weights throughout: these measure speed and agreement, not quality."""
from __future__ import annotations

import os
import sys
import time

import torch

from gpu_record import RESULTS, cuda_time, over_budget, record_check, record_time, section


# ------------------------------------------------------------------ MAR-B through Triton
@section
def models_through_triton():
    import d2c
    from d2c.kernels.attention import attention_backend
    torch.manual_seed(0)
    mar = d2c.build("mar_base", fusion="cross_attn").cuda().eval()
    b, L = 4, mar.seq_len
    tokens = torch.randn(b, L, mar.token_embed_dim, device="cuda")
    mask = torch.zeros(b, L, dtype=torch.bool, device="cuda")
    for r, n in enumerate([40, 100, 200, 255]):
        mask[r, torch.randperm(L, device="cuda")[:n]] = True
    labels, codes = torch.arange(b, device="cuda"), torch.randint(0, 16384, (b, L), device="cuda")
    with torch.inference_mode():
        with attention_backend("sdpa"):
            ref = mar.condition(tokens, labels, mask, codes=codes)
        with attention_backend("triton"):
            out = mar.condition(tokens, labels, mask, codes=codes)
    record_check("MAR-B condition: triton vs sdpa (fp32, rel)",
                 ((out - ref).abs().max() / ref.abs().max()).item(), 1e-3)


# ------------------------------------------------------------------ stage 1 decode graph
@section
def gpt_decode_graph():
    """compile=True decodes stage 1 by replaying one CUDA graph a step: the same codes as eager."""
    import d2c
    from d2c.models.generate import gpt_generate
    from d2c.sampling import SamplerConfig
    torch.manual_seed(0)
    gpt = d2c.build("gpt_b").cuda().eval()
    _randomize(gpt)
    labels = torch.arange(8, device="cuda")
    for kw in (dict(cfg=2.0, stage1_top_k=1000, stage1_top_p=0.95), dict(cfg=1.0)):
        for dt in (torch.float32, torch.bfloat16):
            with torch.autocast("cuda", dtype=dt, enabled=dt != torch.float32):
                ref, _ = gpt_generate(gpt, labels, SamplerConfig(**kw), generator=torch.Generator("cuda").manual_seed(3))
                out, _ = gpt_generate(gpt, labels, SamplerConfig(**kw, compile=True),
                                      generator=torch.Generator("cuda").manual_seed(3))
            frac = (out != ref).float().mean().item()
            # bf16 logits can flip a near-tie pick and everything after it: allow a little there
            record_check(f"gpt_b decode graph vs eager {str(dt)[6:]} cfg={kw['cfg']} (fraction of codes differing)",
                         frac, 0.0 if dt == torch.float32 else 0.05)


# ------------------------------------------------------------------ end to end
def _randomize(*mods, std=0.02):
    """Random N(0, std) weights everywhere (zero-init heads would make sampling degenerate)."""
    with torch.no_grad():
        for m in mods:
            for p in m.parameters():
                p.normal_(0, std)


def _family_models():
    import d2c
    torch.manual_seed(0)
    m = {"gpt": d2c.build("gpt_b"), "mar": d2c.build("mar_base"), "d2c": d2c.build("mar_base", fusion="cross_attn"),
         "kl": d2c.build("kl_16"), "vq": d2c.build("vq_16")}
    for k in ("gpt", "mar", "d2c"):
        _randomize(m[k])
    return {k: v.cuda().eval() for k, v in m.items()}


E2E = [  # (name, family, MAR steps): the goals are at batch 256, bf16
    ("LlamaGen GPT-B", "llamagen", None), ("MAR-B-64", "mar", 64), ("MAR-B-16", "mar", 16),
    ("D2C-B-16 cross_attn", "d2c", 16)]


@section
def end_to_end():
    """ms per image of d2c_sample (cfg 2.9, 100 head steps, bf16) at batch 64 and 256, eager and
    compiled (compile time apart), with the FLOP count's achieved TFLOP/s and time over the floor."""
    from d2c.flops import achieved, sampling_flops
    from d2c.sampling import SamplerConfig, d2c_sample
    models = _family_models()
    peak = RESULTS.get("peak_tflops") or 807.0
    for name, fam, steps in E2E:
        parts = ({"gpt": models["gpt"], "vq": models["vq"]} if fam == "llamagen" else
                 {"mar": models[fam], "kl": models["kl"], **({"gpt": models["gpt"]} if fam == "d2c" else {})})
        flops = sampling_flops(parts, SamplerConfig(steps=steps or 16, cfg=2.9))["total"]
        for batch in (64, 256):
            for compile_ in (False, True):
                if compile_ and batch != 256 or over_budget(f"e2e {name} b{batch} compile={compile_}"):
                    continue
                labels = torch.arange(batch, device="cuda") % 1000
                sampler = SamplerConfig(cfg=2.9, steps=steps or 16, precision="bf16", compile=compile_)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                d2c_sample(labels if compile_ else labels[:8], parts, sampler, seed=0)   # warm-up / compile + capture
                torch.cuda.synchronize()
                first = time.perf_counter() - t0
                torch.cuda.reset_peak_memory_stats()
                res = d2c_sample(labels, parts, sampler, seed=1)
                ms = res.timings["total"] * 1e3 / batch
                a = achieved(flops * batch, res.timings["total"], peak)
                info = dict(family=fam, steps=steps, batch=batch, compile=compile_, flops_per_image=flops,
                            tflops=a["tflops"], ratio_to_floor=a["ratio_to_floor"],
                            stages_s={k: v for k, v in res.timings.items()},
                            peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30)
                if compile_:
                    info["compile_seconds"] = max(0.0, first - res.timings["total"])
                record_time(f"e2e {name} b{batch} {'compiled' if compile_ else 'eager'} bf16 [ms/img]", ms, **info)
                print(f"     {a['tflops']:.1f} TFLOP/s, {a['ratio_to_floor']:.2f}x the floor at {peak:.0f}"
                      + (f", compile {info['compile_seconds']:.0f} s" if compile_ else ""), flush=True)


@section
def public_mar_ratio():
    """The public MAR code's sample_tokens (LTH14/mar models/mar.py, its engine's fp16 autocast)
    against ours in bf16, same weights, batch 64, 64 iterations.  Needs a checkout of that
    repository at $D2C_MAR_REF (and timm); skipped otherwise."""
    ref = os.environ.get("D2C_MAR_REF")
    if not ref:
        RESULTS["skipped"].append("public_mar_ratio: D2C_MAR_REF (a checkout of LTH14/mar) not given")
        print("  skipped: set D2C_MAR_REF to a checkout of LTH14/mar", flush=True)
        return
    sys.path.insert(0, ref)
    from models import mar as public  # noqa: E402  (the reference repository's module)

    import d2c
    torch.manual_seed(0)
    ours = d2c.build("mar_base")
    _randomize(ours)
    ours = ours.cuda().eval()
    theirs = public.mar_base(img_size=256, vae_stride=16, patch_size=1, vae_embed_dim=16, mask_ratio_min=0.7,
                             label_drop_prob=0.1, class_num=1000, attn_dropout=0.1, proj_dropout=0.1,
                             buffer_size=64, diffloss_d=6, diffloss_w=1024, num_sampling_steps="100",
                             diffusion_batch_mul=4, grad_checkpointing=False)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    theirs = theirs.cuda().eval()
    labels = torch.arange(64, device="cuda")
    times = {}
    for name, fn in (("public fp16", lambda: theirs.sample_tokens(64, num_iter=64, cfg=2.9, cfg_schedule="linear",
                                                                   labels=labels, temperature=1.0)),
                     ("ours bf16 eager", lambda: _ours_tokens(ours, labels, False)),
                     ("ours bf16 compiled", lambda: _ours_tokens(ours, labels, True))):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16 if name.startswith("public") else torch.bfloat16):
            fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
        times[name] = time.perf_counter() - t0
        record_time(f"MAR-B sample_tokens b64 64it [{name}] [s]", times[name] * 1e3)
    for k in ("ours bf16 eager", "ours bf16 compiled"):
        RESULTS["timings"].append({"name": f"public MAR / {k}", "ratio": times["public fp16"] / times[k]})
        print(f"  -> public / {k} = {times['public fp16'] / times[k]:.2f}x (goal >= 3)", flush=True)


def _ours_tokens(mar, labels, compile_):
    from d2c.sampling import SamplerConfig
    return mar.sample_tokens(labels, SamplerConfig(steps=64, cfg=2.9, compile=compile_),
                             generator=torch.Generator("cuda").manual_seed(0))


@section
def training_step():
    """One optimizer step of MAR-B + cross-attention and of GPT-B at batch 64 in bf16: img/s after
    warm-up, MFU (FLOPs of a step counted by torch.utils.flop_counter), peak memory."""
    import d2c
    from torch.utils.flop_counter import FlopCounterMode
    peak = RESULTS.get("peak_tflops") or 807.0
    b = 64
    for name in ("mar_base+cross_attn", "gpt_b"):
        if over_budget(f"training {name}"):
            continue
        torch.manual_seed(0)
        if name.startswith("mar"):
            model = d2c.build("mar_base", fusion="cross_attn").cuda().train()
            lat = torch.randn(b, 16, 16, 16, device="cuda")
            labels = torch.randint(0, 1000, (b,), device="cuda")
            codes = torch.randint(0, 16384, (b, 256), device="cuda")
            loss_fn = lambda: model(lat, labels, codes)  # noqa: E731
        else:
            model = d2c.build("gpt_b").cuda().train()
            codes = torch.randint(0, 16384, (b, 256), device="cuda")
            labels = torch.randint(0, 1000, (b,), device="cuda")
            loss_fn = lambda: model.loss(codes, labels)  # noqa: E731
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        with FlopCounterMode(display=False) as fc:
            step()
        flops = fc.get_total_flops()
        for _ in range(2):
            step()
        torch.cuda.reset_peak_memory_stats()
        ms = cuda_time(step, reps=10, warmup=0)
        mfu = flops / (ms / 1e3) / (peak * 1e12)
        record_time(f"train step {name} b{b} bf16", ms, img_per_s=b / (ms / 1e3), mfu=mfu, flops_per_step=flops,
                    peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30)
        print(f"     {b / (ms / 1e3):.0f} img/s, MFU {mfu:.1%}, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB",
              flush=True)
        model = opt = None                      # free this model before the next one
        torch.cuda.empty_cache()
