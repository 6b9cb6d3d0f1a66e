"""Samplers: one loop per model.  All are seeded through a `torch.Generator`, run on
whatever device the model lives on, and return uint8 images / tokens plus timings and NFEs.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

# ============================================================================ GPT (stage 1)
# (section owned by the GPT work: gpt_generate)

# ============================================================================ MAR (stage 2)
# (section owned by the MAR work: mar_sample)

# ============================================================================ D2C (both)
