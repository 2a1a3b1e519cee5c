"""One Stage 2 experiment from start to saved student: what `akd train` runs."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from akd_cache.config import (
    CacheConfig,
    DistillationExperiment,
    Experiment,
    ModelRef,
    SeqKD,
    TrainConfig,
)
from akd_cache.errors import CacheError, ConfigError
from akd_cache.run_settings import MODEL_DIR
from akd_cache.store.reader import TeacherCache, collate, share_with_workers
from akd_cache.student.akd import BetaController
from akd_cache.student.cache_data import cache_dataset
from akd_cache.student.checkpoints import (
    completed_step,
    discard_changed_run,
    discard_checkpoints,
    last_complete_checkpoint,
)
from akd_cache.student.loss import CachedTailModel, LossSettings
from akd_cache.student.seqkd_data import TOKENIZATION_FIELDS, SeqKDDataset
from akd_cache.student.setup import load_student, load_teacher, training_arguments
from akd_cache.student.trainer import (
    DistillationModule,
    DistillTrainer,
    load_beta_state,
    mean_step_loss,
    run_peak_memory_mb,
)

DEFAULT_CACHE = CacheConfig()


def training_data(
    experiment: Experiment, cache_location: str, tokenizer: PreTrainedTokenizerBase,
    generations: str | None, cache_cfg: CacheConfig, train: TrainConfig,
    cache_key: str | None = None,
) -> tuple[torch.utils.data.Dataset, str]:
    """The dataset and the key of what it was made from: the logit cache (refused unless its
    key is `cache_key`, when given), or for SeqKD the teacher's generated responses (text, so
    any student tokenizer will do)."""
    if isinstance(experiment, SeqKD):
        if generations is None:
            raise CacheError(
                "method seqkd needs the teacher's generations; run `akd teacher-generate`"
            )
        dataset = SeqKDDataset.from_generations(generations, tokenizer, cache_cfg)
        return dataset, Path(generations).name
    cache = TeacherCache(cache_location)
    cache.check_student(tokenizer, cache_key)
    return cache_dataset(cache, experiment, train), cache.key


def cached_tail_model(
    experiment: Experiment, train: TrainConfig, dataset: torch.utils.data.Dataset
) -> CachedTailModel:
    """What the cache behind `dataset` stores for the experiment's tail mode, when it trains on
    the cache in the 'shape' or 'lowrank' mode (a distillation dataset is a `CacheDataset`)."""
    settings = LossSettings.of(experiment, train)
    online = isinstance(experiment, DistillationExperiment) and experiment.online
    if online or settings.tail_mode not in ("shape", "lowrank"):
        return CachedTailModel()
    cache = dataset.cache
    if settings.tail_mode == "shape":
        if cache.log_tail_shape is None:
            raise CacheError(f"{cache.location}: tail_mode 'shape' needs a tail shape, and this "
                             "cache has none: build it with cache.tail_shape: true")
        return CachedTailModel(log_tail_shape=torch.from_numpy(cache.log_tail_shape))
    if cache.tail_code is None:
        raise CacheError(f"{cache.location}: tail_mode 'lowrank' needs a tail code, and this "
                         "cache has none: build it with cache.tail_rank > 0")
    code = cache.tail_code
    return CachedTailModel(tail_code_basis=(torch.from_numpy(code.basis),
                                            torch.from_numpy(code.bias)))


def train_experiment(
    cache_location: str, student_path: str, experiment: Experiment, train: TrainConfig,
    out: Path, name: str, generations: str | None = None, cache_cfg: CacheConfig = DEFAULT_CACHE,
    teacher: ModelRef | None = None, cache_key: str | None = None,
) -> dict:
    """Train (resuming from the last complete checkpoint in `out` if any), save the student,
    return the run's metrics: the paper's Table 7 columns (peak memory, wall time, tokens/s)
    included. train_loss is over every step of the run; wall time and tokens/s over this call.

    `teacher` (a resolved path) is loaded only for an online experiment, which still reads the
    cache for its tokens, masks and order."""
    online = isinstance(experiment, DistillationExperiment) and experiment.online
    if online and teacher is None:
        raise ConfigError(f"experiment {name!r} is online: it needs the teacher model")
    tokenizer = AutoTokenizer.from_pretrained(student_path)
    dataset, data_key = training_data(experiment, cache_location, tokenizer, generations,
                                      cache_cfg, train, cache_key)
    student = load_student(student_path, experiment, train.bf16)
    live_teacher = load_teacher(teacher, train.bf16) if online else None
    schedule = experiment.beta_schedule
    controller = BetaController(schedule.variant, beta_init=schedule.initial,
                                reset=schedule.reset, seed=train.seed)
    checkpoints = out / "checkpoints"
    settings = {"data_key": data_key, "student": student_path,
                "experiment": experiment.model_dump(), "train": train.model_dump()}
    if online:
        settings["teacher"] = teacher.model_dump()
    if isinstance(experiment, SeqKD):  # tokenised here: the generations' key does not say how
        settings["tokenization"] = cache_cfg.model_dump(include=TOKENIZATION_FIELDS)
    if train.dataloader_workers:
        share_with_workers()
    args = training_arguments(train, checkpoints)
    discard_changed_run(args, out, settings, checkpoints)
    trainer = DistillTrainer(
        model=DistillationModule(student, experiment, train, live_teacher,
                                 cached_tail_model(experiment, train, dataset)),
        args=args,
        train_dataset=dataset,
        data_collator=collate,
        controller=controller,
        log_path=out / "log.jsonl",
    )
    checkpoint = last_complete_checkpoint(checkpoints)
    if checkpoint:
        load_beta_state(controller, checkpoint)
    trainer.forget_log_after(completed_step(checkpoint) if checkpoint else 0)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    wall = time.perf_counter() - start
    # under torchrun every rank gets here; one writes, once all have finished with the checkpoints
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        student.save_pretrained(out / MODEL_DIR)
        tokenizer.save_pretrained(out / MODEL_DIR)
        discard_checkpoints(checkpoints)  # the saved model supersedes them
    trainer.accelerator.wait_for_everyone()
    peak = run_peak_memory_mb(trainer.accelerator)
    history = [e for e in trainer.state.log_history if "fkl" in e]
    return {
        "experiment": name,
        "method": experiment.method,
        "cache_key": data_key,
        "teacher": "online" if online else "cache",
        "train_loss": mean_step_loss(trainer.state.log_history),
        "final_fkl": history[-1]["fkl"] if history else None,
        "final_rkl": history[-1]["rkl"] if history else None,
        "final_beta": controller.beta,
        "steps": trainer.state.global_step,
        "wall_s": wall,
        "tokens": trainer.tokens_seen,
        "tokens_per_s": trainer.tokens_seen / wall,
        "peak_memory_mb": peak,
    }
