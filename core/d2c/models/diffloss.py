"""DiffLoss: MAR's per-token diffusion head (Li et al. 2024, "Autoregressive Image Generation
without Vector Quantization", sec. 3.2).  A small AdaLN MLP predicts [eps, v] for one token
x_t (C channels) given its timestep and the MAR condition z; parameter names are MAR's.

Per reverse step the work is: y = t_emb + cond_emb (cond_emb computed once per call), then
`depth` ResBlocks, each a pure function of (x, y) -- the unit a fused kernel replaces -- then
the final AdaLN layer.

Sampling implementations (`DiffLoss.sample(impl=...)`, default `DiffLoss.sample_impl`):
  eager     the nn.Module forward inside GaussianDiffusion.p_sample_loop (the reference).
  fused     one step = one pure function of tensors (`_fused_step`): packed AdaLN GEMM + the
            fused trunk of d2c.kernels.adaln_mlp (Triton on CUDA, PyTorch ops on CPU).
  compiled  the same step under torch.compile(dynamic=True); rows padded to a multiple of 8 so
            the changing token counts of MAR's rounds never specialise a graph (no recompiles).
  graph     CUDA only: the step captured once per row bucket (powers of two) as a CUDA graph
            and replayed 100x, so a step costs one launch (falls back to compiled off CUDA).
Every implementation draws the same noise from the caller's generator in the same order
(x_T, then one (n, C) draw per step, outside any graph), so a seed gives the same tokens.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import torch.nn.functional as F

from d2c.diffusion import GaussianDiffusion, create_diffusion
from d2c.kernels import adaln_mlp
from d2c.precision import accum_dtype

SAMPLE_IMPLS = ("eager", "fused", "compiled", "graph")


def modulate(x, shift, scale):
    """AdaLN: x * (1 + scale) + shift (DiT)."""
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """t -> [cos(t w_i), sin(t w_i)], w_i = 10000^(-i/half) (256 dims) -> Linear, SiLU, Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def timestep_embedding(t, dim: int, max_period: float = 10000.0):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype))


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
                 num_sampling_steps=100, grad_checkpointing: bool = False, clip_x0: float | None = None):
        super().__init__()
        self.in_channels = target_channels
        self.clip_x0 = clip_x0
        self.net = SimpleMLPAdaLN(target_channels, width, 2 * target_channels, z_channels, depth,
                                  grad_checkpointing=grad_checkpointing)   # 2C: [eps, v] (learned sigma)
        self.num_sampling_steps = int(num_sampling_steps)
        self.train_diffusion = create_diffusion("")                        # 1000 steps
        self._gen: dict[int, GaussianDiffusion] = {}

    def gen_diffusion(self, num_steps: int | None = None) -> GaussianDiffusion:
        """The respaced sampling diffusion (default `num_sampling_steps`), cached per step count."""
        n = int(num_steps or self.num_sampling_steps)
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

    def sample(self, z, temperature: float = 1.0, cfg: float = 1.0, *, generator=None,
               num_steps: int | None = None, guided: bool | None = None, progress: bool = False,
               impl: str | None = None):
        """Sample tokens (N, C) for conditions z (N, D).

        Guided (default when cfg != 1): z = [z_cond; z_uncond] (N = 2M); both halves run on the
        same x_t and eps = eps_u + cfg (eps_c - eps_u) at every step; the variance comes from
        the conditional half.  The result has N rows, the two halves identical (MAR's layout).
        `impl`: see the module docstring (default `self.sample_impl`, "eager").
        """
        guided = (cfg != 1.0) if guided is None else guided
        impl = impl or self.sample_impl
        if impl not in SAMPLE_IMPLS:
            raise ValueError(f"DiffLoss impl {impl!r}; allowed: {', '.join(SAMPLE_IMPLS)}")
        if impl != "eager":
            x = self._sample_fused(z, temperature, cfg, generator, num_steps, guided, impl, progress)
            return torch.cat([x, x]) if guided else x
        diffusion = self.gen_diffusion(num_steps)
        c_emb = self.net.cond_embed(z)                 # constant over the reverse steps
        n = z.shape[0] // 2 if guided else z.shape[0]
        c = self.in_channels

        def model_fn(x, t):
            t_emb = self.net.time_embed(t[:1])           # all rows share t
            if not guided:
                return self.net.forward_y(x, t_emb + c_emb)
            out = self.net.forward_y(torch.cat([x, x]), t_emb + c_emb)
            (eps_c, eps_u), v = out[:, :c].chunk(2), out[:n, c:]
            return torch.cat([eps_u + cfg * (eps_c - eps_u), v], dim=1)

        dtype = accum_dtype(z.dtype)
        noise = torch.randn((n, c), generator=generator, device=z.device, dtype=dtype)
        x = diffusion.p_sample_loop(model_fn, noise, temperature=temperature, generator=generator,
                                    progress=progress, clip_x0=self.clip_x0)
        return torch.cat([x, x]) if guided else x

    # ------------------------------------------------------------------ fused / compiled / graph
    sample_impl = "eager"

    def packed_head(self) -> adaln_mlp.PackedHead:
        """Packed weights, rebuilt only when a parameter changed (stable object for compile guards)."""
        key = adaln_mlp.weights_key(self.net)
        pk = getattr(self, "_packed", None)
        if pk is None or pk.key != key:
            with torch.inference_mode(False), torch.no_grad():   # usable outside inference mode too
                pk = self._packed = adaln_mlp.PackedHead(self.net)
            self._graphs = {}
        return pk

    def _step_tables(self, diffusion, device, dtype):
        """(6, T) coefficient rows and the (T,) timestep map on the device, cached per diffusion."""
        cache = self.__dict__.setdefault("_tables", {})
        key = (id(diffusion), device, dtype)
        if key not in cache:
            with torch.inference_mode(False):
                tab = torch.stack([getattr(diffusion, k) for k in _STEP_ARRAYS]).to(device=device, dtype=dtype)
                tmap = diffusion.timestep_map.to(device)
            cache[key] = (diffusion, tab, tmap)          # keeps diffusion alive: id stays unique
        return cache[key][1], cache[key][2]

    def _sample_fused(self, z, temperature, cfg, generator, num_steps, guided, impl, progress):
        device = z.device
        if impl == "graph" and device.type != "cuda":
            impl = "compiled"
        diffusion = self.gen_diffusion(num_steps)
        dtype = accum_dtype(z.dtype)
        packed = self.packed_head()
        backend = adaln_mlp.resolve_head_backend(device)
        tab, tmap = self._step_tables(diffusion, device, dtype)
        n = z.shape[0] // 2 if guided else z.shape[0]
        c = self.in_channels
        c_emb = self.net.cond_embed(z)
        x = torch.randn((n, c), generator=generator, device=device, dtype=dtype)
        cfg_t = torch.full((), float(cfg), device=device, dtype=dtype)
        temp_t = torch.full((), float(temperature), device=device, dtype=dtype)
        clip_t = torch.full((), float(self.clip_x0 or math.inf), device=device, dtype=dtype)
        steps = range(diffusion.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, leave=False)

        if impl == "fused":
            for i in steps:
                noise = torch.randn((n, c), generator=generator, device=device, dtype=dtype)
                i_t = torch.full((1,), i, dtype=torch.long, device=device)
                x = _fused_step(packed, x, i_t, noise, c_emb, cfg_t, temp_t, clip_t, tab, tmap, guided, backend)
            return x

        # compiled / graph: pad rows to a bucket; padding rows are zeros and are thrown away
        nb = _bucket(n, impl)
        xp = x.new_zeros(nb, c)
        xp[:n] = x
        cp = c_emb.new_zeros((2 * nb if guided else nb), c_emb.shape[1])
        cp[:n] = c_emb[:n]
        if guided:
            cp[nb:nb + n] = c_emb[n:]
        noise_p = x.new_zeros(nb, c)
        if impl == "compiled":
            # inductor writes its own fused kernels (Triton on GPU): hand it the PyTorch arrangement
            backend = "torch"
            fn = _compiled_step()
            torch._dynamo.mark_dynamic(xp, 0)
            torch._dynamo.mark_dynamic(cp, 0)
            torch._dynamo.mark_dynamic(noise_p, 0)
            for i in steps:
                noise_p[:n] = torch.randn((n, c), generator=generator, device=device, dtype=dtype)
                i_t = torch.full((1,), i, dtype=torch.long, device=device)
                xp = fn(packed, xp, i_t, noise_p, cp, cfg_t, temp_t, clip_t, tab, tmap, guided, backend)
            return xp[:n].clone()

        g = self._graph(packed, nb, c, cp.shape, dtype, device, guided, backend, tab, tmap)
        g.x.copy_(xp)
        g.c_emb.copy_(cp)
        g.cfg.copy_(cfg_t)
        g.temp.copy_(temp_t)
        g.clip.copy_(clip_t)
        g.noise.zero_()
        for i in steps:
            g.noise[:n].copy_(torch.randn((n, c), generator=generator, device=device, dtype=dtype))
            g.i.fill_(i)
            g.graph.replay()
            g.x.copy_(g.out)
        return g.x[:n].clone()

    def _graph(self, packed, nb, c, c_shape, dtype, device, guided, backend, tab, tmap):
        graphs = self.__dict__.setdefault("_graphs", {})
        key = (nb, tuple(c_shape), dtype, device, guided, backend, tab.data_ptr())
        if key not in graphs:
            graphs[key] = _GraphStep(packed, nb, c, c_shape, dtype, device, guided, backend, tab, tmap)
        return graphs[key]


