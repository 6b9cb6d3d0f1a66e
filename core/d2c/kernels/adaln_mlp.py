"""Fused trunk of MAR's diffusion head (SimpleMLPAdaLN, Li et al. 2024, sec. 3.2; DiT's AdaLN).

Per reverse step the head evaluates, for N token rows x (N, W) and embeddings y (N, W):
    mod   = SiLU(y) @ [A_1; ...; A_d; A_f]^T + b            one GEMM for every block's AdaLN
    for each block i:  (shift, scale, gate) = mod_i
        h = SiLU(Linear1(LN(x) * (1 + scale) + shift))       kernel 1: LN stats + modulation are
        x = x + gate * Linear2(h)                            kernel 2: computed on the GEMM's A tiles
    out = Linear_f(LN_noaffine(x) * (1 + scale_f) + shift_f) kernel 1 again (no SiLU, no affine)
So a step is 1 + 2 * depth + 1 launches instead of ~10 per block, and no normalised or
modulated activation ever goes to memory.  The per-block AdaLN GEMMs are merged because y is
shared by all blocks: SiLU(y) is computed once and the weight is packed once per sample call
(`PackedHead`), not once per step.

Backends: "triton" (the two kernels; CUDA, or CPU under TRITON_INTERPRET=1), "torch" (the same
packed arrangement in PyTorch ops: what CPU runs, and what torch.compile fuses), "reference"
(the nn.Module forward, `SimpleMLPAdaLN.forward_y`).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from d2c.kernels import launch, on_cuda, tl, triton, triton_available

HEAD_BACKENDS = ("auto", "reference", "torch", "triton")
LN_EPS = 1e-6


# ------------------------------------------------------------------------------ kernels
if triton is not None:
    @triton.jit
    def _ln_mod_linear(X, SHIFT, SCALE, LNW, LNB, W, BIAS, OUT,
                       M, K, N, sxm, ssm, stm, swn, som, eps,
                       LN_AFFINE: tl.constexpr, SILU: tl.constexpr, FP32_IEEE: tl.constexpr,
                       DOT_F32: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """OUT = act((LN(X) * (1 + SCALE) + SHIFT) @ W^T + BIAS); W is nn.Linear's (N, K)."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        n_ok = rn < N
        # LayerNorm statistics in fp32, two passes (mean, then centred second moment): the residual
        # stream drifts away from zero mean, where E[x^2] - E[x]^2 loses digits
        s1 = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            xa = tl.load(X + rm[:, None] * sxm + kk[None, :], mask=m_ok[:, None] & (kk < K)[None, :], other=0.0)
            s1 += tl.sum(xa.to(tl.float32), 1)
        mean = s1 / K
        s2 = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            ok = m_ok[:, None] & (kk < K)[None, :]
            xa = tl.load(X + rm[:, None] * sxm + kk[None, :], mask=ok, other=0.0)
            d = tl.where(ok, xa.to(tl.float32) - mean[:, None], 0.0)
            s2 += tl.sum(d * d, 1)
        rstd = 1.0 / tl.sqrt(s2 / K + eps)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < K
            ok = m_ok[:, None] & k_ok[None, :]
            xa = tl.load(X + rm[:, None] * sxm + kk[None, :], mask=ok, other=0.0).to(tl.float32)
            a = (xa - mean[:, None]) * rstd[:, None]
            if LN_AFFINE:
                a = a * tl.load(LNW + kk, mask=k_ok, other=0.0).to(tl.float32)[None, :] \
                    + tl.load(LNB + kk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            sc = tl.load(SCALE + rm[:, None] * stm + kk[None, :], mask=ok, other=0.0).to(tl.float32)
            sh = tl.load(SHIFT + rm[:, None] * ssm + kk[None, :], mask=ok, other=0.0).to(tl.float32)
            a = a * (1.0 + sc) + sh
            w = tl.load(W + rn[None, :] * swn + kk[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)
            if DOT_F32:
                acc += tl.dot(a, w.to(tl.float32), input_precision="ieee")
            elif FP32_IEEE:
                acc += tl.dot(a.to(w.dtype), w, input_precision="ieee")
            else:
                acc += tl.dot(a.to(w.dtype), w)
        acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if SILU:
            acc = acc * tl.sigmoid(acc)
        tl.store(OUT + rm[:, None] * som + rn[None, :], acc.to(OUT.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _linear_gate_residual(H, W, BIAS, X, GATE, OUT,
                              M, K, N, shm, swn, sxm, sgm, som,
                              FP32_IEEE: tl.constexpr, DOT_F32: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """OUT = X + GATE * (H @ W^T + BIAS): DiT's gated residual, epilogue of the second GEMM."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        n_ok = rn < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < K
            h = tl.load(H + rm[:, None] * shm + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(W + rn[None, :] * swn + kk[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)
            if DOT_F32:
                acc += tl.dot(h.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            elif FP32_IEEE:
                acc += tl.dot(h.to(w.dtype), w, input_precision="ieee")
            else:
                acc += tl.dot(h.to(w.dtype), w)
        ok = m_ok[:, None] & n_ok[None, :]
        acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        x = tl.load(X + rm[:, None] * sxm + rn[None, :], mask=ok, other=0.0).to(tl.float32)
        g = tl.load(GATE + rm[:, None] * sgm + rn[None, :], mask=ok, other=0.0).to(tl.float32)
        tl.store(OUT + rm[:, None] * som + rn[None, :], (x + g * acc).to(OUT.dtype.element_ty), mask=ok)


def _flags(x):
    fp32_ieee = x.dtype in (torch.float32, torch.float64) and not torch.backends.cuda.matmul.allow_tf32
    dot_f32 = not on_cuda(x) and x.dtype != torch.float32    # interpreter's low-precision dot is broken
    return fp32_ieee, dot_f32


def _as(t, dtype):
    """A GEMM weight in the activations' dtype: autocast hands the kernels bf16 activations beside
    fp32 parameters, and tl.dot takes one dtype (PackedHead.weights_in casts once per dtype, so
    this is a no-op on the sampler's path)."""
    return t if t.dtype == dtype else t.to(dtype)


def _blocks(M, N, K, x):
    """Tile sizes and launch options.  CUDA: small M is the sampling regime, so keep many programs
    along N; Triton's default 4 warps and 3 stages, the configuration the H200 measured
    (HEAD_DISPATCH): compiled for sm_90 as launched, no tile spills registers and the largest
    (fp32, 64 rows) takes 145 KB of shared memory (tests/test_gpu_compile.py)."""
    if on_cuda(x):
        bm = 16 if M <= 16 else (32 if M <= 64 else 64)
        return bm, 64, 64, {}
    # interpreter: few, large programs
    return max(16, min(64, 1 << max(0, M - 1).bit_length())), max(16, min(128, 1 << max(0, N - 1).bit_length())), \
        max(16, min(128, 1 << max(0, K - 1).bit_length())), {}


def _check_rows(*ts):
    for t in ts:
        if t.dim() != 2 or t.stride(-1) != 1:
            raise ValueError("fused head kernels take 2-D row-major operands (last stride 1)")


def ln_mod_linear_triton(x, shift, scale, ln_w, ln_b, weight, bias, *, silu: bool, out=None, eps=LN_EPS):
    """act((LN(x; ln_w, ln_b) * (1 + scale) + shift) @ weight^T + bias); ln_w None = no affine."""
    M, K = x.shape
    N = weight.shape[0]
    _check_rows(x, shift, scale, weight)
    if out is None:
        out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    bm, bn, bk, opts = _blocks(M, N, K, x)
    fp32_ieee, dot_f32 = _flags(x)
    affine = ln_w is not None
    weight = _as(weight, x.dtype)
    launch(_ln_mod_linear, (triton.cdiv(M, bm), triton.cdiv(N, bn)),
        x, shift, scale, ln_w if affine else x, ln_b if affine else x, weight, bias, out,
        M, K, N, x.stride(0), shift.stride(0), scale.stride(0), weight.stride(0), out.stride(0), eps,
        LN_AFFINE=affine, SILU=silu, FP32_IEEE=fp32_ieee, DOT_F32=dot_f32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **opts)
    return out


def linear_gate_residual_triton(h, weight, bias, x, gate, *, out=None):
    """x + gate * (h @ weight^T + bias)."""
    M, K = h.shape
    N = weight.shape[0]
    _check_rows(h, weight, x, gate)
    if out is None:
        out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    bm, bn, bk, opts = _blocks(M, N, K, x)
    fp32_ieee, dot_f32 = _flags(x)
    h, weight = _as(h, x.dtype), _as(weight, x.dtype)
    launch(_linear_gate_residual, (triton.cdiv(M, bm), triton.cdiv(N, bn)),
        h, weight, bias, x, gate, out, M, K, N,
        h.stride(0), weight.stride(0), x.stride(0), gate.stride(0), out.stride(0),
        FP32_IEEE=fp32_ieee, DOT_F32=dot_f32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **opts)
    return out


# ------------------------------------------------------------------------------ references
def resblock_reference(x, shift, scale, gate, ln_w, ln_b, w1, b1, w2, b2, eps=LN_EPS):
    """One ResBlock given its modulation (plain PyTorch; the oracle of the kernels)."""
    a = F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, eps) * (1 + scale) + shift
    return x + gate * F.linear(F.silu(F.linear(a, w1, b1)), w2, b2)


def final_reference(x, shift, scale, w, b, eps=LN_EPS):
    return F.linear(F.layer_norm(x, (x.shape[-1],), None, None, eps) * (1 + scale) + shift, w, b)


# ------------------------------------------------------------------------------ packed head
class PackedHead:
    """Weights of a SimpleMLPAdaLN arranged for the fused step; build once per sampling call
    (or keep while the weights do not change: `key` tells)."""

    def __init__(self, net):
        blocks = list(net.res_blocks)
        self.width = net.input_proj.out_features
        self.depth = len(blocks)
        mods = [b.adaLN_modulation[-1] for b in blocks] + [net.final_layer.adaLN_modulation[-1]]
        with torch.no_grad():
            self.w_mod = torch.cat([m.weight for m in mods]).contiguous()     # (3wd + 2w, w)
            self.b_mod = torch.cat([m.bias for m in mods]).contiguous()
        self.blocks = [(b.in_ln.weight.detach(), b.in_ln.bias.detach(),
                        b.mlp[0].weight.detach(), b.mlp[0].bias.detach(),
                        b.mlp[2].weight.detach(), b.mlp[2].bias.detach()) for b in blocks]
        self.in_w, self.in_b = net.input_proj.weight.detach(), net.input_proj.bias.detach()
        self.out_w, self.out_b = net.final_layer.linear.weight.detach(), net.final_layer.linear.bias.detach()
        te = net.time_embed
        self.freq_dim = te.frequency_embedding_size
        self.te_w1, self.te_b1 = te.mlp[0].weight.detach(), te.mlp[0].bias.detach()
        self.te_w2, self.te_b2 = te.mlp[2].weight.detach(), te.mlp[2].bias.detach()
        self.key = weights_key(net)
        self._cast = {}

    def weights_in(self, dtype):
        """(blocks, out_w) with every GEMM weight in `dtype`, cast once per dtype and kept (stable
        pointers for captured graphs): the kernels' tl.dot takes one dtype, and under autocast the
        activations are bf16 while the parameters stay fp32.  LayerNorm weights and biases are
        read in fp32 inside the kernels and stay as they are."""
        if dtype not in self._cast:
            with torch.inference_mode(False), torch.no_grad():
                blocks = [(lw, lb, w1.to(dtype), b1, w2.to(dtype), b2) for lw, lb, w1, b1, w2, b2 in self.blocks]
                self._cast[dtype] = (blocks, self.out_w.to(dtype))
        return self._cast[dtype]

    def modulation(self, y):
        """All blocks' (shift, scale, gate) and the final (shift, scale) from one GEMM."""
        mod = torch.addmm(self.b_mod, F.silu(y), self.w_mod.t())
        w = self.width
        per = [tuple(mod[:, (3 * i + j) * w:(3 * i + j + 1) * w] for j in range(3)) for i in range(self.depth)]
        o = 3 * w * self.depth
        return per, (mod[:, o:o + w], mod[:, o + w:o + 2 * w])


def weights_key(net):
    """Changes whenever a parameter is replaced or updated in place."""
    return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in net.parameters())


# What `auto` runs on CUDA, by the activations' dtype: the faster of the Triton kernels and the
# packed PyTorch ops, measured by bench/gpu_check.py (head_timing: trunk of width 1024, depth 6,
# 8-1024 rows, CUDA events, medians) on one H200, torch 2.11 / triton 3.6, 2026-12-04, main
# 64b8ad0.  Eager time / Triton time: bf16 1.4-2.7x, so Triton; fp32 0.62x at 256 and 1024 rows
# (Triton's fp32 dot without TF32 is slower than cuBLAS), so PyTorch.  Off CUDA: PyTorch.
HEAD_DISPATCH = {torch.bfloat16: "triton", torch.float16: "triton", torch.float32: "torch"}


def compute_dtype(device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the head's GEMMs run in on `device`: autocast's when it is on there, else `dtype`."""
    dev = torch.device(device).type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else dtype


def resolve_head_backend(device, backend=None, dtype: torch.dtype = torch.float32) -> str:
    """The head trunk's backend for activations of `dtype` (see compute_dtype) on `device`."""
    name = backend or os.environ.get("D2C_HEAD") or "auto"
    if name not in HEAD_BACKENDS:
        raise ValueError(f"head backend {name!r}; allowed: {', '.join(HEAD_BACKENDS)}")
    if name == "auto":
        return HEAD_DISPATCH.get(dtype, "torch") if triton is not None and on_cuda(device) else "torch"
    if name == "triton" and not triton_available(device):
        raise RuntimeError("head backend 'triton' needs CUDA tensors or TRITON_INTERPRET=1")
    return name


def head_forward(packed: PackedHead, x_in, y, backend: str = "torch"):
    """The head's trunk (input_proj .. final linear) on x_in (N, C), y (N, W) -> (N, 2C)."""
    x = F.linear(x_in, packed.in_w, packed.in_b)
    per, (f_shift, f_scale) = packed.modulation(y)
    if backend == "triton":
        blocks, out_w = packed.weights_in(x.dtype)
        for (shift, scale, gate), (lw, lb, w1, b1, w2, b2) in zip(per, blocks):
            h = ln_mod_linear_triton(x, shift, scale, lw, lb, w1, b1, silu=True)
            x = linear_gate_residual_triton(h, w2, b2, x, gate)
        return ln_mod_linear_triton(x, f_shift, f_scale, None, None, out_w, packed.out_b, silu=False)
    for (shift, scale, gate), (lw, lb, w1, b1, w2, b2) in zip(per, packed.blocks):
        x = resblock_reference(x, shift, scale, gate, lw, lb, w1, b1, w2, b2)
    return final_reference(x, f_shift, f_scale, packed.out_w, packed.out_b)
