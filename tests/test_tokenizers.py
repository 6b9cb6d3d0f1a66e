"""Image tokenizers: public layouts (counts, key names, strict reload), the codebook lookup,
the KL posterior, and what a training loop needs from them."""
import pickle

import pytest
import torch
import torch.nn.functional as F

import d2c
from d2c.checkpoint import CheckpointError
from d2c.tokenizers.vq import VQModel

# Facts from the public reference code (FoundationVision/LlamaGen tokenizer/tokenizer_image/
# vq_model.py; LTH14/mar models/vae.py), and the counts in docs/design.md section 3.
VQ16_PARAMS = 71_883_403
KL16_PARAMS = 66_456_019
VQ16_KEYS = {
    "quantize.embedding.weight": (16384, 8),
    "quantize.codebook_used": (65536,),            # LlamaGen's usage buffer is in the file
    "quant_conv.weight": (8, 256, 1, 1),
    "post_quant_conv.weight": (256, 8, 1, 1),
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.conv_blocks.2.res.0.nin_shortcut.weight": (256, 128, 1, 1),
    "encoder.conv_blocks.3.downsample.conv.weight": (256, 256, 3, 3),
    "encoder.conv_blocks.4.attn.1.q.weight": (512, 512, 1, 1),
    "encoder.mid.1.proj_out.weight": (512, 512, 1, 1),
    "encoder.mid.2.norm2.bias": (512,),
    "encoder.conv_out.weight": (256, 512, 3, 3),
    "decoder.conv_in.weight": (512, 256, 3, 3),
    "decoder.conv_blocks.0.attn.2.k.weight": (512, 512, 1, 1),   # levels in decoding order
    "decoder.conv_blocks.1.res.0.nin_shortcut.weight": (256, 512, 1, 1),
    "decoder.conv_blocks.3.upsample.conv.weight": (128, 128, 3, 3),
    "decoder.conv_blocks.4.res.2.conv2.weight": (128, 128, 3, 3),
    "decoder.conv_out.weight": (3, 128, 3, 3),
}
VQ16_ABSENT = ["encoder.conv_blocks.4.downsample.conv.weight", "decoder.conv_blocks.4.upsample.conv.weight",
               "decoder.conv_blocks.1.attn.0.q.weight", "encoder.conv_blocks.3.attn.0.q.weight"]
KL16_KEYS = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
    "encoder.down.2.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "encoder.down.4.attn.1.q.weight": (512, 512, 1, 1),
    "encoder.mid.block_1.conv1.weight": (512, 512, 3, 3),
    "encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
    "encoder.conv_out.weight": (32, 512, 3, 3),            # double_z: mean and logvar
    "quant_conv.weight": (32, 32, 1, 1),
    "post_quant_conv.weight": (16, 16, 1, 1),
    "decoder.conv_in.weight": (512, 16, 3, 3),
    "decoder.mid.block_2.norm1.weight": (512,),
    "decoder.up.4.block.2.conv2.weight": (512, 512, 3, 3),  # up[i] = resolution level i
    "decoder.up.3.block.0.nin_shortcut.weight": (256, 512, 1, 1),
    "decoder.up.1.upsample.conv.weight": (128, 128, 3, 3),
    "decoder.conv_out.weight": (3, 128, 3, 3),
}
KL16_ABSENT = ["decoder.up.0.upsample.conv.weight", "decoder.up.4.attn.0.q.weight",
               "encoder.down.4.downsample.conv.weight"]


def meta(preset, **kw):
    with torch.device("meta"):
        return d2c.build(preset, **kw)


