"""The statistics of a linear probe, apart from any model: the train/test split of a set of
programs, the control task's labels (Hewitt & Liang 2019) and the fit of a multinomial
logistic-regression probe. `actors.probes` gathers the activations and calls these.

* Split (`split`): programs ranked by a SHA-256 of (seed, task, seq_len, index), the first
  `round(train_fraction * n)` the train split: the same in any order of the programs, and one
  split for every (layer, label), so a program is on one side for all of them.
* Fit (`fit_probe`): features standardised with the train split's mean and std, softmax
  regression with an L2 penalty on the weights, full-batch L-BFGS in float64 from zeros:
  deterministic, no learning rate or epochs to tune.
"""

import hashlib
import random
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from orchestrator.tasks.base import Program

__all__ = ["as_program", "control_labels", "fit_probe", "majority", "seed_hash", "split"]

MAX_ITER = 200  # L-BFGS iterations (one full-batch step of `torch.optim.LBFGS`)
HISTORY = 20  # L-BFGS curvature pairs kept
STD_MIN = 1e-6  # a feature's std below this is taken as this (a constant feature stays 0)


def seed_hash(*parts: object) -> int:
    """A 64-bit number from a SHA-256 of `parts` (the same in every process and Python)."""
    key = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big")


def as_program(program: Program | Mapping) -> Program:
    return Program.from_dict(dict(program)) if isinstance(program, Mapping) else program


def split(
    programs: Sequence[Program | Mapping], train_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Train and test indices into `programs`: the `round(train_fraction * n)` programs first
    by a SHA-256 of (seed, task, seq_len, index) are the train split.

    A program's rank depends on it alone, so the split of a set of programs is the same in
    any order (Python's `round` halves to even: 5 programs at 0.5 give 2 train).

    Returns:
        (train, test), each ascending.

    Raises:
        ValueError: `train_fraction` not strictly between 0 and 1.
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction={train_fraction} must be strictly between 0 and 1")
    progs = [as_program(p) for p in programs]
    ranked = sorted(
        range(len(progs)),
        key=lambda i: (seed_hash(seed, progs[i].task, progs[i].seq_len, progs[i].index), i),
    )
    n_train = round(train_fraction * len(progs))
    return sorted(ranked[:n_train]), sorted(ranked[n_train:])


def control_labels(variables: Sequence[str], n_classes: int, seed: int) -> list[int]:
    """The control task's labels: each variable's class in `range(n_classes)`, drawn from a
    `random.Random` seeded by (seed, variable), so a variable always has one class whatever
    the other variables are, and different variables are drawn independently.

    Raises:
        ValueError: `n_classes` < 1.
    """
    if n_classes < 1:
        raise ValueError(f"n_classes={n_classes} must be >= 1")
    drawn: dict[str, int] = {}
    for var in variables:
        if var not in drawn:
            drawn[var] = random.Random(seed_hash(seed, var)).randrange(n_classes)
    return [drawn[var] for var in variables]


def fit_probe(
    x_train: Float[Tensor, "train d"],
    y_train: Int[Tensor, " train"],
    x_test: Float[Tensor, "test d"],
    y_test: Int[Tensor, " test"],
    n_classes: int,
    l2: float,
) -> float:
    """Fit a multinomial logistic-regression probe on the train split; its test accuracy.

    Settings: float64 on the CPU; features standardised by the train split's mean and std
    (clamped at `STD_MIN`); loss = mean cross-entropy + `l2 * ||W||^2` (the bias is not
    penalised); weights and bias start at zero; one full-batch `torch.optim.LBFGS` step of up
    to `MAX_ITER` iterations with a strong-Wolfe line search and `HISTORY` curvature pairs.
    Nothing is random, so the same inputs give the same accuracy.

    Args:
        x_train / x_test: features, one row per example.
        y_train / y_test: classes in `range(n_classes)`.
        n_classes: the number of classes (some may be absent from the train split).
        l2: the penalty's weight (> 0 keeps separable data's weights finite).

    Returns:
        The fraction of test examples whose highest-scoring class is their own.

    Raises:
        ValueError: an empty split, a class out of range, or a negative `l2`.
    """
    if len(x_train) == 0 or len(x_test) == 0:
        raise ValueError(f"empty split: {len(x_train)} train, {len(x_test)} test examples")
    if l2 < 0:
        raise ValueError(f"l2={l2} must be >= 0")
    for name, y in (("y_train", y_train), ("y_test", y_test)):
        if y.min() < 0 or y.max() >= n_classes:
            raise ValueError(f"{name} has classes outside range({n_classes}): {y.unique()}")
    x_tr = x_train.detach().to("cpu", torch.float64)
    x_te = x_test.detach().to("cpu", torch.float64)
    mean, std = x_tr.mean(0), x_tr.std(0, correction=0).clamp_min(STD_MIN)
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    y_tr = y_train.to("cpu", torch.long)
    weight = torch.zeros(x_tr.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=MAX_ITER,
        history_size=HISTORY,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x_tr @ weight + bias, y_tr) + l2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        predicted = (x_te @ weight + bias).argmax(1)
    return (predicted == y_test.to("cpu", torch.long)).double().mean().item()


def majority(y: Tensor) -> float:
    return torch.bincount(y).max().item() / len(y)
