"""Tiny random models and tokenizers, built locally and saved to a folder, so that tests load
them through the same `from_pretrained` path as a hub id. Nothing is downloaded."""

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from models.tokenizer import build_char_tokenizer
from orchestrator.tasks import FAMILIES, iter_programs

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gpt2", "gpt_neox")
# Architectures with more than a Llama's parts: norms after attention and MLP, soft-capped
# attention and final logits, sliding-window layers (a window of 8 tokens, shorter than the
# programs, so that the window matters), fused projections.
MORE_ARCHS = ("gemma2", "gemma3", "phi3")
SLIDING_WINDOW = 8


def tiny_config(arch: str, vocab_size: int, n_layers: int = 2, d_model: int = 64):
    """A 2-layer, d_model-64 config; Llama-likes use grouped-query attention (4 heads, 2 kv)."""
    common = {"vocab_size": vocab_size, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if arch == "gpt2":
        return GPT2Config(n_layer=n_layers, n_embd=d_model, n_head=4, n_positions=512, **common)
    if arch == "gpt_neox":
        return GPTNeoXConfig(
            num_hidden_layers=n_layers,
            hidden_size=d_model,
            num_attention_heads=4,
            intermediate_size=4 * d_model,
            max_position_embeddings=512,
            rotary_pct=0.5,
            **common,
        )
    if arch in ("gemma2", "gemma3"):
        cls = Gemma2Config if arch == "gemma2" else Gemma3TextConfig
        extra = {"final_logit_softcapping": 5.0} if arch == "gemma2" else {}
        return cls(
            num_hidden_layers=n_layers,
            hidden_size=d_model,
            intermediate_size=2 * d_model,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=SLIDING_WINDOW,
            # Sliding and full layers alternate, so both kinds are patched.
            layer_types=["sliding_attention", "full_attention"] * (n_layers // 2)
            + ["sliding_attention"] * (n_layers % 2),
            max_position_embeddings=512,
            **extra,
            **common,
        )
    cls = {
        "phi3": Phi3Config,
        "llama": LlamaConfig,
        "qwen2": Qwen2Config,
        "qwen3": Qwen3Config,
        "mistral": MistralConfig,
    }
    extra = {"head_dim": 16} if arch == "qwen3" else {}
    return cls[arch](
        num_hidden_layers=n_layers,
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        **extra,
        **common,
    )


def save_tiny_model(
    folder: Path, arch: str, tokenizer=None, n_layers: int = 2, d_model: int = 64, seed: int = 0
) -> Path:
    """Build a random model of `arch` with `tokenizer` (default: char-level) into `folder`."""
    tokenizer = tokenizer or build_char_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer), n_layers, d_model))
    # Random init gives near-uniform logits; sharpen them so that answers and effects differ.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_bpe_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained here on generated programs (merges cross characters)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    corpus = [
        p.text for task in sorted(FAMILIES) for p in iter_programs(task, seed=11, seq_len=8, n=200)
    ]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


# Qwen2/Qwen3's pre-tokenizer: digits one per token, a space before punctuation kept with it,
# a lone space before a digit its own token (`a = 5` -> `a`, ` =`, ` `, `5`).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qwen_style_tokenizer(
    vocab_size: int = 400, chat: bool = False
) -> PreTrainedTokenizerFast:
    """A byte-level BPE with Qwen2's pre-tokenizer, trained here on programs of both styles and
    on `#q: 5`-style answers, so that it writes programs and answers as Qwen's vocabulary
    does; with `chat`, it carries a ChatML template like Qwen's."""
    from tokenizers import Regex, decoders

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    corpus = [
        f"{p.text} {p.answer}"
        for task in sorted(FAMILIES)
        for style in ("seed", "paper")
        for p in iter_programs(task, seed=11, seq_len=8, n=100, style=style)
    ]
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    if chat:
        out.chat_template = CHAT_TEMPLATE
    return out


def _first_token(tokenizer, text: str) -> int:
    return tokenizer(text, add_special_tokens=False)["input_ids"][0]


def save_space_model(folder: Path, tokenizer=None, always: bool = False, seed: int = 0) -> Path:
    """A tiny Llama that writes a space after `:` (as a pretrained model does after `#b:`) and
    a digit after a space; with `always`, a space after every token.

    Built by hand: its layers' outputs are scaled down so that the last token's embedding
    decides the next token, `:`'s (or, with `always`, every token's) embedding points along
    one direction that the output row of ` ` reads, and ` `'s along one that the digits' rows
    read.
    """
    tokenizer = tokenizer or build_char_tokenizer()
    cfg = tiny_config("llama", len(tokenizer), n_layers=2)
    cfg.tie_word_embeddings = False
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    colon, space = _first_token(tokenizer, ":"), _first_token(tokenizer, " ")
    digits = [_first_token(tokenizer, str(d)) for d in range(10)]
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.05)
            layer.mlp.down_proj.weight.mul_(0.05)
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        if always:
            embed[:, 0] += 10.0
        else:
            embed[colon, 0] += 10.0
            embed[space, 1] += 10.0
        head[space, 0] += 30.0
        head[digits, 1] += 30.0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
