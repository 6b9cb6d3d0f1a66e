"""Matmul FLOPs of one sampling configuration, per image: what `d2c.sampling.d2c_sample` computes,
counted from the configs alone (nothing runs, so models built on the meta device will do).

Convention: a matmul of (m, k) by (k, n) costs 2 m n k, as torch.utils.flop_counter counts it:
every Linear, 1x1 or 3x3 convolution (2 x output pixels x C_in x C_out x kernel area, padding
included) and both attention products, Q K^T and P V.  Elementwise work (norms, softmax,
activations, biases, the diffusion update, CFG mixing, sampling of codes) and embedding lookups
are not counted: they are memory-bound, and the floor below is a matmul floor.
tests/test_flops.py holds these counts equal to FlopCounterMode on real runs of the tiny presets.

Reference, measured on one H200, 2026-12-04: D2C-B-16 (GPT-B + MAR-B cross_attn, 16 rounds,
cfg 2.9, 100 diffusion steps) about 6.3 TFLOP an image (MAR-B trunk 2.6, head 3.3, GPT-B 0.1,
KL decode 0.3), MAR-B-64 about 13.7; peak dense bf16 matmul of that H200: 807 TFLOP/s.
This count gives D2C-B-16 7.1: trunk 3.3 = MAR-B's 2.7 + 0.6 of cross-attention after all 12
decoder blocks (which the reference's trunk leaves out), head 3.4 (67 MFLOP a token-step),
GPT-B 0.1, KL decode 0.25; MAR-B-64 14.7 (tests/test_flops.py, test_base_sizes_*).
"""
from __future__ import annotations

import math

H200_PEAK_BF16_TFLOPS = 807.0        # measured on one H200, 2026-12-04
TIME_EMBED_FREQS = 256               # DiffLoss's TimestepEmbedder input width (frequency_embedding_size)


# ------------------------------------------------------------------ building blocks
def _linear(rows: int, n_in: int, n_out: int) -> int:
    return 2 * rows * n_in * n_out


def _attn(lq: int, lk: int, dim: int) -> int:
    """Q K^T and P V over all heads: 2 Lq Lk (H head_dim) each; the head count drops out."""
    return 2 * 2 * lq * lk * dim


def _conv(hw: int, c_in: int, c_out: int, k: int = 3) -> int:
    return 2 * hw * c_in * c_out * k * k


def _vit_block(n: int, dim: int, mlp_ratio: float) -> int:
    """timm Block (d2c.models.vit) on n tokens: qkv, attention, proj, 2-layer MLP."""
    hidden = int(dim * mlp_ratio)
    return (_linear(n, dim, 3 * dim) + _attn(n, n, dim) + _linear(n, dim, dim)
            + _linear(n, dim, hidden) + _linear(n, hidden, dim))


def _cfg(x):
    """A config from an nn.Module (its .config) or a config itself."""
    return getattr(x, "config", x)


