"""TextStream: one choice's text, detokenized token by token, ended at the first stop string.

Decoding each token alone breaks words and multi-byte characters, so it decodes a short window (the tokens
since the last emitted boundary) and emits only the text that grew; a trailing U+FFFD (an unfinished UTF-8
character) is held back, and so is any tail that could still become a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer


class TextStream:
    """Text of a growing list of generated tokens: `add` returns the newly safe text, `finish` the rest."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self._tokenizer = tokenizer
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1  # chars a stop string may still claim
        self._ids: list[int] = []
        self._prefix_offset = 0  # tokens before it are decoded for good
        self._read_offset = 0  # tokens before it are in `text`
        self.text = ""  # decoded so far (ended before a stop string once one matched)
        self._emitted = 0  # characters of `text` returned by add / finish
        self.stopped = False  # a stop string matched; the text ends before it

    def add(self, token_ids: Sequence[int]) -> str:
        """Take new tokens; the text that became safe to show (possibly empty)."""
        if self.stopped:
            return ""
        self._ids.extend(token_ids)
        self._decode(final=False)
        end = len(self.text) if self.stopped else max(self._emitted, len(self.text) - self._hold)
        return self._emit(end)

    def finish(self) -> str:
        """The text held back so far (all tokens taken): call once the request ended."""
        if not self.stopped:
            self._decode(final=True)
        return self._emit(len(self.text))

    def _decode(self, final: bool) -> None:
        window = self._ids[self._prefix_offset :]
        before = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
        after = self._tokenizer.decode(window)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            searched_from = max(0, len(self.text) - self._hold)
            self.text += after[len(before) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            self._cut_at_stop(searched_from)

    def _cut_at_stop(self, start: int) -> None:
        """End the text before the earliest stop string that starts at or after `start`."""
        found = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
        if found:
            self.text = self.text[: min(found)]
            self.stopped = True

    def _emit(self, end: int) -> str:
        piece = self.text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return piece
