"""Gaussian diffusion for MAR's per-token head (DiffLoss): only what MAR uses.

The math follows DDPM (Ho et al. 2020) with IDDPM's improvements (Nichol & Dhariwal 2021):
  * cosine schedule  alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2),  s = 0.008
                     beta_t = min(1 - alpha_bar((t+1)/T) / alpha_bar(t/T), 0.999)   (IDDPM eq. 17)
  * epsilon prediction; learned-range variance (IDDPM eq. 15):
        log Sigma = f * log beta_t + (1 - f) * log beta~_t,   f = (v + 1) / 2
    where the model emits 2C channels [eps, v] and beta~_t is the posterior variance;
  * hybrid loss  L = ||eps - eps_theta||^2 (mean over channels) + L_vb, where L_vb is the KL
    (in bits) between q(x_{t-1}|x_t,x_0) and p(x_{t-1}|x_t) with the mean stop-gradded, and
    the discretised decoder NLL at t = 0 (IDDPM sec. 3.1, as in MAR's "learn_sigma" setup);
  * respacing: keep a subset S of the 1000 steps and rebuild betas from the kept alpha_bar,
    beta'_i = 1 - alpha_bar[S_i] / alpha_bar[S_{i-1}] (IDDPM sec. 4); the network still sees the
    original timestep index.
Reverse sampling is ancestral DDPM: x_{t-1} = mu + temperature * exp(0.5 log Sigma) * z, no
noise at the final step, every draw from the caller's `torch.Generator`; or deterministic DDIM
(Song et al. 2021, eq. 12 with eta = 0) on the same respaced steps:
    x_{t-1} = sqrt(ab_{t-1}) x0 + sqrt(1 - ab_{t-1}) eps',  eps' = (x_t / sqrt(ab_t) - x0) / sqrt(1/ab_t - 1)
which is linear in (x0, x_t), so it is the DDPM step with other mean coefficients and no noise.

Schedule arrays live on the CPU in float64 (attributes named as in IDDPM/ADM), so tests can
compare them to closed forms; copies per device/dtype are cached for the hot loop.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from d2c.precision import accum_dtype

_CPU = torch.device("cpu")


# ------------------------------------------------------------------------------ schedules
def cosine_alpha_bar(t: float, s: float = 0.008) -> float:
    """alpha_bar at normalised time t in [0, 1] (IDDPM eq. 17, without the f(0) division:
    it cancels in the beta ratio)."""
    return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def cosine_betas(num_timesteps: int = 1000, max_beta: float = 0.999) -> torch.Tensor:
    """beta_t = min(1 - alpha_bar((t+1)/T) / alpha_bar(t/T), max_beta), float64 on the CPU."""
    T = num_timesteps
    betas = [min(1 - cosine_alpha_bar((i + 1) / T) / cosine_alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float64, device=_CPU)


def space_timesteps(num_timesteps: int, section_counts) -> list[int]:
    """Which of the original steps to keep.

    `section_counts`: an int or "100" (evenly spaced, first and last step included),
    "10,20,30" (split the range into equal sections, that many steps from each), or
    "ddimN" (a constant integer stride giving exactly N steps, starting at 0).
    """
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    elif isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            want = int(section_counts[4:])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"respacing {section_counts!r}: no integer stride gives {want} of {num_timesteps} steps")
        section_counts = [int(c) for c in section_counts.split(",")]
    n_sec = len(section_counts)
    base, extra = divmod(num_timesteps, n_sec)
    kept, start = [], 0
    for i, count in enumerate(section_counts):
        size = base + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"respacing: cannot take {count} steps from a section of {size}; allowed 1..{size}")
        stride = 1.0 if count == 1 else (size - 1) / (count - 1)
        kept += [start + round(j * stride) for j in range(count)]
        start += size
    return sorted(set(kept))


# ------------------------------------------------------------------------------ helpers
def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x):
    # tanh approximation of Phi used by DDPM's discretised decoder
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(x) for data on a 256-level grid in [-1, 1] (DDPM sec. 3.3), in nats."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _mean_flat(x):
    return x.mean(dim=tuple(range(1, x.dim())))


# ------------------------------------------------------------------------------ diffusion
class GaussianDiffusion:
    """Epsilon-predicting, learned-range-variance diffusion over `betas` (possibly respaced).

    `timestep_map[i]` is the original step index of step i; the network is always called
    with the original index.  Methods take `model_fn(x, t_orig) -> (N, 2C, ...)`.
    """

    _ARRAYS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
               "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
               "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
               "posterior_mean_coef1", "posterior_mean_coef2", "log_betas", "ddim_coef1", "ddim_coef2")

    def __init__(self, betas: torch.Tensor, timestep_map: Iterable[int] | None = None):
        b = torch.as_tensor(betas, dtype=torch.float64, device=_CPU)
        if b.dim() != 1 or not bool(((b > 0) & (b <= 1)).all()):
            raise ValueError("betas must be a 1-D sequence in (0, 1]")
        self.num_timesteps = T = b.shape[0]
        self.timestep_map = torch.arange(T, device=_CPU) if timestep_map is None else \
            torch.as_tensor(list(timestep_map), dtype=torch.long, device=_CPU)
        one = torch.ones(1, dtype=torch.float64, device=_CPU)
        self.betas = b
        self.log_betas = torch.log(b)
        alphas = 1.0 - b
        self.alphas_cumprod = ac = torch.cumprod(alphas, 0)
        self.alphas_cumprod_prev = acp = torch.cat([one, ac[:-1]])
        # q(x_t | x_0) = N(sqrt(ab) x_0, (1 - ab) I)                                  (DDPM eq. 4)
        self.sqrt_alphas_cumprod = ac.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - ac).sqrt()
        # x_0 = x_t / sqrt(ab) - sqrt(1/ab - 1) eps
        self.sqrt_recip_alphas_cumprod = (1.0 / ac).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / ac - 1.0).sqrt()
        # q(x_{t-1} | x_t, x_0): variance beta~ and mean c1 x_0 + c2 x_t                 (DDPM eq. 7)
        self.posterior_variance = pv = b * (1.0 - acp) / (1.0 - ac)
        # beta~_0 = 0: its log is clipped to beta~_1
        self.posterior_log_variance_clipped = torch.log(torch.cat([pv[1:2], pv[1:]])) if T > 1 \
            else torch.log(b)
        self.posterior_mean_coef1 = b * acp.sqrt() / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - acp) * alphas.sqrt() / (1.0 - ac)
        # DDIM (eta = 0): x_{t-1} = sqrt(abp) x0 + sqrt(1 - abp) (sqrt(1/ab) x_t - x0) / sqrt(1/ab - 1)
        self.ddim_coef1 = acp.sqrt() - (1.0 - acp).sqrt() / self.sqrt_recipm1_alphas_cumprod
        self.ddim_coef2 = (1.0 - acp).sqrt() * self.sqrt_recip_alphas_cumprod / self.sqrt_recipm1_alphas_cumprod
        self._cache: dict = {}

    # -- coefficient lookup: arr[t] broadcast to x's rank, float32 (float64 for float64 x)
    def _coef(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        dt = accum_dtype(x.dtype)
        key = (name, x.device, dt)
        arr = self._cache.get(key)
        if arr is None:
            with torch.inference_mode(False):  # cached tensors must be usable under autograd too
                arr = getattr(self, name).to(device=x.device, dtype=dt)
            self._cache[key] = arr
        return arr[t].view(-1, *([1] * (x.dim() - 1)))

    def _model_t(self, t: torch.Tensor) -> torch.Tensor:
        key = ("timestep_map", t.device, torch.long)
        m = self._cache.get(key)
        if m is None:
            with torch.inference_mode(False):
                m = self.timestep_map.to(t.device)
            self._cache[key] = m
        return m[t]

    # -- forward process
    def q_sample(self, x0, t, noise):
        """x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps."""
        return self._coef("sqrt_alphas_cumprod", t, x0) * x0 + \
            self._coef("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def q_posterior_mean_variance(self, x0, xt, t):
        mean = self._coef("posterior_mean_coef1", t, xt) * x0 + self._coef("posterior_mean_coef2", t, xt) * xt
        return mean, self._coef("posterior_variance", t, xt), self._coef("posterior_log_variance_clipped", t, xt)

    # -- reverse process from a model output
    def step_coefs(self, t: torch.Tensor, x: torch.Tensor, sampler: str = "ddpm") -> tuple:
        """The step coefficients of `sampler` at t, broadcastable to x (what `p_mean_variance`
        needs): STEP_COEFS for ddpm, SAMPLERS[sampler] in general."""
        return tuple(self._coef(name, t, x) for name in SAMPLERS[sampler])

    def p_mean_variance(self, out, x, t, clip_x0: float | None = None):
        """(mean, log_variance, pred_x0) of p(x_{t-1} | x_t) for out = [eps, v]; see
        `p_mean_variance_from` (the same math on coefficients already looked up)."""
        return p_mean_variance_from(out, x, self.step_coefs(t, x), clip_x0)

    def vb_terms_bpd(self, out, x0, xt, t):
        """L_vb per row in bits: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)); decoder NLL at t = 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, xt, t)
        mean, log_var, _ = self.p_mean_variance(out, xt, t)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model_fn: Callable, x0, t, noise=None) -> dict:
        """Hybrid loss per row: {"loss", "mse", "vb"} (IDDPM L_hybrid with lambda = 1, as MAR)."""
        if noise is None:
            noise = torch.randn_like(x0)
        xt = self.q_sample(x0, t, noise)
        out = model_fn(xt, self._model_t(t))
        c = x0.shape[1]
        eps = out[:, :c]
        # the VB term trains only the variance: stop-grad on the eps half
        vb = self.vb_terms_bpd(torch.cat([eps.detach(), out[:, c:]], dim=1), x0, xt, t)
        mse = _mean_flat((noise - eps) ** 2)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def p_sample(self, model_fn: Callable, x, t, *, temperature: float = 1.0, generator=None,
                 clip_x0: float | None = None, sampler: str = "ddpm"):
        """One reverse step x_t -> x_{t-1}: ancestral (ddpm; the noise std is multiplied by
        `temperature`) or deterministic (ddim: no noise drawn, temperature has no effect)."""
        out = model_fn(x, self._model_t(t))
        if sampler == "ddim":
            return reverse_step(out, x, self.step_coefs(t, x, sampler), torch.zeros_like(x), 0.0, clip_x0, 0.0)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        nonzero = (t != 0).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))   # no noise at the last step
        return reverse_step(out, x, self.step_coefs(t, x), noise, temperature, clip_x0, nonzero)

    def p_sample_loop(self, model_fn: Callable, noise, *, temperature: float = 1.0, generator=None,
                      progress: bool = False, clip_x0: float | None = None, sampler: str = "ddpm"):
        """Run all `num_timesteps` reverse steps from x_T = noise with `sampler` (ddpm | ddim)."""
        if sampler not in SAMPLERS:
            raise ValueError(f"head_sampler={sampler!r}; allowed: {', '.join(SAMPLERS)}")
        x = noise
        steps = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, leave=False)
        for i in steps:
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            x = self.p_sample(model_fn, x, t, temperature=temperature, generator=generator, clip_x0=clip_x0,
                              sampler=sampler)
        return x


