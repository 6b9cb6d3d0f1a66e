"""recipe=imagenet, the paper-scale cell, on stand-in files in the public layouts: every file
checked before anything runs, then one D2C and one public-MAR cell end to end on CPU."""
import json
import time

import pytest

from test_ablations import records, run, trained

@pytest.fixture(scope="module")
def paper_files(tmp_path_factory):
    """What a paper-scale cell reads, made here: a generated image folder (JPEG, PNG, sizes other
    than the crop, one corrupt file), the tokenizers in MAR's and LlamaGen's containers (tiny
    presets, random weights), a random-weights Inception in torch-fidelity's format, and an
    ADM-format reference batch of the folder's images (arr_0 uint8 NHWC, mu, sigma)."""
    import numpy as np
    import torch

    import d2c
    from d2c.data import ImageFolder
    from d2c.metrics import save_reference_stats
    from test_data import _generated_folder
    from test_metrics import make_inception_file
    d = tmp_path_factory.mktemp("paper")
    folder = _generated_folder(d / "imgs")
    torch.manual_seed(0)
    torch.save({"model": d2c.build("kl_tiny").state_dict()}, d / "kl16.ckpt")
    torch.save({"model": d2c.build("vq_tiny").state_dict()}, d / "vq_ds16_c2i.pt")
    inception = make_inception_file(d)
    # MAR's and LlamaGen's model containers, at the tiny presets as the harness fits them to the
    # 32 px tiny tokenizers (classes: the ImageNet presets' 1000)
    fit = dict(img_size=32, vae_stride=4, vae_embed_dim=4, class_num=1000)
    torch.save({"model": d2c.build("mar_tiny", **fit).state_dict(),
                "model_ema": d2c.build("mar_tiny", **fit).state_dict()}, d / "checkpoint-last.pth")
    torch.save({"model": d2c.build("gpt_tiny", num_classes=1000).state_dict()}, d / "c2i_B_256.pt")
    ds = ImageFolder(folder, image_size=32)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real = torch.stack([ds.get_or_none(i)[0] for i in range(len(ds)) if ds.get_or_none(i) is not None])
    real = ((real + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    stats = save_reference_stats(real, d / "stats.npz", mode="imagenet", weights_path=inception)
    with np.load(stats) as z:
        np.savez(d / "VIRTUAL_imagenet256_labeled.npz", arr_0=real.permute(0, 2, 3, 1).numpy(),
                 mu=z["mu"], sigma=z["sigma"])
    args = ["recipe=imagenet", "data=imagefolder", f"data.root={folder}", "data.image_size=32",
            f"tokenizer.kl={d / 'kl16.ckpt'}", "tokenizer.kl_preset=kl_tiny",
            f"tokenizer.vq={d / 'vq_ds16_c2i.pt'}", "tokenizer.vq_preset=vq_tiny",
            f"eval.inception={inception}", f"eval.reference={d / 'VIRTUAL_imagenet256_labeled.npz'}",
            "discrete_model=gpt_tiny", "mar_model=mar_tiny"]
    return d, args


class _NotATensor:
    """A global outside torch's weights_only allow-list: its file must be refused, never run."""


def test_paper_scale_files_checked_before_anything_runs(tmp_path, paper_files):
    """A wrong, pickled or missing file: one line naming the key, the file and where it comes from,
    exit 2, and nothing written."""
    import torch

    import d2c
    d, args = paper_files
    torch.save({"model": d2c.build("kl_tiny").state_dict(), "x": _NotATensor()}, d / "pickled.ckpt")
    cases = [
        ([f"tokenizer.kl={d / 'vq_ds16_c2i.pt'}"], ["tokenizer.kl=", "vq_ds16_c2i.pt: shape mismatch at",
                                                   "expected MAR's kl16.ckpt", "loading into kl_tiny"]),
        ([f"tokenizer.kl={d / 'pickled.ckpt'}"], ["refused to load, the file holds more than tensors"]),
        (["tokenizer.vq=null"], ["tokenizer.vq=null: recipe=imagenet model=d2c needs it",
                                 "LlamaGen's vq_ds16_c2i.pt"]),
        ([f"eval.reference={d / 'stats.npz'}", "tokenizer.kl=/nonexistent/kl16.ckpt"],
         ["tokenizer.kl=/nonexistent/kl16.ckpt: no such file; get MAR's kl16.ckpt"]),
        ([f"eval.inception={d / 'kl16.ckpt'}"], ["eval.inception=", "wrong keys or shapes"]),
        ([f"init.mar={d / 'c2i_B_256.pt'}"], ["init.mar=", "c2i_B_256.pt: keys do not match MAR",
                                               "expected a MAR checkpoint", "loading into mar_tiny"]),
        (["train_epochs=0"], ["train_epochs=0: 0 epochs trains nothing: model=d2c needs init.gpt=<file>"]),
    ]
    cases.append(([f"data.root={d / 'nowhere'}"], [f"data.root={d / 'nowhere'}: does not exist or is not a folder"]))
    (d / "empty" / "n01440764").mkdir(parents=True, exist_ok=True)
    cases.append(([f"data.root={d / 'empty'}"], [f"data.root={d / 'empty'}: no images found under"]))
    for extra, needles in cases:
        rd = tmp_path / "r"
        given = {a.split("=")[0] for a in extra}
        p = run(["model=d2c", *[a for a in args if a.split("=")[0] not in given], *extra], rd)
        assert p.returncode == 2, (extra, p.stdout[-2000:], p.stderr[-2000:])
        err = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert len(err) == 1 and err[0].startswith("error: "), (extra, p.stderr)
        for n in needles:
            assert n in err[0], (n, err[0])
        assert not rd.exists() or not any(rd.rglob("*.json")), extra
    p = run(["--plan", "model=d2c", *args], tmp_path / "r")      # the protocol's 50 a class by default
    assert p.returncode == 0 and '"num_images": 50000' in p.stdout, p.stderr[-2000:]
    # the fronts search, unchanged at paper scale: a base per family, the space from its presets
    p = run(["-m", "search=front", "model=mar,d2c", "fusion=cross_attn", "budget=40", "--plan", *args], tmp_path / "r")
    bases = [ln for ln in p.stdout.splitlines() if ln.startswith("search ")]
    assert p.returncode == 0 and len(bases) == 2 and all("budget 40" in b and "steps in [1, 2, 4, 8, 16, 32, 64]" in b
                                                         for b in bases), p.stdout + p.stderr[-2000:]
    assert "model=d2c fusion=cross_attn" in bases[1] and not (tmp_path / "r" / "records").exists()
    p = run(["model=d2c", "recipe=small", f"tokenizer.kl={d / 'kl16.ckpt'}"], tmp_path / "r")
    assert p.returncode == 2 and "only recipe=imagenet loads files" in p.stderr
    p = run(["model=d2c", *[a for a in args if not a.startswith("data")]], tmp_path / "r")
    assert p.returncode == 2 and "recipe=imagenet: needs data=imagefolder" in p.stderr


@pytest.mark.slow
def test_paper_scale_cell_end_to_end(tmp_path, paper_files):
    """One recipe=imagenet D2C cell on CPU: the public-layout tokenizer files loaded (no tokenizer
    stage), the folder cached, both stages trained for two epochs, 10 images sampled and measured
    with the Inception file against the ADM reference batch."""
    d, args = paper_files
    rd = tmp_path / "results"
    t0 = time.perf_counter()
    p = run(["model=d2c", "steps=4", "num_images=10", "batch_size=10", "train_epochs=2",
             "train_batch_size=4", *args], rd, timeout=600)
    wall = time.perf_counter() - t0
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert sorted(trained(p.stdout)) == ["d2c_qformer", "gpt"], p.stdout[-2000:]
    (rec,) = records(rd)
    assert rec["status"] == "ok", rec["error"]
    m = rec["metrics"]
    assert {"fid", "is_mean", "precision", "recall"} <= set(m) and "fid_detail" not in m
    assert rec["config"]["recipe"] == "imagenet" and rec["config"]["tokenizer.kl_preset"] == "kl_tiny"
    assert rec["config"]["train_epochs"] == 2.0
    from d2c.evaluation import load_npz_images
    assert load_npz_images(rd / "samples" / rec["cell_id"] / "samples.npz").shape == (10, 32, 32, 3)
    assert rec["speed"]["per"] == "rank" and rec["speed"]["num_images"] == 10 and rec["speed"]["ranks"] == 1
    steps = {json.loads((x / "DONE").read_text())["train_steps"] for x in (rd / "ckpt").glob("*-*") if x.is_dir()}
    assert steps == {6}                       # 12 readable images, batch 4: 3 steps an epoch
    print(f"paper-scale e2e cell: {wall:.0f} s")

    # the public MAR file sampled as it is (train_epochs=0), in a fresh results folder: nothing
    # trains and no token cache is built (the dataset is never encoded)
    # even with a data.root it cannot read: it never opens the folder
    rd = tmp_path / "public"
    t0 = time.perf_counter()
    unreadable = [a for a in args if not a.startswith("data.root=")] + [f"data.root={tmp_path / 'no-such-folder'}"]
    p = run(["model=mar", "steps=4", "num_images=10", "batch_size=10", "train_epochs=0",
             f"init.mar={d / 'checkpoint-last.pth'}", f"init.gpt={d / 'c2i_B_256.pt'}", *unreadable], rd, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert trained(p.stdout) == [], p.stdout[-2000:]
    assert not list((rd / "cache").glob("tokens-*")) and not (rd / "ckpt").exists()
    print(f"public MAR cell, no cache: {time.perf_counter() - t0:.0f} s")
    (mar,) = [r for r in records(rd) if r["family"] == "mar"]
    assert mar["status"] == "ok" and mar["config"]["init.gpt"] is None     # not applicable to MAR
    assert mar["config"]["init.mar"].endswith("checkpoint-last.pth") and "fid" in mar["metrics"]
