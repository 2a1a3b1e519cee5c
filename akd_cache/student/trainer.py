"""Stage 2: train the student against the teacher cache on transformers' Trainer.

The Trainer drives a `DistillationModule`: the student's decoder, then `loss.py`'s objective on the
loss positions only, so [batch, seq, vocab] logits never exist and DDP / FSDP wrap the whole step
unchanged (`torchrun` or `accelerate launch`). An online run is the same module with the live
teacher's decoder run beside the student without grad; its data, order and seed are the cache run's.
beta is updated once per optimizer step from the means, over its micro-batches, of the per-sample
normalised FKL and RKL, averaged over processes so every rank holds the same beta; its state is
saved in each checkpoint, which counts only once complete (`checkpoints.py`). Every save step is
also a logging step, so the log a resumed run continues covers each step exactly once.
"""

from __future__ import annotations

import io
import json
import math
import resource
import time
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import PreTrainedModel, Trainer, TrainerCallback

from akd_cache.config import DistillationExperiment, Experiment, TrainConfig
from akd_cache.store.reader import CacheDataset, ShardShuffleSampler
from akd_cache.student.akd import BetaController, BetaState
from akd_cache.student.checkpoints import (
    checkpoint_folder,
    discard_checkpoint,
    mark_complete,
    rotate_checkpoints,
    write_atomically,
)
from akd_cache.student.loss import (
    CachedTailModel,
    CachedTeacher,
    LiveTeacher,
    LossOutput,
    LossSettings,
    distillation_loss,
)

BETA_STATE_FILE = "beta_state.pt"
TRAINING_ARGS_FILE = "training_args.bin"
ADAPTER_FILE = "adapter_model.safetensors"
STUDENT_PREFIX = "student."
SUMMARY_KEY = "train_runtime"  # marks the Trainer's end-of-run summary among the log entries
EPOCH_EPS = 1e-6
KIB = 1024
MIB = 2**20


class DistillationModule(torch.nn.Module):
    """The student plus its loss, and the frozen live teacher of an online run: what the Trainer
    (and DDP) wraps."""

    def __init__(self, student: PreTrainedModel, experiment: Experiment, train: TrainConfig,
                 teacher: PreTrainedModel | None = None,
                 tail_model: CachedTailModel | None = None):
        """`tail_model`: what the cache stores for the 'shape' or 'lowrank' tail mode."""
        super().__init__()
        online = isinstance(experiment, DistillationExperiment) and experiment.online
        if online != (teacher is not None):
            raise ValueError("an online experiment needs the teacher model, a cache run none")
        self.student = student
        self.teacher = teacher
        self.loss_settings = LossSettings.of(experiment, train)
        tail_model = tail_model or CachedTailModel()
        self.register_buffer("log_tail_shape", tail_model.log_tail_shape, persistent=False)
        basis, bias = tail_model.tail_code_basis or (None, None)
        self.register_buffer("tail_code_basis", basis, persistent=False)
        self.register_buffer("tail_code_bias", bias, persistent=False)

    def train(self, mode: bool = True) -> DistillationModule:
        """The teacher stays in eval mode (no dropout) while the student trains."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def _causal_lm(self) -> PreTrainedModel:
        inner = self.student
        return inner.get_base_model() if hasattr(inner, "get_base_model") else inner

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        labels: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_logprobs: torch.Tensor,
        tail_logmass: torch.Tensor,
        beta: torch.Tensor,
        tail_code: torch.Tensor | None = None,
    ) -> LossOutput:
        lm = self._causal_lm()
        # use_cache=False: one forward per batch, and transformers would otherwise build a
        # key/value cache for it that nothing reads (in training mode too)
        hidden = lm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                               use_cache=False).last_hidden_state
        if self.teacher is None:
            basis = (None if self.tail_code_basis is None
                     else (self.tail_code_basis, self.tail_code_bias))
            teacher = CachedTeacher(topk_ids, topk_logprobs, tail_logmass, self.log_tail_shape,
                                    tail_code, basis)
        else:
            with torch.no_grad():
                teacher_hidden = self.teacher.base_model(
                    input_ids=input_ids, attention_mask=attention_mask, use_cache=False
                ).last_hidden_state
            teacher = LiveTeacher(teacher_hidden, self.teacher.get_output_embeddings())
        return distillation_loss(hidden, lm.get_output_embeddings(), teacher, loss_mask, labels,
                                 beta, self.loss_settings)


def peak_memory_mb() -> float:
    """Peak GPU memory when training on a GPU, else the process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / MIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB / MIB


def run_peak_memory_mb(accelerator: Accelerator) -> float:
    """The busiest process's peak: under torchrun the ranks' peaks differ, and each device must
    hold the largest. A collective: every process calls it."""
    return float(accelerator.reduce(torch.tensor(peak_memory_mb(), device=accelerator.device),
                                    "max"))


