"""Incremental detokenization that never shows half a character.

Byte-level BPE (Llama-3) splits a Chinese character or an emoji across several tokens; decoding
those tokens one by one yields U+FFFD replacement characters. We decode a small window of recent
tokens, hold text back while it ends in an incomplete character, and emit only the new suffix once
it is whole. Decoding a *window* (not the whole sequence each step) keeps the cost per token flat,
and the window starts one token early so tokenizers that add a leading space on their own (SentencePiece)
decode consistently. Same scheme as Hugging Face TGI and vLLM.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self.token_ids: list[int] = []
        self._prefix_offset = 0  # start of the window whose text was already emitted
        self._read_offset = 0  # end of that window
        self.text = ""  # everything emitted so far

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(
            ids, skip_special_tokens=self._skip_special, clean_up_tokenization_spaces=False
        )

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text ("" while a character is still partial)."""
        self.token_ids.append(int(token_id))
        prefix_text = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        window_text = self._decode(self.token_ids[self._prefix_offset :])
        if len(window_text) <= len(prefix_text) or window_text.endswith(REPLACEMENT):
            return ""  # nothing new, or the last character is not complete yet
        delta = window_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.token_ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of generation: emit what is held back, even an incomplete character."""
        window_text = self._decode(self.token_ids[self._prefix_offset :])
        prefix_text = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        delta = window_text[len(prefix_text) :] if len(window_text) > len(prefix_text) else ""
        # A sequence cut off mid-character ends in U+FFFD; showing that glyph is worse than dropping it.
        delta = delta.rstrip(REPLACEMENT)
        self._prefix_offset = self._read_offset = len(self.token_ids)
        self.text += delta
        return delta
