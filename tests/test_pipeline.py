"""The stage chain: keyed by config, reused when finished, retrained only downstream of a change."""
import dataclasses
import logging

import pytest
import torch

from d2c.config import TrainConfig
from d2c.data.imagefolder import DataConfig
from d2c.config import Family
from d2c.pipeline import Pipeline, Recipe, evaluate, mar_config


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
    return [r.getMessage().split()[1] for r in caplog.records if r.name == "d2c.pipeline"]


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
    r = evaluate(pipe, Family("d2c", "cross_attn"), steps=2, num_images=20, batch_size=10, progress=False)
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
