"""Sweep specs: YAML in, a frozen, validated `Spec` out, or an error that names the fix.

    run: quickstart
    output: results
    seed: 0
    tasks:
      - {family: binding, seq_lens: [8, 16], n: 20, options: {style: paper},
         counterfactual: [root_value, distractor]}
    models:
      - {id: models/binding-tiny}
    experiments:
      behavior: {backend: hf}
      patching: {sites: [resid_pre, attn_head], layers_per_shard: 2, positions: targets}
      attribution: {sites: [resid_pre, attn_head], verify_top_k: 4}
      knockout: {scopes: [answer], layers_per_shard: 3}

Every mapping forbids unknown keys, so a typo fails instead of being ignored; counts and sizes
are range-checked. `load_spec` also checks what a field alone cannot: family options against the
family, experiment tasks against the tasks, and the behaviour template, rendered on one program of
each task. What needs the world (model configs, installed backends, the cluster's resources) is
checked by `orchestrator.checks`, still before anything is written.
"""

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator.tasks import (
    CHAT_TEMPLATE,
    FAMILIES,
    RAW_TEMPLATE,
    generate,
    get_family,
    render_prompt,
)
from orchestrator.tasks.counterfactuals import KINDS as COUNTERFACTUALS

Backend = Literal["hf", "vllm", "auto"]
Site = Literal["resid_pre", "attn_head", "mlp_out"]
# Strict: YAML gives real ints, and `true` or `4.0` for a count is a mistake worth naming.
PositiveInt = Annotated[int, Field(ge=1, strict=True)]
NonNegativeInt = Annotated[int, Field(ge=0, strict=True)]
Flag = Annotated[bool, Field(strict=True)]  # `true`/`false`, not `1` or "yes"
Auto = Literal["auto"]
# `orchestrator.tasks.counterfactuals.KINDS` (a test checks the two agree).
Counterfactual = Literal["root_value", "query_swap", "distractor", "reassign"]


