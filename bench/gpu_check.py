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

This file is the command: the section lists and the JSON.  The sections live in
gpu_kernel_checks.py and gpu_model_checks.py; what they record into, in gpu_record.py.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "core"))

import torch  # noqa: E402

from gpu_kernel_checks import (attention_correctness, attention_timing, head_correctness, head_timing,  # noqa: E402
                               sampler_impls, sm90_compile)
from gpu_model_checks import (end_to_end, gpt_decode_graph, models_through_triton, public_mar_ratio,  # noqa: E402
                              training_step)
from gpu_record import RESULTS, cuda_time  # noqa: E402


def _matmul_peak():
    """bf16 8192^3 matmul TFLOP/s here: the peak the floor ratios use."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = cuda_time(lambda: a @ a, reps=20, warmup=3)
    return 2 * 8192 ** 3 / (ms / 1e3) / 1e12


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
