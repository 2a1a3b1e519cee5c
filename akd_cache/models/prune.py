"""The demo student: the teacher with a subset of its decoder layers, evenly spaced.

Keeping the first and last layer and spacing the rest evenly gives a student that still writes
tokens (its embeddings, final norm and lm head are the teacher's) but has lost most of the
teacher's skill, which is the gap distillation is meant to close.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from akd_cache.errors import ConfigError, ModelError

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer")


def evenly_spaced(total: int, keep: int) -> list[int]:
    if not 0 < keep <= total:
        raise ConfigError(f"cannot keep {keep} of {total} layers (student.keep_teacher_layers)")
    return sorted({int(i) for i in np.linspace(0, total - 1, keep).round()})


def _layer_list(model: PreTrainedModel) -> torch.nn.ModuleList:
    base = model.base_model
    for name in ("layers", "h"):
        if isinstance(getattr(base, name, None), torch.nn.ModuleList):
            return getattr(base, name)
    raise ModelError(f"{type(model).__name__}: no decoder layer list (layers or h) found")


def keep_layers(model: PreTrainedModel, keep: int) -> PreTrainedModel:
    layers = _layer_list(model)
    chosen = evenly_spaced(len(layers), keep)
    kept = torch.nn.ModuleList(layers[i] for i in chosen)
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    base = model.base_model
    setattr(base, "layers" if hasattr(base, "layers") else "h", kept)
    for key in LAYER_COUNT_KEYS:
        if hasattr(model.config, key):
            setattr(model.config, key, len(kept))
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in chosen]
    return model


def save_pruned_student(teacher: str, out: Path, keep: int, revision: str | None = None) -> Path:
    """The student built from the teacher at `revision`: the one that built the cache."""
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32, revision=revision)
    keep_layers(model, keep).save_pretrained(out)
    AutoTokenizer.from_pretrained(teacher, revision=revision).save_pretrained(out)
    return out
