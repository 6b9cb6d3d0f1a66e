"""Stage-1 sampling (LlamaGen's `generate.py` beside its `gpt.py`): class-token prefill, then
one code per step through the KV cache; CFG on a [cond; uncond] batch, temperature, top-k and
top-p (nucleus) filtering.  All randomness comes from the caller's `torch.Generator`.
"""
from __future__ import annotations

import torch

from d2c.models import compiled_fn
from d2c.models.gpt import check_labels

GPT_CFG_SCHEDULES = ("constant", "linear")


def top_k_top_p_filter(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Copy of logits (..., V) with -inf outside the top-k (ties with the k-th kept) and outside
    the nucleus: the most likely tokens until their mass reaches top_p, the token that crosses
    it included (Holtzman et al. 2020).  top_k=0 / top_p=1 disable a filter."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        srt, idx = torch.sort(logits, dim=-1, descending=True)
        cum = srt.softmax(-1).cumsum(-1)
        before = torch.cat([torch.zeros_like(cum[..., :1]), cum[..., :-1]], dim=-1)
        drop_sorted = before > top_p  # mass already reached before this token: drop it
        logits = logits.masked_fill(drop_sorted.scatter(-1, idx, drop_sorted), float("-inf"))
    return logits


def _gpt_pick(logits, temperature, top_k, top_p, u):
    """Next code (B,) from fp32 logits (B, V); temperature 0 is greedy.  Otherwise the code where
    the filtered distribution's CDF crosses u (B,), uniforms the caller drew: inverse-CDF
    sampling, so the pick holds no RNG of its own and the static decode step can replay as one
    CUDA graph with the same codes as the eager loop."""
    if temperature == 0:
        return logits.argmax(-1)
    cdf = top_k_top_p_filter(logits / temperature, top_k, top_p).softmax(-1).cumsum(-1)
    total = cdf[:, -1:]
    # strictly below the total, so rounding can never select past the last kept code
    at = torch.minimum(u[:, None].to(cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, at, right=True).squeeze(-1)


def _mix_and_pick(logits, scale, u, temperature, top_k, top_p, guided: bool):
    """CFG mix u + s (c - u) of a [cond; uncond] batch of logits at guidance `scale`, then the
    pick at uniforms `u`: one rule for the eager loop and the static step."""
    if guided:
        cond, uncond = logits.chunk(2)
        logits = uncond + scale * (cond - uncond)
    return _gpt_pick(logits, temperature, top_k, top_p, u)


def _static_step(model, codes, pos, u, scales, temperature: float, top_k: int, top_p: float, guided: bool):
    """One decode step over the static KV cache as a function of tensors (no host sync, shapes
    independent of the step): code t = pos[0] from code t-1, which sits at position t; the CFG mix
    with scales[t] and the pick with u[t] inside; writes codes[:, t] and advances pos."""
    prev = codes.index_select(1, pos - 1)                                  # (B, 1)
    logits = model.decode(torch.cat([prev, prev]) if guided else prev, pos)
    new = _mix_and_pick(logits, scales.index_select(0, pos)[:, None], None if u is None else u.index_select(0, pos)[0],
                        temperature, top_k, top_p, guided)
    codes.index_copy_(1, pos, new[:, None])
    pos.add_(1)


class _DecodeGraph:
    """`_static_step` captured once as a CUDA graph (gpt-fast's recipe; prefill stays eager): each
    replay is the whole step, one launch instead of a few hundred from Python."""

    def __init__(self, model, codes, pos, u, scales, args):
        side = torch.cuda.Stream(codes.device)
        side.wait_stream(torch.cuda.current_stream(codes.device))
        start = pos.clone()
        with torch.cuda.stream(side):                       # warm-up: cuBLAS and Triton pick kernels
            _static_step(model, codes, pos, u, scales, *args)
        torch.cuda.current_stream(codes.device).wait_stream(side)
        pos.copy_(start)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            _static_step(model, codes, pos, u, scales, *args)
        pos.copy_(start)                                     # capture does not run: replay from here


@torch.inference_mode()
def gpt_generate(model, labels, sampler, *, generator: torch.Generator | None = None):
    """Sample codes (B, block_size) in raster order for class `labels` (B,) with stage-1 GPT,
    at the stage-1 settings of `sampler` (a d2c.sampling.SamplerConfig): guidance scale
    (stage1_cfg, else cfg) and its schedule, temperature, top-k, top-p, compile.

    CFG runs one [cond; uncond] batch (uncond = null class) and mixes u + s * (c - u); at a
    scale of 1 the uncond half is skipped.  stage1_cfg_schedule "linear" ramps s from 1 towards the
    scale with the fraction of codes generated after the step (as MAR's linear schedule).
    All randomness comes from `generator` (on the model's device): one uniform per code and row,
    drawn up front, picks each code by inverse CDF.  Returns (codes, nfe).
    sampler.compile: after the eager prefill, every decode step is `_static_step` over a
    full-length KV cache (positions masked), replayed as one CUDA graph on CUDA, under
    torch.compile elsewhere; the same codes as the eager loop for a seed.
    """
    config = model.config
    device = next(model.parameters()).device
    sampler.check(stage1=True)
    cfg, temperature, top_k, top_p = (sampler.stage1_guidance, sampler.stage1_temperature,
                                      sampler.stage1_top_k, sampler.stage1_top_p)
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device}, the model on {device}; they must match")
    labels = torch.as_tensor(labels, device=device).reshape(-1)
    check_labels(labels, config.num_classes)
    labels = labels.long()
    b, n = labels.shape[0], config.block_size
    guided = cfg != 1.0
    batch = torch.cat([labels, torch.full_like(labels, config.num_classes)]) if guided else labels
    u = torch.rand(n, b, generator=generator, device=device) if temperature > 0 else None
    # guidance scale of code t: constant, or 1 + (cfg - 1)(t + 1)/n ("linear")
    t_frac = (torch.arange(n, device=device, dtype=torch.float32) + 1) / n
    scales = torch.full((n,), float(cfg), device=device) if sampler.stage1_cfg_schedule == "constant" \
        else 1 + (cfg - 1) * t_frac

    was_training = model.training
    model.eval()
    # the last code is never fed back, so the cache holds the class token and n - 1 codes
    model.setup_cache(batch.shape[0], config.cls_token_num + n - 1)
    codes = torch.zeros(b, n, dtype=torch.long, device=device)

    def pick(logits, t):
        return _mix_and_pick(logits, scales[t], None if u is None else u[t], temperature, top_k, top_p, guided)

    try:
        codes[:, 0] = pick(model.prefill(batch), 0)
        if not sampler.compile:
            for t in range(1, n):
                prev = codes[:, t - 1:t]
                codes[:, t] = pick(model.decode(torch.cat([prev, prev]) if guided else prev, t), t)
        elif n > 1:
            pos = torch.ones(1, dtype=torch.long, device=device)
            args = (float(temperature), int(top_k), float(top_p), guided)
            if device.type == "cuda":
                graph = _DecodeGraph(model, codes, pos, u, scales, args).graph
                for _ in range(1, n):
                    graph.replay()
            else:
                step = compiled_fn(_static_step)
                for _ in range(1, n):
                    step(model, codes, pos, u, scales, *args)
    finally:
        model.clear_cache()
        model.train(was_training)
    return codes, {"ar_steps": n, "batch_mul": 2 if guided else 1}
