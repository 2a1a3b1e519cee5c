"""Stage 1, generate mode (SeqKD): the teacher's response to every training prompt, cached.

Like the logit cache, the folder is `<root>/<key>`, the key a hash of every ingredient that
decides the text (`GenerationIngredients`, kept readable in `meta.json`), so the same teacher,
prompts and settings always land in (and reuse) the same folder. Responses are appended to
`generations.jsonl` as they finish: a crash loses at most the batch in flight, and a re-run
generates only what is missing. `complete.json`, written last, marks a finished folder, which is
returned without building the teacher.

Decoding is greedy only, and greedy means the argmax of the model's own logits on both backends
(a model's shipped sampling or penalty defaults are not applied). Greedy output does not depend
on how prompts are batched, which is what lets a resumed run end equal to an uninterrupted one.
Stops: EOS (the tokenizer's and the model's), any stop string that is a special token, and the
other stop strings, matched on the decoded response and cut off before the first one.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from akd_cache.config import TeacherConfig
from akd_cache.data.instructions import Example
from akd_cache.data.templates import render_prompt
from akd_cache.errors import CacheError, ModelError
from akd_cache.store.key import hash_key, teacher_identity
from akd_cache.store.lock import WriterLock
from akd_cache.teacher.hf_backend import DTYPES

FORMAT_VERSION = 1
GREEDY = "greedy"
DEFAULT_ROOT = "storage/teacher-generations"
DEFAULT_MAX_NEW_TOKENS = 512  # CacheConfig.max_length: anything longer is cut at training
# The template's own section headers (a teacher that starts one is past its answer) and the
# end-of-turn texts of chat and StarCoder tokenizers.
DEFAULT_STOPS: tuple[str, ...] = (
    "\n### Instruction", "\n### Input", "\n### Response", "<|im_end|>", "<|endoftext|>",
)
DEFAULT_BATCH_SIZE = 8
VLLM_CHUNK_PROMPTS = 256  # prompts per vLLM call: what a crash can lose, not a speed setting
GENERATIONS_FILE = "generations.jsonl"
META_FILE = "meta.json"
COMPLETE_FILE = "complete.json"
LOCK_NAME = "generate"
REPLACEMENT_CHAR = "\ufffd"  # what decoding makes of the bytes of an incomplete character


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


# --- backends -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    text: str  # cut before the first stop string
    truncated: bool  # max_new_tokens ran out before EOS or a stop


class GenerationBackend(Protocol):
    def generate(
        self, prompts: Sequence[str], max_new_tokens: int, stops: Sequence[str]
    ) -> Iterator[tuple[int, Response]]:
        """(index into `prompts`, its response), in any order, as each one finishes."""
        ...


def split_stops(
    tokenizer: PreTrainedTokenizerBase, stops: Sequence[str]
) -> tuple[list[int], list[str]]:
    """Stops that are special tokens become token ids: decoding skips special tokens, so they
    would never show up in the text. The rest stay strings."""
    special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    special.update(tokenizer.all_special_tokens)
    ids = [tokenizer.convert_tokens_to_ids(s) for s in stops if s in special]
    return ids, [s for s in stops if s not in special]


def cut_at_stops(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """The text before the earliest stop, and whether there was one."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


