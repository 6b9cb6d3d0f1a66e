"""Dtype rules shared by every model.

Numerically sensitive arithmetic (norm statistics, softmax and cross-entropy, RoPE angles, the
diffusion schedule and its reverse step) runs in float32 even when the weights or autocast are
bf16, and in float64 when the inputs are float64: float64 is what the tests use to check a
mathematical identity (two code paths that must agree) independently of a CPU's rounding.
"""
from __future__ import annotations

import functools

import torch


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every narrower float type computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def upcast(x: torch.Tensor) -> torch.Tensor:
    """x in `accum_dtype(x.dtype)` (no copy when it already is)."""
    return x.to(accum_dtype(x.dtype))


# ------------------------------------------------------------------ sampling precision
SAMPLING_PRECISIONS = ("auto", "bf16", "fp32")
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32"}
# `auto` runs a model in bf16 only where bf16 matrix multiplies are supported and this wide or
# wider.  CPU (Xeon with AMX, 2 threads; bench/test_bench_precision.py): a Linear on 512 rows
# runs 2.1x / 2.5x / 3.5x / 4.2x / 4.6x faster in bf16 at width 128 / 256 / 512 / 768 / 1024,
# the embedded default's stage 2 (width 128, 100 images) 1.5x, its stage 1 the same; so every
# width we build.  CUDA: not measured here (no GPU lent); 256 until `bench --gpu` says otherwise.
BF16_MIN_WIDTH = {"cpu": 128, "cuda": 256}


def bf16_supported(device) -> bool:
    """bf16 matrix units torch's kernels use: CUDA with bf16 support, or a CPU with AVX512-BF16 /
    AMX-BF16 running torch's AVX-512 kernels (under ATEN_CPU_CAPABILITY=avx2 or default, bf16
    attention fails inside torch: "pack_vnni2 is only supported when avx512 is supported")."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu" or torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset:
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((ln for ln in f if ln.startswith("flags")), "").split())
    except OSError:
        return frozenset()


def sampling_dtype(precision: str, device, width: int) -> torch.dtype:
    """The compute dtype a model of `width` samples in: bf16 (asked for, or `auto` where it is
    supported and BF16_MIN_WIDTH says it is faster), else fp32."""
    if precision not in SAMPLING_PRECISIONS:
        raise ValueError(f"precision={precision!r}; allowed: {', '.join(SAMPLING_PRECISIONS)}")
    device = torch.device(device)
    if precision == "fp32":
        return torch.float32
    if not bf16_supported(device):
        if precision == "bf16":
            raise ValueError(f"precision=bf16: no bf16 matrix units torch can use on {device} "
                             f"(CPU kernels: {torch.backends.cpu.get_cpu_capability()}); allowed here: fp32, auto")
        return torch.float32
    return torch.bfloat16 if precision == "bf16" or width >= BF16_MIN_WIDTH.get(device.type, 1 << 30) \
        else torch.float32


def autocast_for(dtype: torch.dtype, device):
    """bf16 autocast for a model's forward passes when `dtype` is bf16; a no-op for fp32.  In
    sampling the diffusion schedule, the reverse step, the CFG mix and the sampled latents stay
    fp32 (the callers upcast model outputs first); in training the loss does."""
    import contextlib
    if dtype != torch.bfloat16:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
