"""One-call GPU check: correctness against float64 references first, then timings with CUDA
events (medians), into one JSON.  Self-contained (no pytest); sized to end inside 8 minutes on
one H200 (D2C_GPU_CHECK_BUDGET_S, default 450 s, skips the rest once spent and says so).

    python bench/gpu_check.py [out.json]        (default: $OUT/gpu_check.json, else ./gpu_check.json)
    D2C_MAR_REF=<checkout of LTH14/mar>          adds the public MAR sampler's time beside ours

Sections: attention (Triton vs float64 reference, every mask shape the models use, poisoned
outputs; then Triton vs SDPA per dispatch case, printed as the table `auto` should use), fused
head block + trunk (vs float64 module; eager / compiled / Triton / Triton + CUDA graph), the
DiffLoss sampler paths (eager, fused, graph, compiled: same seed, same tokens), stage 1's CUDA
graph decode (same codes as eager), MAR-B through Triton, end to end (LlamaGen GPT-B, MAR-B 64
and 16, D2C-B-16 at batch 64 and 256, eager and compiled, bf16: ms per image, TFLOP/s and time
over the arithmetic floor of d2c.flops at the measured bf16 matmul peak, compile time apart),
the public MAR sampler ratio, and a training step (MAR-B + cross-attention, GPT-B, batch 64,
bf16: img/s, MFU, peak memory).  Without CUDA it runs what needs none (every Triton launch
compiled for sm_90) and lists the sections it skipped.  Every section is guarded: a failure is
recorded, the rest runs.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "core"))

import torch  # noqa: E402

RESULTS: dict = {"checks": [], "timings": [], "errors": [], "skipped": []}


def record_check(name, err, tol, ok=None):
    ok = bool(err <= tol) if ok is None else ok
    RESULTS["checks"].append({"name": name, "max_err": float(err), "tol": tol, "ok": ok})
    print(f"  [{'ok' if ok else 'FAIL'}] {name:60s} err {err:.3e} (tol {tol:.1e})", flush=True)


def cuda_time(fn, reps=50, warmup=5):
    """Median milliseconds of fn() over reps, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def record_time(name, ms, **info):
    RESULTS["timings"].append({"name": name, "median_ms": ms, **info})
    print(f"  {name:64s} {ms:9.4f} ms", flush=True)


def section(fn):
    @functools.wraps(fn)
    def run():
        print(f"\n== {fn.__name__}", flush=True)
        try:
            fn()
        except Exception as e:  # keep going: one broken section must not hide the others
            RESULTS["errors"].append({"section": fn.__name__, "error": repr(e), "trace": traceback.format_exc()})
            print(f"  ERROR in {fn.__name__}: {e!r}", flush=True)
            traceback.print_exc()
    return run


