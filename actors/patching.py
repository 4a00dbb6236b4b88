"""Batched, exact activation patching (causal tracing) of clean/counterfactual program pairs.

For each program, the clean and counterfactual prompts run once, together, under an nnsight
trace that saves every layer's residual input, attention-output-projection input (the heads)
and MLP output, plus the clean run's keys and values. Then every patch row — (site, layer,
position[, head]) — replaces one activation of the clean run with its counterfactual value and
reads the last position's logits. The engine computes only what a patch can change:

* rows whose clean and counterfactual activations are equal (every position before the first
  differing token, for one) need no forward: their logits are the clean logits;
* a patch at position p cannot change positions before p, so a patched forward feeds only the
  tokens p.. and reads positions < p from the clean run's key/value cache;
* a patch at layer L cannot change layers below L, so a row joins the batch at layer L, with the
  clean residual stream as its input; the batch grows as the forward climbs the layers;
* only the last position's logits are computed (`logits_to_keep=1`).

Rows with the same position run in one forward, in chunks of `batch_size`. The result equals one
full forward per patch (tests check it against plain PyTorch hooks, not this code).
"""

import dataclasses
import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa
import torch
from jaxtyping import Float
from torch import Tensor
from transformers import DynamicCache

from actors.arch import SITES, ArchMap
from actors.loading import LoadedModel
from actors.targets import EncodedPair, Positions, Skip, encode_program

logger = logging.getLogger(__name__)

MIN_DENOMINATOR = 1e-3  # |cf - clean| logit-diff gap below which norm_effect is null

PATCHING_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("task", pa.string()),
        ("seq_len", pa.int32()),
        ("program", pa.int64()),
        ("site", pa.string()),
        ("layer", pa.int32()),
        ("head", pa.int32()),
        ("pos", pa.int32()),
        ("token", pa.string()),
        ("label", pa.string()),
        ("clean_answer", pa.string()),
        ("cf_answer", pa.string()),
        ("clean_correct", pa.bool_()),
        ("cf_correct", pa.bool_()),
        ("clean_logit_diff", pa.float32()),
        ("cf_logit_diff", pa.float32()),
        ("patched_logit_diff", pa.float32()),
        ("norm_effect", pa.float32()),
        ("flipped", pa.bool_()),
    ]
)


@dataclasses.dataclass(frozen=True)
class RunActivations:
    """Activations of one run (batch of one), stacked over layers."""

    resid_pre: Float[Tensor, "layer pos d_model"]
    z: Float[Tensor, "layer pos head d_head"]
    mlp_out: Float[Tensor, "layer pos d_model"]
    logits: Float[Tensor, " vocab"]  # last position, float32


@dataclasses.dataclass(frozen=True)
class Row:
    """One patch: put the counterfactual activation at (site, layer, pos[, head])."""

    site: str
    layer: int
    pos: int
    head: int | None = None


