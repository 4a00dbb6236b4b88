"""Linear probes (`actors.probes`): the fit recovers a planted code and stays at chance on noise;
the control task reads the variable and nothing else; the split and the control labels are
fixed functions of the programs; on a tiny model the gathered activations are Hugging Face's
`hidden_states`, and the embedding of the root digit identifies the root value."""

import dataclasses
import random

import pyarrow.compute as pc
import pytest
import torch

from actors import load_model
from actors.probes import (
    PROBES_SCHEMA,
    Prober,
    control_labels,
    fit_probe,
    split,
    target_of,
    variable_at,
)
from orchestrator.tasks import generate, iter_programs
from tests.tiny import save_tiny_model

N_LAYERS = 2
N_CLASSES = 10


@pytest.fixture(autouse=True)
def one_thread():
    """The fits here are of a few dozen examples, where waking torch's threads costs more than
    the arithmetic (20x on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def planted(seed: int, n: int, d: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced labels in range(N_CLASSES) and features = the label's random code * scale +
    unit Gaussian noise: a code that a linear probe can read."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % N_CLASSES)[torch.randperm(n, generator=g)]
    codes = torch.randn(N_CLASSES, d, generator=g)
    return torch.randn(n, d, generator=g) + scale * codes[y], y


def test_fit_probe_reads_a_planted_code_and_not_noise() -> None:
    x, y = planted(0, n=400, d=64, scale=0.5)
    accuracy = fit_probe(x[:200], y[:200], x[200:], y[200:], N_CLASSES, l2=1e-3)
    assert accuracy > 0.8, accuracy
    assert fit_probe(x[:200], y[:200], x[200:], y[200:], N_CLASSES, l2=1e-3) == accuracy
    # Labels independent of the features: 64 dimensions fit 200 train labels, but the test
    # split stays near 1/10 (balanced classes, 200 test examples).
    g = torch.Generator().manual_seed(1)
    noise = (torch.arange(400) % N_CLASSES)[torch.randperm(400, generator=g)]
    assert fit_probe(x[:200], noise[:200], x[200:], noise[200:], N_CLASSES, 1e-3) < 0.25


def test_control_task_reads_the_variable_only() -> None:
    n, n_vars, d = 600, 20, 32
    rng = random.Random(0)
    variables = [rng.choice("abcdefghijklmnopqrst") for _ in range(n)]
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, N_CLASSES, (n,), generator=g)  # independent of the variable
    control = torch.tensor(control_labels(variables, N_CLASSES, seed=3))
    te = control[n // 2 :]
    control_chance = torch.bincount(te).max().item() / len(te)
    tr, ts = slice(0, n // 2), slice(n // 2, n)

    def both(x: torch.Tensor) -> tuple[float, float]:
        return (
            fit_probe(x[tr], y[tr], x[ts], y[ts], N_CLASSES, 1e-3),
            fit_probe(x[tr], control[tr], x[ts], control[ts], N_CLASSES, 1e-3),
        )

    # Features that encode the target and not the variable: the control is at chance.
    codes = torch.randn(N_CLASSES, d, generator=g)
    accuracy, control_accuracy = both(torch.randn(n, d, generator=g) + codes[y])
    assert accuracy > 0.9, accuracy
    assert control_accuracy < control_chance + 0.1, (control_accuracy, control_chance)
    # Features holding the variable's one-hot: the control is read, the target is not.
    which = torch.tensor([ord(v) - ord("a") for v in variables])
    one_hot = torch.nn.functional.one_hot(which, n_vars).float()
    x = torch.cat([one_hot, torch.randn(n, d - n_vars, generator=g)], 1)
    accuracy, control_accuracy = both(x + 0.1 * torch.randn(n, d, generator=g))
    assert control_accuracy > 0.9, control_accuracy
    chance = torch.bincount(y[ts]).max().item() / (n - n // 2)
    assert accuracy < chance + 0.1, (accuracy, chance)


def test_split_is_a_function_of_the_programs() -> None:
    programs = list(iter_programs("binding", 0, 8, 41, style="paper"))
    train, test = split(programs, 0.5, seed=0)
    assert len(train) == round(0.5 * 41) == 20 and len(test) == 21
    assert sorted(train + test) == list(range(41))
    assert train == sorted(train) and test == sorted(test)
    assert split(programs, 0.5, seed=0) == (train, test)
    # The same programs in another order: the same programs in train.
    shuffled = programs[::-1]
    random.Random(1).shuffle(shuffled)
    train_2, _ = split(shuffled, 0.5, seed=0)
    assert {shuffled[i].index for i in train_2} == {programs[i].index for i in train}
    # One ranking, cut at round(fraction * n): a smaller train split is part of a larger one.
    quarter = split(programs, 0.25, seed=0)[0]
    assert len(quarter) == round(0.25 * 41) and set(quarter) < set(train)
    assert len(split(programs[:10], 0.5, seed=0)[0]) == 5
    assert split(programs, 0.5, seed=1) != (train, test)
    with pytest.raises(ValueError, match="train_fraction"):
        split(programs, 1.0, seed=0)


def test_control_labels_are_one_class_per_variable() -> None:
    variables = list("abcabcxyzq" * 3)
    labels = control_labels(variables, 4, seed=7)
    assert labels == control_labels(variables, 4, seed=7)
    assert all(0 <= c < 4 for c in labels)
    classes = {v: {c for w, c in zip(variables, labels, strict=True) if w == v} for v in variables}
    assert all(len(c) == 1 for c in classes.values()), classes
    # A variable's class does not depend on which others are there.
    assert control_labels(["a", "b"], 4, seed=7)[0] == control_labels(["a", "z"], 4, seed=7)[0]
    firsts = {control_labels([v, "a"], 4, seed=7)[1] for v in "bcdefghij"}
    assert firsts == {control_labels(["a"], 4, seed=7)[0]}
    many = control_labels(list("abcdefghijklmnopqrstuvwxyz"), 4, seed=7)
    assert len(set(many)) == 4  # 26 variables drawn independently cover the 4 classes
    assert many != control_labels(list("abcdefghijklmnopqrstuvwxyz"), 4, seed=8)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    folder = save_tiny_model(
        tmp_path_factory.mktemp("probes") / "llama", "llama", n_layers=N_LAYERS
    )
    return load_model(str(folder), dtype="float32", quantization="none")


def tiny_programs() -> list:
    """60 programs of 8 lines (depths 1-4 in turn) and 12 of 6 lines: two groups, two token
    lengths."""
    return [
        *iter_programs("binding", 0, 8, 60, style="paper"),
        *iter_programs("binding", 0, 6, 12, style="paper"),
    ]


def test_activations_are_hidden_states(lm) -> None:
    programs = tiny_programs()
    prober = Prober(lm, batch_size=16)  # several forwards per length, one partly full
    examples = prober.activations(programs)
    labels = ["ref_depth_1_rhs", "ref_depth_2_rhs", "ref_depth_3_rhs", "ref_depth_4_rhs"]
    # Layers 0..N_LAYERS: N_LAYERS is the stream leaving the last layer.
    every = range(N_LAYERS + 1)
    assert set(examples) == {(x, y) for x in every for y in [*labels, "final_colon"]}
    assert prober.skipped == []
    with torch.no_grad():
        hidden = [
            lm.model(
                torch.tensor([lm.tokenizer(p.text)["input_ids"]]), output_hidden_states=True
            ).hidden_states
            for p in programs
        ]
    for (layer, label), ex in examples.items():
        having = [g for g, p in enumerate(programs) if label in p.spans]
        assert ex.programs == having, (layer, label)
        assert ex.x.shape == (len(having), lm.arch.d_model) and ex.x.dtype == torch.float32
        # One token per character after `<s>`: a span's last token is at its end offset.
        want = torch.stack([hidden[g][layer][0, programs[g].spans[label][1]] for g in having])
        # Hugging Face's last hidden state has the final norm applied; the probe reads before.
        got = ex.x if layer < N_LAYERS else lm.model.base_model.norm(ex.x).detach()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Layers and labels asked for are all that is read.
    only = prober.activations(programs, layers=[1], labels=["final_colon"])
    assert set(only) == {(1, "final_colon")}
    torch.testing.assert_close(only[(1, "final_colon")].x, examples[(1, "final_colon")].x)


def test_probe_table(lm) -> None:
    programs = tiny_programs()
    prober = Prober(lm, batch_size=16)
    table = prober.probe(programs, seed=0)
    assert table.schema == PROBES_SCHEMA
    rows = table.to_pylist()
    labels = ["ref_depth_1_rhs", "ref_depth_2_rhs", "ref_depth_3_rhs", "ref_depth_4_rhs"]
    keys = [(r["seq_len"], r["layer"], r["label"]) for r in rows]
    # seq_len 6: 12 programs, 3 of depth 4 (indices 3, 7, 11): whatever the split gives them.
    assert keys[: len(keys) - 15] == [
        (6, layer, label)
        for layer in range(N_LAYERS + 1)
        for label in [*labels, "final_colon"]
        if (6, layer, label) in keys
    ]
    assert keys[-15:] == [
        (8, layer, label) for layer in range(N_LAYERS + 1) for label in [*labels, "final_colon"]
    ]
    for r in rows:
        group = [p for p in programs if p.seq_len == r["seq_len"]]
        having = [p for p in group if r["label"] in p.spans]
        assert r["n_train"] + r["n_test"] == len(having), r
        assert r["n_train"] >= 2 and r["n_test"] >= 1, r
        assert r["n_classes"] == len({p.answer for p in having}), r
        assert r["target"] == target_of(r["label"]) and r["model"] == lm.name
        assert r["task"] == "binding"
        for key in ("accuracy", "control_accuracy", "chance", "control_chance"):
            assert 0.0 <= r[key] <= 1.0, r
    by_key = {(r["seq_len"], r["layer"], r["label"]): r for r in rows}
    n = sum(1 for p in programs if p.seq_len == 8 and "ref_depth_4_rhs" in p.spans)
    assert n == 15 and by_key[(8, 0, "ref_depth_1_rhs")]["n_train"] == 30
    # Entering layer 0, ref_depth_1_rhs's token is the root digit: its embedding names the
    # root value. At final_colon every program's token is `:`: the probe can only guess the
    # train split's most common answer.
    root = by_key[(8, 0, "ref_depth_1_rhs")]
    assert root["accuracy"] > 0.9, root
    colon = by_key[(8, 0, "final_colon")]
    assert colon["accuracy"] <= colon["chance"] + 1e-6, colon
    # The same table from the programs in another order (the split, the examples' order).
    shuffled = programs[::-1]
    random.Random(0).shuffle(shuffled)
    layer_0 = table.filter(pc.equal(table.column("layer"), 0))
    assert Prober(lm, batch_size=5).probe(shuffled, layers=[0], seed=0).equals(layer_0)


def test_few_programs_and_skipped(lm) -> None:
    programs = list(iter_programs("binding", 0, 8, 3, style="paper"))
    # One program whose spans no token falls in: it gives nothing and is listed.
    empty = {"ref_depth_1_rhs": (0, 0), "final_colon": (0, 0)}
    broken = dataclasses.replace(generate("binding", 0, 8, 3, style="paper"), spans=empty)
    prober = Prober(lm)
    table = prober.probe([*programs, broken], layers=[0])
    assert [p["index"] for p, _ in prober.skipped] == [3]
    assert "no token" in prober.skipped[0][1]
    # 3 usable programs: 2 train (round(1.5) = 2), 1 test, where the label's programs split so.
    for r in table.to_pylist():
        assert r["n_train"] >= 2 and r["n_test"] >= 1, r
    assert Prober(lm).probe([], layers=[0]).num_rows == 0
    assert variable_at(programs[0], "final_colon") == programs[0].query
    line = programs[1].text.splitlines()[programs[1].root_line - 1]
    assert variable_at(programs[1], "ref_depth_1_rhs") == line.split("=")[0]


def test_refuses_other_families_and_bad_arguments(lm) -> None:
    prober = Prober(lm)
    other = [generate("range", 0, 4, 0)]
    binding = list(iter_programs("binding", 0, 8, 4, style="paper"))
    fix = r"fix: list only binding under experiments\.probes\.tasks"
    with pytest.raises(ValueError, match=fix):
        prober.probe([*binding, *other])
    with pytest.raises(ValueError, match="probes read binding"):
        prober.activations(other)
    with pytest.raises(ValueError, match="query_var"):
        prober.probe(binding, labels=["query_var"])
    with pytest.raises(ValueError, match="out of range"):
        prober.probe(binding, layers=[N_LAYERS + 1])
    with pytest.raises(ValueError, match="batch_size"):
        Prober(lm, batch_size=0)
