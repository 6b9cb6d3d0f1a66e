"""The Triton forward of `d2c.kernels.attention.attention`, which holds the dispatch and the
plain-PyTorch reference these kernels are tested against.  Same conventions: q (B, H, Lq, D),
k and v (B, H, Lk, D), any strides; `key_padding_mask` (B, Lk) True where a key is kept; `causal`
bottom-right aligned; a query row that sees no key gives zeros.  Forward only.

`_attn_fwd`, FlashAttention-2 style (Dao 2023, arXiv 2307.08691; after Triton's fused-attention
tutorial): one program per (query block, batch*head), online softmax over key blocks, so the
Lq x Lk score matrix never exists in memory.  Key blocks past a row's last kept key (key padding)
or wholly in the causal future are skipped, not masked; blocks every query row sees whole run
without position masks.
`_attn_split` + `_attn_combine`, split-K decode (flash-decoding: Dao, Haziza, Massa, Sizov 2023,
"Flash-Decoding for long-context inference"): a few queries against a long cache, the keys cut
into chunks run by parallel programs whose partial softmax statistics are merged by a second
small kernel.
On CUDA the tiles (block sizes, warps, stages) come from `triton.autotune` over a short Hopper
list; under the interpreter (CPU tests) one fixed tile.
"""
from __future__ import annotations

import inspect
import math

import torch

from d2c.kernels import launch, on_cuda, tl, triton, triton_available

DECODE_MAX_Q = 16        # a call with at most this many queries against more keys is a decode step
_KPM_SCAN = 512          # mask bytes a program reads per step when it finds a row's last kept key


def is_decode(lq: int, lk: int) -> bool:
    """A KV-cache step (masked or not): at most DECODE_MAX_Q queries against more keys."""
    return lq <= DECODE_MAX_Q and lk > lq


