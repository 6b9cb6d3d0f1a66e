"""Preset name -> model: the one place that maps a preset's kind to its class (imported lazily,
so naming a preset costs no model code)."""
from __future__ import annotations

from d2c.config import make_config, preset_kind


def model_class(kind: str):
    if kind == "vq":
        from d2c.tokenizers.vq import VQModel as cls
    elif kind == "kl":
        from d2c.tokenizers.kl import AutoencoderKL as cls
    elif kind == "gpt":
        from d2c.models.gpt import Transformer as cls
    elif kind == "mar":
        from d2c.models.mar import MAR as cls
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    return cls


def build(preset: str, **overrides):
    """Build a model from a preset name (see `d2c.config.PRESETS`), fields overridden by kwargs.

    `build("mar_base", fusion="qformer")` gives D2C with the MAR-B backbone.
    Build under `torch.device("meta")` to count parameters without memory.
    """
    config = make_config(preset, **overrides)
    return model_class(preset_kind(preset))(config)
