"""The study file: a strict pydantic schema, and loading a YAML study with errors a user understands.

A study names what to compare (methods and their parameters), on what data, with which shared training
settings, and a design: an isoFLOP grid (budgets x model sizes x methods) or an ablation (a base
configuration and crossed axes). `peer_sweeps.plan` expands it into trials.
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from model import MoEConfig, PEERConfig, PKMConfig
from peer_sweeps.data.evaluate import MIN_SAMPLE_TOKENS

METHODS = ("dense", "moe", "pkm", "peer")


class StudyError(ValueError):
    """A study file or argument is invalid; the message names the file, the field and what is wrong."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(_Spec):
    suite: str = "default"
    vocab_size: int = Field(8192, ge=256, le=65536)
    root: str | None = None  # default: $PEER_SWEEPS_DATA or ./data
    # Scored per evaluation set: "all" (the whole split), or a seeded sample of whole documents scoring at
    # least this many tokens (the whole split when smaller): peer_sweeps.data.evaluation_sample.
    eval_tokens: int | Literal["all"] = MIN_SAMPLE_TOKENS

    @field_validator("eval_tokens")
    @classmethod
    def _representative(cls, tokens):
        if tokens != "all" and tokens < MIN_SAMPLE_TOKENS:
            raise ValueError(f"{tokens} tokens cannot represent a set: give at least {MIN_SAMPLE_TOKENS} or 'all'")
        return tokens

    @field_validator("suite")
    @classmethod
    def _known_suite(cls, name):
        from peer_sweeps.data.suites import SUITES

        if name not in SUITES:
            close = difflib.get_close_matches(name, list(SUITES), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known suites: {', '.join(SUITES)}"
            raise ValueError(f"unknown data suite {name!r}; {hint}")
        return name


class LrScaling(_Spec):
    """A per-size learning rate, the same rule for every method: a trial's peak lr is
    training.lr * (params_backbone / reference_params) ** exponent, rounded to 3 significant digits.
    params_backbone (the non-embedding size of the model with dense FFWs) is the same for every method at
    a grid point, so every method gets the same lr at the same size. exponent -1/3 is the ladder rule of
    thumb lr ~ N^(-1/3) (OLMo-core's model ladders); training.lr is the lr measured to work at
    reference_params."""

    reference_params: int = Field(ge=1)
    exponent: float = Field(ge=-2, le=0)

    def lr(self, base_lr: float, params_backbone: int) -> float:
        return float(f"{base_lr * (params_backbone / self.reference_params) ** self.exponent:.3g}")


class TrainingSpec(_Spec):
    seq_len: int = Field(128, ge=8)
    batch_tokens: int = Field(8192, ge=8)  # global batch, whatever the number of workers
    micro_batch_size: int | None = Field(None, ge=1)  # sequences per worker per micro-step; default: all
    lr: float = Field(3e-3, gt=0)  # peak lr; with lr_scaling, the peak lr at its reference size
    lr_scaling: LrScaling | None = None  # default: training.lr for every size
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine decays to lr * min_lr_ratio
    warmup_fraction: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.1, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, gt=0)
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    seeds: tuple[int, ...] = (0,)
    evals: int = Field(4, ge=1)  # evaluations per trial, evenly spaced, the last at the end
    checkpoints: int = Field(2, ge=1)  # checkpoints per trial, evenly spaced, the last at the end
    # the latest checkpoints kept on storage (while training, and once the trial completes: the final one by
    # default, which `peer-sweeps eval` re-evaluates from); older ones are deleted. Not part of the trial id.
    keep_checkpoints: int = Field(1, ge=1)
    max_failures: int = Field(2, ge=0)  # worker failures a trial survives (Ray Train FailureConfig)
    divergence_factor: float = Field(3.0, gt=1)  # loss above factor x its first value: diverged
    # Where PEER's expert tables are optimised (BENCHMARKS.md): "zero", as every other parameter, by the
    # DeepSpeed engine's AdamW on dense gradients; "row_sparse", outside the engine by lazy row-wise AdamW on
    # sparse gradients (model.sparse_adam) - a step that does not grow with the number of experts on CPU.
    expert_tables: Literal["zero", "row_sparse"] = "zero"

    @model_validator(mode="after")
    def _kept_checkpoints(self):
        if self.keep_checkpoints > self.checkpoints:
            raise ValueError(f"keep_checkpoints: {self.keep_checkpoints} is more than the trial's "
                             f"checkpoints ({self.checkpoints})")
        return self

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds):
        if not seeds:
            raise ValueError("at least one seed is needed")
        return seeds


class BackboneSpec(_Spec):
    """Model settings shared by every trial; the model size (d_model, n_layers) comes from the design."""

    head_dim: int = Field(64, ge=1)
    d_ff_ratio: int = Field(4, ge=1)
    tie_embeddings: bool = True
    sparse_layers: tuple[int, ...] | None = None  # default: the middle block


