"""MAR (stage 2): public layout and sizes, masking, the MAE encoder, the loss, fusion hooks and
DiffLoss guidance (its sampler: test_mar_sampler.py)."""
import math

import pytest
import torch

import d2c
from d2c.checkpoint import CheckpointError
from d2c.models.diffloss import DiffLoss
from d2c.sampling import SamplerConfig


def _randomize_zero_init(module, std=0.05, seed=1):
    """Give every all-zero parameter (zero-init AdaLN/outputs/biases) random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.numel() and p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def _tiny(fusion="none", randomize=True, **kw):
    m = d2c.build("mar_tiny", fusion=fusion, **kw)
    if randomize:
        _randomize_zero_init(m)
    return m.eval()


def _inputs(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, 64, 4, generator=g)
    labels = torch.randint(0, 10, (b,), generator=g)
    codes = torch.randint(0, 512, (b, 64), generator=g)
    return tokens, labels, codes


def _fixed_mask(b=3, n_masked=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    orders = torch.stack([torch.randperm(64, generator=g) for _ in range(b)])
    return torch.zeros(b, 64).scatter(1, orders[:, :n_masked], 1.0)


# ------------------------------------------------------------------ layout and sizes
def _mar_reference_keys(depth_enc, depth_dec, depth_diff):
    """MAR's state-dict keys as the public LTH14/mar model names them."""
    keys = ["class_emb.weight", "fake_latent", "z_proj.weight", "z_proj.bias", "z_proj_ln.weight",
            "z_proj_ln.bias", "encoder_pos_embed_learned", "encoder_norm.weight", "encoder_norm.bias",
            "decoder_embed.weight", "decoder_embed.bias", "mask_token", "decoder_pos_embed_learned",
            "decoder_norm.weight", "decoder_norm.bias", "diffusion_pos_embed_learned"]
    vit = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
           "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    keys += [f"encoder_blocks.{i}.{k}" for i in range(depth_enc) for k in vit]
    keys += [f"decoder_blocks.{i}.{k}" for i in range(depth_dec) for k in vit]
    net = ["time_embed.mlp.0.weight", "time_embed.mlp.0.bias", "time_embed.mlp.2.weight", "time_embed.mlp.2.bias",
           "cond_embed.weight", "cond_embed.bias", "input_proj.weight", "input_proj.bias",
           "final_layer.linear.weight", "final_layer.linear.bias",
           "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"]
    rb = ["in_ln.weight", "in_ln.bias", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias",
          "adaLN_modulation.1.weight", "adaLN_modulation.1.bias"]
    net += [f"res_blocks.{i}.{k}" for i in range(depth_diff) for k in rb]
    return set(keys) | {f"diffloss.net.{k}" for k in net}


@pytest.mark.parametrize("preset,count,depths", [("mar_base", 207_924_768, (12, 12, 6)),
                                                  ("mar_large", 478_326_304, (16, 16, 8)),
                                                  ("mar_huge", 942_403_104, (20, 20, 12))])
def test_public_parameter_counts_and_keys(preset, count, depths):
    with torch.device("meta"):
        m = d2c.build(preset)
    assert sum(p.numel() for p in m.parameters()) == count
    sd = m.state_dict()
    assert set(sd) == _mar_reference_keys(*depths)
    assert m.fusion is None and not any(k.startswith("fusion") for k in sd)


def test_mar_base_key_shapes():
    with torch.device("meta"):
        sd = d2c.build("mar_base").state_dict()
    want = {"class_emb.weight": (1000, 768), "fake_latent": (1, 768), "z_proj.weight": (768, 16),
            "encoder_pos_embed_learned": (1, 320, 768), "decoder_pos_embed_learned": (1, 320, 768),
            "diffusion_pos_embed_learned": (1, 256, 768), "mask_token": (1, 1, 768),
            "encoder_blocks.11.attn.qkv.weight": (2304, 768), "encoder_blocks.0.mlp.fc1.weight": (3072, 768),
            "decoder_blocks.11.mlp.fc2.weight": (768, 3072), "decoder_embed.weight": (768, 768),
            "diffloss.net.time_embed.mlp.0.weight": (1024, 256), "diffloss.net.cond_embed.weight": (1024, 768),
            "diffloss.net.input_proj.weight": (1024, 16),
            "diffloss.net.res_blocks.5.adaLN_modulation.1.weight": (3072, 1024),
            "diffloss.net.final_layer.adaLN_modulation.1.weight": (2048, 1024),
            "diffloss.net.final_layer.linear.weight": (32, 1024)}
    for k, shape in want.items():
        assert tuple(sd[k].shape) == shape, k
    assert "diffloss.net.final_layer.norm_final.weight" not in sd      # LN without affine


