"""SeqKD data: teacher generation (tiny random Llama, then the real SmolLM2), its cache folder
(key, skip when complete, resume after a crash), and the Dataset the trainer's sft path reads.

torch runs on one thread here: on 2 cores shared with other jobs, two spinning OpenMP threads
made generation about ten times slower than one.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from akd_cache.config import SFT, CacheConfig, TeacherConfig, TrainConfig
from akd_cache.data.instructions import Example
from akd_cache.data.templates import render_prompt
from akd_cache.generation import Completion, Decoding, HFGenerator, complete_all, split_stops
from akd_cache.store.generations import (
    COMPLETE_FILE,
    GENERATIONS_FILE,
    META_FILE,
    GenerationCacheError,
    read_generations,
    truncated_sample_ids,
)
from akd_cache.store.reader import collate
from akd_cache.student.seqkd_data import EMPTY_RESPONSE, SeqKDDataset
from akd_cache.student.trainer import DistillationModule
from akd_cache.teacher.generate import (
    GenerationIngredients,
    generate_responses,
    generator_factory,
    make_generation_ingredients,
    prompts_sha256,
)

N_EXAMPLES = 6
BATCH = 2
NEW_TOKENS = 12
TEMPLATE = "alpaca"
SMOLLM2_TOKENS = 48
MAX_LENGTH = 256  # the tiny tokenizer makes 100-140 token prompts


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama(tiny_models):
    path = tiny_models["llama"]
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def examples(codealpaca_rows) -> list[Example]:
    return [Example(f"row-{i:06d}", r["instruction"], r["input"], r["output"])
            for i, r in enumerate(codealpaca_rows[:N_EXAMPLES])]


@pytest.fixture(scope="module")
def prompts(examples) -> list[str]:
    return [render_prompt(TEMPLATE, e.instruction, e.input) for e in examples]


def generate_all(generator: HFGenerator, prompts: list[str], stops=()) -> list[Completion]:
    decoding = Decoding(NEW_TOKENS, tuple(stops))
    return [response for [response] in complete_all(generator, prompts, decoding)]


@pytest.fixture(scope="module")
def unstopped(llama, prompts) -> list[Completion]:
    return generate_all(HFGenerator(*llama, batch_size=BATCH), prompts)


def ingredients_for(tiny_models, examples, **settings):
    path = str(tiny_models["llama"])
    return make_generation_ingredients(
        teacher=TeacherConfig(model=path), teacher_path=path,
        tokenizer=AutoTokenizer.from_pretrained(path), examples=examples, template=TEMPLATE,
        **{"max_new_tokens": NEW_TOKENS, "stops": (), **settings},
    )


def fresh_generator(tiny_models, calls: list, crash_after: int | None = None):
    """A factory for a generator on its own copy of the model; `model.generate` calls are
    counted in `calls`, and call number `crash_after` + 1 raises."""
    path = tiny_models["llama"]

    def make() -> HFGenerator:
        model = AutoModelForCausalLM.from_pretrained(path)
        original = model.generate

        def generate(*args, **kwargs):
            if crash_after is not None and len(calls) >= crash_after:
                raise RuntimeError("simulated crash")
            calls.append(1)
            return original(*args, **kwargs)

        model.generate = generate
        return HFGenerator(model, AutoTokenizer.from_pretrained(path), batch_size=BATCH)

    return make


def must_not_load() -> HFGenerator:
    raise AssertionError("the teacher was loaded for a complete folder")


# --- generation -----------------------------------------------------------------------------


def test_generation_is_deterministic_and_batching_does_not_change_it(llama, prompts, unstopped):
    model, tokenizer = llama
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) > 1, "no padding exercised"
    assert generate_all(HFGenerator(model, tokenizer, batch_size=BATCH), prompts) == unstopped
    one_by_one = generate_all(HFGenerator(model, tokenizer, batch_size=1), prompts)
    assert one_by_one == unstopped
    assert all(r.truncated and r.text for r in unstopped)


def test_stop_strings_cut_the_output(llama, prompts, unstopped):
    """A stop taken from the middle of an unstopped output: generation ends there."""
    text = unstopped[1].text
    stop = re.search(r"[A-Za-z]{2,}", text[3:]).group(0)
    [stopped] = generate_all(HFGenerator(*llama), prompts[1:2], stops=(stop, "never seen"))
    assert stopped == Completion(text[: text.index(stop)], truncated=False)


def test_special_token_stops_become_token_ids(llama):
    _, tokenizer = llama
    ids, texts = split_stops(tokenizer, ("<fim_middle>", "\n### Instruction"))
    assert ids == [tokenizer.convert_tokens_to_ids("<fim_middle>")]
    assert texts == ["\n### Instruction"]


# --- the cache folder -----------------------------------------------------------------------


def test_key_changes_with_each_ingredient(tiny_models, examples):
    base = ingredients_for(tiny_models, examples)
    assert ingredients_for(tiny_models, examples).key() == base.key()
    changed = {
        "teacher": "other/model", "teacher_revision": "abc123",
        "teacher_weights_sha256": "0" * 64, "teacher_dtype": "bfloat16",
        "tokenizer_sha256": "1" * 64, "prompts_sha256": "2" * 64, "n_samples": 7,
        "template": "alpaca_original", "max_new_tokens": NEW_TOKENS + 1,
        "stops": ("\n### Instruction",), "decoding": "sampled", "format_version": 99,
    }
    assert set(changed) == {f.name for f in dataclasses.fields(base)}
    keys = {base.key()} | {dataclasses.replace(base, **{k: v}).key() for k, v in changed.items()}
    assert len(keys) == len(changed) + 1
    # the prompts hash follows ids, instructions, inputs and the template, not the references
    other_input = [dataclasses.replace(examples[0], input="x"), *examples[1:]]
    other_output = [dataclasses.replace(examples[0], output="x"), *examples[1:]]
    digest = prompts_sha256(examples, TEMPLATE)
    assert prompts_sha256(other_input, TEMPLATE) != digest
    assert prompts_sha256(examples, "alpaca_original") != digest
    assert prompts_sha256(other_output, TEMPLATE) == digest


def test_key_of_fixed_ingredients_is_stable():
    """The value the code gave before the folder I/O moved to the store: a key that moves
    orphans every existing generations folder."""
    ingredients = GenerationIngredients(
        teacher="embedded:smollm2", teacher_revision=None, teacher_weights_sha256="a" * 64,
        teacher_dtype="float32", tokenizer_sha256="b" * 64, prompts_sha256="e" * 64,
        n_samples=96, template="alpaca_original", max_new_tokens=128,
        stops=("\n### Instruction", "<|im_end|>"),
    )
    assert ingredients.key() == "9b36be2f3a91c5cc10b2"


@pytest.fixture(scope="module")
def complete(tiny_models, examples, tmp_path_factory):
    """A complete folder, and the model.generate calls that filled it."""
    ingredients = ingredients_for(tiny_models, examples)
    calls: list = []
    location = tmp_path_factory.mktemp("generations") / ingredients.key()
    assert generate_responses(location, examples, ingredients,
                              fresh_generator(tiny_models, calls)) == location
    return location, ingredients, len(calls)


def test_complete_folder_is_reused_without_the_teacher(examples, unstopped, complete):
    location, ingredients, n_calls = complete
    assert n_calls == N_EXAMPLES // BATCH
    body = (location / GENERATIONS_FILE).read_bytes()
    generate_responses(location, examples, ingredients, must_not_load)
    assert (location / GENERATIONS_FILE).read_bytes() == body

    meta = json.loads((location / META_FILE).read_text())
    assert meta["key"] == ingredients.key()
    assert meta["ingredients"]["max_new_tokens"] == NEW_TOKENS
    assert json.loads((location / COMPLETE_FILE).read_text())["n_truncated"] == N_EXAMPLES
    got = read_generations(location)
    assert [e.sample_id for e in got] == [e.sample_id for e in examples]
    assert [e.output for e in got] == [r.text for r in unstopped]
    assert [(e.instruction, e.input) for e in got] == [(e.instruction, e.input) for e in examples]
    assert truncated_sample_ids(location) == {e.sample_id for e in examples}


def test_a_location_is_tied_to_its_key_and_examples(tiny_models, examples, complete):
    location, ingredients, _ = complete
    other = ingredients_for(tiny_models, examples, max_new_tokens=NEW_TOKENS + 1)
    with pytest.raises(GenerationCacheError, match="tied to its key"):
        generate_responses(location, examples, other, must_not_load)
    with pytest.raises(ValueError, match="other examples"):
        generate_responses(location, examples[1:], ingredients, must_not_load)


class FixedBackend:
    """Answers prompt i with `texts[i]`, all at once."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def complete(self, prompts, decoding):
        return ((i, Completion(self.texts[i], truncated=False)) for i in range(len(prompts)))


