"""The last step of every forward the engine runs: from final hidden states to the few numbers a
patching row keeps — the logits of a handful of tokens (the two answers), the top-1 token, and
the log-sum-exp of all the logits (so that `logit - lse` is a token's log-probability, which a
multi-token answer sums over its positions).

A Qwen3 vocabulary has 151,936 tokens; keeping a rows x vocabulary logit matrix to read two
entries and an argmax costs 311 MB per 512 rows. The readout instead takes the rows' dot
products with the wanted unembedding rows, and walks the vocabulary in chunks for the top-1
token (a running maximum) and the log-sum-exp (a running maximum and a sum of exponentials
rescaled to it, stable in float32), so no tensor of rows x vocabulary size is ever made. The
log-sum-exp adds 5-12% to the readout's time at a Qwen vocabulary on CPU (about 30 us per call
at a tiny one): a caller that only compares logits can turn it off (`lse=False`).

It must equal the model's own logits. It reproduces what Hugging Face causal LMs do after the
output embedding (Gemma-2/3's final soft-capping, Cohere's `logit_scale`, Granite's
`logits_scaling`) and `check` compares it with the model's forward once per model, so an
architecture that does something else fails loudly instead of giving wrong numbers.
"""

import dataclasses
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

VOCAB_CHUNK = 32768  # vocabulary rows per matmul of the top-1 and log-sum-exp walk


class Read(NamedTuple):
    """What is kept of each row (`*row`: one or more leading axes), all float32 but `top`.

    Attributes:
        logits: the logits of the row's tokens, as the model's forward gives them.
        top: the top-1 token.
        lse: log-sum-exp of the row's logits over the whole vocabulary; a token's
            log-probability is `logits - lse[..., None]`.
    """

    logits: Float[Tensor, "*row k"]
    top: Int[Tensor, "*row"]
    lse: Float[Tensor, "*row"]

    @classmethod
    def empty(cls, rows: int, n: int | None, k: int, device: torch.device) -> "Read":
        """`rows` rows of `n` positions (None: no position axis) to `put` into: NaN, top -1."""
        shape = (rows,) if n is None else (rows, n)
        return cls(
            torch.full((*shape, k), torch.nan, device=device),
            torch.full(shape, -1, dtype=torch.long, device=device),
            torch.full(shape, torch.nan, device=device),
        )

    def put(self, rows: list[int], read: "Read") -> None:
        """Write `read` into `rows`, its positions into the first ones (a read without a
        position axis is one position)."""
        index = torch.tensor(rows, device=self.top.device)
        for dest, src in zip(self, read, strict=True):
            if self.top.dim() == 2:
                src = src.reshape(len(rows), -1, *dest.shape[2:])  # [rows, n(, k)]
                dest[index, : src.shape[1]] = src
            else:
                dest[index] = src


