"""The rendered prompt strings, pinned character for character (docs/method.md §1)."""

import pytest

from akd_cache.data.templates import render_prompt

PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.")


def test_starcoder():
    assert render_prompt("starcoder", "Sum a list.", "xs = [1, 2]") == (
        "<fim_prefix>Sum a list.\nxs = [1, 2]<fim_suffix><fim_middle>")
    assert render_prompt("starcoder", "Sum a list.") == (
        "<fim_prefix>Sum a list.<fim_suffix><fim_middle>")


def test_instruct_eval():
    head = ("Please complete the following Python code without providing any additional tasks "
            "such as testing or explanations.")
    assert render_prompt("instruct_eval", "Sum a list.", "xs") == f"{head}\nSum a list.\nxs"
    assert render_prompt("instruct_eval", "Sum a list.") == f"{head}\nSum a list."


def test_alpaca_as_printed_in_the_paper():
    assert render_prompt("alpaca", "Sum a list.", "xs = [1, 2]") == (
        f"{PREAMBLE}### Instruction:\nSum a list.\n### Input:\nxs = [1, 2]\n### Response:")
    assert render_prompt("alpaca", "Sum a list.") == (
        f"{PREAMBLE}### Instruction:\nSum a list.\n### Input:\n### Response:")


def test_alpaca_original():
    with_input = ("Below is an instruction that describes a task, paired with an input that "
                  "provides further context. Write a response that appropriately completes the "
                  "request.\n\n### Instruction:\nSum a list.\n\n### Input:\nxs\n\n### Response:\n")
    assert render_prompt("alpaca_original", "Sum a list.", "xs") == with_input
    assert render_prompt("alpaca_original", "Sum a list.") == (
        f"{PREAMBLE}\n\n### Instruction:\nSum a list.\n\n### Response:\n")


def test_unknown_template_is_named():
    with pytest.raises(ValueError, match="'chatml'"):
        render_prompt("chatml", "x")
