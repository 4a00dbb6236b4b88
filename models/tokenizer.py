"""A character-level tokenizer over the program alphabet, built with the `tokenizers` library.

Every printable ASCII character (and the newline) is one token, so any program of any family
tokenizes, and character spans map one-to-one onto token positions. A `<s>` token is prepended,
as Llama-style models expect. The result is a `PreTrainedTokenizerFast` that `save_pretrained`
writes and `AutoTokenizer.from_pretrained` reloads offline.
"""

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
ALPHABET = tuple(c for c in string.printable if c not in "\t\r\x0b\x0c")


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """The character-level tokenizer: ids 0-3 are `<pad> <s> </s> <unk>`, then one per char."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + ALPHABET)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=4096,
    )
