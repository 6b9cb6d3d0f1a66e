"""FID, IS, KID and precision/recall through stock torch-fidelity (docs/design.md sections 5, 6).

Two modes pick the feature extractor:
  embedded  the feature net of d2c.metrics.feature_net, registered as "d2c-shapes-net";
            reference = a held-out real shapes set (its features cached here as safetensors).
  imagenet  torch-fidelity's "inception-v3-compat" with weights from a LOCAL file; reference =
            ADM's statistics .npz (mu, sigma; its arr_0 images, when present, serve KID/PRC).
The reference decides the route: images -> one feature pass per input through torch-fidelity's
extraction, then its IS/FID/KID/PRC functions (what `calculate_metrics` does, without its
pickled cache); a statistics .npz -> one feature pass of our images, then the same IS/KID/PRC
functions and torch-fidelity's Frechet distance against the stats, in float64.
Nothing here downloads: every extractor gets its weights from a path we checked first.
"""
from __future__ import annotations

import contextlib
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from d2c.files import NpzRows, file_digest
from d2c.metrics.feature_net import (DEFAULT_CACHE_DIR, FeatureNetConfig, MetricsError, _check_images, _load_net_file,
                                     _shapes_fingerprint, _torch_threads, load_feature_net)

EMBEDDED_EXTRACTOR = "d2c-shapes-net"
IMAGENET_EXTRACTOR = "inception-v3-compat"
IMAGENET_NUM_SAMPLES = 50_000          # class-balanced samples per ImageNet evaluation (ADM, MAR)
IMAGENET_FEATURE_DIM = 2048
REFERENCE_SEED = 424242                # held-out real shapes: not the generators' data (seed 0)
INCEPTION_HOWTO = ("download weights-inception-2015-12-05-6726825d.pth from torch-fidelity's release page "
                   "(github.com/toshas/torch-fidelity/releases/tag/v0.2.0) on a machine with internet and pass its path")
ADM_HOWTO = ("use ADM's reference batch, e.g. VIRTUAL_imagenet256_labeled.npz (openai/guided-diffusion, "
             "evaluations/README.md), or write one with d2c.metrics.save_reference_stats")

_TF_KEYS = {"frechet_inception_distance": "fid", "inception_score_mean": "is_mean",
            "inception_score_std": "is_std", "kernel_inception_distance_mean": "kid_mean",
            "kernel_inception_distance_std": "kid_std", "precision": "precision", "recall": "recall",
            "f_score": "f_score"}


def _need_fidelity():
    import d2c
    d2c.require("torch_fidelity", "FID/IS/KID/precision-recall (d2c.metrics)")


def _register_embedded_extractor():
    """Register "d2c-shapes-net" with torch-fidelity once (lazily: torch-fidelity is a harness extra)."""
    from torch_fidelity import FeatureExtractorBase, register_feature_extractor
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if EMBEDDED_EXTRACTOR in FEATURE_EXTRACTORS_REGISTRY:
        return

    class ShapesNetExtractor(FeatureExtractorBase):
        """torch-fidelity view of FeatureNet: "features" for FID/KID/PRC, "logits" for IS."""

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            if feature_extractor_weights_path is None:
                raise MetricsError(f"{name}: feature_extractor_weights_path is required (no downloads)")
            self.net = _load_net_file(feature_extractor_weights_path)
            self.requires_grad_(False)

        def forward(self, x):
            if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
                raise MetricsError(f"{self.name}: expects uint8 (B, 3, H, W), got {x.dtype} {tuple(x.shape)}")
            with _torch_threads(1) if x.device.type == "cpu" else contextlib.nullcontext():
                feats, logits = self.net(x)
            out = {"features": feats, "logits": logits}
            return tuple(out[k] for k in self.features_list)

        @staticmethod
        def get_provided_features_list():
            return "features", "logits"

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "logits" if metric == "isc" else "features"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    register_feature_extractor(EMBEDDED_EXTRACTOR, ShapesNetExtractor)


# ============================================================================ statistics
def feature_stats(features) -> dict:
    """torch-fidelity's FID statistics {mu (D,), sigma (D, D)} of (N, D) features, in float64 (the
    dtype of ADM's reference files, which torch-fidelity's distance requires both sides to share)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics
    return fid_features_to_statistics(torch.as_tensor(features).detach().cpu().double())


def fid_vs_statistics(features, mu, sigma) -> float:
    """FID of (N, D) features against reference statistics, by torch-fidelity's formula: the one FID
    of this repository, whichever route the reference takes."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
    ref = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64)}
    return fid_statistics_to_metric(feature_stats(features), ref, False)[KEY_METRIC_FID]


def precision_recall(fake, real, k: int = 3) -> tuple[float, float]:
    """Improved precision/recall (Kynkaenniemi et al. 2019) with torch-fidelity's implementation:
    precision = share of fake points inside some real point's k-NN ball, recall = the reverse."""
    _need_fidelity()
    from torch_fidelity.metric_prc import prc_features_to_metric

    out = prc_features_to_metric(torch.as_tensor(fake).float(), torch.as_tensor(real).float(),
                                 prc_neighborhood=k, save_cpu_ram=True, verbose=False)
    return out["precision"], out["recall"]


def balanced_labels(n: int, num_classes: int = 1000) -> torch.Tensor:
    """n class labels, every class n // num_classes or one more times (50k -> 50 per ImageNet class)."""
    return torch.arange(n) % num_classes


# ============================================================================ inputs
class _Uint8Images(torch.utils.data.Dataset):
    """What torch-fidelity wants from a Dataset: one uint8 (3, H, W) tensor per item.  NHWC arrays
    (ADM's arr_0) are permuted per item, so a 2 GB reference batch is not duplicated."""

    def __init__(self, images, nhwc: bool = False):
        self.images, self.nhwc = images, nhwc

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = torch.as_tensor(np.asarray(self.images[i]))
        return x.permute(2, 0, 1).contiguous() if self.nhwc else x


class _LazyShapes(torch.utils.data.Dataset):
    """Held-out real shapes, generated on first access: a torch-fidelity cache hit never pays for it."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.images = n, seed, None

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if self.images is None:
            from d2c.data.shapes import make_shapes
            self.images = make_shapes(self.n, seed=self.seed)[0]
        return self.images[i]


def _as_input(x):
    """uint8 tensor -> Dataset; a Dataset as is; a folder of png/jpg -> its path (torch-fidelity reads it)."""
    if isinstance(x, (str, Path)):
        if not Path(x).is_dir():
            raise MetricsError(f"{x}: not a folder of images")
        return str(x)
    if isinstance(x, torch.utils.data.Dataset):
        return x
    return _Uint8Images(_check_images(x))


def _input_len(x):
    return len(x) if not isinstance(x, str) else sum(
        1 for p in Path(x).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))


def _load_stats(path, dim: int | None, images: bool = True):
    """(mu, sigma, arr_0 or None) from a statistics .npz, or one MetricsError line.  arr_0 (ADM:
    10k images, 2 GB) is read only when `images` asks for it (KID, precision/recall)."""
    path = Path(path)
    if not path.is_file():
        raise MetricsError(f"reference statistics {path}: missing; {ADM_HOWTO}")
    if not zipfile.is_zipfile(path):
        raise MetricsError(f"reference statistics {path}: unreadable (not an .npz zip archive; truncated?); "
                           f"{ADM_HOWTO}")
    try:
        npz = np.load(path, allow_pickle=False)
        keys = set(npz.files)
        if not {"mu", "sigma"} <= keys:
            raise MetricsError(f"reference statistics {path}: wrong keys {sorted(keys)[:6]}, need 'mu' and "
                               f"'sigma'; {ADM_HOWTO}")
        mu, sigma = npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64)
        # ADM: (N, H, W, 3) uint8 images, 2 GB at 10k: read a batch at a time
        ref = NpzRows(path, "arr_0") if images and "arr_0" in keys else None
    except MetricsError:
        raise
    except Exception as e:  # truncated zip, garbage, pickled objects
        raise MetricsError(f"reference statistics {path}: unreadable .npz ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); {ADM_HOWTO}") from None
    d = dim or (mu.shape[0] if mu.ndim == 1 else -1)
    if mu.shape != (d,) or sigma.shape != (d, d):
        raise MetricsError(f"reference statistics {path}: wrong shapes mu {mu.shape}, sigma {sigma.shape}; "
                           f"need mu ({dim or 'D'},) and sigma ({dim or 'D'}, {dim or 'D'}); {ADM_HOWTO}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise MetricsError(f"reference statistics {path}: mu/sigma hold NaN or inf; {ADM_HOWTO}")
    if ref is not None and (ref.dtype != np.uint8 or ref.ndim != 4 or ref.shape[-1] != 3):
        raise MetricsError(f"reference statistics {path}: arr_0 {ref.dtype} {ref.shape} is not uint8 "
                           f"(N, H, W, 3) images; {ADM_HOWTO}")
    return mu, sigma, ref


def _check_inception_weights(path) -> str:
    """Load the weights once with weights_only=True (no code runs) and check they look like
    torch-fidelity's Inception, so its own torch.load/load_state_dict later cannot fail deep inside."""
    if path is None:
        raise MetricsError(f"Inception weights: no path given (weights_path=...); {INCEPTION_HOWTO}")
    path = Path(path)
    if not path.is_file():
        raise MetricsError(f"Inception weights {path}: missing; {INCEPTION_HOWTO}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise MetricsError(f"Inception weights {path}: unreadable ({type(e).__name__}: {first[:200]}); "
                           f"{INCEPTION_HOWTO}") from None
    fc = sd.get("fc.weight") if isinstance(sd, dict) else None
    if fc is None or tuple(fc.shape) != (1008, 2048) or "Mixed_7c.branch_pool.conv.weight" not in sd:
        raise MetricsError(f"Inception weights {path}: wrong keys or shapes (want torch-fidelity's "
                           f"inception-v3-compat state dict, fc.weight (1008, 2048)); {INCEPTION_HOWTO}")
    return str(path)


def _load_error(name, path, e: RuntimeError) -> MetricsError:
    """torch's many-line load_state_dict error, counted into one line."""
    text = str(e)
    counts = [(m.group(2).count('", "') + 1, m.group(1)) for m in
              re.finditer(r"(Missing|Unexpected) key\(s\) in state_dict: ([^\n]*)", text)]
    counts.append((text.count("size mismatch for"), "shape mismatch"))
    what = ", ".join(f"{n} {kind.lower()}" for n, kind in counts if n) or text.strip().splitlines()[0]
    how = INCEPTION_HOWTO if name == IMAGENET_EXTRACTOR else "pass a file written by d2c.metrics.load_feature_net"
    return MetricsError(f"weights {path}: wrong keys or shapes for {name} ({what}); {how}")


# ============================================================================ metrics
def compute_metrics(images, *, mode: str = "embedded", reference=None, weights_path=None, isc: bool = True, fid: bool = True, kid: bool = True,
                    prc: bool = True, device="cpu", batch_size: int = 64, cache_dir=DEFAULT_CACHE_DIR,
                    feature_net: FeatureNetConfig | None = None, num_reference: int = 10_000,
                    reference_seed: int = REFERENCE_SEED, kid_subset_size: int = 1000,
                    prc_neighborhood: int = 3, isc_splits: int = 10) -> dict:
    """FID, IS, KID, precision/recall of `images` as plain floats under stable keys
    (fid, is_mean, is_std, kid_mean, kid_std, precision, recall, f_score).

    images: uint8 (N, 3, H, W) tensor, a Dataset of uint8 (3, H, W), or a folder of png/jpg.
    reference: images in the same forms, or a statistics .npz (mu, sigma [, arr_0]).  Default:
      embedded -> `num_reference` held-out real shapes (seed `reference_seed`); imagenet -> required.
    mode: "embedded" (feature net "d2c-shapes-net", trained/cached under cache_dir unless
      `weights_path` names its file) or "imagenet" ("inception-v3-compat" from the local `weights_path`).
      Only these two extractors: every other torch-fidelity extractor would download its weights.
    """
    _need_fidelity()
    if mode not in ("embedded", "imagenet"):
        raise MetricsError(f"mode={mode!r}; allowed: embedded, imagenet")
    if not (isc or fid or kid or prc):
        raise MetricsError("no metric requested (isc, fid, kid, prc all False)")
    cache_dir = Path(cache_dir)
    input1 = _as_input(images)
    is_stats = isinstance(reference, (str, Path)) and str(reference).endswith(".npz")
    ref_name = None
    if mode == "imagenet":
        if reference is None:
            raise MetricsError(f"imagenet mode needs reference=<statistics .npz or images>; {ADM_HOWTO}")
        stats = _load_stats(reference, IMAGENET_FEATURE_DIM, kid or prc) if is_stats else None
        weights_path = _check_inception_weights(weights_path)  # after the cheap stats check
        name = IMAGENET_EXTRACTOR
    else:
        stats = _load_stats(reference, None, kid or prc) if is_stats else None
        _register_embedded_extractor()
        if weights_path is None:
            weights_path = load_feature_net(feature_net, cache_dir)[1]
        elif not Path(weights_path).is_file():
            raise MetricsError(f"embedded feature net {weights_path}: missing; leave weights_path=None to "
                               f"train and cache one")
        weights_path = str(weights_path)
        name = EMBEDDED_EXTRACTOR
        if reference is None:  # named, so torch-fidelity caches its features: net digest + set identity
            reference = _LazyShapes(num_reference, reference_seed)
            ref_name = (f"d2c-shapes-n{num_reference}-s{reference_seed}-{_shapes_fingerprint(reference_seed)}"
                        f"-net{file_digest(weights_path)}")

    device = torch.device(device)
    # cache=False: torch-fidelity reads its own cache back by full unpickling, so a file planted
    # there would run code; reference features are cached by us, as safetensors
    kw = dict(feature_extractor=name, feature_extractor_weights_path=weights_path,
              cuda=device.type == "cuda", batch_size=batch_size, save_cpu_ram=True, verbose=False,
              datasets_download=False, prc_neighborhood=prc_neighborhood, prc_batch_size=2000,
              rng_seed=2020, cache=False)
    n1 = _input_len(input1)
    kw["isc_splits"] = max(1, min(isc_splits, n1))
    if stats is not None:
        return _metrics_vs_stats(input1, stats, isc, fid, kid, prc, kw, kid_subset_size, n1, reference)

    from torch_fidelity.metric_fid import fid_featuresdict_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_featuresdict_to_metric
    from torch_fidelity.metric_kid import kid_featuresdict_to_metric
    from torch_fidelity.metric_prc import prc_featuresdict_to_metric
    from torch_fidelity.utils import resolve_feature_layer_for_metric

    input2 = _as_input(reference)
    kw["kid_subset_size"] = min(kid_subset_size, n1, _input_len(input2))
    # what torch_fidelity.calculate_metrics does with one extractor, minus its pickle cache
    layer = {m: resolve_feature_layer_for_metric(m, **kw) for m in ("isc", "fid", "kid", "prc")}
    on = {"isc": isc, "fid": fid, "kid": kid, "prc": prc}
    f1 = _extract(input1, [layer[m] for m in on if on[m]], kw)
    out = {}
    if isc:
        out.update(isc_featuresdict_to_metric(f1, layer["isc"], **kw))
    if fid or kid or prc:
        f2 = _reference_features(input2, ref_name, [layer[m] for m in ("fid", "kid", "prc") if on[m]], kw,
                                 cache_dir / "reference_features")
        if fid:
            out.update(fid_statistics_to_metric(fid_featuresdict_to_statistics(f1, layer["fid"]),
                                                fid_featuresdict_to_statistics(f2, layer["fid"]), False))
        if kid:
            out.update(kid_featuresdict_to_metric(f1, f2, layer["kid"], **kw))
        if prc:
            out.update(prc_featuresdict_to_metric(f1, f2, layer["prc"], **kw))
    return {_TF_KEYS[k]: float(v) for k, v in out.items() if k in _TF_KEYS}


def _reference_features(inp, name, layers, kw, folder: Path) -> dict:
    """Features of the reference set: from `folder/<name>-<layers>.safetensors` when `name` is
    given and the file is there (nothing unpickled), else extracted (and then saved)."""
    from safetensors.torch import load_file

    from d2c.checkpoint import save_safetensors
    if name is None:
        return _extract(inp, layers, kw)
    layers = sorted(set(layers))
    path = folder / f"{name}-{'-'.join(layers)}.safetensors"
    try:
        feats = load_file(path)
        if set(feats) == set(layers):
            return feats
    except Exception:   # missing, truncated or foreign: recompute and replace
        pass
    feats = {k: v for k, v in _extract(inp, layers, kw).items() if k in layers}
    save_safetensors(feats, path)
    return feats


def _extract(inp, layers, kw) -> dict:
    """One pass of `inp` through the torch-fidelity extractor named in kw (its own loader/batching)."""
    from torch_fidelity.utils import create_feature_extractor, extract_featuresdict_from_input_id

    try:
        fe = create_feature_extractor(kw["feature_extractor"], sorted(set(layers)), **kw)
    except RuntimeError as e:
        raise _load_error(kw["feature_extractor"], kw["feature_extractor_weights_path"], e) from None
    return extract_featuresdict_from_input_id(1, fe, **{**kw, "input1": inp, "cache": False})


def _metrics_vs_stats(input1, stats, isc, fid, kid, prc, kw, kid_subset_size, n1, reference) -> dict:
    """Metrics against a statistics file: FID vs (mu, sigma); KID/PRC vs its arr_0 images if any."""
    from torch_fidelity.metric_isc import isc_featuresdict_to_metric
    from torch_fidelity.metric_kid import kid_featuresdict_to_metric
    from torch_fidelity.metric_prc import prc_featuresdict_to_metric
    from torch_fidelity.utils import resolve_feature_layer_for_metric

    mu_ref, sigma_ref, ref_images = stats
    if (kid or prc) and ref_images is None:
        warnings.warn(f"{reference}: no reference images (arr_0), so KID and precision/recall are skipped")
        kid = prc = False
    layer = {m: resolve_feature_layer_for_metric(m, **kw) for m in ("isc", "fid", "kid", "prc")}
    want = [layer[m] for m, on in (("isc", isc), ("fid", fid), ("kid", kid), ("prc", prc)) if on]
    f1 = _extract(input1, want, kw)
    out = {}
    if isc:
        out.update(isc_featuresdict_to_metric(f1, layer["isc"], **kw))
    if fid:
        feats = f1[layer["fid"]]
        if feats.shape[1] != mu_ref.shape[0]:
            raise MetricsError(f"reference statistics {reference}: {mu_ref.shape[0]}-d but the extractor gives "
                               f"{feats.shape[1]}-d features; {ADM_HOWTO}")
        out["frechet_inception_distance"] = fid_vs_statistics(feats, mu_ref, sigma_ref)
    if kid or prc:
        f2 = _extract(_Uint8Images(ref_images, nhwc=True), [layer["kid"], layer["prc"]], kw)
        if kid:
            out.update(kid_featuresdict_to_metric(f1, f2, layer["kid"], **{
                **kw, "kid_subset_size": min(kid_subset_size, n1, len(ref_images))}))
        if prc:
            out.update(prc_featuresdict_to_metric(f1, f2, layer["prc"], **kw))
    return {_TF_KEYS[k]: float(v) for k, v in out.items() if k in _TF_KEYS}


def save_reference_stats(images, path, *, mode: str = "embedded", weights_path=None, device="cpu",
                         batch_size: int = 64, cache_dir=DEFAULT_CACHE_DIR,
                         feature_net: FeatureNetConfig | None = None) -> Path:
    """Write mu/sigma (float64, ADM's key names) of real `images` to an .npz usable as `reference`."""
    _need_fidelity()
    if mode == "imagenet":
        name, weights_path = IMAGENET_EXTRACTOR, _check_inception_weights(weights_path)
    else:
        _register_embedded_extractor()
        name = EMBEDDED_EXTRACTOR
        weights_path = str(weights_path or load_feature_net(feature_net, cache_dir)[1])
    kw = dict(feature_extractor=name, feature_extractor_weights_path=weights_path, verbose=False,
              cuda=torch.device(device).type == "cuda", batch_size=batch_size, save_cpu_ram=True,
              datasets_download=False)
    from torch_fidelity.utils import resolve_feature_layer_for_metric
    layer = resolve_feature_layer_for_metric("fid", **kw)
    stats = feature_stats(_extract(_as_input(images), [layer], kw)[layer])
    from d2c.files import atomic_write
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, **stats))
    return path
