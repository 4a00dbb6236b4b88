"""Attribution patching against exact patching: cells per second of each, on the same programs
in one run, at a real architecture's shape (random weights from a published config).

    python bench/attribution.py [--model-config qwen3-0.6b] [--programs 1] [--exact-layers 1]
                                [--threads 2] [--device cpu] [--dtype float32]

Per site (`resid_pre`, `attn_head`), every position:
- attribution (`actors.attribution.Attributor`): every layer, one clean forward, one
  counterfactual forward and one backward per batch of programs, everything included;
- exact (`actors.Patcher`, `batch_size: auto`): the same programs on a block of
  `--exact-layers` layers in the middle of the model (its cost per cell is about the same
  across layers: a row joins at its layer, and a layer in the middle is the average);
  free patches count as cells, as everywhere in the engine's figures.
Also printed: the rank correlation of the two over the block's cells (on random weights only a
sanity line; the shipped model's figure is in the README), and what each AtP* correction costs:
the seconds of the estimate with `attention_fix` (it concerns `resid_pre`) and with `grad_drop`
(one backward more per layer) over the plain estimate's. Last line, machine-readable:
`attribution_cells_per_s_ratio=R` for `attn_head`.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import build, describe, pairs, programs, setup_host, sync

from actors import Patcher
from actors.attribution import Attributor


def spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-config", default="qwen3-0.6b")
    parser.add_argument("--programs", type=int, default=1)
    parser.add_argument("--exact-layers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    setup_host(args.threads)
    lm = build(args.model_config, args.dtype, args.device)
    n = lm.arch.n_layers
    mid = max(0, n // 2 - args.exact_layers // 2)
    block = list(range(mid, min(n, mid + args.exact_layers)))
    progs = programs(args.programs, start=3)
    encoded = pairs(lm, progs)
    print(f"== {describe(lm)}; {len(progs)} program(s) of {len(encoded[0].clean_ids)} tokens")
    patcher = Patcher(lm, batch_size="auto")
    list(patcher.run(progs[:1], ["resid_pre"], [0], "targets"))  # warm-up, readout check
    attributor = Attributor(lm, batch_size=len(encoded))
    list(attributor.estimate(encoded[:1], ["resid_pre"], [0]))  # warm-up
    ratios = {}
    for site in ("resid_pre", "attn_head"):
        sync(lm.device)
        start = time.perf_counter()
        batches = list(attributor.estimate(encoded, [site]))
        sync(lm.device)
        t_attr = time.perf_counter() - start
        cells = sum(v.numel() for b in batches for v in b.cells.values())
        start = time.perf_counter()
        rows = patcher.patch(progs, [site], block, "all").to_pylist()
        sync(lm.device)
        t_exact = time.perf_counter() - start
        est, exact = [], []
        for r in rows:
            batch = next(b for b in batches if r["program"] - 3 in b.programs)
            row = batch.programs.index(r["program"] - 3)
            v = batch.cells[(site, r["layer"])][row]
            est.append(float(v[r["pos"]] if r["head"] is None else v[r["pos"], r["head"]]))
            exact.append(r["patched_logit_diff"] - r["clean_logit_diff"])
        attr_rate, exact_rate = cells / t_attr, len(rows) / t_exact
        ratios[site] = attr_rate / exact_rate
        print(
            f"  {site}: attribution {cells:,} cells (all {n} layers) in {t_attr:.2f} s = "
            f"{attr_rate:,.0f} cells/s; exact {len(rows):,} cells (layers {block[0]}-{block[-1]}) "
            f"in {t_exact:.1f} s = {exact_rate:,.1f} cells/s; ratio {ratios[site]:,.0f}; "
            f"Spearman over the exact cells {spearman(est, exact):.3f}"
        )
    for option, site in (("attention_fix", "resid_pre"), ("grad_drop", "attn_head")):
        timed = []
        for tool in (attributor, Attributor(lm, batch_size=len(encoded), **{option: True})):
            sync(lm.device)
            start = time.perf_counter()
            list(tool.estimate(encoded, [site]))
            sync(lm.device)
            timed.append(time.perf_counter() - start)
        print(
            f"  {option} ({site}): {timed[1]:.2f} s against {timed[0]:.2f} s plain "
            f"= {timed[1] / timed[0]:.1f}x the estimate's time"
        )
    for site, ratio in ratios.items():
        print(f"shape={args.model_config} site={site} attribution_cells_per_s_ratio={ratio:.0f}")
    print(f"attribution_cells_per_s_ratio={ratios['attn_head']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
