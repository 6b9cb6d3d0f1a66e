"""Samplers: one loop per model.  All are seeded through a `torch.Generator`, run on
whatever device the model lives on, and return uint8 images / tokens plus timings and NFEs.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

# ============================================================================ compile switch
def compiled(module, name: str):
    """`module.name` under torch.compile(dynamic=True), cached on the module: dynamic shapes
    cover the changing KV length (GPT) and kept-token counts (MAR) without recompiling."""
    cache = module.__dict__.setdefault("_d2c_compiled", {})
    if name not in cache:
        cache[name] = torch.compile(getattr(module, name), dynamic=True)
    return cache[name]


# ============================================================================ GPT (stage 1)
# LlamaGen-style decoding: class token prefill, then one code per step through the KV cache.
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
def gpt_generate(model, labels, *, cfg_scale: float = 1.0, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
                 cfg_schedule: str = "constant", compile: bool = False):
    """Sample codes (B, block_size) in raster order for class `labels` (B,) with stage-1 GPT.

    CFG runs one [cond; uncond] batch (uncond = null class) and mixes u + s * (c - u); at
    cfg_scale == 1 the uncond half is skipped.  cfg_schedule "linear" ramps s from 1 towards
    cfg_scale with the fraction of codes generated after the step (as MAR's linear schedule).
    All randomness comes from `generator` (on the model's device).  Returns (codes, nfe).
    compile=True runs the decode step under torch.compile (dynamic shapes: one compile).
    """
    from d2c.models.gpt import check_labels

    cfg = model.cfg
    device = next(model.parameters()).device
    if cfg_schedule not in GPT_CFG_SCHEDULES:
        raise ValueError(f"cfg_schedule={cfg_schedule!r}; allowed: {', '.join(GPT_CFG_SCHEDULES)}")
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature={temperature}, top_k={top_k}, top_p={top_p}; allowed: "
                         f"temperature >= 0, top_k >= 0, 0 < top_p <= 1")
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device}, the model on {device}; they must match")
    labels = torch.as_tensor(labels, device=device).reshape(-1)
    check_labels(labels, cfg.num_classes)
    labels = labels.long()
    b, n = labels.shape[0], cfg.block_size
    guided = cfg_scale != 1.0
    batch = torch.cat([labels, torch.full_like(labels, cfg.num_classes)]) if guided else labels

    was_training = model.training
    model.eval()
    # the last code is never fed back; compiled: one spare slot, so the cache slice of the last
    # step is never the whole buffer (dynamo would specialise that case and recompile)
    model.setup_cache(batch.shape[0], cfg.cls_token_num + n - 1 + int(compile))
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
                s = cfg_scale if cfg_schedule == "constant" else 1 + (cfg_scale - 1) * (t + 1) / n
                logits = uncond + s * (cond - uncond)
            codes[:, t] = _gpt_pick(logits, temperature, top_k, top_p, generator)
    finally:
        model.clear_cache()
        model.train(was_training)
    return codes, {"ar_steps": n, "batch_mul": 2 if guided else 1}


# ============================================================================ MAR (stage 2)
@torch.inference_mode()
def mar_sample(model, labels, *, steps: int = 64, cfg: float = 1.0, cfg_schedule: str = "linear",
               temperature: float = 1.0, codes=None, generator=None, diffusion_steps=None,
               progress: bool = False, compile: bool = False):
    """MAR's sampler (Li et al. 2024, sec. 3.4): `steps` rounds; each round runs the MAE
    encoder/decoder on the tokens known so far and samples, with the diffusion head, the tokens
    whose turn has come in a random order per sample.  The masked count after round k follows
    MaskGIT's cosine schedule floor(L cos(pi/2 (k+1)/steps)), clamped to [1, masked - 1]; the
    last round predicts every remaining token.  CFG (cfg != 1): a [cond; uncond] batch, the
    unconditional half with the null class and null codes, guidance scale linear in the revealed
    fraction, 1 + (cfg - 1)(L - masked_next)/L ("linear"), or `cfg` throughout ("constant").

    labels (B,) long; codes (B, seq_len) stage-1 codes (required by fusion models).  All
    randomness comes from `generator` (on the model's device), so a seed reproduces the output.
    Returns (latents (B, C, h, w), {"mar_steps", "diffusion_steps"}): diffusion_steps counts
    every reverse step run by the head (one batched head call per step).
    compile=True: the encoder/decoder under torch.compile (dynamic shapes) and the diffusion
    head's fused step compiled (CPU) or captured as a CUDA graph (GPU); same seed, same tokens
    up to float reassociation.
    """
    if steps < 1:
        raise ValueError(f"steps={steps}; allowed: integers >= 1")
    if cfg_schedule not in ("linear", "constant"):
        raise ValueError(f"cfg_schedule={cfg_schedule!r}; allowed: linear, constant")
    device = model.mask_token.device
    labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
    b, L, c = labels.shape[0], model.seq_len, model.token_embed_dim
    if codes is not None:
        codes = torch.as_tensor(codes, device=device).reshape(b, -1)
    guided = cfg != 1.0
    n_diff = int(diffusion_steps or model.diffloss.num_sampling_steps)

    tokens = torch.zeros(b, L, c, device=device)
    mask = torch.ones(b, L, dtype=torch.bool, device=device)
    orders = model.sample_orders(b, generator=generator, device=device)
    if guided:
        labels_in = torch.cat([labels, labels])
        drop = torch.cat([torch.zeros(b, dtype=torch.bool, device=device),
                          torch.ones(b, dtype=torch.bool, device=device)])
        codes_in = None if codes is None else torch.cat([codes, codes])
    else:
        labels_in, drop, codes_in = labels, None, codes

    condition = compiled(model, "condition") if compile else model.condition
    head_impl = ("graph" if device.type == "cuda" else "compiled") if compile else None
    rounds = range(steps)
    if progress:
        from tqdm.auto import tqdm
        rounds = tqdm(rounds, desc="mar")
    n_masked, reverse_steps = L, 0
    for step in rounds:
        if n_masked == 0:
            break
        tok_in, mask_in = (torch.cat([tokens, tokens]), torch.cat([mask, mask])) if guided else (tokens, mask)
        z = condition(tok_in, labels_in, mask_in, codes=codes_in, drop=drop)

        # masked count after this round; every row has the same count (orders differ)
        n_next = math.floor(L * math.cos(math.pi / 2 * (step + 1) / steps))
        n_next = max(1, min(n_masked - 1, n_next))
        if step == steps - 1:
            to_pred, mask_next = mask, torch.zeros_like(mask)
        else:
            mask_next = torch.zeros_like(mask).scatter(1, orders[:, :n_next], True)
            to_pred = mask & ~mask_next
        scale = 1 + (cfg - 1) * (L - n_next) / L if cfg_schedule == "linear" else cfg

        zc = z[:b][to_pred]                                        # row-major: matches tokens[to_pred]
        if zc.shape[0]:
            zz = torch.cat([zc, z[b:][to_pred]]) if guided else zc
            x = model.diffloss.sample(zz, temperature, scale, generator=generator,
                                      num_steps=n_diff, guided=guided, impl=head_impl)
            tokens[to_pred] = x[:zc.shape[0]].to(tokens.dtype)
            reverse_steps += n_diff
        mask = mask_next
        n_masked = 0 if step == steps - 1 else n_next
    return model.unpatchify(tokens), {"mar_steps": steps, "diffusion_steps": reverse_steps}

# ============================================================================ D2C (both)
@dataclass
class SampleResult:
    images: torch.Tensor            # uint8 (B, 3, H, W)
    codes: torch.Tensor | None      # stage-1 codes (B, T), when stage 1 ran
    latents: torch.Tensor | None    # stage-2 latents (B, C, h, w), when stage 2 ran
    timings: dict = field(default_factory=dict)   # seconds: stage1, stage2, decode, total
    nfe: dict = field(default_factory=dict)       # network evaluations per kind


class _Timer:
    """Wall time of a block; waits for queued GPU work so the numbers are honest."""

    def __init__(self, device, out: dict, key: str):
        self.device, self.out, self.key = torch.device(device), out, key

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self):
        self._sync()
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self._sync()
        self.out[self.key] = self.out.get(self.key, 0.0) + time.perf_counter() - self.t0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 in [0, 255], rounding as torchvision's save_image does."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8)


@torch.inference_mode()
def d2c_sample(labels, *, gpt=None, vq=None, mar=None, kl=None, seed: int = 0,
               steps: int = 16, cfg: float = 1.0, cfg_schedule: str = "linear",
               temperature: float = 1.0, diffusion_steps: int | None = None,
               gpt_cfg: float | None = None, gpt_temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, progress: bool = False, compile: bool = False) -> SampleResult:
    """The two-stage pipeline, and its two baselines by leaving a stage out:
      D2C       gpt -> codes -> mar(codes) -> latents -> kl.decode
      MAR       mar -> latents -> kl.decode                      (gpt=None)
      LlamaGen  gpt -> codes -> vq.decode_codes                  (mar=None)
    One generator seeded with `seed` drives both stages, so a seed reproduces a run.
    compile=True: torch.compile the per-step work of both stages (see mar_sample, gpt_generate).
    """
    if gpt is None and mar is None:
        raise ValueError("d2c_sample needs gpt (stage 1), mar (stage 2), or both")
    if mar is not None and kl is None:
        raise ValueError("stage 2 needs the KL tokenizer (kl=...) to decode latents")
    if mar is None and vq is None:
        raise ValueError("stage 1 alone needs the VQ tokenizer (vq=...) to decode codes")
    device = next((mar if mar is not None else gpt).parameters()).device
    labels = torch.as_tensor(labels, device=device, dtype=torch.long)
    gen = torch.Generator(device).manual_seed(seed)
    timings, nfe = {}, {}
    codes = latents = None
    t_all = time.perf_counter()
    if gpt is not None:
        with _Timer(device, timings, "stage1"):
            codes, n = gpt_generate(gpt, labels, cfg_scale=cfg if gpt_cfg is None else gpt_cfg,
                                    temperature=gpt_temperature, top_k=top_k, top_p=top_p, generator=gen,
                                    compile=compile)
        nfe.update(n)
    if mar is not None:
        use_codes = codes if getattr(mar, "fusion", None) is not None else None
        with _Timer(device, timings, "stage2"):
            latents, n = mar_sample(mar, labels, steps=steps, cfg=cfg, cfg_schedule=cfg_schedule,
                                    temperature=temperature, codes=use_codes, generator=gen,
                                    diffusion_steps=diffusion_steps, progress=progress, compile=compile)
        nfe.update(n)
    with _Timer(device, timings, "decode"):
        if mar is not None:
            images = kl.decode(latents)
        else:
            h = vq.cfg.image_size // vq.cfg.stride
            images = vq.decode_codes(codes.view(codes.shape[0], h, h))
    timings["total"] = time.perf_counter() - t_all
    return SampleResult(to_uint8(images), codes, latents, timings, nfe)


def save_grid(images_uint8: torch.Tensor, path, nrow: int = 8):
    """Write a PNG grid of uint8 (B, 3, H, W) images; returns the path."""
    from pathlib import Path

    from PIL import Image
    from torchvision.utils import make_grid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(images_uint8.cpu(), nrow=nrow, padding=2)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
    return path


def save_sample_grid(images_uint8: torch.Tensor, path):
    """The 10x10 grid of a sampling run: its first 100 images.  Runs sample `balanced_labels`
    (arange % classes), so with 10 classes each column is one class, every class shown."""
    return save_grid(images_uint8[:100], path, nrow=10)
