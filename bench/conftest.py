"""pytest-benchmark fixtures: hardware in the JSON, a `--gpu` switch, and the closing-note bars.

Every benchmark tags itself with `key(benchmark, "family/variant/size", images=...)`; at the end
the medians of paired keys become ratios (and images/s), printed and stored in the benchmark
JSON under "d2c_bars" (`pytest bench/ --benchmark-only --benchmark-json=out.json`).  A benchmark
that records `flops_per_image` (d2c.flops) also gets its achieved TFLOP/s, and with a peak
(`--peak-tflops` or env D2C_PEAK_TFLOPS; 807 for the H200's bf16 matmul) its time over the floor.
"""
import os

import pytest
import torch

from d2c.flops import achieved

torch.set_num_threads(max(1, min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2)))

# (bar name, numerator key, denominator key): ratio = median(num) / median(den), > 1 = den faster
RATIOS = [
    ("head w1024 d6: eager / fused(torch)", "head/eager/w1024", "head/fused-torch/w1024"),
    ("head w1024 d6: eager / compiled", "head/eager/w1024", "head/compiled/w1024"),
    ("head w64 d2: eager / compiled", "head/eager/w64", "head/compiled/w64"),
    ("attn L320 cpu: reference / sdpa", "attn/reference/none-320", "attn/sdpa/none-320"),
    ("attn ragged L320 cpu: reference / sdpa", "attn/reference/ragged-320", "attn/sdpa/ragged-320"),
    ("gpu head w1024 d6 r16: eager / fused(triton)", "gpu:head/eager/w1024", "gpu:head/fused-triton/w1024"),
    ("gpu head w1024 d6 r16: eager / compiled", "gpu:head/eager/w1024", "gpu:head/compiled/w1024"),
    ("gpu head w1024 d6 r128: eager / fused(triton)", "gpu:head/eager/w1024-r128", "gpu:head/fused-triton/w1024-r128"),
    ("gpu attn unmasked L320: triton / sdpa", "gpu:attn/triton/none-320", "gpu:attn/sdpa/none-320"),
    ("gpu attn ragged L320: triton / sdpa", "gpu:attn/triton/ragged-320", "gpu:attn/sdpa/ragged-320"),
    ("gpu attn causal L257: triton / sdpa", "gpu:attn/triton/causal-320", "gpu:attn/sdpa/causal-320"),
    ("gpu attn decode 1xL257: triton / sdpa", "gpu:attn/triton/decode-257", "gpu:attn/sdpa/decode-257"),
    ("gpu attn cross 320x256: triton / sdpa", "gpu:attn/triton/cross-320x256", "gpu:attn/sdpa/cross-320x256"),
    ("e2e tiny: MAR-64 / D2C-16 (time)", "e2e/mar-64/tiny", "e2e/d2c-16/tiny"),
    ("e2e base: MAR-64 / D2C-16 (time)", "e2e/mar-64/base", "e2e/d2c-16/base"),
    ("e2e tiny D2C-16: eager / compiled", "e2e/d2c-16/tiny", "e2e/d2c-16-compiled/tiny"),
    ("e2e tiny D2C-16: ddpm / ddim head (time)", "e2e/d2c-16/tiny", "e2e/d2c-16-ddim/tiny"),
    ("e2e tiny D2C-16: 20 head steps / 20->5 (DiSA) (time)", "e2e/d2c-16/tiny", "e2e/d2c-16-disa20to5/tiny"),
    ("e2e tiny D2C-16: uncached / uncond_refresh 2 (time)", "e2e/d2c-16/tiny", "e2e/d2c-16-uncond2/tiny"),
    ("e2e tiny D2C-16: uncached / uncond_refresh 4 (time)", "e2e/d2c-16/tiny", "e2e/d2c-16-uncond4/tiny"),
    ("mar iteration tiny: eager / compiled", "mar-iter/eager/tiny", "mar-iter/compiled/tiny"),
    ("linear w128 r512 cpu: fp32 / bf16", "prec/linear/fp32-w128", "prec/linear/bf16-w128"),
    ("linear w256 r512 cpu: fp32 / bf16", "prec/linear/fp32-w256", "prec/linear/bf16-w256"),
    ("linear w512 r512 cpu: fp32 / bf16", "prec/linear/fp32-w512", "prec/linear/bf16-w512"),
    ("linear w768 r512 cpu: fp32 / bf16", "prec/linear/fp32-w768", "prec/linear/bf16-w768"),
    ("linear w1024 r512 cpu: fp32 / bf16", "prec/linear/fp32-w1024", "prec/linear/bf16-w1024"),
    ("MAR-B sampler b4 8it 25diff cfg2.9: fp32 / bf16 (goal >= 2.5)", "prec/mar-b/fp32", "prec/mar-b/bf16"),
    ("MAR-B sampler fp32: uncached / uncond_refresh 2", "prec/mar-b/fp32", "prec/mar-b/fp32-uncond2"),
    ("MAR-B sampler: fp32 uncached / bf16 uncond_refresh 2", "prec/mar-b/fp32", "prec/mar-b/bf16-uncond2"),
]


