"""Triton kernels against their float64 references, run by Triton's interpreter on
CPU (tests/conftest.py sets TRITON_INTERPRET=1 before any import).  Small shapes: the
interpreter is 400-4000x slower than a GPU.  Output buffers start as NaN, so an element the
kernel forgets to write fails the comparison."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from d2c.kernels import adaln_mlp, head_sampling, record_launches  # noqa: E402
from d2c.kernels.attention import (ATTENTION_CASES, ATTENTION_DISPATCH, attention, attention_backend,  # noqa: E402
                                   attention_case, attention_reference, resolve_backend)
from d2c.kernels.attention_triton import attention_triton  # noqa: E402

TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _qkv(b, h, lq, lk, d, dtype, g):
    q = torch.randn(b, h, lq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, h, lk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, h, lk, d, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _ragged(b, lk, g):
    """Key-padding mask of MAR's encoder: row r keeps a different count, first row keeps all."""
    keep = torch.randint(1, lk + 1, (b,), generator=g)
    keep[0] = lk
    return torch.arange(lk)[None] < keep[:, None]


# ------------------------------------------------------------------ attention kernel
CASES = [  # (lq, lk, causal, padded): the shapes the models run
    (19, 19, False, False),   # MAR decoder / Q-Former self-attention
    (19, 19, False, True),    # MAR encoder, rows keep different token counts
    (7, 23, False, False),    # fusion cross-attention: queries and keys of different lengths
    (7, 23, False, True),
    (21, 21, True, False),    # GPT training / prefill
    (1, 37, True, False),     # GPT decode: one query against the KV cache
    (5, 37, True, False),     # several new tokens against a cache
    (5, 37, True, True),
    (9, 4, True, False),      # more queries than keys: early rows see nothing -> 0
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lq,lk,causal,padded", CASES)
def test_attention_kernel_matches_reference(lq, lk, causal, padded, dtype):
    g = torch.Generator().manual_seed(hash((lq, lk, causal, padded)) % 2**31)
    b, h, d = 3, 2, 24                                       # d not a power of two: masked lanes
    q, k, v = _qkv(b, h, lq, lk, d, dtype, g)
    kpm = _ragged(b, lk, g) if padded else None
    out = torch.full_like(q, float("nan"))
    attention_triton(q, k, v, causal=causal, key_padding_mask=kpm, out=out)
    ref = attention_reference(q.double(), k.double(), v.double(), causal=causal, key_padding_mask=kpm)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])


def test_attention_kernel_strided_inputs_and_multiple_blocks():
    """MAR hands in permuted views of one qkv tensor; lengths span several key/query blocks."""
    g = torch.Generator().manual_seed(1)
    b, n, h, d = 2, 45, 2, 16
    qkv = torch.randn(b, n, 3, h, d, generator=g).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    kpm = _ragged(b, n, g)
    out = torch.full((b, h, n, d), float("nan"))
    attention_triton(q, k, v, key_padding_mask=kpm, out=out, block_m=16, block_n=16)
    ref = attention_reference(q.double(), k.double(), v.double(), key_padding_mask=kpm)
    torch.testing.assert_close(out.double(), ref, **TOL[torch.float32])
    out = torch.full((b, h, n, d), float("nan"))
    attention_triton(q, k, v, causal=True, out=out, block_m=16, block_n=16)
    ref = attention_reference(q.double(), k.double(), v.double(), causal=True)
    torch.testing.assert_close(out.double(), ref, **TOL[torch.float32])


def test_fully_masked_rows_are_zero_on_every_backend():
    g = torch.Generator().manual_seed(2)
    q, k, v = _qkv(2, 1, 4, 3, 8, torch.float32, g)
    kpm = torch.tensor([[False] * 3, [True, False, True]])
    outs = [attention(q, k, v, key_padding_mask=kpm, backend=be) for be in ("reference", "sdpa", "triton")]
    for o in outs:
        assert torch.equal(o[0], torch.zeros_like(o[0]))
        torch.testing.assert_close(o, outs[0])


