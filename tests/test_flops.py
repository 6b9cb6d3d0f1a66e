"""d2c.flops: the count equals torch's FlopCounterMode on real sampling runs (tiny presets), part
by part, and lands on the H200 reference figures at base sizes (configs / meta device only)."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import d2c
import d2c.sampling
from d2c.config import make_config
from d2c.flops import achieved, decoder_flops, mar_schedule, sampling_flops
from d2c.sampling import SamplerConfig

B = 2


def _model(name, **kw):
    # requires_grad off: FlopCounterMode's module tracker fails on views of grad-requiring
    # parameters under inference_mode (the Q-Former's expanded queries)
    m = d2c.build(name, **kw).eval().requires_grad_(False)
    with torch.no_grad():                     # zero-init outputs would make the samplers degenerate
        for p in m.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return m


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    # the tiny presets (8x8 tokens) for one case; for the others, a 4x4 grid of them (16 px
    # images): the same modules on a quarter of the tokens, four times faster under the counter
    return dict(gpt=_model("gpt_tiny"), cross_attn=_model("mar_tiny", fusion="cross_attn"), kl=_model("kl_tiny"),
                gpt16=_model("gpt_tiny", block_size=16), vq16=_model("vq_tiny", image_size=16),
                mar16=_model("mar_tiny", img_size=16), qformer16=_model("mar_tiny", img_size=16, fusion="qformer"))


def _measured(monkeypatch, labels, models, **kw):
    """FlopCounterMode over d2c_sample, plus one nested counter per part: stage 1 (gpt_generate),
    the head (DiffLoss.sample), the decoder; the trunk is what is left.  SDPA runs its math
    backend: FlopCounterMode has no formula for the CPU flash kernel and would count attention
    as 0; the math backend's bmm's it counts as 2 m n k, the convention of d2c.flops."""
    parts = {"stage1": 0, "head": 0, "decode": 0}

    def counted(part, fn):
        def run(*a, **k):
            with FlopCounterMode(display=False) as fc:
                out = fn(*a, **k)
            parts[part] += fc.get_total_flops()
            return out
        return run

    monkeypatch.setattr(d2c.sampling, "gpt_generate", counted("stage1", d2c.sampling.gpt_generate))
    if models.get("mar") is not None:
        dl = models["mar"].diffloss
        monkeypatch.setattr(dl, "sample", counted("head", dl.sample))
    for tok, name in ((models.get("kl"), "decode"), (models.get("vq"), "decode_codes")):
        if tok is not None:
            monkeypatch.setattr(tok, name, counted("decode", getattr(tok, name)))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        res = d2c.sampling.d2c_sample(labels, models, SamplerConfig(**kw), seed=0)
    parts["total"] = fc.get_total_flops()
    parts["trunk"] = parts["total"] - parts["stage1"] - parts["head"] - parts["decode"]
    monkeypatch.undo()
    return parts, res


CASES = {
    "d2c-cross_attn-cfg": (("gpt", "cross_attn", "kl"), dict(steps=8, cfg=2.0, diffusion_steps=5)),
    "d2c-qformer-nocfg": (("gpt16", "qformer16", "kl"), dict(steps=6, cfg=1.0, diffusion_steps=5)),
    "d2c-qformer-lazy-disa": (("gpt16", "qformer16", "kl"), dict(steps=7, cfg=2.0, diffusion_steps=6,
                                                                 diffusion_steps_last=2, uncond_refresh=2)),
    "mar-cfg-lazy3": (("mar16", "kl"), dict(steps=8, cfg=3.0, diffusion_steps=4, uncond_refresh=3)),
    "mar-nocfg-disa": (("mar16", "kl"), dict(steps=6, cfg=1.0, diffusion_steps=3, diffusion_steps_last=7)),
    # 18 rounds for 16 tokens: the last rounds have nothing to predict (no head call)
    "mar-empty-rounds": (("mar16", "kl"), dict(steps=18, cfg=2.0, diffusion_steps=2)),
    "llamagen-cfg": (("gpt16", "vq16"), dict(cfg=2.0)),
    "llamagen-nocfg": (("gpt16", "vq16"), dict(cfg=1.0)),
}
# the d2c_sample argument each fixture model is passed as
ROLE = {"gpt": "gpt", "gpt16": "gpt", "cross_attn": "mar", "qformer16": "mar", "mar16": "mar", "kl": "kl",
        "vq16": "vq"}


@pytest.mark.parametrize("case", list(CASES))
def test_count_matches_flop_counter(tiny, monkeypatch, case):
    names, kw = CASES[case]
    models = {ROLE[n]: tiny[n] for n in names}
    measured, res = _measured(monkeypatch, torch.arange(B), models, **kw)
    counted = sampling_flops(models, SamplerConfig(**kw), batch=B)
    # exact: the count is the same matmul shapes; per image, the head's timestep embedding
    # (one row a step, shared by the batch) is a fraction, so compare the batch's integers
    assert {k: round(v * B) for k, v in counted.items()} == measured
    if "mar" in models:                         # the schedule is the sampler's: same head steps
        sched = mar_schedule(models["mar"], kw["steps"], kw["diffusion_steps"], kw.get("diffusion_steps_last"))
        assert res.nfe["reverse_steps"] == sum(n for _, pred, n in sched if pred)
        assert sum(pred for _, pred, _ in sched) == models["mar"].seq_len
    if case == "mar-empty-rounds":
        assert any(pred == 0 for _, pred, _ in sched)


def test_decoders_match_flop_counter_at_base_size():
    """KL-16 / VQ-16 decoders at 256 px on the meta device: shapes only, no memory."""
    with torch.device("meta"):
        kl, vq = d2c.build("kl_16"), d2c.build("vq_16")
    for tok, run in ((kl, lambda: kl.decode(torch.zeros(1, 16, 16, 16, device="meta"))),
                     (vq, lambda: vq.decode_codes(torch.zeros(1, 16, 16, dtype=torch.long, device="meta")))):
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            run()
        assert fc.get_total_flops() == decoder_flops(tok)


def test_base_sizes_against_h200_reference():
    """Reference (measured on one H200, 2026-12-04), TFLOP an image: D2C-B-16 (cross_attn, cfg
    2.9, 100 diffusion steps) 6.3 = MAR-B trunk 2.6 + head 3.3 + GPT-B 0.1 + KL decode 0.3;
    MAR-B-64 13.7.  Within 15%, except as noted."""
    T = 1e12
    with torch.device("meta"):                 # modules read through .config; configs work too
        gpt, d2c_mar = d2c.build("gpt_b"), d2c.build("mar_base", fusion="cross_attn")
    kl, mar = make_config("kl_16"), make_config("mar_base")
    run = SamplerConfig(steps=16, cfg=2.9, diffusion_steps=100)
    d = sampling_flops(dict(gpt=gpt, mar=d2c_mar, kl=kl), run)
    plain = sampling_flops(dict(gpt=gpt, mar=mar, kl=kl), run)
    assert d["stage1"] / T == pytest.approx(0.1, rel=0.15)
    assert d["head"] / T == pytest.approx(3.3, rel=0.15)
    # the reference's 0.3 is one decimal: our 0.25 (equal to FlopCounterMode, test above) rounds to it
    assert round(d["decode"] / T, 1) == 0.3
    # the reference's 2.6 is the MAR-B trunk without fusion; cross-attention after all 12
    # decoder blocks adds q/proj on 320 tokens, k/v on 256 codes and 320x256 attention, every
    # round for both CFG halves: +0.62, so D2C-B's trunk is 3.3, 28% above 2.6
    assert plain["trunk"] / T == pytest.approx(2.6, rel=0.15)
    fusion = 16 * 2 * 12 * (2 * 2 * 320 * 768 * 768 + 2 * 256 * 768 * 2 * 768 + 4 * 320 * 256 * 768)
    assert d["trunk"] - plain["trunk"] == fusion
    assert d["total"] / T == pytest.approx(6.3, rel=0.15)
    assert sampling_flops(dict(mar=mar, kl=kl), SamplerConfig(steps=64, cfg=2.9, diffusion_steps=100))["total"] / T == \
        pytest.approx(13.7, rel=0.15)


def test_achieved():
    assert achieved(6e12, 2.0) == {"tflops": 3.0, "floor_s": None, "ratio_to_floor": None}
    a = achieved(8.07e12, 1.0, peak_tflops=807)
    assert a["tflops"] == pytest.approx(8.07) and a["floor_s"] == pytest.approx(0.01)
    assert a["ratio_to_floor"] == pytest.approx(100.0)
