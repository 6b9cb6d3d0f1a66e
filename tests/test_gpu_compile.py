"""Every Triton launch the CUDA path makes compiles for Hopper (sm_90), on this CPU-only machine.

The interpreter runs the kernels on CPU tensors but takes the wrappers' CPU branch (operands
upcast to fp32), so it cannot see a dtype mix that only the GPU branch hands a kernel: that is
how a bf16 x fp32 `tl.dot` under bf16 autocast reached the H200 (issue 25).  Here the samplers
run under `record_launches()` (CUDA branches taken, nothing launched) for each precision the
sampler can produce, and each recorded launch is lowered by Triton to PTX and a cubin for sm_90;
ptxas reports registers and spills.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from d2c.kernels import Launch, record_launches  # noqa: E402
from d2c.kernels.aot import compile_for_gpu  # noqa: E402
from d2c.models.diffloss import DiffLoss  # noqa: E402

# precision -> the autocast dtype the sampler's forwards run under on CUDA (d2c.precision:
# fp32 none; bf16 bf16; auto bf16 at the head widths >= BF16_MIN_WIDTH["cuda"], fp32 below)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "auto-w1024": torch.bfloat16, "auto-w128": None}


def _head(width):
    torch.manual_seed(0)
    dl = DiffLoss(16, 64, depth=2, width=width, diffusion_steps=2).eval()
    with torch.no_grad():
        for p in dl.parameters():
            p.normal_(0, 0.02)
    return dl


def _record_head_launches(width, precision, head_backend, monkeypatch):
    """The head sampler's fused step as CUDA would launch it (rows: one per row-block size)."""
    if head_backend:
        monkeypatch.setenv("D2C_HEAD", head_backend)
    dl = _head(width)
    dt = PRECISIONS[precision]
    recs = []
    for n in (8, 20, 300):                   # 2n rows under CFG: BLOCK_M 16 / 32 / 64 on CUDA
        z = torch.randn(2 * n, 64)
        ctx = torch.autocast("cpu", dtype=dt) if dt is not None else torch.autocast("cpu", enabled=False)
        with record_launches() as rec, ctx, torch.inference_mode():
            dl.sample(z, 1.0, 2.0, generator=torch.Generator().manual_seed(0), impl="fused")
        recs += rec
    return recs


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("head_backend", [None, "triton"], ids=["auto", "forced-triton"])
def test_head_launches_compile_for_sm90(precision, head_backend, monkeypatch):
    width = 128 if precision == "auto-w128" else 1024 if precision == "auto-w1024" else 256
    recs = _record_head_launches(width, precision, head_backend, monkeypatch)
    dt = PRECISIONS[precision]
    if head_backend is None and dt is None:
        # HEAD_DISPATCH: fp32 activations take PyTorch on CUDA (Triton measured slower there)
        assert recs == []
        return
    assert {r.name for r in recs} == {"_ln_mod_linear", "_linear_gate_residual"}
    for r in recs:                                  # one compute dtype per launch: the activations'
        dots = [v.dtype for n, v in r.args.items() if n in ("X", "H", "W") and isinstance(v, torch.Tensor)]
        assert len(set(dots)) == 1, (r.name, dots)
        assert dots[0] == (dt or torch.float32)
    compiled = compile_for_gpu(recs, arch=90)
    bad = [(c["kernel"], c["constexprs"], c["error"]) for c in compiled if not c["ok"]]
    assert not bad, bad
    assert {c["constexprs"]["BLOCK_M"] for c in compiled} == {16, 32, 64}
    for c in compiled:
        assert c["spill_bytes"] == 0, c
        assert 0 < c["registers"] <= 255 and c["shared_bytes"] <= 227 * 1024, c


def test_the_mixed_dtype_dot_that_failed_on_the_h200_is_caught_here():
    """The check can fail: a kernel that hands tl.dot a bf16 and an fp32 operand, as
    `_linear_gate_residual` was launched under bf16 autocast on the H200, does not compile for
    sm_90, with Triton's error; our kernel handed the same mix compiles."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from kernels_fixture import mixed_dot
    from d2c.kernels import adaln_mlp
    bf, f = torch.zeros(16, 16, dtype=torch.bfloat16), torch.zeros(16, 16)
    [row] = compile_for_gpu([Launch(mixed_dot.mixed_dot, dict(H=bf, W=f, OUT=bf), dict(BLOCK=16))])
    assert not row["ok"] and "same dtype" in row["error"], row
    m, k, n = 16, 64, 64
    args = dict(H=torch.zeros(m, k, dtype=torch.bfloat16), W=torch.zeros(n, k), BIAS=torch.zeros(n),
                X=torch.zeros(m, n, dtype=torch.bfloat16), GATE=torch.zeros(m, n, dtype=torch.bfloat16),
                OUT=torch.zeros(m, n, dtype=torch.bfloat16), M=m, K=k, N=n, shm=k, swn=k, sxm=n, sgm=n, som=n)
    consts = dict(FP32_IEEE=False, DOT_F32=False, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64)
    [row] = compile_for_gpu([Launch(adaln_mlp._linear_gate_residual, args, consts)])
    assert row["ok"], row["error"]
