"""Typed configs for every component, and the size presets.

Field names follow the public code (LlamaGen `ModelArgs`, MAR `MAR.__init__`, LDM
`ddconfig`) so that a reader can hold our presets against theirs.  Published presets
reproduce the exact parameter counts in docs/design.md section 3; the `*_tiny` presets are
for tests and CPU laptops (32x32 images, 8x8 token grids).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class VQConfig:
    """LlamaGen VQ-16 (`tokenizer/tokenizer_image/vq_model.py`)."""
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True      # cosine VQ: codes and queries are L2-normalised
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    z_channels: int = 256
    ch: int = 128
    ch_mult: tuple = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    dropout: float = 0.0
    image_size: int = 256

    @property
    def stride(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass
class KLConfig:
    """MAR KL-16 (LDM AutoencoderKL, `models/vae.py` in LTH14/mar)."""
    embed_dim: int = 16
    z_channels: int = 16
    ch: int = 128
    ch_mult: tuple = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    dropout: float = 0.0
    image_size: int = 256
    scale: float = 0.2325              # latent = posterior sample * scale (MAR)
    init_logvar: float = 0.0           # initial posterior log-variance (bias of the logvar half of quant_conv)

    @property
    def stride(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass
class GPTConfig:
    """LlamaGen class-conditional GPT (`autoregressive/models/gpt.py`, ModelArgs)."""
    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: Optional[int] = None
    multiple_of: int = 256             # SwiGLU hidden = multiple_of-rounded 8*dim/3
    ffn_dim_multiplier: Optional[float] = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    num_classes: int = 1000            # class table has num_classes + 1 rows; the last is null
    class_dropout_prob: float = 0.1
    vocab_size: int = 16384
    cls_token_num: int = 1
    block_size: int = 256              # image tokens (16x16 grid at 256px)


@dataclass
class FusionConfig:
    """How stage 2 sees the discrete tokens (docs/design.md section 4)."""
    kind: str = "none"                 # none | cross_attn | qformer
    codebook_size: int = 16384         # size of the stage-1 vocabulary (plus one null code row)
    d_fuse: int = 768                  # width of the discrete-token embeddings
    num_heads: int = 8
    layers: Optional[tuple] = None     # cross_attn: decoder block indices; None = all
    num_queries: int = 64              # qformer: learned queries (<= MAR buffer_size)
    depth: int = 2                     # qformer: blocks of self-attn + cross-attn + MLP
    mlp_ratio: float = 4.0

    KINDS = ("none", "cross_attn", "qformer")


FUSIONS = FusionConfig.KINDS
MODELS = ("d2c", "mar", "llamagen")


@dataclass(frozen=True)
class Family:
    """What a result compares: stage 1 alone (llamagen), stage 2 alone (mar: fusion none), or
    both (d2c, with a fusion).  Records and tables carry `name`; code passes the value."""
    model: str
    fusion: str = "none"

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"model={self.model!r}; allowed: {', '.join(MODELS)}")
        if (self.model == "d2c") != (self.fusion != "none") or self.fusion not in FUSIONS:
            raise ValueError(f"model={self.model} fusion={self.fusion!r}; allowed: d2c with "
                             f"{' or '.join(FUSIONS[1:])}, mar and llamagen with none")

    @property
    def name(self) -> str:
        return self.model if self.model != "d2c" else f"d2c_{self.fusion}"

    @property
    def has_stage1(self) -> bool:
        return self.model != "mar"

    @property
    def has_stage2(self) -> bool:
        return self.model != "llamagen"

    @staticmethod
    def named(name: str) -> "Family":
        """The family a record or table calls `name`."""
        by_name = {f.name: f for f in FAMILIES}
        if name not in by_name:
            raise ValueError(f"family={name!r}; allowed: {', '.join(by_name)}")
        return by_name[name]


FAMILIES = (Family("llamagen"), Family("mar"), Family("d2c", "cross_attn"), Family("d2c", "qformer"))
FAMILY_NAMES = tuple(f.name for f in FAMILIES)


@dataclass
class MARConfig:
    """MAR (`models/mar.py` in LTH14/mar) plus our fusion module."""
    img_size: int = 256
    vae_stride: int = 16
    patch_size: int = 1
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    decoder_embed_dim: int = 768
    decoder_depth: int = 12
    decoder_num_heads: int = 12
    mlp_ratio: float = 4.0
    vae_embed_dim: int = 16
    mask_ratio_min: float = 0.7
    label_drop_prob: float = 0.1
    class_num: int = 1000
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    buffer_size: int = 64
    diffloss_d: int = 6
    diffloss_w: int = 1024
    diffusion_steps: int = 100         # respaced DDPM steps at sampling time
    diffusion_batch_mul: int = 4
    clip_x0: Optional[float] = None    # sampling: bound on the head's pred_x0 (None = MAR, unclipped)
    grad_checkpointing: bool = False
    fusion: FusionConfig = field(default_factory=FusionConfig)

    @property
    def seq_h(self) -> int:
        return self.img_size // self.vae_stride // self.patch_size

    @property
    def seq_len(self) -> int:
        return self.seq_h * self.seq_h

    @property
    def token_embed_dim(self) -> int:
        return self.vae_embed_dim * self.patch_size ** 2


@dataclass
class TrainConfig:
    """One training run of one stage.  Defaults are MAR's recipe (docs/design.md section 3);
    `lr` is absolute (MAR: blr 1e-4 x batch/256)."""
    stage: str = "mar"                 # kl | vq | gpt | mar
    preset: str = "mar_tiny"
    overrides: dict = field(default_factory=dict)   # model config fields, as d2c.build takes them
    batch_size: int = 64               # global batch of one optimizer step: ranks x accum_steps x micro-batch
    accum_steps: int = 1               # micro-batches per rank and step (gradients summed, then one update)
    train_steps: int = 1000            # optimizer steps
    lr: float = 1e-4
    warmup_steps: int = 100
    # the published recipes count epochs (an epoch: len(data) // batch_size steps, drop_last, the
    # order of d2c.data.batches.batch_indices); set, they replace train_steps / warmup_steps
    # (in_steps) once the dataset's size is known
    train_epochs: Optional[float] = None
    warmup_epochs: Optional[float] = None
    schedule: str = "constant"         # constant | cosine (after warmup)
    min_lr: float = 0.0
    weight_decay: float = 0.02
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 3.0
    ema_decay: float = 0.9999
    precision: str = "auto"            # auto (bf16 where supported) | bf16 | fp32
    grad_checkpointing: bool = False
    seed: int = 0
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 25
    tensorboard: bool = True
    progress: bool = True
    kl_weight: float = 1e-6            # kl stage: LDM's KL weight on the posterior
    spectral_weight: float = 0.0       # kl stage: + this x L1 of the FFT amplitudes (d2c.train.stage_loss)
    scale_batches: int = 8             # kl stage: batches used to fit the latent scale
    # A non-finite loss or gradient norm: "stop" checkpoints the last good state (the bad update
    # is never applied) and raises d2c.errors.NonFiniteLoss naming the step; "skip" drops that
    # batch (no optimizer or EMA update), counts it, and stops only after this many in a row.
    on_nonfinite: str = "stop"         # stop | skip
    max_consecutive_skips: int = 10

    STAGES = ("kl", "vq", "gpt", "mar")
    # how a step is computed, not what it computes (accum_steps=k repeats k ranks, and no key names
    # the ranks either): left out of the stage folders' and records' train keys, so it never retrains
    NOT_HASHED = ("accum_steps",)
    # the same: activations recomputed in backward (the RNG state restored, so dropout repeats);
    # hashed at its default, so that switching it on for MAR-L/H never retrains a stage
    HASHED_AT_DEFAULT = ("grad_checkpointing",)
    # fields added after stage folders existed: at None they stay out of the key (no stage retrains)
    HASHED_IF_SET = ("train_epochs", "warmup_epochs")
    SCHEDULES = ("constant", "cosine")
    PRECISIONS = ("auto", "bf16", "fp32")
    ON_NONFINITE = ("stop", "skip")

    def identity(self) -> dict:
        """The fields that name a training run (what the stage keys hash)."""
        out = {k: v for k, v in dataclasses.asdict(self).items()
               if k not in self.NOT_HASHED and not (k in self.HASHED_IF_SET and v is None)}
        out.update({k: TrainConfig.__dataclass_fields__[k].default for k in self.HASHED_AT_DEFAULT})
        return out

    def in_steps(self, num_items: int) -> "TrainConfig":
        """train_epochs / warmup_epochs over `num_items` samples, as optimizer steps."""
        if self.train_epochs is None and self.warmup_epochs is None:
            return self
        if self.train_epochs == 0:
            raise ValueError(f"train_epochs=0 for stage {self.stage}: it would train nothing; only a stage "
                             f"that starts from a public file (init.mar) uses its weights as they are")
        per_epoch = num_items // self.batch_size
        if per_epoch < 1:
            raise ValueError(f"batch_size={self.batch_size} is larger than the dataset ({num_items} items)")
        steps = {}
        if self.train_epochs is not None:
            steps["train_steps"] = max(1, round(self.train_epochs * per_epoch))
        if self.warmup_epochs is not None:
            steps["warmup_steps"] = round(self.warmup_epochs * per_epoch)
        return dataclasses.replace(self, **steps)


# --------------------------------------------------------------------------- presets
# Published sizes: docs/design.md section 3 (counts measured from the public code).
PRESETS: dict[str, object] = {
    "vq_16": VQConfig(),
    "kl_16": KLConfig(),
    "gpt_b": GPTConfig(dim=768, n_layer=12, n_head=12),
    "gpt_l": GPTConfig(dim=1024, n_layer=24, n_head=16),
    "gpt_xl": GPTConfig(dim=1280, n_layer=36, n_head=20),
    "mar_base": MARConfig(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                          decoder_embed_dim=768, decoder_depth=12, decoder_num_heads=12,
                          diffloss_d=6, diffloss_w=1024),
    "mar_large": MARConfig(encoder_embed_dim=1024, encoder_depth=16, encoder_num_heads=16,
                           decoder_embed_dim=1024, decoder_depth=16, decoder_num_heads=16,
                           diffloss_d=8, diffloss_w=1280),
    "mar_huge": MARConfig(encoder_embed_dim=1280, encoder_depth=20, encoder_num_heads=16,
                          decoder_embed_dim=1280, decoder_depth=20, decoder_num_heads=16,
                          diffloss_d=12, diffloss_w=1536),
    # Tiny presets: 32x32 RGB images, stride-4 tokenizers -> 8x8 = 64 tokens.
    "vq_tiny": VQConfig(codebook_size=512, codebook_embed_dim=8, z_channels=32, ch=32,
                        ch_mult=(1, 2, 4), num_res_blocks=1, image_size=32),
    "kl_tiny": KLConfig(embed_dim=4, z_channels=4, ch=32, ch_mult=(1, 2, 4), num_res_blocks=1,
                        image_size=32, scale=1.0),
    "gpt_tiny": GPTConfig(dim=64, n_layer=2, n_head=4, multiple_of=32, vocab_size=512,
                          num_classes=10, block_size=64),
    "mar_tiny": MARConfig(img_size=32, vae_stride=4, encoder_embed_dim=64, encoder_depth=2,
                          encoder_num_heads=4, decoder_embed_dim=64, decoder_depth=2,
                          decoder_num_heads=4, vae_embed_dim=4, class_num=10, buffer_size=8,
                          diffloss_d=2, diffloss_w=64, diffusion_steps=20,
                          fusion=FusionConfig(codebook_size=512, d_fuse=64, num_heads=4,
                                              num_queries=8, depth=1)),
    # Embedded-default presets: the sizes the CPU recipe (d2c.pipeline) trains in minutes.
    "kl_small": KLConfig(embed_dim=4, z_channels=4, ch=16, ch_mult=(1, 2, 4), num_res_blocks=1,
                         image_size=32, scale=1.0, init_logvar=-6.0),
    # entropy loss: without it 400 steps used 10 of 256 codes (1.5 nats); with 0.1 all 256 (5.5)
    "vq_small": VQConfig(codebook_size=256, codebook_embed_dim=8, z_channels=16, ch=16,
                         ch_mult=(1, 2, 4), num_res_blocks=1, image_size=32, entropy_loss_ratio=0.1),
    "gpt_small": GPTConfig(dim=128, n_layer=4, n_head=4, multiple_of=64, vocab_size=256,
                           num_classes=10, block_size=64),
    "mar_small": MARConfig(img_size=32, vae_stride=4, encoder_embed_dim=128, encoder_depth=3,
                           encoder_num_heads=4, decoder_embed_dim=128, decoder_depth=3,
                           decoder_num_heads=4, vae_embed_dim=4, class_num=10, buffer_size=16,
                           attn_dropout=0.0, proj_dropout=0.0, diffloss_d=3, diffloss_w=128,
                           diffusion_steps=50, diffusion_batch_mul=1,  # CPU budget: head is 2/3 of a step
                           clip_x0=5.0,   # latents are unit-std; unclipped, a 400-step head diverges
                           fusion=FusionConfig(codebook_size=256, d_fuse=128, num_heads=4,
                                               num_queries=16, depth=2)),
}


def preset_kind(name: str) -> str:
    config = PRESETS[name]
    return {VQConfig: "vq", KLConfig: "kl", GPTConfig: "gpt", MARConfig: "mar"}[type(config)]


def make_config(preset: str, **overrides):
    """Copy of a preset with fields replaced; `fusion` may be a kind name or a dict."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; allowed: {', '.join(sorted(PRESETS))}")
    config = PRESETS[preset]
    names = {f.name for f in dataclasses.fields(config)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise ValueError(f"{preset}: unknown field(s) {bad}; allowed: {', '.join(sorted(names))}")
    if "fusion" in overrides and isinstance(config, MARConfig):
        fu = overrides["fusion"]
        if isinstance(fu, str):
            fu = dataclasses.replace(config.fusion, kind=fu)
        elif isinstance(fu, dict):
            fu = dataclasses.replace(config.fusion, **fu)
        overrides["fusion"] = fu
    config = dataclasses.replace(config, **overrides)
    validate(config)
    return config


def validate(config) -> None:
    """Fail early with one line naming the field and what is allowed."""
    if isinstance(config, TrainConfig):
        for name, allowed in (("stage", config.STAGES), ("schedule", config.SCHEDULES), ("precision", config.PRECISIONS),
                              ("on_nonfinite", config.ON_NONFINITE)):
            if getattr(config, name) not in allowed:
                raise ValueError(f"{name}={getattr(config, name)!r}; allowed: {', '.join(allowed)}")
        if config.preset not in PRESETS or preset_kind(config.preset) != config.stage:
            ok = [p for p in PRESETS if preset_kind(p) == config.stage]
            raise ValueError(f"preset={config.preset!r} for stage {config.stage}; allowed: {', '.join(ok)}")
        for name in ("batch_size", "train_steps", "max_consecutive_skips", "accum_steps"):
            if getattr(config, name) < 1:
                raise ValueError(f"{name}={getattr(config, name)}; allowed: integers >= 1")
        for name in ("train_epochs", "warmup_epochs"):
            v = getattr(config, name)
            if v is not None and not v >= 0:
                raise ValueError(f"{name}={v}; allowed: numbers >= 0 or None")
    if isinstance(config, MARConfig):
        fu = config.fusion
        if fu.kind not in FusionConfig.KINDS:
            raise ValueError(f"fusion.kind={fu.kind!r}; allowed: {', '.join(FusionConfig.KINDS)}")
        if fu.kind != "none" and fu.d_fuse % fu.num_heads:
            raise ValueError(f"fusion.d_fuse={fu.d_fuse}; allowed: multiples of fusion.num_heads={fu.num_heads}")
        if fu.kind == "qformer" and fu.depth < 1:
            raise ValueError(f"fusion.depth={fu.depth}; allowed: integers >= 1")
        if fu.kind == "qformer" and not 0 < fu.num_queries <= config.buffer_size:
            raise ValueError(f"fusion.num_queries={fu.num_queries}; allowed: 1..buffer_size={config.buffer_size}")
        if fu.kind == "cross_attn" and fu.layers is not None:
            bad = [i for i in fu.layers if not 0 <= i < config.decoder_depth]
            if bad:
                raise ValueError(f"fusion.layers={list(fu.layers)}; allowed: indices in 0..{config.decoder_depth - 1}")
        if config.img_size % (config.vae_stride * config.patch_size):
            raise ValueError(f"img_size={config.img_size} must be divisible by vae_stride*patch_size")
    if isinstance(config, GPTConfig) and config.dim % config.n_head:
        raise ValueError(f"dim={config.dim} must be divisible by n_head={config.n_head}")
