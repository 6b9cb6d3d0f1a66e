"""Gaussian diffusion of the DiffLoss head: schedule against closed forms, respacing, the
hybrid loss's VB term, the learned-range variance, and the seeded reverse sampler."""
import math

import pytest
import torch

from d2c.diffusion import GaussianDiffusion, cosine_betas, create_diffusion, space_timesteps

T = 1000
S = 0.008


def f(t):  # cosine alpha_bar, un-normalised (IDDPM eq. 17)
    return math.cos(((t / T) + S) / (1 + S) * math.pi / 2) ** 2


def test_cosine_betas_closed_form_and_clipping():
    d = create_diffusion("")
    assert d.num_timesteps == T and d.betas.dtype == torch.float64
    want = torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)], dtype=torch.float64)
    torch.testing.assert_close(d.betas, want, rtol=1e-12, atol=0)
    assert d.betas.max().item() == pytest.approx(0.999, abs=0) and d.betas[-1].item() == 0.999
    assert (d.betas > 0).all() and (d.betas[:-1] < 0.999).all()
    # the product telescopes: alpha_bar_t = f(t+1)/f(0) wherever beta was not clipped
    ab = torch.tensor([f(i + 1) / f(0) for i in range(T - 1)], dtype=torch.float64)
    torch.testing.assert_close(d.alphas_cumprod[:-1], ab, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(d.alphas_cumprod_prev[1:], d.alphas_cumprod[:-1])
    assert d.alphas_cumprod_prev[0].item() == 1.0


def test_posterior_matches_gaussian_conditioning():
    d = create_diffusion("")
    b, ab, abp = d.betas, d.alphas_cumprod, d.alphas_cumprod_prev
    torch.testing.assert_close(d.posterior_variance, b * (1 - abp) / (1 - ab), rtol=1e-12, atol=0)
    assert d.posterior_log_variance_clipped[0].item() == pytest.approx(math.log(d.posterior_variance[1].item()), rel=1e-12)
    torch.testing.assert_close(d.posterior_log_variance_clipped[1:], d.posterior_variance[1:].log(), rtol=1e-12, atol=0)
    # independent derivation: x_{t-1} ~ N(sqrt(abp) x0, 1 - abp), x_t = sqrt(1 - b) x_{t-1} + sqrt(b) n
    # posterior precision = 1/(1 - abp) + (1 - b)/b; mean = var (sqrt(abp) x0/(1 - abp) + sqrt(1 - b) x_t / b)
    t = torch.arange(1, T)
    prec = 1 / (1 - abp[t]) + (1 - b[t]) / b[t]
    var = 1 / prec
    torch.testing.assert_close(d.posterior_variance[t], var, rtol=1e-9, atol=0)
    torch.testing.assert_close(d.posterior_mean_coef1[t], var * abp[t].sqrt() / (1 - abp[t]), rtol=1e-9, atol=0)
    torch.testing.assert_close(d.posterior_mean_coef2[t], var * (1 - b[t]).sqrt() / b[t], rtol=1e-9, atol=0)
    # q_posterior_mean_variance uses them
    x0, xt = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    tt = torch.tensor([1, 10, 100, 500, 999])
    mean, v, _ = d.q_posterior_mean_variance(x0, xt, tt)
    want = var[tt - 1, None] * (abp[tt, None].sqrt() * x0 / (1 - abp[tt, None]) + (1 - b[tt, None]).sqrt() * xt / b[tt, None])
    torch.testing.assert_close(mean, want, rtol=1e-9, atol=1e-12)


def test_respacing_keeps_alphas_cumprod():
    base = create_diffusion("")
    kept = space_timesteps(T, "100")
    assert len(kept) == 100 and kept[0] == 0 and kept[-1] == T - 1 and kept[1] == 10
    d = create_diffusion("100")
    assert d.num_timesteps == 100
    assert d.timestep_map.tolist() == kept
    torch.testing.assert_close(d.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-10, atol=0)
    assert space_timesteps(T, "ddim50") == list(range(0, T, 20))
    assert space_timesteps(T, "10,20") == sorted(set(space_timesteps(500, "10") + [500 + i for i in space_timesteps(500, "20")]))
    with pytest.raises(ValueError, match="allowed"):
        space_timesteps(T, "2000")
    assert torch.equal(create_diffusion("1000").betas, base.betas)


def _perfect(d, n=64, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, c, generator=g, dtype=torch.float64).clamp(-0.9, 0.9)
    noise = torch.randn(n, c, generator=g, dtype=torch.float64)
    t = torch.randint(1, d.num_timesteps, (n,), generator=g)
    return x0, noise, t, d.q_sample(x0, t, noise)


def test_vb_term_zero_for_perfect_prediction_positive_otherwise():
    d = create_diffusion("")
    x0, noise, t, xt = _perfect(d)
    v_post = -torch.ones_like(noise)             # v = -1: log variance = log posterior variance
    vb = d.vb_terms_bpd(torch.cat([noise, v_post], 1), x0, xt, t)
    assert vb.abs().max().item() < 1e-8
    assert (d.vb_terms_bpd(torch.cat([noise + 0.3, v_post], 1), x0, xt, t) > 1e-6).all()
    vb_large = d.vb_terms_bpd(torch.cat([noise, torch.ones_like(noise)], 1), x0, xt, t)
    assert (vb_large > 1e-12).all() and vb_large.mean() > 1e-6  # beta vs beta~: small but > 0
    # hybrid loss: mse + vb; both vanish for the perfect model
    out = d.training_losses(lambda x, ts: torch.cat([noise, v_post], 1), x0, t, noise=noise)
    assert out["loss"].abs().max().item() < 1e-8
    torch.testing.assert_close(out["loss"], out["mse"] + out["vb"])


def test_learned_range_variance_and_stop_grad():
    d = create_diffusion("")
    x0, noise, t, xt = _perfect(d)
    for v, name in ((-1.0, "posterior_log_variance_clipped"), (1.0, "log_betas")):
        _, log_var, _ = d.p_mean_variance(torch.cat([noise, torch.full_like(noise, v)], 1), xt, t)
        torch.testing.assert_close(log_var, getattr(d, name)[t, None].expand_as(log_var))
    _, log_var, _ = d.p_mean_variance(torch.cat([noise, torch.zeros_like(noise)], 1), xt, t)
    want = 0.5 * (d.log_betas[t] + d.posterior_log_variance_clipped[t])
    torch.testing.assert_close(log_var[:, 0], want)
    # the VB term does not train the mean (IDDPM: stop-grad), the MSE term does
    out = torch.cat([noise + 0.1, torch.zeros_like(noise)], 1).requires_grad_()
    losses = d.training_losses(lambda x, ts: out, x0, t, noise=noise)
    (g_vb,) = torch.autograd.grad(losses["vb"].sum(), out, retain_graph=True)
    assert g_vb[:, :4].abs().max() == 0 and g_vb[:, 4:].abs().max() > 0
    (g_mse,) = torch.autograd.grad(losses["mse"].sum(), out)
    assert g_mse[:, :4].abs().max() > 0


def _fixed_model(x, ts):
    # a deterministic stand-in for the network: eps and v from x and the original timestep
    s = (ts.to(x.dtype) / 1000.0)[:, None]
    return torch.cat([0.3 * x * s, torch.tanh(x - s)], dim=1)


def test_temperature_scales_noise_std():
    d = create_diffusion("20")
    x = torch.randn(256, 4, dtype=torch.float64)
    t = torch.full((256,), 7, dtype=torch.long)
    mean, log_var, _ = d.p_mean_variance(_fixed_model(x, d.timestep_map[t]), x, t)
    dev = {}
    for temp in (0.0, 0.5, 1.0, 2.0):
        g = torch.Generator().manual_seed(3)
        dev[temp] = d.p_sample(_fixed_model, x, t, temperature=temp, generator=g) - mean
    assert dev[0.0].abs().max().item() < 1e-12
    torch.testing.assert_close(dev[2.0], 2.0 * dev[1.0])
    torch.testing.assert_close(dev[0.5], 0.5 * dev[1.0])
    z = dev[1.0] / torch.exp(0.5 * log_var)        # the unit noise that was drawn
    assert abs(z.std().item() - 1.0) < 0.1
    # last step (t = 0) adds no noise
    t0 = torch.zeros(256, dtype=torch.long)
    mean0, _, _ = d.p_mean_variance(_fixed_model(x, d.timestep_map[t0]), x, t0)
    torch.testing.assert_close(d.p_sample(_fixed_model, x, t0, temperature=1.0), mean0)


def test_generator_reproduces_reverse_chain():
    d = create_diffusion("25")

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(16, 4, generator=g)
        return d.p_sample_loop(_fixed_model, noise, generator=g)

    torch.manual_seed(123)
    a = run(0)
    torch.manual_seed(456)                            # the global RNG must not matter
    assert torch.equal(a, run(0))
    assert not torch.allclose(a, run(1))


@pytest.mark.parametrize("respacing", ["100", "ddim50"])
def test_sampler_recovers_gaussian_data_with_exact_eps(respacing):
    """For x0 ~ N(mu, s^2) the optimal eps is known in closed form; the respaced ancestral
    sampler driven by it must reproduce the data distribution (checks the timestep map,
    the respaced betas and the posterior step together)."""
    base, d = create_diffusion(""), create_diffusion(respacing)
    mu, s = 0.5, 0.3

    def exact(x, ts):  # E[eps | x_t] with alpha_bar of the ORIGINAL step
        ab = base.alphas_cumprod[ts][:, None]
        eps = (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * s * s + 1 - ab)
        return torch.cat([eps, -torch.ones_like(x)], 1)

    g = torch.Generator().manual_seed(0)
    x = d.p_sample_loop(exact, torch.randn(20000, 1, generator=g, dtype=torch.float64), generator=g)
    assert abs(x.mean().item() - mu) < 0.02
    assert abs(x.std().item() - s) < 0.03


def test_gaussian_diffusion_rejects_bad_betas():
    with pytest.raises(ValueError):
        GaussianDiffusion(torch.tensor([0.1, 0.0]))
    assert cosine_betas(10).shape == (10,)


def test_coefficient_cache_usable_under_autograd_after_inference_mode():
    d = create_diffusion("")
    x0, t = torch.randn(4, 3), torch.tensor([0, 5, 500, 999])
    with torch.inference_mode():
        d.training_losses(lambda x, ts: torch.cat([x, x], 1), x0, t)
    w = torch.ones(1, requires_grad=True)
    d.training_losses(lambda x, ts: torch.cat([x * w, x * w], 1), x0, t)["loss"].sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_clip_x0_bounds_a_wrong_eps_and_is_exact_when_loose():
    """A head that is badly wrong (an untrained one) makes the unclipped chain blow up through
    pred_x0 = x / sqrt(abar) at t = T-1; clip_x0 keeps every step's pred_x0, and so the
    result, at data scale.  A bound no value reaches changes nothing, bit for bit."""
    d = create_diffusion("50")

    def wrong(x, ts):
        return torch.cat([-2.0 * x, -torch.ones_like(x)], 1)

    def run(clip, model=wrong):
        g = torch.Generator().manual_seed(0)
        return d.p_sample_loop(model, torch.randn(4000, 1, generator=g, dtype=torch.float64),
                               generator=g, clip_x0=clip)

    assert run(None).abs().max() > 1e3           # the divergence the bound is for
    assert run(3.0).abs().max() <= 3.0 + 1e-6    # last step: mean = pred_x0, no noise added
    assert torch.equal(run(1e30, _fixed_model), run(None, _fixed_model))


def test_fused_sampler_applies_clip_x0_like_eager():
    from d2c.models.diffloss import DiffLoss
    torch.manual_seed(0)
    dl = DiffLoss(4, 16, 2, 32, diffusion_steps=10, clip_x0=0.5).eval()
    for p in dl.parameters():                    # non-zero output layer: eps far from the truth
        torch.nn.init.normal_(p, std=0.3)
    z = torch.randn(6, 16)
    with torch.no_grad():
        a = dl.sample(z, generator=torch.Generator().manual_seed(1), impl="eager")
        b = dl.sample(z, generator=torch.Generator().manual_seed(1), impl="fused")
        dl.clip_x0 = None
        c = dl.sample(z, generator=torch.Generator().manual_seed(1), impl="eager")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a, c)


