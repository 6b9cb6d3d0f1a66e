"""Data: the embedded shapes dataset and ImageNet-style folders with ADM's centre crop (the token
cache built from them: test_token_cache.py)."""
import numpy as np
import pytest
import torch
from PIL import Image

from d2c.data import DataConfig, DataError, ImageFolder, ShapesDataset, build_dataset, make_shapes
from d2c.data.imagefolder import BadImageWarning, center_crop_arr
from d2c.data.shapes import NUM_CLASSES


# --------------------------------------------------------------------------- shapes


def test_shapes_deterministic_and_balanced():
    a, la = make_shapes(200, seed=3)
    b, lb = make_shapes(200, seed=3)
    c, lc = make_shapes(200, seed=4)
    assert a.dtype == torch.uint8 and a.shape == (200, 3, 32, 32)
    assert a.numpy().tobytes() == b.numpy().tobytes() and torch.equal(la, lb)
    assert a.numpy().tobytes() != c.numpy().tobytes()
    assert torch.bincount(la, minlength=NUM_CLASSES).tolist() == [20] * NUM_CLASSES
    ds = ShapesDataset(n=50, seed=1)
    x, y = ds[7]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert 0 <= int(y) < NUM_CLASSES


def test_shapes_colour_pair_is_the_class_pair_shared_by_two_classes():
    # v4: the background is PALETTE[label % 5]; no image shows another pair's background
    from d2c.data.shapes import PALETTE
    assert len(PALETTE) * 2 == NUM_CLASSES
    x, y = make_shapes(300, seed=11)
    bg = PALETTE[:, 0]                                                   # (5, 3)
    near = ((x.double()[:, None] / 255 - bg[None, :, :, None, None]).abs().amax(2) < 0.08)
    frac = near.double().mean((2, 3))                                    # (n, 5): share of pixels
    own = frac[torch.arange(len(y)), y % len(PALETTE)]
    frac[torch.arange(len(y)), y % len(PALETTE)] = 0
    assert own.min() > 0.15 and frac.max() < 0.05, (own.min(), frac.max())


def test_build_dataset_from_config(tmp_path):
    ds = build_dataset(DataConfig(name="shapes", num_images=30, seed=2, image_size=16))
    assert len(ds) == 30 and ds[0][0].shape == (3, 16, 16)
    assert torch.equal(ds.images, build_dataset({"name": "shapes", "num_images": 30, "seed": 2,
                                                 "image_size": 16}).images)
    with pytest.raises(DataError, match=r"data.name='imagenet'; allowed: shapes, imagefolder"):
        build_dataset(DataConfig(name="imagenet"))
    with pytest.raises(DataError, match="data.root is required"):
        build_dataset(DataConfig(name="imagefolder"))
    _write_png(tmp_path / "a" / "x.png", np.full((40, 50, 3), 100, np.uint8))
    f = build_dataset(DataConfig(name="imagefolder", root=str(tmp_path), image_size=16))
    assert isinstance(f, ImageFolder) and f[0][0].shape == (3, 16, 16)


# --------------------------------------------------------------------------- image folder


def _write_png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _ramp(w, h, axis, lo=3.0, step=5.0):
    """uint8 (h, w, 3): value lo + step * (pixel index along axis)."""
    v = (lo + step * np.arange(w if axis == 1 else h)).astype(np.uint8)
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:] = v[None, :, None] if axis == 1 else v[:, None, None]
    return arr


def _expected_ramp(w, h, size, axis, lo=3.0, step=5.0):
    """The ADM crop of a linear ramp, in float64 and without PIL: BOX halving and BICUBIC
    resizing keep a linear ramp linear (in continuous pixel coordinates), so each output pixel
    is the ramp at the source position of its centre."""
    sw, sh = w, h
    while min(sw, sh) >= 2 * size:
        sw, sh = sw // 2, sh // 2
    scale = size / min(sw, sh)
    rw, rh = round(sw * scale), round(sh * scale)
    n_src, n_res = (w, rw) if axis == 1 else (h, rh)
    off = (n_res - size) // 2
    pos = (np.arange(size) + off + 0.5) * n_src / n_res - 0.5   # source pixel-index coordinate
    vals = (lo + step * pos) / 127.5 - 1.0
    return np.broadcast_to(vals[None, :] if axis == 1 else vals[:, None], (size, size))


