"""This engine against the patching tools a researcher would use instead, on the same patches,
interleaved in one run: TransformerLens 4.x (`TransformerBridge`, `patching.get_act_patch_*`,
programs batched, `reduce="none"`) and pyvene (`VanillaIntervention`, sources precomputed,
programs batched). Needs the `bench` extra:

    uv run --extra bench python bench/peers.py [--shape binding-tiny|qwen3-0.6b|all]

Work per shape: 16-line binding programs (paper format), `resid_pre` and `attn_head`, every
position. binding-tiny: 20 programs, every layer, every cell run by every tool, medians of 3
interleaved repeats. qwen3-0.6b (random weights, 28 layers, vocabulary 151,936): 2 programs;
`resid_pre` at every layer, `attn_head` on a 4-layer block in the middle; the engine runs every
patch, the peers an evenly spaced sample of cells (a peer's cost per cell is one full forward of
the batch of programs, whichever the cell), 1 repeat. All three answer with the logit of the
counterfactual answer minus the clean one at the last position; the largest disagreement with
the engine is printed. Last line: `vs_best_peer=R`, the engine's smallest lead over the fastest
peer across shapes and sites.
"""

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import build, describe, pairs, programs, setup_host

from actors import Patcher

WORK = {
    "binding-tiny": {"programs": 20, "head_layers": None, "cells": None, "repeats": 3},
    "qwen3-0.6b": {"programs": 2, "head_layers": 4, "cells": 12, "repeats": 1},
}


def cells_of(n_layers, n_tokens, n_heads, site, layers, sample):
    """(layer, pos[, head]) cells, all or an evenly spaced sample."""
    if site == "resid_pre":
        cells = [(x, p) for x in layers for p in range(n_tokens)]
    else:
        cells = [(x, p, h) for x in layers for p in range(n_tokens) for h in range(n_heads)]
    if sample is None or sample >= len(cells):
        return cells
    step = len(cells) / sample
    return [cells[int(i * step)] for i in range(sample)]


class Engine:
    name = "engine"

    def __init__(self, lm, ps):
        self.lm, self.patcher = lm, Patcher(lm, batch_size="auto")
        self.progs = ps
        list(self.patcher.run(ps[:1], ["resid_pre"], [0], "targets"))  # warm-up, readout check

    def run(self, site, layers, cells):
        """Every patch of `site` x `layers` (cells ignored); returns {(prog, cell): diff}."""
        out = {}
        for wave in self.patcher.run(self.progs, [site], layers, "all"):
            diffs = (wave.read.logits[:, 1] - wave.read.logits[:, 0]).tolist()
            for i, p in enumerate(wave.plan.patches):
                cell = (p.layer, p.pos) if p.head is None else (p.layer, p.pos, p.head)
                out[p.program, cell] = diffs[i]
        return out


class TransformerLens:
    name = "TransformerLens"

    def __init__(self, lm, ps):
        from transformer_lens.model_bridge import TransformerBridge

        # TransformerLens switches its model to eager attention: give it its own copy.
        self.bridge = TransformerBridge.boot_transformers(
            "bench", hf_model=copy.deepcopy(lm.model), tokenizer=lm.tokenizer, device=lm.device
        )
        self.bridge.eval()
        pp = pairs(lm, ps)
        self.clean = torch.tensor([p.clean_ids for p in pp], device=lm.device)
        cf = torch.tensor([p.cf_ids for p in pp], device=lm.device)
        self.a = torch.tensor([p.clean_answer_id for p in pp], device=lm.device)
        self.b = torch.tensor([p.cf_answer_id for p in pp], device=lm.device)
        with torch.no_grad():
            _, self.cache = self.bridge.run_with_cache(cf)

    def metric(self, logits):
        last, rows = logits[:, -1], torch.arange(len(self.a))
        return last[rows, self.b] - last[rows, self.a]

    @torch.no_grad()
    def run(self, site, layers, cells):
        from transformer_lens import patching

        fn = (
            patching.get_act_patch_resid_pre
            if site == "resid_pre"
            else patching.get_act_patch_attn_head_out_by_pos
        )
        names = ["layer", "pos"] if site == "resid_pre" else ["layer", "pos", "head"]
        index = pd.DataFrame(cells, columns=names)
        # The cells as rows of an index frame (the axes' own ranges are then not iterated).
        res = fn(
            self.bridge,
            self.clean,
            self.cache,
            self.metric,
            index_axis_names=None,
            index_df=index,
            reduce="none",
        )
        values = res.values.tolist()  # [cell, program]
        return {(g, c): values[i][g] for i, c in enumerate(cells) for g in range(len(self.a))}