# ------------------------------------------------------------------ stage 1: GPT
def gpt_flops(gpt) -> int:
    """One row of `gpt_generate`: prefill of the class token, then one decode step per code but
    the last; step t (t = 0 the prefill) feeds one token whose attention reads the t + 1 cached
    positions, and every step runs the vocabulary head (LlamaGen c2i, arXiv 2406.06525)."""
    c = _cfg(gpt)
    d, n = c.dim, c.block_size
    hd = d // c.n_head
    kv = (c.n_kv_head or c.n_head) * hd
    hidden = int(2 * 4 * d / 3)                        # SwiGLU width, as gpt.FeedForward
    if c.ffn_dim_multiplier is not None:
        hidden = int(c.ffn_dim_multiplier * hidden)
    hidden = -(-hidden // c.multiple_of) * c.multiple_of    # rounded up to multiple_of
    per_token = c.n_layer * (_linear(1, d, d + 2 * kv) + _linear(1, d, d) + 3 * _linear(1, d, hidden)) \
        + _linear(1, d, c.vocab_size)
    keys = n * (n + 1) // 2                            # sum over steps of the cached length t + 1
    return n * per_token + c.n_layer * _attn(1, keys, d)   # GQA repeats k/v: attention runs all n_head


# ------------------------------------------------------------------ stage 2: MAR
def mar_schedule(mar, steps: int, diffusion_steps: int | None = None,
                 diffusion_steps_last: int | None = None) -> list[tuple[int, int, int]]:
    """(known, predicted, head steps) of each round of `MAR.sample_tokens`: tokens known when
    the round starts (the encoder keeps those and the buffer), tokens the head samples, and its
    reverse steps.  Same arithmetic as the sampler: MaskGIT's cosine masked count
    floor(L cos(pi/2 (k+1)/steps)) clamped to [1, masked - 1], the last round takes the rest (a
    round can predict nothing once one token is left); DiSA (arXiv 2505.20297) lowers the head
    steps linearly from `diffusion_steps` to `diffusion_steps_last`."""
    c = _cfg(mar)
    L = c.seq_len
    first = int(diffusion_steps or c.diffusion_steps)
    rounds, masked = [], L
    for step in range(steps):
        nxt = max(1, min(masked - 1, math.floor(L * math.cos(math.pi / 2 * (step + 1) / steps))))
        if step == steps - 1:
            nxt = 0
        n_diff = first if diffusion_steps_last is None or steps == 1 else \
            round(first + (diffusion_steps_last - first) * step / (steps - 1))
        rounds.append((L - masked, masked - nxt, n_diff))
        masked = nxt
    return rounds


def mar_condition_flops(mar, known: int) -> int:
    """One row of `MAR.condition` with `known` tokens known (MAR, arXiv 2406.11838):
    z_proj on every token (masked ones are dropped after it), the MAE encoder on buffer + known
    tokens, the decoder on buffer + all tokens, and the fusion (docs/design.md section 4)."""
    c = _cfg(mar)
    E, D, L, buf = c.encoder_embed_dim, c.decoder_embed_dim, c.seq_len, c.buffer_size
    kept = buf + known
    f = _linear(L, c.token_embed_dim, E)
    f += c.encoder_depth * _vit_block(kept, E, c.mlp_ratio)
    f += _linear(kept, E, D) + c.decoder_depth * _vit_block(buf + L, D, c.mlp_ratio)
    fu, T = c.fusion, L                                 # one stage-1 code per MAR token
    if fu.kind == "cross_attn":                         # after each chosen decoder block
        layers = c.decoder_depth if fu.layers is None else len(set(fu.layers))
        f += layers * (_linear(buf + L, D, D) + _linear(T, fu.d_fuse, 2 * D)
                       + _attn(buf + L, T, D) + _linear(buf + L, D, D))
    elif fu.kind == "qformer":                          # queries -> buffer slots
        d, Q = fu.d_fuse, fu.num_queries
        hidden = int(d * fu.mlp_ratio)
        self_attn = _linear(Q, d, d) + _linear(Q, d, 2 * d) + _attn(Q, Q, d) + _linear(Q, d, d)
        cross_attn = _linear(Q, d, d) + _linear(T, d, 2 * d) + _attn(Q, T, d) + _linear(Q, d, d)
        mlp = _linear(Q, d, hidden) + _linear(Q, hidden, d)
        f += fu.depth * (self_attn + cross_attn + mlp) + _linear(Q, d, E)
    return f


def head_step_flops(mar) -> int:
    """One reverse step of the diffusion head for one token row (SimpleMLPAdaLN.forward_y):
    input projection, `diffloss_d` AdaLN res blocks (MLP + shift/scale/gate from y), final
    AdaLN layer to [eps, v].  The AdaLN projections act on y = t_emb + cond_emb, which differs
    per row, so they cost 1.5x the MLP (3 W^2 against 2 W^2 a block)."""
    c = _cfg(mar)
    W, C = c.diffloss_w, c.token_embed_dim
    res = 2 * _linear(1, W, W) + _linear(1, W, 3 * W)     # MLP, then shift/scale/gate
    return _linear(1, C, W) + c.diffloss_d * res + _linear(1, W, 2 * W) + _linear(1, W, 2 * C)


# ------------------------------------------------------------------ decoders
def _res(hw: int, c_in: int, c_out: int) -> int:
    return _conv(hw, c_in, c_out) + _conv(hw, c_out, c_out) + (_conv(hw, c_in, c_out, 1) if c_in != c_out else 0)


def _attn_block(hw: int, c: int) -> int:
    return 4 * _conv(hw, c, c, 1) + _attn(hw, hw, c)    # q, k, v, proj_out; one head over h*w


def decoder_flops(tok, side: int | None = None) -> int:
    """One image through the KL (MAR's KL-16) or VQ (LlamaGen's VQ-16) conv decoder from a
    side x side latent grid (default: image_size / stride).  Both are LDM decoders: conv_in,
    middle res/attn/res, num_res_blocks + 1 res blocks a level with nearest x2 + conv between
    levels, conv_out; the VQ one also attends after each res block of its lowest level."""
    c = _cfg(tok)
    vq = hasattr(c, "codebook_embed_dim")
    side = side or c.image_size // c.stride
    ch, mult, hw = c.ch, c.ch_mult, side * side
    width = ch * mult[-1]
    f = _conv(hw, c.codebook_embed_dim if vq else c.embed_dim, c.z_channels, 1)   # post_quant_conv
    f += _conv(hw, c.z_channels, width) + 2 * _res(hw, width, width) + _attn_block(hw, width)
    for i in reversed(range(len(mult))):
        for _ in range(c.num_res_blocks + 1):
            f += _res(hw, width, ch * mult[i])
            width = ch * mult[i]
            if vq and i == len(mult) - 1:
                f += _attn_block(hw, width)
        if i:
            hw *= 4
            f += _conv(hw, width, width)
    return f + _conv(hw, width, 3)


# ------------------------------------------------------------------ the whole sampler
def sampling_flops(models: dict, sampler, batch: int = 1) -> dict:
    """Matmul FLOPs per image of `d2c_sample(labels, models, sampler)` (models: nn.Modules or their
    configs under d2c_sample's keys), by part: stage1 (GPT), trunk (MAR encoder + decoder +
    fusion), head (the diffusion head), decode (KL after MAR, else VQ; 0 when that tokenizer is
    not given), total.

    CFG (a scale != 1) runs a stage's networks on [cond; uncond] rows; uncond_refresh=k (LazyMAR)
    runs the trunk's unconditional half only in rounds 0, k, 2k, ..., while the head keeps both
    halves.  `batch` matters only for the head's timestep embedding, one row a reverse step
    shared by the batch.  Elementwise work is not counted (see the module docstring)."""
    gpt, mar, kl, vq = (models.get(k) for k in ("gpt", "mar", "kl", "vq"))
    if gpt is None and mar is None:
        raise ValueError("sampling_flops needs gpt (stage 1), mar (stage 2), or both")
    sampler.check(stage1=gpt is not None, stage2=mar is not None)
    out = {"stage1": (2 if sampler.stage1_guidance != 1.0 else 1) * gpt_flops(gpt) if gpt is not None else 0,
           "trunk": 0, "head": 0}
    if mar is not None:
        g = 2 if sampler.cfg != 1.0 else 1             # rows per image
        refresh = sampler.uncond_refresh
        c = _cfg(mar)
        W = c.diffloss_w
        t_emb = _linear(1, TIME_EMBED_FREQS, W) + _linear(1, W, W)
        schedule = mar_schedule(c, sampler.steps, sampler.diffusion_steps, sampler.diffusion_steps_last)
        for step, (known, pred, n_diff) in enumerate(schedule):
            lazy = g == 2 and refresh is not None and step % refresh
            out["trunk"] += (1 if lazy else g) * mar_condition_flops(c, known)
            if pred:                                   # cond_embed once a round, then the steps
                rows = g * pred
                out["head"] += _linear(rows, c.decoder_embed_dim, W) + n_diff * (
                    rows * head_step_flops(c) + t_emb / batch)
    tok = kl if mar is not None else vq
    side = _cfg(mar).img_size // _cfg(mar).vae_stride if mar is not None else None   # MAR's latent grid
    out["decode"] = decoder_flops(tok, side) if tok is not None else 0
    out["total"] = out["stage1"] + out["trunk"] + out["head"] + out["decode"]
    return out


def achieved(flops: float, seconds: float, peak_tflops: float | None = None) -> dict:
    """TFLOP/s achieved by `flops` of work in `seconds`, and with a peak, the floor (flops at
    peak) and ratio_to_floor = seconds / floor: how far the run is from the matmul floor."""
    out = {"tflops": flops / seconds / 1e12, "floor_s": None, "ratio_to_floor": None}
    if peak_tflops:
        out["floor_s"] = flops / (peak_tflops * 1e12)
        out["ratio_to_floor"] = seconds / out["floor_s"]
    return out