# ------------------------------------------------------------------ attention
@section
def attention_correctness():
    from d2c.kernels.attention import attention_decode_triton, attention_reference, attention_triton
    dev = "cuda"
    g = torch.Generator(dev).manual_seed(0)

    def rnd(b, h, lq, lk, d):
        return [torch.randn(b, h, n, d, device=dev, dtype=torch.float64, generator=g) for n in (lq, lk, lk)]

    def check(name, q, k, v, dtype, tol, causal=False, kpm=None, kv_dtype=None, fn=attention_triton, **kw):
        qd, kd, vd = q.to(dtype), k.to(kv_dtype or dtype), v.to(kv_dtype or dtype)
        out = torch.full(qd.shape, float("nan"), device=dev, dtype=dtype)
        fn(qd, kd, vd, causal=causal, key_padding_mask=kpm, out=out, **kw)
        # the kernels compute in q's dtype: the reference gets k and v rounded to it
        ref = attention_reference(qd.double(), kd.to(dtype).double(), vd.to(dtype).double(),
                                  causal=causal, key_padding_mask=kpm)
        err = (out.double() - ref).abs().max().item()
        if out.isnan().any():
            err = float("inf")
        record_check(name, err, tol)

    def tiny_counts(b, lk):
        """Rows keeping 1, 2, 3 keys (prefixes), only the last key, none, a random half, all."""
        m = torch.zeros(b, lk, dtype=torch.bool, device=dev)
        m[0, :1], m[1, :2], m[2, :3], m[3, -1] = True, True, True, True
        m[5] = torch.rand(lk, device=dev, generator=g) < 0.5
        m[6:] = True
        return m

    cases = [(320, 320, False, False), (320, 320, False, True), (320, 256, False, False),
             (257, 257, True, False), (1, 257, True, False), (16, 257, True, False),
             (77, 77, False, True), (9, 4, True, False)]
    for dtype, tol in [(torch.float32, 2e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)]:
        dn = str(dtype)[6:]
        for d in (64, 80) if dtype != torch.float16 else (64,):   # fp16 runs bf16's code; a case compiles every tile
            for lq, lk, causal, ragged in cases:
                b, h = 3, 4
                q, k, v = rnd(b, h, lq, lk, d)
                kpm = None
                if ragged:
                    keep = torch.randint(1, lk + 1, (b,), device=dev, generator=g)
                    kpm = torch.arange(lk, device=dev)[None] < keep[:, None]
                check(f"attn {dn} d{d} q{lq} k{lk} causal={causal} ragged={ragged}", q, k, v, dtype, tol, causal, kpm)
            # key blocks past a row's last kept key are skipped: rows keeping 1-3 keys, none, a non-prefix half
            for lq, lk, causal in [(300, 300, False), (257, 257, True)]:
                q, k, v = rnd(8, 4, lq, lk, d)
                check(f"attn {dn} d{d} q{lq} k{lk} causal={causal} tiny-count rows", q, k, v, dtype, tol, causal,
                      tiny_counts(8, lk))
            # split-K decode: one query against a long cache, forced and automatic split counts
            for lq, lk in [(1, 2048), (1, 4096)]:
                for splits in (None, 1, 16):
                    q, k, v = rnd(2, 4, lq, lk, d)
                    check(f"attn decode {dn} d{d} q{lq} k{lk} causal splits={splits or 'auto'}", q, k, v, dtype, tol,
                          True, fn=attention_decode_triton, num_splits=splits)
                q, k, v = rnd(8, 4, lq, lk, d)
                check(f"attn decode {dn} d{d} q{lq} k{lk} causal tiny-count rows splits=8", q, k, v, dtype, tol, True,
                      tiny_counts(8, lk), fn=attention_decode_triton, num_splits=8)
    for d in (64, 80):                      # autocast's mix: bf16 queries, fp32 keys and values
        for lq, lk, causal in [(320, 320, False), (1, 2048, True)]:
            q, k, v = rnd(3, 4, lq, lk, d)
            check(f"attn bf16 q / fp32 k,v d{d} q{lq} k{lk} causal={causal}", q, k, v, torch.bfloat16, 3e-2, causal,
                  kv_dtype=torch.float32)


