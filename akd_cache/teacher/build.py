"""Stage 1 as library calls: name the cache and build the teacher that fills it.

The cache location is `<root>/<key>`, the key a hash of every ingredient, so the same teacher,
data, template and settings always land in (and reuse) the same folder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from akd_cache.config import CacheConfig, DataConfig, TeacherConfig
from akd_cache.store.key import CacheIngredients, samples_sha256
from akd_cache.store.rows import TeacherBackend, TokenizedSample
from akd_cache.teacher.identity import teacher_identity


def make_ingredients(
    *,
    teacher: TeacherConfig,
    teacher_path: str,
    tokenizer: PreTrainedTokenizerBase,
    data: DataConfig,
    dataset_sha256: str,
    samples: Sequence[TokenizedSample],
    cache: CacheConfig,
) -> CacheIngredients:
    return CacheIngredients(
        **teacher_identity(teacher, teacher_path, tokenizer),
        dataset_sha256=dataset_sha256,
        samples_sha256=samples_sha256(list(samples)),
        split="train",
        heldout=data.heldout,
        split_seed=data.seed,
        max_train_samples=data.max_train_samples,
        template=cache.template,
        max_length=cache.max_length,
        truncation=cache.truncation,
        k=cache.k,
        temperature=cache.temperature,
    )


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

        return HFTeacher(
            teacher_path, k=cache.k, temperature=cache.temperature, dtype=teacher.dtype,
            device=teacher.device, batch_tokens=teacher.batch_tokens, revision=teacher.revision,
        )

    return make


def load_tokenizer(path: str, revision: str | None = None) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(path, revision=revision)


def cache_location(root: str, key: str) -> str:
    return f"{root.rstrip('/')}/{key}"