def test_fusion_keys_are_extra_and_separate():
    plain = set(_tiny(randomize=False).state_dict())
    assert plain == _mar_reference_keys(2, 2, 2)
    for kind in ("cross_attn", "qformer"):
        keys = set(_tiny(kind, randomize=False).state_dict())
        assert plain < keys and all(k.startswith("fusion.") for k in keys - plain)


def test_init_matches_mar():
    m = d2c.build("mar_tiny")
    net = m.diffloss.net
    for lin in [b.adaLN_modulation[-1] for b in net.res_blocks] + [net.final_layer.adaLN_modulation[-1],
                                                                   net.final_layer.linear]:
        assert lin.weight.abs().max() == 0 and lin.bias.abs().max() == 0
    assert m.encoder_blocks[0].attn.qkv.bias.abs().max() == 0 and m.encoder_norm.weight.eq(1).all()
    assert 0.01 < m.encoder_pos_embed_learned.std() < 0.03 and 0.01 < m.fake_latent.std() < 0.03


def test_strict_reload_mar_container(tmp_path):
    src = _tiny()
    ema = {k: v + 0.5 for k, v in src.state_dict().items()}
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": src.state_dict(), "model_ema": ema, "epoch": 3}, path)
    m = d2c.load_pretrained("mar_tiny", path)              # strict; the EMA weights win
    for k, v in m.state_dict().items():
        assert torch.equal(v, ema[k]), k
    with pytest.raises(CheckpointError, match="fusion"):
        d2c.load_pretrained("mar_tiny", path, fusion="qformer")  # fusion keys missing -> strict fails
    bad = dict(ema)
    bad["z_proj.weightx"] = bad.pop("z_proj.weight")
    torch.save({"model": bad}, path)
    with pytest.raises(CheckpointError, match="z_proj.weight"):
        d2c.load_pretrained("mar_tiny", path)


def test_patchify_roundtrip():
    m = d2c.build("mar_tiny", patch_size=2)
    assert (m.seq_len, m.token_embed_dim) == (16, 16)
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(m.unpatchify(m.patchify(x)), x, rtol=0, atol=0)
    # channel-major inside a patch, patches row-major (MAR's 'nchpwq->nhwcpq')
    t = m.patchify(x)
    assert torch.equal(t[1, 1 * 4 + 2].view(4, 2, 2), x[1, :, 2:4, 4:6])
    m1 = d2c.build("mar_tiny")
    assert torch.equal(m1.patchify(x)[0, 3 * 8 + 5], x[0, :, 3, 5])


# ------------------------------------------------------------------ masking and the encoder
def test_mask_ratio_truncated_normal():
    m = d2c.build("mar_tiny")
    r = m.sample_mask_ratio(40000, generator=torch.Generator().manual_seed(0))
    assert r.min() >= 0.7 and r.max() <= 1.0
    # truncated normal N(1, 0.25^2) on [0.7, 1]: mean = mu + sigma (phi(a) - phi(b)) / (Phi(b) - Phi(a))
    a, b = (0.7 - 1) / 0.25, 0.0
    phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)          # noqa: E731
    Phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))                 # noqa: E731
    z = Phi(b) - Phi(a)
    mean = 1 + 0.25 * (phi(a) - phi(b)) / z
    var = 0.25 ** 2 * (1 + (a * phi(a) - b * phi(b)) / z - ((phi(a) - phi(b)) / z) ** 2)
    assert abs(r.mean().item() - mean) < 0.002
    assert abs(r.std().item() - math.sqrt(var)) < 0.002
    # one ratio per batch, ceil(L r) masked tokens in every row
    x, orders = torch.randn(5, 64, 4), m.sample_orders(5)
    torch.manual_seed(7)
    ratio = float(m.sample_mask_ratio(1))
    torch.manual_seed(7)
    mask = m.random_masking(x, orders)
    n = math.ceil(64 * ratio)
    assert (mask.sum(1) == n).all() and 45 <= n <= 64
    assert (mask.gather(1, orders[:, :n]) == 1).all()          # the first n of each order


