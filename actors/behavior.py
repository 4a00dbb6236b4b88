"""Behaviour: does the model answer with the program's value?

Every program is asked by `actors.answers`' rule, the one patching uses: an answer prefix (the
spec's string, or `auto` from the model's greedy next token), the tokens the clean and the
counterfactual answer share appended, and at the first token where they differ one forward
reads the top-1 over the vocabulary (`top1`, `top1_correct`) and the family's candidates
(`choice_correct`). So a program is right or wrong the same way in both experiments.

`predicted` (and `correct`) is the model's own answer, by one of two methods:
- `logits`: with a template that is not `chat`, when every candidate of the family continues
  with a different token after the prompt, the prefix and what all candidates share, the
  candidate whose token has the highest logit there (the same forward, where the inputs agree).
- `generate`: otherwise (multi-token answers that share a first token, or a chat model),
  greedy generation of `max_new_tokens` and the family's answer parser.

`error_kind` sorts each wrong answer to a binding program (`orchestrator.tasks.errors`, by
priority: `not_a_candidate`, `stale_binding`, `line_1_2_constant`, `distractor_value`, `other`);
it is null where the answer is right and on every row of the other families, whose programs
have no chains to classify by.

`template: chat` uses the tokenizer's own chat template (`apply_chat_template`, generation
prompt on) when it has one, else the built-in question (`CHAT_TEMPLATE`).

The vLLM backend (GPU machines) generates; its request building and output parsing are plain
functions here, so that they are tested without vLLM.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import torch

from actors.answers import (
    Question,
    Skip,
    ask,
    choice,
    continuations,
    next_tokens,
    resolve_prefixes,
)
from actors.loading import LoadedModel
from orchestrator.tasks import CHAT_TEMPLATE, RAW_TEMPLATE, get_family, parse_answer, render_prompt
from orchestrator.tasks.errors import error_kind

BEHAVIOR_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("task", pa.string()),
        ("seq_len", pa.int32()),
        ("program", pa.int64()),
        ("depth", pa.int32()),
        ("heuristic", pa.bool_()),
        ("expected", pa.string()),
        ("predicted", pa.string()),
        ("correct", pa.bool_()),
        ("error_kind", pa.string()),
        ("backend", pa.string()),
        ("method", pa.string()),
        ("answer_prefix", pa.string()),
        ("top1", pa.string()),
        ("top1_candidate", pa.bool_()),
        ("top1_correct", pa.bool_()),
        ("choice_correct", pa.bool_()),
    ]
)
# The columns a question's forward fills (None where a program could not be asked).
ASKED = ("answer_prefix", "top1", "top1_candidate", "top1_correct", "choice_correct")
CHAT = "chat"


def resolve_template(template: str) -> str:
    """`raw` and `chat` name the built-in templates; anything else is a format string."""
    return {"raw": RAW_TEMPLATE, CHAT: CHAT_TEMPLATE}.get(template, template)


def render(tokenizer: Any, program: Any, template: str) -> str:
    """The prompt of `program` under `template` (`raw`, `chat`, or a format string).

    `chat` with a tokenizer that has a chat template: the built-in question as the user's
    message, through `apply_chat_template` with the generation prompt; a beginning-of-text
    token the template writes is dropped when the tokenizer adds its own.
    """
    if template == CHAT and getattr(tokenizer, "chat_template", None):
        question = render_prompt(program, CHAT_TEMPLATE).removesuffix("\nAnswer:")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        bos = tokenizer.bos_token
        ids = tokenizer("x")["input_ids"]
        if bos and text.startswith(bos) and ids and ids[0] == tokenizer.bos_token_id:
            text = text[len(bos) :]
        return text
    return render_prompt(program, resolve_template(template))


def family_choice(
    prompt_ids: list[int], candidate_tokens: Sequence[list[int]]
) -> tuple[list[int], list[int]] | None:
    """The input of the `logits` method and each candidate's token there: the prompt, then the
    tokens every candidate's continuation (`candidate_tokens`, after prompt + prefix) shares;
    None where two candidates continue with the same token."""
    conts = candidate_tokens
    n = 0
    while all(len(c) > n + 1 for c in conts) and len({c[n] for c in conts}) == 1:
        n += 1
    nxt = [c[n] if len(c) > n else -1 for c in conts]
    if -1 in nxt or len(set(nxt)) != len(nxt):
        return None
    return prompt_ids + conts[0][:n], nxt


def behavior_rows(
    model: str,
    programs: Sequence[Any],
    predictions: Sequence[str | None],
    backend: str,
    method: str,
    asked: Sequence[dict[str, Any]] | None = None,
) -> pa.Table:
    """The behaviour table for programs and the answers the model gave (None: no answer);
    `asked[i]` holds program i's `ASKED` columns (missing: null). `error_kind` is the kind of a
    wrong binding answer (`orchestrator.tasks.errors.error_kind`), null on right answers and
    on other families."""
    rows = {f.name: [] for f in BEHAVIOR_SCHEMA}
    asked = asked if asked is not None else [{}] * len(programs)
    for p, pred, extra in zip(programs, predictions, asked, strict=True):
        rows["model"].append(model)
        rows["task"].append(p.task)
        rows["seq_len"].append(p.seq_len)
        rows["program"].append(p.index)
        rows["depth"].append(p.depth)
        rows["heuristic"].append(p.heuristic)
        rows["expected"].append(p.answer)
        rows["predicted"].append(pred)
        rows["correct"].append(pred == p.answer)
        rows["error_kind"].append(error_kind(p, pred))
        rows["backend"].append(backend)
        rows["method"].append(method)
        for name in ASKED:
            rows[name].append(extra.get(name))
    return pa.table(rows, schema=BEHAVIOR_SCHEMA)


def question(
    tokenizer: Any, program: Any, template: str, prompt: str, prefix: str
) -> tuple[Question | Skip, tuple[list[int], list[int]] | None]:
    """`actors.answers.ask` for one program whose prompt under `template` is `prompt` (its
    counterfactual rendered the same way; a program without one is asked against another
    candidate), and the `logits` method's input and tokens (`family_choice`): both from one
    tokenization of the candidates after prompt + prefix."""
    candidates = get_family(program.task).candidates
    prompt_ids = tokenizer(prompt)["input_ids"]
    conts = continuations(tokenizer, prompt_ids, prompt, [prefix + c for c in candidates])
    if program.cf_text is None:
        cf_prompt = prompt
        cf_answer = next((c for c in candidates if c[:1] != program.answer[:1]), program.answer)
    else:
        cf_prompt = render(tokenizer, dataclasses.replace(program, text=program.cf_text), template)
        cf_answer = program.cf_answer
    q = ask(
        tokenizer, prompt, cf_prompt, program.answer, cf_answer, candidates, prefix, False, conts
    )
    return q, family_choice(prompt_ids, conts)


def asked_columns(tokenizer: Any, q: Question | Skip, prefix: str, top: int, logits) -> dict:
    """The `ASKED` columns of one program from its question's forward."""
    if isinstance(q, Skip):
        return {"answer_prefix": prefix}
    return {
        "answer_prefix": q.prefix,
        "top1": tokenizer.decode([top]),
        "top1_candidate": top in q.candidates,
        "top1_correct": top == q.clean_answer[0],
        "choice_correct": choice(logits, q.candidates, q.clean_answer[0]),
    }


