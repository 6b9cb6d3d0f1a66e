"""Ahead-of-time compilation of recorded kernel launches for an NVIDIA GPU, on any machine.

`compile_for_gpu(launches, arch=90)` lowers each launch recorded by `d2c.kernels.record_launches`
to PTX and a cubin for compute capability `arch` (90: Hopper, the H100/H200) with Triton's own
compiler, specialised as Triton's JIT would launch it there, and reads registers and spills from
its bundled ptxas.  It runs in child processes
with TRITON_INTERPRET unset: under the interpreter's flag Triton's standard-library functions
(tl.sum, tl.sigmoid, ...) are interpreter objects that its code generator cannot inline.

    python -m d2c.kernels.aot < launches.json      (the child; one JSON result per launch)
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

_PTR = {"torch.float32": "*fp32", "torch.bfloat16": "*bf16", "torch.float16": "*fp16", "torch.float64": "*fp64",
        "torch.uint8": "*u8", "torch.int8": "*i8", "torch.int32": "*i32", "torch.int64": "*i64",
        "torch.bool": "*i1"}


def _arg_type(v) -> str:
    if isinstance(v, torch.Tensor):
        return _PTR[str(v.dtype)]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -2**31 <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"cannot type kernel argument {v!r}")


def _expand(rec) -> list:
    """An autotuned launch as one launch of its kernel per config its early_config_prune keeps
    for these arguments, as Autotuner.run launches them; a plain launch as itself."""
    from d2c.kernels import Launch
    if not hasattr(rec.kernel, "configs"):
        return [rec]
    prune = getattr(rec.kernel, "early_config_prune", None)
    configs = prune(rec.kernel.configs, rec.args, **rec.constexprs) if prune else rec.kernel.configs
    return [Launch(rec.kernel.fn, rec.args, {**rec.constexprs, **c.kwargs},
                   {**rec.options, "num_warps": c.num_warps, "num_stages": c.num_stages}) for c in configs]


def describe(rec) -> dict:
    """A plain recorded launch as JSON, specialised as Triton's JIT specialises it at launch on a
    GPU: an int equal to 1 becomes a constexpr, tensors (CUDA allocations are 16-byte aligned) and
    ints divisible by 16 are marked tt.divisibility 16.  Without that, loads are unaligned and not
    pipelined, so registers, spills and shared memory are not what the GPU's compile gives."""
    fn = rec.fn
    mod = sys.modules[fn.__module__]
    # the module's name for the launched object
    name = next((k for k, v in vars(mod).items() if v is rec.kernel), rec.name)
    consts, sig, div16 = dict(rec.constexprs), {}, []
    for n, v in rec.args.items():
        is_int = isinstance(v, int) and not isinstance(v, bool)
        if is_int and v == 1:
            consts[n] = 1
            continue
        sig[n] = _arg_type(v)
        if isinstance(v, torch.Tensor) or (is_int and v % 16 == 0):
            div16.append(n)
    return {"module": fn.__module__, "file": os.path.abspath(mod.__file__), "kernel": name, "signature": sig,
            "constexprs": consts, "options": dict(rec.options), "div16": div16}


def compile_for_gpu(launches, arch: int = 90, procs: int | None = None, timeout: float = 900) -> list[dict]:
    """For each recorded launch (each autotune config of it), {kernel, signature, constexprs,
    options, ok, error, registers, spill_bytes, shared_bytes}; distinct launches are compiled
    once, spread over `procs` child processes (default: the cores)."""
    jobs = list({json.dumps(d, sort_keys=True): d for r in launches for d in map(describe, _expand(r))}.values())
    procs = max(1, min(procs or os.cpu_count() or 1, len(jobs)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    kids = [(subprocess.Popen([sys.executable, "-m", "d2c.kernels.aot", str(arch)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env), jobs[i::procs])
            for i in range(procs)]
    rows = []
    for p, part in kids:
        out, err = p.communicate(json.dumps(part), timeout=timeout)
        if p.returncode:
            raise RuntimeError(f"d2c.kernels.aot child failed ({p.returncode}): {err.strip()[-2000:]}")
        rows += json.loads(out.strip().splitlines()[-1])
    return rows


# ------------------------------------------------------------------------------ the child
def _load_kernel(job):
    if job["module"].startswith("d2c."):
        mod = importlib.import_module(job["module"])
    else:                                       # a kernel defined in a test or a script
        spec = importlib.util.spec_from_file_location(f"_aot_{abs(hash(job['file']))}", job["file"])
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return getattr(mod, job["kernel"])


def ptxas_usage(kernel, arch: int) -> dict:
    """Registers and spill bytes of a compiled kernel, from Triton's bundled ptxas (-v)."""
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(kernel.asm["ptx"])
        sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        out = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={sm}", src, "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True, check=True)
    txt = out.stderr + out.stdout
    regs = re.search(r"Used (\d+) registers", txt)
    spill = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", txt)]
    return {"registers": int(regs.group(1)) if regs else None, "spill_bytes": sum(spill),
            "shared_bytes": kernel.metadata.shared}


def _child(arch: int, jobs: list[dict]) -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    out = []
    for job in jobs:
        fn = _load_kernel(job)
        while not isinstance(fn, triton.runtime.jit.JITFunction):
            fn = fn.fn
        consts = job["constexprs"]
        sig = {n: ("constexpr" if n in consts else job["signature"][n]) for n in fn.arg_names}
        row = {k: job[k] for k in ("kernel", "signature", "constexprs", "options")}
        try:
            idx = fn.arg_names.index
            src = ASTSource(fn=fn, signature=sig, constexprs={(idx(n),): v for n, v in consts.items()},
                            attrs={(idx(n),): [["tt.divisibility", 16]] for n in job["div16"]})
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=job["options"])
            row.update(ok=True, error=None, **ptxas_usage(k, arch))
        except Exception as e:   # the parent asserts on `ok` and shows the error
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[-1500:]}")
        out.append(row)
    return out


if __name__ == "__main__":
    print(json.dumps(_child(int(sys.argv[1]) if len(sys.argv) > 1 else 90, json.load(sys.stdin))))
