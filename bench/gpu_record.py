"""What every section of bench/gpu_check.py records into: RESULTS (the JSON it writes), check and
timing rows, CUDA-event timing, the guard that keeps one broken section from hiding the rest, and
the time budget (D2C_GPU_CHECK_BUDGET_S)."""
from __future__ import annotations

import functools
import os
import time
import traceback

import torch

RESULTS: dict = {"checks": [], "timings": [], "errors": [], "skipped": []}
BUDGET_S = float(os.environ.get("D2C_GPU_CHECK_BUDGET_S", 450))   # the check must end inside 8 minutes
_T0 = time.time()


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


def over_budget(what: str) -> bool:
    if time.time() - _T0 > BUDGET_S:
        RESULTS["skipped"].append(f"{what}: time budget of {BUDGET_S:.0f} s spent")
        print(f"  skipped {what}: time budget spent", flush=True)
        return True
    return False
