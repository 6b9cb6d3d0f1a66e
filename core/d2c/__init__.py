"""d2c: discrete-to-continuous two-stage image generation, with MAR and LlamaGen baselines."""
from __future__ import annotations

import importlib

from d2c.config import PRESETS
from d2c.errors import MissingExtra
from d2c.registry import build

__all__ = ["build", "load_pretrained", "PRESETS", "MissingExtra", "require"]


def require(module: str, needed_for: str, extra: str = "harness"):
    """Import `module`, or raise MissingExtra naming the extra that installs it: the core package
    (`pip install .`) samples and trains; metrics, TensorBoard logs and the harness need
    `pip install 'd2c[harness]'`."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtra(f"{needed_for} needs {module.split('.')[0]} ({e.name or module} is not installed): "
                           f"pip install -c constraints.txt 'd2c[{extra}]'") from None


def load_pretrained(preset: str, path, strict: bool = True, new: tuple = (), **overrides):
    """Build `preset` and load a public checkpoint file (LlamaGen, MAR, KL-16, VQ-16) or our own
    safetensors.  Refuses pickled code; a key mismatch is one error naming the keys.  `new`:
    prefixes of modules the file may lack, which keep their init (`("fusion.",)`: a MAR file
    into D2C, whose zero-init fusion makes it sample as that MAR); everything else strict."""
    from d2c.checkpoint import load_state_dict_file, load_into

    model = build(preset, **overrides)
    load_into(model, load_state_dict_file(path), strict=strict, source=str(path), new=new)
    return model
