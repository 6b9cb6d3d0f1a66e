"""The two stages chained (`d2c_sample`), and its baselines by leaving a stage out; the result
(`SampleResult`) and image grids.  Each stage's sampler lives beside its model: stage 1 in
`d2c.models.generate` (LlamaGen layout), stage 2 as `MAR.sample_tokens` (MAR's layout).  One
`torch.Generator` drives both, on whatever device the models live on.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from d2c.models.generate import gpt_generate
from d2c.precision import DTYPE_NAMES, autocast_for, sampling_dtype

# ============================================================================ D2C (both)
@dataclass
class SampleResult:
    images: torch.Tensor            # uint8 (B, 3, H, W)
    codes: torch.Tensor | None      # stage-1 codes (B, T), when stage 1 ran
    latents: torch.Tensor | None    # stage-2 latents (B, C, h, w), when stage 2 ran
    timings: dict = field(default_factory=dict)   # seconds: stage1, stage2, decode, total
    nfe: dict = field(default_factory=dict)       # network evaluations per kind
    dtypes: dict = field(default_factory=dict)    # compute dtype per stage that ran: "bf16" | "fp32"


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
               diffusion_steps_last: int | None = None, head_sampler: str = "ddpm", uncond_refresh: int | None = None,
               gpt_temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, precision: str = "fp32", progress: bool = False,
               compile: bool = False) -> SampleResult:
    """The two-stage pipeline, and its two baselines by leaving a stage out:
      D2C       gpt -> codes -> mar(codes) -> latents -> kl.decode
      MAR       mar -> latents -> kl.decode                      (gpt=None)
      LlamaGen  gpt -> codes -> vq.decode_codes                  (mar=None)
    One generator seeded with `seed` drives both stages, so a seed reproduces a run; `cfg` guides
    both (gpt_temperature, top_k, top_p are stage 1's own).
    compile=True: torch.compile the per-step work of both stages (see MAR.sample_tokens, gpt_generate).
    precision: fp32, bf16, or auto (bf16 for a stage where d2c.precision.sampling_dtype says it is
    supported and faster at the stage's width); model forwards only: logits, the CFG mix, the
    diffusion schedule and step, and the latents stay fp32.  The decoders run fp32.
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
    timings, nfe, dtypes = {}, {}, {}
    codes = latents = None
    t_all = time.perf_counter()
    if gpt is not None:
        dt = sampling_dtype(precision, device, gpt.config.dim)
        dtypes["stage1"] = DTYPE_NAMES[dt]
        with _Timer(device, timings, "stage1"), autocast_for(dt, device):
            codes, n = gpt_generate(gpt, labels, cfg=cfg, temperature=gpt_temperature, top_k=top_k,
                                    top_p=top_p, generator=gen, compile=compile)
        nfe.update(n)
    if mar is not None:
        use_codes = codes if getattr(mar, "fusion", None) is not None else None
        c = mar.config
        dt = sampling_dtype(precision, device, min(c.encoder_embed_dim, c.decoder_embed_dim, c.diffloss_w))
        dtypes["stage2"] = DTYPE_NAMES[dt]
        with _Timer(device, timings, "stage2"), autocast_for(dt, device):
            latents, n = mar.sample_tokens(labels, steps=steps, cfg=cfg, cfg_schedule=cfg_schedule,
                                           temperature=temperature, codes=use_codes, generator=gen,
                                           diffusion_steps=diffusion_steps,
                                           diffusion_steps_last=diffusion_steps_last, head_sampler=head_sampler,
                                           uncond_refresh=uncond_refresh,
                                           progress=progress, compile=compile)
        nfe.update(n)
    with _Timer(device, timings, "decode"):
        if mar is not None:
            images = kl.decode(latents)
        else:
            h = vq.config.image_size // vq.config.stride
            images = vq.decode_codes(codes.view(codes.shape[0], h, h))
    timings["total"] = time.perf_counter() - t_all
    return SampleResult(to_uint8(images), codes, latents, timings, nfe, dtypes)


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