def pytest_addoption(parser):
    parser.addoption("--gpu", action="store_true", default=False,
                     help="run the GPU-sized benchmark cases (needs CUDA)")
    parser.addoption("--peak-tflops", type=float, default=None,
                     help="peak matmul TFLOP/s of the device: adds each e2e row's time over that floor "
                          "(default: env D2C_PEAK_TFLOPS, else only achieved TFLOP/s)")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: GPU-sized benchmark case (run with --gpu on a CUDA machine)")


def pytest_collection_modifyitems(config, items):
    want = config.getoption("--gpu")
    have = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not (want and have):
            why = "needs --gpu" if not want else "needs CUDA (none found)"
            item.add_marker(pytest.mark.skip(reason=f"GPU-sized case: {why}"))


@pytest.fixture
def device(request):
    return torch.device("cuda" if request.config.getoption("--gpu") and torch.cuda.is_available() else "cpu")


def key(benchmark, name: str, images: int | None = None, **info):
    benchmark.extra_info["key"] = name
    if images:
        benchmark.extra_info["images"] = images
    benchmark.extra_info.update(info)


def pytest_benchmark_update_machine_info(config, machine_info):
    from d2c.metrics import hardware_info
    machine_info["d2c_hardware"] = hardware_info()


def _medians(benchmarks):
    out = {}
    for b in benchmarks:
        k = b.extra_info.get("key") if hasattr(b, "extra_info") else None
        if k and getattr(b, "stats", None) is not None:
            st = b.stats.stats if hasattr(b.stats, "stats") else b.stats
            out[k] = (st.median, b.extra_info.get("images"), b.extra_info.get("flops_per_image"))
    return out


def _peak(config):
    peak = config.getoption("--peak-tflops") or os.environ.get("D2C_PEAK_TFLOPS")
    return float(peak) if peak else None


def _bars(benchmarks, peak_tflops=None):
    med = _medians(benchmarks)
    bars = {"medians_s": {k: v[0] for k, v in med.items()},
            "images_per_s": {k: v[1] / v[0] for k, v in med.items() if v[1]},
            "ratios": {}, "peak_tflops": peak_tflops, "tflops": {}, "ratio_to_floor": {}}
    for name, num, den in RATIOS:
        if num in med and den in med:
            bars["ratios"][name] = med[num][0] / med[den][0]
    for k, (median, images, flops) in med.items():
        if flops and images:
            a = achieved(flops * images, median, peak_tflops)
            bars["tflops"][k] = a["tflops"]
            if a["ratio_to_floor"] is not None:
                bars["ratio_to_floor"][k] = a["ratio_to_floor"]
    return bars


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["d2c_bars"] = _bars(benchmarks, _peak(config))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    bars = _bars(session.benchmarks, _peak(config))
    tr = terminalreporter
    tr.section("d2c bars (medians from this run)")
    for k, v in sorted(bars["images_per_s"].items()):
        tr.write_line(f"  {k:38s} {v:10.3f} images/s")
    for k, v in sorted(bars["tflops"].items()):
        r = bars["ratio_to_floor"].get(k)
        floor = f"  {r:8.1f}x the floor at {bars['peak_tflops']:g} TFLOP/s" if r is not None else ""
        tr.write_line(f"  {k:38s} {v:10.4f} TFLOP/s{floor}")
    for k, v in bars["ratios"].items():
        tr.write_line(f"  {k:38s} {v:10.2f}x")
