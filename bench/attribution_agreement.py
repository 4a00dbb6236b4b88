"""How far the attribution estimates can be trusted on the shipped model: estimate against exact
patching over every cell, plain AtP and each AtP* correction.

    python bench/attribution_agreement.py [--programs 24] [--seq-len 16] [--threads 2]

The programs are the quickstart's binding programs (seed 0, paper style); every position,
`resid_pre` and `attn_head` at every layer; exact patching by the engine (`actors.Patcher`).
Per variant and site:
- `spearman`: rank correlation of the signed estimate with the exact effect (`patched - clean`
  logit difference) over every cell; under `grad_drop` the GradDrop score (a magnitude) against
  |exact|;
- `abs`: the same on magnitudes (|estimate| or the GradDrop score, against |exact|);
- `nonzero`: the signed correlation leaving out the cells where both are exactly 0 (before the
  first changed token, and at the last layer's heads before the answer position);
- `top10_in_top20`: the mean over programs of the share of its 10 largest |exact| cells that are
  among its 20 largest |estimate| (or GradDrop score).
"""

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, setup_host

from actors import Patcher, load_model
from actors.attribution import Attributor
from orchestrator.tasks import iter_programs

KEY = ["program", "site", "layer", "pos", "head"]
VARIANTS = [(False, False), (True, False), (False, True), (True, True)]


def spearman(a: pd.Series, b: pd.Series) -> float:
    return float(a.rank().corr(b.rank()))


def recall(cells: pd.DataFrame, score: str, k: int = 10) -> float:
    shares = []
    for _, p in cells.groupby("program"):
        top = set(p["exact"].abs().nlargest(k).index)
        found = set(p[score].abs().nlargest(2 * k).index)
        shares.append(len(top & found) / len(top))
    return sum(shares) / len(shares)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=24)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    setup_host(args.threads)
    lm = load_model(str(ROOT / "models" / "binding-tiny"), dtype="float32", quantization="none")
    progs = list(iter_programs("binding", 0, args.seq_len, args.programs, style="paper"))
    sites = ["resid_pre", "attn_head"]
    start = time.perf_counter()
    exact = Patcher(lm).patch(progs, sites, None, "all").to_pandas()
    seconds = time.perf_counter() - start
    exact["exact"] = exact.patched_logit_diff - exact.clean_logit_diff
    exact["head"] = exact["head"].fillna(-1)
    print(f"exact patching: {len(exact):,} cells of {len(progs)} programs in {seconds:.1f} s")
    for fix, drop in VARIANTS:
        tool = Attributor(lm, attention_fix=fix, grad_drop=drop)
        start = time.perf_counter()
        est = tool.attribute(progs, sites, None, "all").to_pandas()
        seconds = time.perf_counter() - start
        est["head"] = est["head"].fillna(-1)
        cells = est.drop(columns=["exact"]).merge(exact[[*KEY, "exact"]], on=KEY)
        assert len(cells) == len(exact), (len(cells), len(exact))
        score = "grad_drop" if drop else "estimate"
        for site, g in cells.groupby("site"):
            signed = g["exact"].abs() if drop else g["exact"]
            nz = (g.estimate != 0) | (g.exact != 0)
            print(
                f"attention_fix={fix!s:<5} grad_drop={drop!s:<5} {site:<9} cells={len(g):>6,} "
                f"spearman={spearman(g[score], signed):.3f} "
                f"abs={spearman(g[score].abs(), g['exact'].abs()):.3f} "
                f"nonzero={spearman(g[score][nz], signed[nz]):.3f} (n={int(nz.sum()):,}) "
                f"top10_in_top20={recall(g, score):.3f}  [{seconds:.1f} s, both sites]"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