def images(b=4, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


# ------------------------------------------------------------------ public layouts
@pytest.mark.parametrize("preset,count", [("vq_16", VQ16_PARAMS), ("kl_16", KL16_PARAMS)])
def test_parameter_count(preset, count):
    assert sum(p.numel() for p in meta(preset).parameters()) == count


@pytest.mark.parametrize("preset,keys,absent", [("vq_16", VQ16_KEYS, VQ16_ABSENT),
                                                ("kl_16", KL16_KEYS, KL16_ABSENT)])
def test_public_key_layout(preset, keys, absent):
    sd = meta(preset).state_dict()
    for k, shape in keys.items():
        assert k in sd, k
        assert tuple(sd[k].shape) == shape, k
    assert not [k for k in absent if k in sd]
    # names from other variants of these blocks must not appear (time embedding, 3x3 shortcut)
    assert not [k for k in sd if "temb_proj" in k or "conv_shortcut" in k]


def _roundtrip(preset, tmp_path, x):
    model = d2c.build(preset).eval()
    path = tmp_path / f"{preset}.pt"
    torch.save({"model": model.state_dict()}, path)   # the public container layout
    loaded = d2c.load_pretrained(preset, path).eval()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    for a, b in zip(_outputs(model, x), _outputs(loaded, x)):
        assert torch.equal(a, b)


@torch.no_grad()
def _outputs(m, x):
    if isinstance(m, VQModel):
        return m.encode(x), m(x)[0]
    return m.encode(x, generator=torch.Generator().manual_seed(0)), m(x, sample_posterior=False)[0]


@pytest.mark.parametrize("preset", ["vq_tiny", "kl_tiny"])
def test_public_container_roundtrip_tiny(preset, tmp_path):
    _roundtrip(preset, tmp_path, images(2))


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["vq_16", "kl_16"])
def test_public_container_roundtrip_full(preset, tmp_path):
    _roundtrip(preset, tmp_path, images(1, size=32))


def test_wrong_layout_is_refused(tmp_path):
    path = tmp_path / "vq.pt"
    torch.save({"model": d2c.build("vq_tiny").state_dict()}, path)
    with pytest.raises(CheckpointError):
        d2c.load_pretrained("kl_tiny", path)


