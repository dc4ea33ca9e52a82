"""TextStream against whole-text decoding: pieces never show half a UTF-8 character, add up to the decoded
text, and end exactly where the first stop string starts."""

from __future__ import annotations

import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from radixc.serve.text import TextStream

SAMPLE = "Grüße aus Köln ✓ — naïve café, 東京 and emoji 🚀 mixed with ascii words."


def byte_tokenizer() -> Tokenizer:
    """One token per byte (multi-byte characters span several tokens)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(alphabet))}, []))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def stream_pieces(tokenizer, ids, stop, rng) -> tuple[list[str], TextStream]:
    text = TextStream(tokenizer, stop)
    pieces, at = [], 0
    while at < len(ids) and not text.stopped:
        step = rng.randint(1, 3)
        pieces.append(text.add(ids[at : at + step]))
        at += step
    pieces.append(text.finish())
    return pieces, text


def test_pieces_add_up_to_the_decoded_text_without_broken_characters():
    tokenizer, rng = byte_tokenizer(), random.Random(0)
    ids = tokenizer.encode(SAMPLE).ids
    assert len(ids) > len(SAMPLE)  # some characters really span tokens
    pieces, text = stream_pieces(tokenizer, ids, (), rng)
    assert "".join(pieces) == tokenizer.decode(ids) == SAMPLE
    assert not any("\ufffd" in p for p in pieces) and not text.stopped


def test_text_ends_before_the_first_stop_string_however_tokens_arrive():
    tokenizer, rng = byte_tokenizer(), random.Random(1)
    ids = tokenizer.encode(SAMPLE).ids
    for _ in range(20):
        start = rng.randrange(1, len(SAMPLE) - 4)
        stop = SAMPLE[start : start + rng.randint(1, 4)]
        pieces, text = stream_pieces(tokenizer, ids, [stop, "not in the sample"], rng)
        assert "".join(pieces) == SAMPLE[: SAMPLE.find(stop)], stop
        assert text.stopped
