"""Patching throughput: the reference system's way, one forward per patch, and this engine, on
the same patches in one run, at the tiny shape and at real architecture shapes.

    python bench/patching.py [--model-config NAME ...|all] [--threads 2] [--device cpu]
                             [--dtype float32] [--programs 1] [--head-layers 4]

Work per shape: 16-line binding programs (paper format); `resid_pre` at every layer and position
and `attn_head` (every head) at every position of a block of `--head-layers` layers in the middle
(all layers at the tiny shape), the unit a sweep's shard holds.
(a) the reference system's way: three nnsight traces per patch (clean, counterfactual, patched);
(b) one full forward per patch, counterfactual activations cached once per program, plain hooks,
    last-position logits only;
(c) this engine (`actors.Patcher`, `batch_size: auto`), everything included (clean and
    counterfactual runs, planning, readout).
(a) and (b) run on an evenly spaced sample of the patches (their cost per patch does not depend
on which patch); (c) runs them all. Also printed: the machine's matmul rate in this run, the
engine's FLOPs (counted from its plan) per second as a fraction of it, and the engine's peak
memory above the loaded model. Last lines, machine-readable: the tiny shape's
`speedup_vs_seed=...`, then per real shape `shape=NAME speedup_vs_one_forward=...`.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PeakMemory, build, describe, matmul_flops, programs, setup_host, sync

from actors import Patcher
from actors.flops import Dims, flops


def dims_of(lm) -> Dims:
    layer = lm.arch.layers[0]
    linear = sum(p.numel() for p in layer.parameters() if p.dim() == 2)
    late = (lm.arch.attn_out[0], lm.arch.mlp[0])
    return Dims(
        n_layers=lm.arch.n_layers,
        linear_params=linear,
        late_params=sum(p.numel() for m in late for p in m.parameters() if p.dim() == 2),
        attn_width=lm.arch.n_heads * lm.arch.d_head,
        d_model=lm.arch.d_model,
        vocab=lm.model.config.get_text_config().vocab_size,
    )


@torch.no_grad()
def cf_activations(lm, pair) -> dict:
    """Every site's counterfactual activation, all layers, from one forward."""
    acts: dict = {}
    handles = []
    for layer in range(lm.arch.n_layers):

        def resid(m, args, kwargs, layer=layer):
            acts["resid_pre", layer] = (args[0] if args else kwargs["hidden_states"])[0].clone()

        def heads(m, args, layer=layer):
            acts["attn_head", layer] = args[0][0].clone()

        handles.append(lm.arch.layers[layer].register_forward_pre_hook(resid, with_kwargs=True))
        handles.append(lm.arch.attn_out[layer].register_forward_pre_hook(heads))
    try:
        lm.model(input_ids=torch.tensor([pair.cf_ids], device=lm.device), logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return acts


@torch.no_grad()
def one_forward(lm, pair, acts, patch) -> torch.Tensor:
    """(b): the clean forward with one activation replaced; logits of the two answers."""
    value = acts[patch.site, patch.layer][patch.pos]
    d_head = lm.arch.d_head

    def resid(m, args, kwargs):
        h = (args[0] if args else kwargs["hidden_states"]).clone()
        h[0, patch.pos] = value
        return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    def heads(m, args):
        z = args[0].clone()
        sl = slice(patch.head * d_head, (patch.head + 1) * d_head)
        z[0, patch.pos, sl] = value[sl]
        return (z, *args[1:])

    if patch.site == "resid_pre":
        handle = lm.arch.layers[patch.layer].register_forward_pre_hook(resid, with_kwargs=True)
    else:
        handle = lm.arch.attn_out[patch.layer].register_forward_pre_hook(heads)
    try:
        ids = torch.tensor([pair.clean_ids], device=lm.device)
        logits = lm.model(input_ids=ids, logits_to_keep=1).logits[0, -1].float()
    finally:
        handle.remove()
    return logits[[pair.clean_answer_id, pair.cf_answer_id]]


def three_traces(lm, pair, patch) -> torch.Tensor:
    """(a): three nnsight traces per patch, as the reference system does."""
    nn_model = lm.lm
    layer = nn_model.model.layers[patch.layer]
    target = layer if patch.site == "resid_pre" else layer.self_attn.o_proj
    clean = torch.tensor([pair.clean_ids], device=lm.device)
    cf = torch.tensor([pair.cf_ids], device=lm.device)
    with nn_model.trace(clean):
        nn_model.output.logits[0, -1].save()
    with nn_model.trace(cf):
        cf_act = target.input[0, patch.pos].clone().save()
    with nn_model.trace(clean):
        if patch.site == "resid_pre":
            target.input[0, patch.pos] = cf_act
        else:
            sl = slice(patch.head * lm.arch.d_head, (patch.head + 1) * lm.arch.d_head)
            target.input[0, patch.pos, sl] = cf_act[sl]
        patched = nn_model.output.logits[0, -1].save()
    return patched.float()[[pair.clean_answer_id, pair.cf_answer_id]]


def run_engine(lm, progs, head_layers):
    """(c): every patch of the work, per site: [(patch, pair, logits)], {site: (seconds,
    patches, FLOPs)}, peak MiB, the patcher."""
    patcher = Patcher(lm, batch_size="auto")
    work = [("resid_pre", None), ("attn_head", head_layers)]
    list(patcher.run(progs[:1], ["resid_pre"], [0], "targets"))  # warm-up, readout check
    rows, per_site = [], {}
    dims = dims_of(lm)
    with PeakMemory(lm.device) as peak:
        for site, layers in work:
            sync(lm.device)
            start, n, site_flops = time.perf_counter(), len(rows), 0
            for wave in patcher.run(progs, [site], layers, "all"):
                site_flops += sum(flops(wave.plan, dims).values())
                for i, patch in enumerate(wave.plan.patches):
                    rows.append((patch, wave.pairs[patch.program][1], wave.read.logits[i]))
            sync(lm.device)
            per_site[site] = (time.perf_counter() - start, len(rows) - n, site_flops)
    return rows, per_site, peak.mib, patcher


def bench_shape(shape, args) -> dict:
    lm = build(shape, args.dtype, args.device)
    n = lm.arch.n_layers
    if shape == "tiny":
        head_layers = list(range(n))
    else:
        mid = max(0, n // 2 - args.head_layers // 2)
        head_layers = list(range(mid, min(n, mid + args.head_layers)))
    progs = programs(args.programs, start=3)
    print(f"== {describe(lm)}")
    rate = matmul_flops(next(lm.model.parameters()).dtype, lm.device)
    rows, per_site, peak_mib, patcher = run_engine(lm, progs, head_layers)
    seconds = sum(t for t, _, _ in per_site.values())
    engine_flops = sum(f for _, _, f in per_site.values())
    t_engine = seconds / len(rows)
    computed = [r for r in rows if r[0].free is None]
    step = max(1, len(computed) // args.sample)
    sample = computed[::step][: args.sample]
    acts = {}
    start = time.perf_counter()
    one = []
    for patch, pair, _ in sample:
        key = id(pair)
        if key not in acts:
            acts[key] = cf_activations(lm, pair)
        one.append(one_forward(lm, pair, acts[key], patch))
    sync(lm.device)
    # Per patch: one forward, plus the counterfactual forward shared by a program's patches.
    t_one = (time.perf_counter() - start) / len(sample)
    diff = max(
        (got.float() - want).abs().max().item()
        for (_, _, got), want in zip(sample, one, strict=True)
    )
    seed_sample = sample[:: max(1, len(sample) // args.seed_sample)][: args.seed_sample]
    start = time.perf_counter()
    for patch, pair, _ in seed_sample:
        three_traces(lm, pair, patch)
    sync(lm.device)
    t_seed = (time.perf_counter() - start) / len(seed_sample)
    fraction = engine_flops / seconds / rate
    print(f"patches: {len(rows)} ({len(rows) - len(computed)} free: equal to the clean run)")
    for label, t, n_timed in (
        ("(a) reference system, 3 traces/patch", t_seed, len(seed_sample)),
        ("(b) one forward per patch", t_one, len(sample)),
        ("(c) this engine", t_engine, len(rows)),
    ):
        print(f"{label:38} {1 / t:10.1f} patches/s  ({n_timed} timed)")
    for site, (t, n_rows, f) in per_site.items():
        print(
            f"    {site}: {n_rows / t:,.1f} patches/s, {f / t / 1e9:,.1f} GFLOP/s = "
            f"{f / t / rate:.2f} of the matmul rate"
        )
    print(
        f"matmul {rate / 1e9:.1f} GFLOP/s; engine {engine_flops / 1e9:.1f} GFLOP in "
        f"{seconds:.1f} s = {fraction:.2f} of it; peak {peak_mib:.0f} MiB above the "
        f"model; max |logit (c) - (b)| = {diff:.2e}"
    )
    t_resid = per_site["resid_pre"][0] / len(progs)
    print(
        f"projected: resid_pre over every layer and position of 1,000 such programs "
        f"{1000 * t_resid / 60:.1f} min on this device ({t_resid:.2f} s per program)"
    )
    print(patcher.last_plan.describe())
    return {
        "shape": shape,
        "speedup_vs_seed": t_seed / t_engine,
        "speedup_vs_one_forward": t_one / t_engine,
        "flop_fraction": fraction,
        "max_abs_diff": diff,
        "peak_mib": peak_mib,
    }


def main() -> int:
    from common import SHAPES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model-config",
        action="append",
        default=[],
        help=f"a real shape ({', '.join(s for s in SHAPES if s != 'tiny')}) or all; repeatable",
    )
    parser.add_argument("--sample", type=int, default=60, help="patches timed for (b)")
    parser.add_argument("--seed-sample", type=int, default=15, help="patches timed for (a)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    parser.add_argument("--programs", type=int, default=1, help="programs per shape")
    parser.add_argument("--head-layers", type=int, default=4, help="attn_head layers (real shapes)")
    parser.add_argument("--no-tiny", action="store_true", help="skip the tiny shape")
    args = parser.parse_args()
    setup_host(args.threads)
    shapes = [s for s in SHAPES if s not in ("tiny", "binding-tiny")]
    wanted = shapes if "all" in args.model_config else args.model_config
    unknown = [s for s in wanted if s not in SHAPES]
    if unknown:
        parser.error(f"unknown --model-config {unknown}; choose from {list(SHAPES)} or all")
    results = [] if args.no_tiny else [bench_shape("tiny", args)]
    results += [bench_shape(s, args) for s in wanted]
    print()
    for r in results:
        if r["shape"] == "tiny":
            print(
                f"speedup_vs_seed={r['speedup_vs_seed']:.1f} "
                f"speedup_vs_one_forward={r['speedup_vs_one_forward']:.1f} "
                f"max_abs_diff={r['max_abs_diff']:.2e}"
            )
        else:
            print(
                f"shape={r['shape']} speedup_vs_one_forward={r['speedup_vs_one_forward']:.1f} "
                f"flop_fraction={r['flop_fraction']:.2f} max_abs_diff={r['max_abs_diff']:.2e} "
                f"peak_mib={r['peak_mib']:.0f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
