"""Stage 1, generate mode (SeqKD): the teacher's response to every training prompt, cached.

Like the logit cache, the folder is `<root>/<key>`, the key a hash of every ingredient that
decides the text (`GenerationIngredients`, kept readable in `meta.json`), so the same teacher,
prompts and settings always land in (and reuse) the same folder. Responses are appended to
`generations.jsonl` as they finish: a crash loses at most the batch in flight, and a re-run
generates only what is missing. `complete.json`, written last, marks a finished folder, which is
returned without building the teacher.

Decoding is greedy only, through `akd_cache.generation` (its docstring says what greedy and the
stops mean on both backends); greedy output does not depend on how prompts are batched, which is
what lets a resumed run end equal to an uninterrupted one.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from akd_cache import generation
from akd_cache.config import TeacherConfig
from akd_cache.data.instructions import Example
from akd_cache.data.templates import render_prompt
from akd_cache.errors import CacheError
from akd_cache.generation import DEFAULT_BATCH_SIZE, DEFAULT_STOPS, Decoding, TextGenerator
from akd_cache.store.key import hash_key, teacher_identity
from akd_cache.store.lock import WriterLock

FORMAT_VERSION = 1
GREEDY = "greedy"
DEFAULT_ROOT = "storage/teacher-generations"
DEFAULT_MAX_NEW_TOKENS = 512  # CacheConfig.max_length: anything longer is cut at training
GENERATIONS_FILE = "generations.jsonl"
META_FILE = "meta.json"
COMPLETE_FILE = "complete.json"
LOCK_NAME = "generate"


@dataclass(frozen=True)
class GenerationIngredients:
    """Everything that decides the generated text; batch sizes and backends do not."""

    teacher: str
    teacher_revision: str | None
    teacher_weights_sha256: str | None
    teacher_dtype: str
    tokenizer_sha256: str
    prompts_sha256: str
    n_samples: int
    template: str
    max_new_tokens: int
    stops: tuple[str, ...]
    decoding: str = GREEDY
    format_version: int = FORMAT_VERSION

    def key(self) -> str:
        return hash_key(asdict(self))


def prompts_sha256(examples: Sequence[Example], template: str) -> str:
    """Over sample ids and rendered prompts: the references (`output`) play no part."""
    digest = hashlib.sha256()
    for e in examples:
        prompt = render_prompt(template, e.instruction, e.input)
        digest.update(json.dumps([e.sample_id, prompt]).encode())
    return digest.hexdigest()


def make_generation_ingredients(
    *,
    teacher: TeacherConfig,
    teacher_path: str,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    template: str,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    stops: Sequence[str] = DEFAULT_STOPS,
) -> GenerationIngredients:
    return GenerationIngredients(
        **teacher_identity(teacher, teacher_path, tokenizer),
        prompts_sha256=prompts_sha256(examples, template),
        n_samples=len(examples),
        template=template,
        max_new_tokens=max_new_tokens,
        stops=tuple(stops),
    )


def generations_location(key: str, root: str = DEFAULT_ROOT) -> Path:
    return Path(root) / key


def generator_factory(
    teacher: TeacherConfig, teacher_path: str, batch_size: int = DEFAULT_BATCH_SIZE
) -> Callable[[], TextGenerator]:
    """The backend `teacher.backend` names, on the teacher's device, dtype and memory share,
    built only when called."""
    return generation.generator_factory(
        teacher_path, teacher.backend, dtype=teacher.dtype, device=teacher.device,
        memory_utilization=teacher.vllm_memory_utilization, revision=teacher.revision,
        batch_size=batch_size,
    )


# --- the cache folder -----------------------------------------------------------------------


class GenerationCacheError(CacheError):
    pass


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    tmp.replace(path)


def _check_or_init_meta(folder: Path, ingredients: GenerationIngredients) -> None:
    meta = folder / META_FILE
    if meta.exists():
        found = json.loads(meta.read_text())["key"]
        if found != ingredients.key():
            raise GenerationCacheError(
                f"{folder}: holds generations {found}, not {ingredients.key()}; a location is "
                "tied to its key; move that folder away or change generate.root"
            )
        return
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(meta, {"key": ingredients.key(), "ingredients": asdict(ingredients)})


def _parse_lines(data: bytes) -> tuple[list[dict], int]:
    """The records of the complete lines, and where they end. Split on b"\n" only: a response
    may hold other line breaks (U+2028, U+0085), which JSON leaves unescaped."""
    end = data.rfind(b"\n") + 1
    return [json.loads(line) for line in data[:end].split(b"\n")[:-1]], end


def _resume_records(path: Path) -> list[dict]:
    """The records so far; a last line cut short by a crash is removed from the file, so that
    the next append starts on a fresh line."""
    if not path.exists():
        return []
    data = path.read_bytes()
    records, end = _parse_lines(data)
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    return records


def generate_responses(
    location: str | Path,
    examples: Sequence[Example],
    ingredients: GenerationIngredients,
    backend: Callable[[], TextGenerator],
    break_lock: bool = False,
) -> Path:
    """Fill `location` with the teacher's response to every example, resuming what is there.

    `backend` is a factory, called only when something is left to generate, so a complete
    folder never loads the teacher. Returns the folder.
    """
    folder = Path(location)
    if ingredients.prompts_sha256 != prompts_sha256(examples, ingredients.template):
        raise ValueError("the ingredients were made for other examples or another template")
    _check_or_init_meta(folder, ingredients)
    if (folder / COMPLETE_FILE).exists():
        return folder
    path = folder / GENERATIONS_FILE
    with WriterLock(str(folder), LOCK_NAME, break_lock):
        done = {r["sample_id"] for r in _resume_records(path)}
        todo = [e for e in examples if e.sample_id not in done]
        if todo:
            _generate_into(path, todo, ingredients, backend())
        records = _resume_records(path)
        _write_json(folder / COMPLETE_FILE, {
            "n_samples": len(records),
            "n_truncated": sum(r["truncated"] for r in records),
            "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        })
    return folder


def _generate_into(
    path: Path, todo: list[Example], ingredients: GenerationIngredients,
    teacher: TextGenerator,
) -> None:
    prompts = [render_prompt(ingredients.template, e.instruction, e.input) for e in todo]
    responses = teacher.complete(prompts, Decoding(ingredients.max_new_tokens, ingredients.stops))
    try:
        with open(path, "a", encoding="utf-8") as out:
            for index, response in tqdm(
                responses, total=len(todo), desc="teacher generate", unit="sample"
            ):
                e = todo[index]
                record = {"sample_id": e.sample_id, "instruction": e.instruction,
                          "input": e.input, "output": response.text,
                          "truncated": response.truncated}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                out.flush()
    finally:
        close = getattr(teacher, "close", None)  # engines with processes to shut down
        if close is not None:
            close()


def _read_records(location: str | Path, allow_incomplete: bool) -> list[dict]:
    folder = Path(location)
    if not (folder / META_FILE).exists():
        raise GenerationCacheError(f"{folder}: no teacher generations there")
    if not (folder / COMPLETE_FILE).exists() and not allow_incomplete:
        raise GenerationCacheError(
            f"{folder}: incomplete generations; resume the generate stage, or pass "
            "allow_incomplete=True"
        )
    path = folder / GENERATIONS_FILE
    return _parse_lines(path.read_bytes())[0] if path.exists() else []


def read_generations(location: str | Path, allow_incomplete: bool = False) -> list[Example]:
    """The generated responses as examples (`output` = the teacher's text), by sample_id."""
    fields = ("sample_id", "instruction", "input", "output")
    records = _read_records(location, allow_incomplete)
    return sorted((Example(**{f: r[f] for f in fields}) for r in records),
                  key=lambda e: e.sample_id)


def truncated_sample_ids(location: str | Path, allow_incomplete: bool = False) -> set[str]:
    """The samples whose response ran out of max_new_tokens: it never ended."""
    return {r["sample_id"] for r in _read_records(location, allow_incomplete) if r["truncated"]}
