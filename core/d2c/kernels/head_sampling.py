"""Fast paths of the diffusion head's sampler (DiffLoss.sample with impl != "eager").

  fused     each reverse step as one function of tensors (`fused_step`): packed AdaLN GEMMs +
            the fused trunk of adaln_mlp (Triton on CUDA, PyTorch ops on CPU).
  compiled  the same step under torch.compile(dynamic=True); rows padded to a multiple of 8 so
            the changing token counts of MAR's rounds never specialise a graph (no recompiles).
  graph     CUDA only: the step captured once per row bucket (powers of two) as a CUDA graph
            and replayed every step, so a step costs one launch (compiled off CUDA).
All of them run d2c.diffusion.reverse_step and cfg_output, the eager sampler's math, and draw
the same noise from the caller's generator in the same order (x_T, then one (n, C) draw per
step, outside any graph), so a seed gives the same tokens up to float reassociation.  DDIM
(sampler="ddim") is the same step on its own coefficient table with temperature 0 and no draws
after x_T.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from d2c.diffusion import SAMPLERS, STEP_COEFS, cfg_output, reverse_step
from d2c.kernels import adaln_mlp
from d2c.precision import accum_dtype

IMPLS = ("eager", "fused", "compiled", "graph")


def packed_head(dl) -> adaln_mlp.PackedHead:
    """DiffLoss `dl`'s packed weights, rebuilt only when a parameter changed (a stable object for
    compile guards and captured graphs, which are dropped with it)."""
    key = adaln_mlp.weights_key(dl.net)
    pk = dl.__dict__.get("_packed")
    if pk is None or pk.key != key:
        with torch.inference_mode(False), torch.no_grad():   # usable outside inference mode too
            pk = dl.__dict__["_packed"] = adaln_mlp.PackedHead(dl.net)
        dl.__dict__["_graphs"] = {}
    return pk


def _step_tables(dl, diffusion, device, dtype, sampler: str = "ddpm"):
    """(6, T) rows of the sampler's coefficients (SAMPLERS, in STEP_COEFS order) and the (T,)
    timestep map on the device, cached per diffusion."""
    cache = dl.__dict__.setdefault("_tables", {})
    key = (id(diffusion), device, dtype, sampler)
    if key not in cache:
        with torch.inference_mode(False):
            tab = torch.stack([getattr(diffusion, k) for k in SAMPLERS[sampler]]).to(device=device, dtype=dtype)
            tmap = diffusion.timestep_map.to(device)
        cache[key] = (diffusion, tab, tmap)          # keeps diffusion alive: id stays unique
    return cache[key][1], cache[key][2]


def _bucket(n: int, impl: str) -> int:
    if impl == "graph":                      # few graphs: each bucket is captured once
        return max(8, 1 << max(0, n - 1).bit_length())
    return max(8, -(-n // 8) * 8)            # >= 8 rows: no 0/1 size specialisation in dynamo


def _time_embed(packed, t):
    """TimestepEmbedder.forward from packed tensors (one row: all rows share t)."""
    from d2c.models.diffloss import TimestepEmbedder
    emb = TimestepEmbedder.timestep_embedding(t, packed.freq_dim).to(packed.te_w1.dtype)
    return F.linear(F.silu(F.linear(emb, packed.te_w1, packed.te_b1)), packed.te_w2, packed.te_b2)


def fused_step(packed, x, i_t, noise, c_emb, cfg, temperature, clip, tab, tmap, guided: bool, backend: str):
    """One reverse step of DiffLoss.sample as one function of tensors (so it compiles and graphs
    whole): the head on the packed weights, CFG mix, d2c.diffusion.reverse_step.  i_t (1,)
    respaced step index; tab rows = STEP_COEFS; cfg, temperature, clip (bound on pred_x0, inf
    for none) 0-d tensors."""
    y = _time_embed(packed, tmap[i_t]).to(c_emb.dtype) + c_emb
    out = adaln_mlp.head_forward(packed, torch.cat([x, x]) if guided else x, y, backend).to(x.dtype)
    if guided:
        out = cfg_output(out, cfg)
    co = tab[:, i_t].to(x.dtype)                                         # (6, 1)
    nonzero = (i_t != 0).to(x.dtype).view(1, 1)                        # no noise at the last step
    return reverse_step(out, x, tuple(co[k:k + 1] for k in range(len(STEP_COEFS))), noise, temperature,
                        clip, nonzero)


_COMPILED = None


def _compiled_step():
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(fused_step, dynamic=True)
    return _COMPILED


def sample(dl, z, temperature, cfg, generator, diffusion_steps, guided: bool, impl: str, progress: bool,
           sampler: str = "ddpm"):
    """DiffLoss `dl`'s reverse chain through a fast path; returns the N sampled rows (the
    conditional ones when guided)."""
    device = z.device
    if impl == "graph" and device.type != "cuda":
        impl = "compiled"
    diffusion = dl.gen_diffusion(diffusion_steps)
    dtype = accum_dtype(z.dtype)
    packed = packed_head(dl)
    backend = adaln_mlp.resolve_head_backend(device, dtype=adaln_mlp.compute_dtype(device, packed.in_w.dtype))
    tab, tmap = _step_tables(dl, diffusion, device, dtype, sampler)
    ddim = sampler == "ddim"
    n = z.shape[0] // 2 if guided else z.shape[0]
    c = dl.in_channels
    c_emb = dl.net.cond_embed(z)
    x = torch.randn((n, c), generator=generator, device=device, dtype=dtype)
    cfg_t = torch.full((), float(cfg), device=device, dtype=dtype)
    temp_t = torch.full((), 0.0 if ddim else float(temperature), device=device, dtype=dtype)
    clip_t = torch.full((), float(dl.clip_x0 or math.inf), device=device, dtype=dtype)
    steps = range(diffusion.num_timesteps - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, leave=False)

    if impl == "fused":
        noise = torch.zeros((n, c), device=device, dtype=dtype)
        for i in steps:
            if not ddim:
                noise = torch.randn((n, c), generator=generator, device=device, dtype=dtype)
            i_t = torch.full((1,), i, dtype=torch.long, device=device)
            x = fused_step(packed, x, i_t, noise, c_emb, cfg_t, temp_t, clip_t, tab, tmap, guided, backend)
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
            if not ddim:
                noise_p[:n] = torch.randn((n, c), generator=generator, device=device, dtype=dtype)
            i_t = torch.full((1,), i, dtype=torch.long, device=device)
            xp = fn(packed, xp, i_t, noise_p, cp, cfg_t, temp_t, clip_t, tab, tmap, guided, backend)
        return xp[:n].clone()

    graphs = dl.__dict__.setdefault("_graphs", {})
    key = (nb, tuple(cp.shape), dtype, device, guided, backend, tab.data_ptr())
    if key not in graphs:
        graphs[key] = _GraphStep(packed, nb, c, cp.shape, dtype, device, guided, backend, tab, tmap)
    g = graphs[key]
    g.x.copy_(xp)
    g.c_emb.copy_(cp)
    g.cfg.copy_(cfg_t)
    g.temp.copy_(temp_t)
    g.clip.copy_(clip_t)
    g.noise.zero_()
    for i in steps:
        if not ddim:
            g.noise[:n].copy_(torch.randn((n, c), generator=generator, device=device, dtype=dtype))
        g.i.fill_(i)
        g.graph.replay()
        g.x.copy_(g.out)
    return g.x[:n].clone()


class _GraphStep:
    """`fused_step` captured as a CUDA graph on static buffers (one per row bucket)."""

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
                fused_step(*args)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fused_step(*args)