def test_any_text_round_trips_through_the_file(tiny_models, examples, tmp_path):
    """JSON leaves U+2028 and U+0085 unescaped: they must not split a record."""
    texts = ["a\u2028b", "c\x85d\r\ne", "", "tab\tquote\"", "é😀", "\n### Response"]
    ingredients = ingredients_for(tiny_models, examples)
    generate_responses(tmp_path, examples, ingredients, lambda: FixedBackend(texts))
    assert [e.output for e in read_generations(tmp_path)] == texts
    assert truncated_sample_ids(tmp_path) == set()


class ClosingBackend(FixedBackend):
    """A `FixedBackend` with processes of its own to shut down, as vLLM's engine has."""

    closed = False

    def close(self) -> None:
        self.closed = True


def test_the_teacher_is_shut_down_however_generation_ends(tiny_models, examples, tmp_path):
    ingredients = ingredients_for(tiny_models, examples)
    finished = ClosingBackend([""] * N_EXAMPLES)
    generate_responses(tmp_path / "a", examples, ingredients, lambda: finished)
    crashed = ClosingBackend([])  # its first response raises IndexError
    with pytest.raises(IndexError):
        generate_responses(tmp_path / "b", examples, ingredients, lambda: crashed)
    assert finished.closed and crashed.closed