class HFScorer:
    """Scores programs with a Hugging Face model (CPU or GPU)."""

    def __init__(
        self, lm: LoadedModel, template: str = "raw", batch_size: int = 64, max_new_tokens: int = 8
    ) -> None:
        self.lm = lm
        self.template = template
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens

    def _encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.lm.tokenizer(
            list(prompts), return_tensors="pt", padding=True, padding_side="left"
        )
        return {
            k: v.to(self.lm.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")
        }

    @torch.no_grad()
    def _by_generation(self, prompts: Sequence[str]) -> list[str | None]:
        out: list[str | None] = []
        tok = self.lm.tokenizer
        for start in range(0, len(prompts), self.batch_size):
            enc = self._encode(prompts[start : start + self.batch_size])
            gen = self.lm.model.generate(
                **enc,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
            new = gen[:, enc["input_ids"].shape[1] :]
            out.extend(parse_answer(tok.decode(row, skip_special_tokens=True)) for row in new)
        return out

    def score(self, programs: Sequence[Any], answer_prefix: str = "") -> pa.Table:
        """One behaviour row per program (all of one family).

        Args:
            programs: `orchestrator.tasks.Program`s of one family.
            answer_prefix: the text between prompt and answer, or `auto` (`actors.answers`).
        """
        if not programs:
            return BEHAVIOR_SCHEMA.empty_table()
        families = {p.task for p in programs}
        assert len(families) == 1, f"score one family at a time, got {sorted(families)}"
        candidates = get_family(programs[0].task).candidates
        tok, model = self.lm.tokenizer, self.lm.model
        prompts = [render(tok, p, self.template) for p in programs]
        prefixes = resolve_prefixes(model, tok, prompts, candidates, answer_prefix, self.batch_size)
        pairs = [
            question(tok, p, self.template, prompt, prefix)
            for p, prompt, prefix in zip(programs, prompts, prefixes, strict=True)
        ]
        questions = [q for q, _ in pairs]
        choices = [c for _, c in pairs]
        if self.template == CHAT or any(c is None for c in choices):
            choices = None
        # One forward per distinct input, reading every token asked of it.
        wanted: dict[tuple[int, ...], set[int]] = {}
        for q in questions:
            if not isinstance(q, Skip):
                wanted.setdefault(tuple(q.clean_ids), set()).update(q.candidates)
        for ids, nxt in choices or ():
            wanted.setdefault(tuple(ids), set()).update(nxt)
        inputs = list(wanted)
        picks = [sorted(wanted[k]) for k in inputs]
        top, picked = next_tokens(model, inputs, picks, self.batch_size)
        read = {
            k: (t, dict(zip(p, v, strict=True)))
            for k, t, p, v in zip(inputs, top, picks, picked, strict=True)
        }
        asked = []
        for q, prefix in zip(questions, prefixes, strict=True):
            if isinstance(q, Skip):
                asked.append(asked_columns(tok, q, prefix, 0, []))
                continue
            t, logits = read[tuple(q.clean_ids)]
            asked.append(asked_columns(tok, q, prefix, t, [logits[c] for c in q.candidates]))
        if choices is not None:
            preds: list[str | None] = []
            for ids, nxt in choices:
                logits = read[tuple(ids)][1]
                best = max(range(len(nxt)), key=lambda i: logits[nxt[i]])
                preds.append(candidates[best])
            method = "logits"
        else:
            preds, method = self._by_generation(prompts), "generate"
        return behavior_rows(self.lm.name, programs, preds, "hf", method, asked)


# -- vLLM: plain functions for requests and outputs; the engine only on GPU machines ---------

VLLM_TOP_K = 20  # logprobs per position where the candidates cannot be asked for (vLLM's max)


def vllm_requests(
    programs: Sequence[Any], template: str, max_new_tokens: int, tokenizer: Any = None
) -> tuple[list[str], dict]:
    """Prompts and greedy `SamplingParams` keyword arguments for a batch of programs."""
    prompts = [render(tokenizer, p, template) for p in programs]
    return prompts, {"max_tokens": max_new_tokens, "temperature": 0.0}


def vllm_predictions(outputs: Sequence[Any]) -> list[str | None]:
    """Parse vLLM `RequestOutput`s (anything with `.outputs[0].text`) into answers."""
    return [parse_answer(o.outputs[0].text) if o.outputs else None for o in outputs]


def vllm_score_params(candidates: Sequence[int], direct: bool) -> dict:
    """`SamplingParams` keyword arguments that read one next token and the candidates'
    log-probabilities: asked for directly (`logprob_token_ids`, where the installed vLLM has
    it), else as the top `VLLM_TOP_K` log-probabilities, which hold the candidates that matter
    (one that is not among them is below every one that is)."""
    params = {"max_tokens": 1, "temperature": 0.0}
    if direct:
        return params | {"logprobs": 1, "logprob_token_ids": sorted(set(candidates))}
    return params | {"logprobs": VLLM_TOP_K}


def vllm_next(output: Any, candidates: Sequence[int]) -> tuple[int, list[float]]:
    """The greedy next token of one `RequestOutput` and each candidate's log-probability
    (`-inf` where vLLM did not return it)."""
    first = output.outputs[0]
    found = first.logprobs[0] if first.logprobs else {}
    value = {int(t): getattr(lp, "logprob", lp) for t, lp in found.items()}
    return int(first.token_ids[0]), [value.get(c, float("-inf")) for c in candidates]


class VLLMScorer:
    """Scores programs with `vllm.LLM`: greedy generation and the family's parser for
    `predicted`, and one scoring request per program for the `ASKED` columns."""

    def __init__(self, model: str, template: str = "raw", max_new_tokens: int = 8, **engine: Any):
        from vllm import LLM, SamplingParams

        self.name = model
        self.template = template
        self.max_new_tokens = max_new_tokens
        self.llm = LLM(model=model, **engine)
        self.tokenizer = self.llm.get_tokenizer()
        self.direct = hasattr(SamplingParams, "logprob_token_ids")

    def _next(self, inputs: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]]):
        from vllm import SamplingParams

        requests = [{"prompt_token_ids": list(ids)} for ids in inputs]
        params = [SamplingParams(**vllm_score_params(c, self.direct)) for c in candidates]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [vllm_next(o, c) for o, c in zip(outputs, candidates, strict=True)]

    def score(self, programs: Sequence[Any], answer_prefix: str = "") -> pa.Table:
        from vllm import SamplingParams

        from actors.answers import AUTO, auto_prefix

        tok = self.tokenizer
        candidates = get_family(programs[0].task).candidates
        prompts, params = vllm_requests(programs, self.template, self.max_new_tokens, tok)
        prefixes = [answer_prefix] * len(programs)
        if answer_prefix == AUTO:
            nxt = self._next([tok(p)["input_ids"] for p in prompts], [[]] * len(prompts))
            prefixes = [auto_prefix(tok.decode([t]), candidates) for t, _ in nxt]
        questions = [
            question(tok, p, self.template, prompt, prefix)[0]
            for p, prompt, prefix in zip(programs, prompts, prefixes, strict=True)
        ]
        asked_at = [i for i, q in enumerate(questions) if not isinstance(q, Skip)]
        read = self._next(
            [questions[i].clean_ids for i in asked_at], [questions[i].candidates for i in asked_at]
        )
        asked = [
            asked_columns(tok, q, pre, 0, []) for q, pre in zip(questions, prefixes, strict=True)
        ]
        for i, (top, logprobs) in zip(asked_at, read, strict=True):
            asked[i] = asked_columns(tok, questions[i], prefixes[i], top, logprobs)
        outputs = self.llm.generate(prompts, SamplingParams(**params), use_tqdm=False)
        preds = vllm_predictions(outputs)
        return behavior_rows(self.name, programs, preds, "vllm", "generate", asked)


def vllm_available() -> bool:
    """vLLM is importable and there is a CUDA device for it."""
    if not torch.cuda.is_available():
        return False
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True
