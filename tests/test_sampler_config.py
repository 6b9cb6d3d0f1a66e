"""The sampler as one value: SamplerConfig's rules and `allowed:` text, `for_family`, the flags of
d2c-sample generated from its fields, and the harness's promise that two cells with two ids never
sample the same images (every axis walked for every family)."""
import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

import d2c
from d2c.config import FAMILIES
from d2c.sampling import (SAMPLER_DEFAULTS, SAMPLER_KEYS, SamplerConfig, add_sampler_flags, d2c_sample, runs,
                          sampler_from_args, setting_stage)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ablations"))
TINY = ["recipe=tiny", "data=shapes_tiny", "num_images=20", "batch_size=10"]
# a second valid value of every setting (the first is its default); a new field must join here
OTHER = {"steps": 4, "cfg": 1.5, "cfg_schedule": "constant", "temperature": 0.5, "diffusion_steps": 5,
         "diffusion_steps_last": 2, "head_sampler": "ddim", "uncond_refresh": 2, "stage1_cfg": 1.5,
         "stage1_cfg_schedule": "linear",
         "stage1_temperature": 0.5, "stage1_top_k": 10, "stage1_top_p": 0.9, "precision": "bf16", "compile": True}
BAD = {"steps": 0, "cfg": -1, "cfg_schedule": "cosine", "temperature": 0, "diffusion_steps": 0,
       "diffusion_steps_last": -2, "head_sampler": "euler", "uncond_refresh": 0, "stage1_cfg": -0.5,
       "stage1_cfg_schedule": "cosine",
       "stage1_temperature": -1, "stage1_top_k": -3, "stage1_top_p": 1.5, "precision": "fp8", "compile": 1}


def test_every_setting_has_a_second_value_and_a_bad_one():
    assert set(OTHER) == set(BAD) == set(SAMPLER_KEYS)
    assert all(OTHER[k] != SAMPLER_DEFAULTS[k] for k in SAMPLER_KEYS)


@pytest.mark.parametrize("key", SAMPLER_KEYS)
def test_rules_and_allowed_text_from_one_table(key):
    field = SamplerConfig.__dataclass_fields__[key]
    assert SamplerConfig(**{key: OTHER[key]})
    with pytest.raises(ValueError) as e:
        SamplerConfig(**{key: BAD[key]})
    assert str(e.value) == f"{key}={BAD[key]}: allowed: {field.metadata['allowed']}"
    # the harness checks the same rule with the same text
    import d2c_harness as H
    assert H.RULES[key] == (field.metadata["rule"], field.metadata["allowed"])
    assert H.allowed(key) == field.metadata["allowed"]


def test_none_marks_a_stage_that_does_not_run():
    s = SamplerConfig(temperature=None, steps=None)              # fine as a value: stage 2 may not run
    s.check(stage1=True)
    with pytest.raises(ValueError, match=r"^steps=None: allowed: integers >= 1$"):
        s.check(stage2=True)
    with pytest.raises(ValueError, match=r"^cfg=None: allowed: numbers >= 0$"):
        SamplerConfig(cfg=None)                                   # both stages read it
    assert SamplerConfig(cfg=2).cfg == 2.0 and isinstance(SamplerConfig(cfg=2).cfg, float)


def test_for_family_nulls_what_the_family_does_not_run():
    s = SamplerConfig(**OTHER)
    for fam in FAMILIES:
        got = s.for_family(fam)
        for k in SAMPLER_KEYS:
            stage = setting_stage(k)
            expect_none = (stage == "stage1" and not fam.has_stage1) or (stage == "stage2" and not fam.has_stage2)
            if k != "stage1_cfg":
                assert (getattr(got, k) is None) == expect_none, (fam.name, k)
            assert runs(k, fam) == (not expect_none)
    # stage 1 alone: its own scale is the cfg; both stages: a stage-1 scale equal to cfg is none of its own
    assert SamplerConfig(cfg=3.0, stage1_cfg=2.0).for_family("llamagen").cfg == 2.0
    assert SamplerConfig(cfg=3.0, stage1_cfg=2.0).for_family("llamagen").stage1_cfg is None
    assert SamplerConfig(cfg=3.0, stage1_cfg=3.0).for_family("d2c") == SamplerConfig(cfg=3.0).for_family("d2c")
    assert SamplerConfig(cfg=3.0, stage1_cfg=2.0).for_family("d2c").stage1_guidance == 2.0
    with pytest.raises(ValueError, match="model='gan'; allowed: "):
        s.for_family("gan")


