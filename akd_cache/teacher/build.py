"""Stage 1 as library calls: tokenise the training split, name the cache, fill it.

The cache location is `<root>/<key>`, the key a hash of every ingredient, so the same teacher,
data, template and settings always land in (and reuse) the same folder. `build_cache` is the
whole sequence; `akd cache-teacher` and the template analysis both call it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from akd_cache.config import CacheConfig, DataConfig, TeacherConfig
from akd_cache.data.instructions import DroppedRow, Example
from akd_cache.data.tokenize import tokenize_split
from akd_cache.devices import require_device
from akd_cache.errors import CacheError, DataError
from akd_cache.models.resolve import resolve_model
from akd_cache.models.vocab import check_top_k, model_vocab_size
from akd_cache.store.key import CacheIngredients, samples_sha256
from akd_cache.store.rows import TeacherBackend, TokenizedSample
from akd_cache.store.writer import fill
from akd_cache.teacher.identity import teacher_identity

if TYPE_CHECKING:
    from akd_cache.teacher.ray_pool import RaySettings

Split = Literal["train", "heldout"]


def make_ingredients(
    *,
    teacher: TeacherConfig,
    teacher_path: str,
    tokenizer: PreTrainedTokenizerBase,
    data: DataConfig,
    dataset_sha256: str,
    samples: Sequence[TokenizedSample],
    cache: CacheConfig,
    split: Split = "train",
) -> CacheIngredients:
    return CacheIngredients(
        **teacher_identity(teacher, teacher_path, tokenizer),
        dataset_sha256=dataset_sha256,
        samples_sha256=samples_sha256(list(samples)),
        split=split,
        heldout=data.heldout,
        split_seed=data.seed,
        max_train_samples=data.max_train_samples,
        template=cache.template,
        max_length=cache.max_length,
        truncation=cache.truncation,
        k=cache.k,
        temperature=cache.temperature,
        tail_shape=cache.tail_shape,
        tail_rank=cache.tail_rank,
    )


# ingredient -> the setting it comes from, for those that need no model or data to compare
SETTING_OF_INGREDIENT = {
    "teacher": "teacher.model", "teacher_revision": "teacher.revision",
    "teacher_dtype": "teacher.dtype", "heldout": "data.heldout", "split_seed": "data.seed",
    "max_train_samples": "data.max_train_samples", "template": "cache.template",
    "max_length": "cache.max_length", "truncation": "cache.truncation", "k": "cache.k",
    "temperature": "cache.temperature", "tail_shape": "cache.tail_shape",
    "tail_rank": "cache.tail_rank",
}


def check_cache_settings(
    location: str, ingredients: dict, teacher: TeacherConfig, data: DataConfig,
    cache: CacheConfig,
) -> None:
    """Refuse a cache whose cheap ingredients differ from what the current params would produce
    (the weights, tokenizer and data checksums need the models and data: `build_cache`)."""
    sections = {"teacher": teacher, "data": data, "cache": cache}
    for ingredient, setting in SETTING_OF_INGREDIENT.items():
        section, name = setting.split(".")
        ours, theirs = getattr(sections[section], name), ingredients.get(ingredient)
        if ours != theirs:
            raise CacheError(f"{location}: the cache was built with {setting}={theirs!r}, the "
                             f"params say {ours!r}; run `akd cache-teacher` for the current "
                             "params")


def backend_factory(
    teacher: TeacherConfig, teacher_path: str, cache: CacheConfig
) -> Callable[[], TeacherBackend]:
    def make() -> TeacherBackend:
        if teacher.backend == "vllm":
            from akd_cache.teacher.vllm_backend import VLLMTeacher

            return VLLMTeacher(
                teacher_path, k=cache.k, temperature=cache.temperature, dtype=teacher.dtype,
                memory_utilization=teacher.vllm_memory_utilization, revision=teacher.revision,
                max_model_len=cache.max_length + 1,  # room for the one sampled token
            )
        from akd_cache.teacher.hf_backend import HFTeacher

        require_device(teacher.device, "teacher.device")  # where the teacher loads
        return HFTeacher(
            teacher_path, k=cache.k, temperature=cache.temperature, dtype=teacher.dtype,
            device=teacher.device, batch_tokens=teacher.batch_tokens, revision=teacher.revision,
        )

    return make


def load_tokenizer(path: str, revision: str | None = None) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(path, revision=revision)


def cache_location(root: str, key: str) -> str:
    return f"{root.rstrip('/')}/{key}"


@dataclass(frozen=True)
class BuiltCache:
    """Where a cache landed, whether every shard is in, and what tokenisation dropped."""

    key: str
    location: str
    complete: bool
    n_samples: int
    dropped: list[DroppedRow]


def build_cache(
    teacher: TeacherConfig,
    data: DataConfig,
    cache: CacheConfig,
    examples: Sequence[Example],
    dataset_sha256: str,
    *,
    worker_index: int = 0,
    num_workers: int = 1,
    break_lock: bool = False,
    split: Split = "train",
    ray: RaySettings | None = None,
) -> BuiltCache:
    """Tokenise `examples` with the teacher's tokenizer, name the cache by its ingredients and
    fill this worker's shards (the teacher loads only if a shard is missing); with `ray`, on
    teacher actors of a Ray cluster instead of in this process. `split` names which part of the
    prepared data `examples` are: the held-out cache feeds `akd fidelity`."""
    teacher_path = resolve_model(teacher.model, "teacher.model", teacher.revision)
    vocab_size = model_vocab_size(teacher_path, teacher.revision)
    check_top_k(cache.k, vocab_size, teacher_path)
    tokenizer = load_tokenizer(teacher_path, teacher.revision)
    tokenized = tokenize_split(tokenizer, examples, cache)
    if examples and not tokenized.samples:
        first = tokenized.dropped[0]
        raise DataError(f"{split} split: all {len(examples)} samples were dropped by tokenisation "
                        f"(cache.max_length {cache.max_length}, cache.truncation "
                        f"{cache.truncation!r}); the first, {first.sample_id}: {first.reason}")
    ingredients = make_ingredients(
        teacher=teacher, teacher_path=teacher_path, tokenizer=tokenizer, data=data,
        dataset_sha256=dataset_sha256, samples=tokenized.samples, cache=cache, split=split,
    )
    key = ingredients.key()
    location = cache_location(cache.root, key)
    backend = backend_factory(teacher, teacher_path, cache)
    runner = None
    if ray is not None:
        from akd_cache.teacher.ray_pool import RayTeacherPool  # ray loads for Ray runs only

        runner = RayTeacherPool(location, tokenized.samples, backend,
                                gpu=teacher.device.startswith("cuda"), settings=ray)
        backend = runner.teacher
    complete = fill(
        location, tokenized.samples, ingredients, max(vocab_size, len(tokenizer)), backend,
        shard_rows=cache.shard_tokens, worker_index=worker_index, num_workers=num_workers,
        break_lock=break_lock, shard_runner=runner,
    )
    return BuiltCache(key, location, complete, len(tokenized.samples), tokenized.dropped)
