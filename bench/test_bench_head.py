"""Diffusion-head trunk (SimpleMLPAdaLN.forward_y: every res block + final layer) per reverse
step: the module (eager) vs the packed arrangement in PyTorch ops (fused-torch) vs that under
torch.compile vs the Triton kernels (GPU).  Rows = tokens of one MAR round x 2 (CFG)."""
import pytest
import torch

from conftest import key
from d2c.kernels import adaln_mlp
from d2c.models.diffloss import SimpleMLPAdaLN

SIZES = {"w1024": (1024, 6), "w64": (64, 2)}       # MAR-B head, tiny head


def _setup(size, rows, device, dtype=torch.float32):
    w, d = SIZES[size]
    torch.manual_seed(0)
    net = SimpleMLPAdaLN(16, w, 32, 768, d).to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)
    x = torch.randn(rows, 16, device=device, dtype=dtype)
    y = torch.randn(rows, w, device=device, dtype=dtype)
    return net, x, y


_COMPILED = {}


def _fn(variant, net, x, y):
    if variant == "eager":
        return lambda: net.forward_y(x, y)
    pk = adaln_mlp.PackedHead(net)
    if variant == "fused-torch":
        return lambda: adaln_mlp.head_forward(pk, x, y, "torch")
    if variant == "fused-triton":
        return lambda: adaln_mlp.head_forward(pk, x, y, "triton")
    fn = torch.compile(adaln_mlp.head_forward, dynamic=False)
    return lambda: fn(pk, x, y, "torch")


def _bench(benchmark, variant, size, rows, device):
    net, x, y = _setup(size, rows, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        f = _fn(variant, net, x, y)
        for _ in range(2):                       # compile / autotune / first-touch outside timing
            f()

        def run():
            f()
            sync()
        benchmark.pedantic(run, rounds=15 if size == "w1024" else 50, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("variant", ["eager", "fused-torch", "compiled"])
def test_head_cpu(benchmark, variant, size):
    benchmark.group = f"diffusion head cpu {size} rows 64"
    key(benchmark, f"head/{variant}/{size}", device="cpu", rows=64)
    _bench(benchmark, variant, size, 64, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [16, 128, 1024])
@pytest.mark.parametrize("variant", ["eager", "fused-torch", "compiled", "fused-triton"])
def test_head_gpu(benchmark, variant, rows, device):
    benchmark.group = f"diffusion head gpu w1024 rows {rows}"
    key(benchmark, f"gpu:head/{variant}/w1024" + ("" if rows == 16 else f"-r{rows}"), device="cuda", rows=rows)
    _bench(benchmark, variant, "w1024", rows, device)
