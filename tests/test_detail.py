"""Detail metrics (d2c.metrics.detail) against float64 references and constructed cases."""
import math

import numpy as np
import pytest
import torch

from d2c.data.shapes import make_shapes
from d2c.metrics import MetricsError
from d2c.metrics.detail import high_pass_energy, radial_power_spectrum, spectral_distance


def _reference_spectrum(x_uint8):
    """Bin by bin with numpy: every (ky, kx) of every image and channel to its rounded radius."""
    x = x_uint8.numpy().astype(np.float64) / 127.5 - 1
    n, c, h, w = x.shape
    n_r = min(h, w) // 2
    sums, counts = np.zeros(n_r + 1), np.zeros(n_r + 1)
    for img in x:
        for ch in img:
            p = np.abs(np.fft.fft2(ch - ch.mean())) ** 2 / (h * w)
            for iy in range(h):
                for ix in range(w):
                    ky = iy if iy < (h + 1) // 2 else iy - h
                    kx = ix if ix < (w + 1) // 2 else ix - w
                    r = int(np.round(math.hypot(ky, kx)))
                    if 1 <= r <= n_r:
                        sums[r] += p[iy, ix]
                        counts[r] += 1
    return sums[1:] / counts[1:]


@pytest.mark.parametrize("hw", [(16, 16), (12, 10)])
def test_radial_power_spectrum_matches_a_bin_by_bin_reference(hw):
    g = torch.Generator().manual_seed(int(torch.randint(0, 10_000, ())))
    x = torch.randint(0, 256, (3, 3, *hw), generator=g, dtype=torch.uint8)
    np.testing.assert_allclose(radial_power_spectrum(x, batch_size=2).numpy(), _reference_spectrum(x), rtol=1e-10)


def test_spectral_distance_closed_forms():
    g = torch.Generator().manual_seed(int(torch.randint(0, 10_000, ())))
    u = torch.randint(60, 121, (8, 3, 16, 16), generator=g)
    x, twice = u.to(torch.uint8), (2 * u - 60).to(torch.uint8)    # mean-free parts: exactly 2x
    assert spectral_distance(x, x) == 0.0
    assert spectral_distance(twice, x) == pytest.approx(math.log(4), rel=1e-9)
    assert spectral_distance(x, reference_spectrum=radial_power_spectrum(twice)) == pytest.approx(math.log(4), rel=1e-9)
    with pytest.raises(MetricsError, match="spectral_distance: spectra of 8 and 4 radii"):
        spectral_distance(x, x[..., :8, :8])


def _box_reference(x_uint8):
    x = x_uint8.double() / 127.5 - 1
    p = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    h, w = x.shape[-2:]
    blur = sum(p[..., i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9
    return float(((x - blur) ** 2).mean())


def test_high_pass_energy_closed_forms():
    flat = torch.full((2, 3, 8, 8), 200, dtype=torch.uint8)
    assert high_pass_energy(flat) == pytest.approx(0.0, abs=1e-28)
    g = torch.Generator().manual_seed(int(torch.randint(0, 10_000, ())))
    x = torch.randint(0, 256, (5, 3, 9, 7), generator=g, dtype=torch.uint8)
    assert high_pass_energy(x, batch_size=2) == pytest.approx(_box_reference(x), rel=1e-12)


def _blur(x_uint8, sigma=1.0):
    r = torch.arange(-3, 4, dtype=torch.float64)
    k = torch.exp(-r ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    x = x_uint8.double()
    c = x.shape[1]
    x = torch.nn.functional.pad(x, (3, 3, 3, 3), mode="replicate")
    x = torch.nn.functional.conv2d(x, k.expand(c, 1, 1, 7).contiguous(), groups=c)
    x = torch.nn.functional.conv2d(x, k[:, None].expand(c, 1, 7, 1).contiguous(), groups=c)
    return x.round().clamp(0, 255).to(torch.uint8)


def test_a_blurred_copy_of_the_real_set_scores_clearly_worse_on_detail():
    """Real shapes vs a held-out real set: blurring (sigma 1 px) takes most of the high-pass
    energy away and moves the spectrum far more than a second real sample does."""
    real, _ = make_shapes(400, seed=11)
    other, _ = make_shapes(400, seed=12)
    blurred = _blur(real)
    assert spectral_distance(blurred, other) > 5 * spectral_distance(real, other)
    assert high_pass_energy(blurred) < 0.5 * high_pass_energy(real)
    assert high_pass_energy(other) == pytest.approx(high_pass_energy(real), rel=0.05)


# ---------------------------------------------------------------------------- detail FID, rFID
import dataclasses  # noqa: E402

from d2c import metrics as M  # noqa: E402
from d2c.metrics.detail import detail_metrics, reconstruction_metrics  # noqa: E402

LAYOUT = M.FeatureNetConfig(n_train=3000, train_steps=150)
DETAIL = dataclasses.replace(M.DETAIL_NET, n_train=3000, train_steps=150)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _fids(images, reference, cache):
    kw = dict(reference=reference, cache_dir=cache, isc=False, kid=False, prc=False)
    return (M.compute_metrics(images, feature_net=LAYOUT, **kw)["fid"],
            M.compute_metrics(images, feature_net=DETAIL, **kw)["fid"])


def test_detail_fid_sees_blur_that_the_layout_fid_forgives(cache):
    """A blurred copy of a real set: the detail FID rises many times over (against a second
    real set), the layout FID barely moves; the detail net still knows the classes."""
    real, labels = make_shapes(500, seed=11)
    other, _ = make_shapes(500, seed=12)
    blurred = _blur(real, sigma=0.8)
    layout_real, detail_real = _fids(real, other, cache)
    layout_blur, detail_blur = _fids(blurred, other, cache)
    assert detail_blur > 4 * detail_real and detail_blur > detail_real + 5 * layout_real
    assert layout_blur - layout_real < 0.25 * (detail_blur - detail_real)
    assert M.class_accuracy(real, labels, config=DETAIL, cache_dir=cache) > 0.9


class _Identity(torch.nn.Module):
    def reconstruct(self, x):
        return x


class _Blurring(torch.nn.Module):
    def reconstruct(self, x):
        return torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)


def test_reconstruction_metrics_of_a_perfect_and_a_blurring_tokenizer(cache):
    kw = dict(num_images=300, num_reference=600, cache_dir=cache, layout_net=LAYOUT, detail_net=DETAIL)
    perfect, blurry = reconstruction_metrics(_Identity(), **kw), reconstruction_metrics(_Blurring(), **kw)
    assert perfect["l1"] == 0.0 and perfect["high_pass_ratio"] == pytest.approx(1.0, abs=0.05)
    assert blurry["l1"] > 0.02 and blurry["high_pass_ratio"] < 0.5
    assert blurry["rfid_detail"] > 4 * perfect["rfid_detail"]
    assert blurry["spectral_distance"] > 5 * perfect["spectral_distance"]
    real = make_shapes(300, seed=12)[0]
    d = detail_metrics(real, cache_dir=cache, num_reference=600, detail_net=DETAIL)
    assert d["fid_detail"] == pytest.approx(perfect["rfid_detail"], rel=0.5)
