"""The Triton attention kernels of d2c.kernels.attention_triton beyond the basic cases of
test_kernels.py: key blocks past a row's last kept key are skipped (never read), the split-K
decode kernel and its combine step, one compute dtype per launch, and every launch the CUDA path
makes for the models' cases compiling for Hopper (sm_90) with no register spill for every tile its
autotuner may pick.

Interpreter tests (tests/conftest.py sets TRITON_INTERPRET=1): small shapes, fresh random inputs,
float64 reference, outputs poisoned with NaN.  K and V beyond each row's last kept key are NaN as
well: a kernel that read them (even masked: 0 * NaN = NaN in the P @ V product) fails.

    python tests/test_attention_kernels.py --sm90-table     (the compile table, for a report)
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from d2c.kernels import record_launches  # noqa: E402
from d2c.kernels.aot import compile_for_gpu  # noqa: E402
from d2c.kernels.attention import attention_reference  # noqa: E402
from d2c.kernels.attention_triton import _num_splits, attention_decode_triton, attention_triton  # noqa: E402

TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def _qkv(b, h, lq, lk, d, dtype, g):
    return [torch.randn(b, h, n, d, generator=g, dtype=torch.float64).to(dtype) for n in (lq, lk, lk)]


def _varied_mask(b, lk, g):
    """Rows keep very different counts: all, a single first key, a prefix, a random non-prefix
    subset, a single key in the middle, none (that row's output is 0); more rows: random prefixes."""
    m = torch.zeros(b, lk, dtype=torch.bool)
    m[0] = True
    m[1, 0] = True
    m[2, :17] = True
    m[3] = torch.rand(lk, generator=g) < 0.4
    m[3, lk * 2 // 3:] = False
    m[3, lk * 2 // 3 - 1] = True
    m[4, lk // 2] = True
    for r in range(6, b):
        m[r, :int(torch.randint(1, lk + 1, (), generator=g))] = True
    return m


def _poison_past_last_kept(k, v, kpm):
    """K and V with NaN at every key after a row's last kept key (all of a row that keeps none)."""
    k, v = k.clone(), v.clone()
    pos = torch.arange(kpm.shape[1])
    last = torch.where(kpm.any(1), (kpm * (pos + 1)).amax(1), 0)           # index of last kept key + 1
    dead = pos[None] >= last[:, None]
    k[dead[:, None, :, None].expand_as(k)] = float("nan")
    v[dead[:, None, :, None].expand_as(v)] = float("nan")
    return k, v


def _check(out, q, k, v, causal, kpm, dtype):
    ref = attention_reference(q.double(), k.double(), v.double(), causal=causal, key_padding_mask=kpm)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])


# ------------------------------------------------------------------ padded key blocks skipped
@DTYPES
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("blocks", [(16, 16), (None, None)], ids=["blocks16", "default"])
def test_key_blocks_past_the_last_kept_key_are_skipped(blocks, causal, dtype):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    b, h, lq, lk, d = 7, 2, 40, 70, 24
    q, k, v = _qkv(b, h, lq, lk, d, dtype, g)
    kpm = _varied_mask(b, lk, g)
    kn, vn = _poison_past_last_kept(k, v, kpm)
    out = torch.full_like(q, float("nan"))
    attention_triton(q, kn, vn, causal=causal, key_padding_mask=kpm, out=out, block_m=blocks[0], block_n=blocks[1])
    _check(out, q, k, v, causal, kpm, dtype)
    assert torch.equal(out[5], torch.zeros_like(out[5]))                     # keeps no key


# ------------------------------------------------------------------ split-K decode
@DTYPES
@pytest.mark.parametrize("lq,splits", [(1, 1), (1, 2), (1, 5), (3, 3), (16, 2)])
@pytest.mark.parametrize("causal,padded", [(True, False), (False, True), (True, True)],
                         ids=["causal", "padded", "causal-padded"])
def test_split_decode_matches_reference(causal, padded, lq, splits, dtype):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    b, h, lk, d = 7 if padded else 2, 2, 75, 24
    q, k, v = _qkv(b, h, lq, lk, d, dtype, g)
    kpm = _varied_mask(b, lk, g) if padded else None
    kn, vn = _poison_past_last_kept(k, v, kpm) if padded else (k, v)
    out = torch.full_like(q, float("nan"))
    attention_decode_triton(q, kn, vn, causal=causal, key_padding_mask=kpm, out=out, num_splits=splits, block_n=16)
    _check(out, q, k, v, causal, kpm, dtype)


def test_decode_dispatch_split_rule_and_rows_that_see_nothing():
    """attention_triton sends a few queries against a longer cache to the split kernel with
    FlashAttention-2's split count; causal rows before the first key and rows of a mask that
    keeps nothing give 0 there too."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    q, k, v = _qkv(3, 2, 2, 300, 16, torch.float32, g)
    kpm = torch.ones(3, 300, dtype=torch.bool)
    kpm[1] = False
    kpm[2, 100:] = False
    out = torch.full_like(q, float("nan"))
    with record_launches() as rec:
        attention_triton(q, k, v, causal=True, key_padding_mask=kpm)
    assert [r.name for r in rec] == ["_attn_split", "_attn_combine"]
    assert rec[0].constexprs["SPLIT"] and rec[0].args["CHUNK"] == 160      # 6 programs < 0.8 * 264: 2 splits
    attention_triton(q, k, v, causal=True, key_padding_mask=kpm, out=out)
    _check(out, q, k, v, True, kpm, torch.float32)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    q9, k4, v4 = _qkv(2, 1, 9, 4, 16, torch.float32, g)                    # more queries than keys
    out = torch.full_like(q9, float("nan"))
    attention_decode_triton(q9, k4, v4, causal=True, out=out, num_splits=2)
    _check(out, q9, k4, v4, True, None, torch.float32)
    assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5]))
    # the rule: batch*heads that fill 80% of two programs per SM run unsplit; few long rows split
    assert _num_splits(32 * 12, 4096, 64, 132) == 1
    assert _num_splits(1 * 12, 4096, 64, 132) == 16
    assert _num_splits(4 * 12, 2048, 64, 132) == 4
    assert _num_splits(1 * 12, 200, 64, 132) == 1
    assert _num_splits(2 * 12, 4096, 80, 132) == 11                      # 264 programs: one full wave


def test_one_compute_dtype_per_launch():
    """bf16 queries beside fp32 keys and values (autocast hands such a mix): k and v are cast to
    q's dtype before the launch, so no bf16 x fp32 tl.dot can reach a GPU."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    q, k, v = _qkv(2, 2, 20, 20, 16, torch.float32, g)
    qb = q.bfloat16()
    for lq in (20, 2):
        with record_launches() as rec:
            attention_triton(qb[:, :, :lq], k, v)
        for r in rec:
            assert {t.dtype for n, t in r.args.items() if n in ("Q", "K", "V")} == {torch.bfloat16}, r.name
        out = torch.full_like(qb[:, :, :lq], float("nan"))
        attention_triton(qb[:, :, :lq], k, v, out=out)
        _check(out, qb[:, :, :lq], k.bfloat16(), v.bfloat16(), False, None, torch.bfloat16)


# ------------------------------------------------------------------ sm_90 compile of the CUDA path
MODEL_CASES = [  # (batch, heads, lq, lk, causal, padded)
    (32, 12, 320, 320, False, False),    # MAR-B decoder
    (32, 12, 320, 320, False, True),     # MAR-B encoder, rows keep different counts
    (32, 12, 257, 257, True, False),     # GPT-B prefill
    (32, 12, 1, 257, True, False),       # GPT-B decode: batch*heads fill the GPU, one split
    (1, 12, 1, 2048, True, False),       # one sequence against a long cache: split-K + combine
    (32, 12, 320, 256, False, False),    # fusion cross-attention
]


def _record_model_launches(d, q_dtype, kv_dtype):
    """Every launch the CUDA branch makes for the models' cases (meta tensors: nothing allocated)."""
    recs = []
    for b, h, lq, lk, causal, padded in MODEL_CASES:
        q = torch.empty(b, h, lq, d, dtype=q_dtype, device="meta")
        k, v = (torch.empty(b, h, lk, d, dtype=kv_dtype, device="meta") for _ in range(2))
        kpm = torch.ones(b, lk, dtype=torch.bool, device="meta") if padded else None
        with record_launches() as rec:
            attention_triton(q, k, v, causal=causal, key_padding_mask=kpm)
        recs += rec
    return recs


def _model_launches():
    recs = []
    for d in (64, 80):
        for q_dt, kv_dt in ((torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                            (torch.bfloat16, torch.float32)):
            rs = _record_model_launches(d, q_dt, kv_dt)
            for r in rs:                                 # one compute dtype: q's
                assert {r.args[n].dtype for n in ("Q", "K", "V") if n in r.args} <= {q_dt}, r.name
            recs += rs
    return recs


def test_model_launches_compile_for_sm90_without_spills():
    recs = _model_launches()
    assert {r.name for r in recs} == {"_attn_fwd", "_attn_split", "_attn_combine"}
    assert {r.constexprs["SPLIT"] for r in recs if r.name == "_attn_split"} == {False, True}
    assert all(hasattr(r.kernel, "configs") for r in recs if r.name != "_attn_combine")   # autotuned
    rows = compile_for_gpu(recs, arch=90)
    bad = [(c["kernel"], c["constexprs"], c["options"], c["error"]) for c in rows if not c["ok"]]
    assert not bad, bad
    for c in rows:
        assert c["spill_bytes"] == 0, c
        assert 0 < c["registers"] <= 255 and c["shared_bytes"] <= 227 * 1024, c
    kinds = {(c["kernel"], c["signature"]["Q" if "Q" in c["signature"] else "O"], c["constexprs"]["BLOCK_D"])
             for c in rows}
    assert kinds == {(k, t, bd) for k in ("_attn_fwd", "_attn_split", "_attn_combine")
                     for t in ("*bf16", "*fp32") for bd in (64, 128)}


def _table():
    rows = compile_for_gpu(_model_launches(), arch=90)
    seen = {}
    for c in rows:
        cs, o = c["constexprs"], c["options"]
        key = (c["kernel"], c["signature"]["Q" if "Q" in c["signature"] else "O"][1:], cs.get("BLOCK_D"),
               cs.get("BLOCK_M"), cs.get("BLOCK_N"), o.get("num_warps"), o.get("num_stages"),
               "causal" if cs.get("CAUSAL") else "", "padded" if cs.get("HAS_KPM") else "",
               ("split" if cs["SPLIT"] else "one") if "SPLIT" in cs else "")
        seen.setdefault(key, []).append(c)
    print("| kernel | dtype | BLOCK_D | BLOCK_M | BLOCK_N | warps | stages | flags | registers | spill B | shared B |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for key in sorted(seen, key=str):
        cs = seen[key]
        regs = sorted({c["registers"] for c in cs})
        print(f"| {' | '.join(str(x) for x in key[:7])} | {' '.join(x for x in key[7:] if x)} | "
              f"{'-'.join(map(str, (regs[0], regs[-1]) if len(regs) > 1 else regs))} | "
              f"{max(c['spill_bytes'] for c in cs)} | {max(c['shared_bytes'] for c in cs)} |")


if __name__ == "__main__" and sys.argv[1:] == ["--sm90-table"]:
    _table()