@dataclasses.dataclass(frozen=True)
class Readout:
    """The output embedding of one model and the transform HF applies to its logits; `lse`:
    whether calls compute the log-sum-exp (else it is NaN)."""

    weight: Float[Tensor, "vocab d_model"]
    bias: Float[Tensor, " vocab"] | None
    scale: float = 1.0
    softcap: float | None = None
    chunk: int = VOCAB_CHUNK
    lse: bool = True

    @classmethod
    def of(cls, model: Any, chunk: int = VOCAB_CHUNK, lse: bool = True) -> "Readout":
        """The readout of a Hugging Face causal LM.

        Raises:
            ValueError: the output embedding is not a plain linear layer with float weights.
        """
        head = model.get_output_embeddings()
        weight = getattr(head, "weight", None)
        if weight is None or not weight.is_floating_point() or weight.dim() != 2:
            raise ValueError(
                f"{type(model).__name__}: output embedding {type(head).__name__} is not a linear "
                "layer with float weights; keep it unquantized (bitsandbytes does by default)"
            )
        cfg = model.config.get_text_config()
        scale = float(getattr(cfg, "logit_scale", None) or 1.0)
        scaling = getattr(cfg, "logits_scaling", None)
        if scaling:
            scale /= float(scaling)
        softcap = getattr(cfg, "final_logit_softcapping", None)
        bias = getattr(head, "bias", None)
        return cls(weight, bias, scale, float(softcap) if softcap else None, chunk, lse)

    def _finish(self, logits: Tensor, inplace: bool = False) -> Tensor:
        """HF's transform after the output embedding, in float32; `inplace` on `logits`, a float32
        temporary (a vocabulary chunk: no second rows x chunk tensor, one pass per op)."""
        logits = logits.float() if inplace else logits.float().clone()
        if self.scale != 1.0:
            logits.mul_(self.scale)
        if self.softcap is not None:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits

    def __call__(self, hidden: Float[Tensor, "row d_model"], tokens: Int[Tensor, "row k"]) -> Read:
        """Per row: the logits of its `tokens`, its top-1 token and its log-sum-exp."""
        hidden = hidden.to(self.weight.dtype)
        rows = self.weight[tokens]  # [row, k, d_model]
        picked = torch.einsum("rd,rkd->rk", hidden, rows)
        if self.bias is not None:
            picked = picked + self.bias[tokens]
        best = torch.full((hidden.shape[0],), -torch.inf, device=hidden.device)
        top = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
        running = torch.full_like(best, -torch.inf)  # the finished logits' maximum so far
        total = torch.zeros_like(best)  # sum of exp(logit - running)
        for start in range(0, self.weight.shape[0], self.chunk):
            w = self.weight[start : start + self.chunk]
            b = None if self.bias is None else self.bias[start : start + self.chunk]
            logits = torch.nn.functional.linear(hidden, w, b).float()
            # The raw logits' maximum is the finished ones' (the transform is increasing).
            value, index = logits.max(dim=-1)
            better = value > best  # strict: the first maximum wins, as in argmax
            best = torch.where(better, value, best)
            top = torch.where(better, index + start, top)
            if not self.lse:
                continue
            # The chunk's sum of exp(logit - its maximum), rescaled to the running maximum.
            peak = self._finish(value)
            chunk = self._finish(logits, inplace=True).sub_(peak[:, None]).exp_().sum(dim=-1)
            new = torch.maximum(running, peak)
            total = total * torch.exp(running - new) + chunk * torch.exp(peak - new)
            running = new
        lse = running + torch.log(total) if self.lse else torch.full_like(best, torch.nan)
        return Read(self._finish(picked), top, lse)

    def at_positions(
        self, hidden: Float[Tensor, "row n d_model"], tokens: Int[Tensor, "row *r k"]
    ) -> Read:
        """Each row's `n` positions in one call: with tokens `[row, k]` (n = 1) the result has no
        position axis; with `[row, n, k]`, a token set per position."""
        rows, n = hidden.shape[:2]
        assert tokens.shape[1:-1] in ((), (n,)), f"tokens {tuple(tokens.shape)}, {n} positions"
        k = tokens.shape[-1]
        flat = tokens.to(hidden.device).reshape(rows, -1, k).expand(rows, n, k).reshape(-1, k)
        logits, top, lse = self(hidden.reshape(rows * n, -1), flat)
        shape = tokens.shape[:-1]
        return Read(logits.view(*shape, k), top.view(shape), lse.view(shape))

    @torch.no_grad()
    def check(self, model: Any, ids: Int[Tensor, "1 pos"]) -> None:
        """Compare this readout of the base model's last hidden state (the engine's path) with
        the model's own last-position logits on `ids`, at its top 8 tokens and in log-sum-exp.

        Raises:
            ValueError: they differ; the architecture transforms its logits in a way this module
                does not reproduce.
        """
        want = model(input_ids=ids, logits_to_keep=1).logits[0, -1].float()
        hidden = model.base_model(input_ids=ids).last_hidden_state[0, -1:]
        tokens = want.topk(min(8, want.numel())).indices.view(1, -1)
        got, top, lse = self(hidden, tokens)
        tol = 1e-3 * max(1.0, want.abs().max().item())
        worst = (got[0] - want[tokens[0]]).abs().max().item()
        if self.lse:
            worst = max(worst, abs(lse[0].item() - torch.logsumexp(want, dim=0).item()))
        if worst > tol or top[0] != tokens[0, 0]:
            raise ValueError(
                f"{type(model).__name__}: the engine's readout differs from the model's logits "
                f"by {worst:.3g} (top-1 {top[0].item()} vs {tokens[0, 0].item()}); this "
                "architecture transforms its logits in a way actors/readout.py does not "
                "reproduce (add it to Readout.of)"
            )
