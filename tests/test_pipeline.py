"""The stage chain: keyed by config, reused when finished, retrained only downstream of a change."""
import dataclasses
import logging

import pytest
import torch

from d2c.config import TrainConfig
from d2c.data.imagefolder import DataConfig
from d2c.config import Family
from d2c.pipeline import Pipeline, evaluate
from d2c.recipes import Recipe, mar_config
from d2c.sampling import SamplerConfig


def _tiny_recipe(**gpt_kw):
    common = dict(batch_size=16, train_steps=3, lr=1e-3, warmup_steps=1, ema_decay=0.5, progress=False,
                  tensorboard=False, precision="fp32", scale_batches=2)
    return Recipe(data=DataConfig(num_images=64, seed=5), stages={
        "kl": TrainConfig(stage="kl", preset="kl_tiny", **common),
        "vq": TrainConfig(stage="vq", preset="vq_tiny", **common),
        "gpt": TrainConfig(stage="gpt", preset="gpt_tiny", **{**common, **gpt_kw}),
        "mar": TrainConfig(stage="mar", preset="mar_tiny", **common),
    })


def trained_stages(caplog) -> list[str]:
    """The stages a Pipeline trained, from its `training <stage> -> <folder>` log lines."""
    return [r.getMessage().split()[1] for r in caplog.records
            if r.name == "d2c.pipeline" and r.getMessage().startswith("training ")]


def test_stages_reused_and_retrained_only_downstream(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="d2c.pipeline")
    pipe = Pipeline(_tiny_recipe(), root=tmp_path, device="cpu")
    m = pipe.models(Family("d2c", "qformer"))
    assert m["mar"].fusion.kind == "qformer" and set(m) == {"mar", "kl", "gpt"}
    trained = set(trained_stages(caplog))
    assert trained == {"kl", "vq", "gpt", "d2c_qformer"}
    # KL latent scale was fitted: scaled latents of real images have ~unit std
    kl = m["kl"]
    x = pipe.dataset.images[:32].float() / 127.5 - 1
    assert kl.config.scale != 1.0
    with torch.no_grad():
        z = kl.encode(x, generator=torch.Generator().manual_seed(0))
    assert abs(float(z.std()) - 1.0) < 0.3

    caplog.clear()   # same recipe, new process state: nothing retrains
    Pipeline(_tiny_recipe(), root=tmp_path, device="cpu").models(Family("d2c", "qformer"))
    assert trained_stages(caplog) == []

    caplog.clear()   # a stage-1 change retrains stage 1 only
    Pipeline(_tiny_recipe(lr=2e-3), root=tmp_path, device="cpu").models(Family("d2c", "qformer"))
    assert trained_stages(caplog) == ["gpt"]


def test_editing_a_preset_retrains(tmp_path, monkeypatch, caplog):
    import d2c.config as C
    caplog.set_level(logging.INFO, logger="d2c.pipeline")
    Pipeline(_tiny_recipe(), root=tmp_path, device="cpu").tokenizer("vq")
    monkeypatch.setitem(C.PRESETS, "vq_tiny", dataclasses.replace(C.PRESETS["vq_tiny"], entropy_loss_ratio=0.1))
    caplog.clear()
    Pipeline(_tiny_recipe(), root=tmp_path, device="cpu").tokenizer("vq")
    assert trained_stages(caplog) == ["vq"]


def test_new_shapes_version_retrains_and_rekeys_the_cache(tmp_path, monkeypatch, caplog):
    """Old runs of an older generator must never be reused for the new images."""
    import d2c.data.shapes as S
    from d2c.data import ShapesDataset
    caplog.set_level(logging.INFO, logger="d2c.pipeline")
    Pipeline(_tiny_recipe(), root=tmp_path, device="cpu").tokenizer("vq")
    old_identity = ShapesDataset(n=4, seed=0).identity()
    monkeypatch.setattr(S, "VERSION", S.VERSION + 1)
    caplog.clear()
    Pipeline(_tiny_recipe(), root=tmp_path, device="cpu").tokenizer("vq")
    assert trained_stages(caplog) == ["vq"]
    assert ShapesDataset(n=4, seed=0).identity() != old_identity


def test_family_configs():
    r = Recipe()
    assert mar_config(r, Family("mar")).overrides["fusion"]["kind"] == "none"
    assert mar_config(r, Family("d2c", "cross_attn")).overrides["fusion"]["kind"] == "cross_attn"
    with pytest.raises(ValueError, match="family='gan'; allowed: llamagen, mar"):
        Pipeline(r).models(Family.named("gan"))
    with pytest.raises(ValueError, match="allowed: d2c with cross_attn or qformer"):
        Family("d2c", "none")