def _module_paths(model: torch.nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


def _envoy(root: Any, path: str) -> Any:
    node = root
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


class _StopForward(Exception):
    """Raised by a hook to end a forward once the wanted layer has run."""


class Patcher:
    """Patches programs on one loaded model. Plain class: the orchestrator's actor wraps it.

    Example:
        >>> lm = load_model("models/binding-tiny")
        >>> table = Patcher(lm).patch(programs, sites=["resid_pre"], positions="targets")
    """

    def __init__(self, lm: LoadedModel, batch_size: int = 256) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.lm = lm
        self.arch: ArchMap = lm.arch
        self.batch_size = batch_size
        paths = _module_paths(lm.model)
        self._paths = {
            "layer": [paths[id(m)] for m in self.arch.layers],
            "attn_out": [paths[id(m)] for m in self.arch.attn_out],
            "mlp": [paths[id(m)] for m in self.arch.mlp],
        }
        params = inspect.signature(lm.model.forward).parameters
        # transformers 5.2x renamed `past_key_values` to `cache`; take whichever this one has.
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.skipped: list[tuple[Any, str]] = []

    # -- clean and counterfactual runs ------------------------------------------------------
    @torch.no_grad()
    def run_pair(
        self, clean_ids: Sequence[int], cf_ids: Sequence[int]
    ) -> tuple[RunActivations, RunActivations, DynamicCache]:
        """Run clean and counterfactual together; save activations and the clean KV cache."""
        import nnsight

        ids = torch.tensor([list(clean_ids), list(cf_ids)], device=self.lm.device)
        nn_model = self.lm.lm
        with nn_model.trace(ids, attention_mask=torch.ones_like(ids), use_cache=True):
            resid, z, mlp = [], [], []
            # Read in forward order, layer by layer (nnsight raises OutOfOrderError otherwise).
            for layer in range(self.arch.n_layers):
                resid.append(_envoy(nn_model, self._paths["layer"][layer]).input)
                z.append(_envoy(nn_model, self._paths["attn_out"][layer]).input)
                mlp.append(_envoy(nn_model, self._paths["mlp"][layer]).output)
            saved = nnsight.save((resid, z, mlp))
            output = nn_model.output.save()
        resid_t, z_t, mlp_t = (torch.stack(list(x), dim=1) for x in saved)
        n, pos = ids.shape
        z_t = z_t.view(n, self.arch.n_layers, pos, self.arch.n_heads, self.arch.d_head)
        last = output.logits[:, -1].float()
        runs = [RunActivations(resid_t[i], z_t[i], mlp_t[i], last[i]) for i in range(2)]
        return runs[0], runs[1], output.past_key_values

    # -- the patched forward ----------------------------------------------------------------
    def _prefix_cache(self, kv: DynamicCache, p: int, batch: list[int]) -> DynamicCache | None:
        """Clean keys/values of positions < p, repeated to each layer's batch size."""
        if p == 0:
            return None
        cache = DynamicCache()
        for layer in range(self.arch.n_layers):
            keys, values = kv.layers[layer].keys, kv.layers[layer].values
            k = keys[:1, :, :p].expand(batch[layer], -1, -1, -1)
            v = values[:1, :, :p].expand(batch[layer], -1, -1, -1)
            cache.update(k, v, layer)
        return cache

    def _run_suffix(
        self,
        clean_ids: Sequence[int],
        kv: DynamicCache,
        p: int,
        end: int,
        joins: list[list[Tensor]],
        heads: list[list[tuple[int, tuple[int, Tensor]]]],
        mlps: list[list[tuple[int, Tensor]]],
        capture: list[list[int]] | None = None,
    ) -> Tensor | list[Tensor]:
        """One forward over tokens p..end-1 (earlier ones from the clean KV cache), with rows
        that join the batch at their layer.

        Args:
            joins: per layer, hidden states `[pos, d_model]` of the rows joining there; batch
                indices follow the joining order, from 0.
            heads: per layer, (batch index, (head, `[d_head]` value)) written into that head's
                slice of the attention output projection's input at the first position.
            mlps: per layer, (batch index, `[d_model]` value) written as the MLP's output at the
                first position.
            capture: per layer, batch indices whose output of that layer (first position) to
                return; the forward stops after the last such layer.

        Returns:
            Last-position logits `[rows, vocab]`, or the captured states in capture order.
        """
        n_layers = self.arch.n_layers
        # The forward starts from the clean tokens (batch of one) only because a model starts at
        # its embeddings; that row is dropped where the first rows join.
        first = next(x for x in range(n_layers) if joins[x])
        batch, size = [], 0
        for layer in range(n_layers):
            size += len(joins[layer])
            batch.append(size if layer >= first else 1)
        captured: list[Tensor] = []
        last = max((x for x in range(n_layers) if capture and capture[x]), default=None)

        def join(layer: int) -> Callable:
            def pre_hook(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                fresh = torch.stack(joins[layer]).to(hidden.dtype)
                hidden = fresh if layer == first else torch.cat([hidden, fresh], dim=0)
                if args:
                    return (hidden, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": hidden}

            return pre_hook

        def write_heads(layer: int) -> Callable:
            def pre_hook(module, args):
                z = args[0].clone()
                view = z.view(*z.shape[:2], self.arch.n_heads, self.arch.d_head)
                for b, (h, value) in heads[layer]:
                    view[b, 0, h] = value.to(z.dtype)
                return (z, *args[1:])

            return pre_hook

        def write_mlp(layer: int) -> Callable:
            def hook(module, args, output):
                out = output.clone()
                for b, value in mlps[layer]:
                    out[b, 0] = value.to(out.dtype)
                return out

            return hook

        def read(layer: int) -> Callable:
            def hook(module, args, output):
                hidden = output[0] if isinstance(output, tuple) else output
                captured.extend(hidden[b, 0] for b in capture[layer])
                if layer == last:
                    raise _StopForward

            return hook

        handles = []
        try:
            for layer in range(n_layers):
                if joins[layer]:
                    handles.append(
                        self.arch.layers[layer].register_forward_pre_hook(
                            join(layer), with_kwargs=True
                        )
                    )
                if heads[layer]:
                    handles.append(
                        self.arch.attn_out[layer].register_forward_pre_hook(write_heads(layer))
                    )
                if mlps[layer]:
                    handles.append(self.arch.mlp[layer].register_forward_hook(write_mlp(layer)))
                if capture and capture[layer]:
                    handles.append(self.arch.layers[layer].register_forward_hook(read(layer)))
            ids = torch.tensor([list(clean_ids[p:end])], device=self.lm.device)
            kwargs = {self._cache_kwarg: self._prefix_cache(kv, p, batch), "use_cache": p > 0}
            try:
                logits = self.lm.model(input_ids=ids, logits_to_keep=1, **kwargs).logits[:, -1]
            except _StopForward:
                return captured
        finally:
            for handle in handles:
                handle.remove()
        assert last is None, "the forward ended before the last captured layer"
        return logits

    @torch.no_grad()
    def patched_logits(
        self,
        clean_ids: Sequence[int],
        clean: RunActivations,
        cf: RunActivations,
        kv: DynamicCache,
        p: int,
        rows: Sequence[Row],
    ) -> Float[Tensor, "row vocab"]:
        """Last-position logits of the clean run with each row's patch at position `p`.

        Rows must share `pos == p`. A row joins the batch at its layer, with the clean residual
        stream of positions p.. as input, so the layers below it are not recomputed. A head
        patch at layer L < last, p < last position changes only position p's residual after
        layer L: a one-position forward computes that residual for all such rows at once, and
        they join the main forward at layer L + 1. At the last layer and p < last position, a
        head patch cannot reach the last position's logits: those rows keep the clean logits.
        """
        assert all(r.pos == p for r in rows), f"rows at positions {sorted({r.pos for r in rows})}"
        n_layers, end = self.arch.n_layers, len(clean_ids)
        out = clean.logits.unsqueeze(0).repeat(len(rows), 1)
        early_heads = [i for i, r in enumerate(rows) if r.site == "attn_head" and p < end - 1]
        first_pass = [i for i in early_heads if rows[i].layer < n_layers - 1]
        after_heads: dict[int, Tensor] = {}
        if first_pass:
            joins: list[list[Tensor]] = [[] for _ in range(n_layers)]
            heads: list[list] = [[] for _ in range(n_layers)]
            capture: list[list[int]] = [[] for _ in range(n_layers)]
            order = sorted(first_pass, key=lambda i: rows[i].layer)
            for b, i in enumerate(order):
                layer = rows[i].layer
                joins[layer].append(clean.resid_pre[layer, p : p + 1])
                heads[layer].append((b, (rows[i].head, cf.z[layer, p, rows[i].head])))
                capture[layer].append(b)
            captured = self._run_suffix(
                clean_ids, kv, p, p + 1, joins, heads, [[] for _ in range(n_layers)], capture
            )
            # Capture order is layer by layer, rows in joining order: the order of `order`.
            after_heads = dict(zip(order, captured, strict=True))
        skipped = set(early_heads) - set(after_heads)  # last-layer heads: clean logits
        main = [i for i in range(len(rows)) if i not in skipped]
        if not main:
            return out
        joins = [[] for _ in range(n_layers)]
        heads = [[] for _ in range(n_layers)]
        mlps: list[list] = [[] for _ in range(n_layers)]
        start_layer = {i: rows[i].layer + (i in after_heads) for i in main}
        order = sorted(main, key=lambda i: start_layer[i])
        for b, i in enumerate(order):
            row, layer = rows[i], start_layer[i]
            fresh = clean.resid_pre[layer, p:].clone()
            if row.site == "resid_pre":
                fresh[0] = cf.resid_pre[layer, p]
            elif i in after_heads:
                fresh[0] = after_heads[i]
            elif row.site == "attn_head":
                heads[layer].append((b, (row.head, cf.z[layer, p, row.head])))
            else:
                mlps[layer].append((b, cf.mlp_out[layer, p]))
            joins[layer].append(fresh)
        logits = self._run_suffix(clean_ids, kv, p, end, joins, heads, mlps)
        assert logits.shape[0] == len(main), f"batch {logits.shape[0]} != {len(main)} rows"
        out[order] = logits.float()
        return out

    # -- rows and metrics -------------------------------------------------------------------
    def rows_for(
        self, pair: EncodedPair, sites: Sequence[str], layers: Sequence[int], positions: Positions
    ) -> list[Row]:
        """Every (site, layer, position[, head]) patch of one program."""
        pos = pair.positions(positions)
        rows: list[Row] = []
        for site in sites:
            for layer in layers:
                for p in pos:
                    if site == "attn_head":
                        rows.extend(Row(site, layer, p, h) for h in range(self.arch.n_heads))
                    else:
                        rows.append(Row(site, layer, p))
        return rows

    @staticmethod
    def _changes(row: Row, clean: RunActivations, cf: RunActivations) -> bool:
        if row.site == "resid_pre":
            return not torch.equal(
                clean.resid_pre[row.layer, row.pos], cf.resid_pre[row.layer, row.pos]
            )
        if row.site == "mlp_out":
            return not torch.equal(
                clean.mlp_out[row.layer, row.pos], cf.mlp_out[row.layer, row.pos]
            )
        return not torch.equal(
            clean.z[row.layer, row.pos, row.head], cf.z[row.layer, row.pos, row.head]
        )

    def patch_pair(
        self,
        pair: EncodedPair,
        sites: Sequence[str],
        layers: Sequence[int],
        positions: Positions = "all",
    ) -> tuple[list[Row], Float[Tensor, "row vocab"], RunActivations, RunActivations]:
        """All patches of one encoded program: the rows, their logits, and the two runs."""
        clean, cf, kv = self.run_pair(pair.clean_ids, pair.cf_ids)
        rows = self.rows_for(pair, sites, layers, positions)
        logits = clean.logits.unsqueeze(0).repeat(len(rows), 1)
        by_pos: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            if self._changes(row, clean, cf):
                by_pos.setdefault(row.pos, []).append(i)
        for p, idx in sorted(by_pos.items()):
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                logits[chunk] = self.patched_logits(
                    pair.clean_ids, clean, cf, kv, p, [rows[i] for i in chunk]
                )
        return rows, logits, clean, cf

    def patch(
        self,
        programs: Sequence[Any],
        sites: Sequence[str] = ("resid_pre",),
        layers: Sequence[int] | None = None,
        positions: str = "all",
    ) -> pa.Table:
        """Patch every program at every (site, layer, position[, head]); one row per patch.

        Args:
            programs: `orchestrator.tasks.Program`s (or dicts with the same keys) that have a
                counterfactual.
            sites: any of `resid_pre`, `attn_head`, `mlp_out`.
            layers: layer indices (default: all).
            positions: `all` token positions, or only the labelled `targets`.

        Returns:
            A table in `PATCHING_SCHEMA`. Programs that cannot be patched with this tokenizer
            are left out and listed, with the reason, in `self.skipped`.

        Raises:
            ValueError: an unknown site or positions value, or a layer out of range.
        """
        bad = [s for s in sites if s not in SITES]
        if bad:
            raise ValueError(f"unknown site(s) {bad}; the sites are {list(SITES)}")
        if positions not in ("all", "targets"):
            raise ValueError(f"positions={positions!r}; use all or targets")
        n = self.arch.n_layers
        layers = list(range(n)) if layers is None else list(layers)
        out_of_range = [x for x in layers if not 0 <= x < n]
        if out_of_range:
            raise ValueError(
                f"layers {out_of_range} out of range: {self.lm.name} has layers 0..{n - 1}"
            )
        columns: dict[str, list] = {f.name: [] for f in PATCHING_SCHEMA}
        for program in programs:
            prog = program if isinstance(program, dict) else program.to_dict()
            pair = encode_program(self.lm.tokenizer, prog)
            if isinstance(pair, Skip):
                self.skipped.append((prog, pair.reason))
                continue
            rows, logits, clean, cf = self.patch_pair(pair, sites, layers, positions)
            self._append(columns, prog, pair, rows, logits, clean, cf)
        return pa.table(columns, schema=PATCHING_SCHEMA)

    def _append(
        self,
        columns: dict[str, list],
        prog: dict,
        pair: EncodedPair,
        rows: Sequence[Row],
        logits: Float[Tensor, "row vocab"],
        clean: RunActivations,
        cf: RunActivations,
    ) -> None:
        a, b = pair.clean_answer_id, pair.cf_answer_id
        clean_ld = (clean.logits[b] - clean.logits[a]).item()
        cf_ld = (cf.logits[b] - cf.logits[a]).item()
        patched = (logits[:, b] - logits[:, a]).tolist()
        top = logits.argmax(-1).tolist()
        denom = cf_ld - clean_ld
        n = len(rows)
        fixed = {
            "model": self.lm.name,
            "task": prog["task"],
            "seq_len": prog["seq_len"],
            "program": prog["index"],
            "clean_answer": prog["answer"],
            "cf_answer": prog["cf_answer"],
            "clean_correct": int(clean.logits.argmax()) == a,
            "cf_correct": int(cf.logits.argmax()) == b,
            "clean_logit_diff": clean_ld,
            "cf_logit_diff": cf_ld,
        }
        for key, value in fixed.items():
            columns[key].extend([value] * n)
        columns["site"].extend(r.site for r in rows)
        columns["layer"].extend(r.layer for r in rows)
        columns["head"].extend(r.head for r in rows)
        columns["pos"].extend(r.pos for r in rows)
        columns["token"].extend(pair.tokens[r.pos] for r in rows)
        columns["label"].extend(pair.labels[r.pos] for r in rows)
        columns["patched_logit_diff"].extend(patched)
        columns["norm_effect"].extend(
            (x - clean_ld) / denom if abs(denom) >= MIN_DENOMINATOR else None for x in patched
        )
        columns["flipped"].extend(t == b for t in top)
