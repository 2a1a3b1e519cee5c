"""The prompt templates of the paper's Table 1, plus the original Stanford Alpaca template.

An empty `input` is left out together with the newline that precedes it, and nothing else: the
paper's `alpaca` keeps its `### Input:` header (Table 1 has no no-input variant). The default
everywhere is `alpaca`, the paper's printed form (no blank lines between the sections);
`alpaca_original` is Stanford Alpaca as released, with `\\n\\n` between sections and a separate
no-input variant.
"""

from __future__ import annotations

from typing import get_args

from akd_cache.config import TemplateName
from akd_cache.errors import ConfigError

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request."
)
ALPACA_ORIGINAL_PREAMBLE_NO_INPUT = ALPACA_PREAMBLE
ALPACA_ORIGINAL_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request."
)
INSTRUCT_EVAL_PREAMBLE = (
    "Please complete the following Python code without providing any additional tasks such as "
    "testing or explanations."
)
TEMPLATES: tuple[str, ...] = get_args(TemplateName)


def _optional_line(text: str) -> str:
    return f"\n{text}" if text else ""


def render_prompt(template: str, instruction: str, input: str = "") -> str:
    """The prompt the teacher and the student see; the response is appended to it verbatim."""
    if template == "starcoder":
        return f"<fim_prefix>{instruction}{_optional_line(input)}<fim_suffix><fim_middle>"
    if template == "instruct_eval":
        return f"{INSTRUCT_EVAL_PREAMBLE}\n{instruction}{_optional_line(input)}"
    if template == "alpaca":
        return (
            f"{ALPACA_PREAMBLE}### Instruction:\n{instruction}\n### Input:{_optional_line(input)}"
            "\n### Response:"
        )
    if template == "alpaca_original":
        if input:
            return (
                f"{ALPACA_ORIGINAL_PREAMBLE_INPUT}\n\n### Instruction:\n{instruction}\n\n"
                f"### Input:\n{input}\n\n### Response:\n"
            )
        return (
            f"{ALPACA_ORIGINAL_PREAMBLE_NO_INPUT}\n\n### Instruction:\n{instruction}\n\n"
            "### Response:\n"
        )
    raise ConfigError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