class SpecError(ValueError):
    """A spec that cannot run; the message lists each problem with its fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TaskSpec(_Strict):
    """Programs of one family: `n` per length, indices 0..n-1 of the (seed, family, length)
    stream."""

    family: Literal["binding", "range", "increments", "boolean", "exception"]
    seq_lens: Annotated[list[PositiveInt], Field(min_length=1)]
    n: PositiveInt
    options: dict[str, Any] = {}
    # Text between the prompt and the answer, or `auto`: from each model's greedy next token
    # (actors/answers.py). A model entry may override it.
    answer_prefix: str = "auto"
    # What each patched program is compared with (orchestrator/tasks/counterfactuals.py): a
    # kind, or a list of kinds, each patched in shards of its own. Kinds other than root_value
    # are defined for binding only. Patching only: attribution and knockout keep root_value.
    counterfactual: Counterfactual | list[Counterfactual] = "root_value"

    @field_validator("seq_lens")
    @classmethod
    def _unique(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seq_lens {v} repeats a length; fix: list each length once")
        return v

    @field_validator("counterfactual", mode="before")
    @classmethod
    def _known_kinds(cls, v: Any) -> Any:
        """One message per mistake, instead of one per member of the union."""
        kinds = [v] if isinstance(v, str) else v
        if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
            raise ValueError(
                f"counterfactual must be a kind or a list of kinds, one of {list(COUNTERFACTUALS)}"
                "; fix: write e.g. distractor, or [root_value, distractor]"
            )
        if not kinds:
            raise ValueError("counterfactual [] names no kind; fix: write e.g. root_value")
        unknown = [k for k in kinds if k not in COUNTERFACTUALS]
        if unknown:
            raise ValueError(
                f"unknown counterfactual kind {', '.join(map(repr, unknown))}; fix: use one of "
                f"{list(COUNTERFACTUALS)}"
            )
        if isinstance(v, list):
            _once(v, "counterfactual")
        return v

    @property
    def counterfactuals(self) -> list[str]:
        """The counterfactual kinds to patch, in the order given."""
        v = self.counterfactual
        return [v] if isinstance(v, str) else list(v)

    @model_validator(mode="after")
    def _family_accepts(self) -> "TaskSpec":
        family = get_family(self.family)
        short = [x for x in self.seq_lens if x < family.min_seq_len]
        if short:
            raise ValueError(
                f"seq_lens {short} are too short for {self.family}: it needs at least "
                f"{family.min_seq_len} lines; fix: use longer programs"
            )
        others = [k for k in self.counterfactuals if k != "root_value"]
        if others and self.family != "binding":
            raise ValueError(
                f"counterfactual {others} is defined for binding programs only, not "
                f"{self.family}; fix: use root_value for this task"
            )
        # Generate one program: this checks every option's name and value with the family.
        generate(self.family, 0, self.seq_lens[0], 0, **self.options)
        return self


class ModelSpec(_Strict):
    """A model: a Hugging Face id or a local folder written by `save_pretrained`."""

    id: str
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantization: Literal["none", "int8", "nf4", "auto"] = "auto"
    # Overrides the tasks' answer_prefix for this model: one value, or one per task.
    answer_prefix: str | dict[str, str] | None = None


class BehaviorSpec(_Strict):
    """Does the model answer right? `template` is `raw` (the program; the answer is the next
    token), `chat` (a question for instruction-tuned models), or a format string using
    `{text}`, `{program}`, `{query}`."""

    backend: Backend = "auto"
    template: str = "raw"
    batch_size: PositiveInt = 64
    programs_per_shard: PositiveInt = 200
    tasks: list[str] | None = None
    max_new_tokens: PositiveInt = 8


class _Intervention(_Strict):
    """What patching and attribution share: where to intervene, on which tasks, in which
    shards. `batch_size` is counted in `_BATCH_UNIT` (the subclass says what one item is)."""

    _BATCH_UNIT: ClassVar[str] = ""

    sites: Annotated[list[Site], Field(min_length=1)] = ["resid_pre"]
    layers: list[NonNegativeInt] | None = None
    programs_per_shard: PositiveInt = 20
    tasks: list[str] | None = None

    @field_validator("sites")
    @classmethod
    def _sites_once(cls, v: list[str]) -> list[str]:
        return _once(v, "site")

    @field_validator("batch_size", mode="before", check_fields=False)
    @classmethod
    def _batch_size(cls, v: Any) -> Any:
        return _whole_or_auto(v, cls._BATCH_UNIT)

    @property
    def places(self) -> list[str]:
        """What each shard intervenes at besides its layers (`Shard.site`): a site."""
        return list(self.sites)


class PatchingSpec(_Intervention):
    """Causal tracing: every (site, layer, position[, head]) patch of every program."""

    _BATCH_UNIT: ClassVar[str] = "patches per forward pass"

    layers_per_shard: PositiveInt = 4
    positions: Literal["all", "targets"] = "targets"
    # Rows per forward pass at most; `auto`: sized from the device's memory by the engine
    # (actors/budget.py), which also splits a pass that runs out of memory.
    batch_size: PositiveInt | Auto = "auto"
    # `first_token`: the logits of the first tokens at which the two answers differ;
    # `answer_logprob`: the summed log-probability of each whole answer (teacher forcing).
    metric: Literal["first_token", "answer_logprob"] = "first_token"


class AttributionSpec(_Intervention):
    """Attribution patching (actors/attribution.py): a first-order estimate of every (site,
    layer, position[, head]) patch from one forward pair and one backward per batch, so a shard
    holds every requested layer (one backward gives them all) and is never cut by layers."""

    _BATCH_UNIT: ClassVar[str] = "programs per forward and backward"

    positions: Literal["all", "targets"] = "all"
    # Programs per forward and backward; `auto`: sized from the device's memory by the actor.
    batch_size: PositiveInt | Auto = "auto"
    # AtP* (Kramár et al. 2024), both at the cost of extra passes: `attention_fix` recomputes
    # the part of a resid_pre effect that goes through its layer's queries and keys (where the
    # softmax saturates its gradient says nothing); `grad_drop` scores each cell again with each
    # layer's attention and MLP gradient zeroed in turn, so effects that cancel still show.
    attention_fix: Flag = False
    grad_drop: Flag = False
    # Per program, the K cells with the largest |estimate| and K others drawn at random are
    # also patched exactly, so the estimate's error is measured where it matters and elsewhere.
    verify_top_k: NonNegativeInt = 0


class KnockoutSpec(_Strict):
    """Attention knockout (actors/knockout.py): for every (layer, head) and labelled source
    position (the root value, each hop of the chain, the query variable), the attention from the
    answer position (`answer`) or from every position after the source (`later`) to the source
    is blocked in that head alone, and the change of the logit difference measured."""

    scopes: Annotated[list[Literal["answer", "later"]], Field(min_length=1)] = ["answer"]
    layers: list[NonNegativeInt] | None = None
    layers_per_shard: PositiveInt = 4
    # Knockout rows per forward; `auto`: sized from the device's memory by the actor.
    batch_size: PositiveInt | Auto = "auto"
    programs_per_shard: PositiveInt = 20
    tasks: list[str] | None = None

    @field_validator("scopes")
    @classmethod
    def _scopes_once(cls, v: list[str]) -> list[str]:
        return _once(v, "scope")

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size(cls, v: Any) -> Any:
        return _whole_or_auto(v, "knockout rows per forward pass")

    @property
    def places(self) -> list[str]:
        """What each shard intervenes at besides its layers (`Shard.site`): a scope."""
        return list(self.scopes)


class Experiments(_Strict):
    behavior: BehaviorSpec | None = None
    patching: PatchingSpec | None = None
    attribution: AttributionSpec | None = None
    knockout: KnockoutSpec | None = None

    @model_validator(mode="after")
    def _some(self) -> "Experiments":
        if all(getattr(self, name) is None for name in type(self).model_fields):
            raise ValueError(
                "no experiment: add behavior: {}, patching: {}, attribution: {} and/or knockout: {}"
            )
        return self


class Resources(_Strict):
    """What each actor holds. `auto`: one GPU per actor where there are GPUs (more when the
    model needs them), and as many actors per model as the cluster's GPUs allow."""

    gpus_per_actor: Annotated[float, Field(ge=0, allow_inf_nan=False)] | Auto = "auto"
    actors_per_model: PositiveInt | Auto = "auto"
    cpus_per_actor: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 0.5
    max_in_flight_per_actor: PositiveInt = 2
    max_attempts: PositiveInt = 3

    @field_validator("gpus_per_actor", mode="before")
    @classmethod
    def _gpus(cls, v: Any) -> Any:
        if v == "auto":
            return v
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < float("inf"):
            raise ValueError(
                "GPUs per actor must be a number >= 0 (0: actors on CPUs; 0.5: two actors "
                "share a GPU) or 'auto'; fix: write e.g. 1, or auto"
            )
        return v

    @field_validator("actors_per_model", mode="before")
    @classmethod
    def _actors(cls, v: Any) -> Any:
        return _whole_or_auto(v, "actors per model")


