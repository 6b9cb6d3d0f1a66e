"""Training recipes: what each stage trains, for how long, on which data.

    small      the embedded default: the whole chain on a 2-core CPU in minutes
    tiny       the tests' seconds-long chain
    imagenet   MAR's and LlamaGen's published recipes, tokenizers from their public files

and the size fitting: a size preset (gpt_b, mar_large, ...) takes from the recipe's stage what
the data and the tokenizers fix (token grid, latent width, classes, vocabulary).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from d2c.config import Family, TrainConfig, make_config
from d2c.data.imagefolder import DataConfig

RECIPES = ("small", "tiny", "imagenet")
PAPER_RECIPES = ("imagenet",)   # tokenizers from public files, an image folder, the ADM metrics


def small_stages() -> dict:
    """The embedded default: sized so the whole chain trains on a 2-core CPU in minutes.

    Tokenizers: LDM's autoencoder betas (0.5, 0.9) and lr 1e-3 (2e-3 and 5e-3 learned slower).
    Stage 2: one plain-MAR trunk, then `mar.train_steps` more for each family (Pipeline.mar).
    The transformers train in fp32: at these widths (128) bf16 autocast made a CPU step 1.8x
    slower (GPT 0.40 vs 0.22 s, MAR 0.46 vs 0.25 s; batch 64, 2 cores), and the time saved buys
    twice the steps."""
    common = dict(warmup_steps=50, ema_decay=0.995, precision="auto", ckpt_every=200, log_every=20)
    tok = dict(train_steps=600, batch_size=32, lr=1e-3, betas=(0.5, 0.9), **common)
    fp32 = {**common, "precision": "fp32"}
    return {
        # spectral term: detail rFID 2.8 vs 3.4 without, high-pass energy kept 61% vs 54% (shapes v5)
        "kl": TrainConfig(stage="kl", preset="kl_small", spectral_weight=1.0, **tok),
        "vq": TrainConfig(stage="vq", preset="vq_small", **tok),
        "gpt": TrainConfig(stage="gpt", preset="gpt_small", train_steps=600, batch_size=64, lr=2e-3,
                           weight_decay=0.05, grad_clip=1.0, **fp32),
        "mar_trunk": TrainConfig(stage="mar", preset="mar_small", train_steps=450, batch_size=64, lr=2e-3, **fp32),
        "mar": TrainConfig(stage="mar", preset="mar_small", train_steps=150, batch_size=64, lr=1e-3,
                           **{**fp32, "warmup_steps": 10}),
    }


def tiny_stages() -> dict:
    common = dict(batch_size=16, train_steps=3, lr=1e-3, warmup_steps=1, ema_decay=0.5, progress=False,
                  tensorboard=False, precision="fp32", scale_batches=2, ckpt_every=5, log_every=5)
    return {"kl": TrainConfig(stage="kl", preset="kl_tiny", **common),
            "vq": TrainConfig(stage="vq", preset="vq_tiny", **common),
            "gpt": TrainConfig(stage="gpt", preset="gpt_tiny", **common),
            "mar": TrainConfig(stage="mar", preset="mar_tiny", **common)}


def imagenet_stages() -> dict:
    """The published recipes, in epochs (MAR: Li et al. 2024, arXiv 2406.11838, and its README;
    LlamaGen: Sun et al. 2024, arXiv 2406.06525).  Stage 2, MAR's: AdamW (0.9, 0.95),
    wd 0.02, lr 1e-4 x batch / 256 at MAR's global batch 2048 (64 a GPU on 32 GPUs in its README),
    100 warmup epochs then constant, clip 3.0, EMA 0.9999, bf16, 400 epochs.  Stage 1, LlamaGen's
    GPT: lr 1e-4 constant, wd 0.05, betas (0.9, 0.95), batch 256, clip 1.0, bf16, 300 epochs, no
    EMA (decay 0: the EMA copy is the weights).  Both presets carry the 0.1 label / token dropout."""
    common = dict(precision="bf16", ckpt_every=2000, log_every=100)
    return {"gpt": TrainConfig(stage="gpt", preset="gpt_b", batch_size=256, lr=1e-4, weight_decay=0.05,
                               grad_clip=1.0, ema_decay=0.0, train_epochs=300, warmup_epochs=0, **common),
            "mar": TrainConfig(stage="mar", preset="mar_base", batch_size=2048, lr=mar_lr(2048),
                               weight_decay=0.02, grad_clip=3.0, ema_decay=0.9999, train_epochs=400,
                               warmup_epochs=100, **common)}


def mar_lr(batch: int) -> float:
    """MAR's learning-rate rule: base 1e-4 per 256 images of global batch."""
    return 1e-4 * batch / 256


