"""Guessing the next few tokens from the text already there (prompt lookup).

Shell scripts repeat themselves: variable names, paths, whole command shapes. When the last tokens
written also occur earlier in the prompt or the answer, the tokens that followed them there are a cheap
guess of what comes next. The engine checks a guess in one model call over several tokens and keeps
the part of it that the model picks itself, so the answer is the one token-by-token decoding gives, in
fewer model calls.
"""
from __future__ import annotations

MATCH_TOKENS = (3, 2)  # the longest match is tried first; one token alone matches too much to be a guess
GUESS_TOKENS = 3  # checking 4 tokens at once costs ~1.5x one decode step on CPU; more costs much more


class PromptLookup:
    def __init__(self, ids: list[int]):
        self.ids: list[int] = []
        self.positions: dict[int, list[int]] = {}  # token id -> where it occurs in ids
        for token in ids:
            self.append(token)

    def append(self, token: int) -> None:
        self.positions.setdefault(token, []).append(len(self.ids))
        self.ids.append(token)

    def guess(self, limit: int = GUESS_TOKENS) -> list[int]:
        """Up to `limit` tokens that followed the latest earlier occurrence of the last few tokens."""
        ids, end = self.ids, len(self.ids) - 1
        if limit <= 0 or end < 0:
            return []
        for n in MATCH_TOKENS:
            tail = ids[end - n + 1:]
            if len(tail) < n:
                continue
            for i in reversed(self.positions[ids[end]]):
                if n - 1 <= i < end and ids[i - n + 1:i + 1] == tail:
                    return ids[i + 1:i + 1 + limit]
        return []
