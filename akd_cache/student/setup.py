"""Build what a Stage 2 run needs: the student (optionally with LoRA), the live teacher of an
online run, and the Trainer's args."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, TrainingArguments

from akd_cache.config import Experiment, LoraSettings, ModelRef, TrainConfig
from akd_cache.errors import ConfigError

# the loss applies the lm head alone; these would change the logits after it
UNSUPPORTED_LOGIT_SETTINGS = ("logit_scale", "final_logit_softcapping")
LORA_DEFAULT_TARGETS = {
    "gpt_bigcode": ["c_attn"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


def lora_targets(model: PreTrainedModel, settings: LoraSettings) -> list[str]:
    if settings.targets:
        return settings.targets
    kind = model.config.model_type
    if kind not in LORA_DEFAULT_TARGETS:
        raise ConfigError(
            f"no default LoRA targets for model type {kind!r}; set lora.targets in the experiment"
        )
    return LORA_DEFAULT_TARGETS[kind]


def training_dtype(bf16: bool) -> torch.dtype:
    return torch.bfloat16 if bf16 else torch.float32


def load_student(path: str, experiment: Experiment, bf16: bool = False) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=training_dtype(bf16))
    if experiment.lora is None:
        return model
    from peft import LoraConfig, get_peft_model
    from peft.utils.error import NoMatchingPeftModuleError

    settings = experiment.lora
    targets = lora_targets(model, settings)
    try:
        return get_peft_model(model, LoraConfig(
            r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
            target_modules=targets, task_type="CAUSAL_LM",
        ))
    except NoMatchingPeftModuleError:
        raise ConfigError(f"lora.targets {targets}: no module of {path} has any of these names; "
                          "name its attention or MLP projections") from None


def load_frozen_teacher(teacher: ModelRef, dtype: torch.dtype) -> PreTrainedModel:
    """The live teacher, frozen and in eval mode. Every live-teacher path computes its logits as
    W h (+ b) from the hidden states, so a teacher that scales or caps them is refused."""
    model = AutoModelForCausalLM.from_pretrained(
        teacher.model, revision=teacher.revision, dtype=dtype
    )
    for setting in UNSUPPORTED_LOGIT_SETTINGS:
        if getattr(model.config, setting, None):
            raise ConfigError(f"{teacher.model}: {setting} is not supported for a live teacher")
    return model.eval().requires_grad_(False)


def load_teacher(teacher: ModelRef, bf16: bool = False) -> PreTrainedModel:
    """The live teacher of an online run, in the student's dtype."""
    return load_frozen_teacher(teacher, training_dtype(bf16))


def training_arguments(
    train: TrainConfig, output_dir: Path,
    args_class: type[TrainingArguments] = TrainingArguments, **method_args: object,
) -> TrainingArguments:
    """The profile's `train` settings as `args_class` (a TRL config for TRL's trainers), plus
    the method's own arguments."""
    return args_class(
        output_dir=str(output_dir),
        learning_rate=train.lr,
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        optim="adamw_torch",
        weight_decay=0.0,
        lr_scheduler_type="constant",
        logging_steps=train.logging_steps,
        save_steps=train.save_steps,
        save_total_limit=None,  # DistillTrainer rotates: only complete checkpoints count
        bf16=train.bf16,
        seed=train.seed,
        data_seed=train.seed,
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=train.dataloader_workers,
        dataloader_persistent_workers=train.dataloader_workers > 0,
        dataloader_pin_memory=False,
        disable_tqdm=False,
        # accelerate runs several CPU processes (torchrun, gloo) as one job only when told the
        # run is on CPU; otherwise every rank trains alone on all the data
        use_cpu=not torch.cuda.is_available(),
        **method_args,
    )
