"""Generated tokens into text, a token at a time, in time linear in the text.

`Detokenizer` decodes only a short window around each new token (the previous token for context,
as tokenizers that drop a word's leading space need), not the whole text again. `StopCutter`
searches each new piece of text, plus what it held back, for the stop sequences: it holds back
only the text that may still become a stop sequence, at most the longest stop less one character.
"""

from __future__ import annotations


class Detokenizer:
    """Text deltas for token ids given one at a time; their concatenation is the decoded whole."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] were decoded already: the context of the next delta
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """The text this token completes ("" while it ends in an incomplete character)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before):]
        return ""

    def flush(self) -> str:
        """What the last tokens decode to, complete or not."""
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(before):] if len(text) > len(before) else ""


class StopCutter:
    """Text given out up to the first stop sequence; the tail that may still start one is held back."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.held = ""
        self.stopped = False

    def feed(self, text: str, final: bool = False) -> str:
        """What may be given out of `text` (after what was held); `stopped` once a stop sequence appeared."""
        buffer = self.held + text
        cuts = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.stopped, self.held = True, ""
            return buffer[:min(cuts)]
        keep = 0 if final else self._partial(buffer)
        self.held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep]

    def _partial(self, buffer: str) -> int:
        """The longest end of `buffer` that begins some stop sequence (shorter than it)."""
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:k]):
                    longest = k
                    break
        return longest