def test_dispatch_rules(monkeypatch):
    q = torch.randn(1, 1, 4, 8)
    assert resolve_backend(q) == "sdpa"                      # CPU default, interpreter flag or not
    with attention_backend("reference"):
        assert resolve_backend(q) == "reference"
        assert resolve_backend(q, backend="triton") == "triton"   # argument beats context
    monkeypatch.setenv("D2C_ATTENTION", "triton")
    assert resolve_backend(q) == "triton"
    assert resolve_backend(q, needs_grad=True) == "sdpa"     # forward-only kernel: training uses SDPA
    assert resolve_backend(q, dropout_p=0.1) == "sdpa"
    monkeypatch.setenv("D2C_ATTENTION", "flash")
    with pytest.raises(ValueError, match="allowed"):
        resolve_backend(q)
    monkeypatch.delenv("D2C_ATTENTION")
    with pytest.raises(ValueError, match="allowed"):
        with attention_backend("cudnn"):
            pass
    # auto on CUDA (record_launches makes every tensor take the CUDA branch): each case resolves
    # to its ATTENTION_DISPATCH entry; today's table (nothing measured for the new kernels) is SDPA
    kp = torch.ones(2, 9, dtype=torch.bool)
    calls = {"unmasked": (9, 9, False, None), "padded": (9, 9, False, kp), "causal": (9, 9, True, None),
             "decode": (1, 9, True, None), "cross": (9, 5, False, None)}
    assert set(calls) == set(ATTENTION_CASES) == set(ATTENTION_DISPATCH)
    assert set(ATTENTION_DISPATCH.values()) == {"sdpa"}
    for case, (lq, lk, causal, mask) in calls.items():
        assert attention_case(lq, lk, causal, mask) == case
    assert attention_case(4, 9, False, kp) == "decode" and attention_case(17, 40, True, None) == "causal"
    assert attention_case(16, 16, True, None) == "causal" and attention_case(9, 4, True, None) == "causal"
    for case, (lq, lk, causal, mask) in calls.items():
        qc, kc = torch.randn(2, 2, lq, 8, dtype=torch.bfloat16), torch.randn(2, 2, lk, 8, dtype=torch.bfloat16)
        monkeypatch.setitem(ATTENTION_DISPATCH, case, "triton")
        with record_launches():
            for other, (lq2, lk2, causal2, mask2) in calls.items():
                q2, k2 = torch.randn(2, 2, lq2, 8, dtype=torch.bfloat16), torch.randn(2, 2, lk2, 8, dtype=torch.bfloat16)
                got = resolve_backend(q2, k2, causal=causal2, key_padding_mask=mask2)
                assert got == ("triton" if other == case else "sdpa"), (case, other)
            assert resolve_backend(qc, kc, causal=causal, key_padding_mask=mask, needs_grad=True) == "sdpa"
            assert resolve_backend(qc, kc, causal=causal, key_padding_mask=mask, dropout_p=0.1) == "sdpa"
            assert resolve_backend(qc.float(), kc.float(), causal=causal, key_padding_mask=mask) == "sdpa"  # fp32
        assert resolve_backend(qc, kc, causal=causal, key_padding_mask=mask) == "sdpa"            # CPU
        monkeypatch.setitem(ATTENTION_DISPATCH, case, "sdpa")
    with record_launches(), attention_backend("triton"):          # forced: no table, but grad -> SDPA
        assert resolve_backend(qc, kc) == "triton"
        assert resolve_backend(qc, kc, needs_grad=True) == "sdpa"
        assert resolve_backend(qc, kc, dropout_p=0.1) == "sdpa"
    # grad flows through the dispatcher under a forced triton backend (SDPA takes over)
    qg = q.clone().requires_grad_()
    with attention_backend("triton"):
        attention(qg, q, q, causal=True).sum().backward()
    assert qg.grad is not None