@pytest.mark.slow
def test_evaluate_records_metrics_and_speed(tmp_path, monkeypatch):
    import json
    import math

    from d2c.metrics import detail
    pipe = Pipeline(_tiny_recipe(), root=tmp_path, device="cpu")
    r = evaluate(pipe, Family("d2c", "cross_attn"), SamplerConfig(steps=2), num_images=20, batch_size=10,
                 progress=False)
    assert r["images"].shape == (20, 3, 32, 32)
    assert {"fid", "is_mean", "precision", "recall", "class_accuracy"} <= set(r["metrics"])
    added = {"fid_detail", "spectral_distance", "high_pass_ratio",
             *(f"{m}_{k}" for m in ("rfid", "rfid_detail", "spectral_distance", "high_pass_ratio", "l1") for k in ("kl", "vq"))}
    assert added <= set(r["metrics"]) and all(math.isfinite(r["metrics"][k]) for k in added)
    # measured once per trained tokenizer, kept in its stage folder, read back after
    saved = json.loads((pipe._dirs["vq"] / "reconstruction.json").read_text())
    assert saved["rfid"] == r["metrics"]["rfid_vq"]
    monkeypatch.setattr(detail, "reconstruction_metrics", lambda *a, **k: pytest.fail("measured again"))
    assert pipe.tokenizer_metrics()["rfid_detail_kl"] == r["metrics"]["rfid_detail_kl"]
    assert r["speed"]["mar_steps"] == 2 and r["speed"]["seconds_per_image"] > 0
    assert r["speed"]["stage1_seconds"] > 0 and r["speed"]["stage2_seconds"] > 0


def test_stage2_families_share_one_trunk(tmp_path, caplog):
    """mar_trunk trains once; each family starts from its weights (fusion modules are new)."""
    from d2c.checkpoint import load_state_dict_file
    recipe = _tiny_recipe()
    recipe.stages["mar_trunk"] = recipe.stages["mar"]
    # lr 0 after the trunk: a family's weights must then equal the trunk's, key for key
    recipe.stages["mar"] = dataclasses.replace(recipe.stages["mar"], lr=0.0, train_steps=1)
    caplog.set_level(logging.INFO, logger="d2c.pipeline")
    pipe = Pipeline(recipe, root=tmp_path, device="cpu")
    pipe.models(Family("mar"))
    pipe.models(Family("d2c", "cross_attn"))
    trained = trained_stages(caplog)
    assert trained.count("mar_trunk") == 1 and {"mar", "d2c_cross_attn"} <= set(trained)
    trunk = load_state_dict_file(sorted(pipe._dirs["mar_trunk"].glob("step_*"))[-1] / "model.safetensors")
    fam = load_state_dict_file(sorted(pipe._dirs["d2c_cross_attn"].glob("step_*"))[-1] / "model.safetensors")
    assert set(fam) - set(trunk) and all(k.startswith("fusion.") for k in set(fam) - set(trunk))
    for k, v in trunk.items():
        assert torch.equal(fam[k], v), k


def test_public_tokenizers_are_loaded_not_trained_and_epochs_count_steps(tmp_path, caplog):
    """recipe.pretrained: the KL / VQ files in MAR's and LlamaGen's containers are the tokenizers
    (no tokenizer stage trains), the cache of an image folder holds their outputs, epochs become
    steps over the readable images, and other weights in the same file path retrain downstream."""
    import json

    import d2c
    from d2c.recipes import Pretrained
    from test_data import _generated_folder
    caplog.set_level(logging.INFO, logger="d2c.pipeline")
    folder = _generated_folder(tmp_path / "imgs")       # 12 readable images, 1 corrupt

    def publish(seed):
        torch.manual_seed(seed)
        kl, vq = d2c.build("kl_tiny").eval(), d2c.build("vq_tiny").eval()
        torch.save({"model": kl.state_dict()}, tmp_path / "kl16.ckpt")
        torch.save({"model": vq.state_dict()}, tmp_path / "vq_ds16_c2i.pt")
        return kl, vq

    kl, vq = publish(1)
    common = dict(batch_size=4, lr=1e-3, ema_decay=0.5, progress=False, tensorboard=False, precision="fp32")
    recipe = Recipe(data=DataConfig(name="imagefolder", root=str(folder), image_size=32), stages={
        "gpt": TrainConfig(stage="gpt", preset="gpt_tiny", train_epochs=2, warmup_epochs=1, **common),
        "mar": TrainConfig(stage="mar", preset="mar_tiny", train_epochs=1, warmup_epochs=0, **common)},
        pretrained={"kl": Pretrained("kl_tiny", str(tmp_path / "kl16.ckpt")),
                    "vq": Pretrained("vq_tiny", str(tmp_path / "vq_ds16_c2i.pt"))})
    pipe = Pipeline(recipe, root=tmp_path / "run", device="cpu")
    m = pipe.models(Family("d2c", "qformer"))
    assert sorted(trained_stages(caplog)) == ["d2c_qformer", "gpt"]
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "run" / "ckpt").iterdir() if p.is_dir()) == \
        ["d2c_qformer", "gpt"]
    assert torch.equal(m["kl"].encoder.conv_in.weight, kl.encoder.conv_in.weight)

    x = pipe.dataset[0][0][None]
    b = pipe.cache().get_batch([0], 0)
    assert len(pipe.cache()) == 12
    with torch.no_grad():
        # the cache encodes in batches: fp32 convolutions differ from a batch of one in the last bits
        assert torch.equal(b["codes"], vq.encode(x)) and torch.allclose(b["moments"], kl.encode_moments(x), atol=1e-5)

    # 12 images, batch 4: an epoch is 3 steps
    for stage, steps, warmup in (("gpt", 6, 3), ("d2c_qformer", 3, 0)):
        out = pipe._dirs[stage]
        assert json.loads((out / "DONE").read_text())["train_steps"] == steps, stage
        assert json.loads((out / "config.json").read_text())["train"]["warmup_steps"] == warmup, stage

    caplog.clear()
    Pipeline(recipe, root=tmp_path / "run", device="cpu").models(Family("d2c", "qformer"))
    assert trained_stages(caplog) == []
    publish(2)     # new weights under the same file names: a new cache, both stages retrain
    caplog.clear()
    Pipeline(recipe, root=tmp_path / "run", device="cpu").models(Family("d2c", "qformer"))
    assert sorted(trained_stages(caplog)) == ["d2c_qformer", "gpt"]
    assert len(list((tmp_path / "run" / "cache").glob("tokens-*"))) == 2


