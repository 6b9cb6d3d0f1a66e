"""The speed and hardware parts of a result record."""
from __future__ import annotations

import math
import os
import platform

import torch


# network evaluations of a sample: stage 1's decode steps, MAR's rounds, and the reverse diffusion
# steps the head ran summed over the rounds (not the per-token `diffusion_steps` setting)
NFE_KEYS = ("ar_steps", "mar_steps", "reverse_steps")


def speed_record(result, num_images: int | None = None, device="cpu") -> dict:
    """Timing part of a result record from a d2c.sampling.SampleResult (one timed batch)."""
    n = int(num_images or result.images.shape[0])
    t = result.timings
    total = float(t.get("total", sum(t.get(k, 0.0) for k in ("stage1", "stage2", "decode"))))
    rec = {"num_images": n, "seconds_total": total, "seconds_per_image": total / max(n, 1),
           "images_per_second": n / total if total > 0 else math.inf}
    rec.update({f"{k}_seconds": float(t.get(k, 0.0)) for k in ("stage1", "stage2", "decode")})
    rec.update({k: int(result.nfe.get(k, 0)) for k in NFE_KEYS})
    rec.update({f"{k}_dtype": v for k, v in result.dtypes.items()})   # what each stage ran in
    rec.update(peak_memory(device))
    return rec


def peak_memory(device="cpu") -> dict:
    """{"peak_memory_bytes", "peak_memory_kind"}: CUDA's max allocated since the last
    reset_peak_memory_stats, or the process's peak RSS since it started (CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)),
                "peak_memory_kind": "cuda_max_memory_allocated"}
    import resource
    # Linux reports ru_maxrss in KiB, macOS in bytes
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_memory_bytes": int(rss if platform.system() == "Darwin" else rss * 1024),
            "peak_memory_kind": "cpu_peak_rss_process_lifetime"}


def hardware_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        from importlib.metadata import version
        triton = version("triton")
    except Exception:
        triton = None
    cuda = torch.cuda.is_available()
    return {"cpu_model": cpu, "cpu_cores": os.cpu_count(),
            "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu_name": torch.cuda.get_device_name(0) if cuda else None,
            "gpu_count": torch.cuda.device_count() if cuda else 0,
            "cuda_version": torch.version.cuda, "torch": torch.__version__, "triton": triton,
            "python": platform.python_version(), "platform": platform.platform()}
