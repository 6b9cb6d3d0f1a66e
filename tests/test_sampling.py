"""The two-stage pipeline and its baselines, end to end on the tiny presets."""
import dataclasses

import pytest
import torch

import d2c
from d2c.sampling import SamplerConfig, d2c_sample, save_grid, to_uint8


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {"gpt": d2c.build("gpt_tiny").eval(), "vq": d2c.build("vq_tiny").eval(),
            "kl": d2c.build("kl_tiny").eval(), "mar": d2c.build("mar_tiny").eval(),
            "cross_attn": d2c.build("mar_tiny", fusion="cross_attn").eval(),
            "qformer": d2c.build("mar_tiny", fusion="qformer").eval()}


def _family(models, name):
    if name == "llamagen":
        return dict(gpt=models["gpt"], vq=models["vq"])
    if name == "mar":
        return dict(mar=models["mar"], kl=models["kl"])
    return dict(gpt=models["gpt"], mar=models[name], kl=models["kl"])


@pytest.mark.parametrize("family", ["llamagen", "mar", "cross_attn", "qformer"])
def test_every_family_end_to_end(models, family):
    labels = torch.tensor([0, 3, 9])
    sampler = SamplerConfig(steps=4, cfg=1.5)
    res = d2c_sample(labels, _family(models, family), sampler, seed=1)
    assert res.images.dtype == torch.uint8 and res.images.shape == (3, 3, 32, 32)
    assert (res.codes is None) == (family == "mar")
    assert (res.latents is None) == (family == "llamagen")
    assert res.timings["total"] >= res.timings["decode"] > 0
    if family != "mar":
        assert res.nfe["ar_steps"] == 64 and res.timings["stage1"] > 0
    if family != "llamagen":
        assert res.nfe["mar_steps"] == 4 and res.nfe["reverse_steps"] == 4 * 20
    again = d2c_sample(labels, _family(models, family), sampler, seed=1)
    assert torch.equal(again.images, res.images)
    other = d2c_sample(labels, _family(models, family), sampler, seed=2)
    assert not torch.equal(other.images, res.images)


def test_d2c_stage2_sees_stage1_codes(models):
    # D2C stage 2 must be conditioned on the stage-1 codes: give the fusion real weight and
    # check that the latents follow the codes (same seed for the MAR part).
    mar = d2c.build("mar_tiny", fusion="qformer").eval()
    with torch.no_grad():
        torch.nn.init.normal_(mar.fusion.out.weight, std=0.5)
        for p in mar.diffloss.parameters():
            p.normal_(0, 0.05)
        labels = torch.tensor([1, 2])
    a = torch.randint(0, 512, (2, 64))
    b = a.clone(); b[0, :10] = (b[0, :10] + 7) % 512
    s = SamplerConfig(steps=3, cfg=1.0)
    la, _ = mar.sample_tokens(labels, s, codes=a, generator=torch.Generator().manual_seed(0))
    lb, _ = mar.sample_tokens(labels, s, codes=b, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(la[0], lb[0])
    torch.testing.assert_close(la[1], lb[1])


def test_missing_stage_is_a_clear_error(models):
    with pytest.raises(ValueError, match="needs gpt"):
        d2c_sample([0], {"kl": models["kl"]})
    with pytest.raises(ValueError, match="needs the KL tokenizer"):
        d2c_sample([0], {"mar": models["mar"]})
    with pytest.raises(ValueError, match="needs the VQ tokenizer"):
        d2c_sample([0], {"gpt": models["gpt"]})
    with pytest.raises(ValueError, match=r"labels must be in \[0, 9\]"):
        d2c_sample([10], {"mar": models["mar"], "kl": models["kl"]})
    with pytest.raises(ValueError, match=r"^models: 'klx'; allowed: gpt, vq, mar, kl$"):
        d2c_sample([0], {"gpt": models["gpt"], "klx": models["kl"]})
    with pytest.raises(ValueError, match=r"^steps=None: allowed: integers >= 1$"):
        d2c_sample([0], {"mar": models["mar"], "kl": models["kl"]}, SamplerConfig().for_family("llamagen"))


def test_to_uint8_and_grid(tmp_path):
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0])
    assert to_uint8(x).tolist() == [0, 0, 128, 255, 255]
    path = save_grid(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), tmp_path / "g" / "grid.png", nrow=2)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_writes_grids(tmp_path, capsys):
    from d2c.demo import main
    main(["--out", str(tmp_path), "--num-images", "4", "--steps", "2"])
    out = capsys.readouterr().out
    for name in ("llamagen", "mar", "d2c_qformer"):
        assert (tmp_path / f"{name}.png").stat().st_size > 100
        assert f"{name}.png" in out


