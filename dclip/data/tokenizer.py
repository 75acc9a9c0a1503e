"""A CLIP-format BPE tokenizer trained with `tokenizers` on a caption corpus (no download needed)."""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTokenizer


BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# CLIP's own pre-tokenisation pattern, so the trained merges behave like OpenAI CLIP's vocabulary.
CLIP_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def train_clip_tokenizer(
    texts: Iterable[str], vocab_size: int = 1024, model_max_length: int = 77
) -> CLIPTokenizer:
    """
    Train byte-level BPE merges on `texts` and return a `transformers.CLIPTokenizer` built from them.

    The vocabulary is laid out as OpenAI CLIP's is: the 256 byte symbols, the same with the end-of-word suffix
    `</w>`, one entry per merge, then `<|startoftext|>` and `<|endoftext|>` (which also pads and stands for unknowns):
    `vocab_size` entries, fewer where the captions run out of pairs to merge. The same captions give the same
    vocabulary in every run. Any real CLIP tokenizer can be used in its place.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    minimum = 2 * len(alphabet) + 2
    if vocab_size < minimum:
        raise ValueError(f"`vocab_size` must be at least {minimum} (byte symbols with and without `</w>`), "
                         f"got {vocab_size}.")
    bpe = Tokenizer(models.BPE(unk_token=EOS_TOKEN, continuing_subword_prefix="", end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    # Every byte symbol, then each with `</w>`, named up front in that order: `tokenizers` otherwise numbers the `</w>`
    # symbols in hash-map order, a new order each run, and breaks ties between equally frequent pairs by those numbers
    # (5 different vocabularies in 12 trainings on the tests' corpus). Named so, ties go the same way in every run, and
    # as they did before wherever a `</w>` symbol met a plain byte. Named, they are counted in `vocab_size` too: the
    # merges fill the vocabulary up to `vocab_size` where the captions allow.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 2,
        special_tokens=alphabet + [symbol + "</w>" for symbol in alphabet],
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    merges = [tuple(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]

    tokens = alphabet + [symbol + "</w>" for symbol in alphabet]
    seen = set(tokens)
    kept_merges = []
    for left, right in merges:
        merged = left + right
        if merged not in seen and len(tokens) < vocab_size - 2:
            tokens.append(merged)
            seen.add(merged)
            kept_merges.append((left, right))
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=kept_merges, model_max_length=model_max_length)