class Pyvene:
    name = "pyvene"

    def __init__(self, lm, ps):
        import pyvene as pv

        _register_qwen3(pv, lm.model)
        self.pv, self.lm, self.model = pv, lm, lm.model
        pp = pairs(lm, ps)
        self.clean = torch.tensor([p.clean_ids for p in pp], device=lm.device)
        self.a = torch.tensor([p.clean_answer_id for p in pp], device=lm.device)
        self.b = torch.tensor([p.cf_answer_id for p in pp], device=lm.device)
        self.sources = self._sources(torch.tensor([p.cf_ids for p in pp], device=lm.device))
        self.models: dict = {}

    @torch.no_grad()
    def _sources(self, cf):
        acts, handles = {}, []
        for x, layer in enumerate(self.lm.arch.layers):

            def resid(m, args, kwargs, x=x):
                acts["resid_pre", x] = (args[0] if args else kwargs["hidden_states"]).clone()

            def z(m, args, x=x):
                acts["attn_head", x] = args[0].clone()

            handles.append(layer.register_forward_pre_hook(resid, with_kwargs=True))
            handles.append(self.lm.arch.attn_out[x].register_forward_pre_hook(z))
        self.model(input_ids=cf)
        for h in handles:
            h.remove()
        return acts

    def _model(self, site, layer):
        key = site, layer
        if key not in self.models:
            pv = self.pv
            component, unit = (
                ("block_input", "pos")
                if site == "resid_pre"
                else ("head_attention_value_output", "h.pos")
            )
            config = pv.IntervenableConfig(
                representations=[pv.RepresentationConfig(layer, component, unit, 1)],
                intervention_types=pv.VanillaIntervention,
            )
            model = pv.IntervenableModel(config, self.model)
            model.disable_model_gradients()
            self.models[key] = model
        return self.models[key]

    @torch.no_grad()
    def run(self, site, layers, cells):
        out, n = {}, len(self.a)
        rows = torch.arange(n)
        heads, d_head = self.lm.arch.n_heads, self.lm.arch.d_head
        for cell in cells:
            layer, pos = cell[0], cell[1]
            model = self._model(site, layer)
            act = self.sources[site, layer]
            if site == "resid_pre":
                source = act[:, pos : pos + 1]
                where = {"base": [[[pos]] * n]}
            else:
                h = cell[2]
                source = act.view(n, -1, heads, d_head)[:, pos : pos + 1, h : h + 1]
                source = source.permute(0, 2, 1, 3)
                where = {"base": [[[[h]] * n, [[pos]] * n]]}
            _, result = model(
                {"input_ids": self.clean}, unit_locations=where, source_representations=source
            )
            last = result.logits[:, -1]
            diff = (last[rows, self.b] - last[rows, self.a]).tolist()
            for g in range(n):
                out[g, cell] = diff[g]
        return out


def _register_qwen3(pv, model) -> None:
    """pyvene 0.1.8 maps Llama and Qwen2 but not Qwen3, whose modules are named as Llama's;
    its heads are `head_dim` wide, not hidden_size / num_attention_heads."""
    from pyvene.models import intervenable_modelcard as card
    from pyvene.models.llama import modelings_intervenable_llama as llama

    cls = type(model)
    if cls in card.type_to_module_mapping:
        return
    dims = dict(llama.llama_lm_type_to_dimension_mapping)
    dims["head_attention_value_output"] = ("head_dim",)
    card.type_to_module_mapping[cls] = llama.llama_lm_type_to_module_mapping
    card.type_to_dimension_mapping[cls] = dims
    pv.type_to_module_mapping[cls] = llama.llama_lm_type_to_module_mapping
    pv.type_to_dimension_mapping[cls] = dims


def bench_shape(shape, args):
    work = WORK[shape]
    lm = build(shape)
    n_layers = lm.arch.n_layers
    progs = programs(args.programs or work["programs"], start=3)
    n_tokens = len(pairs(lm, progs[:1])[0].clean_ids)
    print(f"== {describe(lm)}; {len(progs)} programs of {n_tokens} tokens")
    tools = [Engine(lm, progs), TransformerLens(lm, progs), Pyvene(lm, progs)]
    head_layers = list(range(n_layers))
    if work["head_layers"]:
        mid = n_layers // 2 - work["head_layers"] // 2
        head_layers = list(range(mid, mid + work["head_layers"]))
    results = []
    for site, layers in (("resid_pre", list(range(n_layers))), ("attn_head", head_layers)):
        cells = cells_of(n_layers, n_tokens, lm.arch.n_heads, site, layers, work["cells"])
        n_engine = len(layers) * n_tokens * (lm.arch.n_heads if site == "attn_head" else 1)
        times: dict[str, list[float]] = {t.name: [] for t in tools}
        answers: dict[str, dict] = {}
        for _ in range(args.repeats or work["repeats"]):
            for tool in tools:
                start = time.perf_counter()
                answers[tool.name] = tool.run(site, layers, cells)
                seconds = time.perf_counter() - start
                done = n_engine if tool.name == "engine" else len(cells)
                times[tool.name].append(seconds / (done * len(progs)))
        rate = {name: 1 / statistics.median(t) for name, t in times.items()}
        engine = answers["engine"]
        worst = max(
            abs(value - engine[key])
            for name, got in answers.items()
            if name != "engine"
            for key, value in got.items()
        )
        best = max((n for n in rate if n != "engine"), key=rate.get)
        lead = rate["engine"] / rate[best]
        print(
            f"  {site}: "
            + ", ".join(f"{n} {r:,.1f} patches/s" for n, r in rate.items())
            + f"; {len(cells)} cells x {len(progs)} programs for the peers; max |diff| "
            f"{worst:.1e}; engine / {best} = {lead:.1f}"
        )
        results.append((shape, site, lead))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="all", choices=[*WORK, "all"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--programs", type=int, default=None, help="override the shape's")
    parser.add_argument("--repeats", type=int, default=None, help="override the shape's")
    args = parser.parse_args()
    setup_host(args.threads)
    shapes = list(WORK) if args.shape == "all" else [args.shape]
    results = [r for s in shapes for r in bench_shape(s, args)]
    print()
    for shape, site, lead in results:
        print(f"shape={shape} site={site} vs_best_peer={lead:.1f}")
    print(f"vs_best_peer={min(lead for _, _, lead in results):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