def test_sample_orders_are_seeded_permutations():
    m = d2c.build("mar_tiny")
    o = m.sample_orders(4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(o.sort(1).values, torch.arange(64).expand(4, 64))
    assert torch.equal(o, m.sample_orders(4, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(o[0], o[1])


def test_encoder_drops_masked_tokens():
    m = _tiny()
    tokens, labels, _ = _inputs()
    mask = _fixed_mask()
    z = m.condition(tokens, labels, mask)
    assert z.shape == (3, 64, 64)
    other = torch.where(mask.bool()[..., None], torch.randn_like(tokens) * 100, tokens)
    assert torch.equal(m.condition(other, labels, mask), z)        # masked values never enter
    seen = []
    h = m.encoder_blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    m.condition(tokens, labels, mask)
    h.remove()
    assert seen == [torch.Size([3, m.buffer_size + 64 - 40, 64])]   # buffer + kept only
    # and the known tokens do matter
    assert not torch.allclose(m.condition(tokens + (1 - mask)[..., None], labels, mask), z)


def test_rows_with_different_kept_counts_use_padding():
    m = _tiny()
    tokens, labels, _ = _inputs()
    mask = torch.stack([_fixed_mask(1, n, seed=n)[0] for n in (10, 40, 63)])
    z = m.condition(tokens, labels, mask)
    for i in range(3):
        zi = m.condition(tokens[i:i + 1], labels[i:i + 1], mask[i:i + 1])
        torch.testing.assert_close(z[i:i + 1], zi, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fusion", ["none", "cross_attn", "qformer"])
def test_encoder_padded_to_a_bucket_gives_the_same_conditions(fusion):
    """Compiled CUDA sampling pads the encoder's rows to a bucket (ENCODER_BUCKET) so a run sees
    a few shapes: the padded rows are masked out of attention and change nothing."""
    m = _tiny(fusion)
    tokens, labels, codes = _inputs()
    mask = _fixed_mask(n_masked=40)                      # buffer + 24 kept rows
    z = m.condition(tokens, labels, mask, codes=codes)
    seen = []
    h = m.encoder_blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[1]))
    total = m.buffer_size + 64
    for pad in (48, total, 10_000):                       # a bucket, the whole sequence, beyond it
        zp = m.condition(tokens, labels, mask, codes=codes, pad_to=pad)
        torch.testing.assert_close(zp, z, rtol=1e-5, atol=1e-5)
    h.remove()
    assert seen == [48, total, total]                     # padded, and never past buffer + seq_len


def test_loss_only_on_masked_tokens():
    m = _tiny()
    tokens, labels, _ = _inputs()
    mask = _fixed_mask()
    target = tokens.clone().requires_grad_()
    z = m.condition(tokens, labels, mask)
    loss = m.forward_loss(z, target, mask)
    (g,) = torch.autograd.grad(loss, target)
    assert g[~mask.bool()].abs().max() == 0
    assert (g[mask.bool()].abs().sum(-1) > 0).all()


def test_forward_trains_and_label_drop():
    torch.manual_seed(0)
    lat, labels = torch.randn(4, 4, 8, 8), torch.randint(0, 10, (4,))
    for p_drop, expect_grad in ((0.0, True), (1.0, False)):
        m = _tiny(label_drop_prob=p_drop).train()        # zero-init head: z would get no gradient
        loss = m(lat, labels)
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        g = m.class_emb.weight.grad
        assert (g is not None and g.abs().sum() > 0) == expect_grad
        assert (m.fake_latent.grad is not None and m.fake_latent.grad.abs().sum() > 0) == (not expect_grad)


def test_grad_checkpointing_matches():
    lat, labels = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        m = d2c.build("mar_tiny", grad_checkpointing=ckpt).train()
        torch.manual_seed(1)
        m(lat, labels).backward()
        grads.append(m.encoder_blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_out_of_range_inputs_raise_one_line():
    m = _tiny("qformer")
    tokens, labels, codes = _inputs()
    mask = _fixed_mask()
    with pytest.raises(ValueError, match=r"labels must be in \[0, 9\]"):
        m.condition(tokens, torch.tensor([0, 10, 1]), mask, codes=codes)
    with pytest.raises(ValueError, match=r"codes must be in \[0, 511\]"):
        m.condition(tokens, labels, mask, codes=codes + 1000)
    with pytest.raises(ValueError, match="codes"):
        m.condition(tokens, labels, mask)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 9\]"):
        _tiny().sample_tokens(torch.tensor([-1]), SamplerConfig(steps=2))


# ------------------------------------------------------------------ fusion hooks
@pytest.mark.parametrize("kind", ["cross_attn", "qformer"])
def test_fusion_at_init_equals_plain_mar(kind):
    plain = _tiny()
    fused = d2c.build("mar_tiny", fusion=kind).eval()
    missing, unexpected = fused.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("fusion.") for k in missing)
    tokens, labels, codes = _inputs()
    mask = _fixed_mask()
    torch.testing.assert_close(fused.condition(tokens, labels, mask, codes=codes),
                               plain.condition(tokens, labels, mask), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["cross_attn", "qformer"])
def test_dropped_rows_see_null_codes(kind):
    m = _tiny(kind)                        # fusion outputs randomised: codes now matter
    tokens, labels, codes = _inputs(b=2)
    mask = _fixed_mask(b=2)
    drop = torch.tensor([True, False])
    z1 = m.condition(tokens, labels, mask, codes=codes, drop=drop)
    z2 = m.condition(tokens, labels, mask, codes=(codes + 7) % 512, drop=drop)
    assert torch.equal(z1[0], z2[0])                       # dropped row: null codes, codes ignored
    assert not torch.allclose(z1[1], z2[1])                # kept row: codes matter
    # a dropped row also sees the null class
    z3 = m.condition(tokens, torch.tensor([5, labels[1]]), mask, codes=codes, drop=drop)
    assert torch.equal(z1[0], z3[0])


def test_qformer_fills_buffer_and_cross_attn_runs_after_decoder_blocks():
    m = _randomize_zero_init(d2c.build("mar_tiny", fusion={"kind": "qformer", "num_queries": 4})).eval()
    tokens, labels, codes = _inputs()
    marker = torch.randn(3, 4, 64)
    m.fusion.buffer = lambda disc: marker
    seen = []
    h = m.z_proj_ln.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    m.condition(tokens, labels, _fixed_mask(), codes=codes)
    h.remove()
    buf = seen[0][:, :m.buffer_size] - m.encoder_pos_embed_learned[:, :m.buffer_size]
    cls = m.class_emb(labels)[:, None]
    torch.testing.assert_close(buf[:, :4], cls + marker)                  # queries + class embedding
    torch.testing.assert_close(buf[:, 4:], cls.expand(-1, 4, -1))         # the rest: class embedding

    c = _tiny({"kind": "cross_attn", "layers": (1,)})
    seen = []
    hooks = [layer.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
             for layer in c.fusion.cross.values()]
    dec = []
    hooks.append(c.decoder_blocks[1].register_forward_hook(lambda mod, inp, out: dec.append(out)))
    c.condition(tokens, labels, _fixed_mask(), codes=codes)
    for hk in hooks:
        hk.remove()
    assert len(seen) == 1 and torch.equal(seen[0], dec[0])                # runs on decoder block 1's output


# ------------------------------------------------------------------ DiffLoss guidance
def test_diffloss_cfg_one_equals_conditional_path():
    # Identities of the math, so checked in float64: the guided path runs 12-row products where
    # the plain one runs 6, which round differently, and ten unclipped reverse steps amplify
    # that (float32 on an AVX-512 EPYC: 2.9e-4 relative, about 5e3 float32 ulps).  The same
    # amplification leaves float64 near 1e-12 (values here reach ~1e5); rtol 1e-9 keeps a margin
    # while a wrong mix (cfg on v, the wrong half) moves the tokens by 1e-5 relative or more.
    dl = _randomize_zero_init(DiffLoss(4, 16, depth=2, width=32, diffusion_steps=10), std=0.2).double()
    g = torch.Generator().manual_seed(0)
    zc, zu = torch.randn(6, 16, generator=g, dtype=torch.float64), torch.randn(6, 16, generator=g, dtype=torch.float64)
    tol = dict(rtol=1e-9, atol=1e-9)
    cond = dl.sample(zc, 1.0, 1.0, generator=torch.Generator().manual_seed(5))
    guided = dl.sample(torch.cat([zc, zu]), 1.0, 1.0, generator=torch.Generator().manual_seed(5), guided=True)
    assert guided.dtype == torch.float64 and guided.shape == (12, 4) and torch.equal(guided[:6], guided[6:])
    torch.testing.assert_close(guided[:6], cond, **tol)

    def reference(scale):
        """Plain p_sample_loop with eps = eps_u + s (eps_c - eps_u) and the conditional half's
        variance (MAR's layout: the sampled tokens are the conditional rows)."""
        def model_fn(x, t):
            oc, ou = dl.net(x, t, zc), dl.net(x, t, zu)
            return torch.cat([ou[:, :4] + scale * (oc[:, :4] - ou[:, :4]), oc[:, 4:]], dim=1)
        gen = torch.Generator().manual_seed(5)
        noise = torch.randn(6, 4, generator=gen, dtype=torch.float64)
        return dl.gen_diffusion().p_sample_loop(model_fn, noise, generator=gen, clip_x0=dl.clip_x0)
    for scale in (0.0, 1.0, 3.0):
        got = dl.sample(torch.cat([zc, zu]), 1.0, scale, generator=torch.Generator().manual_seed(5), guided=True)
        torch.testing.assert_close(got[:6], reference(scale), **tol)
    # scale 0 takes the unconditional eps but keeps the conditional variance, so it is not the
    # unconditional path (float32's 1e-4 tolerance once hid that); a real scale is far from cond
    uncond = dl.sample(zu, 1.0, 1.0, generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(reference(0.0), uncond, rtol=1e-7, atol=1e-7)
    g3 = dl.sample(torch.cat([zc, zu]), 1.0, 3.0, generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(g3[:6], cond, atol=1e-3)


def test_diffloss_mask_average():
    dl = DiffLoss(4, 16, depth=1, width=32)
    target, z = torch.randn(8, 4), torch.randn(8, 16)
    mask = torch.tensor([1, 0, 1, 0, 0, 0, 0, 1.0])
    torch.manual_seed(0)
    per_row = dl.train_diffusion.training_losses(lambda x, t: dl.net(x, t, z), target,
                                                 torch.randint(0, 1000, (8,)))["loss"]
    torch.manual_seed(0)
    loss = dl(target, z, mask)
    torch.testing.assert_close(loss, per_row[mask.bool()].mean())


# ------------------------------------------------------------------ layers
def test_vit_attention_uses_timm_qkv_layout():
    """qkv.weight rows are [q; k; v], each split into heads of consecutive channels (timm)."""
    m = _tiny()
    attn = m.encoder_blocks[0].attn
    x = torch.randn(2, 5, 64)
    w, bias = attn.qkv.weight, attn.qkv.bias
    heads, hd = attn.num_heads, 64 // attn.num_heads
    outs = []
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        q = x @ w[sl].T + bias[sl]
        k = x @ w[64:128][sl].T + bias[64:128][sl]
        v = x @ w[128:][sl].T + bias[128:][sl]
        outs.append(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), -1) @ v)
    want = attn.proj(torch.cat(outs, -1))
    torch.testing.assert_close(attn(x), want, rtol=1e-5, atol=1e-5)


def test_timestep_embedding_is_cos_then_sin():
    from d2c.diffusion import timestep_embedding
    e = timestep_embedding(torch.tensor([0, 3]), 256)
    assert torch.equal(e[0], torch.cat([torch.ones(128), torch.zeros(128)]))
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    torch.testing.assert_close(e[1], torch.cat([torch.cos(3 * freqs), torch.sin(3 * freqs)]))
