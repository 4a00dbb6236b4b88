"""The patching plan on its own: no model, no tensors. What it must do is written out here from
the definitions (which patches are free, where each row enters, what each pass costs), not taken
from `actors.plan`, so that removing or shifting a shortcut changes a number these tests check."""

import collections

import pytest

from actors.flops import Dims, flops, pass_flops
from actors.plan import Pass, ProgramShape, build_plan

N_LAYERS, N_HEADS = 4, 3
UNLIMITED = lambda width, context: 10**9  # noqa: E731


def shape(n_tokens=12, diff=(5,), positions=None) -> ProgramShape:
    return ProgramShape(n_tokens, tuple(diff), tuple(positions or range(n_tokens)))


def plan_of(programs, sites, layers=range(N_LAYERS), limit=UNLIMITED):
    return build_plan(programs, sites, list(layers), N_LAYERS, N_HEADS, limit)


def test_every_patch_is_free_or_in_exactly_one_main_pass() -> None:
    programs = [shape(), shape(diff=(3, 4)), shape(n_tokens=9, diff=(2,))]
    plan = plan_of(programs, ["resid_pre", "attn_head", "mlp_out"], limit=lambda w, c: 5)
    main = collections.Counter(
        e.patch for p in plan.passes if p.read == "logits" for e in p.entries
    )
    pre = collections.Counter(
        e.patch for p in plan.passes if p.read == "layer_out" for e in p.entries
    )
    for i, patch in enumerate(plan.patches):
        if patch.free is not None:
            assert main[i] == pre[i] == 0, patch
        else:
            assert main[i] == 1, patch
    carried = {e.patch for p in plan.passes for e in p.entries if e.first == "carried"}
    assert carried == set(pre) and all(n == 1 for n in pre.values())
    # Output order: program, site, layer, position, head.
    keys = [
        (p.program, ["resid_pre", "attn_head", "mlp_out"].index(p.site), p.layer, p.pos, p.head)
        for p in plan.patches
    ]
    assert keys == sorted(keys, key=lambda k: (*k[:4], -1 if k[4] is None else k[4]))


def expected_free(p, first_read: int) -> str | None:
    """The three rules, for a program of diff (4, 6) whose first readout position is given."""
    if p.pos < 4:
        return "before_diff"
    if p.site == "resid_pre" and p.layer == 0 and p.pos not in (4, 6):
        return "same_token"
    if p.site != "resid_pre" and p.layer == N_LAYERS - 1 and p.pos < first_read:
        return "unread"
    return None


def test_free_patches_follow_the_three_rules() -> None:
    prog = shape(n_tokens=10, diff=(4, 6))
    plan = plan_of([prog], ["resid_pre", "attn_head", "mlp_out"])
    for p in plan.patches:
        assert p.free == expected_free(p, 9), p


def test_entries_join_at_their_layer_and_head_rows_one_layer_later() -> None:
    plan = plan_of([shape(n_tokens=8, diff=(2,))], ["resid_pre", "attn_head", "mlp_out"])
    for ps in plan.passes:
        for e in ps.entries:
            patch = plan.patches[e.patch]
            assert ps.start == patch.pos
            if ps.read == "layer_out":
                # Pre-pass: one position, the patch's own layer, the clean stream, a write.
                assert (ps.stop, e.layer, e.first) == (patch.pos + 1, patch.layer, "clean")
                assert e.write == {"attn_head": "head", "mlp_out": "mlp"}[patch.site]
                assert ps.last_layer == max(x.layer for x in ps.entries)
                continue
            assert ps.stop == 8 and ps.last_layer == N_LAYERS - 1
            if patch.site == "resid_pre":
                assert (e.layer, e.first, e.write) == (patch.layer, "cf", "none")
            elif patch.pos == 7:  # last position: no pre-pass, the write happens in the pass
                assert (e.layer, e.first) == (patch.layer, "clean") and e.write != "none"
            else:
                assert (e.layer, e.first, e.write) == (patch.layer + 1, "carried", "none")
    # Pre-passes run before the main passes of their position.
    order = [(ps.start, ps.read) for ps in plan.passes]
    for pos in {s for s, _ in order}:
        reads = [r for s, r in order if s == pos]
        assert reads == sorted(reads, key=lambda r: r == "logits"), (pos, reads)