# ------------------------------------------------------------------------------ one reverse step
# Coefficients of one step, in the order p_mean_variance_from takes them (IDDPM / ADM names).
STEP_COEFS = ("posterior_log_variance_clipped", "log_betas", "sqrt_recip_alphas_cumprod",
              "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1", "posterior_mean_coef2")
# sampler -> its coefficients in that order: DDIM swaps the mean's (x0, x_t) weights and runs
# without noise (temperature 0), so every fast path runs it unchanged
SAMPLERS = {"ddpm": STEP_COEFS, "ddim": STEP_COEFS[:4] + ("ddim_coef1", "ddim_coef2")}


def p_mean_variance_from(out, x, coefs, clip_x0=None):
    """Split out = [eps, v] (C channels each); return (mean, log_variance, pred_x0) of
    p(x_{t-1} | x_t) from the STEP_COEFS values at t (tensors broadcastable to x).

    clip_x0: clamp pred_x0 to [-clip_x0, clip_x0] (a float, a 0-d tensor, or None for none;
    guided-diffusion's clip_denoised with a bound; MAR samples unclipped).  At t = T-1 the cosine
    schedule's beta = 0.999 makes pred_x0 = x / sqrt(abar) amplify eps errors ~1e4x: an
    under-trained head (a few hundred CPU steps) then diverges (measured: sampled latents std
    ~1600 for unit-std data)."""
    c = x.shape[1]
    eps, v = out[:, :c], out[:, c:]
    min_log, max_log, sr, srm1, c1, c2 = coefs
    frac = (v + 1) / 2                                                 # v in [-1, 1] -> [0, 1]
    log_var = frac * max_log + (1 - frac) * min_log                    # IDDPM eq. 15
    pred_x0 = sr * x - srm1 * eps                                      # x0 = x_t / sqrt(ab) - sqrt(1/ab - 1) eps
    if clip_x0 is not None:
        pred_x0 = pred_x0.clamp(-clip_x0, clip_x0)
    return c1 * pred_x0 + c2 * x, log_var, pred_x0                     # DDPM eq. 7 with x0 := pred


