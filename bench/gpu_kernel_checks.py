"""gpu_check sections on the kernels (run by bench/gpu_check.py): the Triton attention against
its float64 reference and against SDPA per dispatch case, the fused head block and trunk, the
DiffLoss sampler paths, and every Triton launch compiled for sm_90 (the one section that needs
no GPU)."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from gpu_record import RESULTS, cuda_time, record_check, record_time, section

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ attention
@section
def attention_correctness():
    from d2c.kernels.attention import attention_reference
    from d2c.kernels.attention_triton import attention_decode_triton, attention_triton
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
    from d2c.kernels.attention import ATTENTION_CASES, attention, attention_case
    from d2c.kernels.attention_triton import attention_decode_triton, attention_triton
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


# ------------------------------------------------------------------ sm_90 compile (no GPU needed)
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