def test_token_layers_match_the_closed_form() -> None:
    """Suffix only, rows joining at their layer, one-position pre-passes: the count written out.
    Feeding whole prompts, joining at layer 0, or skipping the pre-passes each changes it."""
    n_tokens, d = 12, 5
    resid = plan_of([shape(n_tokens, (d,))], ["resid_pre"])
    want = 0
    for p in range(d, n_tokens):
        layers = [x for x in range(N_LAYERS) if x > 0 or p == d]
        width = n_tokens - p
        # Each row runs its layer to the last; below the first row's layer runs one carrier row.
        want += width * (sum(N_LAYERS - x for x in layers) + min(layers))
    assert resid.cost().token_layers == want

    heads = plan_of([shape(n_tokens, (d,))], ["attn_head"])
    want = 0
    for p in range(d, n_tokens - 1):
        # Pre-pass: each layer < last computes its own heads at one position.
        want += (N_LAYERS - 1) * N_HEADS
        # Main pass: rows join one layer above their head, carrier at layer 0.
        width = n_tokens - p
        want += width * (sum(N_HEADS * (N_LAYERS - (x + 1)) for x in range(N_LAYERS - 1)) + 1)
    # Last position: every layer's heads, written inside the pass, one position.
    want += sum(N_HEADS * (N_LAYERS - x) for x in range(N_LAYERS))
    assert heads.cost().token_layers == want
    assert heads.cost().free == (d * N_LAYERS + (n_tokens - 1 - d)) * N_HEADS
    assert resid.cost().runs == 2 * N_LAYERS * n_tokens


def test_programs_of_one_length_share_passes_and_others_do_not() -> None:
    one = plan_of([shape()], ["resid_pre"])
    two = plan_of([shape(), shape(diff=(5, 7))], ["resid_pre"])
    other = plan_of([shape(), shape(n_tokens=11)], ["resid_pre"])
    assert len(two.passes) == len(one.passes)
    assert any(len({two.patches[e.patch].program for e in p.entries}) == 2 for p in two.passes)
    assert len(other.passes) > len(one.passes)
    for ps in other.passes:
        assert {other.programs[other.patches[e.patch].program].n_tokens for e in ps.entries} == {
            ps.n_tokens
        }


def test_row_limit_bounds_every_batch() -> None:
    seen = []

    def limit(width, context):
        seen.append((width, context))
        return 4

    plan = plan_of([shape(), shape(diff=(6,))], ["resid_pre", "attn_head", "mlp_out"], limit=limit)
    for ps in plan.passes:
        for layer in range(ps.last_layer + 1):
            assert ps.batch(layer) <= 4, (ps, layer)
        if ps.read == "logits":
            assert len(ps.entries) <= 4
    assert (1, 6) in seen and (12 - 5, 12) in seen  # (positions fed, positions attended)


def test_pre_pass_rows_leave_after_their_layer() -> None:
    plan = plan_of([shape()], ["attn_head"])
    pre = next(p for p in plan.passes if p.read == "layer_out")
    assert [pre.batch(x) for x in range(pre.last_layer + 1)] == [N_HEADS] * (N_LAYERS - 1)
    main = next(p for p in plan.passes if p.read == "logits" and p.width > 1)
    assert [main.batch(x) for x in range(N_LAYERS)] == [1, N_HEADS, 2 * N_HEADS, 3 * N_HEADS]


def test_split_halves_a_pass() -> None:
    plan = plan_of([shape()], ["attn_head"])
    for ps in plan.passes[:2]:
        a, b = ps.split()
        assert a.entries + b.entries == ps.entries
        assert a.token_layers() + b.token_layers() >= ps.token_layers()
        if ps.read == "layer_out":
            assert a.last_layer == a.entries[-1].layer