# ------------------------------------------------------------------------------ kernels
if triton is not None:
    @triton.jit
    def _kept_len(kpm_row, LK, SCAN: tl.constexpr):
        """1 + the index of the last kept key of one key-padding-mask row (0 when none is kept):
        the keys a program has to visit.  MAR's encoder keeps a prefix, so that is its count."""
        n = tl.full([], 0, tl.int32)
        for start in range(0, LK, SCAN):
            kn = start + tl.arange(0, SCAN)
            kp = tl.load(kpm_row + kn, mask=kn < LK, other=0)
            n = tl.maximum(n, tl.max(tl.where(kp != 0, kn + 1, 0), 0))
        return n

    @triton.jit
    def _q_tile(q_base, offs_m, offs_d, m_ok, d_ok, sqm, sqd, DOT_F32: tl.constexpr):
        """The block's queries (BLOCK_M, BLOCK_D); fp32 under the interpreter's DOT_F32."""
        q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=m_ok[:, None] & d_ok[None, :],
                    other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        return q

    @triton.jit
    def _attn_blocks(acc, l_i, m_i, q, k_base, v_base, kpm_row, lo, hi, offs_m, offs_n, offs_d, d_ok,
                     skn, skd, svn, svd, shift, qk_scale,
                     MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                     FP32_IEEE: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr):
        """Online softmax (FlashAttention-2, Dao 2023, alg. 1) over the key blocks lo, lo + BLOCK_N,
        ... < hi.  MASKED=False: the caller guarantees every key of every block is < hi and in no
        query row's causal future, so only a key-padding mask is applied (it need not be a prefix);
        MASKED=True: keys >= hi and the causal future are masked as well."""
        for start in range(lo, hi, BLOCK_N):
            kn = start + offs_n
            n_ok = kn < hi
            if MASKED:
                kt = tl.load(k_base + kn[None, :] * skn + offs_d[:, None] * skd,
                             mask=n_ok[None, :] & d_ok[:, None], other=0.0)                  # (D, N)
            else:
                kt = tl.load(k_base + kn[None, :] * skn + offs_d[:, None] * skd, mask=d_ok[:, None], other=0.0)
            if DOT_F32:
                kt = kt.to(tl.float32)
            if FP32_IEEE:
                s = tl.dot(q, kt, input_precision="ieee")
            else:
                s = tl.dot(q, kt)
            s = s * qk_scale
            if HAS_KPM:
                kp = tl.load(kpm_row + kn, mask=n_ok, other=0)
                s = tl.where((kp != 0)[None, :], s, float("-inf"))
            if MASKED:
                ok = n_ok[None, :]
                if CAUSAL:
                    ok = ok & (kn[None, :] <= offs_m[:, None] + shift)
                s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # rows with nothing visible yet keep m = -inf; subtract 0 there so exp2 gives 0, not NaN
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_safe)
            p = tl.math.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if MASKED:
                vt = tl.load(v_base + kn[:, None] * svn + offs_d[None, :] * svd,
                             mask=n_ok[:, None] & d_ok[None, :], other=0.0)                  # (N, D)
            else:
                vt = tl.load(v_base + kn[:, None] * svn + offs_d[None, :] * svd, mask=d_ok[None, :], other=0.0)
            if DOT_F32:
                vt = vt.to(tl.float32)
            if FP32_IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v_base.dtype.element_ty).to(vt.dtype), vt)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _attn_fwd(Q, K, V, O, KPM, sm_scale,
                  sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                  sob, soh, som, sod, smb,
                  H, LQ, LK, D, LQ_KEY, LK_KEY,
                  CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, FP32_IEEE: tl.constexpr,
                  DOT_F32: tl.constexpr, KPM_SCAN: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """One program per (query block, batch*head).  Key blocks past the last kept key of the row
        (key padding) or wholly in the causal future of the block are never loaded; the blocks
        that every query row sees whole run without position masks.  LQ_KEY / LK_KEY (rounded
        lengths) only key the autotuner."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < LQ
        d_ok = offs_d < D
        q = _q_tile(Q + b * sqb + h * sqh, offs_m, offs_d, m_ok, d_ok, sqm, sqd, DOT_F32)
        # softmax in base 2: exp(x) = exp2(x log2 e), folded into the scale once
        qk_scale = sm_scale * 1.4426950408889634
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)      # running row max
        l_i = tl.zeros([BLOCK_M], tl.float32)                    # running row sum of exp
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        shift = LK - LQ                                          # bottom-right causal alignment
        kpm_row = KPM + b * smb
        hi = LK
        if HAS_KPM:
            hi = tl.minimum(hi, _kept_len(kpm_row, LK, KPM_SCAN))   # wholly padded blocks: skipped
        full = hi
        if CAUSAL:
            hi = tl.minimum(hi, (pid_m + 1) * BLOCK_M + shift)       # causal future of the block: skipped
            full = tl.minimum(hi, pid_m * BLOCK_M + shift + 1)      # keys the block's first row sees
        full = tl.maximum(full, 0) // BLOCK_N * BLOCK_N
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh
        acc, l_i, m_i = _attn_blocks(acc, l_i, m_i, q, k_base, v_base, kpm_row, 0, full, offs_m, offs_n, offs_d,
                                     d_ok, skn, skd, svn, svd, shift, qk_scale, MASKED=False, CAUSAL=CAUSAL,
                                     HAS_KPM=HAS_KPM, FP32_IEEE=FP32_IEEE, DOT_F32=DOT_F32, BLOCK_N=BLOCK_N)
        acc, l_i, m_i = _attn_blocks(acc, l_i, m_i, q, k_base, v_base, kpm_row, full, hi, offs_m, offs_n, offs_d,
                                     d_ok, skn, skd, svn, svd, shift, qk_scale, MASKED=True, CAUSAL=CAUSAL,
                                     HAS_KPM=HAS_KPM, FP32_IEEE=FP32_IEEE, DOT_F32=DOT_F32, BLOCK_N=BLOCK_N)
        # a row that saw no key has l = 0 and acc = 0: write 0
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
                 out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _attn_split(Q, K, V, O, MP, LP, AP, KPM, sm_scale,
                    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                    sob, soh, som, sod, smb,
                    H, LQ, LK, D, CHUNK, LK_KEY,
                    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, SPLIT: tl.constexpr,
                    FP32_IEEE: tl.constexpr, DOT_F32: tl.constexpr, KPM_SCAN: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """Split-K decode (flash-decoding, Dao et al. 2023): all LQ <= BLOCK_M queries of one
        batch*head in one block, against the keys [split * CHUNK, (split + 1) * CHUNK) of the
        cache; grid (batch*head, splits).  SPLIT: write the partial row max m (base 2), row sum l
        and unnormalised acc in fp32 for `_attn_combine`; else (one split) the output itself."""
        pid_bh = tl.program_id(0)
        sp = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < LQ
        d_ok = offs_d < D
        q = _q_tile(Q + b * sqb + h * sqh, offs_m, offs_d, m_ok, d_ok, sqm, sqd, DOT_F32)
        qk_scale = sm_scale * 1.4426950408889634
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        shift = LK - LQ
        kpm_row = KPM + b * smb
        lo = sp * CHUNK
        hi = tl.minimum(lo + CHUNK, LK)
        if HAS_KPM:
            hi = tl.minimum(hi, _kept_len(kpm_row, LK, KPM_SCAN))
        full = hi
        if CAUSAL:                        # the last query sees every key; the first, keys <= shift
            full = tl.minimum(hi, shift + 1)
        full = lo + tl.maximum(full - lo, 0) // BLOCK_N * BLOCK_N
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh
        acc, l_i, m_i = _attn_blocks(acc, l_i, m_i, q, k_base, v_base, kpm_row, lo, full, offs_m, offs_n, offs_d,
                                     d_ok, skn, skd, svn, svd, shift, qk_scale, MASKED=False, CAUSAL=CAUSAL,
                                     HAS_KPM=HAS_KPM, FP32_IEEE=FP32_IEEE, DOT_F32=DOT_F32, BLOCK_N=BLOCK_N)
        acc, l_i, m_i = _attn_blocks(acc, l_i, m_i, q, k_base, v_base, kpm_row, full, hi, offs_m, offs_n, offs_d,
                                     d_ok, skn, skd, svn, svd, shift, qk_scale, MASKED=True, CAUSAL=CAUSAL,
                                     HAS_KPM=HAS_KPM, FP32_IEEE=FP32_IEEE, DOT_F32=DOT_F32, BLOCK_N=BLOCK_N)
        if SPLIT:
            row = pid_bh * tl.num_programs(1) + sp                # partials: (B*H, splits, LQ[, D])
            tl.store(MP + row * LQ + offs_m, m_i, mask=m_ok)
            tl.store(LP + row * LQ + offs_m, l_i, mask=m_ok)
            tl.store(AP + (row * LQ + offs_m[:, None]) * D + offs_d[None, :], acc,
                     mask=m_ok[:, None] & d_ok[None, :])
        else:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
                     out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _attn_combine(MP, LP, AP, O, sob, soh, som, sod, H, LQ, D, SPLITS,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """The output of one batch*head from its splits' partials: rescale each split's (l, acc)
        to the common row max, sum, divide (rows that saw no key anywhere: 0)."""
        pid_bh = tl.program_id(0)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < LQ
        ok = m_ok[:, None] & (offs_d < D)[None, :]
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for sp in range(0, SPLITS):
            row = pid_bh * SPLITS + sp
            m_s = tl.load(MP + row * LQ + offs_m, mask=m_ok, other=float("-inf"))
            l_s = tl.load(LP + row * LQ + offs_m, mask=m_ok, other=0.0)
            a_s = tl.load(AP + (row * LQ + offs_m[:, None]) * D + offs_d[None, :], mask=ok, other=0.0)
            m_new = tl.maximum(m_i, m_s)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_safe)
            beta = tl.math.exp2(m_s - m_safe)
            l_i = l_i * alpha + l_s * beta
            acc = acc * alpha[:, None] + a_s * beta[:, None]
            m_i = m_new
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
                 out.to(O.dtype.element_ty), mask=ok)


# ------------------------------------------------------------------------------ tiles and autotuning
def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _len_key(n: int) -> int:
    """A length rounded up to a power of two: what the autotuners key on (one tuning per bucket)."""
    return min(_next_pow2(n), 1 << 16)


# Tiles the autotuners try on CUDA, per (element bytes, BLOCK_D) of a launch: a short list for
# Hopper after the fused-attention tutorial's search space (BLOCK_M 64/128, BLOCK_N 32/64/128,
# 4/8 warps, 2-4 stages), kept to the tiles that ptxas compiles for sm_90 with no register spill
# and <= 227 KiB shared memory (tests/test_attention_kernels.py compiles every tile a launch of
# the models' cases can get, for head dims 64 and 80 in bf16 and fp32, with Triton 3.8's
# compiler; the BLOCK_D 256 rows were checked the same way for one causal + padded launch each).
# fp32 runs the exact (ieee) dot, which has no tensor cores and
# needs small tiles (64 x 64 spills ~9 kB a thread at head dim 64); one tile each, as fp32 only
# runs when forced (see attention.ATTENTION_DISPATCH), so no tuning.
_FWD_TILES = {   # (BLOCK_M, BLOCK_N, num_warps, num_stages)
    (2, 64): [(128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
    (2, 128): [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)],
    (2, 256): [(64, 32, 8, 2), (16, 16, 8, 2)],
    (4, 64): [(64, 32, 8, 2)],
    (4, 128): [(32, 16, 8, 2)],
    (4, 256): [(16, 16, 8, 2)],
}
_SPLIT_TILES = {  # (BLOCK_N, num_warps, num_stages); BLOCK_M is DECODE_MAX_Q
    (2, 64): [(64, 4, 2), (64, 8, 3), (128, 4, 3)],
    (2, 128): [(64, 4, 2), (64, 8, 3), (128, 4, 3)],
    (2, 256): [(64, 8, 2), (16, 4, 2)],
    (4, 64): [(32, 8, 2)],
    (4, 128): [(32, 8, 2)],
    (4, 256): [(16, 8, 2)],
}


def _tile_class(q, block_d: int) -> tuple:
    return (2 if q.element_size() <= 2 else 4, max(64, block_d))


def _prune(configs, named_args, **kw):
    """The autotuners' early_config_prune: 128-row query blocks only for more than 64 queries."""
    if "BLOCK_M" in configs[0].kwargs and named_args["LQ"] <= 64:
        return [c for c in configs if c.kwargs["BLOCK_M"] <= 64] or configs
    return configs


# One autotuner per tile class and kernel, each a module attribute (`_attn_fwd_2x64`, ...), so
# that every config of an autotuner suits every launch it gets: d2c.kernels.aot compiles all of
# them.  Keyed on head dim, rounded lengths and the mask flags (and the tensors' dtypes, which
# Triton's autotuner adds to every key).
# Each config is timed over ~20 ms after 5 ms of warm-up (Triton's default: 100 ms after 25), so a
# first call per key costs about a compile per tile and little more.
_TUNED = {}
if triton is not None:
    def _quick_bench(kernel_call, quantiles):
        return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)

    def _autotune(configs, key):
        # do_bench is a newer autotune argument: without it, Triton's default timing
        quick = {"do_bench": _quick_bench} if "do_bench" in inspect.signature(triton.autotune).parameters else {}
        return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": _prune}, **quick)

    for (_es, _bd), _tiles in _FWD_TILES.items():
        _TUNED["fwd", _es, _bd] = globals()[f"_attn_fwd_{_es}x{_bd}"] = _autotune(
            [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in _tiles],
            ["D", "LQ_KEY", "LK_KEY", "CAUSAL", "HAS_KPM"])(_attn_fwd)
    for (_es, _bd), _tiles in _SPLIT_TILES.items():
        _TUNED["split", _es, _bd] = globals()[f"_attn_split_{_es}x{_bd}"] = _autotune(
            [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s) for bn, w, s in _tiles],
            ["D", "LQ", "LK_KEY", "CAUSAL", "HAS_KPM", "SPLIT"])(_attn_split)


