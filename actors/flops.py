"""What a patching plan costs in floating-point operations, from the model's shapes: the
benchmarks' yardstick (achieved FLOP/s against the device's matmul rate), kept apart from the
planner, which counts token-layers (`Plan.cost`)."""

import dataclasses

from actors.plan import Pass, Plan


@dataclasses.dataclass(frozen=True)
class Dims:
    """Model shapes that set the cost of a forward.

    Attributes:
        linear_params: weights of one decoder layer's matrix multiplies (attention and MLP
            projections), so one token through one layer costs `2 * linear_params` FLOPs.
        late_params: the part of `linear_params` after attention (output projection and MLP):
            in a main pass's last layer it runs on the readout positions alone.
        attn_width: n_heads * d_head (query-key and attention-value products per key).
        d_model / vocab: the readout's matrix.
    """

    n_layers: int
    linear_params: int
    late_params: int
    attn_width: int
    d_model: int
    vocab: int


def _attention_keys(start: int, stop: int) -> int:
    """Sum over fed positions t of the keys a causal position attends to (t + 1)."""
    return sum(range(start + 1, stop + 1))


def pass_flops(ps: Pass, dims: Dims) -> int:
    """Matmul FLOPs of one pass: projections, attention products and (main passes) readout."""
    total = 0
    keys = _attention_keys(ps.start, ps.stop)
    for layer in range(ps.last_layer + 1):
        rows = ps.batch(layer)
        total += 2 * dims.linear_params * rows * ps.width + 4 * dims.attn_width * rows * keys
    if ps.read == "logits" and ps.width > ps.n_read:
        # The last layer's output projection and MLP run on the readout positions alone.
        total -= 2 * dims.late_params * ps.batch(ps.last_layer) * (ps.width - ps.n_read)
    if ps.read == "logits":
        total += 2 * dims.d_model * dims.vocab * len(ps.entries) * ps.n_read
    return total


def flops(plan: Plan, dims: Dims) -> dict[str, int]:
    """FLOPs of the plan's passes and of the clean/counterfactual runs (readout at n_read
    positions)."""
    runs = 0
    for shape in plan.programs:
        per_run = dims.n_layers * (
            2 * dims.linear_params * shape.n_tokens
            + 4 * dims.attn_width * _attention_keys(0, shape.n_tokens)
        )
        runs += 2 * (per_run + 2 * dims.d_model * dims.vocab * shape.n_read)
    return {"passes": sum(pass_flops(p, dims) for p in plan.passes), "runs": runs}
