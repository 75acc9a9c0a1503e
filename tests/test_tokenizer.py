"""The embedded default's BPE tokenizer (`dclip.data.tokenizer.train_clip_tokenizer`): OpenAI CLIP's vocabulary layout,
and the same vocabulary from every training on the same captions."""

import json

from conftest import CORPUS
from tokenizers import pre_tokenizers

from dclip.data.tokenizer import BOS_TOKEN, EOS_TOKEN, train_clip_tokenizer


def _vocabulary(tokenizer) -> tuple[list[str], list]:
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    return sorted(model["vocab"], key=model["vocab"].get), model["merges"]


def test_every_training_on_the_same_captions_gives_the_same_vocabulary():
    # before: 5 different vocabularies in 12 trainings on this corpus (`tokenizers` numbered the `</w>` symbols in
    # hash-map order, and broke ties between equally frequent pairs by those numbers)
    first = _vocabulary(train_clip_tokenizer(CORPUS * 4, vocab_size=600, model_max_length=24))
    for _ in range(7):
        assert _vocabulary(train_clip_tokenizer(CORPUS * 4, vocab_size=600, model_max_length=24)) == first


def test_the_vocabulary_is_laid_out_as_clips():
    tokens, merges = _vocabulary(train_clip_tokenizer(CORPUS * 4, vocab_size=600, model_max_length=24))
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    assert len(tokens) == 600
    assert tokens[:256] == alphabet and tokens[256:512] == [symbol + "</w>" for symbol in alphabet]
    assert tokens[512:-2] == ["".join(pair) for pair in merges]  # one entry per merge, in merge order
    assert tokens[-2:] == [BOS_TOKEN, EOS_TOKEN]


def test_a_tie_between_plain_bytes_and_an_end_of_word_symbol_goes_to_the_plain_bytes():
    # "een": the pairs (e, e) and (e, n</w>) are equally frequent; byte pairs win, as they always did (the embedded
    # default's vocabulary is unchanged by the fix above)
    tokens, merges = _vocabulary(train_clip_tokenizer(["een"] * 3, vocab_size=515))
    assert merges == [["e", "e"]] and tokens[512] == "ee"
