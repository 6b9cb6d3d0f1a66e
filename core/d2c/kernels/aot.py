"""Ahead-of-time compilation of recorded kernel launches for an NVIDIA GPU, on any machine.

`compile_for_gpu(launches, arch=90)` lowers each launch recorded by `d2c.kernels.record_launches`
to PTX and a cubin for compute capability `arch` (90: Hopper, the H100/H200) with Triton's own
compiler, and reads registers and spills from its bundled ptxas.  It runs in a child process
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

_PTR = {"torch.float32": "*fp32", "torch.bfloat16": "*bf16", "torch.float16": "*fp16", "torch.float64": "*fp64",
        "torch.uint8": "*u8", "torch.int8": "*i8", "torch.int32": "*i32", "torch.int64": "*i64",
        "torch.bool": "*i1"}


def _arg_type(v) -> str:
    import torch
    if isinstance(v, torch.Tensor):
        return _PTR[str(v.dtype)]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -2**31 <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"cannot type kernel argument {v!r}")


def describe(rec) -> dict:
    """A recorded Launch as JSON: where its kernel lives, its signature and constants."""
    fn = rec.fn
    return {"module": fn.__module__, "file": os.path.abspath(sys.modules[fn.__module__].__file__), "kernel": rec.name,
            "signature": {n: _arg_type(v) for n, v in rec.args.items()},
            "constexprs": dict(rec.constexprs), "options": dict(rec.options)}


def compile_for_gpu(launches, arch: int = 90, timeout: float = 600) -> list[dict]:
    """For each recorded launch (each autotune config of it), {kernel, constexprs, options, ok,
    error, registers, spill_bytes, shared_bytes}; distinct launches are compiled once."""
    jobs, seen = [], set()
    for rec in launches:
        d = describe(rec)
        key = json.dumps(d, sort_keys=True)
        if key not in seen:
            seen.add(key)
            jobs.append(d)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "d2c.kernels.aot", str(arch)], input=json.dumps(jobs),
                         capture_output=True, text=True, env=env, timeout=timeout)
    if res.returncode:
        raise RuntimeError(f"d2c.kernels.aot child failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


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
        kernel = _load_kernel(job)
        fn = kernel
        while not isinstance(fn, triton.runtime.jit.JITFunction):
            fn = fn.fn                                          # an Autotuner wraps the JITFunction
        for cfg in getattr(kernel, "configs", None) or [None]:
            consts, opts = dict(job["constexprs"]), dict(job["options"])
            if cfg is not None:
                consts.update(cfg.kwargs)
                opts.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            sig = {n: ("constexpr" if n in consts else job["signature"][n]) for n in fn.arg_names}
            row = {"kernel": job["kernel"], "signature": job["signature"], "constexprs": consts, "options": opts}
            try:
                src = ASTSource(fn=fn, signature=sig,
                                constexprs={(fn.arg_names.index(n),): v for n, v in consts.items()})
                k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
                row.update(ok=True, error=None, **ptxas_usage(k, arch))
            except Exception as e:   # the parent asserts on `ok` and shows the error
                row.update(ok=False, error=f"{type(e).__name__}: {str(e)[-1500:]}")
            out.append(row)
    return out


if __name__ == "__main__":
    print(json.dumps(_child(int(sys.argv[1]) if len(sys.argv) > 1 else 90, json.load(sys.stdin))))
