"""The last step of every forward the engine runs: from final hidden states to the few numbers a
patching row keeps — the logits of a handful of tokens (the two answers) and the top-1 token.

A Qwen3 vocabulary has 151,936 tokens; keeping a rows x vocabulary logit matrix to read two
entries and an argmax costs 311 MB per 512 rows. The readout instead takes the rows' dot
products with the wanted unembedding rows, and finds the top-1 token by walking the vocabulary
in chunks with a running maximum, so no tensor of rows x vocabulary size is ever made.

It must equal the model's own logits. It reproduces what Hugging Face causal LMs do after the
output embedding (Gemma-2/3's final soft-capping, Cohere's `logit_scale`, Granite's
`logits_scaling`) and `check` compares it with the model's forward once per model, so an
architecture that does something else fails loudly instead of giving wrong numbers.
"""

import dataclasses
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

VOCAB_CHUNK = 32768  # vocabulary rows per matmul of the top-1 search


@dataclasses.dataclass(frozen=True)
class Readout:
    """The output embedding of one model and the transform HF applies to its logits."""

    weight: Float[Tensor, "vocab d_model"]
    bias: Float[Tensor, " vocab"] | None
    scale: float = 1.0
    softcap: float | None = None
    chunk: int = VOCAB_CHUNK

    @classmethod
    def of(cls, model: Any, chunk: int = VOCAB_CHUNK) -> "Readout":
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
        return cls(weight, bias, scale, float(softcap) if softcap else None, chunk)

    def _finish(self, logits: Tensor) -> Tensor:
        logits = logits.float()
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def __call__(
        self, hidden: Float[Tensor, "row d_model"], tokens: Int[Tensor, "row k"]
    ) -> tuple[Float[Tensor, "row k"], Int[Tensor, " row"]]:
        """Logits of `tokens` (per row) and the top-1 token of each row, in float32."""
        hidden = hidden.to(self.weight.dtype)
        rows = self.weight[tokens]  # [row, k, d_model]
        picked = torch.einsum("rd,rkd->rk", hidden, rows)
        if self.bias is not None:
            picked = picked + self.bias[tokens]
        best = torch.full((hidden.shape[0],), -torch.inf, device=hidden.device)
        top = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
        for start in range(0, self.weight.shape[0], self.chunk):
            w = self.weight[start : start + self.chunk]
            b = None if self.bias is None else self.bias[start : start + self.chunk]
            value, index = torch.nn.functional.linear(hidden, w, b).float().max(dim=-1)
            better = value > best  # strict: the first maximum wins, as in argmax
            best = torch.where(better, value, best)
            top = torch.where(better, index + start, top)
        return self._finish(picked), top

    @torch.no_grad()
    def check(self, model: Any, ids: Int[Tensor, "1 pos"]) -> None:
        """Compare this readout of the base model's last hidden state (the engine's path) with
        the model's own last-position logits on `ids`, at its top 8 tokens.

        Raises:
            ValueError: they differ; the architecture transforms its logits in a way this module
                does not reproduce.
        """
        want = model(input_ids=ids, logits_to_keep=1).logits[0, -1].float()
        hidden = model.base_model(input_ids=ids).last_hidden_state[0, -1:]
        tokens = want.topk(min(8, want.numel())).indices.view(1, -1)
        got, top = self(hidden, tokens)
        tol = 1e-3 * max(1.0, want.abs().max().item())
        worst = (got[0] - want[tokens[0]]).abs().max().item()
        if worst > tol or top[0] != tokens[0, 0]:
            raise ValueError(
                f"{type(model).__name__}: the engine's readout differs from the model's logits "
                f"by {worst:.3g} (top-1 {top[0].item()} vs {tokens[0, 0].item()}); this "
                "architecture transforms its logits in a way actors/readout.py does not "
                "reproduce (add it to Readout.of)"
            )