def test_reads_are_what_the_passes_use() -> None:
    plan = plan_of([shape()], ["resid_pre", "mlp_out"], layers=[1, 3])
    reads = plan.reads
    assert reads.cf_resid == (1, 3)
    assert reads.cf_mlp == (1, 3)  # layer 3 at the last position only
    assert reads.cf_z == ()
    assert reads.clean_resid == (1, 2, 3)  # mlp rows at layer 1 join at 2


def test_flops_of_a_pass_by_hand() -> None:
    dims = Dims(n_layers=2, linear_params=100, late_params=30, attn_width=8, d_model=4, vocab=10)
    plan = build_plan([shape(n_tokens=3, diff=(1,))], ["resid_pre"], [1], 2, 1, UNLIMITED)
    ps = next(p for p in plan.passes if p.start == 1)
    # Layer 0: the carrier row, layer 1: one row; positions 1, 2 attend to 2 and 3 keys; the
    # last layer's output projection and MLP (30 of its 100 weights) run on position 2 alone.
    per_layer = 2 * 100 * 1 * 2 + 4 * 8 * 1 * (2 + 3)
    assert pass_flops(ps, dims) == 2 * per_layer - 2 * 30 * 1 + 2 * 4 * 10 * 1
    assert flops(plan, dims)["passes"] == sum(pass_flops(p, dims) for p in plan.passes)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match=r"unknown site\(s\) \['resid_post'\]"):
        plan_of([shape()], ["resid_post"])
    with pytest.raises(ValueError, match=r"layers \[4\] out of range: the model has 0..3"):
        plan_of([shape()], ["resid_pre"], layers=[4])
    with pytest.raises(AssertionError, match="diff"):
        shape(diff=())
    with pytest.raises(AssertionError, match="not sorted"):
        Pass(5, 0, 5, 3, "logits", (*plan_of([shape()], ["resid_pre"]).passes[-1].entries[::-1],))


def test_describe_names_the_counts() -> None:
    text = plan_of([shape()], ["attn_head"]).describe()
    assert "patches over 1 programs" in text and "pre-passes" in text


# -- readout positions (n_read > 1: a teacher-forced answer read at the last n_read positions) --


def read_shape(n_tokens=10, diff=(4,), n_read=3) -> ProgramShape:
    """Every position up to the first readout position (the last prompt token) is patched."""
    return ProgramShape(n_tokens, tuple(diff), tuple(range(n_tokens - n_read + 1)), n_read)


def test_free_patches_with_readout_positions() -> None:
    """`unread`: a last-layer head or MLP output before the first readout position (7 here),
    not before the last position."""
    plan = plan_of([read_shape(10, (4, 6), 3)], ["resid_pre", "attn_head", "mlp_out"])
    for p in plan.patches:
        assert p.free == expected_free(p, 7), p
    with pytest.raises(AssertionError, match=r"outside 0..7"):
        ProgramShape(10, (4,), (8,), 3)  # a patch inside the answer
    with pytest.raises(AssertionError, match=r"outside 0..7"):
        ProgramShape(10, (8,), (4,), 3)  # the answers' appended tokens differ


def test_token_layers_with_readout_positions() -> None:
    """Head patches of a program read at its last r positions, written out: positions before
    the first readout position f as for r = 1; at f a pre-pass too (the main pass is r wide),
    and the last layer's heads, which are read there, written inside a main pass of width r."""
    n_tokens, d, r = 12, 5, 3
    f = n_tokens - r
    plan = plan_of([read_shape(n_tokens, (d,), r)], ["attn_head"])
    want = 0
    for p in range(d, f + 1):
        want += (N_LAYERS - 1) * N_HEADS  # pre-pass: each layer < last, one position
        width = n_tokens - p
        rows = sum(N_HEADS * (N_LAYERS - (x + 1)) for x in range(N_LAYERS - 1)) + 1
        if p == f:
            rows += N_HEADS  # the last layer's heads, at the last layer only
        want += width * rows
    cost = plan.cost()
    assert cost.token_layers == want
    assert cost.free == (d * N_LAYERS + (f - d)) * N_HEADS
    main = [ps for ps in plan.passes if ps.read == "logits"]
    assert {ps.n_read for ps in plan.passes} == {r} and min(ps.width for ps in main) == r
    (at_f,) = [ps for ps in main if ps.start == f]
    writes = [e for e in at_f.entries if e.write != "none"]
    assert [(e.layer, e.first, e.write) for e in writes] == [(N_LAYERS - 1, "clean", "head")] * 3
    # Readout: r rows per main-pass row, r per program and run.
    assert cost.readout_rows == r * sum(len(ps.entries) for ps in main) + 2 * r
    # With r = 1 the same positions keep today's count: r changes what the plan reads only.
    one = plan_of([shape(n_tokens, (d,), range(f + 1))], ["attn_head"])
    assert (
        one.cost().readout_rows
        == sum(len(ps.entries) for ps in one.passes if ps.read == "logits") + 2
    )


