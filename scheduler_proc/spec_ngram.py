"""N-gram drafts: guess a request's next tokens from its own prompt and output (prompt lookup).

Copy-heavy requests (summaries, rewrites, code edits) repeat spans of their input: when the last
``w`` tokens of the sequence also occur earlier, the tokens that followed that earlier occurrence
are a cheap guess for what comes next. The target model checks the guess in one forward, so a
wrong guess costs only the extra positions of that forward, never a different output.
"""

from __future__ import annotations

from typing import Iterator


def _suffix_matches(ids: list[int], max_window: int) -> Iterator[tuple[int, int]]:
    """``(length, end)`` for each earlier position ``end`` holding the last token, most recent
    first: how many tokens (up to ``max_window``) ending there equal the sequence's suffix."""
    n, last = len(ids), ids[-1]
    for end in range(n - 2, -1, -1):
        if ids[end] != last:
            continue
        length, cap = 1, min(max_window, end + 1)
        while length < cap and ids[end - length] == ids[n - 1 - length]:
            length += 1
        yield length, end


def ngram_draft(ids: list[int], max_tokens: int, min_window: int = 1, max_window: int = 12) -> list[int]:
    """Up to ``max_tokens`` tokens that followed the earlier occurrence of the sequence's suffix
    that matches the longest suffix (``min_window`` to ``max_window`` tokens; the most recent
    occurrence on ties). Empty when no suffix of ``min_window`` tokens occurs before."""
    n = len(ids)
    if max_tokens <= 0 or n < min_window + 1:
        return []
    best_len, best_end = 0, -1
    for length, end in _suffix_matches(ids, max_window):
        if length > best_len:
            best_len, best_end = length, end
            if length == max_window:
                break
    if best_len < min_window:
        return []
    return ids[best_end + 1: best_end + 1 + max_tokens]


def ngram_tree(ids: list[int], max_nodes: int, branches: int, min_window: int = 1,
               max_window: int = 12) -> tuple[list[int], list[int]]:
    """Draft tokens as a trie of the continuations of up to ``branches`` earlier occurrences of the
    sequence's suffix (longest match first, then the most recent), at most ``max_nodes`` nodes.
    Returns the nodes' tokens and each node's parent (0: the last token, ``i``: node ``i``), nodes
    in insertion order, so a parent always comes first. Shared prefixes are stored once; every
    distinct continuation keeps at least one node while the budget lasts."""
    n = len(ids)
    if max_nodes <= 0 or n < min_window + 1:
        return [], []
    found = [(length, end) for length, end in _suffix_matches(ids, max_window) if length >= min_window]
    found.sort(key=lambda m: (-m[0], -m[1]))
    conts, seen = [], set()
    for _, end in found:
        c = tuple(ids[end + 1: end + 1 + max_nodes])
        if c and c not in seen:
            seen.add(c)
            conts.append(c)
        if len(conts) == branches:
            break
    tokens: list[int] = []
    parents: list[int] = []
    child: dict[tuple[int, int], int] = {}  # (node, token) -> node
    for j, cont in enumerate(conts):
        budget = max_nodes - len(tokens) - (len(conts) - 1 - j)  # leave one node for each later branch
        node = 0
        for tok in cont:
            if (node, tok) in child:
                node = child[(node, tok)]
                continue
            if budget <= 0:
                break
            tokens.append(tok)
            parents.append(node)
            child[(node, tok)] = len(tokens)
            node = len(tokens)
            budget -= 1
    return tokens, parents