class _StopOnText(StoppingCriteria):
    """Marks each row done once its decoded response holds a stop string (per row)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_width: int, stops: list[str]):
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width
        self.stops = stops

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(
            input_ids[:, self.prompt_width :], skip_special_tokens=True
        )
        done = [cut_at_stops(t, self.stops)[1] for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class HFGenerator:
    """transformers `generate`: prompts sorted by length (least padding), batched, left-padded
    so every row's first new token follows its own last prompt token. Takes over `model`: its
    shipped generation config is replaced by a plain one (see the module docstring)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        if tokenizer.eos_token_id is None:
            raise ModelError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token")
        configured = model.generation_config.eos_token_id
        configured = configured if isinstance(configured, list) else [configured]
        self.eos_ids = sorted({tokenizer.eos_token_id, *configured} - {None})
        self.pad_id = tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = tokenizer.eos_token_id
        model.generation_config = GenerationConfig()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(
        cls, path: str, dtype: str = "float32", device: str = "cpu", revision: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> HFGenerator:
        model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=DTYPES[dtype])
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
        return cls(model.to(device), tokenizer, batch_size)

    def generate(
        self, prompts: Sequence[str], max_new_tokens: int, stops: Sequence[str]
    ) -> Iterator[tuple[int, Response]]:
        stop_ids, text_stops = split_stops(self.tokenizer, stops)
        eos = sorted({*self.eos_ids, *stop_ids})
        lengths = [len(ids) for ids in self.tokenizer(list(prompts))["input_ids"]]
        order = sorted(range(len(prompts)), key=lambda i: lengths[i])
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            responses = self._batch([prompts[i] for i in batch], max_new_tokens, eos, text_stops)
            yield from zip(batch, responses, strict=True)

    @torch.inference_mode()
    def _batch(
        self, prompts: list[str], max_new_tokens: int, eos: list[int], stops: list[str]
    ) -> list[Response]:
        inputs = self.tokenizer(
            prompts, return_tensors="pt", padding=True, padding_side="left"
        ).to(self.model.device)
        width = inputs["input_ids"].shape[1]
        criteria = [_StopOnText(self.tokenizer, width, stops)] if stops else []
        out = self.model.generate(
            **inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
            eos_token_id=eos, pad_token_id=self.pad_id,
            stopping_criteria=StoppingCriteriaList(criteria),
        )
        generated = out[:, width:]
        hit_eos = torch.isin(generated, torch.tensor(eos, device=generated.device)).any(1)
        texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        responses = []
        for text, ended in zip(texts, hit_eos.tolist(), strict=True):
            text, stopped = cut_at_stops(text, stops)
            truncated = not (ended or stopped)
            if truncated:  # a character cut short at the end; vLLM holds its bytes back too
                text = text.rstrip(REPLACEMENT_CHAR)
            responses.append(Response(text, truncated))
        return responses


class VLLMGenerator:
    """vLLM's offline engine, greedy (`temperature=0`) with the stops in `SamplingParams`. The
    engine runs in spawned processes: build it under `if __name__ == "__main__":`."""

    def __init__(
        self, model: str, dtype: str = "float32", memory_utilization: float = 0.3,
        revision: str | None = None, **engine_kwargs: Any,
    ) -> None:
        from vllm import LLM

        self.llm: Any = LLM(
            model=model, revision=revision, dtype=dtype,
            gpu_memory_utilization=memory_utilization, **engine_kwargs,
        )

    def generate(
        self, prompts: Sequence[str], max_new_tokens: int, stops: Sequence[str]
    ) -> Iterator[tuple[int, Response]]:
        from vllm import SamplingParams

        stop_ids, text_stops = split_stops(self.llm.get_tokenizer(), stops)
        params = SamplingParams(
            temperature=0.0, max_tokens=max_new_tokens, stop=text_stops, stop_token_ids=stop_ids,
        )
        for start in range(0, len(prompts), VLLM_CHUNK_PROMPTS):
            chunk = list(prompts[start : start + VLLM_CHUNK_PROMPTS])
            for offset, request in enumerate(self.llm.generate(chunk, params, use_tqdm=False)):
                out = request.outputs[0]
                yield start + offset, Response(out.text, out.finish_reason == "length")

    def close(self) -> None:
        """Shuts the engine's processes down."""
        self.llm.llm_engine.engine_core.shutdown()


def generator_factory(
    teacher: TeacherConfig, teacher_path: str, batch_size: int = DEFAULT_BATCH_SIZE
) -> Callable[[], GenerationBackend]:
    """The backend `teacher.backend` names, built only when called."""

    def make() -> GenerationBackend:
        if teacher.backend == "vllm":
            return VLLMGenerator(
                teacher_path, dtype=teacher.dtype, revision=teacher.revision,
                memory_utilization=teacher.vllm_memory_utilization,
            )
        return HFGenerator.from_pretrained(
            teacher_path, dtype=teacher.dtype, device=teacher.device, revision=teacher.revision,
            batch_size=batch_size,
        )

    return make


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
    backend: Callable[[], GenerationBackend],
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
    teacher: GenerationBackend,
) -> None:
    prompts = [render_prompt(ingredients.template, e.instruction, e.input) for e in todo]
    responses = teacher.generate(prompts, ingredients.max_new_tokens, ingredients.stops)
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
