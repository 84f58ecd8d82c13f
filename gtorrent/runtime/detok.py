"""Incremental detokenization: turn a stream of token ids into a stream of text.

Byte-level BPE tokens may end in the middle of a multi-byte UTF-8 character; decoding them alone
yields U+FFFD. The detokenizer keeps a small window of recent tokens and only releases text once it no
longer ends in an incomplete character, so the concatenated stream equals `decode(all_ids)` and never
contains a replacement character that the final text does not (the technique of vLLM and HF's
TextStreamer, with a bounded window so each step is O(1)).
"""

from __future__ import annotations

from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the window re-decoded for context (spaces, merges)
        self._read_offset = 0  # tokens up to here have been released as text
        self._emitted: list[str] = []
        self._prefix_text = ""  # decode(ids[prefix_offset:read_offset]), cached: it only changes on release

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became final (possibly '')."""
        self._ids.append(token_id)
        prefix_text = self._prefix_text
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            delta = new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
            self._emitted.append(delta)
            return delta
        return ""

    def flush(self) -> str:
        """Release whatever is held back (an incomplete character at the very end becomes U+FFFD)."""
        if self._read_offset == len(self._ids):
            return ""
        new_text = self._decode(self._ids[self._prefix_offset :])
        delta = new_text[len(self._prefix_text) :]
        self._prefix_offset = self._read_offset = len(self._ids)
        self._prefix_text = ""
        self._emitted.append(delta)
        return delta

    @property
    def text(self) -> str:
        return "".join(self._emitted)
