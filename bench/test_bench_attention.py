"""Attention: reference vs SDPA vs Triton over the masks the models use.  CPU runs the
reference and SDPA at MAR-B/GPT-B shapes (batch 2 = one CFG pair); Triton and the big-batch
shapes are GPU cases (`--gpu`): on CPU Triton only has its interpreter."""
import pytest
import torch

from conftest import key
from d2c.kernels.attention import attention

MASKS = {  # name -> (lq, lk, causal, ragged key padding)
    "none-320": (320, 320, False, False),      # MAR-B decoder: 64 buffer + 256 tokens
    "ragged-320": (320, 320, False, True),     # MAR-B encoder, rows keep different counts
    "causal-320": (257, 257, True, False),     # GPT-B training / prefill
    "decode-257": (1, 257, True, False),       # GPT-B decode step against the KV cache
    "cross-320x256": (320, 256, False, False),  # fusion cross-attention
}


def _inputs(b, h, mask, device, dtype):
    lq, lk, causal, ragged = MASKS[mask]
    g = torch.Generator(device).manual_seed(0)
    q = torch.randn(b, h, lq, 64, device=device, dtype=dtype, generator=g)
    k = torch.randn(b, h, lk, 64, device=device, dtype=dtype, generator=g)
    v = torch.randn(b, h, lk, 64, device=device, dtype=dtype, generator=g)
    kpm = None
    if ragged:
        keep = torch.linspace(lk // 2, lk, b, device=device).long()
        kpm = torch.arange(lk, device=device)[None] < keep[:, None]
    return q, k, v, dict(causal=causal, key_padding_mask=kpm)


def _run(benchmark, backend, mask, b, device, dtype):
    q, k, v, kw = _inputs(b, 12, mask, device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def fn():
        attention(q, k, v, backend=backend, **kw)
        sync()

    with torch.inference_mode():
        fn()
        benchmark(fn)


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_attention_cpu(benchmark, backend, mask):
    benchmark.group = f"attention cpu {mask}"
    key(benchmark, f"attn/{backend}/{mask}", device="cpu")
    _run(benchmark, backend, mask, 2, torch.device("cpu"), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
def test_attention_gpu(benchmark, backend, mask, device):
    benchmark.group = f"attention gpu bf16 b32 {mask}"
    key(benchmark, f"gpu:attn/{backend}/{mask}", device="cuda")
    _run(benchmark, backend, mask, 32, device, torch.bfloat16)