def test_d2c_sample_flags_are_the_fields(capsys):
    ap = argparse.ArgumentParser()
    add_sampler_flags(ap)
    assert ap.parse_args([]).__dict__ == SAMPLER_DEFAULTS                       # the defaults are the fields'
    argv = []
    for k, v in OTHER.items():
        flag = "--" + k.replace("_", "-")
        argv += [flag] if v is True else [flag, str(v)]
    assert sampler_from_args(ap.parse_args(argv)) == SamplerConfig(**OTHER)     # every setting is a flag
    assert sampler_from_args(ap.parse_args(["--diffusion-steps", "none", "--no-compile"])) == SamplerConfig()
    from d2c.commands import sample_main
    with pytest.raises(SystemExit):
        sample_main(["--help"])
    out = capsys.readouterr().out
    assert all("--" + k.replace("_", "-") in out for k in SAMPLER_KEYS)


# ------------------------------------------------------------------ no two ids, one sample
class _Reads(SamplerConfig):
    """A SamplerConfig that notes which settings the samplers read (not counting `check`)."""
    log: set = set()
    quiet = [False]

    def __getattribute__(self, name):
        if name in SAMPLER_KEYS and not _Reads.quiet[0]:
            _Reads.log.add(name)
        return object.__getattribute__(self, name)

    def check(self, *a, **k):
        _Reads.quiet[0] = True
        try:
            return SamplerConfig.check(self, *a, **k)
        finally:
            _Reads.quiet[0] = False


@pytest.fixture(scope="module")
def read_by_family():
    """The settings each family's sampler reads, sampling with tiny models (CFG on, so the guided
    settings are read)."""
    torch.manual_seed(0)
    gpt, vq, kl = d2c.build("gpt_tiny").eval(), d2c.build("vq_tiny").eval(), d2c.build("kl_tiny").eval()
    out = {}
    for fam in FAMILIES:
        models = {"gpt": gpt} if fam.has_stage1 else {}
        if fam.has_stage2:
            models.update(mar=d2c.build("mar_tiny", fusion=fam.fusion).eval(), kl=kl)
        else:
            models["vq"] = vq
        sampler = _Reads(steps=2, diffusion_steps=2, cfg=2.0)
        _Reads.log = set()
        d2c_sample(torch.arange(2), models, sampler)
        out[fam.name] = set(_Reads.log)
    return out


def test_every_axis_of_every_family_changes_the_cell_only_where_it_reaches_the_sampler(read_by_family):
    """For every family and every sampler axis: two values are two cells exactly when the
    family's sampler reads the setting; otherwise the setting resolves to null and the values
    are one cell.  (Precision and compile are read by every family.)"""
    from hydra import initialize_config_dir

    import d2c_harness as H
    H.register_configs()
    assert read_by_family["llamagen"] >= {"cfg", "stage1_top_k", "precision", "compile"}
    assert "temperature" not in read_by_family["llamagen"] and "stage1_top_p" not in read_by_family["mar"]
    with initialize_config_dir(config_dir=str(REPO / "ablations" / "conf"), version_base=None):
        for fam in FAMILIES:
            model = [f"model={fam.model}"] + ([f"fusion={fam.fusion}"] if fam.model == "d2c" else [])
            for k in SAMPLER_KEYS:
                value = str(OTHER[k]).lower() if isinstance(OTHER[k], bool) else OTHER[k]
                cells = H.plan([*TINY, *model, f"{k}=null,{value}" if SAMPLER_DEFAULTS[k] is None
                                else f"{k}={str(SAMPLER_DEFAULTS[k]).lower()},{value}"])
                reads = k in read_by_family[fam.name] or (k == "stage1_cfg" and fam.has_stage1)
                assert len(cells) == (2 if reads else 1), (fam.name, k, [c["config"][k] for c in cells])
                if not reads:
                    assert cells[0]["config"][k] is None, (fam.name, k)


