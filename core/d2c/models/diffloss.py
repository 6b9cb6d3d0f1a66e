"""DiffLoss: MAR's per-token diffusion head (Li et al. 2024, "Autoregressive Image Generation
without Vector Quantization", sec. 3.2).  A small AdaLN MLP predicts [eps, v] for one token
x_t (C channels) given its timestep and the MAR condition z; parameter names are MAR's.

Per reverse step the work is: y = t_emb + cond_emb (cond_emb computed once per call), then
`depth` ResBlocks, each a pure function of (x, y) -- the unit a fused kernel replaces -- then
the final AdaLN layer; then d2c.diffusion.reverse_step.  `sample(impl="eager")` (the default)
is the nn.Module forward inside GaussianDiffusion.p_sample_loop; the fused / compiled / CUDA
graph paths run the same step from d2c.kernels.head_sampling.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from d2c.diffusion import SAMPLERS, GaussianDiffusion, cfg_output, create_diffusion, timestep_embedding
from d2c.kernels import head_sampling
from d2c.precision import accum_dtype


def modulate(x, shift, scale):
    """AdaLN: x * (1 + scale) + shift (DiT)."""
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """t -> timestep_embedding (256 dims: [cos(t w_i), sin(t w_i)], w_i = 10000^(-i/half)) -> Linear,
    SiLU, Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """x + gate * MLP(modulate(LN(x), shift, scale)), (shift, scale, gate) = Linear(SiLU(y))."""

    def __init__(self, channels: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, x, y):
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, model_channels: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(model_channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(model_channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 2 * model_channels))

    def forward(self, x, y):
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    def __init__(self, in_channels: int, model_channels: int, out_channels: int, z_channels: int,
                 num_res_blocks: int, grad_checkpointing: bool = False):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.grad_checkpointing = grad_checkpointing
        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList([ResBlock(model_channels) for _ in range(num_res_blocks)])
        self.final_layer = FinalLayer(model_channels, out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        # MAR/DiT: xavier Linear, N(0, 0.02) time MLP, zero AdaLN and output: starts as eps = 0, v = 0
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for lin in [b.adaLN_modulation[-1] for b in self.res_blocks] + \
                   [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward_y(self, x, y):
        """The per-step trunk given the combined embedding y = t_emb + cond_emb."""
        x = self.input_proj(x)
        for blk in self.res_blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, y, use_reentrant=False)
            else:
                x = blk(x, y)
        return self.final_layer(x, y)

    def forward(self, x, t, c):
        """x (N, C) noisy tokens, t (N,) original timestep indices, c (N, z_channels)."""
        return self.forward_y(x, self.time_embed(t) + self.cond_embed(c))


class DiffLoss(nn.Module):
    """Diffusion loss and sampler for one token given its condition z."""

    def __init__(self, target_channels: int, z_channels: int, depth: int, width: int,
                 diffusion_steps=100, grad_checkpointing: bool = False, clip_x0: float | None = None):
        super().__init__()
        self.in_channels = target_channels
        self.clip_x0 = clip_x0
        self.net = SimpleMLPAdaLN(target_channels, width, 2 * target_channels, z_channels, depth,
                                  grad_checkpointing=grad_checkpointing)   # 2C: [eps, v] (learned sigma)
        self.diffusion_steps = int(diffusion_steps)
        self.train_diffusion = create_diffusion("")                        # 1000 steps
        self._gen: dict[int, GaussianDiffusion] = {}

    def gen_diffusion(self, diffusion_steps: int | None = None) -> GaussianDiffusion:
        """The respaced sampling diffusion (default `diffusion_steps`), cached per step count."""
        n = int(diffusion_steps or self.diffusion_steps)
        if n not in self._gen:
            self._gen[n] = create_diffusion(str(n), self.train_diffusion.num_timesteps)
        return self._gen[n]

    def forward(self, target, z, mask=None):
        """Hybrid diffusion loss of tokens `target` (N, C) given `z` (N, D), averaged over
        rows where `mask` is 1 (all rows when mask is None)."""
        t = torch.randint(0, self.train_diffusion.num_timesteps, (target.shape[0],), device=target.device)
        loss = self.train_diffusion.training_losses(lambda x, ts: self.net(x, ts, z), target, t)["loss"]
        if mask is None:
            return loss.mean()
        mask = mask.to(loss.dtype)
        return (loss * mask).sum() / mask.sum()

    sample_impl = "eager"

    def sample(self, z, temperature: float = 1.0, cfg: float = 1.0, *, generator=None,
               diffusion_steps: int | None = None, guided: bool | None = None, progress: bool = False,
               impl: str | None = None, sampler: str = "ddpm"):
        """Sample tokens (N, C) for conditions z (N, D).

        Guided (default when cfg != 1): z = [z_cond; z_uncond] (N = 2M); both halves run on the
        same x_t and eps = eps_u + cfg (eps_c - eps_u) at every step; the variance comes from
        the conditional half.  The result has N rows, the two halves identical (MAR's layout).
        `impl`: eager (default `self.sample_impl`), or a fast path of d2c.kernels.head_sampling.
        `sampler`: ddpm (ancestral, MAR's) or ddim (eta 0: deterministic given x_T; temperature
        then has no effect), both on the respaced `diffusion_steps`.
        """
        guided = (cfg != 1.0) if guided is None else guided
        impl = impl or self.sample_impl
        if impl not in head_sampling.IMPLS:
            raise ValueError(f"DiffLoss impl {impl!r}; allowed: {', '.join(head_sampling.IMPLS)}")
        if sampler not in SAMPLERS:
            raise ValueError(f"head_sampler={sampler!r}; allowed: {', '.join(SAMPLERS)}")
        if impl != "eager":
            x = head_sampling.sample(self, z, temperature, cfg, generator, diffusion_steps, guided, impl, progress,
                                     sampler)
            return torch.cat([x, x]) if guided else x
        diffusion = self.gen_diffusion(diffusion_steps)
        c_emb = self.net.cond_embed(z)                 # constant over the reverse steps
        n = z.shape[0] // 2 if guided else z.shape[0]

        def model_fn(x, t):                              # outputs in x's dtype (fp32 under bf16 autocast)
            t_emb = self.net.time_embed(t[:1])           # all rows share t
            if not guided:
                return self.net.forward_y(x, t_emb + c_emb).to(x.dtype)
            return cfg_output(self.net.forward_y(torch.cat([x, x]), t_emb + c_emb).to(x.dtype), cfg)

        noise = torch.randn((n, self.in_channels), generator=generator, device=z.device, dtype=accum_dtype(z.dtype))
        x = diffusion.p_sample_loop(model_fn, noise, temperature=temperature, generator=generator,
                                    progress=progress, clip_x0=self.clip_x0, sampler=sampler)
        return torch.cat([x, x]) if guided else x