@pytest.mark.parametrize("w,h,size,axis", [(40, 20, 8, 1), (45, 12, 8, 1), (20, 40, 8, 0), (12, 45, 8, 0)])
def test_center_crop_matches_float64_ramp(tmp_path, w, h, size, axis):
    _write_png(tmp_path / "c" / "ramp.png", _ramp(w, h, axis))
    x, y = ImageFolder(tmp_path, image_size=size)[0]
    assert x.shape == (3, size, size) and y == 0
    want = torch.from_numpy(_expected_ramp(w, h, size, axis).copy()).float()
    # one uint8 level of slack for PIL's fixed-point filters; a crop one pixel off costs >= 3 levels
    assert (x - want).abs().max() <= 1.0 / 127.5, (x[0] - want).abs().max()
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])


@pytest.mark.parametrize("w,h,halvings,crop_x", [(44, 16, 1, 7), (100, 32, 2, 8)])
def test_center_crop_box_halving(w, h, halvings, crop_x):
    """Short side >= 2*size halves with BOX (exact block means here, as the sizes are even)
    until the resize is the identity: expectation in float64 block means, then the crop."""
    arr = np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8)
    mean = arr.astype(np.float64)
    for _ in range(halvings):   # pair means along width, then height, each stored as uint8 (round half up)
        hh, ww = mean.shape[0], mean.shape[1] // 2
        mean = np.floor(mean.reshape(hh, ww, 2, 3).mean(axis=2) + 0.5)
        mean = np.floor(mean.reshape(hh // 2, 2, ww, 3).mean(axis=1) + 0.5)
    out = np.asarray(center_crop_arr(Image.fromarray(arr), 8)).astype(np.float64)
    assert out.shape == (8, 8, 3)
    assert np.abs(out - mean[:, crop_x:crop_x + 8]).max() <= 1.0   # Pillow 13 gives 0 here


def _adm_center_crop_arr(pil_image, image_size):
    """guided-diffusion `image_datasets.center_crop_arr` (also MAR's), as the oracle."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


def test_center_crop_equals_adm_reference():
    rng = np.random.default_rng(2)
    for w, h, size in [(500, 375, 256), (333, 500, 256), (37, 23, 16), (64, 64, 32), (31, 90, 32), (257, 256, 128)]:
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ours = np.asarray(center_crop_arr(Image.fromarray(arr), size))
        assert ours.shape == (size, size, 3)
        assert np.array_equal(ours, _adm_center_crop_arr(Image.fromarray(arr), size)), (w, h, size)


def test_center_crop_no_resize_is_pure_crop():
    arr = np.random.default_rng(0).integers(0, 256, (16, 27, 3), dtype=np.uint8)
    out = np.asarray(center_crop_arr(Image.fromarray(arr), 16))
    assert np.array_equal(out, arr[:, 5:21])


def test_imagefolder_sizes_labels_constant_values(tmp_path):
    colour = np.array([200, 10, 90], np.uint8)
    sizes = [(37, 23), (23, 61), (300, 257), (33, 33)]
    for k, (w, h) in enumerate(sizes):
        _write_png(tmp_path / "zebra" / f"{k}.png", np.broadcast_to(colour, (h, w, 3)).copy())
    Image.fromarray(np.full((29, 41, 3), 128, np.uint8)).save(tmp_path / "zebra" / "j.jpg", quality=95)
    (tmp_path / "apple").mkdir()
    _write_png(tmp_path / "apple" / "sub" / "a.png", np.full((19, 70, 3), 7, np.uint8))
    (tmp_path / "zebra" / "notes.txt").write_text("not an image extension: ignored")
    ds = ImageFolder(tmp_path, image_size=16)
    assert ds.classes == ["apple", "zebra"] and len(ds) == 6
    assert ds.targets == [0] + [1] * 5
    want = torch.from_numpy(colour.astype(np.float64) / 127.5 - 1.0).float()[:, None, None]
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
        path = ds.samples[i][0]
        if path.endswith(".png") and y == 1:
            assert torch.allclose(x, want.expand_as(x), atol=1e-6), path
        if path.endswith(".jpg"):
            assert (x - (128 / 127.5 - 1)).abs().max() <= 2 / 127.5
    assert torch.allclose(ds[0][0], torch.full((3, 16, 16), 7 / 127.5 - 1))


def _folder_with_bad(tmp_path):
    for k in range(3):
        _write_png(tmp_path / "a" / f"{k}.png", np.full((20, 24, 3), 40 * k, np.uint8))
    (tmp_path / "a" / "garbage.jpg").write_bytes(b"this is not an image at all")
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(noise)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "truncated.png").write_bytes(noise.read_bytes()[:1000])   # header ok, data cut
    noise.unlink()
    _write_png(tmp_path / "b" / "ok.png", np.full((30, 22, 3), 250, np.uint8))
    return tmp_path


def test_bad_images_skip_at_load_time(tmp_path):
    ds = ImageFolder(_folder_with_bad(tmp_path), image_size=8, on_bad="skip")
    assert len(ds) == 6 and ds.num_bad == 0
    with pytest.warns(BadImageWarning, match="skipping unreadable image") as rec:
        items = [ds.get_or_none(i) for i in range(len(ds))]
        x, _ = ds[[p for p, _ in ds.samples].index(str(tmp_path / "b" / "truncated.png"))]
    assert len(rec) == 1                                   # reported once, then counted
    assert sum(it is None for it in items) == 2 and ds.num_bad == 2
    assert torch.equal(x, ds[0][0])   # substitute: the next good one (the last file wraps to the first)


def test_bad_images_skip_at_index_time(tmp_path):
    root = _folder_with_bad(tmp_path)
    with pytest.warns(BadImageWarning, match=r"skipped 1 unreadable image\(s\)"):
        ds = ImageFolder(root, image_size=8, verify="header")   # garbage caught, truncated not yet
    assert len(ds) == 5 and ds.num_bad == 1
    with pytest.warns(BadImageWarning, match=r"skipped 2 unreadable image\(s\)"):
        ds = ImageFolder(root, image_size=8, verify="full")
    assert len(ds) == 4 and all(ds.get_or_none(i) is not None for i in range(4))


def test_bad_images_error(tmp_path):
    root = _folder_with_bad(tmp_path)
    with pytest.raises(DataError) as e:
        ImageFolder(root, image_size=8, on_bad="error", verify="header")
    assert "garbage.jpg" in str(e.value) and "\n" not in str(e.value)
    ds = ImageFolder(root, image_size=8, on_bad="error")
    with pytest.raises(DataError) as e:
        for i in range(len(ds)):
            ds[i]
    assert str(e.value).startswith("unreadable image ") and "\n" not in str(e.value)
    with pytest.raises(DataError, match="on_bad='ignore'; allowed: skip, error"):
        ImageFolder(root, on_bad="ignore")


def test_missing_or_empty_root(tmp_path):
    with pytest.raises(DataError) as e:
        ImageFolder(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no images found under .*empty"):
        ImageFolder(tmp_path / "empty")


def _generated_folder(root):
    """3 classes of JPEG and PNG files at sizes other than the crop's, one of them corrupt (the
    folder the token cache, pipeline and harness tests build from)."""
    rng = np.random.default_rng(0)
    for k in range(12):
        arr = rng.integers(0, 256, (33 + 3 * k, 60 - 2 * k, 3), dtype=np.uint8)
        path = root / f"class{k % 3}" / f"img{k:02d}.{'jpg' if k % 2 else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(path, quality=90) if k % 2 else _write_png(path, arr)
    (root / "class1" / "img99.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return root