class _Payload:
    """Unpickling this runs code that writes a file."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return exec, (f"open({self.target!r}, 'w').write('pwned')",)


def test_pickled_code_is_refused(tmp_path):
    # control: the payload is live under a plain unpickler
    control = tmp_path / "control.txt"
    pickle.loads(pickle.dumps(_Payload(control)))
    assert control.exists()

    target = tmp_path / "pwned.txt"
    sd = d2c.build("vq_tiny").state_dict()
    sd["quant_conv.bias"] = _Payload(target)
    path = tmp_path / "evil.pt"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match="refused"):
        d2c.load_pretrained("vq_tiny", path)
    assert not target.exists()


# ------------------------------------------------------------------ VQ
def test_vq_encode_decode_shapes_and_range():
    m = d2c.build("vq_tiny").eval()
    x = images(3)
    codes = m.encode(x)
    assert codes.dtype == torch.long and codes.shape == (3, 8, 8)
    assert 0 <= codes.min() and codes.max() < m.config.codebook_size
    out = m.decode_codes(codes)
    assert out.shape == x.shape
    assert torch.equal(m.decode_codes(codes.flatten(1)), out)   # (B, h*w) is accepted
    with pytest.raises(ValueError):
        m.decode_codes(codes.flatten(1)[:, :63])


def test_vq_decode_codes_equals_reconstruction_path():
    m = d2c.build("vq_tiny").eval()
    x = images(4)
    with torch.no_grad():
        recon, _ = m(x)
        assert torch.equal(m.decode_codes(m.encode(x)), recon)


def _random_codebook(m, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():   # fresh, unnormalised: the lookup must normalise itself
        m.quantize.embedding.weight.copy_(torch.randn(m.quantize.embedding.weight.shape, generator=g) * 3)
    return torch.randn(4, m.config.codebook_embed_dim, 8, 8, generator=g) * 2


@pytest.mark.parametrize("l2", [True, False])
def test_codebook_lookup_matches_float64_brute_force(l2):
    m = d2c.build("vq_tiny", codebook_l2_norm=l2)
    z = _random_codebook(m, seed=7 + l2)
    _, codes, _ = m.quantize(z)
    q = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double()
    e = m.quantize.embedding.weight.detach().double()
    if l2:
        score = F.normalize(q, dim=-1) @ F.normalize(e, dim=-1).t()      # cosine similarity
    else:
        score = -torch.cdist(q, e).pow(2)                                # minus squared distance
    idx = codes.flatten()
    top2 = score.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-5
    assert clear.float().mean() > 0.9                       # the check is not vacuous
    assert torch.equal(idx[clear], score.argmax(1)[clear])
    # near ties may go either way, but only to an (almost) equally good code
    assert (score.gather(1, idx[:, None])[:, 0] >= top2[:, 0] - 1e-5).all()


def test_vq_losses_and_gradients():
    m = d2c.build("vq_tiny", entropy_loss_ratio=0.1).train()
    x = images(4)
    recon, losses = m(x)
    assert set(losses) == {"codebook", "commit", "entropy"}
    assert torch.allclose(losses["commit"], m.config.commit_loss_beta * losses["codebook"])
    assert "entropy" not in d2c.build("vq_tiny")(x)[1]
    m.zero_grad()
    F.mse_loss(recon, x).backward(retain_graph=True)
    # straight-through: the reconstruction loss alone reaches the encoder, not the codebook
    assert m.encoder.conv_in.weight.grad.abs().sum() > 0
    assert m.quantize.embedding.weight.grad is None
    sum(losses.values()).backward()
    assert m.quantize.embedding.weight.grad.abs().sum() > 0
    # usage window holds the last assignments
    assert m.quantize.codebook_used[-4 * 64:].ne(0).any()


# ------------------------------------------------------------------ KL
def test_kl_shapes_and_moments():
    m = d2c.build("kl_tiny").eval()
    x = images(3)
    with torch.no_grad():
        moments = m.encode_moments(x)
        assert moments.shape == (3, 2 * m.config.embed_dim, 8, 8)
        post = m.posterior(x)
        e = m.config.embed_dim
        assert torch.equal(post.mean, moments[:, :e])
        assert torch.equal(post.logvar, moments[:, e:].clamp(-30, 20))
        assert torch.equal(post.mode(), post.mean)
        assert post.kl().shape == (3,) and (post.kl() >= 0).all()
        lat = m.encode(x)
        assert lat.shape == (3, m.config.embed_dim, 8, 8)
        assert m.decode(lat).shape == x.shape


def test_kl_sample_reproducible_with_generator():
    m = d2c.build("kl_tiny").eval()
    x = images(2)
    with torch.no_grad():
        a = m.encode(x, generator=torch.Generator().manual_seed(5))
        b = m.encode(x, generator=torch.Generator().manual_seed(5))
        c = m.encode(x, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_kl_latent_scale():
    assert d2c.PRESETS["kl_16"].scale == 0.2325
    m = d2c.build("kl_tiny", scale=0.2325).eval()
    x = images(2)
    with torch.no_grad():
        post = m.posterior(x)
        eps = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(3))
        want = (post.mean + post.std * eps) * 0.2325        # the *sample* is scaled, as in MAR
        got = m.encode(x, generator=torch.Generator().manual_seed(3))
        assert torch.equal(got, want)
        z = post.mean
        assert torch.allclose(m.decode(z * 0.2325), m.decode_unscaled(z), atol=1e-5)


def test_kl_forward_backward():
    m = d2c.build("kl_tiny").train()
    x = images(4)
    recon, post = m(x, generator=torch.Generator().manual_seed(0))
    assert recon.shape == x.shape
    (F.mse_loss(recon, x) + 1e-6 * post.kl().mean()).backward()
    assert m.encoder.conv_in.weight.grad.abs().sum() > 0
    assert m.decoder.conv_out.weight.grad.abs().sum() > 0