class DenseMethod(_Spec):
    method: Literal["dense"] = "dense"


# Method parameters are the model library's configs, loaded strictly from the study.
MethodSpec = Annotated[Union[DenseMethod, MoEConfig, PKMConfig, PEERConfig], Field(discriminator="method")]


class ModelSize(_Spec):
    d_model: int = Field(ge=8)
    n_layers: int = Field(ge=1)


class GridSize(ModelSize):
    """A size of an isoFLOP grid; with `budgets`, only at those budgets (Chinchilla-style grids that shift
    toward larger models as the budget grows)."""

    budgets: tuple[float, ...] | None = Field(None, min_length=1)


class IsoFlopDesign(_Spec):
    kind: Literal["isoflop"] = "isoflop"
    budgets: tuple[float, ...] = Field(min_length=1)  # training FLOPs per trial
    sizes: tuple[GridSize, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _size_budgets(self):
        for i, size in enumerate(self.sizes):
            for budget in size.budgets or ():
                if budget not in self.budgets:
                    raise ValueError(f"sizes.{i}.budgets: {budget:g} is not one of the design's budgets")
        return self

    def sizes_at(self, budget: float) -> list[GridSize]:
        return [s for s in self.sizes if s.budgets is None or budget in s.budgets]

    @field_validator("budgets")
    @classmethod
    def _positive(cls, budgets):
        for budget in budgets:
            if not budget > 0:
                raise ValueError(f"budget {budget} must be positive")
        return budgets


class AblationAxes(_Spec):
    """Crossed axes; each overrides the base method's parameter of the same name."""

    num_experts: tuple[int, ...] | None = Field(None, min_length=1)
    heads_top_k: tuple[tuple[int, int], ...] | None = Field(None, min_length=1)  # (heads, top_k) pairs
    query_bn: tuple[bool, ...] | None = Field(None, min_length=1)

    def items(self) -> list[tuple[str, tuple]]:
        return [(name, values) for name, values in self if values is not None]


class AblationDesign(_Spec):
    """Crossed axes of one sparse method at one size (`size`) or, for isoFLOP curves per setting (the
    paper's Fig. 3), at several (`sizes`); `reference: dense` adds dense trials at the same sizes and
    budgets, drawn beside the curves."""

    kind: Literal["ablation"] = "ablation"
    method: Literal["moe", "pkm", "peer"]
    size: ModelSize | None = None
    sizes: tuple[ModelSize, ...] | None = Field(None, min_length=1)
    reference: Literal["dense"] | None = None
    axes: AblationAxes
    budgets: tuple[float, ...] | None = Field(None, min_length=1)  # FLOPs; or a fixed number of tokens:
    tokens: int | None = Field(None, ge=1)

    @property
    def all_sizes(self) -> tuple[ModelSize, ...]:
        return self.sizes if self.sizes is not None else (self.size,)

    @model_validator(mode="after")
    def _horizon(self):
        if (self.size is None) == (self.sizes is None):
            raise ValueError("give exactly one of size or sizes")
        if (self.budgets is None) == (self.tokens is None):
            raise ValueError("give exactly one of budgets or tokens")
        if not self.axes.items():
            raise ValueError("axes: give at least one axis (num_experts, heads_top_k or query_bn)")
        for budget in self.budgets or ():
            if not budget > 0:
                raise ValueError(f"budget {budget} must be positive")
        return self


Design = Annotated[Union[IsoFlopDesign, AblationDesign], Field(discriminator="kind")]


class Resources(_Spec):
    workers_per_trial: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    max_concurrent: int | None = Field(None, ge=1)
    gpu_memory_gb: float = Field(80.0, gt=0)  # device memory a GPU worker may use; plan fits micro-batches to it


class Tracking(_Spec):
    wandb_project: str = "peer-sweeps"
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"


class Study(_Spec):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    data: DataSpec = DataSpec()
    training: TrainingSpec = TrainingSpec()
    model: BackboneSpec = BackboneSpec()
    methods: dict[Literal["dense", "moe", "pkm", "peer"], MethodSpec] = Field(min_length=1)
    design: Design
    resources: Resources = Resources()
    tracking: Tracking = Tracking()

    @field_validator("methods", mode="before")
    @classmethod
    def _method_names(cls, methods):
        # `methods: {peer: {num_experts: ...}}`: the key is the method, the body its parameters.
        if isinstance(methods, dict):
            return {name: {"method": name} | (body or {}) if isinstance(body, dict) or body is None else body
                    for name, body in methods.items()}
        return methods

    @model_validator(mode="after")
    def _row_sparse_tables(self):
        training = self.training
        if training.expert_tables != "row_sparse":
            return self
        if training.zero_stage not in (1, 2):
            raise ValueError(f"training.expert_tables: row_sparse needs zero_stage 1 or 2 (got {training.zero_stage}):"
                             " stage 0 would average the table gradients twice, stage 3 partitions the tables")
        if training.precision == "bf16" or (training.precision == "auto" and self.resources.gpus_per_worker > 0):
            why = "precision bf16" if training.precision == "bf16" else "precision auto is bf16 on GPU workers"
            raise ValueError(f"training.expert_tables: row_sparse needs fp32 tables, and {why}; "
                             "set training.precision: fp32")
        return self

    @model_validator(mode="after")
    def _ablated_method_is_configured(self):
        if isinstance(self.design, AblationDesign) and self.design.method not in self.methods:
            raise ValueError(f"design.method {self.design.method!r} is not among methods {sorted(self.methods)}")
        if isinstance(self.design, AblationDesign) and self.design.reference and self.design.reference not in self.methods:
            raise ValueError(f"design.reference {self.design.reference!r} is not among methods {sorted(self.methods)}")
        return self


def load_study(path: str | Path) -> Study:
    """Reads and validates a study file; raises StudyError with one short message."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StudyError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise StudyError(f"{path}: is a directory, not a study file") from None
    except UnicodeDecodeError as e:
        raise StudyError(f"{path}: not a UTF-8 text file (byte {e.start})") from None
    except OSError as e:  # permissions, a path through a file, an I/O error
        raise StudyError(f"{path}: cannot read: {e.strerror or type(e).__name__}") from None
    try:
        raw = yaml.load(text, Loader=_StudyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise StudyError(f"{path}:{where} invalid YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: expected a mapping of study fields, got {type(raw).__name__}")
    return parse_study(raw, source=str(path))


class _StudyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error: PyYAML keeps the last
    value and silently drops the first, so a study with `methods:` twice would run half its arms. Keys merged in
    with `<<: *anchor` may still be overridden, as YAML intends."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (first on line {seen[key].line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


def parse_study(raw: dict[str, Any], source: str = "<study>") -> Study:
    try:
        # Strict JSON-mode validation: lists may fill tuples and ints floats, but "3" is no number.
        return Study.model_validate_json(json.dumps(_yaml_numbers(raw)), strict=True)
    except (TypeError, ValueError) as e:
        if not isinstance(e, ValidationError):
            raise StudyError(f"{source}: cannot be read as plain data: {e}") from None
        raise StudyError(f"{source}: {describe_error(e.errors()[0])}") from None


def _yaml_numbers(value):
    """YAML 1.1 reads `1e14` as a string; accept such literals where numbers are expected."""
    if isinstance(value, dict):
        return {k: _yaml_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_yaml_numbers(v) for v in value]
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        if any(c in value.lower() for c in "e.") and value.strip().lower() not in ("nan", "inf", "-inf", "infinity"):
            return number
    return value


def describe_error(error: dict) -> str:
    """`field.path: what is wrong` for one pydantic error, with the nearest valid name for unknown keys."""
    shown, parent = _follow(error["loc"])
    path = ".".join(shown) or "(top level)"
    if error["type"] == "extra_forbidden":
        valid = list(parent.model_fields) if parent is not None else []
        close = difflib.get_close_matches(shown[-1], valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else (f"; valid keys: {', '.join(valid)}" if valid else "")
        return f"{path}: unknown key{hint}"
    if error["type"] == "missing":
        return f"{path}: required field is missing"
    message = error["msg"].removeprefix("Value error, ")
    return f"{path}: {message}"


def _follow(loc: tuple) -> tuple[list[str], type[BaseModel] | None]:
    """Walks an error location through the schema: the location as a user wrote it (without pydantic's
    union tags), and the model that holds its last key (None where it cannot be followed)."""
    shown: list[str] = []
    current: Any = Study
    parent: type[BaseModel] | None = None
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        shown.append(str(part))
        if current is None:
            continue
        parent = current if isinstance(current, type) and issubclass(current, BaseModel) else None
        current = _child(current, part)
        current, tagged = _resolve_union(current, parts[0] if parts else None)
        if tagged:
            parts.pop(0)
    return shown, parent


def _child(annotation, part):
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = annotation.model_fields.get(str(part))
        return field.annotation if field is not None else None
    origin = typing.get_origin(annotation)
    if origin is dict:
        return typing.get_args(annotation)[1]
    if origin in (list, tuple):
        return typing.get_args(annotation)[0]
    return None


def _resolve_union(annotation, next_part) -> tuple[Any, bool]:
    """Unwraps Annotated/Optional; for a discriminated union returns the member named by the tag in the
    location (pydantic puts it there) and True."""
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) not in (Union, types.UnionType):
        return annotation, False
    members = [a for a in typing.get_args(annotation) if a is not type(None)]
    for member in members:
        if isinstance(member, type) and issubclass(member, BaseModel):
            tag = member.model_fields.get("method") or member.model_fields.get("kind")
            if tag is not None and tag.default == next_part:
                return member, True
    return (_resolve_union(members[0], next_part) if len(members) == 1 else (None, False))