@section
def attention_timing():
    """Triton vs SDPA per shape (bf16, 12 heads, head dim 64), then the table `auto` should use:
    per attention case, Triton only where it is faster on every timed shape of that case."""
    import datetime
    import subprocess
    import triton
    from d2c.kernels.attention import (ATTENTION_CASES, attention, attention_case, attention_decode_triton,
                                       attention_triton)
    dev, dt = "cuda", torch.bfloat16
    ratios = {c: {} for c in ATTENTION_CASES}
    for b, lq, lk, causal, ragged, name in [
            (32, 320, 320, False, False, "MAR-B decoder L320"), (32, 320, 320, False, True, "MAR-B encoder ragged"),
            (32, 257, 257, True, False, "GPT-B causal L257"), (32, 1, 257, True, False, "GPT-B decode 1x257"),
            (32, 1, 2048, True, False, "GPT-B decode 1x2048"), (32, 1, 4096, True, False, "GPT-B decode 1x4096"),
            (32, 320, 256, False, False, "fusion cross 320x256"), (8, 1024, 1024, False, False, "L1024"),
            (8, 1024, 1024, False, True, "L1024 ragged"), (4, 4096, 4096, True, False, "L4096 causal")]:
        q = torch.randn(b, 12, lq, 64, device=dev, dtype=dt)
        k = torch.randn(b, 12, lk, 64, device=dev, dtype=dt)
        v = torch.randn(b, 12, lk, 64, device=dev, dtype=dt)
        kpm = None
        if ragged:
            kpm = torch.arange(lk, device=dev)[None] < torch.linspace(lk // 2, lk, b, device=dev).long()[:, None]
        case = attention_case(lq, lk, causal, kpm)
        res = {}
        with torch.inference_mode():
            for be in ("sdpa", "triton", "reference"):
                if be == "reference" and lk > 1024:
                    continue
                res[be] = cuda_time(lambda: attention(q, k, v, causal=causal, key_padding_mask=kpm, backend=be))
                record_time(f"attn {name} bf16 b{b} [{be}]", res[be])
            if case == "decode":            # the split-K kernel by split count, and the forward kernel
                t = cuda_time(lambda: attention_triton(q, k, v, causal=causal, key_padding_mask=kpm, decode=False))
                record_time(f"attn {name} bf16 b{b} [triton forward kernel, no split-K]", t, case=case)
                for s in (1, 2, 4, 8, 16):
                    t = cuda_time(lambda: attention_decode_triton(q, k, v, causal=causal, key_padding_mask=kpm,
                                                                  num_splits=s))
                    record_time(f"attn {name} bf16 b{b} [triton split-K, {s} splits]", t, case=case, splits=s)
        ratios[case][name] = res["triton"] / res["sdpa"]
        RESULTS["timings"].append({"name": f"attn {name}: triton/sdpa", "ratio": ratios[case][name], "case": case})
        print(f"  -> {case}: triton/sdpa = {ratios[case][name]:.2f}x", flush=True)
    table = {c: "triton" if r and max(r.values()) < 1.0 else "sdpa" for c, r in ratios.items()}
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except Exception:
        commit = "?"
    lines = [f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__} / triton {triton.__version__}, "
             f"{datetime.date.today()}, main {commit}; Triton time / SDPA time:"]
    for c in ATTENTION_CASES:
        lines.append(f"#   {c}: " + ", ".join(f"{n} {r:.2f}" for n, r in ratios[c].items()))
    lines.append("ATTENTION_DISPATCH = {" + ", ".join(f'"{c}": "{table[c]}"' for c in ATTENTION_CASES) + "}")
    RESULTS["attention_dispatch"] = {"table": table, "triton_over_sdpa": ratios, "python": "\n".join(lines)}
    print("\n  the table auto should use (core/d2c/kernels/attention.py, ATTENTION_DISPATCH):", flush=True)
    print("\n".join(lines), flush=True)


# ------------------------------------------------------------------ diffusion head
def _head(width, depth, dev, dtype=torch.float64):
    from d2c.models.diffloss import SimpleMLPAdaLN
    torch.manual_seed(0)
    net = SimpleMLPAdaLN(16, width, 32, 768, depth).to(device=dev, dtype=dtype).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02 if p.dim() > 1 else 0.05)
    return net


@section
def head_correctness():
    from d2c.kernels import adaln_mlp
    dev = "cuda"
    net64 = _head(1024, 6, dev)
    for rows in (1, 16, 77, 512):
        x = torch.randn(rows, 16, device=dev, dtype=torch.float64)
        y = torch.randn(rows, 1024, device=dev, dtype=torch.float64)
        ref = net64.forward_y(x, y)
        for dtype, tol in [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)]:
            net = _head(1024, 6, dev, dtype)
            net.load_state_dict(net64.state_dict())
            pk = adaln_mlp.PackedHead(net)
            out = adaln_mlp.head_forward(pk, x.to(dtype), y.to(dtype), "triton")
            err = (out.double() - ref).abs().max().item() / max(1.0, ref.abs().max().item())
            record_check(f"head trunk w1024 d6 rows{rows} {str(dtype)[6:]} (rel)", err, tol)
    # single block with poisoned output
    for dtype, tol in [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)]:
        m, w = 45, 1024
        x = torch.randn(m, w, device=dev, dtype=torch.float64) + 0.5
        mod = torch.randn(m, 3 * w, device=dev, dtype=torch.float64) * 0.5
        sh, sc, ga = mod.chunk(3, 1)
        lw, lb = 1 + 0.1 * torch.randn(w, device=dev, dtype=torch.float64), 0.1 * torch.randn(w, device=dev, dtype=torch.float64)
        w1, w2 = [torch.randn(w, w, device=dev, dtype=torch.float64) / 32 for _ in range(2)]
        b1, b2 = [0.1 * torch.randn(w, device=dev, dtype=torch.float64) for _ in range(2)]
        ref = adaln_mlp.resblock_reference(x, sh, sc, ga, lw, lb, w1, b1, w2, b2)
        c = lambda t: t.to(dtype)  # noqa: E731
        h = adaln_mlp.ln_mod_linear_triton(c(x), c(sh), c(sc), c(lw), c(lb), c(w1), c(b1), silu=True,
                                           out=torch.full((m, w), float("nan"), device=dev, dtype=dtype))
        out = adaln_mlp.linear_gate_residual_triton(h, c(w2), c(b2), c(x), c(ga),
                                                    out=torch.full((m, w), float("nan"), device=dev, dtype=dtype))
        err = (out.double() - ref).abs().max().item() / ref.abs().max().item()
        record_check(f"resblock kernels w1024 {str(dtype)[6:]} poisoned out (rel)", err if not out.isnan().any() else float("inf"), tol)


