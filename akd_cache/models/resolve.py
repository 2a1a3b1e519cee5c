"""Model references: hub ids and local paths pass through; `embedded:` names map into storage/."""

from __future__ import annotations

from pathlib import Path

from akd_cache.models.smollm2 import EMBEDDED_ID

MODELS_DIR = Path("storage/models")
EMBEDDED_FOLDERS = {EMBEDDED_ID: "smollm2-135m-instruct"}


def resolve_model(ref: str, models_dir: Path = MODELS_DIR) -> str:
    if ref.startswith("embedded:"):
        if ref not in EMBEDDED_FOLDERS:
            raise ValueError(f"unknown embedded model {ref!r}; known: {sorted(EMBEDDED_FOLDERS)}")
        return str(models_dir / EMBEDDED_FOLDERS[ref])
    return ref
