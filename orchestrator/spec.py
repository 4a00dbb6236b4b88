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
      probes: {labels: [ref_depth_1_rhs, final_colon], programs_per_shard: 200}

Every mapping forbids unknown keys, so a typo fails instead of being ignored; counts and sizes
are range-checked. `load_spec` also checks what a field alone cannot: family options against the
family, experiment tasks against the tasks, and the behaviour template, rendered on one program
of each task; then it expands each model entry's `checkpoints` glob into one model per folder,
with its training step (`expand_checkpoints`), so that what follows sees plain models. What
needs the world (model configs, installed backends, the cluster's resources) is checked by
`orchestrator.checks`, still before anything is written.
"""

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from orchestrator.checkpoints import CheckpointError, find_checkpoints
from orchestrator.experiments import (
    Auto,
    Experiments,
    NonNegativeInt,
    PositiveInt,
    Strict,
    once,
    whole_or_auto,
)
from orchestrator.tasks import (
    CHAT_TEMPLATE,
    FAMILIES,
    RAW_TEMPLATE,
    generate,
    get_family,
    render_prompt,
)
from orchestrator.tasks.counterfactuals import KINDS as COUNTERFACTUALS

# `orchestrator.tasks.counterfactuals.KINDS` (a test checks the two agree).
Counterfactual = Literal["root_value", "query_swap", "distractor", "reassign"]


class SpecError(ValueError):
    """A spec that cannot run; the message lists each problem with its fix."""


class TaskSpec(Strict):
    """Programs of one family: `n` per length, indices 0..n-1 of the (seed, family, length)
    stream."""

    family: Literal["binding", "range", "increments", "boolean", "exception"]
    seq_lens: Annotated[list[PositiveInt], Field(min_length=1)]
    n: PositiveInt
    options: dict[str, Any] = Field(default_factory=dict)
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
            once(v, "counterfactual")
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


class ModelSpec(Strict):
    """A model: a Hugging Face id or a local folder written by `save_pretrained` (`id`), or a
    glob of such folders (`checkpoints`), which `load_spec` replaces by one model per folder."""

    id: str | None = None
    # A glob relative to the working directory (as a model id is), e.g.
    # models/binding-traj-step*: one model per matching folder, in the order of their training
    # steps (orchestrator/checkpoints.py), each with this entry's other fields.
    checkpoints: str | None = None
    # The model's training step, in a `step` column of its rows; a checkpoints entry reads
    # each folder's from its training_state.json.
    step: NonNegativeInt | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantization: Literal["none", "int8", "nf4", "auto"] = "auto"
    # Overrides the tasks' answer_prefix for this model: one value, or one per task.
    answer_prefix: str | dict[str, str] | None = None

    @model_validator(mode="after")
    def _id_or_checkpoints(self) -> "ModelSpec":
        if (self.id is None) == (self.checkpoints is None):
            raise ValueError(
                "a model entry needs exactly one of id (a hub id or a folder) and checkpoints "
                "(a glob of checkpoint folders); fix: write e.g. {id: models/binding-tiny} or "
                "{checkpoints: models/binding-traj-step*}"
            )
        if self.checkpoints is not None and self.step is not None:
            raise ValueError(
                f"step {self.step} with checkpoints {self.checkpoints!r}: each folder's step is "
                "read from its training_state.json; fix: drop step, or list the folder by id "
                "with its step"
            )
        return self


class Resources(Strict):
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
        return whole_or_auto(v, "actors per model")


class Spec(Strict):
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
        probed = [t.family for t in self.tasks_for("probes") if t.family != "binding"]
        if probed:
            raise ValueError(
                f"experiments.probes would probe {probed}: probes read binding programs' "
                "labelled positions only; fix: list only binding under experiments.probes.tasks"
            )
        # A checkpoints entry has no id yet: `expand_checkpoints` checks the ids it makes.
        ids = [m.id for m in self.models if m.id is not None]
        if len(set(ids)) != len(ids):
            raise ValueError(f"models list {ids}: an id appears twice; fix: list each model once")
        for m in self.models:
            if isinstance(m.answer_prefix, dict):
                unknown = sorted(set(m.answer_prefix) - set(families))
                if unknown:
                    raise ValueError(
                        f"models[{m.id or m.checkpoints}].answer_prefix names {unknown}, "
                        f"which are not in tasks ({families}); fix: key it by the tasks' "
                        "families, or give one value"
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
    "float_type": "write a number",
    "less_than": "use a smaller value",
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
        spec = Spec.model_validate(data)
    except ValidationError as err:
        raise SpecError(format_errors(path, err)) from None
    return expand_checkpoints(spec, path)


def expand_checkpoints(spec: Spec, path: str | Path = "<spec>") -> Spec:
    """`spec` with each `checkpoints` entry replaced, where it stands, by one model per folder
    its glob matches (`orchestrator.checkpoints`), by step: the folder as matched is the id,
    its training_state.json gives the step, and the entry's other fields apply to each.

    Raises:
        SpecError: a glob that matches no folder, a folder without a step, two folders of one
            step, or a folder that is also another model of the spec.
    """
    if all(m.checkpoints is None for m in spec.models):
        return spec
    models: list[tuple[int, ModelSpec]] = []  # (entry, model)
    problems = []
    for i, m in enumerate(spec.models):
        if m.checkpoints is None:
            models.append((i, m))
            continue
        try:
            found = find_checkpoints(m.checkpoints)
        except CheckpointError as err:
            problems.append(f"  models.{i}.checkpoints = {m.checkpoints!r}: {err}")
            continue
        for folder, step in found:
            update = {"id": folder, "step": step, "checkpoints": None}
            models.append((i, m.model_copy(update=update)))
    seen: dict[str, int] = {}  # the folder (normalised) -> the entry that gave it first
    for i, m in models:
        j = seen.setdefault(os.path.normpath(m.id), i)
        globbed = [k for k in (j, i) if spec.models[k].checkpoints is not None]
        if j != i and globbed:  # (two plain ids are Spec's to check)
            k = globbed[-1]
            problems.append(
                f"  models.{k}.checkpoints = {spec.models[k].checkpoints!r}: matches {m.id}, "
                f"which models.{j if k == i else i} also gives; fix: list each model once "
                "(narrow the glob, or drop the other entry)"
            )
    if problems:
        raise SpecError(f"{path}: the spec is not valid:\n" + "\n".join(problems))
    return spec.model_copy(update={"models": [m for _, m in models]})


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


__all__ = ["FAMILIES", "Spec", "SpecError", "expand_checkpoints", "load_spec", "parse_spec"]
