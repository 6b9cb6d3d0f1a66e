"""d2c.metrics: FID/IS/KID/PRC through torch-fidelity, the embedded feature net, ImageNet-mode file
checks, and speed records.  No test may touch the network (autouse guard below)."""
import dataclasses
import socket
import urllib.request

import numpy as np
import pytest
import torch

from d2c import metrics as M
from d2c.data.shapes import make_shapes
from d2c.sampling import SampleResult

SMALL = M.FeatureNetConfig(n_train=3000, train_steps=150)  # ~97% held-out accuracy, seconds to train


def _refuse(*args, **kwargs):
    raise AssertionError("network access attempted")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as inc
    import torch_fidelity.utils_torchvision as tvu

    monkeypatch.setattr(socket.socket, "connect", _refuse)
    monkeypatch.setattr(urllib.request, "urlopen", _refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", _refuse)
    monkeypatch.setattr(inc, "load_state_dict_from_url", _refuse)
    monkeypatch.setattr(tvu, "torchvision_load_pretrained_vgg16", _refuse)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def net(cache):
    return M.load_feature_net(SMALL, cache, progress=False)[0]


@pytest.fixture(scope="module")
def sets():
    a, la = make_shapes(600, seed=11)
    b, _ = make_shapes(600, seed=12)
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, a.shape, generator=g, dtype=torch.uint8)
    shuffled = a.flatten(2)[:, :, torch.randperm(32 * 32, generator=g)].reshape(a.shape)
    return dict(a=a, labels=la, b=b, noise=noise, shuffled=shuffled)


def _fid(images, reference, cache, **kw):
    return M.compute_metrics(images, reference=reference, cache_dir=cache, feature_net=SMALL,
                             isc=False, kid=False, prc=False, **kw)["fid"]


def test_download_guard_is_armed():
    """Without a local weights path torch-fidelity downloads: the guard must catch exactly that."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with pytest.raises(AssertionError, match="network"):
        FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])


# ----------------------------------------------------------------------------- embedded mode
def test_feature_net_accuracy(net):
    x, y = make_shapes(1000, seed=M.HELDOUT_SEED)
    assert M.class_accuracy(x, y, net=net) >= 0.9
    chance = M.class_accuracy(x, y[torch.randperm(len(y))], net=net)
    assert chance < 0.25


def test_fid_sanity(net, sets, cache):
    self_fid = _fid(sets["a"], sets["a"], cache)
    held = _fid(sets["a"], sets["b"], cache)
    noise = _fid(sets["noise"], sets["b"], cache)
    shuffled = _fid(sets["shuffled"], sets["b"], cache)
    assert abs(self_fid) < 1e-3 * noise
    assert held < noise / 20 and held < shuffled / 20, (held, noise, shuffled)


def test_all_metrics_and_stats_route_agree(net, sets, cache, tmp_path):
    """compute_metrics vs images (torch_fidelity.calculate_metrics) == vs a statistics .npz with arr_0
    (our feature pass + float64 Frechet distance: the ImageNet route) on the same data."""
    full = M.compute_metrics(sets["a"], reference=sets["b"], cache_dir=cache, feature_net=SMALL)
    assert set(full) == {"fid", "is_mean", "is_std", "kid_mean", "kid_std", "precision", "recall", "f_score"}
    assert all(isinstance(v, float) for v in full.values())
    assert full["is_mean"] > 5 and 0.7 < full["precision"] <= 1 and 0.7 < full["recall"] <= 1
    npz = M.save_reference_stats(sets["b"], tmp_path / "ref.npz", cache_dir=cache, feature_net=SMALL)
    with np.load(npz) as z:
        mu, sigma = z["mu"], z["sigma"]
    assert mu.shape == (SMALL.widths[-1],) and sigma.shape == (SMALL.widths[-1],) * 2
    np.savez(tmp_path / "ref_img.npz", mu=mu, sigma=sigma, arr_0=sets["b"].permute(0, 2, 3, 1).numpy())
    via_stats = M.compute_metrics(sets["a"], reference=tmp_path / "ref_img.npz", cache_dir=cache,
                                  feature_net=SMALL)
    assert set(via_stats) == set(full)
    for k in full:
        assert via_stats[k] == pytest.approx(full[k], rel=1e-5, abs=1e-7), k
    with pytest.warns(UserWarning, match="arr_0"):
        only = M.compute_metrics(sets["a"], reference=npz, cache_dir=cache, feature_net=SMALL)
    assert set(only) == {"fid", "is_mean", "is_std"} and only["fid"] == pytest.approx(full["fid"], rel=1e-5)


def test_folder_input_matches_tensor(net, sets, cache, tmp_path):
    from PIL import Image

    for i, img in enumerate(sets["a"][:50]):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / f"{i:03d}.png")
    assert _fid(tmp_path, sets["b"], cache) == pytest.approx(_fid(sets["a"][:50], sets["b"], cache), rel=1e-6)


def test_default_reference_is_cached(net, sets, cache, monkeypatch):
    first = _fid(sets["a"], None, cache, num_reference=300)
    assert list((cache / "reference_features").glob("d2c-shapes-n300-*.safetensors"))
    import d2c.data.shapes
    monkeypatch.setattr(d2c.data.shapes, "make_shapes", _refuse)  # a cache hit never regenerates
    assert _fid(sets["a"], None, cache, num_reference=300) == first


class _Planted:
    """Unpickling this creates `marker`: the proof that a loader ran code from a cache file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_planted_pickle_in_the_metric_caches_never_runs(net, sets, tmp_path):
    """torch-fidelity reads its own cache by full unpickling: a pickle planted
    under every name it (or we) would read must never run, and the metrics stay right."""
    cache = tmp_path / "cache"
    M.load_feature_net(SMALL, cache, progress=False)
    kw = dict(cache_dir=cache, feature_net=SMALL, num_reference=300)
    first = M.compute_metrics(sets["a"][:200], **kw)
    ours = list((cache / "reference_features").glob("*.safetensors"))
    assert len(ours) == 1
    marker = tmp_path / "code_ran"
    name = ours[0].stem.removesuffix("-features")          # <reference name>-<layers>
    assert name != ours[0].stem and name.startswith("d2c-shapes-n300-")
    # the names torch-fidelity's cache would use for that reference (utils / metric_fid)
    planted = [ours[0], *[cache / "fidelity" / f"{name}-{M.EMBEDDED_EXTRACTOR}-{kind}-{layer}.pt"
                          for kind in ("features", "stat-fid") for layer in ("features", "logits")]]
    for p in planted:
        p.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"x": _Planted(marker)}, p)
    again = M.compute_metrics(sets["a"][:200], **kw)
    assert not marker.exists()
    assert again == first
    with pytest.raises(Exception):      # the plant is live: an unsafe load would have run it
        torch.load(planted[1], weights_only=True)
    torch.load(planted[1], weights_only=False)
    assert marker.exists()