def reverse_step(out, x, coefs, noise, temperature, clip_x0, nonzero):
    """The one reverse step every sampler runs (eager, fused, compiled, CUDA graph): x_t ->
    x_{t-1} = mean + nonzero * exp(log_var / 2) * temperature * noise, where `nonzero` is 0 at
    the last step (no noise added) and 1 elsewhere."""
    mean, log_var, _ = p_mean_variance_from(out, x, coefs, clip_x0)
    return mean + nonzero * torch.exp(0.5 * log_var) * (temperature * noise)


def cfg_output(out, cfg):
    """Guided model output from a [cond; uncond] batch (2N rows): eps = eps_u + cfg (eps_c - eps_u)
    (CFG on eps only), the variance channels from the conditional half (MAR's layout); N rows."""
    n, c = out.shape[0] // 2, out.shape[1] // 2
    (eps_c, eps_u), v = out[:, :c].chunk(2), out[:n, c:]
    return torch.cat([eps_u + cfg * (eps_c - eps_u), v], dim=1)


def create_diffusion(timestep_respacing="", num_timesteps: int = 1000) -> GaussianDiffusion:
    """Cosine schedule over `num_timesteps`, respaced to `timestep_respacing` ("" = all steps)."""
    base = cosine_betas(num_timesteps)
    if timestep_respacing in ("", None) or str(timestep_respacing) == str(num_timesteps):
        return GaussianDiffusion(base)
    kept = space_timesteps(num_timesteps, timestep_respacing)
    ac = torch.cumprod(1.0 - base, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64, device=_CPU), ac[kept][:-1]])
    return GaussianDiffusion(1.0 - ac[kept] / prev, timestep_map=kept)


# ------------------------------------------------------------------------------ the network's timestep input
def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    """(N,) timesteps -> (N, dim) float32 [cos(t w_i), sin(t w_i)], w_i = max_period^(-i/half)
    (DiT's sinusoidal embedding; a zero column pads an odd dim).  Here, below both the DiffLoss
    module and the head's fast paths, so neither imports the other for it."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb
