"""The embedded default's feature networks: small CNNs trained here on the shapes dataset
(seconds on 2 cores), cached as safetensors under a hash of their recipe, and the class
accuracy the layout net judges (d2c.metrics.fidelity registers them with torch-fidelity).
  layout net (FeatureNetConfig())  classes, with blur augmentation: its features see the layout,
                                   not pixel-sharp texture (FID, IS, KID, precision/recall)
  detail net (DETAIL_NET)          classes and the grating's frequency and orientation, never
                                   blurred: its features need the fine texture (fid_detail)"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from d2c.files import stable_hash

DEFAULT_CACHE_DIR = Path("outputs/cache")
HELDOUT_SEED = 777                     # accuracy check of the feature net


class MetricsError(ValueError):
    """An input the metrics cannot use; the message is one line: file, what is wrong, how to fix."""


def _check_images(x) -> torch.Tensor:
    if not torch.is_tensor(x) or x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
        what = f"{x.dtype} {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__
        raise MetricsError(f"images must be uint8 (N, 3, H, W) (d2c.sampling.to_uint8 converts), got {what}")
    return x.cpu()



# ============================================================================ embedded feature net
@dataclass(frozen=True)
class FeatureNetConfig:
    """Recipe of the embedded feature net; its hash names the cached weights, so any change retrains."""
    widths: tuple = (16, 32, 64, 128)  # conv-BN-ReLU blocks, 2x2 max-pool between; last = feature dim
    num_classes: int = 10
    n_train: int = 6000
    data_seed: int = 1000              # training images: make_shapes(n_train, data_seed)
    train_steps: int = 300
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    blur_sigma: float = 1.2            # augmentation: Gaussian blur, sigma ~ U(0, blur_sigma), half the batch
    detail_weight: float = 0.0         # > 0: + this x MSE of a head predicting the grating (make_shapes detail)
    version: int = 2                   # bump when the training code changes

    def key(self) -> str:
        return stable_hash({**dataclasses.asdict(self), "data": _shapes_fingerprint(self.data_seed)}, length=12)


# the detail-sensitive net behind fid_detail: no blur, and its features must carry the grating
DETAIL_NET = FeatureNetConfig(blur_sigma=0.0, detail_weight=1.0)


@functools.lru_cache(maxsize=None)
def _shapes_fingerprint(seed: int) -> str:
    """Digest of a few generated images: if the dataset code changes, cache keys change with it."""
    from d2c.data.shapes import make_shapes

    return hashlib.sha256(make_shapes(16, seed=seed)[0].numpy().tobytes()).hexdigest()[:8]


DETAIL_DIM = 3                         # make_shapes(return_detail=True): frequency, cos 2 theta, sin 2 theta


class FeatureNet(nn.Module):
    """uint8 (or [-1, 1] float) images -> (global-average-pooled features, class logits);
    `detail_head` (detail nets only) predicts the grating from the same features."""
    INPUT_SIZE = 32

    def __init__(self, widths=(16, 32, 64, 128), num_classes: int = 10, detail: bool = False):
        super().__init__()
        chans = (3, *widths)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU())
            for i, o in zip(chans[:-1], chans[1:]))
        self.head = nn.Linear(widths[-1], num_classes)
        self.detail_head = nn.Linear(widths[-1], DETAIL_DIM) if detail else None

    @classmethod
    def from_state_dict(cls, sd: dict) -> "FeatureNet":
        """Widths, class count and heads read off the tensors, so the file alone rebuilds the net."""
        n = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        net = cls(tuple(sd[f"blocks.{i}.0.weight"].shape[0] for i in range(n)), sd["head.weight"].shape[0],
                  detail="detail_head.weight" in sd)
        net.load_state_dict(sd)
        return net.eval()

    def forward(self, x):
        if x.dtype == torch.uint8:
            x = x.float() / 127.5 - 1
        if x.shape[-2:] != (self.INPUT_SIZE, self.INPUT_SIZE):  # the net has only seen 32x32
            x = F.interpolate(x, size=self.INPUT_SIZE, mode="bilinear", antialias=True, align_corners=False)
        for i, block in enumerate(self.blocks):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
        feats = x.mean((2, 3))
        return feats, self.head(feats)


@contextlib.contextmanager
def _torch_threads(n: int):
    prev = torch.get_num_threads()
    torch.set_num_threads(min(n, prev))
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _train_feature_net(config: FeatureNetConfig, progress: bool = True) -> FeatureNet:
    from d2c.data.shapes import make_shapes
    from d2c.progress import Progress

    x, y, detail = make_shapes(config.n_train, seed=config.data_seed, return_detail=True)
    # One thread: convs this small barely scale, and 2 threads beside another busy process ran
    # 19x slower (800 vs 42 ms a step, measured on the 2-core CPU); one is never that bad.
    # fork_rng: leave the caller's global RNG alone.
    # inference_mode(False): callers such as class_accuracy may run under inference mode
    with _torch_threads(1), torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
        torch.manual_seed(config.seed)
        net = FeatureNet(config.widths, config.num_classes, detail=config.detail_weight > 0)
        net = net.to(memory_format=torch.channels_last)
        gen = torch.Generator().manual_seed(config.seed)
        opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=config.train_steps, pct_start=0.15)
        net.train()
        order, pos = torch.randperm(len(y), generator=gen), 0
        bar = Progress("feature net", config.train_steps, "steps", enabled=progress, images_per_unit=config.batch_size)
        for _ in range(config.train_steps):
            if pos + config.batch_size > len(y):
                order, pos = torch.randperm(len(y), generator=gen), 0
            idx = order[pos:pos + config.batch_size]
            pos += config.batch_size
            # channels_last: ~1.5x faster convs on CPU (measured)
            xb = _blur_half(x[idx], config.blur_sigma, gen) if config.blur_sigma > 0 else x[idx]
            feats, logits = net(xb.contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(logits, y[idx])
            if net.detail_head is not None:
                loss = loss + config.detail_weight * F.mse_loss(net.detail_head(feats), detail[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1, **({"loss": loss.item()} if bar.due() or bar.bar is not None else {}))
        bar.close()
    return net.to(memory_format=torch.contiguous_format).eval()


def _blur_half(x_uint8, max_sigma: float, gen) -> torch.Tensor:
    """Blur a random half of the batch (sigma ~ U(0, max_sigma) px).  The net judges class by
    layout: a stride-4 tokenizer's reconstructions are that much softer than the data, and a
    net that keys on pixel-sharp texture called 26-48% of recognisable reconstructions wrong
    (measured on KL-/VQ-small after 600 steps)."""
    x = x_uint8.float()
    n = len(x)
    sig = torch.rand(n, generator=gen) * max_sigma
    sig[torch.rand(n, generator=gen) < 0.5] = 0.0
    r = torch.arange(-3, 4, dtype=torch.float32)
    k = torch.exp(-r[None] ** 2 / (2 * sig.clamp_min(1e-3)[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)                                   # (n, 7) separable kernel
    c, h, w = x.shape[1:]
    xp = F.pad(x.reshape(1, n * c, h, w), (3, 3, 3, 3), mode="replicate")
    kk = k.repeat_interleave(c, 0)
    xp = F.conv2d(xp, kk[:, None, None, :], groups=n * c)     # along width
    xp = F.conv2d(xp, kk[:, None, :, None], groups=n * c)     # along height
    return xp.reshape(n, c, h, w).round().clamp(0, 255).to(torch.uint8)


def feature_net_path(config: FeatureNetConfig | None = None, cache_dir=DEFAULT_CACHE_DIR) -> Path:
    config = config or FeatureNetConfig()
    return Path(cache_dir) / f"feature_net_{config.key()}.safetensors"


def load_feature_net(config: FeatureNetConfig | None = None, cache_dir=DEFAULT_CACHE_DIR,
                     progress: bool = True) -> tuple[FeatureNet, Path]:
    """The embedded feature net: loaded from the cache when its recipe hash is there, else trained
    once (seconds on 2 cores) and saved atomically.  An unreadable cache file is retrained."""
    from d2c.checkpoint import save_safetensors

    config = config or FeatureNetConfig()
    path = feature_net_path(config, cache_dir)
    if path.is_file():
        try:
            return _load_net_file(path, "retraining"), path
        except MetricsError as e:
            warnings.warn(str(e))
    net = _train_feature_net(config, progress)
    save_safetensors(net, path)
    return net, path


def _load_net_file(path, fix: str = "pass a file written by d2c.metrics.load_feature_net") -> FeatureNet:
    from d2c.checkpoint import CheckpointError, load_state_dict_file

    try:
        return FeatureNet.from_state_dict(load_state_dict_file(path))
    except (CheckpointError, KeyError, RuntimeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MetricsError(f"embedded feature net {path}: unusable ({msg}); {fix}") from None


@torch.inference_mode()
def class_accuracy(images_uint8: torch.Tensor, labels, *, net: FeatureNet | None = None,
                   config: FeatureNetConfig | None = None, cache_dir=DEFAULT_CACHE_DIR,
                   device="cpu", batch_size: int = 500) -> float:
    """Fraction of images the embedded net classifies as their (conditioning) label."""
    images_uint8 = _check_images(images_uint8)
    labels = torch.as_tensor(labels).long().reshape(-1).cpu()
    if len(labels) != len(images_uint8):
        raise MetricsError(f"class_accuracy: {len(images_uint8)} images but {len(labels)} labels")
    net = (net or load_feature_net(config, cache_dir)[0]).to(device).eval()
    with _torch_threads(1) if torch.device(device).type == "cpu" else contextlib.nullcontext():
        pred = torch.cat([net(b.to(device))[1].argmax(-1).cpu() for b in images_uint8.split(batch_size)])
    return float((pred == labels).float().mean())
