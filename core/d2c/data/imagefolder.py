"""ImageNet-style image folders with ADM's centre crop, and the `data` config that picks a dataset.

Layout: `root/<class name>/.../<image>`; labels are the sorted class-folder names' positions.
Preprocessing is ADM's `center_crop_arr` (guided-diffusion, reused by MAR and LlamaGen):
halve with a BOX filter while the short side is >= 2*size, resize with BICUBIC so the short
side == size, then crop the centre.  Images come out as float (3, size, size) in [-1, 1]
(x / 127.5 - 1, the tokenizers' input range; MAR's ToTensor + Normalize(0.5, 0.5) up to rounding).

Unreadable images: `on_bad="error"` raises one line naming the file; `on_bad="skip"` drops
them, at index time when `verify` is "header" or "full", else when they are loaded (the
token-cache builder leaves them out and reports the count once).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from d2c.cli import one_line

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".jfif")
ON_BAD = ("skip", "error")
VERIFY = ("none", "header", "full")


class DataError(ValueError):
    """A dataset that cannot be used; the message is one line for the user."""


class BadImageWarning(UserWarning):
    pass


def center_crop_arr(pil_image, image_size: int):
    """ADM's preprocessing: BOX-halve while the short side >= 2*size, BICUBIC so the short side
    == size, centre crop (the top-left of the centre on odd margins).  PIL image in, PIL image out."""
    from PIL import Image

    img = pil_image
    while min(img.size) >= 2 * image_size:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.BOX)
    scale = image_size / min(img.size)
    new = (max(image_size, round(img.size[0] * scale)), max(image_size, round(img.size[1] * scale)))
    img = img.resize(new, resample=Image.BICUBIC)
    left, top = (new[0] - image_size) // 2, (new[1] - image_size) // 2
    return img.crop((left, top, left + image_size, top + image_size))


def pil_to_tensor(img) -> torch.Tensor:
    """PIL RGB -> float (3, H, W) in [-1, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def load_rgb(path):
    """Open, fully decode and convert to RGB; raises whatever PIL raises on a bad file."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


def index_image_folder(root) -> tuple[list[str], list[tuple[str, int]]]:
    """(sorted class-folder names, [(image path, label)]) of `root/<class>/**/<image>`, or one
    DataError line: root missing, not a folder, unreadable, or holding no class folder with images."""
    root = Path(os.path.abspath(os.path.expanduser(root)))
    if not root.is_dir():
        raise DataError(f"dataset root does not exist or is not a folder: {root}")
    try:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        raise DataError(f"dataset root {root}: unreadable ({e.strerror})") from None
    samples = []
    for label, c in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / c, followlinks=True):
            dirnames.sort()
            for name in sorted(filenames):
                if name.lower().endswith(IMG_EXTENSIONS) and not name.startswith("."):
                    samples.append((os.path.join(dirpath, name), label))
    if not samples:
        raise DataError(f"no images found under {root} (expected <root>/<class>/<image> "
                        f"with extensions {', '.join(IMG_EXTENSIONS)})")
    return classes, samples


class ImageFolder(torch.utils.data.Dataset):
    """`root/<class>/**/<image>` -> (float (3, size, size) in [-1, 1], int label).

    on_bad: "skip" | "error".  verify: "none" (bad files found when loaded), "header" (open
    each file's header at index time: catches non-images, cheap), "full" (decode every file at
    index time: catches truncation too; slow on ImageNet).  Under "skip", loading a bad file
    through `__getitem__` returns the next good image (a Dataset must return something);
    `get_or_none(i)` returns None instead (what the token-cache builder uses).
    """

    def __init__(self, root, image_size: int = 256, on_bad: str = "skip", verify: str = "none"):
        if on_bad not in ON_BAD:
            raise DataError(f"on_bad={on_bad!r}; allowed: {', '.join(ON_BAD)}")
        if verify not in VERIFY:
            raise DataError(f"verify={verify!r}; allowed: {', '.join(VERIFY)}")
        self.root = Path(os.path.abspath(os.path.expanduser(root)))
        self.image_size, self.on_bad, self.verify = int(image_size), on_bad, verify
        self.classes, samples = index_image_folder(self.root)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.bad: list[str] = []          # files found unreadable (index time or load time)
        self._bad_idx: set[int] = set()
        self._warned = False
        if verify != "none":
            good = []
            for path, label in samples:
                err = self._check(path, full=verify == "full")
                if err is None:
                    good.append((path, label))
                elif on_bad == "error":
                    raise DataError(f"unreadable image {path}: {err}")
                else:
                    self.bad.append(path)
            if self.bad:
                warnings.warn(f"ImageFolder {self.root}: skipped {len(self.bad)} unreadable image(s) "
                              f"(first: {self.bad[0]})", BadImageWarning, stacklevel=2)
                self._warned = True
            if not good:
                raise DataError(f"no readable images under {self.root} ({len(self.bad)} unreadable)")
            samples = good
        self.samples = samples
        self.targets = [lab for _, lab in samples]

    @staticmethod
    def _check(path, full: bool) -> Optional[str]:
        from PIL import Image
        try:
            if full:
                load_rgb(path)
            else:
                with Image.open(path) as img:
                    img.size  # header parsed by open
            return None
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
            return one_line(e, with_type=True)

    @property
    def num_bad(self) -> int:
        return len(self.bad)

    def __len__(self):
        return len(self.samples)

    def identity(self) -> dict:
        """What the token-cache key hashes: where the files are, which files, the crop size."""
        h = hashlib.sha256()
        cut = len(os.path.join(str(self.root), ""))      # every sample path starts with root/
        for path, label in self.samples:
            h.update(f"{path[cut:]}\0{label}\n".encode())
        return {"kind": "imagefolder", "root": str(self.root.resolve()), "image_size": self.image_size,
                "num_files": len(self.samples), "files_sha256": h.hexdigest(), "classes": len(self.classes)}

    def get_or_none(self, i: int):
        """(image, label), or None for an unreadable file under on_bad="skip"."""
        path, label = self.samples[i]
        try:
            img = load_rgb(path)
        except Exception as e:
            if self.on_bad == "error":
                raise DataError(f"unreadable image {path}: {one_line(e, with_type=True)}") from None
            if i not in self._bad_idx:
                self._bad_idx.add(i)
                self.bad.append(path)
                if not self._warned:
                    self._warned = True
                    warnings.warn(f"ImageFolder {self.root}: skipping unreadable image {path} "
                                  f"({one_line(e, with_type=True)}); further ones are counted in .num_bad",
                                  BadImageWarning, stacklevel=2)
            return None
        return pil_to_tensor(center_crop_arr(img, self.image_size)), label

    def __getitem__(self, i):
        n = len(self.samples)
        for k in range(n):
            out = self.get_or_none((i + k) % n)
            if out is not None:
                return out
        raise DataError(f"no readable images under {self.root}")


# --------------------------------------------------------------------------- the `data` config


@dataclass
class DataConfig:
    """Which images: the embedded shapes (num_images, seed, image_size) or an image folder
    (root, image_size).  image_size None = 32 for shapes, 256 for an image folder."""
    name: str = "shapes"               # shapes | imagefolder
    root: Optional[str] = None
    image_size: Optional[int] = None
    num_images: int = 10000
    seed: int = 0
    on_bad: str = "skip"               # imagefolder: skip | error

    NAMES = ("shapes", "imagefolder")


def validate_data_config(config: DataConfig) -> None:
    if config.name not in DataConfig.NAMES:
        raise DataError(f"data.name={config.name!r}; allowed: {', '.join(DataConfig.NAMES)}")
    if config.on_bad not in ON_BAD:
        raise DataError(f"data.on_bad={config.on_bad!r}; allowed: {', '.join(ON_BAD)}")
    if config.image_size is not None and config.image_size < 1:
        raise DataError(f"data.image_size={config.image_size}; allowed: integers >= 1")
    if config.name == "shapes" and config.num_images < 1:
        raise DataError(f"data.num_images={config.num_images}; allowed: integers >= 1")
    if config.name == "imagefolder" and not config.root:
        raise DataError("data.root is required for data.name=imagefolder (a folder of class subfolders)")


def build_dataset(config: DataConfig | dict | None = None, **overrides):
    """DataConfig (or a dict of its fields) -> ShapesDataset | ImageFolder."""
    if config is None:
        config = DataConfig()
    elif isinstance(config, dict):
        names = {f.name for f in dataclasses.fields(DataConfig)}
        bad = sorted(set(config) - names)
        if bad:
            raise DataError(f"data: unknown field(s) {bad}; allowed: {', '.join(sorted(names))}")
        config = DataConfig(**config)
    if overrides:
        config = dataclasses.replace(config, **overrides)
    validate_data_config(config)
    if config.name == "shapes":
        from d2c.data.shapes import ShapesDataset
        return ShapesDataset(n=config.num_images, seed=config.seed, size=config.image_size or 32)
    return ImageFolder(config.root, image_size=config.image_size or 256, on_bad=config.on_bad)
