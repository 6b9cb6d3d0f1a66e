"""One-call GPU check of the kernels: correctness against float64 references, then
timings with CUDA events (medians).  Self-contained (no pytest); exits 0 with a message when
there is no CUDA.

    python bench/gpu_check.py [out.json]        (default: $OUT/gpu_check.json, else ./gpu_check.json)

Sections: attention (fp32 / bf16 vs float64 reference, every mask shape the models use, poisoned
outputs; then Triton vs SDPA timings), fused head block + whole head trunk (vs float64 module;
timings eager / compiled / Triton at MAR-B width), the DiffLoss sampler (eager vs fused vs CUDA
graph: same seed -> same tokens; timing of one 100-step call), and one MAR-B-sized
attention-through-model check.  Every section is guarded: a failure is recorded, the rest runs.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "core"))

import torch  # noqa: E402

RESULTS: dict = {"checks": [], "timings": [], "errors": []}


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
    from d2c.kernels.attention import attention_reference, attention_triton
    dev = "cuda"
    g = torch.Generator(dev).manual_seed(0)
    cases = [(320, 320, False, False), (320, 320, False, True), (320, 256, False, False),
             (257, 257, True, False), (1, 257, True, False), (16, 257, True, False),
             (77, 77, False, True), (9, 4, True, False)]
    for dtype, tol in [(torch.float32, 2e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)]:
        for d in (64, 80):
            for lq, lk, causal, ragged in cases:
                b, h = 3, 4
                q = torch.randn(b, h, lq, d, device=dev, dtype=torch.float64, generator=g)
                k = torch.randn(b, h, lk, d, device=dev, dtype=torch.float64, generator=g)
                v = torch.randn(b, h, lk, d, device=dev, dtype=torch.float64, generator=g)
                kpm = None
                if ragged:
                    keep = torch.randint(1, lk + 1, (b,), device=dev, generator=g)
                    kpm = torch.arange(lk, device=dev)[None] < keep[:, None]
                out = torch.full((b, h, lq, d), float("nan"), device=dev, dtype=dtype)
                attention_triton(q.to(dtype), k.to(dtype), v.to(dtype), causal=causal, key_padding_mask=kpm, out=out)
                ref = attention_reference(q.to(dtype).double(), k.to(dtype).double(), v.to(dtype).double(),
                                          causal=causal, key_padding_mask=kpm)
                err = (out.double() - ref).abs().max().item()
                if out.isnan().any():
                    err = float("inf")
                record_check(f"attn {str(dtype)[6:]} d{d} q{lq} k{lk} causal={causal} ragged={ragged}", err, tol)


@section
def attention_timing():
    from d2c.kernels.attention import attention
    dev, dt = "cuda", torch.bfloat16
    for b, lq, lk, causal, ragged, name in [
            (32, 320, 320, False, False, "MAR-B decoder L320"), (32, 320, 320, False, True, "MAR-B encoder ragged"),
            (32, 257, 257, True, False, "GPT-B causal L257"), (32, 1, 257, True, False, "GPT-B decode 1x257"),
            (32, 320, 256, False, False, "fusion cross 320x256"), (8, 1024, 1024, False, False, "L1024"),
            (8, 1024, 1024, False, True, "L1024 ragged"), (4, 4096, 4096, True, False, "L4096 causal")]:
        q = torch.randn(b, 12, lq, 64, device=dev, dtype=dt)
        k = torch.randn(b, 12, lk, 64, device=dev, dtype=dt)
        v = torch.randn(b, 12, lk, 64, device=dev, dtype=dt)
        kpm = None
        if ragged:
            kpm = torch.arange(lk, device=dev)[None] < torch.linspace(lk // 2, lk, b, device=dev).long()[:, None]
        res = {}
        with torch.inference_mode():
            for be in ("sdpa", "triton", "reference"):
                if be == "reference" and lk > 1024:
                    continue
                res[be] = cuda_time(lambda: attention(q, k, v, causal=causal, key_padding_mask=kpm, backend=be))
                record_time(f"attn {name} bf16 b{b} [{be}]", res[be])
        RESULTS["timings"].append({"name": f"attn {name}: triton/sdpa", "ratio": res["triton"] / res["sdpa"]})
        print(f"  -> triton/sdpa = {res['triton'] / res['sdpa']:.2f}x", flush=True)


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


def main():
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(os.environ.get("OUT", ".")) / "gpu_check.json"
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; nothing to check (run this on a GPU machine).")
        return 0
    try:
        from d2c.metrics import hardware_info
        RESULTS["hardware"] = hardware_info()
    except Exception as e:  # metrics pulls optional deps; the check must not depend on them
        RESULTS["hardware"] = {"gpu_name": torch.cuda.get_device_name(0), "torch": torch.__version__, "error": repr(e)}
    print(f"gpu_check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    t0 = time.time()
    for fn in (attention_correctness, head_correctness, models_through_triton, sampler_impls,
               attention_timing, head_timing):
        fn()
    RESULTS["wall_s"] = time.time() - t0
    fails = [c["name"] for c in RESULTS["checks"] if not c["ok"]]
    RESULTS["ok"] = not fails and not RESULTS["errors"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(RESULTS, indent=1, default=str))
    print(f"\n{len(RESULTS['checks'])} checks, {len(fails)} failed, {len(RESULTS['errors'])} section errors; "
          f"{RESULTS['wall_s']:.0f} s; wrote {path}", flush=True)
    for f in fails:
        print(f"  FAILED: {f}")
    return 0 if RESULTS["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