def _ddim_reference(model, noise, respacing, clip=None):
    """DDIM (Song et al. 2021, eq. 12, eta = 0) written out in float64 from alpha_bar alone, as
    ADM's ddim_sample: eps recomputed from the (clipped) pred_x0, then
    x_{t-1} = sqrt(ab_prev) x0 + sqrt(1 - ab_prev) eps."""
    base = cosine_betas(T)
    ab_all = torch.cumprod(1 - base, 0)
    kept = space_timesteps(T, respacing) if respacing else list(range(T))
    x = noise.double()
    for i in reversed(range(len(kept))):
        ab = ab_all[kept[i]]
        ab_prev = ab_all[kept[i - 1]] if i > 0 else torch.tensor(1.0, dtype=torch.float64)
        eps = model(x, torch.full((x.shape[0],), kept[i], dtype=torch.long))[:, :x.shape[1]]
        x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
    return x


@pytest.mark.parametrize("respacing,clip", [("", None), ("25", None), ("25", 0.5), ("ddim10", None)])
def test_ddim_matches_float64_reference(respacing, clip):
    """The ddim sampler (DDPM's step with DDIM's mean coefficients, no noise) equals DDIM written
    out from alpha_bar, on the full 1000-step schedule and respaced ones, with and without clip."""
    d = create_diffusion(respacing)
    noise = torch.randn(64, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out = d.p_sample_loop(_fixed_model, noise, sampler="ddim", clip_x0=clip)
    ref = _ddim_reference(_fixed_model, noise, respacing, clip)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    ddpm = d.p_sample_loop(_fixed_model, noise, generator=torch.Generator().manual_seed(0), clip_x0=clip)
    assert (out - ddpm).abs().max() > 1e-3           # a different sampler, not the ancestral one


def test_ddim_is_deterministic_draws_nothing_and_ignores_temperature():
    d = create_diffusion("20")
    noise = torch.randn(32, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    a = d.p_sample_loop(_fixed_model, noise, sampler="ddim", generator=g, temperature=0.5)
    assert torch.equal(g.get_state(), state)          # no noise drawn after x_T
    b = d.p_sample_loop(_fixed_model, noise, sampler="ddim", generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="head_sampler='euler'; allowed: ddpm, ddim"):
        d.p_sample_loop(_fixed_model, noise, sampler="euler")


@pytest.mark.parametrize("respacing", ["50", "ddim20"])
def test_ddim_maps_the_prior_to_gaussian_data_with_exact_eps(respacing):
    """With the exact eps of x0 ~ N(mu, s^2) the DDIM ODE carries N(0, 1) to the data distribution."""
    base, d = create_diffusion(""), create_diffusion(respacing)
    mu, s = 0.5, 0.3

    def exact(x, ts):
        ab = base.alphas_cumprod[ts][:, None]
        eps = (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * s * s + 1 - ab)
        return torch.cat([eps, -torch.ones_like(x)], 1)

    x = d.p_sample_loop(exact, torch.randn(20000, 1, generator=torch.Generator().manual_seed(0),
                                           dtype=torch.float64), sampler="ddim")
    assert abs(x.mean().item() - mu) < 0.02
    assert abs(x.std().item() - s) < 0.03
