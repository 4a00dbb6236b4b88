"""Executes a patching plan (`actors.plan`) on a Hugging Face model.

One mechanism for every read and write: plain PyTorch forward hooks on the model's own modules,
installed for one forward and removed after it. The model's forward is Hugging Face's, unchanged,
so its numerics are the model's (masks, rotary or absolute positions, norms, soft-capping).
Plain hooks rather than nnsight, because a pass changes the batch size between layers (rows join
at their layer, each with its own cached prefix): a hook returns a tensor of another batch size,
which is all this needs, without a tracing graph per pass or a source file to read. `lm.lm`
stays the nnsight wrapper for tracing by hand.

Two kinds of forward:
* `runs`: the clean and counterfactual prompts of programs of one length, in one batch. Keeps
  what the plan's passes read (`Plan.reads`), the clean run's keys and values, and both runs'
  readouts at the programs' readout positions (the last r: r = 1 for tokens `[prog, k]`, a
  token set per position for tokens `[prog, r, k]`; `actors.plan` says why).
* `run_pass`: one `Pass`. The forward is fed the tokens `start..stop-1` with the clean keys and
  values of positions < start in the cache; a pre-hook on each layer appends the rows joining
  there (each with its own program's cache, set up before the forward); hooks on the attention
  output projection and the MLP write the counterfactual values; the base model's last hidden
  state goes through `Readout`, or (pre-passes) a hook on each entry's layer keeps its output at
  the first position and the forward stops after the pass's last layer.

Only the last r positions of a main pass's last layer reach the readout, so that layer's
attention output projection and MLP run on them alone (`_readout_positions`).
"""

import dataclasses
import inspect
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from actors.arch import ArchMap
from actors.plan import Pass, Plan, Reads
from actors.readout import Read, Readout


@dataclasses.dataclass
class Stats:
    """What the engine computed, counted where it happens (decoder layers' inputs)."""

    token_layers: int = 0  # sum over forwards and layers of batch x positions fed
    forwards: int = 0
    readout_rows: int = 0  # hidden states read out (rows x readout positions)
    oom_splits: int = 0


@dataclasses.dataclass(frozen=True)
class Stack:
    """Clean and counterfactual runs of programs of one length and n_read, stacked (slot =
    program). `*r` is empty for 2-D tokens (one readout position, the last), else `r`.

    Attributes:
        ids: clean token ids.
        tokens: per program (and readout position) the token ids whose logits are read.
        clean_resid / cf_resid: per layer, the residual stream entering it.
        cf_z: per layer, the heads' outputs (input of the attention output projection).
        cf_mlp: per layer, the MLP's output.
        keys / values: per layer, the clean run's (all layers).
        clean_logits / cf_logits: each run's logits of `tokens`; clean_top / cf_top: top-1;
            clean_lse / cf_lse: log-sum-exp over the vocabulary (`actors.readout`).
    """

    ids: Int[Tensor, "prog pos"]
    tokens: Int[Tensor, "prog *r k"]
    clean_resid: dict[int, Float[Tensor, "prog pos d_model"]]
    cf_resid: dict[int, Float[Tensor, "prog pos d_model"]]
    cf_z: dict[int, Float[Tensor, "prog pos head d_head"]]
    cf_mlp: dict[int, Float[Tensor, "prog pos d_model"]]
    keys: list[Tensor]
    values: list[Tensor]
    clean_logits: Float[Tensor, "prog *r k"]
    cf_logits: Float[Tensor, "prog *r k"]
    clean_top: Int[Tensor, " prog *r"]
    cf_top: Int[Tensor, " prog *r"]
    clean_lse: Float[Tensor, " prog *r"]
    cf_lse: Float[Tensor, " prog *r"]

    @property
    def n_read(self) -> int:
        return 1 if self.tokens.dim() == 2 else self.tokens.shape[1]


class _PrefixLayer(DynamicLayer):
    """One layer's cache for a pass: the clean run's keys and values of positions `0..stop-1`
    (one copy, gathered per row), of which `0..start-1` are the prefix; the pass's forward
    overwrites positions `start..` in place. A `DynamicLayer` would concatenate instead,
    copying the prefix again in every layer of every pass."""

    def __init__(self, keys: Tensor, values: Tensor, filled: int) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values, self.filled = keys, values, filled

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        end = self.filled + key_states.shape[-2]
        assert end <= self.keys.shape[-2], f"{end} positions > room {self.keys.shape[-2]}"
        self.keys[:, :, self.filled : end] = key_states
        self.values[:, :, self.filled : end] = value_states
        self.filled = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_seq_length(self) -> int:
        return self.filled