_STEP_ARRAYS = ("posterior_log_variance_clipped", "log_betas", "sqrt_recip_alphas_cumprod",
                "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1", "posterior_mean_coef2")


def _bucket(n: int, impl: str) -> int:
    if impl == "graph":                      # few graphs: each bucket is captured once
        return max(8, 1 << max(0, n - 1).bit_length())
    return max(8, -(-n // 8) * 8)            # >= 8 rows: no 0/1 size specialisation in dynamo


def _time_embed(packed, t):
    """TimestepEmbedder.forward from packed tensors (one row: all rows share t)."""
    emb = TimestepEmbedder.timestep_embedding(t, packed.freq_dim).to(packed.te_w1.dtype)
    return F.linear(F.silu(F.linear(emb, packed.te_w1, packed.te_b1)), packed.te_w2, packed.te_b2)


def _fused_step(packed, x, i_t, noise, c_emb, cfg, temperature, clip, tab, tmap, guided: bool, backend: str):
    """One ancestral step x_t -> x_{t-1} (GaussianDiffusion.p_sample with the CFG model_fn of
    DiffLoss.sample), written as one function of tensors so it compiles and graphs whole.
    i_t (1,) respaced step index; tab rows = _STEP_ARRAYS; cfg, temperature, clip (bound on
    pred_x0, inf for none) 0-d tensors."""
    n, c = x.shape
    y = _time_embed(packed, tmap[i_t]).to(c_emb.dtype) + c_emb
    out = adaln_mlp.head_forward(packed, torch.cat([x, x]) if guided else x, y, backend)
    if guided:
        (eps_c, eps_u), v = out[:, :c].chunk(2), out[:n, c:]
        eps = eps_u + cfg * (eps_c - eps_u)
    else:
        eps, v = out[:, :c], out[:, c:]
    co = tab[:, i_t].to(x.dtype)                                         # (6, 1)
    min_log, max_log, sr, srm1, c1, c2 = co[0:1], co[1:2], co[2:3], co[3:4], co[4:5], co[5:6]
    frac = (v + 1) / 2
    log_var = frac * max_log + (1 - frac) * min_log                    # IDDPM eq. 15
    pred_x0 = (sr * x - srm1 * eps).clamp(-clip, clip)
    mean = c1 * pred_x0 + c2 * x                                       # DDPM eq. 7, x0 := pred
    nonzero = (i_t != 0).to(x.dtype).view(1, 1)                        # no noise at the last step
    return mean + nonzero * torch.exp(0.5 * log_var) * (temperature * noise)


_COMPILED = None


def _compiled_step():
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(_fused_step, dynamic=True)
    return _COMPILED


class _GraphStep:
    """`_fused_step` captured as a CUDA graph on static buffers (one per row bucket)."""

    def __init__(self, packed, nb, c, c_shape, dtype, device, guided, backend, tab, tmap):
        self.x = torch.zeros(nb, c, device=device, dtype=dtype)
        self.noise = torch.zeros(nb, c, device=device, dtype=dtype)
        self.c_emb = torch.zeros(c_shape, device=device, dtype=dtype)
        self.i = torch.ones(1, dtype=torch.long, device=device)
        self.cfg = torch.ones((), device=device, dtype=dtype)
        self.temp = torch.ones((), device=device, dtype=dtype)
        self.clip = torch.full((), math.inf, device=device, dtype=dtype)
        args = (packed, self.x, self.i, self.noise, self.c_emb, self.cfg, self.temp, self.clip, tab, tmap, guided, backend)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):                  # warm-up: Triton compiles, cuBLAS picks algos
            for _ in range(2):
                _fused_step(*args)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = _fused_step(*args)