# ------------------------------------------------------------------------------ launch
def _num_splits(bh: int, lk: int, d: int, n_sm: int) -> int:
    """Key splits of a decode call: FlashAttention-2's rule (flash_api.cpp, num_splits_heuristic).
    No split when batch*heads alone fill 80% of two programs per SM; else, among the split counts
    that change the keys per split (units of 256 keys at head dim <= 64, 128 above, as there), the
    fewest whose last wave of programs is >= 85% as full as the best one's."""
    slots = 2 * n_sm
    if bh >= 0.8 * slots:
        return 1
    n_blocks = max(1, triton.cdiv(lk, 256 if d <= 64 else 128))
    top = min(128, slots, n_blocks)
    eligible = [s for s in range(1, top + 1) if s == 1 or triton.cdiv(n_blocks, s) != triton.cdiv(n_blocks, s - 1)]
    eff = {s: (bh * s / slots) / math.ceil(bh * s / slots) for s in eligible}
    best = max(eff.values())
    return next(s for s in eligible if eff[s] >= 0.85 * best)


def _operands(q, k, v, key_padding_mask, scale, out):
    """Shape checks, one compute dtype (q's: autocast can hand bf16 queries beside fp32 keys, and
    tl.dot takes one dtype), the key-padding mask as uint8 rows with unit stride, the flags."""
    if not triton_available(q.device):
        raise RuntimeError("attention backend 'triton' needs CUDA tensors or TRITON_INTERPRET=1 "
                           "set before d2c.kernels is imported")
    B, H, LQ, D = q.shape
    LK = k.shape[-2]
    if k.shape != (B, H, LK, D) or v.shape != (B, H, LK, D):
        raise ValueError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; "
                         "k and v must be (B, H, Lk, D) with q's B, H, D")
    k = k if k.dtype == q.dtype else k.to(q.dtype)
    v = v if v.dtype == q.dtype else v.to(q.dtype)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if key_padding_mask is not None:
        kpm = key_padding_mask.to(device=q.device)
        kpm = (kpm.bool() if kpm.dtype != torch.bool else kpm).view(torch.uint8)
        if kpm.shape != (B, LK):
            kpm = kpm.expand(B, LK)
        smb = kpm.stride(0)
        if kpm.stride(1) != 1:
            kpm, smb = kpm.contiguous(), LK
    else:
        kpm, smb = q, 0                                                   # never read
    cuda = on_cuda(q)
    consts = dict(HAS_KPM=key_padding_mask is not None,
                  FP32_IEEE=q.dtype in (torch.float32, torch.float64) and not torch.backends.cuda.matmul.allow_tf32,
                  # Triton 3.8's interpreter returns garbage from tl.dot on bf16/fp16 operands: upcast
                  # there (loads, stores and the rounding of p to v's dtype still use the input dtype)
                  DOT_F32=not cuda and q.dtype in (torch.float16, torch.bfloat16),
                  KPM_SCAN=_KPM_SCAN, BLOCK_D=max(16, _next_pow2(D)))
    return k, v, kpm, smb, scale, out, cuda, consts


