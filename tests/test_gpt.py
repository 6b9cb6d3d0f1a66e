"""Stage-1 GPT (LlamaGen c2i layout), its KV cache and `gpt_generate`."""
import math

import pytest
import torch

import d2c
from d2c.models.gpt import apply_rope, rope_2d_table
from d2c.models.generate import gpt_generate, top_k_top_p_filter



def _gen(m, labels, generator=None, cfg_schedule="constant", compile=False, cfg=1.0, temperature=1.0, top_k=0,
         top_p=1.0):
    """gpt_generate at stage-1 settings given by name (the SamplerConfig's stage1_* fields)."""
    from d2c.sampling import SamplerConfig
    sampler = SamplerConfig(cfg=cfg, stage1_cfg_schedule=cfg_schedule, stage1_temperature=temperature,
                            stage1_top_k=top_k, stage1_top_p=top_p, compile=compile)
    return gpt_generate(m, labels, sampler, generator=generator)

def tiny(dtype=torch.float32, head_std=0.5):
    """gpt_tiny in eval mode with a random (not zero) head so that logits carry information."""
    m = d2c.build("gpt_tiny").to(dtype).eval()
    torch.nn.init.normal_(m.output.weight, std=head_std)
    return m


def full_logits(m, codes, labels):
    """Teacher-forced logits for any class id, null class included (bypasses the API check)."""
    h = torch.cat([m.cls_embedding(labels, drop=False), m.tok_embeddings(codes[:, :-1])], 1)
    return m._trunk(h)


# ----------------------------------------------------------------------------- layout
@pytest.mark.parametrize("preset,count", [("gpt_b", 110_888_448), ("gpt_l", 342_910_976),
                                          ("gpt_xl", 774_699_520)])
def test_param_count_matches_llamagen(preset, count):
    with torch.device("meta"):
        m = d2c.build(preset)
    assert sum(p.numel() for p in m.parameters()) == count


def test_public_key_names_and_shapes():
    with torch.device("meta"):
        m = d2c.build("gpt_b")
    sd = m.state_dict()
    want = {"cls_embedding.embedding_table.weight": (1001, 768),
            "tok_embeddings.weight": (16384, 768),
            "layers.0.attention.wqkv.weight": (2304, 768),
            "layers.0.attention.wo.weight": (768, 768),
            "layers.0.feed_forward.w1.weight": (2048, 768),
            "layers.0.feed_forward.w3.weight": (2048, 768),
            "layers.11.feed_forward.w2.weight": (768, 2048),
            "layers.11.attention_norm.weight": (768,),
            "layers.11.ffn_norm.weight": (768,),
            "norm.weight": (768,),
            "output.weight": (16384, 768)}
    for k, shape in want.items():
        assert tuple(sd[k].shape) == shape, k
    assert len(sd) == 4 + 7 * 12  # nothing but parameters
    m.setup_cache(2)
    assert set(m.state_dict()) == set(sd)
    assert not [k for k in sd if any(s in k for s in ("freq", "rope", "cache", "mask"))]


def test_public_container_reloads_strict(tmp_path):
    m = tiny()
    path = tmp_path / "c2i_tiny.pt"
    torch.save({"model": m.state_dict()}, path)
    m2 = d2c.load_pretrained("gpt_tiny", path).eval()
    codes, labels = torch.randint(0, 512, (2, 64)), torch.tensor([3, 7])
    torch.testing.assert_close(m2(codes, labels), m(codes, labels), rtol=0, atol=0)


def test_zero_head_initial_loss_is_ln_vocab():
    m = d2c.build("gpt_tiny")  # train mode: dropouts and label drop active, still exact
    loss = m.loss(torch.randint(0, 512, (4, 64)), torch.randint(0, 10, (4,)))
    assert loss.dtype == torch.float32
    assert abs(loss.item() - math.log(512)) < 1e-5


def test_forward_shape_fp32_under_bf16_autocast():
    m = tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(torch.randint(0, 512, (2, 16)), torch.tensor([0, 9]))
    assert out.shape == (2, 16, 512) and out.dtype == torch.float32


def test_label_drop_uses_null_class_in_training_only():
    m = d2c.build("gpt_tiny", class_dropout_prob=1.0)
    table = m.cls_embedding.embedding_table.weight
    labels = torch.tensor([1, 2, 3])
    torch.testing.assert_close(m.cls_embedding(labels, drop=True)[:, 0], table[[10, 10, 10]])
    torch.testing.assert_close(m.cls_embedding(labels, drop=False)[:, 0], table[labels])