def test_models_run_on_the_triton_backend():
    """MAR (ragged encoder mask, fusion cross-attention) and GPT (prefill + KV-cache decode)
    give the same outputs through the kernel as through SDPA."""
    import d2c
    torch.manual_seed(0)
    mar = d2c.build("mar_tiny", fusion="cross_attn").eval()
    b, L = 3, mar.seq_len
    tokens = torch.randn(b, L, mar.token_embed_dim)
    mask = torch.zeros(b, L, dtype=torch.bool)
    for r, n in enumerate([40, 17, 60]):                     # rows keep different counts
        mask[r, torch.randperm(L)[:n]] = True
    labels, codes = torch.tensor([1, 2, 3]), torch.randint(0, 512, (b, L))
    with torch.no_grad():
        ref = mar.condition(tokens, labels, mask, codes=codes)
        with attention_backend("triton"):
            out = mar.condition(tokens, labels, mask, codes=codes)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)

    gpt = d2c.build("gpt_tiny").eval()
    for p in gpt.parameters():
        p.data.normal_(0, 0.05)
    labels, codes = torch.tensor([1, 4]), torch.randint(0, 512, (2, 4))

    def run():                               # prefill, one 3-code chunk, one single-code step
        gpt.setup_cache(2, 8)
        try:
            return [gpt.prefill(labels), gpt.decode(codes[:, :3], 1), gpt.decode(codes[:, 3:4], 4)]
        finally:
            gpt.clear_cache()

    with torch.no_grad():
        ref = run()
        with attention_backend("triton"):
            out = run()
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ fused diffusion-head block
def _block(m, w, dtype, g):
    x = torch.randn(m, w, generator=g, dtype=torch.float64) + 0.5   # off-centre: LN's mean matters
    mod = torch.randn(m, 3 * w, generator=g, dtype=torch.float64) * 0.5
    ln_w, ln_b = 1 + 0.1 * torch.randn(w, generator=g, dtype=torch.float64), 0.1 * torch.randn(w, generator=g, dtype=torch.float64)
    w1, w2 = torch.randn(w, w, generator=g, dtype=torch.float64) / w ** 0.5, torch.randn(w, w, generator=g, dtype=torch.float64) / w ** 0.5
    b1, b2 = 0.1 * torch.randn(w, generator=g, dtype=torch.float64), 0.1 * torch.randn(w, generator=g, dtype=torch.float64)
    shift, scale, gate = mod.chunk(3, dim=1)                  # strided views, as the packed GEMM gives
    return [t.to(dtype) for t in (x, shift, scale, gate, ln_w, ln_b, w1, b1, w2, b2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m,w", [(1, 32), (21, 48), (70, 80)])
def test_resblock_kernels_match_reference(m, w, dtype):
    g = torch.Generator().manual_seed(m * 1000 + w)
    x, shift, scale, gate, ln_w, ln_b, w1, b1, w2, b2 = _block(m, w, dtype, g)
    ref = adaln_mlp.resblock_reference(*[t.double() for t in (x, shift, scale, gate, ln_w, ln_b, w1, b1, w2, b2)])
    h = adaln_mlp.ln_mod_linear_triton(x, shift, scale, ln_w, ln_b, w1, b1, silu=True,
                                       out=torch.full((m, w), float("nan"), dtype=dtype))
    out = adaln_mlp.linear_gate_residual_triton(h, w2, b2, x, gate, out=torch.full((m, w), float("nan"), dtype=dtype))
    assert not out.isnan().any()
    tol = TOL[dtype] if dtype == torch.float32 else dict(atol=8e-2, rtol=5e-2)
    torch.testing.assert_close(out.double(), ref, **tol)
    # final layer: LN without affine, no activation, narrow output (2C = 8)
    wf, bf = w1[:8].contiguous(), b1[:8]
    ref_f = adaln_mlp.final_reference(*[t.double() for t in (x, shift, scale, wf, bf)])
    out_f = adaln_mlp.ln_mod_linear_triton(x, shift, scale, None, None, wf, bf, silu=False,
                                           out=torch.full((m, 8), float("nan"), dtype=dtype))
    torch.testing.assert_close(out_f.double(), ref_f, **tol)


def _random_head(depth=2, width=48, c=4, z=16, std=0.1):
    from d2c.models.diffloss import DiffLoss
    dl = DiffLoss(c, z, depth=depth, width=width, diffusion_steps=8)
    with torch.no_grad():
        for name, p in dl.named_parameters():
            p.normal_(0, std if p.dim() > 1 else 0.05)
        dl.net.final_layer.linear.weight.mul_(0.1)           # a sane eps scale keeps the chain bounded
    return dl


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_head_matches_module_forward(backend):
    dl = _random_head()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(13, 4, generator=g), torch.randn(13, 48, generator=g)
    ref = dl.net.double().forward_y(x.double(), y.double())
    dl.float()
    out = adaln_mlp.head_forward(adaln_mlp.PackedHead(dl.net), x, y, backend)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)


def test_packed_head_under_bf16_autocast():
    """Autocast hands the trunk bf16 activations beside fp32 parameters: the Triton path casts the
    GEMM weights once (PackedHead.weights_in) and agrees with the float64 module within bf16."""
    dl = _random_head()
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(21, 4, generator=g), torch.randn(21, 48, generator=g)
    ref = dl.net.double().forward_y(x.double(), y.double())
    dl.float()
    pk = adaln_mlp.PackedHead(dl.net)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = {be: adaln_mlp.head_forward(pk, x, y, be) for be in ("torch", "triton")}
    blocks, out_w = pk.weights_in(torch.bfloat16)
    assert out_w.dtype == torch.bfloat16 and pk.weights_in(torch.bfloat16)[1] is out_w   # cast once
    for be, out in outs.items():
        assert out.dtype == torch.bfloat16, be
        torch.testing.assert_close(out.double(), ref, atol=3e-2 * ref.abs().max().item(), rtol=3e-2)


def test_head_dispatch_and_packed_cache(monkeypatch):
    assert adaln_mlp.resolve_head_backend("cpu") == "torch"
    from d2c.kernels import record_launches
    with record_launches():                                   # the CUDA branch: the measured table
        assert adaln_mlp.resolve_head_backend("cpu", dtype=torch.bfloat16) == "triton"
        assert adaln_mlp.resolve_head_backend("cpu", dtype=torch.float32) == "torch"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert adaln_mlp.compute_dtype("cpu", torch.float32) == torch.bfloat16
    assert adaln_mlp.compute_dtype("cpu", torch.float32) == torch.float32
    monkeypatch.setenv("D2C_HEAD", "triton")
    assert adaln_mlp.resolve_head_backend("cpu") == "triton"   # interpreter flag is set in tests
    monkeypatch.setenv("D2C_HEAD", "nope")
    with pytest.raises(ValueError, match="allowed"):
        adaln_mlp.resolve_head_backend("cpu")
    dl = _random_head()
    pk = head_sampling.packed_head(dl)
    assert head_sampling.packed_head(dl) is pk                   # stable while weights are unchanged
    with torch.no_grad():
        dl.net.res_blocks[0].mlp[0].weight.add_(1.0)
    assert head_sampling.packed_head(dl) is not pk               # an in-place update rebuilds it


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("guided", [False, True])
def test_fused_sampler_matches_eager(guided, sampler):
    dl = _random_head()
    z = torch.randn(10 if guided else 5, 16)
    cfg = 2.5 if guided else 1.0
    with torch.inference_mode():
        ref = dl.sample(z, 0.9, cfg, generator=torch.Generator().manual_seed(5), guided=guided, sampler=sampler)
        out = dl.sample(z, 0.9, cfg, generator=torch.Generator().manual_seed(5), guided=guided, impl="fused",
                        sampler=sampler)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-4)
