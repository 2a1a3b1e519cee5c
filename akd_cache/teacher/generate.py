"""Stage 1, generate mode (SeqKD): the teacher's response to every training prompt, cached.

Like the logit cache, the folder is `<root>/<key>`, the key a hash of every ingredient that
decides the text (`GenerationIngredients`), so the same teacher, prompts and settings always land
in (and reuse) the same folder (its layout: `akd_cache.store.generations`). Responses are
appended as they finish: a crash loses at most the batch in flight, and a re-run generates only
what is missing. A complete folder is returned without building the teacher.

Decoding is greedy only, through `akd_cache.generation` (its docstring says what greedy and the
stops mean on both backends); greedy output does not depend on how prompts are batched, which is
what lets a resumed run end equal to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from akd_cache import generation
from akd_cache.config import TeacherConfig
from akd_cache.data.instructions import Example
from akd_cache.data.templates import render_prompt
from akd_cache.generation import DEFAULT_BATCH_SIZE, DEFAULT_STOPS, Decoding, TextGenerator
from akd_cache.store import generations
from akd_cache.store.key import hash_key
from akd_cache.teacher.identity import teacher_identity

FORMAT_VERSION = 1
GREEDY = "greedy"


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
    max_new_tokens: int,
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


def generator_factory(
    teacher: TeacherConfig, teacher_path: str, batch_size: int = DEFAULT_BATCH_SIZE
) -> Callable[[], TextGenerator]:
    """The backend `teacher.backend` names, on the teacher's device, dtype and memory share,
    built only when called."""
    return generation.generator_factory(
        teacher_path, teacher.backend, dtype=teacher.dtype, device=teacher.device,
        device_setting="teacher.device",
        memory_utilization=teacher.vllm_memory_utilization, revision=teacher.revision,
        batch_size=batch_size,
    )


# --- filling the folder (its I/O: akd_cache.store.generations) -----------------------------


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
    generations.check_or_init(folder, ingredients.key(), asdict(ingredients))
    if generations.is_complete(folder):
        return folder
    with generations.writer_lock(folder, break_lock):
        done = {g.sample_id for g in generations.read_so_far(folder)}
        todo = [e for e in examples if e.sample_id not in done]
        if todo:
            _generate_into(folder, todo, ingredients, backend())
        generations.mark_complete(folder)
    return folder


def _generate_into(
    folder: Path, todo: list[Example], ingredients: GenerationIngredients,
    teacher: TextGenerator,
) -> None:
    prompts = [render_prompt(ingredients.template, e.instruction, e.input) for e in todo]
    responses = teacher.complete(prompts, Decoding(ingredients.max_new_tokens, ingredients.stops))

    def finished() -> Iterator[generations.Generation]:
        for index, response in tqdm(
            responses, total=len(todo), desc="teacher generate", unit="sample"
        ):
            e = todo[index]
            yield generations.Generation(e.sample_id, e.instruction, e.input, response.text,
                                         response.truncated)

    try:
        generations.append(folder, finished())
    finally:
        generation.shut_down(teacher)
