"""Public API: build, load_pretrained and its errors, the attention dispatch."""
import argparse

import pytest
import torch

import d2c
from d2c.checkpoint import CheckpointError, save_safetensors
from d2c.kernels.attention import attention, attention_reference


def test_build_rejects_unknown_preset_and_field():
    with pytest.raises(ValueError, match="unknown preset 'mar_tiniest'.*allowed:.*mar_tiny"):
        d2c.build("mar_tiniest")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['depth'\]"):
        d2c.build("gpt_tiny", depth=3)
    with pytest.raises(ValueError, match="fusion.kind='qformr'; allowed: none, cross_attn, qformer"):
        d2c.build("mar_tiny", fusion="qformr")
    with pytest.raises(ValueError, match="num_queries=9; allowed: 1..buffer_size=8"):
        d2c.build("mar_tiny", fusion={"kind": "qformer", "num_queries": 9})


def test_build_overrides_reach_the_model():
    m = d2c.build("mar_tiny", fusion={"kind": "cross_attn", "layers": (1,)}, decoder_depth=3)
    assert len(m.decoder_blocks) == 3 and list(m.fusion.cross.keys()) == ["1"]


def _mar_container(path, sd):
    # the layout MAR's training script writes: weights, EMA weights, optimizer, argparse args
    torch.save({"model": sd, "model_ema": sd, "epoch": 3, "args": argparse.Namespace(lr=1e-4)}, path)


def test_load_pretrained_mar_container_with_args(tmp_path):
    src = d2c.build("mar_tiny")
    sd = {k: torch.randn_like(v) for k, v in src.state_dict().items()}
    _mar_container(tmp_path / "ck.pth", sd)
    m = d2c.load_pretrained("mar_tiny", tmp_path / "ck.pth")
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_load_pretrained_errors_are_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        d2c.load_pretrained("gpt_tiny", tmp_path / "nope.pt")
    # wrong model: names the first mismatching key and both shapes
    save_safetensors(d2c.build("gpt_tiny", dim=128), tmp_path / "big.safetensors")
    with pytest.raises(CheckpointError, match=r"shape mismatch at \S+: checkpoint \(\d+, 128\) vs model \(\d+, 64\)") as e:
        d2c.load_pretrained("gpt_tiny", tmp_path / "big.safetensors")
    assert "\n" not in str(e.value)
    # MAR weights into a D2C model: the fusion keys are missing, named in the message
    save_safetensors(d2c.build("mar_tiny"), tmp_path / "mar.safetensors")
    with pytest.raises(CheckpointError, match=r"missing \[fusion\.\S+, fusion\."):
        d2c.load_pretrained("mar_tiny", tmp_path / "mar.safetensors", fusion="qformer")
    # non-strict load keeps the MAR backbone (fine-tuning D2C from a MAR checkpoint)
    m = d2c.load_pretrained("mar_tiny", tmp_path / "mar.safetensors", strict=False, fusion="qformer")
    assert m.fusion is not None
    # truncated safetensors
    data = (tmp_path / "mar.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        d2c.load_pretrained("mar_tiny", tmp_path / "cut.safetensors")


def test_ddp_prefix_is_stripped(tmp_path):
    src = d2c.build("gpt_tiny")
    torch.save({"model": {"module." + k: v for k, v in src.state_dict().items()}}, tmp_path / "ddp.pt")
    m = d2c.load_pretrained("gpt_tiny", tmp_path / "ddp.pt")
    assert torch.equal(m.tok_embeddings.weight, src.tok_embeddings.weight)


@pytest.mark.parametrize("case", ["plain", "causal", "causal_cache", "padding", "causal_padding", "cross"])
def test_attention_dispatch_matches_float64_reference(case):
    b, h, d = 3, 2, 16
    lq, lk = {"causal_cache": (3, 9), "cross": (5, 11)}.get(case, (7, 7))
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64) for n in (lq, lk, lk))
    causal = case.startswith("causal")
    kpm = None
    if "padding" in case:
        kpm = torch.arange(lk)[None] < torch.tensor([lk, 4, 2])[:, None]
    ref = attention_reference(q, k, v, causal=causal, key_padding_mask=kpm)
    out = attention(q.float(), k.float(), v.float(), causal=causal, key_padding_mask=kpm)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    # the reference itself, against an explicit loop for one query row
    i = lq - 1
    s = (q[1, 0, i] @ k[1, 0].T) / d ** 0.5
    allowed = torch.ones(lk, dtype=torch.bool)
    if causal:
        allowed &= torch.arange(lk) <= i + lk - lq
    if kpm is not None:
        allowed &= kpm[1]
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), 0)
    torch.testing.assert_close(ref[1, 0, i], p @ v[1, 0])


class _NotATensor:
    """A global outside torch's weights_only allow-list: its file must be refused, never run."""


def test_check_pretrained_reads_the_layout_before_anything_runs(tmp_path):
    from d2c.checkpoint import check_pretrained
    kl = d2c.build("kl_tiny")
    torch.save({"model": kl.state_dict()}, tmp_path / "kl16.ckpt")           # MAR's container
    save_safetensors(kl, tmp_path / "kl.safetensors")
    for f in ("kl16.ckpt", "kl.safetensors"):
        check_pretrained("kl_tiny", tmp_path / f)
        with pytest.raises(CheckpointError, match=f"{f}: (shape mismatch|keys do not match)") as e:
            check_pretrained("vq_tiny", tmp_path / f)                        # another model's file
        assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="shape mismatch at"):
        check_pretrained("kl_tiny", tmp_path / "kl16.ckpt", embed_dim=8)
    torch.save({"model": kl.state_dict(), "extra": _NotATensor()}, tmp_path / "pickled.ckpt")
    with pytest.raises(CheckpointError, match="refused to load, the file holds more than tensors"):
        check_pretrained("kl_tiny", tmp_path / "pickled.ckpt")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        check_pretrained("kl_tiny", tmp_path / "missing.ckpt")
    data = (tmp_path / "kl.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        check_pretrained("kl_tiny", tmp_path / "cut.safetensors")