def test_llamagen_temperature_sweep_is_one_cell_and_keeps_its_id(tmp_path):
    """The silent wrong result: `model=llamagen temperature=0.5,1.0` sampled the same images in two
    cells.  Stage 2's temperature does not apply to LlamaGen: one cell, with the id the cell at
    the default always had; stage 1's own temperature is an axis."""
    from hydra import initialize_config_dir

    import d2c_harness as H
    H.register_configs()
    with initialize_config_dir(config_dir=str(REPO / "ablations" / "conf"), version_base=None):
        cells = H.plan([*TINY, "model=llamagen", "temperature=0.5,1.0"])
        (cell,) = cells
        assert cell["config"]["temperature"] is None
        assert cell["cell_id"] == H.plan([*TINY, "model=llamagen"])[0]["cell_id"]
        # hashed as before the null (temperature 1.0, d2c_harness.resolved.LEGACY_IN_ID): the same id
        from d2c_harness.resolved import LEGACY_IN_ID
        assert LEGACY_IN_ID == {"temperature": 1.0}
        assert len(H.plan([*TINY, "model=llamagen", "stage1_temperature=0.5,1.0"])) == 2


def test_old_records_read_with_todays_names(tmp_path):
    """A record from before: the head's total under speed.diffusion_steps reads as reverse_steps;
    its LlamaGen config's stage-2 temperature reads as null; settings it predates read as their
    defaults, or null where its family does not run them."""
    from d2c.results import read_record
    rec = {"schema": 1, "cell_id": "abc", "status": "ok", "family": "llamagen",
           "config": {"model": "llamagen", "steps": None, "diffusion_steps": None, "cfg": 3.0, "temperature": 1.0},
           "speed": {"ar_steps": 64, "mar_steps": 0, "diffusion_steps": 0}}
    p = tmp_path / "abc.json"
    p.write_text(json.dumps(rec))
    got = read_record(p)
    assert got["speed"] == {"ar_steps": 64, "mar_steps": 0, "reverse_steps": 0}
    c = got["config"]
    assert c["temperature"] is None and c["head_sampler"] is None and c["cfg_schedule"] is None
    assert (c["stage1_temperature"], c["stage1_top_k"], c["stage1_top_p"], c["stage1_cfg"]) == (1.0, 0, 1.0, None)
    rec.update(family="mar", config={"model": "mar", "steps": 16, "cfg": 3.0, "temperature": 1.0},
               speed={"diffusion_steps": 1600})
    p.write_text(json.dumps(rec))
    got = read_record(p)
    assert got["speed"] == {"reverse_steps": 1600}
    assert got["config"]["head_sampler"] == "ddpm" and got["config"]["stage1_top_k"] is None


def test_a_sample_folder_from_before_is_the_same_sampler(tmp_path):
    """meta.json of a folder sampled before SamplerConfig named only some settings: the others ran
    at their defaults, so the folder is reused; a setting that differs is refused by name."""
    from d2c.evaluation import EvalError, _differs
    sampler = SamplerConfig(steps=2, cfg=2.0).for_family("mar")
    new = {"num_images": 4, "sample": {}}
    old = {"num_images": 4, "sample": {"steps": 2, "cfg": 2.0, "temperature": 1.0, "precision": "fp32",
                                       "diffusion_steps": None, "diffusion_steps_last": None,
                                       "head_sampler": "ddpm", "uncond_refresh": None}}
    assert _differs(old, new, sampler) is None
    assert _differs({**old, "sample": {**old["sample"], "head_sampler": "ddim"}}, new, sampler) == "sample.head_sampler"
    assert _differs({**old, "num_images": 8}, new, sampler) == "num_images"
    assert EvalError
