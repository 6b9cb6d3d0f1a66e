"""torch.compile switch: the compiled samplers give eager's outputs for a seed, and
the changing token counts of MAR rounds / KV lengths of GPT steps do not recompile.
Compiling costs tens of seconds on a 2-core CPU, hence `slow`."""
import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

import d2c
from d2c.sampling import SamplerConfig, d2c_sample


def _graphs():
    return counters["stats"]["unique_graphs"]


def _rel_close(out, ref, rel=1e-4):
    torch.testing.assert_close(out, ref, atol=rel * max(1.0, ref.abs().max().item()), rtol=rel)


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_compiled_head_step_matches_eager_without_recompiles(sampler):
    from d2c.models.diffloss import DiffLoss

    torch._dynamo.reset()
    dl = DiffLoss(4, 16, depth=2, width=32, diffusion_steps=6)
    with torch.no_grad():
        for p in dl.parameters():
            p.normal_(0, 0.1)
        dl.net.final_layer.linear.weight.mul_(0.1)
    z = torch.randn(26, 16)
    with torch.inference_mode():
        for i, n in enumerate([13, 5, 9, 1]):                # MAR rounds reveal different counts
            zz = torch.cat([z[:n], z[13:13 + n]])
            ref = dl.sample(zz, 0.9, 2.0, generator=torch.Generator().manual_seed(n), sampler=sampler)
            out = dl.sample(zz, 0.9, 2.0, generator=torch.Generator().manual_seed(n), impl="compiled",
                            sampler=sampler)
            _rel_close(out, ref)
            if i == 0:
                after_first = _graphs()
    assert _graphs() == after_first, "a new row count recompiled the head step"


@pytest.mark.slow
def test_compiled_d2c_sampler_matches_eager_and_does_not_recompile():
    torch._dynamo.reset()
    torch.manual_seed(0)
    gpt = d2c.build("gpt_tiny").eval()
    mar = d2c.build("mar_tiny", fusion="qformer").eval()
    kl = d2c.build("kl_tiny").eval()
    with torch.no_grad():                                    # zero-init heads would make this trivial
        for p in list(mar.diffloss.parameters()) + list(gpt.parameters()):
            p.normal_(0, 0.05)
    models = dict(gpt=gpt, mar=mar, kl=kl)
    s3 = SamplerConfig(cfg=2.0, diffusion_steps=4, steps=3)
    s5 = dataclasses.replace(s3, steps=5)
    eager = d2c_sample(torch.arange(2), models, s3)
    comp = d2c_sample(torch.arange(2), models, dataclasses.replace(s3, compile=True))
    assert torch.equal(comp.codes, eager.codes)
    _rel_close(comp.latents, eager.latents, 1e-3)
    assert (comp.images.int() - eager.images.int()).abs().max() <= 1
    n = _graphs()
    again = d2c_sample(torch.arange(2), models, dataclasses.replace(s5, compile=True))  # other revealed counts
    assert _graphs() == n, "changing MAR step counts / KV lengths recompiled"
    ref5 = d2c_sample(torch.arange(2), models, s5)
    _rel_close(again.latents, ref5.latents, 1e-3)