def _random(m, std=0.02):
    with torch.no_grad():        # zero-init outputs would make bf16 and fp32 trivially equal
        for p in m.parameters():
            p.normal_(0, std)
    return m


@pytest.mark.parametrize("head_sampler", ["ddpm", "ddim"])
def test_bf16_sampling_matches_fp32(head_sampler):
    """precision=bf16 runs the model forwards in bf16 (recorded per stage); with the same stage-1
    codes the latents, which stay fp32, match fp32 sampling to 1e-2 relative (measured ~8e-4 on
    these random tiny models: bf16 rounds at 4e-3)."""
    torch.manual_seed(0)
    gpt, mar, kl = _random(d2c.build("gpt_tiny").eval()), _random(d2c.build("mar_tiny", fusion="qformer").eval()), \
        d2c.build("kl_tiny").eval()
    labels = torch.arange(4)
    models = dict(gpt=gpt, mar=mar, kl=kl)
    fp32 = SamplerConfig(steps=4, cfg=2.0, head_sampler=head_sampler)
    bf16, auto = (dataclasses.replace(fp32, precision=p) for p in ("bf16", "auto"))
    a = d2c_sample(labels, models, fp32)
    from d2c.precision import bf16_supported
    if not bf16_supported("cpu"):          # e.g. make test-numerics (ATEN_CPU_CAPABILITY=default)
        with pytest.raises(ValueError, match="precision=bf16: no bf16 matrix units torch can use"):
            d2c_sample(labels, models, bf16)
        assert d2c_sample(labels, models, auto).dtypes == a.dtypes   # auto falls back to fp32
        return
    b = d2c_sample(labels, models, bf16)
    assert a.dtypes == {"stage1": "fp32", "stage2": "fp32"} and b.dtypes == {"stage1": "bf16", "stage2": "bf16"}
    assert b.latents.dtype == torch.float32
    assert (a.codes == b.codes).float().mean() > 0.9       # sampled codes: a near-tie may flip
    la, _ = mar.sample_tokens(labels, fp32, codes=a.codes, generator=torch.Generator().manual_seed(1))
    from d2c.precision import autocast_for
    with autocast_for(torch.bfloat16, "cpu"):
        lb, _ = mar.sample_tokens(labels, fp32, codes=a.codes, generator=torch.Generator().manual_seed(1))
    assert lb.dtype == torch.float32
    rel = ((la - lb).norm() / la.norm()).item()
    assert 0 < rel < 1e-2, rel                               # bf16 did run, and stayed close


def test_auto_precision_picks_bf16_only_where_supported_and_wide_enough(monkeypatch):
    import d2c.precision as P
    monkeypatch.setattr(P, "bf16_supported", lambda device: False)
    assert P.sampling_dtype("auto", "cpu", 4096) == torch.float32          # no bf16 units: fp32
    with pytest.raises(ValueError, match="precision=bf16: no bf16 matrix units"):   # asked for: refused
        P.sampling_dtype("bf16", "cpu", 4096)
    monkeypatch.setattr(P, "bf16_supported", lambda device: True)
    assert P.sampling_dtype("bf16", "cpu", 64) == torch.bfloat16           # asked for: bf16
    w = P.BF16_MIN_WIDTH["cpu"]
    assert P.sampling_dtype("auto", "cpu", w - 1) == torch.float32         # too narrow to gain
    assert P.sampling_dtype("auto", "cpu", w) == torch.bfloat16
    assert P.sampling_dtype("fp32", "cpu", 4096) == torch.float32
    with pytest.raises(ValueError, match="precision='fp16'; allowed: auto, bf16, fp32"):
        P.sampling_dtype("fp16", "cpu", 128)