def _once(v: list[str], what: str) -> list[str]:
    if len(set(v)) != len(v):
        raise ValueError(
            f"{what}s {v} repeat a {what} (each would run twice); fix: list each {what} once"
        )
    return v


def _whole_or_auto(v: Any, what: str) -> Any:
    """One message for `int >= 1 | "auto"` fields, instead of one per member of the union."""
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        return v
    raise ValueError(f"{what} must be a whole number >= 1 or 'auto'; fix: write e.g. 4, or auto")


class Spec(_Strict):
    run: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    output: str = "results"
    seed: int = 0
    tasks: Annotated[list[TaskSpec], Field(min_length=1)]
    models: Annotated[list[ModelSpec], Field(min_length=1)]
    experiments: Experiments
    resources: Resources = Resources()

    @model_validator(mode="after")
    def _cross_checks(self) -> "Spec":
        families = [t.family for t in self.tasks]
        if len(set(families)) != len(families):
            raise ValueError(f"tasks list a family twice ({families}); fix: merge their seq_lens")
        for name in Experiments.model_fields:
            exp = getattr(self.experiments, name)
            if exp is not None and exp.tasks is not None:
                unknown = sorted(set(exp.tasks) - set(families))
                if unknown:
                    raise ValueError(
                        f"experiments.{name}.tasks names {unknown}, which are not in tasks "
                        f"({families}); fix: add them to tasks or remove them here"
                    )
        ids = [m.id for m in self.models]
        if len(set(ids)) != len(ids):
            raise ValueError(f"models list {ids}: an id appears twice; fix: list each model once")
        for m in self.models:
            if isinstance(m.answer_prefix, dict):
                unknown = sorted(set(m.answer_prefix) - set(families))
                if unknown:
                    raise ValueError(
                        f"models[{m.id}].answer_prefix names {unknown}, which are not in tasks "
                        f"({families}); fix: key it by the tasks' families, or give one value"
                    )
        self._render_templates()
        return self

    def _render_templates(self) -> None:
        """Fill the behaviour template with one program of each task it will score, so that a
        bad template fails here rather than in every behaviour shard on the cluster."""
        behavior = self.experiments.behavior
        if behavior is None:
            return
        template = {"raw": RAW_TEMPLATE, "chat": CHAT_TEMPLATE}.get(
            behavior.template, behavior.template
        )
        for task in self.tasks_for("behavior"):
            program = generate(task.family, self.seed, task.seq_lens[0], 0, **task.options)
            try:
                render_prompt(program, template)
            except (ValueError, AttributeError, TypeError) as err:
                raise ValueError(
                    f"experiments.behavior.template = {behavior.template!r} does not render a "
                    f"{task.family} program: {err}; fix: use raw, chat, or a format string with "
                    "{text}, {program} and {query} only (write {{ and }} for literal braces)"
                ) from None

    def answer_prefix(self, model: str, task: str) -> str:
        """The answer prefix of `task`'s programs on `model`: the model's override, else the
        task's."""
        m = next(m for m in self.models if m.id == model)
        override = m.answer_prefix
        if isinstance(override, dict):
            override = override.get(task)
        if override is not None:
            return override
        return next(t for t in self.tasks if t.family == task).answer_prefix

    def results_dir(self, output: str | None = None) -> Path:
        """`<output>/<run>/`, where `output` overrides the spec's."""
        return Path(output or self.output) / self.run

    def tasks_for(self, experiment: str) -> list[TaskSpec]:
        exp = getattr(self.experiments, experiment)
        if exp is None:
            return []
        return [t for t in self.tasks if exp.tasks is None or t.family in exp.tasks]


