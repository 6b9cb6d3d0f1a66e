"""Stage-1 sampling (LlamaGen's `generate.py` beside its `gpt.py`): class-token prefill, then
one code per step through the KV cache; CFG on a [cond; uncond] batch, temperature, top-k and
top-p (nucleus) filtering.  All randomness comes from the caller's `torch.Generator`.
"""
from __future__ import annotations

import torch

from d2c.models import compiled
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


def _gpt_pick(logits, temperature, top_k, top_p, generator):
    """Next code (B,) from fp32 logits (B, V); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = top_k_top_p_filter(logits / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def gpt_generate(model, labels, *, cfg: float = 1.0, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
                 cfg_schedule: str = "constant", compile: bool = False):
    """Sample codes (B, block_size) in raster order for class `labels` (B,) with stage-1 GPT.

    CFG runs one [cond; uncond] batch (uncond = null class) and mixes u + s * (c - u); at
    cfg == 1 the uncond half is skipped.  cfg_schedule "linear" ramps s from 1 towards
    cfg with the fraction of codes generated after the step (as MAR's linear schedule).
    All randomness comes from `generator` (on the model's device).  Returns (codes, nfe).
    compile=True runs the decode step under torch.compile (dynamic shapes: one compile).
    """
    config = model.config
    device = next(model.parameters()).device
    if cfg_schedule not in GPT_CFG_SCHEDULES:
        raise ValueError(f"cfg_schedule={cfg_schedule!r}; allowed: {', '.join(GPT_CFG_SCHEDULES)}")
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature={temperature}, top_k={top_k}, top_p={top_p}; allowed: "
                         f"temperature >= 0, top_k >= 0, 0 < top_p <= 1")
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device}, the model on {device}; they must match")
    labels = torch.as_tensor(labels, device=device).reshape(-1)
    check_labels(labels, config.num_classes)
    labels = labels.long()
    b, n = labels.shape[0], config.block_size
    guided = cfg != 1.0
    batch = torch.cat([labels, torch.full_like(labels, config.num_classes)]) if guided else labels

    was_training = model.training
    model.eval()
    # the last code is never fed back; compiled: one spare slot, so the cache slice of the last
    # step is never the whole buffer (dynamo would specialise that case and recompile)
    model.setup_cache(batch.shape[0], config.cls_token_num + n - 1 + int(compile))
    codes = torch.empty(b, n, dtype=torch.long, device=device)
    decode = compiled(model, "decode") if compile else model.decode
    try:
        for t in range(n):
            if t == 0:
                logits = model.prefill(batch)
            else:
                prev = codes[:, t - 1:t]
                logits = decode(torch.cat([prev, prev]) if guided else prev, t)
            if guided:
                cond, uncond = logits.chunk(2)
                s = cfg if cfg_schedule == "constant" else 1 + (cfg - 1) * (t + 1) / n
                logits = uncond + s * (cond - uncond)
            codes[:, t] = _gpt_pick(logits, temperature, top_k, top_p, generator)
    finally:
        model.clear_cache()
        model.train(was_training)
    return codes, {"ar_steps": n, "batch_mul": 2 if guided else 1}