@section
def head_timing():
    from d2c.kernels import adaln_mlp
    dev = "cuda"
    for dtype in (torch.float32, torch.bfloat16):
        net = _head(1024, 6, dev, dtype)
        pk = adaln_mlp.PackedHead(net)
        comp = torch.compile(adaln_mlp.head_forward, dynamic=False)
        for rows in (8, 16, 64, 256, 1024):
            x = torch.randn(rows, 16, device=dev, dtype=dtype)
            y = torch.randn(rows, 1024, device=dev, dtype=dtype)
            res = {}
            with torch.inference_mode():
                fns = {"eager": lambda: net.forward_y(x, y),
                       "fused-torch": lambda: adaln_mlp.head_forward(pk, x, y, "torch"),
                       "compiled": lambda: comp(pk, x, y, "torch"),
                       "fused-triton": lambda: adaln_mlp.head_forward(pk, x, y, "triton")}
                for name, fn in fns.items():
                    res[name] = cuda_time(fn)
                    record_time(f"head w1024 d6 {str(dtype)[6:]} rows{rows} [{name}]", res[name])
                # the whole trunk as one CUDA graph: what the sampler replays
                g = torch.cuda.CUDAGraph()
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    adaln_mlp.head_forward(pk, x, y, "triton")
                torch.cuda.current_stream().wait_stream(s)
                with torch.cuda.graph(g):
                    adaln_mlp.head_forward(pk, x, y, "triton")
                res["triton+graph"] = cuda_time(g.replay)
                record_time(f"head w1024 d6 {str(dtype)[6:]} rows{rows} [triton+graph]", res["triton+graph"])
            for k in ("fused-triton", "triton+graph", "compiled"):
                RESULTS["timings"].append({"name": f"head rows{rows} {str(dtype)[6:]}: eager/{k}", "ratio": res["eager"] / res[k]})
            print(f"  -> eager/triton {res['eager'] / res['fused-triton']:.2f}x, eager/(triton+graph) "
                  f"{res['eager'] / res['triton+graph']:.2f}x, eager/compiled {res['eager'] / res['compiled']:.2f}x", flush=True)