def recipe_stages(name: str) -> dict:
    return {"small": small_stages, "tiny": tiny_stages, "imagenet": imagenet_stages}[name]()


# ---------------------------------------------------------------------------- size fitting

# what a size preset (discrete_model, mar_model) takes from the recipe's stage: what the data and
# the tokenizers fix (token grid, latent width, classes, vocabulary); width, depth, head from the preset
SIZE_FIT = {"gpt": ("vocab_size", "block_size", "num_classes"),
            "mar": ("img_size", "vae_stride", "patch_size", "vae_embed_dim", "class_num")}


def sized_stage(stage: TrainConfig, preset: str | None) -> TrainConfig:
    """A recipe's GPT or MAR TrainConfig at the size `preset`, fitted to the recipe's data."""
    if not preset or preset == stage.preset:
        return stage
    base = make_config(stage.preset, **stage.overrides)
    fit = {k: getattr(base, k) for k in SIZE_FIT[stage.stage]}
    if stage.stage == "mar":   # the stage-1 vocabulary the fusion embeds
        fit["fusion"] = {**stage.overrides.get("fusion", {}), "codebook_size": base.fusion.codebook_size}
    return dataclasses.replace(stage, preset=preset, overrides={**stage.overrides, **fit})


def tokenizer_fit(kl_preset: str, vq_preset: str, image_size: int) -> dict:
    """At paper scale: what the tokenizer presets and the crop size fix in each stage (token grid,
    vocabulary, latent width); classes stay the presets' 1000."""
    kl, vq = make_config(kl_preset), make_config(vq_preset)
    return {"gpt": {"vocab_size": vq.codebook_size, "block_size": (image_size // vq.stride) ** 2},
            "mar": {"img_size": image_size, "vae_stride": kl.stride, "vae_embed_dim": kl.embed_dim,
                    "fusion": {"codebook_size": vq.codebook_size}}}


def fitted_stages(name: str, kl_preset: str | None = None, vq_preset: str | None = None,
                  image_size: int | None = None) -> dict:
    """The recipe's stages, fitted at paper scale to the tokenizer presets and the crop size."""
    stages = recipe_stages(name)
    if name in PAPER_RECIPES:
        for stage, fit in tokenizer_fit(kl_preset, vq_preset, image_size or 256).items():
            st = stages[stage]
            fusion = {**st.overrides.get("fusion", {}), **fit.pop("fusion", {})}
            stages[stage] = dataclasses.replace(
                st, overrides={**st.overrides, **fit, **({"fusion": fusion} if fusion else {})})
    return stages


# ---------------------------------------------------------------------------- a pipeline's recipe

@dataclass
class Pretrained:
    """A public tokenizer file, loaded instead of trained: MAR's `kl16.ckpt` (preset kl_16),
    LlamaGen's `vq_ds16_c2i.pt` (vq_16), or a file of the same layout."""
    preset: str
    path: str


@dataclass
class Recipe:
    """What d2c.pipeline.Pipeline trains or loads, stage by stage."""
    data: DataConfig = field(default_factory=DataConfig)
    stages: dict = field(default_factory=small_stages)
    pretrained: dict = field(default_factory=dict)   # "kl" / "vq" -> Pretrained (then no such stage trains)
    # "gpt" -> a public GPT file, stage 1 as it is (never trained); "mar" -> a public MAR file that
    # starts stage 2 (fusion modules new and zero-init), fine-tuned for the stage's epochs, or
    # used as it is at train_epochs=0
    init: dict = field(default_factory=dict)


def mar_config(recipe: Recipe, family: Family, stage: str = "mar") -> TrainConfig:
    """Stage-2 config of a family (from recipe stage `stage`, "mar" or "mar_trunk"): the
    family's fusion (none for MAR)."""
    base = recipe.stages[stage]
    fusion = {**base.overrides.get("fusion", {}), "kind": family.fusion}
    return dataclasses.replace(base, overrides={**base.overrides, "fusion": fusion})