def test_programs_of_one_length_and_other_n_read_do_not_share_passes() -> None:
    programs = [read_shape(10, (4,), 1), read_shape(10, (4,), 2), read_shape(10, (5,), 2)]
    plan = plan_of(programs, ["resid_pre", "mlp_out"])
    for ps in plan.passes:
        keys = {plan.programs[plan.patches[e.patch].program].stack_key for e in ps.entries}
        assert keys == {ps.stack_key}, ps
    shared = [ps for ps in plan.passes if ps.stack_key == (10, 2)]
    assert any(len({plan.patches[e.patch].program for e in ps.entries}) == 2 for ps in shared)
    assert {ps.stack_key for ps in plan.passes} == {(10, 1), (10, 2)}


def test_flops_with_readout_positions_by_hand() -> None:
    dims = Dims(n_layers=2, linear_params=100, late_params=30, attn_width=8, d_model=4, vocab=10)
    prog = ProgramShape(4, (1,), (1, 2), n_read=2)
    plan = build_plan([prog], ["resid_pre"], [1], 2, 1, UNLIMITED)
    wide = next(p for p in plan.passes if p.start == 1)
    # Positions 1..3 attend to 2, 3, 4 keys; the last layer's output projection and MLP run on
    # the two readout positions 2, 3 alone; the readout runs twice per row.
    per_layer = 2 * 100 * 3 + 4 * 8 * (2 + 3 + 4)
    assert pass_flops(wide, dims) == 2 * per_layer - 2 * 30 * (3 - 2) + 2 * 4 * 10 * 2
    narrow = next(p for p in plan.passes if p.start == 2)  # width n_read: nothing to cut
    per_layer = 2 * 100 * 2 + 4 * 8 * (3 + 4)
    assert pass_flops(narrow, dims) == 2 * per_layer + 2 * 4 * 10 * 2
    per_run = 2 * (2 * 100 * 4 + 4 * 8 * (1 + 2 + 3 + 4))
    assert flops(plan, dims)["runs"] == 2 * (per_run + 2 * 4 * 10 * 2)


def test_a_keep_filter_plans_the_chosen_cells_alone() -> None:
    shapes = [ProgramShape(9, (2,), tuple(range(9))), ProgramShape(9, (3,), tuple(range(9)))]
    unlimited = lambda width, context: 1 << 20  # noqa: E731
    full = build_plan(shapes, ["resid_pre", "attn_head"], [0, 1, 2], 3, 2, unlimited)
    chosen = {(0, "attn_head", 1, 4, 1), (1, "resid_pre", 2, 8, None), (1, "resid_pre", 0, 1, None)}
    kept = build_plan(
        shapes,
        ["resid_pre", "attn_head"],
        [0, 1, 2],
        3,
        2,
        unlimited,
        keep=lambda g, site, layer, pos, head: (g, site, layer, pos, head) in chosen,
    )
    assert {(p.program, p.site, p.layer, p.pos, p.head) for p in kept.patches} == chosen
    assert [
        p for p in full.patches if (p.program, p.site, p.layer, p.pos, p.head) in chosen
    ] == list(kept.patches)
    rows = [e.patch for ps in kept.passes for e in ps.entries if ps.read == "logits"]
    # One of the three is free (before the first changed position): two rows in the passes.
    assert sorted({kept.patches[i].pos for i in rows}) == [4, 8]
    assert kept.cost().token_layers < full.cost().token_layers