@torch.compiler.disable
def attention_triton(q, k, v, *, causal: bool = False, key_padding_mask=None, scale=None, out=None,
                     block_m: int | None = None, block_n: int | None = None, decode: bool | None = None,
                     num_splits: int | None = None):
    """The Triton forward; `out` (B, H, Lq, D) lets tests hand in a poisoned buffer.  A decode call
    (`is_decode`: <= DECODE_MAX_Q queries against a longer cache) runs the split-K kernel
    (`attention_decode_triton`, `num_splits`) unless `decode=False` or `block_m` is given; the
    rest runs `_attn_fwd`, with tiles from the autotuner on CUDA unless block_m / block_n are given."""
    LQ, LK = q.shape[-2], k.shape[-2]
    if decode is None:
        decode = block_m is None and is_decode(LQ, LK)
    if decode:
        return attention_decode_triton(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                                       out=out, num_splits=num_splits, block_n=block_n)
    k, v, kpm, smb, scale, out, cuda, consts = _operands(q, k, v, key_padding_mask, scale, out)
    B, H, _, D = q.shape
    args = (q, k, v, out, kpm, scale, *q.stride(), *k.stride(), *v.stride(), *out.stride(), smb,
            H, LQ, LK, D, _len_key(LQ), _len_key(LK))
    if cuda and block_m is None and block_n is None:
        launch(_TUNED["fwd", *_tile_class(q, consts["BLOCK_D"])],
               lambda meta: (triton.cdiv(LQ, meta["BLOCK_M"]), B * H), *args, CAUSAL=bool(causal), **consts)
        return out
    # the interpreter: one tile (tl.dot wants >= 16 rows; big blocks amortise its per-program cost)
    bm = block_m or (64 if cuda else min(128, max(16, _next_pow2(LQ))))
    bn = block_n or (64 if cuda else min(128, max(16, _next_pow2(LK))))
    launch(_attn_fwd, (triton.cdiv(LQ, bm), B * H), *args, CAUSAL=bool(causal), **consts,
           BLOCK_M=bm, BLOCK_N=bn, **({"num_warps": 4, "num_stages": 2} if cuda else {}))
    return out


