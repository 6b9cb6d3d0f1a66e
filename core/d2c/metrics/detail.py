"""Metrics that see fine detail, beside the layout metrics (layout FID, class accuracy):

  fid_detail         FID under the detail feature net (feature_net.DETAIL_NET: never blurred,
                     trained to also predict the grating), so blur and lost texture cost FID
  spectral_distance  mean |ln P(r) - ln P_ref(r)| of the radially averaged power spectra (RAPS)
  high_pass_ratio    high-pass energy (image minus its 3x3 box blur) relative to the real set's
and the same for a tokenizer's reconstructions of held-out real images (rFID: what the
decoder can give back at best, the floor of every model sampling through it)."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from d2c.metrics.feature_net import DEFAULT_CACHE_DIR, DETAIL_NET, MetricsError, _check_images, _shapes_fingerprint
from d2c.metrics.fidelity import REFERENCE_SEED, compute_metrics

RECON_SEED = 31337            # held-out real shapes the tokenizers reconstruct (not training, not reference)
RECON_IMAGES = 1000


def _unit(images_uint8: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """Checked uint8 (N, 3, H, W) -> `dtype` in [-1, 1], the tokenizers' input range."""
    return images_uint8.to(dtype) / 127.5 - 1


def radial_power_spectrum(images_uint8, batch_size: int = 500) -> torch.Tensor:
    """Mean power per integer frequency radius 1 .. min(H, W) // 2, float64 (R,).

    Per image and channel the mean is removed (DC), the power is |FFT2|^2 / (H W), averaged
    over images and channels, then over the FFT bins whose radius sqrt(ky^2 + kx^2) rounds to r
    (ky, kx in cycles per image)."""
    x = _check_images(images_uint8)
    h, w = x.shape[-2:]
    total = torch.zeros(h, w, dtype=torch.float64)
    for b in x.split(batch_size):
        b = _unit(b)
        b = b - b.mean((-2, -1), keepdim=True)
        total += (torch.fft.fft2(b).abs() ** 2).sum((0, 1)) / (h * w)
    power = total / (x.shape[0] * x.shape[1])
    ky, kx = torch.fft.fftfreq(h, 1 / h, dtype=torch.float64), torch.fft.fftfreq(w, 1 / w, dtype=torch.float64)
    r = torch.sqrt(ky[:, None] ** 2 + kx[None] ** 2).round().long().flatten()
    n = min(h, w) // 2
    sums = torch.bincount(r, weights=power.flatten(), minlength=n + 1)[1:n + 1]
    counts = torch.bincount(r, minlength=n + 1)[1:n + 1]
    return sums / counts


def spectral_distance(images_uint8, reference_uint8=None, *, reference_spectrum=None) -> float:
    """Mean over radii of |ln P(r) - ln P_ref(r)|: 0 for equal spectra, ln 4 for a set whose
    (mean-free) images are twice the reference's.  Pass the reference as images or as its
    `radial_power_spectrum`."""
    p = radial_power_spectrum(images_uint8)
    q = reference_spectrum if reference_spectrum is not None else radial_power_spectrum(reference_uint8)
    q = torch.as_tensor(q, dtype=torch.float64)
    if q.shape != p.shape:
        raise MetricsError(f"spectral_distance: spectra of {p.shape[0]} and {q.shape[0]} radii "
                           "(images of different sizes)")
    tiny = torch.finfo(torch.float64).tiny
    return float((p.clamp_min(tiny).log() - q.clamp_min(tiny).log()).abs().mean())


def high_pass_energy(images_uint8, batch_size: int = 500) -> float:
    """Mean squared (image - its 3x3 box blur) in [-1, 1] units, edges replicated."""
    x = _check_images(images_uint8)
    total = 0.0
    for b in x.split(batch_size):
        b = _unit(b)
        c = b.shape[1]
        blur = F.conv2d(F.pad(b, (1, 1, 1, 1), mode="replicate"),
                        torch.full((c, 1, 3, 3), 1 / 9, dtype=torch.float64), groups=c)
        total += float(((b - blur) ** 2).sum())
    return total / x.numel()


# ---------------------------------------------------------------------------- against the real set
@functools.lru_cache(maxsize=4)
def _reference_detail(num_reference: int, seed: int, cache_dir: str) -> tuple[torch.Tensor, float]:
    """RAPS and high-pass energy of the held-out real shapes, cached as JSON next to the features."""
    from d2c.files import atomic_write_text
    from d2c.data.shapes import make_shapes
    path = Path(cache_dir) / f"reference_detail-n{num_reference}-s{seed}-{_shapes_fingerprint(seed)}.json"
    try:
        d = json.loads(path.read_text())
        return torch.tensor(d["spectrum"], dtype=torch.float64), float(d["high_pass_energy"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    real = make_shapes(num_reference, seed=seed)[0]
    spectrum, energy = radial_power_spectrum(real), high_pass_energy(real)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"spectrum": spectrum.tolist(), "high_pass_energy": energy}))
    return spectrum, energy


def detail_metrics(images_uint8, *, cache_dir=DEFAULT_CACHE_DIR, device="cpu", num_reference: int = 10_000,
                   reference_seed: int = REFERENCE_SEED, detail_net=DETAIL_NET) -> dict:
    """fid_detail, spectral_distance, high_pass_ratio of generated images against the held-out
    real shapes (the reference of the layout FID); detail_net: the FeatureNetConfig of fid_detail."""
    spectrum, energy = _reference_detail(num_reference, reference_seed, str(cache_dir))
    fid = compute_metrics(images_uint8, feature_net=detail_net, isc=False, kid=False, prc=False, device=device,
                          cache_dir=cache_dir, num_reference=num_reference, reference_seed=reference_seed)["fid"]
    return {"fid_detail": fid, "spectral_distance": spectral_distance(images_uint8, reference_spectrum=spectrum),
            "high_pass_ratio": high_pass_energy(images_uint8) / energy}


@torch.inference_mode()
def reconstruction_metrics(tokenizer, *, num_images: int = RECON_IMAGES, seed: int = RECON_SEED,
                           cache_dir=DEFAULT_CACHE_DIR, device="cpu", batch_size: int = 250,
                           num_reference: int = 10_000, layout_net=None, detail_net=DETAIL_NET) -> dict:
    """A tokenizer (KL or VQ: its `reconstruct`) on held-out real shapes: rfid (layout net),
    rfid_detail, spectral_distance, high_pass_ratio of the reconstructions, and their L1 in
    [-1, 1] units.  layout_net / detail_net: FeatureNetConfigs (None: the default layout net)."""
    from d2c.data.shapes import make_shapes
    from d2c.sampling import to_uint8
    real = make_shapes(num_images, seed=seed)[0]
    tokenizer = tokenizer.to(device).eval()
    recon = torch.cat([to_uint8(tokenizer.reconstruct(_unit(b.to(device), torch.float32))).cpu()
                       for b in real.split(batch_size)])
    out = {"rfid": compute_metrics(recon, isc=False, kid=False, prc=False, device=device, cache_dir=cache_dir,
                                   feature_net=layout_net, num_reference=num_reference)["fid"]}
    d = detail_metrics(recon, cache_dir=cache_dir, device=device, num_reference=num_reference, detail_net=detail_net)
    out.update(rfid_detail=d["fid_detail"], spectral_distance=d["spectral_distance"],
               high_pass_ratio=d["high_pass_ratio"], l1=float((recon.double() - real.double()).abs().mean() / 127.5))
    return out
