"""The `experiments:` section of a sweep spec: one strict model per experiment kind (what it
measures, where, on which tasks, in which shards), and the field types every part of the spec
shares. `orchestrator.spec` builds the whole spec from them."""

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from orchestrator.tasks.binding import MAX_DEPTH

Backend = Literal["hf", "vllm", "auto"]
Site = Literal["resid_pre", "attn_head", "mlp_out"]
# Strict: YAML gives real ints, and `true` or `4.0` for a count is a mistake worth naming.
PositiveInt = Annotated[int, Field(ge=1, strict=True)]
NonNegativeInt = Annotated[int, Field(ge=0, strict=True)]
Flag = Annotated[bool, Field(strict=True)]  # `true`/`false`, not `1` or "yes"
Auto = Literal["auto"]


class Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BehaviorSpec(Strict):
    """Does the model answer right? `template` is `raw` (the program; the answer is the next
    token), `chat` (a question for instruction-tuned models), or a format string using
    `{text}`, `{program}`, `{query}`."""

    backend: Backend = "auto"
    template: str = "raw"
    batch_size: PositiveInt = 64
    programs_per_shard: PositiveInt = 200
    tasks: list[str] | None = None
    max_new_tokens: PositiveInt = 8


class _Intervention(Strict):
    """What patching and attribution share: where to intervene, on which tasks, in which
    shards. `batch_size` is counted in `_BATCH_UNIT` (the subclass says what one item is)."""

    _BATCH_UNIT: ClassVar[str] = ""

    sites: Annotated[list[Site], Field(min_length=1)] = ["resid_pre"]
    layers: list[NonNegativeInt] | None = None
    programs_per_shard: PositiveInt = 20
    tasks: list[str] | None = None

    @field_validator("sites")
    @classmethod
    def _sitesonce(cls, v: list[str]) -> list[str]:
        return once(v, "site")

    @field_validator("batch_size", mode="before", check_fields=False)
    @classmethod
    def _batch_size(cls, v: Any) -> Any:
        return whole_or_auto(v, cls._BATCH_UNIT)

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


class KnockoutSpec(Strict):
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
    def _scopesonce(cls, v: list[str]) -> list[str]:
        return once(v, "scope")

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size(cls, v: Any) -> Any:
        return whole_or_auto(v, "knockout rows per forward pass")

    @property
    def places(self) -> list[str]:
        """What each shard intervenes at besides its layers (`Shard.site`): a scope."""
        return list(self.scopes)


# A binding program's labelled positions a probe may read: the right-hand side of each line
# of the queried chain (`ref_depth_1_rhs` is the root value), and the final colon.
PROBE_LABELS = (*(f"ref_depth_{k}_rhs" for k in range(1, MAX_DEPTH + 1)), "final_colon")
MIN_PROBE_PROGRAMS = 20


class ProbesSpec(Strict):
    """Linear probes (actors/probes.py): at each requested layer and labelled position, a
    regularised linear classifier of the value the position holds, fitted on part of a
    shard's programs and scored on the rest, next to a control task. A probe is fitted per
    shard, on its programs alone, so `programs_per_shard` is the probe's data; one forward
    gives every layer, so a shard holds every requested layer."""

    # 0..n_layers, n_layers being the residual stream leaving the last layer; None: all.
    layers: list[NonNegativeInt] | None = None
    # None: every ref_depth_k_rhs and final_colon.
    labels: Annotated[list[str], Field(min_length=1)] | None = None
    # Programs per forward pass.
    batch_size: PositiveInt = 64
    programs_per_shard: PositiveInt = 200
    # The share of a shard's programs the probe is fitted on; it is scored on the others.
    train_fraction: Annotated[float, Field(gt=0, lt=1, strict=True, allow_inf_nan=False)] = 0.5
    l2: Annotated[float, Field(ge=0, strict=True, allow_inf_nan=False)] = 1e-3
    tasks: list[str] | None = None

    @field_validator("labels")
    @classmethod
    def _binding_labels(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        unknown = [label for label in v if label not in PROBE_LABELS]
        if unknown:
            raise ValueError(
                f"labels {unknown} are not labelled positions of a binding program; fix: use "
                f"some of {list(PROBE_LABELS)}, or omit labels for all of them"
            )
        return once(v, "label")

    @field_validator("programs_per_shard")
    @classmethod
    def _enough_programs(cls, v: int) -> int:
        if v < MIN_PROBE_PROGRAMS:
            raise ValueError(
                f"a probe is fitted on its shard's programs alone, and {v} programs split into "
                "too few to train on and to score; fix: use programs_per_shard >= "
                f"{MIN_PROBE_PROGRAMS} (the default is 200)"
            )
        return v


class Experiments(Strict):
    behavior: BehaviorSpec | None = None
    patching: PatchingSpec | None = None
    attribution: AttributionSpec | None = None
    knockout: KnockoutSpec | None = None
    probes: ProbesSpec | None = None

    @model_validator(mode="after")
    def _some(self) -> "Experiments":
        if all(getattr(self, name) is None for name in type(self).model_fields):
            raise ValueError(
                "no experiment: add behavior: {}, patching: {}, attribution: {}, knockout: {} "
                "and/or probes: {}"
            )
        return self


def once(v: list[str], what: str) -> list[str]:
    if len(set(v)) != len(v):
        raise ValueError(
            f"{what}s {v} repeat a {what} (each would run twice); fix: list each {what} once"
        )
    return v


def whole_or_auto(v: Any, what: str) -> Any:
    """One message for `int >= 1 | "auto"` fields, instead of one per member of the union."""
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        return v
    raise ValueError(f"{what} must be a whole number >= 1 or 'auto'; fix: write e.g. 4, or auto")
