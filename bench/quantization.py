"""Quantization check: the shipped binding model in fp32, int8 and nf4 (bitsandbytes, on CPU or
GPU), the same programs patched by each, and how far the results move.

    python bench/quantization.py [--model models/binding-tiny] [--n 20]

`auto` is exercised by giving a budget below the bf16 weights' size: the loader must choose a
quantized format by itself.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors import Patcher, load_model
from actors.loading import count_parameters
from orchestrator.tasks import iter_programs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/binding-tiny")
    parser.add_argument("--n", type=int, default=20)
    args = parser.parse_args()
    programs = list(iter_programs("binding", 555, 16, args.n, style="paper"))
    full = load_model(args.model, dtype="float32")
    n_params = count_parameters(full.model.config)
    reference = Patcher(full).patch(programs, sites=["resid_pre"], positions="targets").to_pandas()
    print(
        f"model {args.model}: {n_params / 1e6:.2f}M parameters, fp32 weights "
        f"{full.weight_bytes / 2**20:.2f} MiB"
    )
    print(
        f"{'loaded as':>10} {'weights MiB':>12} {'clean acc':>10} {'max |d patched|':>16} "
        f"{'mean |d norm_effect|':>21} {'corr':>6}"
    )
    for budget_factor in (None, 1.5, 0.75):  # None: fp32; then auto under a tight budget
        if budget_factor is None:
            lm, table = full, reference
        else:
            lm = load_model(
                args.model,
                dtype="float32",
                quantization="auto",
                budget_bytes=int(budget_factor * n_params),
            )
            table = (
                Patcher(lm).patch(programs, sites=["resid_pre"], positions="targets").to_pandas()
            )
        d_patched = np.abs(table.patched_logit_diff - reference.patched_logit_diff)
        both = table.norm_effect.notna() & reference.norm_effect.notna()
        d_effect = np.abs(table.norm_effect[both] - reference.norm_effect[both])
        corr = np.corrcoef(table.patched_logit_diff, reference.patched_logit_diff)[0, 1]
        acc = table.groupby("program").top1_correct.first().mean()
        finite = np.isfinite(table.patched_logit_diff).all()
        print(
            f"{lm.quantization:>10} {lm.weight_bytes / 2**20:>12.2f} {acc:>10.2f} "
            f"{d_patched.max():>16.3f} {d_effect.mean():>21.3f} {corr:>6.3f}"
            + ("" if finite else "  NOT FINITE")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