@section
def sampler_impls():
    from d2c.models.diffloss import DiffLoss
    dev = "cuda"
    torch.manual_seed(0)
    dl = DiffLoss(16, 768, depth=6, width=1024, diffusion_steps=100).to(dev).eval()
    with torch.no_grad():
        for p in dl.parameters():
            p.normal_(0, 0.02 if p.dim() > 1 else 0.05)
        dl.net.final_layer.linear.weight.mul_(0.1)
    for n in (4, 13, 64):
        z = torch.randn(2 * n, 768, device=dev)
        with torch.inference_mode():
            outs, times = {}, {}
            for impl in ("eager", "fused", "graph", "compiled"):
                dl.sample(z, 1.0, 2.9, generator=torch.Generator(dev).manual_seed(1), impl=impl)  # warm/capture
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                outs[impl] = dl.sample(z, 1.0, 2.9, generator=torch.Generator(dev).manual_seed(1), impl=impl)
                torch.cuda.synchronize()
                times[impl] = (time.perf_counter() - t0) * 1e3
                record_time(f"DiffLoss.sample 100 steps, {n} tokens x2 cfg [{impl}]", times[impl])
            scale = max(1.0, outs["eager"].abs().max().item())
            for impl in ("fused", "graph", "compiled"):
                err = (outs[impl] - outs["eager"]).abs().max().item() / scale
                record_check(f"sampler {impl} vs eager, {n} tokens (rel, same seed)", err, 1e-3)
            RESULTS["timings"].append({"name": f"sampler {n} tokens: eager/graph", "ratio": times["eager"] / times["graph"]})


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
    torch.manual_seed(0)
    gpt = d2c.build("gpt_b").cuda().eval()
    _randomize(gpt)
    labels = torch.arange(8, device="cuda")
    for kw in (dict(cfg=2.0, top_k=1000, top_p=0.95), dict(cfg=1.0)):
        for dt in (torch.float32, torch.bfloat16):
            with torch.autocast("cuda", dtype=dt, enabled=dt != torch.float32):
                ref, _ = gpt_generate(gpt, labels, generator=torch.Generator("cuda").manual_seed(3), **kw)
                out, _ = gpt_generate(gpt, labels, generator=torch.Generator("cuda").manual_seed(3), compile=True, **kw)
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
    from d2c.sampling import d2c_sample
    models = _family_models()
    peak = RESULTS.get("peak_tflops") or 807.0
    for name, fam, steps in E2E:
        parts = ({"gpt": models["gpt"], "vq": models["vq"]} if fam == "llamagen" else
                 {"mar": models[fam], "kl": models["kl"], **({"gpt": models["gpt"]} if fam == "d2c" else {})})
        flops = sampling_flops(**parts, steps=steps or 16, cfg=2.9)["total"]
        for batch in (64, 256):
            for compile_ in (False, True):
                if compile_ and batch != 256 or _over_budget(f"e2e {name} b{batch} compile={compile_}"):
                    continue
                labels = torch.arange(batch, device="cuda") % 1000
                kw = dict(cfg=2.9, steps=steps or 16, precision="bf16", compile=compile_, **parts)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                d2c_sample(labels if compile_ else labels[:8], seed=0, **kw)      # warm-up / compile + capture
                torch.cuda.synchronize()
                first = time.perf_counter() - t0
                torch.cuda.reset_peak_memory_stats()
                res = d2c_sample(labels, seed=1, **kw)
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
    return mar.sample_tokens(labels, steps=64, cfg=2.9, generator=torch.Generator("cuda").manual_seed(0),
                             compile=compile_)


@section
def training_step():
    """One optimizer step of MAR-B + cross-attention and of GPT-B at batch 64 in bf16: img/s after
    warm-up, MFU (FLOPs of a step counted by torch.utils.flop_counter), peak memory."""
    import d2c
    from torch.utils.flop_counter import FlopCounterMode
    peak = RESULTS.get("peak_tflops") or 807.0
    b = 64
    for name in ("mar_base+cross_attn", "gpt_b"):
        if _over_budget(f"training {name}"):
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


BUDGET_S = float(os.environ.get("D2C_GPU_CHECK_BUDGET_S", 450))   # the check must end inside 8 minutes
_T0 = time.time()


def _over_budget(what: str) -> bool:
    if time.time() - _T0 > BUDGET_S:
        RESULTS["skipped"].append(f"{what}: time budget of {BUDGET_S:.0f} s spent")
        print(f"  skipped {what}: time budget spent", flush=True)
        return True
    return False