_FIXES = {
    "extra_forbidden": "remove it, or check its spelling against the allowed keys: {allowed}",
    "missing": "add it",
    "literal_error": "use one of the allowed values",
    "int_parsing": "write a whole number",
    "int_type": "write a whole number",
    "int_from_float": "write a whole number",
    "finite_number": "write a finite number",
    "string_type": "write a string",
    "bool_type": "write true or false",
    "float_parsing": "write a number",
    "list_type": "write a YAML list, e.g. [a, b]",
    "dict_type": "write a YAML mapping, e.g. {key: value}",
    "model_type": "write a YAML mapping, e.g. {key: value}",
    "greater_than_equal": "use a larger value",
    "greater_than": "use a larger value",
    "too_short": "give at least one item",
    "string_pattern_mismatch": "use letters, digits, '.', '_' and '-' only",
}


def _allowed_keys(loc: tuple) -> str:
    """Field names of the model that holds `loc`'s parent."""
    model: Any = Spec
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return "?"
        ann = field.annotation
        for candidate in getattr(ann, "__args__", (ann,)):
            inner = getattr(candidate, "__args__", (candidate,))
            found = [
                c for c in (candidate, *inner) if isinstance(c, type) and issubclass(c, BaseModel)
            ]
            if found:
                model = found[0]
                break
    return ", ".join(model.model_fields) if hasattr(model, "model_fields") else "?"


def format_errors(path: str | Path, err: ValidationError) -> str:
    """One line per problem: file, field path, bad value, what is wrong, and the fix."""
    lines = [f"{path}: the spec is not valid ({err.error_count()} problem(s)):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "value_error":  # our own validators: the message says what and the fix
            msg = e["msg"].removeprefix("Value error, ")
            if not e["loc"]:  # a check across fields: the message names them
                lines.append(f"  {msg}")
            elif isinstance(e.get("input"), dict | list):  # a check of a whole entry
                lines.append(f"  {loc}: {msg}")
            else:
                lines.append(f"  {loc} = {e.get('input')!r}: {msg}")
            continue
        value = e.get("input")
        shown = "" if e["type"] == "missing" else f" = {value!r}"
        fix = _FIXES.get(e["type"], "see the example in specs/quickstart.yaml")
        fix = fix.format(allowed=_allowed_keys(e["loc"]))
        lines.append(f"  {loc}{shown}: {e['msg']}; fix: {fix}")
    return "\n".join(lines)


def parse_spec(data: Any, path: str | Path = "<spec>") -> Spec:
    """Validate already-parsed YAML.

    Raises:
        SpecError: with every problem listed (see `format_errors`).
    """
    if not isinstance(data, dict):
        raise SpecError(f"{path}: the spec must be a YAML mapping, got {type(data).__name__}")
    try:
        return Spec.model_validate(data)
    except ValidationError as err:
        raise SpecError(format_errors(path, err)) from None


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec file (`yaml.safe_load`).

    Raises:
        SpecError: unreadable file, bad YAML, or an invalid spec.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SpecError(f"{path}: cannot read the spec ({err.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML: {err}") from None
    return parse_spec(data, path)


__all__ = ["FAMILIES", "Spec", "SpecError", "load_spec", "parse_spec"]