# ----------------------------------------------------------------------------- causality
def test_no_future_leakage():
    m = tiny()
    t_len, seen = 12, {}
    m.tok_embeddings.register_forward_hook(lambda mod, inp, out: seen.setdefault("emb", out))
    m.tok_embeddings.register_forward_hook(lambda mod, inp, out: out.retain_grad())
    logits = m(torch.randint(0, 512, (2, t_len)), torch.tensor([1, 2]))
    for t in (0, 5, t_len - 1):
        seen["emb"].grad = None
        logits[:, t].pow(2).sum().backward(retain_graph=True)
        g = seen["emb"].grad.abs().sum(dim=(0, 2))  # per input code; code j sits at position j+1
        assert torch.all(g[t:] == 0), f"logits at {t} see codes {(g[t:] != 0).nonzero().flatten() + t}"
        assert torch.all(g[:t] > 0)  # and they do see the past


# ----------------------------------------------------------------------------- 2D RoPE
def test_rope_table_and_rotation_match_float64_formula():
    grid, hd, base = 8, 16, 10000.0
    table = rope_2d_table(grid, hd, base, n_prefix=1)
    assert table.shape == (1 + grid * grid, hd // 2, 2)
    x = torch.randn(1, 1 + grid * grid, 3, hd, dtype=torch.float64)
    out = apply_rope(x, table)
    # class prefix: LlamaGen's all-zero table, so q/k of the class token are zero
    assert torch.all(table[0] == 0) and torch.all(out[:, 0] == 0)
    for r, c in [(0, 0), (2, 5), (7, 3)]:
        s = 1 + r * grid + c  # raster order after the class token
        for j in range(hd // 2):
            i, p = (j, r) if j < hd // 4 else (j - hd // 4, c)  # first quarter: row, second: column
            th = p * base ** (-2.0 * i / (hd // 2))
            a, b = x[0, s, :, 2 * j], x[0, s, :, 2 * j + 1]
            want = torch.stack([a * math.cos(th) - b * math.sin(th), a * math.sin(th) + b * math.cos(th)], -1)
            torch.testing.assert_close(out[0, s, :, 2 * j:2 * j + 2], want, rtol=0, atol=2e-6)


def test_rope_scores_depend_on_2d_offset_only():
    grid, hd = 8, 16
    table = rope_2d_table(grid, hd)
    q, k = torch.randn(2, hd, dtype=torch.float64)

    def score(pq, pk):
        rot = lambda v, p: apply_rope(v[None, None, None], table[1 + p[0] * grid + p[1]][None])[0, 0, 0]
        return (rot(q, pq) * rot(k, pk)).sum()

    torch.testing.assert_close(score((1, 2), (3, 1)), score((4, 5), (6, 4)), atol=1e-5, rtol=0)
    assert abs(score((1, 2), (3, 1)) - score((1, 2), (1, 3))) > 1e-3  # rows and columns differ


# ----------------------------------------------------------------------------- KV cache
def test_kv_cache_steps_equal_full_recompute():
    m = tiny(torch.float64)
    codes, labels = torch.randint(0, 512, (3, 64)), torch.tensor([0, 4, 9])
    ref = m(codes, labels)
    with torch.inference_mode():
        m.setup_cache(3, 64)
        steps = [m.prefill(labels)] + [m.decode(codes[:, t - 1:t], t) for t in range(1, 64)]
        m.clear_cache()
    torch.testing.assert_close(torch.stack(steps, 1), ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_greedy_generation_equals_full_recompute(cfg):
    m = tiny(torch.float64)
    labels = torch.tensor([2, 5])
    codes, nfe = _gen(m, labels, cfg=cfg, temperature=0.0)
    assert codes.shape == (2, 64) and codes.dtype == torch.long
    assert nfe["ar_steps"] == 64 and nfe["batch_mul"] == (2 if cfg != 1 else 1)
    with torch.no_grad():
        c = full_logits(m, codes, labels)
        u = full_logits(m, codes, torch.full_like(labels, 10))
    logits = c if cfg == 1 else u + cfg * (c - u)
    assert torch.equal(codes, logits.argmax(-1))
    if cfg != 1:  # guidance must actually change something, or the test proves nothing
        assert not torch.equal(codes, c.argmax(-1))


def test_cfg_batches_cond_then_null_and_skips_uncond_at_scale_one():
    m = tiny()
    seen = []
    m.cls_embedding.embedding_table.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].clone()))
    g = lambda: torch.Generator().manual_seed(0)
    a, _ = _gen(m, torch.tensor([3, 8]), cfg=1.0, generator=g())
    assert [s.tolist() for s in seen] == [[3, 8]]
    seen.clear()
    b, _ = _gen(m, torch.tensor([3, 8]), cfg=4.0, generator=g())
    assert [s.tolist() for s in seen] == [[3, 8, 10, 10]]  # uncond half = null class
    assert not torch.equal(a, b)
    assert m.layers[0].attention.kv_cache is None and not m.training


# ----------------------------------------------------------------------------- sampling
def test_top_k_top_p_keep_exactly_the_right_set():
    probs = torch.tensor([0.1, 0.4, 0.2, 0.3])
    logits = probs.log()

    def kept(**kw):
        return set(torch.isfinite(top_k_top_p_filter(logits, **kw)).nonzero().flatten().tolist())

    assert kept() == {0, 1, 2, 3}
    assert kept(top_k=1) == {1}
    assert kept(top_k=2) == {1, 3}
    assert kept(top_k=3) == {1, 2, 3}
    assert kept(top_p=0.35) == {1}            # 0.4 alone crosses 0.35
    assert kept(top_p=0.5) == {1, 3}          # 0.4 + 0.3 crosses 0.5
    assert kept(top_p=0.75) == {1, 2, 3}      # 0.9 crosses 0.75
    assert kept(top_p=0.95) == {0, 1, 2, 3}
    assert kept(top_k=2, top_p=0.75) == {1, 3}
    rows = top_k_top_p_filter(torch.stack([logits, logits.flip(0)]), top_p=0.5)
    assert torch.isfinite(rows).tolist() == [[False, True, False, True], [True, False, True, False]]
    assert torch.equal(top_k_top_p_filter(logits, top_k=2)[[1, 3]], logits[[1, 3]])  # kept unchanged


def test_seed_reproduces_bit_for_bit():
    m = tiny()
    kw = dict(cfg=2.0, temperature=1.0, top_k=100, top_p=0.9, cfg_schedule="linear")
    run = lambda seed: _gen(m, torch.tensor([1, 2, 3]), generator=torch.Generator().manual_seed(seed), **kw)[0]
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert int(a.min()) >= 0 and int(a.max()) < 512


@pytest.mark.parametrize("kw", [dict(cfg=2.0, top_k=40, top_p=0.9, cfg_schedule="linear"), dict(cfg=1.0),
                                dict(cfg=3.0, temperature=0.0), dict(cfg=1.5, temperature=0.7)],
                         ids=["cfg-linear-topk-topp", "nocfg", "greedy", "cfg-temp"])
def test_static_decode_step_gives_the_eager_codes(kw, monkeypatch):
    """compile=True decodes through `_static_step` over a full-length cache (positions masked):
    what a CUDA graph replays.  Run here without torch.compile, it gives the eager loop's codes."""
    from d2c.models import generate
    m = tiny(head_std=0.2)
    labels = torch.tensor([0, 3, 7])
    ref, _ = _gen(m, labels, generator=torch.Generator().manual_seed(5), **kw)
    monkeypatch.setattr(generate, "compiled_fn", lambda fn: fn)
    out, _ = _gen(m, labels, generator=torch.Generator().manual_seed(5), compile=True, **kw)
    assert torch.equal(out, ref)
    assert len(set(ref.flatten().tolist())) > 8                   # not a degenerate sampler


def test_inverse_cdf_pick_follows_the_filtered_distribution():
    from d2c.models.generate import _gpt_pick
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 12, generator=g).expand(40_000, -1)
    u = torch.rand(40_000, generator=g)
    u[:2] = torch.tensor([0.0, 1.0 - 2 ** -24])                  # the ends of [0, 1)
    picks = _gpt_pick(logits, 0.8, 5, 0.9, u)
    kept = torch.isfinite(top_k_top_p_filter(logits[:1] / 0.8, 5, 0.9))[0]
    assert kept[picks].all()                                       # never a filtered code
    p = top_k_top_p_filter(logits[:1] / 0.8, 5, 0.9).softmax(-1)[0]
    freq = torch.bincount(picks, minlength=12).double() / picks.numel()
    assert (freq - p.double()).abs().max() < 0.01                  # 40k draws: ~4 sigma
    assert torch.equal(_gpt_pick(logits[:3], 0.0, 0, 1.0, u[:3]), logits[:3].argmax(-1))


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("bad", [10, -1])
def test_out_of_range_labels_raise_one_line_valueerror(bad):
    m = tiny()
    for call in (lambda: m(torch.zeros(1, 4, dtype=torch.long), torch.tensor([bad])),
                 lambda: _gen(m, torch.tensor([0, bad]))):
        with pytest.raises(ValueError, match=r"\[0, 9\]") as e:
            call()
        assert "\n" not in str(e.value)


def test_bad_sampling_arguments_raise():
    m = tiny()
    with pytest.raises(ValueError, match="cfg_schedule"):
        _gen(m, [0], cfg_schedule="cosine")
    with pytest.raises(ValueError, match=r"^stage1_top_p=0.0: allowed: numbers in \(0, 1\]$"):
        _gen(m, [0], top_p=0.0)