def test_interrupted_run_resumes_to_the_same_result(tiny_models, examples, tmp_path):
    ingredients = ingredients_for(tiny_models, examples)
    straight = generate_responses(tmp_path / "straight", examples, ingredients,
                                  fresh_generator(tiny_models, []))

    location = tmp_path / "interrupted"
    calls: list = []
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate_responses(location, examples, ingredients,
                           fresh_generator(tiny_models, calls, crash_after=1))
    assert not (location / COMPLETE_FILE).exists()
    with pytest.raises(GenerationCacheError, match="incomplete"):
        read_generations(location)
    assert len(read_generations(location, allow_incomplete=True)) == BATCH
    with open(location / GENERATIONS_FILE, "a") as f:
        f.write('{"sample_id": "row-0000')  # a line cut short by the crash

    calls.clear()
    generate_responses(location, examples, ingredients, fresh_generator(tiny_models, calls))
    assert len(calls) == N_EXAMPLES // BATCH - 1
    assert (location / GENERATIONS_FILE).read_bytes() == (straight / GENERATIONS_FILE).read_bytes()
    assert read_generations(location) == read_generations(straight)


# --- the Stage 2 dataset --------------------------------------------------------------------


def test_dataset_puts_the_loss_on_the_response_and_eos(llama, examples, unstopped):
    """Labels: the response tokens and the EOS, or no EOS for a response that never ended."""
    model, tokenizer = llama
    generated = [dataclasses.replace(e, output=r.text)
                 for e, r in zip(examples, unstopped, strict=True)]
    empty = dataclasses.replace(examples[0], sample_id="empty", output=" \n")
    too_long = dataclasses.replace(examples[1], sample_id="long", output="x " * MAX_LENGTH)
    cut = generated[0].sample_id
    dataset = SeqKDDataset([*generated, empty, too_long], tokenizer,
                           CacheConfig(max_length=MAX_LENGTH, truncation="drop"), {cut})
    reasons = [(d.sample_id, d.reason.split(":")[0]) for d in dataset.dropped]
    assert reasons == [("empty", EMPTY_RESPONSE), ("long", "too long")]
    assert len(dataset) == N_EXAMPLES

    batch = collate([dataset[i] for i in range(len(dataset))])
    for b, e in enumerate(generated):
        prompt = tokenizer(render_prompt(TEMPLATE, e.instruction, e.input))["input_ids"]
        response = tokenizer(e.output, add_special_tokens=False)["input_ids"]
        end = [] if e.sample_id == cut else [tokenizer.eos_token_id]
        mask = batch["loss_mask"][b]
        assert batch["labels"][b][mask].tolist() == response + end
        assert torch.nonzero(mask)[0].item() == len(prompt) - 1
        assert batch["input_ids"][b][: len(prompt)].tolist() == prompt

    # the trainer's sft path: plain cross-entropy, the placeholder teacher rows change nothing
    module = DistillationModule(model, SFT(), TrainConfig())
    out = module(**batch, beta=torch.tensor(0.0))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_sample = [
        torch.nn.functional.cross_entropy(logits[b][m], batch["labels"][b][m])
        for b, m in enumerate(batch["loss_mask"])
    ]
    assert out.loss.item() == pytest.approx(torch.stack(per_sample).mean().item(), rel=1e-5)


def test_dataset_from_a_folder_leaves_truncated_responses_open(llama, complete):
    _, tokenizer = llama
    location, _, _ = complete
    dataset = SeqKDDataset.from_generations(location, tokenizer, CacheConfig(max_length=MAX_LENGTH))
    assert len(dataset) == N_EXAMPLES and not dataset.dropped
    assert all(s.input_ids[-1] != tokenizer.eos_token_id for s in dataset.samples)


# --- the real teacher -----------------------------------------------------------------------


def test_smollm2_answers_codealpaca_prompts(smollm2_dir, examples, tmp_path):
    teacher = TeacherConfig(model=str(smollm2_dir))
    chosen = examples[:2]
    ingredients = make_generation_ingredients(
        teacher=teacher, teacher_path=str(smollm2_dir),
        tokenizer=AutoTokenizer.from_pretrained(smollm2_dir), examples=chosen,
        template=TEMPLATE, max_new_tokens=SMOLLM2_TOKENS,
    )
    assert "<|im_end|>" in ingredients.stops
    location = generate_responses(
        tmp_path / ingredients.key(), chosen, ingredients,
        generator_factory(teacher, str(smollm2_dir), batch_size=len(chosen)),
    )
    for e in read_generations(location):
        assert e.output.strip()
        assert "### Instruction" not in e.output
