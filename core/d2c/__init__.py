"""d2c: discrete-to-continuous two-stage image generation, with MAR and LlamaGen baselines."""
from __future__ import annotations

import importlib

from d2c.config import PRESETS, make_config, preset_kind

__all__ = ["build", "load_pretrained", "PRESETS", "MissingExtra", "require"]


class MissingExtra(ImportError):
    """A package of an optional extra is not installed; the message is one line naming it."""


def require(module: str, needed_for: str, extra: str = "harness"):
    """Import `module`, or raise MissingExtra naming the extra that installs it: the core package
    (`pip install .`) samples and trains; metrics, TensorBoard logs and the harness need
    `pip install 'd2c[harness]'`."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtra(f"{needed_for} needs {module.split('.')[0]} ({e.name or module} is not installed): "
                           f"pip install -c constraints.txt 'd2c[{extra}]'") from None


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


def load_pretrained(preset: str, path, strict: bool = True, new: tuple = (), **overrides):
    """Build `preset` and load a public checkpoint file (LlamaGen, MAR, KL-16, VQ-16) or our own
    safetensors.  Refuses pickled code; a key mismatch is one error naming the keys.  `new`:
    prefixes of modules the file may lack, which keep their init (`("fusion.",)`: a MAR file
    into D2C, whose zero-init fusion makes it sample as that MAR); everything else strict."""
    from d2c.checkpoint import load_state_dict_file, load_into

    model = build(preset, **overrides)
    load_into(model, load_state_dict_file(path), strict=strict, source=str(path), new=new)
    return model
