"""Fast paths of the diffusion head's sampler (DiffLoss.sample with impl != "eager").

  fused     each reverse step as one function of tensors (`fused_step`): packed AdaLN GEMMs +
            the fused trunk of adaln_mlp (Triton on CUDA, PyTorch ops on CPU); the chain of
            steps is `fused_chain`, its noise drawn first.
  compiled  the same step under torch.compile(dynamic=True); rows padded to a multiple of 8 so
            the changing token counts of MAR's rounds never specialise a graph (no recompiles).
  graph     CUDA only: the whole chain captured once per (row bucket (powers of two), step
            count) as a CUDA graph, so a MAR round's head is one replay (compiled off CUDA).
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

from d2c.diffusion import SAMPLERS, STEP_COEFS, cfg_output, reverse_step, timestep_embedding
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
    """DiffLoss's TimestepEmbedder.forward from packed tensors (one row: all rows share t)."""
    emb = timestep_embedding(t, packed.freq_dim).to(packed.te_w1.dtype)
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


def fused_chain(packed, x, noise, c_emb, cfg, temperature, clip, tab, tmap, steps, guided: bool, backend: str):
    """The whole reverse chain as one function of tensors: `fused_step` for each respaced index in
    steps (T,) (T-1 down to 0), with noise[k] (T, n, C) drawn beforehand in the eager sampler's
    order.  What `impl="fused"` runs and what `impl="graph"` captures as one CUDA graph."""
    for k in range(steps.shape[0]):
        x = fused_step(packed, x, steps[k:k + 1], noise[k], c_emb, cfg, temperature, clip, tab, tmap, guided, backend)
    return x


def _draw_noise(noise, n, generator, ddim: bool):
    """noise[k, :n] for every step k, one draw per step as the eager loop makes them (same values:
    randn is normal_ on fresh memory); DDIM draws nothing after x_T."""
    if not ddim:
        for k in range(noise.shape[0]):
            noise[k, :n].normal_(generator=generator)
    return noise


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
    T = diffusion.num_timesteps
    c_emb = dl.net.cond_embed(z)
    x = torch.randn((n, c), generator=generator, device=device, dtype=dtype)
    cfg_t = torch.full((), float(cfg), device=device, dtype=dtype)
    temp_t = torch.full((), 0.0 if ddim else float(temperature), device=device, dtype=dtype)
    clip_t = torch.full((), float(dl.clip_x0 or math.inf), device=device, dtype=dtype)

    if impl == "fused":
        noise = _draw_noise(torch.zeros((T, n, c), device=device, dtype=dtype), n, generator, ddim)
        steps_t = torch.arange(T - 1, -1, -1, device=device)
        return fused_chain(packed, x, noise, c_emb, cfg_t, temp_t, clip_t, tab, tmap, steps_t, guided, backend)

    # compiled / graph: pad rows to a bucket; padding rows are zeros and are thrown away
    nb = _bucket(n, impl)
    xp = x.new_zeros(nb, c)
    xp[:n] = x
    cp = c_emb.new_zeros((2 * nb if guided else nb), c_emb.shape[1])
    cp[:n] = c_emb[:n]
    if guided:
        cp[nb:nb + n] = c_emb[n:]
    if impl == "compiled":
        # inductor writes its own fused kernels (Triton on GPU): hand it the PyTorch arrangement
        steps = range(T - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, leave=False)
        noise_p = x.new_zeros(nb, c)
        fn = _compiled_step()
        torch._dynamo.mark_dynamic(xp, 0)
        torch._dynamo.mark_dynamic(cp, 0)
        torch._dynamo.mark_dynamic(noise_p, 0)
        for i in steps:
            if not ddim:
                noise_p[:n] = torch.randn((n, c), generator=generator, device=device, dtype=dtype)
            i_t = torch.full((1,), i, dtype=torch.long, device=device)
            xp = fn(packed, xp, i_t, noise_p, cp, cfg_t, temp_t, clip_t, tab, tmap, guided, "torch")
        return xp[:n].clone()

    graphs = dl.__dict__.setdefault("_graphs", {})
    key = (nb, T, tuple(cp.shape), dtype, device, guided, backend, tab.data_ptr())
    if key not in graphs:
        graphs[key] = _GraphChain(packed, nb, c, T, cp.shape, dtype, device, guided, backend, tab, tmap)
    g = graphs[key]
    g.x.copy_(xp)
    g.c_emb.copy_(cp)
    g.cfg.copy_(cfg_t)
    g.temp.copy_(temp_t)
    g.clip.copy_(clip_t)
    g.noise.zero_()
    _draw_noise(g.noise, n, generator, ddim)
    g.graph.replay()
    return g.out[:n].clone()


class _GraphChain:
    """`fused_chain` captured as one CUDA graph on static buffers, per (row bucket, step count):
    a MAR round's whole reverse chain is one replay."""

    def __init__(self, packed, nb, c, T, c_shape, dtype, device, guided, backend, tab, tmap):
        self.x = torch.zeros(nb, c, device=device, dtype=dtype)
        self.noise = torch.zeros(T, nb, c, device=device, dtype=dtype)
        self.c_emb = torch.zeros(c_shape, device=device, dtype=dtype)
        self.steps = torch.arange(T - 1, -1, -1, device=device)
        self.cfg = torch.ones((), device=device, dtype=dtype)
        self.temp = torch.ones((), device=device, dtype=dtype)
        self.clip = torch.full((), math.inf, device=device, dtype=dtype)
        args = (packed, self.x, self.noise, self.c_emb, self.cfg, self.temp, self.clip, tab, tmap, self.steps,
                guided, backend)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):                  # warm-up: Triton compiles, cuBLAS picks algos
            fused_chain(*args)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fused_chain(*args)
