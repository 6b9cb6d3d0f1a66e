"""A kernel with the operand handling that failed on the H200: tl.dot of whatever dtypes it is
handed (bf16 activations beside fp32 weights under autocast).  tests/test_gpu_compile.py shows
that the sm_90 check rejects it, so the check can fail."""
import triton
import triton.language as tl


@triton.jit
def mixed_dot(H, W, OUT, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    h = tl.load(H + r[:, None] * BLOCK + r[None, :])
    w = tl.load(W + r[:, None] * BLOCK + r[None, :])
    tl.store(OUT + r[:, None] * BLOCK + r[None, :], tl.dot(h, w).to(OUT.dtype.element_ty))
