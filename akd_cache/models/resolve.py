"""Model references from the params, checked before any stage spends time on them.

A reference (`teacher.model`, `student.model`) is read by this rule:

1. `embedded:<name>`: the folder the `models` stage converts that model into, under
   storage/models; it must exist (run `akd models`).
2. An existing folder: a local model, whatever its spelling; it must hold a `config.json`.
3. A valid hub id (`name` or `org/name`, the hub's own rule): a model on the Hugging Face hub.
   It is accepted when the local hub cache holds it; otherwise the hub is asked once, so a
   missing or misspelt id (or a relative path such as `models/missing` that is not there) is
   reported at once instead of after the loaders' retries.
4. Anything else (`/abs`, `./rel`, `~/x`, `a/b/c`, ...) is a local path that does not exist.

Each case raises a one-line error naming the setting when the model is not there.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi, constants, try_to_load_from_cache
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    HTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from akd_cache.errors import ConfigError, ModelNotFoundError
from akd_cache.models.smollm2 import EMBEDDED_ID

MODELS_DIR = Path("storage/models")
EMBEDDED_FOLDERS = {EMBEDDED_ID: "smollm2-135m-instruct"}
EMBEDDED_PREFIX = "embedded:"
HUB_TIMEOUT_S = 10.0


def embedded_folder(ref: str, setting: str, models_dir: Path = MODELS_DIR) -> Path:
    """Where the `models` stage puts the embedded model `ref`."""
    if ref not in EMBEDDED_FOLDERS:
        raise ConfigError(f"{setting}: unknown embedded model {ref!r}; known: "
                          f"{', '.join(sorted(EMBEDDED_FOLDERS))}")
    return models_dir / EMBEDDED_FOLDERS[ref]


def _is_hub_id(ref: str) -> bool:
    try:
        validate_repo_id(ref)
    except HFValidationError:
        return False
    return True


def _check_on_hub(ref: str, setting: str, revision: str | None) -> None:
    if isinstance(try_to_load_from_cache(ref, "config.json", revision=revision), str):
        return
    missing = f"{setting}: {ref!r} is neither a local folder nor"
    if constants.HF_HUB_OFFLINE:
        raise ModelNotFoundError(f"{missing} a model in the local hub cache (HF_HUB_OFFLINE is "
                                 "set); fix the setting or download the model first")
    try:
        HfApi().model_info(ref, revision=revision, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return  # it exists; loading it reports the access the user still needs
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"{setting}: the hub model {ref!r} has no revision "
                                 f"{revision!r}; fix the revision setting") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{missing} a model on the hub; fix the setting (a local "
                                 "path must exist)") from None
    except HfHubHTTPError:
        return  # the hub answered but not with a verdict; loading reports the hub's own error
    except HTTPError as err:
        raise ModelNotFoundError(f"{missing} a model in the local hub cache, and the hub "
                                 f"could not be reached to look for it ({err}); fix the setting "
                                 "or the network") from None


def resolve_model(
    ref: str, setting: str, revision: str | None = None, models_dir: Path = MODELS_DIR
) -> str:
    """The local folder or hub id a stage loads for `ref`; a model that is not there raises a
    one-line error naming `setting` (see the module docstring for the rule)."""
    if ref.startswith(EMBEDDED_PREFIX):
        folder = embedded_folder(ref, setting, models_dir)
        if not folder.is_dir():
            raise ModelNotFoundError(f"{setting}: {ref} is not converted yet ({folder} is "
                                     "missing); run `akd models` first")
        return str(folder)
    local = str(Path(ref).expanduser()) if ref.startswith("~") else ref
    if Path(local).is_dir():
        if not (Path(local) / constants.CONFIG_NAME).is_file():
            raise ModelNotFoundError(f"{setting}: {ref!r} is a folder without a "
                                     f"{constants.CONFIG_NAME}, so no model transformers can "
                                     "load; fix the path")
        return local
    if not _is_hub_id(ref):
        raise ModelNotFoundError(f"{setting}: {ref!r} is neither a local folder nor a hub id "
                                 "(`name` or `org/name`); fix the path")
    _check_on_hub(ref, setting, revision)
    return ref
