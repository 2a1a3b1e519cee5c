"""The MiniLLM baseline (Gu et al., the paper's Table 5): TRL's `MiniLLMTrainer` with the teacher
loaded online, on the same training prompts and template as every other experiment.

MiniLLM needs no teacher cache: it samples responses from the student and rewards them with the
teacher's log-probabilities (reverse KL by policy gradient), so the teacher runs beside the
student for the whole run. This module is only the glue: the prompts, the teacher, TRL's config
from the profile's `train` settings, and a saved student with the same metrics as any other run.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from datasets import Dataset
from transformers import AutoTokenizer, TrainerCallback, TrainerState
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import get_last_checkpoint
from trl.experimental.minillm import MiniLLMConfig, MiniLLMTrainer

from akd_cache.config import MiniLLM, ModelRef, TrainConfig
from akd_cache.data.instructions import Example
from akd_cache.data.templates import render_prompt
from akd_cache.errors import ConfigError
from akd_cache.run_settings import MODEL_DIR
from akd_cache.store.key import tokenizer_fingerprint
from akd_cache.student.checkpoints import discard_changed_run
from akd_cache.student.setup import load_student, load_teacher, training_arguments
from akd_cache.student.trainer import run_peak_memory_mb
from akd_cache.teacher.generate import prompts_sha256


def prompt_dataset(examples: Sequence[Example], template: str) -> Dataset:
    """The training prompts under the cache's template, in TRL's `prompt` column."""
    return Dataset.from_dict({"prompt": [render_prompt(template, e.instruction, e.input)
                                         for e in examples]})


def minillm_arguments(experiment: MiniLLM, train: TrainConfig, output_dir: Path) -> MiniLLMConfig:
    """TRL's config from the profile's `train` settings; generation runs in transformers."""
    return training_arguments(
        train, output_dir, MiniLLMConfig,
        max_completion_length=experiment.max_new_tokens,
        num_generations=experiment.num_generations,
        gamma=experiment.gamma,
        single_step_decomposition=experiment.single_step_decomposition,
        kd_temperature=train.temperature,
        use_vllm=False,
    )


class JsonlLog(TrainerCallback):
    """Appends every log entry to `log.jsonl`, as the cache runs do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if state.is_world_process_zero and logs:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs})
                        + "\n")


def tokens_at(checkpoint: str | None) -> int:
    """Tokens TRL had counted (prompt + sampled, every process) when `checkpoint` was saved,
    so a resumed run's throughput counts only the tokens of this call, as the other runs do."""
    if checkpoint is None:
        return 0
    state = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE_NAME))
    return state.num_input_tokens_seen


def train_minillm(
    student_path: str, teacher: ModelRef, examples: Sequence[Example], template: str,
    experiment: MiniLLM, train: TrainConfig, out: Path, name: str,
) -> dict:
    """Train (resuming from the last checkpoint in `out` if any), save the student to
    `out/model`, return the metrics every run returns. `teacher` is a resolved path."""
    tokenizer = AutoTokenizer.from_pretrained(student_path)
    teacher_tokenizer = AutoTokenizer.from_pretrained(teacher.model, revision=teacher.revision)
    if tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(teacher_tokenizer):
        raise ConfigError(f"{student_path}: the student's tokenizer differs from the teacher's "
                          f"({teacher.model}); MiniLLM needs the teacher's vocabulary")
    student = load_student(student_path, experiment, train.bf16)
    checkpoints = out / "checkpoints"
    settings = {"teacher": teacher.model_dump(), "student": student_path,
                "prompts_sha256": prompts_sha256(examples, template),
                "experiment": experiment.model_dump(), "train": train.model_dump()}
    args = minillm_arguments(experiment, train, checkpoints)
    discard_changed_run(args, out, settings, checkpoints)
    trainer = MiniLLMTrainer(
        model=student,
        teacher_model=load_teacher(teacher, train.bf16),
        args=args,
        train_dataset=prompt_dataset(examples, template),
        processing_class=tokenizer,
        callbacks=[JsonlLog(out / "log.jsonl")],
    )
    checkpoint = get_last_checkpoint(str(checkpoints)) if checkpoints.exists() else None
    tokens_before = tokens_at(checkpoint)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    wall = time.perf_counter() - start
    tokens = trainer.state.num_input_tokens_seen - tokens_before
    peak = run_peak_memory_mb(trainer.accelerator)
    student.save_pretrained(out / MODEL_DIR)
    # as loaded: TRL may have given the instance a pad token
    AutoTokenizer.from_pretrained(student_path).save_pretrained(out / MODEL_DIR)
    shutil.rmtree(checkpoints, ignore_errors=True)  # the saved model supersedes them
    return {
        "experiment": name,
        "method": experiment.method,
        "cache_key": None,
        "teacher": "online",
        "train_loss": result.training_loss,
        "final_fkl": None,
        "final_rkl": None,
        "final_beta": None,
        "steps": trainer.state.global_step,
        "wall_s": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "peak_memory_mb": peak,
    }
