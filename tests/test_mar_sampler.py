"""MAR's sampler (stage 2, `MAR.sample_tokens`): seeded, CFG batching and schedules, MaskGIT's
cosine reveal, and the accelerations (DiSA's falling head steps, LazyMAR's condition cache)."""
import math

import pytest
import torch

from test_mar import _inputs, _tiny

def _sample(m, labels, codes=None, generator=None, **settings):
    """MAR.sample_tokens at the stage-2 settings given by name (unguided unless cfg is given)."""
    from d2c.sampling import SamplerConfig
    return m.sample_tokens(labels, SamplerConfig(**{"cfg": 1.0, **settings}), codes=codes, generator=generator)
@pytest.mark.parametrize("kind", ["none", "cross_attn", "qformer"])
def test_mar_sample_end_to_end(kind):
    m = _tiny(kind)
    _, labels, codes = _inputs(b=2)
    lat, nfe = _sample(m, labels, steps=4, cfg=2.5, codes=codes, diffusion_steps=8,
                          generator=torch.Generator().manual_seed(0))
    assert lat.shape == (2, 4, 8, 8) and torch.isfinite(lat).all()
    assert nfe == {"mar_steps": 4, "reverse_steps": 4 * 8}


def test_mar_sample_seeded_and_cfg_one_is_conditional():
    m = _tiny()
    labels = torch.tensor([1, 7])

    def run(seed, **kw):
        torch.manual_seed(seed + 100)                        # the global RNG must not matter
        return _sample(m, labels, steps=3, diffusion_steps=6, generator=torch.Generator().manual_seed(seed), **kw)[0]

    a = run(0, cfg=3.0)
    assert torch.equal(a, run(0, cfg=3.0))
    assert not torch.allclose(a, run(1, cfg=3.0))
    assert not torch.allclose(a, run(0, cfg=1.0))
    # cfg = 1 runs the conditional batch only, the same as constant guidance at scale 1
    assert torch.equal(run(0, cfg=1.0), run(0, cfg=1.0, cfg_schedule="constant"))
    calls = []
    h = m.encoder_blocks[0].register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    run(0, cfg=1.0)
    run(0, cfg=2.0)
    h.remove()
    assert calls == [2] * 3 + [4] * 3


@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_mar_sample_reveals_on_cosine_schedule(schedule):
    m = _tiny()
    calls = []
    orig = m.diffloss.sample

    def spy(z, temperature, cfg, **k):
        calls.append((z.shape[0], cfg, k["guided"], k["diffusion_steps"]))
        return orig(z, temperature, cfg, **k)

    m.diffloss.sample = spy
    _sample(m, torch.tensor([0, 1]), steps=5, cfg=3.0, cfg_schedule=schedule, diffusion_steps=2,
                    generator=torch.Generator().manual_seed(0))
    L, left, want = 64, 64, []
    for s in range(5):
        nxt = max(1, min(left - 1, math.floor(L * math.cos(math.pi / 2 * (s + 1) / 5))))
        scale = 1 + 2.0 * (L - nxt) / L if schedule == "linear" else 3.0
        nxt = 0 if s == 4 else nxt
        want.append((2 * 2 * (left - nxt), pytest.approx(scale), True, 2))   # [cond; uncond] rows
        left = nxt
    assert calls == want and sum(c[0] for c in calls) == 2 * 2 * 64


def test_diffusion_steps_fall_linearly_over_the_rounds_when_asked():
    """diffusion_steps_last (DiSA): the head runs diffusion_steps in the first round, falling
    linearly to diffusion_steps_last in the last; off (None), or equal to the first, it is
    today's sampler bit for bit."""
    m = _tiny()
    seen = []
    orig = m.diffloss.sample

    def spy(z, temperature, cfg, **k):
        seen.append(k["diffusion_steps"])
        return orig(z, temperature, cfg, **k)

    def run(**kw):
        seen.clear()
        lat, nfe = _sample(m, torch.tensor([0, 1]), steps=5, cfg=2.0, diffusion_steps=9,
                                   generator=torch.Generator().manual_seed(0), **kw)
        return lat, nfe, list(seen)

    m.diffloss.sample = spy
    base, nfe, counts = run()
    assert counts == [9] * 5 and nfe["reverse_steps"] == 45
    same, _, counts = run(diffusion_steps_last=9)
    assert torch.equal(same, base) and counts == [9] * 5
    falling, nfe, counts = run(diffusion_steps_last=1)
    assert counts == [9, 7, 5, 3, 1] and nfe["reverse_steps"] == 25
    assert not torch.allclose(falling, base)
    with pytest.raises(ValueError, match="diffusion_steps_last=0: allowed"):
        run(diffusion_steps_last=0)


@pytest.mark.parametrize("fusion", ["none", "cross_attn"])
def test_uncond_refresh_reuses_the_cfg_difference_between_full_rounds(fusion):
    """uncond_refresh=k (LazyMAR's condition cache): the [cond; uncond] batch runs in rounds
    0, k, 2k, ...; in the rounds between only the conditional half runs, and the head's
    unconditional conditions are z_cond + (z_uncond - z_cond) of the last full round.  k=1 is
    the uncached sampler bit for bit; without CFG there is nothing to cache."""
    m = _tiny(fusion)
    b, steps = 2, 5
    labels = torch.tensor([3, 7])
    codes = torch.randint(0, 512, (b, 64), generator=torch.Generator().manual_seed(4)) if fusion != "none" else None
    outs, heads = [], []
    orig_cond, orig_head = m.condition, m.diffloss.sample

    def cond_spy(*a, **k):
        z = orig_cond(*a, **k)
        outs.append(z.clone())
        return z

    def head_spy(z, temperature, cfg, **k):
        heads.append(z.clone())
        return orig_head(z, temperature, cfg, **k)

    m.condition, m.diffloss.sample = cond_spy, head_spy

    def run(cfg=2.5, **kw):
        outs.clear(), heads.clear()
        lat, _ = _sample(m, labels, steps=steps, cfg=cfg, codes=codes, diffusion_steps=3,
                                 generator=torch.Generator().manual_seed(0), **kw)
        return lat, [z.shape[0] for z in outs], list(outs), list(heads)

    base, sizes, _, _ = run()
    assert sizes == [2 * b] * steps
    same, sizes, _, _ = run(uncond_refresh=1)
    assert torch.equal(same, base) and sizes == [2 * b] * steps

    cached, sizes, zs, hs = run(uncond_refresh=2)
    assert sizes == [2 * b, b, 2 * b, b, 2 * b]
    for r in (1, 3):                         # rounds without the unconditional pass
        delta = (zs[r - 1][b:] - zs[r - 1][:b]).reshape(-1, zs[r].shape[-1])
        n = hs[r].shape[0] // 2
        got = hs[r][n:] - hs[r][:n]          # per predicted token: its cached cfg difference
        dist = torch.cdist(got.double(), delta.double()).min(1).values
        assert n > 0 and dist.max() < 1e-5
        assert torch.cdist(hs[r][:n].double(), zs[r].reshape(-1, zs[r].shape[-1]).double()).min(1).values.max() < 1e-6
    assert not torch.equal(cached, base)
    assert (cached - base).abs().mean() < base.abs().mean()   # an approximation, not another sampler

    plain, _, _, _ = run(cfg=1.0)
    lazy, sizes, _, _ = run(cfg=1.0, uncond_refresh=3)
    assert torch.equal(lazy, plain) and sizes == [b] * steps
    with pytest.raises(ValueError, match="uncond_refresh=0: allowed"):
        run(uncond_refresh=0)