def _matmul_peak():
    """bf16 8192^3 matmul TFLOP/s here: the peak the floor ratios use."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = cuda_time(lambda: a @ a, reps=20, warmup=3)
    return 2 * 8192 ** 3 / (ms / 1e3) / 1e12


@section
def sm90_compile():
    """Every Triton launch the CUDA path makes, recorded on this machine and compiled for Hopper
    (sm_90) by Triton with no GPU (d2c.kernels.aot): head trunk fp32 / bf16, attention cases."""
    from d2c.kernels import record_launches
    from d2c.kernels.adaln_mlp import PackedHead, head_forward
    from d2c.kernels.aot import compile_for_gpu
    from d2c.kernels.attention import attention
    recs = []
    net = _head(1024, 6, "cpu", torch.float32)
    pk = PackedHead(net)
    for dt in (None, torch.bfloat16):
        for rows in (16, 40, 512):
            x, y = torch.randn(rows, 16), torch.randn(rows, 1024)
            ctx = torch.autocast("cpu", dtype=dt) if dt else torch.autocast("cpu", enabled=False)
            with record_launches() as rec, ctx, torch.inference_mode():
                head_forward(pk, x, y, "triton")
            recs += rec
    for dt in (torch.float32, torch.bfloat16):
        for lq, lk, causal, padded in ((320, 320, False, False), (320, 320, False, True), (257, 257, True, False),
                                       (1, 257, True, False), (1, 2048, True, False), (320, 256, False, False)):
            q = torch.randn(2, 12, lq, 64, dtype=dt)
            k = torch.randn(2, 12, lk, 64, dtype=dt)
            kpm = (torch.arange(lk)[None] < torch.tensor([[lk], [lk // 3]])) if padded else None
            with record_launches() as rec, torch.inference_mode():
                attention(q, k, k, causal=causal, key_padding_mask=kpm, backend="triton")
            recs += rec
    for row in compile_for_gpu(recs, arch=90):
        name = f"sm_90 {row['kernel']} {row['signature'].get('X', row['signature'].get('Q', ''))} " + \
            " ".join(f"{k}={v}" for k, v in row["constexprs"].items() if k.startswith("BLOCK")) + \
            " " + " ".join(f"{k}={v}" for k, v in row["options"].items())
        ok = row["ok"] and row["spill_bytes"] == 0
        record_check(name + (f" regs {row['registers']} smem {row['shared_bytes']}" if row["ok"] else ""),
                     0.0 if ok else 1.0, 0.0, ok=ok)
        if not row["ok"]:
            print(f"    {row['error'][:300]}", flush=True)


GPU_SECTIONS = (attention_correctness, head_correctness, models_through_triton, sampler_impls, gpt_decode_graph,
                end_to_end, training_step, public_mar_ratio, attention_timing, head_timing)
CPU_SECTIONS = (sm90_compile,)


def main():
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(os.environ.get("OUT", ".")) / "gpu_check.json"
    cuda = torch.cuda.is_available()
    try:
        from d2c.metrics import hardware_info
        RESULTS["hardware"] = hardware_info()
    except Exception as e:  # metrics pulls optional deps; the check must not depend on them
        RESULTS["hardware"] = {"torch": torch.__version__, "error": repr(e)}
    t0 = time.time()
    if cuda:
        print(f"gpu_check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
        # head_timing compiles five row counts x two dtypes of one function: past dynamo's limit of 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        RESULTS["peak_tflops"] = _matmul_peak()
        print(f"bf16 matmul 8192^3: {RESULTS['peak_tflops']:.0f} TFLOP/s (the floor's peak)", flush=True)
        sections = GPU_SECTIONS
    else:
        print("gpu_check: no CUDA device visible; running the sections that need none and skipping the rest:",
              flush=True)
        for fn in GPU_SECTIONS:
            RESULTS["skipped"].append(f"{fn.__name__}: needs CUDA")
            print(f"  skipped {fn.__name__}: needs CUDA", flush=True)
        sections = CPU_SECTIONS
    for fn in sections:
        fn()
    RESULTS["wall_s"] = time.time() - t0
    fails = [c["name"] for c in RESULTS["checks"] if not c["ok"]]
    RESULTS["ok"] = not fails and not RESULTS["errors"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(RESULTS, indent=1, default=str))
    print(f"\n{len(RESULTS['checks'])} checks, {len(fails)} failed, {len(RESULTS['errors'])} section errors, "
          f"{len(RESULTS['skipped'])} skipped; {RESULTS['wall_s']:.0f} s; wrote {path}", flush=True)
    for f in fails:
        print(f"  FAILED: {f}")
    return 0 if RESULTS["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