class DistillTrainer(Trainer):
    def __init__(self, *args, controller: BetaController, log_path: Path, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.controller = controller
        self.log_path = log_path
        self._sums: dict[str, float] = {}
        self._count = 0
        self._accumulated: list[tuple[torch.Tensor, torch.Tensor]] = []  # this step's (fkl, rkl)
        self.tokens_seen = 0
        self._start = time.perf_counter()
        self.add_callback(BetaCallback(controller))

    def _get_train_sampler(self, train_dataset=None) -> torch.utils.data.Sampler | None:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if isinstance(dataset, CacheDataset):
            return ShardShuffleSampler(dataset.cache, seed=self.args.data_seed or self.args.seed)
        return super()._get_train_sampler(train_dataset)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Checkpoints hold the student as `save_pretrained` writes it (tied weights and LoRA
        adapters included), not the wrapper's raw state dict."""
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        student = self.accelerator.unwrap_model(self.model).student
        if state_dict is not None:
            state_dict = {k.removeprefix(STUDENT_PREFIX): v for k, v in state_dict.items()}
        student.save_pretrained(output_dir, state_dict=state_dict)
        torch.save(self.args, Path(output_dir) / TRAINING_ARGS_FILE)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's save into a fresh folder, then beta's state and the completion marker,
        then rotation over complete checkpoints only (the Trainer's own rotation is off: it
        would count the folder being written, and sorts by mtime)."""
        run_dir = Path(self._get_output_dir(trial))
        folder = checkpoint_folder(run_dir, self.state.global_step)
        if self.args.should_save and folder.exists():
            discard_checkpoint(folder)  # a killed save's leftover at this step
        self.accelerator.wait_for_everyone()
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()  # every rank's files (rng states) are written
        if self.args.should_save:
            state = io.BytesIO()
            torch.save(asdict(self.controller.state()), state)
            mark_complete(folder, self.state.global_step, {BETA_STATE_FILE: state.getvalue()})
            rotate_checkpoints(run_dir)

    def forget_log_after(self, step: int) -> None:
        """Drop the log lines of steps after `step`, where a resumed run starts again (and a
        line torn by a kill), so the log covers each step once."""
        if not self.is_world_process_zero() or not self.log_path.exists():
            return
        lines = self.log_path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.endswith("\n") and _is_step_entry(line, step)]
        if kept != lines:
            write_atomically(self.log_path, "".join(kept).encode())

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        student = (model or self.model).student
        folder = Path(resume_from_checkpoint)
        if hasattr(student, "peft_config"):
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(student, load_file(folder / ADAPTER_FILE))
            return
        saved = type(student).from_pretrained(folder, dtype=student.dtype)
        student.load_state_dict(saved.state_dict())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        beta = torch.tensor(self.controller.beta)
        out: LossOutput = model(**inputs, beta=beta)
        if model.training:
            fkl = self.accelerator.reduce(out.fkl.detach(), "mean")
            rkl = self.accelerator.reduce(out.rkl.detach(), "mean")
            self._step_beta(fkl, rkl)
            for name, value in (("fkl", fkl), ("rkl", rkl), ("teacher_tail_mass", out.teacher_tail),
                                ("student_tail_mass", out.student_tail), ("beta_used", beta)):
                self._sums[name] = self._sums.get(name, 0.0) + float(value)
            self._count += 1
            # every process's loss positions, so throughput under torchrun is the run's
            self.tokens_seen += int(self.accelerator.reduce(out.tokens.detach(), "sum"))
        return (out.loss, out) if return_outputs else out.loss

    def _step_beta(self, fkl: torch.Tensor, rkl: torch.Tensor) -> None:
        """One step of beta per optimizer step (docs/method.md §4), from the means over its
        micro-batches: with gradient accumulation the Trainer calls `compute_loss` once per
        micro-batch, and marks the last one by `sync_gradients`."""
        self._accumulated.append((fkl, rkl))
        if self.accelerator.sync_gradients:
            fkls, rkls = zip(*self._accumulated)
            self.controller.step(torch.stack(fkls).mean(), torch.stack(rkls).mean())
            self._accumulated = []

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._count:
            logs.update({name: total / self._count for name, total in self._sums.items()})
            self._sums, self._count = {}, 0
        if SUMMARY_KEY in logs:  # the Trainer's train_loss covers only the steps of this call
            logs["train_loss"] = mean_step_loss(self.state.log_history)
        elapsed = time.perf_counter() - self._start
        logs.update({
            "beta": self.controller.beta,
            "tokens_per_s": self.tokens_seen / elapsed if elapsed else 0.0,
            "peak_memory_mb": peak_memory_mb(),
        })
        super().log(logs, start_time)
        if self.is_world_process_zero():
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a") as f:
                f.write(json.dumps({"step": self.state.global_step,
                                    "epoch": self.state.epoch, **logs}) + "\n")


def _is_step_entry(line: str, last_step: int) -> bool:
    entry = json.loads(line)
    return SUMMARY_KEY not in entry and entry["step"] <= last_step


def mean_step_loss(history: list[dict]) -> float:
    """The training loss averaged over every step of the run, resumed or not (the Trainer's
    own averages over the steps since the resume). Each logged loss is the mean over the steps
    since the previous log, so it is weighted by their number; every save step is logged, so a
    resumed run's entries are an uninterrupted run's."""
    total, last = 0.0, 0
    for entry in history:
        if "loss" in entry:
            total += entry["loss"] * (entry["step"] - last)
            last = entry["step"]
    return total / last if last else 0.0


class BetaCallback(TrainerCallback):
    """Resets beta at epoch starts (m3) and logs at every save, so a run resumed from a
    checkpoint logs the same entries (loss, beta) as one never stopped."""

    def __init__(self, controller: BetaController) -> None:
        self.controller = controller

    def on_epoch_begin(self, args, state, control, **kwargs):
        # state.epoch is the epoch index at an epoch start, fractional when resumed mid-epoch
        self.controller.start_epoch(math.floor((state.epoch or 0.0) + EPOCH_EPS))

    def on_step_end(self, args, state, control, **kwargs):
        # runs after the Trainer's DefaultFlowCallback has decided whether this step saves
        if control.should_save:
            control.should_log = True


def load_beta_state(controller: BetaController, checkpoint: Path) -> None:
    state = torch.load(checkpoint / BETA_STATE_FILE, weights_only=False)
    controller.load(BetaState(**state))