def test_public_gpt_and_mar_start_the_stages(tmp_path, caplog):
    """recipe.init: a GPT file is stage 1 as it is; a MAR file (MAR's container: model, model_ema,
    args) starts a D2C stage 2 whose fusion is new and zero-init, so its first sampling equals the
    MAR's under either fusion.  At train_epochs=0 nothing trains; else only stage 2, from the file."""
    import argparse

    import d2c
    from d2c.recipes import Pretrained
    from test_data import _generated_folder
    caplog.set_level(logging.INFO, logger="d2c.pipeline")
    folder = _generated_folder(tmp_path / "imgs")
    torch.manual_seed(3)
    torch.save({"model": d2c.build("kl_tiny").state_dict()}, tmp_path / "kl16.ckpt")
    torch.save({"model": d2c.build("vq_tiny").state_dict()}, tmp_path / "vq_ds16_c2i.pt")
    gpt = d2c.build("gpt_tiny")
    with torch.no_grad():
        gpt.output.weight.normal_()        # LlamaGen zero-inits its head: a trained one is not
    torch.save({"model": gpt.state_dict()}, tmp_path / "c2i_B_256.pt")
    raw, ema = d2c.build("mar_tiny").state_dict(), d2c.build("mar_tiny").state_dict()
    torch.save({"model": raw, "model_ema": ema, "epoch": 399, "args": argparse.Namespace(model="mar_tiny")},
               tmp_path / "checkpoint-last.pth")
    mar = d2c.load_pretrained("mar_tiny", tmp_path / "checkpoint-last.pth").eval()   # the EMA weights

    def recipe(mar_epochs):
        common = dict(batch_size=4, lr=1e-3, ema_decay=0.5, progress=False, tensorboard=False, precision="fp32")
        return Recipe(data=DataConfig(name="imagefolder", root=str(folder), image_size=32), stages={
            "gpt": TrainConfig(stage="gpt", preset="gpt_tiny", train_epochs=1, **common),
            "mar": TrainConfig(stage="mar", preset="mar_tiny", train_epochs=mar_epochs, **common)},
            pretrained={"kl": Pretrained("kl_tiny", str(tmp_path / "kl16.ckpt")),
                        "vq": Pretrained("vq_tiny", str(tmp_path / "vq_ds16_c2i.pt"))},
            init={"gpt": str(tmp_path / "c2i_B_256.pt"), "mar": str(tmp_path / "checkpoint-last.pth")})

    labels, codes = torch.arange(4), torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, _ = mar.sample_tokens(labels, SamplerConfig(steps=4, cfg=2.0), generator=torch.Generator().manual_seed(5))
    for kind in ("qformer", "cross_attn"):
        m = Pipeline(recipe(0), root=tmp_path / "run", device="cpu").models(Family("d2c", kind))
        assert m["mar"].fusion.kind == kind and torch.equal(m["gpt"].output.weight, gpt.output.weight)
        with torch.no_grad():
            got, _ = m["mar"].sample_tokens(labels, SamplerConfig(steps=4, cfg=2.0), codes=codes,
                                            generator=torch.Generator().manual_seed(5))
        assert torch.equal(got, want), kind
    assert trained_stages(caplog) == [] and not (tmp_path / "run" / "ckpt").exists()

    pipe = Pipeline(recipe(1), root=tmp_path / "run", device="cpu")
    tuned = pipe.models(Family("d2c", "qformer"))["mar"]
    assert trained_stages(caplog) == ["d2c_qformer"]                     # stage 1 stays the file's
    assert pipe._dirs["d2c_qformer"].name.startswith("d2c_qformer-")
    key = "encoder_blocks.0.attn.qkv.weight"
    assert not torch.equal(tuned.state_dict()[key], mar.state_dict()[key])   # fine-tuned from it
    with pytest.raises(ValueError, match="train_epochs=0 for stage gpt: it would train nothing"):
        TrainConfig(stage="gpt", preset="gpt_tiny", train_epochs=0).in_steps(12)