@torch.compiler.disable
def attention_decode_triton(q, k, v, *, causal: bool = False, key_padding_mask=None, scale=None, out=None,
                            num_splits: int | None = None, block_n: int | None = None):
    """Split-K decode (flash-decoding): Lq <= DECODE_MAX_Q queries against a long cache.  The keys
    are cut into `num_splits` chunks (default `_num_splits`); grid (batch*head, splits); each
    program writes fp32 partials (m, l, acc) and `_attn_combine`, one more launch of one program
    per batch*head, merges them into the output (a kernel rather than torch ops on the partials:
    one launch instead of about six, and a decode step is launch-bound).  One split writes the
    output directly."""
    B, H, LQ, D = q.shape
    LK = k.shape[-2]
    if LQ > DECODE_MAX_Q:
        raise ValueError(f"attention_decode_triton: {LQ} queries; at most {DECODE_MAX_Q}")
    k, v, kpm, smb, scale, out, cuda, consts = _operands(q, k, v, key_padding_mask, scale, out)
    if num_splits is None:
        n_sm = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 132
        num_splits = _num_splits(B * H, LK, D, n_sm)
    chunk = max(16, -(-triton.cdiv(LK, max(1, int(num_splits))) // 16) * 16)   # keys per split, a multiple of 16
    splits = max(1, triton.cdiv(LK, chunk))
    if splits > 1:
        mp = torch.empty(B * H, splits, LQ, device=q.device, dtype=torch.float32)
        lp = torch.empty_like(mp)
        ap = torch.empty(B * H, splits, LQ, D, device=q.device, dtype=torch.float32)
    else:
        mp = lp = ap = out                                                    # never written
    args = (q, k, v, out, mp, lp, ap, kpm, scale, *q.stride(), *k.stride(), *v.stride(), *out.stride(), smb,
            H, LQ, LK, D, chunk, _len_key(chunk))
    consts.update(CAUSAL=bool(causal), SPLIT=splits > 1, BLOCK_M=DECODE_MAX_Q)
    if cuda and block_n is None:
        launch(_TUNED["split", *_tile_class(q, consts["BLOCK_D"])], (B * H, splits), *args, **consts)
    else:
        bn = block_n or (64 if cuda else min(128, max(16, _next_pow2(chunk))))
        launch(_attn_split, (B * H, splits), *args, **consts, BLOCK_N=bn,
               **({"num_warps": 4, "num_stages": 2} if cuda else {}))
    if splits > 1:
        launch(_attn_combine, (B * H,), mp, lp, ap, out, *out.stride(), H, LQ, D, splits,
               BLOCK_M=DECODE_MAX_Q, BLOCK_D=consts["BLOCK_D"], **({"num_warps": 4} if cuda else {}))
    return out
