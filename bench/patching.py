"""Patching throughput: the reference system's way, one forward per patch, and this engine.

    python bench/patching.py [--sample 300] [--threads 2]

One random Llama (4 layers, d_model 256, char-level tokenizer), one 16-line binding program and
its counterfactual, every layer x every position, sites `resid_pre` and `attn_head` (all heads):
(a) the reference system's way: three nnsight traces per patch (clean, counterfactual, patched)
    at batch 1;
(b) one full forward per patch, counterfactual activations cached once, plain hooks;
(c) this engine (`actors.Patcher`), everything included (the clean/counterfactual runs too).
(a) and (b) run on an evenly spaced sample of the patches (their cost per patch does not depend
on which patch); (c) runs them all. The last line is machine-readable.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors import Patcher, load_model
from actors.targets import encode_program
from orchestrator.tasks import generate
from tests import reference
from tests.tiny import save_tiny_model


def seed_way(lm, pair, row) -> torch.Tensor:
    """Three traces per patch, as the reference system does: clean, counterfactual, patched."""
    nn_model = lm.lm
    layer = nn_model.model.layers[row.layer]
    target = layer if row.site == "resid_pre" else layer.self_attn.o_proj
    clean = torch.tensor([pair.clean_ids], device=lm.device)
    cf = torch.tensor([pair.cf_ids], device=lm.device)
    with nn_model.trace(clean):
        clean_logits = nn_model.output.logits[0, -1].save()
    with nn_model.trace(cf):
        cf_act = target.input[0, row.pos].clone().save()
    with nn_model.trace(clean):
        if row.site == "resid_pre":
            target.input[0, row.pos] = cf_act
        else:
            d_head = lm.arch.d_head
            sl = slice(row.head * d_head, (row.head + 1) * d_head)
            target.input[0, row.pos, sl] = cf_act[sl]
        patched = nn_model.output.logits[0, -1].save()
    del clean_logits
    return patched


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=300, help="patches timed for (a) and (b)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny_model(Path(tmp) / "llama", "llama", n_layers=4, d_model=256)
        lm = load_model(str(folder), dtype=args.dtype, device=args.device)
    cuda = lm.device.type == "cuda"
    program = generate("binding", seed=0, seq_len=16, index=3)
    pair = encode_program(lm.tokenizer, program)
    sites = ["resid_pre", "attn_head"]
    patcher = Patcher(lm, batch_size=args.batch_size)
    layers = list(range(lm.arch.n_layers))
    patcher.patch_pair(pair, sites, layers)  # warm-up
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    start = time.perf_counter()
    rows, engine_logits, _, _ = patcher.patch_pair(pair, sites, layers)
    if cuda:
        torch.cuda.synchronize()
    t_engine = (time.perf_counter() - start) / len(rows)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None

    step = max(1, len(rows) // args.sample)
    sample = list(range(0, len(rows), step))
    start = time.perf_counter()
    one_forward = [
        reference.patched_logits(
            lm.model,
            pair.clean_ids,
            pair.cf_ids,
            rows[i].site,
            rows[i].layer,
            rows[i].pos,
            rows[i].head,
        )
        for i in sample
    ]
    t_one = (time.perf_counter() - start) / len(sample)

    seed_sample = sample[:: max(1, len(sample) // 100)]
    start = time.perf_counter()
    seed_logits = [seed_way(lm, pair, rows[i]) for i in seed_sample]
    t_seed = (time.perf_counter() - start) / len(seed_sample)

    diff = max(
        (engine_logits[i] - ref).abs().max().item()
        for i, ref in zip(sample, one_forward, strict=True)
    )
    seed_diff = max(
        (engine_logits[i] - ref).abs().max().item()
        for i, ref in zip(seed_sample, seed_logits, strict=True)
    )
    clean, cf, _ = patcher.run_pair(pair.clean_ids, pair.cf_ids)
    n_changed = sum(Patcher._changes(r, clean, cf) for r in rows)
    print(
        f"model: llama 4 layers d_model 256, {len(pair.clean_ids)} tokens, {lm.device}, "
        f"{args.dtype}, threads {args.threads}"
        + (f", engine peak device memory {peak:.0f} MiB" if peak is not None else "")
    )
    print(f"patches: {len(rows)} ({n_changed} need a forward; the rest equal the clean run)")
    print(
        f"(a) reference system, 3 traces/patch: {1 / t_seed:10.1f} patches/s  "
        f"({len(seed_sample)} timed)"
    )
    print(
        f"(b) one forward per patch:            {1 / t_one:10.1f} patches/s  ({len(sample)} timed)"
    )
    print(
        f"(c) this engine:                      {1 / t_engine:10.1f} patches/s  ({len(rows)} timed)"
    )
    print(f"max |logit (c) - (b)| = {diff:.2e}; max |logit (c) - (a)| = {seed_diff:.2e}")
    print(
        f"speedup_vs_seed={t_seed / t_engine:.1f} speedup_vs_one_forward={t_one / t_engine:.1f} "
        f"max_abs_diff={diff:.2e}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