def _gather_prefix(
    kv: Float[Tensor, "prog kv_head pos d_head"], rows: Int[Tensor, " row"], start: int, stop: int
) -> Float[Tensor, "row kv_head width d_head"]:
    """Room for positions `0..stop-1` per row, with the clean keys (or values) of the row's
    program copied into `0..start-1`; the pass fills the rest (no copy for positions it
    writes)."""
    out = kv.new_empty(len(rows), kv.shape[1], stop, kv.shape[3])
    if start:
        # Rows come in runs of one program (a pass lists each layer's entries program by
        # program): one broadcast slice copy per run.
        i = 0
        for g, run in itertools.groupby(rows.tolist()):
            n = len(list(run))
            out[i : i + n, :, :start] = kv[g, :, :start]
            i += n
    return out


class _Stop(Exception):
    """Ends a pre-pass once its last layer has run: the layers above would compute nothing read.
    (nnsight stops a trace early the same way.)"""


def hidden_of(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _readout_positions(module: torch.nn.Module, n: int, width: int) -> list:
    """Hooks running `module` (the last layer's attention output projection or MLP) on the last
    `n` of `width` positions. Its output is added to the residual stream: one position
    broadcasts; n > 1 is padded back to `width` with zeros (the positions before hold values
    that nothing reads: after the last attention every operation is per position)."""

    def keep(module, args):
        assert args, f"{type(module).__name__} takes its input by keyword; cannot slice it"
        # Contiguous: GPT-2's Conv1D views its input (a no-op copy for n = 1).
        return (args[0][:, -n:].contiguous(), *args[1:])

    def pad(module, args, out):
        padded = torch.nn.functional.pad(output_of(out), (0, 0, width - n, 0))
        return (padded, *out[1:]) if isinstance(out, tuple) else padded

    return [(module, "pre_args", keep)] + ([(module, "post", pad)] if n > 1 else [])


def output_of(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def installed(registrations: list[tuple[torch.nn.Module, str, Any]]) -> Iterator[None]:
    """Install (module, kind, fn) hooks for the duration of the block; kind is `pre` (forward
    pre-hook with kwargs), `pre_args` (forward pre-hook on positional args) or `post`."""
    handles = []
    try:
        for module, kind, fn in registrations:
            if kind == "pre":
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
            elif kind == "pre_args":
                handles.append(module.register_forward_pre_hook(fn))
            else:
                handles.append(module.register_forward_hook(fn))
        yield
    finally:
        for handle in handles:
            handle.remove()


class Engine:
    """Runs forwards on one model for the patcher: `runs` and `run_pass`.

    Args:
        model: a Hugging Face causal LM in eval mode.
        arch: where its sites are.
        readout: its output embedding (see `actors.readout`).
    """

    def __init__(self, model: Any, arch: ArchMap, readout: Readout) -> None:
        self.model = model
        self.base = model.base_model
        self.arch = arch
        self.readout = readout
        self.device = next(model.parameters()).device
        params = inspect.signature(self.base.forward).parameters
        # Some transformers 5 releases name the cache argument `cache`; take whichever exists.
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.stats = Stats()

    def _counting(self) -> list[tuple[torch.nn.Module, str, Any]]:
        """Pre-hooks counting each layer's batch x positions; install them after the hooks that
        change the batch, so that they see what the layer computes."""

        def count(module, args, kwargs):
            h = hidden_of(args, kwargs)
            self.stats.token_layers += h.shape[0] * h.shape[1]

        return [(layer, "pre", count) for layer in self.arch.layers]

    # -- clean and counterfactual runs ------------------------------------------------------
    @torch.no_grad()
    def runs(
        self,
        clean_ids: Int[Tensor, "prog pos"],
        cf_ids: Int[Tensor, "prog pos"],
        tokens: Int[Tensor, "prog *r k"],
        reads: Reads,
    ) -> Stack:
        """Both runs of programs of one length in one forward; keep what `reads` asks for.

        Args:
            clean_ids / cf_ids: the programs' tokens.
            tokens: per program the token ids whose logits are read at the last position
                (`[prog, k]`), or at each of the last r positions (`[prog, r, k]`).
            reads: the layers the plan's passes read.
        """
        g, n_layers = clean_ids.shape[0], self.arch.n_layers
        resid: dict[int, Tensor] = {}
        z: dict[int, Tensor] = {}
        mlp: dict[int, Tensor] = {}

        def keep(store: dict, layer: int, kind: str):
            def pre(module, args, kwargs):
                store[layer] = hidden_of(args, kwargs)

            def pre_args(module, args):
                store[layer] = args[0]

            def post(module, args, out):
                store[layer] = output_of(out)

            return {"pre": pre, "pre_args": pre_args, "post": post}[kind]

        hooks = []
        for layer in sorted(set(reads.clean_resid) | set(reads.cf_resid)):
            hooks.append((self.arch.layers[layer], "pre", keep(resid, layer, "pre")))
        for layer in reads.cf_z:
            hooks.append((self.arch.attn_out[layer], "pre_args", keep(z, layer, "pre_args")))
        for layer in reads.cf_mlp:
            hooks.append((self.arch.mlp[layer], "post", keep(mlp, layer, "post")))
        ids = torch.cat([clean_ids, cf_ids]).to(self.device)
        # A cache without the config: full layers, so that sliding-window models keep every key.
        cache = DynamicCache()
        with installed(hooks + self._counting()):
            out = self.base(input_ids=ids, use_cache=True, **{self._cache_kwarg: cache})
        self.stats.forwards += 1
        r = 1 if tokens.dim() == 2 else tokens.shape[1]
        read = self._read(out.last_hidden_state[:, -r:], torch.cat([tokens, tokens]))
        heads, d_head = self.arch.n_heads, self.arch.d_head
        return Stack(
            ids=clean_ids.to(self.device),
            tokens=tokens.to(self.device),
            clean_resid={x: resid[x][:g] for x in reads.clean_resid},
            cf_resid={x: resid[x][g:] for x in reads.cf_resid},
            cf_z={x: z[x][g:].reshape(g, -1, heads, d_head) for x in reads.cf_z},
            cf_mlp={x: mlp[x][g:] for x in reads.cf_mlp},
            keys=[cache.layers[x].keys[:g] for x in range(n_layers)],
            values=[cache.layers[x].values[:g] for x in range(n_layers)],
            clean_logits=read.logits[:g],
            cf_logits=read.logits[g:],
            clean_top=read.top[:g],
            cf_top=read.top[g:],
            clean_lse=read.lse[:g],
            cf_lse=read.lse[g:],
        )

    def _read(self, hidden: Float[Tensor, "row n d_model"], tokens: Tensor) -> Read:
        self.stats.readout_rows += hidden.shape[0] * hidden.shape[1]
        return self.readout.at_positions(hidden, tokens)

    # -- one pass ---------------------------------------------------------------------------
    def _prefix_cache(self, ps: Pass, stack: Stack, slots: Tensor) -> Cache | None:
        """Each layer's clean keys/values for its batch of rows, positions < start filled."""
        if ps.start == 0:
            return None
        layers = []
        for layer in range(self.arch.n_layers):
            a, b = ps.members(layer) if layer <= ps.last_layer else (0, 0)
            rows = slots[a:b] if b > a else slots[:1]
            keys = _gather_prefix(stack.keys[layer], rows, ps.start, ps.stop)
            values = _gather_prefix(stack.values[layer], rows, ps.start, ps.stop)
            layers.append(_PrefixLayer(keys, values, ps.start))
        return Cache(layers=layers)

    def _inputs(
        self, ps: Pass, stack: Stack, slots: Tensor, carried: dict[int, Tensor]
    ) -> dict[int, Tensor]:
        """Per layer, the hidden states `[rows, width, d_model]` of the entries joining there."""
        joins: dict[int, Tensor] = {}
        for layer in range(ps.first_layer, ps.last_layer + 1):
            a, b = ps.joining(layer)
            if a == b:
                continue
            x = stack.clean_resid[layer][slots[a:b], ps.start : ps.stop]  # a copy
            cf = [i for i in range(a, b) if ps.entries[i].first == "cf"]
            if cf:
                x[[i - a for i in cf], 0] = stack.cf_resid[layer][slots[cf], ps.start]
            kept = [i for i in range(a, b) if ps.entries[i].first == "carried"]
            if kept:
                values = torch.stack([carried[ps.entries[i].patch] for i in kept])
                x[[i - a for i in kept], 0] = values.to(x.dtype)
            joins[layer] = x
        return joins

    def _writes(self, ps: Pass, plan: Plan, stack: Stack, slots: Tensor, layer: int) -> list:
        """Hooks writing the counterfactual heads and MLP outputs of the entries joining at
        `layer`, at the first position of their batch rows."""
        a, b = ps.joining(layer)
        offset = ps.members(layer)[0]  # batch row of entry i is i - offset
        hooks = []
        heads = [i for i in range(a, b) if ps.entries[i].write == "head"]
        if heads:
            rows = torch.tensor([i - offset for i in heads], device=self.device)
            index = torch.tensor([plan.patches[ps.entries[i].patch].head for i in heads])
            values = stack.cf_z[layer][slots[heads], ps.start, index.to(self.device)]
            n_heads, d_head = self.arch.n_heads, self.arch.d_head

            def write_heads(module, args):
                z = args[0].clone()
                z.view(*z.shape[:2], n_heads, d_head)[rows, 0, index] = values.to(z.dtype)
                return (z, *args[1:])

            hooks.append((self.arch.attn_out[layer], "pre_args", write_heads))
        mlps = [i for i in range(a, b) if ps.entries[i].write == "mlp"]
        if mlps:
            mlp_rows = torch.tensor([i - offset for i in mlps], device=self.device)
            mlp_values = stack.cf_mlp[layer][slots[mlps], ps.start]

            def write_mlp(module, args, out):
                out = output_of(out).clone()
                out[mlp_rows, 0] = mlp_values.to(out.dtype)
                return out

            hooks.append((self.arch.mlp[layer], "post", write_mlp))
        return hooks

    @torch.no_grad()
    def run_pass(
        self,
        ps: Pass,
        plan: Plan,
        stack: Stack,
        slot_of: dict[int, int],
        carried: dict[int, Tensor],
    ) -> Read | None:
        """Run one pass.

        Args:
            ps: the pass.
            plan: its plan (for the patches behind the entries).
            stack: the runs of the pass's programs (of its `stack_key`).
            slot_of: program index -> slot in `stack`.
            carried: patch -> its pre-pass output `[d_model]`; a pre-pass adds to it, a main
                pass reads its entries' values (`actors.execute.run_plan` drops them once the
                pass is done).

        Returns:
            For a main pass, the readout of the stack's tokens at the readout positions: logits
            `[rows, k]` (2-D tokens) or `[rows, r, k]`, top-1 and log-sum-exp `[rows]` or
            `[rows, r]`, rows in entry order; for a pre-pass, None (outputs go to `carried`).
        """
        assert stack.n_read == ps.n_read, f"stack reads {stack.n_read} positions, pass {ps}"
        slots = torch.tensor([slot_of[plan.patches[e.patch].program] for e in ps.entries])
        slots = slots.to(self.device)
        joins = self._inputs(ps, stack, slots, carried)
        pre = ps.read == "layer_out"

        def enter(layer: int):
            def hook(module, args, kwargs):
                below = hidden_of(args, kwargs)
                if layer not in joins:  # a pre-pass layer no entry joins: carry one row
                    return _with_hidden(args, kwargs, below[:1])
                fresh = joins.pop(layer).to(below.dtype)
                replace = pre or layer == ps.first_layer
                return _with_hidden(args, kwargs, fresh if replace else torch.cat([below, fresh]))

            return hook

        def keep(layer: int, a: int, b: int):
            def hook(module, args, out):
                kept = output_of(out)[:, 0].clone()
                for i in range(a, b):
                    carried[ps.entries[i].patch] = kept[i - a]
                if layer == ps.last_layer:
                    raise _Stop

            return hook

        hooks = []
        for layer in range(ps.first_layer, ps.last_layer + 1):
            a, b = ps.joining(layer)
            if a < b or pre:
                hooks.append((self.arch.layers[layer], "pre", enter(layer)))
            if a < b:
                hooks.extend(self._writes(ps, plan, stack, slots, layer))
            if a < b and pre:
                hooks.append((self.arch.layers[layer], "post", keep(layer, a, b)))
        if not pre and ps.width > ps.n_read:
            # Only the readout positions of the last layer's output are read: its attention
            # output projection and MLP run on them alone.
            last = self.arch.n_layers - 1
            # (A last-layer head or MLP write is at the first readout position: a pass of
            # width n_read.)
            assert all(e.write == "none" for e in ps.entries if e.layer == last), ps
            for module in (self.arch.attn_out[last], self.arch.mlp[last]):
                hooks.extend(_readout_positions(module, ps.n_read, ps.width))
        ids = stack.ids[slots[0], ps.start : ps.stop].unsqueeze(0)
        cache = self._prefix_cache(ps, stack, slots)
        kwargs = {self._cache_kwarg: cache, "use_cache": cache is not None}
        self.stats.forwards += 1
        with installed(hooks + self._counting()):
            try:
                out = self.base(input_ids=ids, **kwargs)
            except _Stop:
                assert pre, "a main pass was stopped"
                return None
        assert not pre, f"pre-pass ran past its last layer {ps.last_layer}"
        assert not joins, f"layers {sorted(joins)} never ran"
        hidden = out.last_hidden_state[:, -ps.n_read :]
        assert hidden.shape[0] == len(ps.entries), f"{hidden.shape[0]} rows != {len(ps.entries)}"
        return self._read(hidden, stack.tokens[slots])