def test_feature_net_cache(tmp_path, monkeypatch):
    calls = []
    from d2c.metrics import feature_net
    train = feature_net._train_feature_net
    monkeypatch.setattr(feature_net, "_train_feature_net", lambda config, progress=True: calls.append(config) or train(config, False))
    config = M.FeatureNetConfig(n_train=100, train_steps=2)
    net1, path = M.load_feature_net(config, tmp_path)
    assert len(calls) == 1 and path.is_file() and path.name == f"feature_net_{config.key()}.safetensors"
    mtime = path.stat().st_mtime_ns
    net2, again = M.load_feature_net(config, tmp_path)
    assert len(calls) == 1 and again == path and path.stat().st_mtime_ns == mtime
    assert all(torch.equal(a, b) for a, b in zip(net1.state_dict().values(), net2.state_dict().values()))
    _, other = M.load_feature_net(dataclasses.replace(config, train_steps=3), tmp_path)
    assert len(calls) == 2 and other != path
    path.write_bytes(b"garbage")  # an unusable cache entry is retrained, with a warning
    with pytest.warns(UserWarning, match="retraining"):
        M.load_feature_net(config, tmp_path)
    assert len(calls) == 3


# ----------------------------------------------------------------------------- statistics helpers
def test_fid_vs_statistics_closed_forms():
    """The one FID (torch-fidelity's formula, reached through our float64 statistics) against the
    closed form sum (mu1 - mu2)^2 + sum (sqrt a - sqrt b)^2 of two Gaussians with diagonal
    covariances, from features drawn to have exactly those moments."""
    rng = np.random.default_rng(0)
    d, n = 16, 4000
    def features(mu, var):                 # n points whose sample mean is mu, sample covariance diag(var)
        z = rng.normal(size=(n, d))
        z -= z.mean(0)
        w, v = np.linalg.eigh(np.cov(z, rowvar=False))
        z = z @ v @ np.diag(w ** -0.5) @ v.T          # whitened: sample covariance I
        return torch.from_numpy(z * np.sqrt(var) + mu)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert M.fid_vs_statistics(features(mu1, a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-8)
    stats = M.feature_stats(features(mu1, a).float())  # float32 features (the extractors'): float64 stats
    assert stats["mu"].dtype == stats["sigma"].dtype == np.float64
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))       # a common rotation leaves FID unchanged
    got = M.fid_vs_statistics(features(mu1, a) @ torch.from_numpy(q.T), q @ mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(want, rel=1e-6)
    x = features(mu1, a)
    assert abs(M.fid_vs_statistics(x, x.mean(0).numpy(), np.cov(x.numpy(), rowvar=False))) < 1e-8


def _brute_pr(fake, real, k):
    f, r = fake.double(), real.double()
    rad_r = torch.cdist(r, r).sort(1).values[:, k]  # column 0 is the point itself
    rad_f = torch.cdist(f, f).sort(1).values[:, k]
    precision = (torch.cdist(f, r) <= rad_r[None]).any(1).double().mean().item()
    recall = (torch.cdist(r, f) <= rad_f[None]).any(1).double().mean().item()
    return precision, recall


def test_precision_recall():
    real = torch.stack([torch.arange(20.0), torch.zeros(20)], 1)
    far = real + 1000
    assert M.precision_recall(real, real) == (1.0, 1.0)
    assert M.precision_recall(far, real) == (0.0, 0.0)
    assert M.precision_recall(torch.cat([real, far]), real) == (0.5, 1.0)
    # fake covers the first 5 of 20 real points (0.1 off the line): all fake are real-looking, and
    # fake k=3 radii (3, 2, 2, 2, 3) reach real points 0..6 -> recall 7 / 20
    fake = torch.stack([torch.arange(5.0), torch.full((5,), 0.1)], 1)
    assert M.precision_recall(fake, real) == pytest.approx((1.0, 0.35))
    g = torch.Generator().manual_seed(0)
    for k in (1, 3, 5):
        fake, real = torch.randn(300, 16, generator=g), torch.randn(250, 16, generator=g) * 1.2 + 0.3
        assert M.precision_recall(fake, real, k) == pytest.approx(_brute_pr(fake, real, k), abs=1e-6)  # fp32 mean


def test_balanced_labels():
    assert torch.bincount(M.balanced_labels(50_000, 1000)).tolist() == [50] * 1000
    assert torch.bincount(M.balanced_labels(10, 4)).tolist() == [3, 3, 2, 2]


# ----------------------------------------------------------------------------- ImageNet mode
@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    return make_inception_file(tmp_path_factory.mktemp("inception"))


def make_inception_file(d):
    """A randomly initialised inception-v3-compat state dict: right keys/shapes, no download."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3 as Inc

    torch.save({}, d / "empty.pth")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Inc, "load_state_dict", lambda self, sd, strict=True: None)
        torch.manual_seed(0)
        sd = Inc("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(d / "empty.pth")).state_dict()
    torch.save(sd, d / "weights-inception-random.pth")
    return d / "weights-inception-random.pth"


def test_imagenet_mode_offline(inception_file, sets, tmp_path):
    """Inception at 299 px is slow on CPU: 6 images, two passes (KID/PRC against arr_0 take the
    same code path as the embedded stats route above)."""
    imgs = sets["a"][:6]
    npz = M.save_reference_stats(imgs, tmp_path / "stats.npz", mode="imagenet", weights_path=inception_file)
    with np.load(npz) as z:
        assert z["mu"].shape == (2048,) and z["sigma"].shape == (2048, 2048)
        scale = max(1.0, float(np.trace(z["sigma"])))
    out = M.compute_metrics(imgs, mode="imagenet", reference=npz, weights_path=inception_file,
                            kid=False, prc=False)
    assert set(out) == {"fid", "is_mean", "is_std"}
    assert abs(out["fid"]) < 1e-6 * scale and np.isfinite(out["is_mean"])


def _one_line_error(call, *needles):
    with pytest.raises(M.MetricsError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg
    assert e.value.__cause__ is None and (e.value.__context__ is None or e.value.__suppress_context__)
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def test_bad_inception_weights(tmp_path, sets):
    imgs = sets["a"][:4]

    def run(path):
        return lambda: M.compute_metrics(imgs, mode="imagenet", reference=tmp_path, weights_path=path)

    _one_line_error(run(tmp_path / "nope.pth"), "nope.pth", "missing", "torch-fidelity")
    _one_line_error(run(None), "no path", "torch-fidelity")
    (tmp_path / "garbage.pth").write_bytes(b"\x00not a checkpoint" * 50)
    _one_line_error(run(tmp_path / "garbage.pth"), "garbage.pth", "unreadable", "torch-fidelity")
    torch.save({"fc.weight": torch.randn(1008, 2048)}, tmp_path / "trunc.pth")
    blob = (tmp_path / "trunc.pth").read_bytes()
    (tmp_path / "trunc.pth").write_bytes(blob[: len(blob) // 2])
    _one_line_error(run(tmp_path / "trunc.pth"), "trunc.pth", "unreadable")
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    _one_line_error(run(tmp_path / "other.pth"), "other.pth", "wrong keys or shapes", "torch-fidelity")
    torch.save({"fc.weight": torch.zeros(1008, 2048), "Mixed_7c.branch_pool.conv.weight": torch.zeros(1)},
               tmp_path / "partial.pth")  # passes the quick check; torch-fidelity's load_state_dict refuses it
    _one_line_error(run(tmp_path / "partial.pth"), "partial.pth", "missing", "shape mismatch", "torch-fidelity")


def test_bad_reference_stats(tmp_path, sets):
    imgs = sets["a"][:4]

    def run(path):  # stats are checked first, so the weights file need not exist
        return lambda: M.compute_metrics(imgs, mode="imagenet", reference=path, weights_path=tmp_path / "w.pth")

    _one_line_error(run(tmp_path / "nope.npz"), "nope.npz", "missing", "ADM")
    (tmp_path / "garbage.npz").write_bytes(b"garbage" * 100)
    _one_line_error(run(tmp_path / "garbage.npz"), "garbage.npz", "unreadable", "ADM")
    np.savez(tmp_path / "keys.npz", mean=np.zeros(2048), cov=np.eye(2))
    _one_line_error(run(tmp_path / "keys.npz"), "keys.npz", "wrong keys", "'mu'", "ADM")
    np.savez(tmp_path / "shape.npz", mu=np.zeros(64), sigma=np.eye(64))
    _one_line_error(run(tmp_path / "shape.npz"), "shape.npz", "wrong shapes", "(2048,)", "ADM")
    np.savez(tmp_path / "sq.npz", mu=np.zeros(2048), sigma=np.zeros((2048, 7)))
    _one_line_error(run(tmp_path / "sq.npz"), "sq.npz", "wrong shapes", "(2048, 2048)")
    np.savez(tmp_path / "trunc.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    blob = (tmp_path / "trunc.npz").read_bytes()
    (tmp_path / "trunc.npz").write_bytes(blob[: len(blob) // 2])
    _one_line_error(run(tmp_path / "trunc.npz"), "trunc.npz", "unreadable")


def test_bad_embedded_inputs(net, sets, cache, tmp_path):
    (tmp_path / "net.safetensors").write_bytes(b"garbage")
    _one_line_error(lambda: M.compute_metrics(sets["a"][:20], reference=sets["b"][:20],
                                              weights_path=tmp_path / "net.safetensors"), "net.safetensors")
    np.savez(tmp_path / "d7.npz", mu=np.zeros(7), sigma=np.eye(7))  # feature dim of another extractor
    _one_line_error(lambda: M.compute_metrics(sets["a"][:20], reference=tmp_path / "d7.npz", cache_dir=cache,
                                              feature_net=SMALL, kid=False, prc=False), "d7.npz", "7-d")
    _one_line_error(lambda: M.compute_metrics(sets["a"].float(), cache_dir=cache), "uint8")


# ----------------------------------------------------------------------------- speed records
def test_speed_record_and_hardware():
    res = SampleResult(images=torch.zeros(4, 3, 32, 32, dtype=torch.uint8), codes=None, latents=None,
                       timings={"stage2": 3.0, "decode": 1.0, "total": 4.0},
                       nfe={"mar_steps": 4, "reverse_steps": 80})
    rec = M.speed_record(res, device="cpu")
    assert rec["seconds_per_image"] == 1.0 and rec["images_per_second"] == 1.0 and rec["num_images"] == 4
    assert (rec["stage1_seconds"], rec["stage2_seconds"], rec["decode_seconds"]) == (0.0, 3.0, 1.0)
    assert (rec["ar_steps"], rec["mar_steps"], rec["reverse_steps"]) == (0, 4, 80)
    assert "diffusion_steps" not in rec      # the per-token setting's name is not the total's
    assert rec["peak_memory_bytes"] > 10 * 2 ** 20 and "rss" in rec["peak_memory_kind"]
    assert M.speed_record(res, num_images=8)["seconds_per_image"] == 0.5
    hw = M.hardware_info()
    assert hw["torch"] == torch.__version__ and hw["cpu_cores"] >= 1 and hw["torch_threads"] >= 1
    assert {"cpu_model", "gpu_name", "triton"} <= set(hw)
