"""server/reasoning_parser.py: whole-text parsing of both formats, and the streamer agreeing with
it for every way of cutting the text into deltas."""

import random

import pytest

from treadle.server.reasoning_parser import ReasoningParser, opens_reasoning


@pytest.mark.parametrize("name,force,text,expected", [
    ("qwen3", None, "<think>\nLet me add.\n</think>\n\nIt is 4.", ("Let me add.", "It is 4.")),
    ("qwen3", None, "It is 4.", (None, "It is 4.")),
    ("qwen3", None, "  \n<think>a</think>b", ("a", "b")),
    ("qwen3", None, "<think></think>\n\nb", ("", "b")),
    ("qwen3", None, "<think>cut short by max_tokens  ", ("cut short by max_tokens", "")),
    ("qwen3", None, "see <think>x</think> quoted", (None, "see <think>x</think> quoted")),
    ("qwen3", None, "<thin", (None, "<thin")),
    ("qwen3", None, "a </think> b", (None, "a </think> b")),
    ("qwen3", True, "Let me add.\n</think>\n\nIt is 4.", ("Let me add.", "It is 4.")),
    ("qwen3", True, "<think>\nx</think>y", ("x", "y")),
    ("qwen3", False, "x</think>y", (None, "x</think>y")),
    ("deepseek-r1", None, "hmm 2+2\n</think>\n\n4", ("hmm 2+2", "4")),
    ("deepseek-r1", None, "<think>hmm</think>4", ("hmm", "4")),
    ("deepseek-r1", None, "no end tag", ("no end tag", "")),
    ("deepseek-r1", None, "", ("", "")),
    ("deepseek-r1", None, "a</think></think>b", ("a", "</think>b")),
    ("deepseek-r1", None, "a \n b</think>  c  ", ("a \n b", "c  ")),
    ("deepseek-r1", False, "a</think>b", (None, "a</think>b")),
])
def test_parse(name, force, text, expected):
    assert ReasoningParser(name, force).parse(text) == expected


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="qwen3, deepseek-r1"):
        ReasoningParser("o1")


def stream(parser: ReasoningParser, pieces: list[str]) -> tuple[str, str, list[tuple[str, str]]]:
    s = parser.streamer()
    outs = [s.feed(p) for p in pieces] + [s.finish()]
    return "".join(r for r, _ in outs), "".join(c for _, c in outs), outs


TEXTS = [
    "<think>\nLet me add.\n\n2 + 2 </think>\n\nIt is 4. <think> stays </think>",
    "  <think>\n\n</think>\n\nshort",
    "plain answer with </thi and <th inside\n",
    "r1 style\n </think>\n answer",
    "<think>truncated <  </thin",
    "<",
    "",
]


@pytest.mark.parametrize("name,force", [("qwen3", None), ("qwen3", True), ("deepseek-r1", None)])
@pytest.mark.parametrize("text", TEXTS)
def test_stream_matches_parse_at_every_split(name, force, text):
    parser = ReasoningParser(name, force)
    reasoning, content = parser.parse(text)
    for i in range(len(text) + 1):
        r, c, _ = stream(parser, [text[:i], text[i:]])
        assert (r, c) == (reasoning or "", content), f"split at {i}"
    r, c, _ = stream(parser, list(text))  # one character a delta
    assert (r, c) == (reasoning or "", content)
    rng = random.Random(len(text))
    for _ in range(50):
        cuts = sorted(rng.sample(range(len(text) + 1), min(4, len(text) + 1)))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert stream(parser, pieces)[:2] == (reasoning or "", content), pieces


def test_stream_holds_a_cut_end_tag_and_streams_the_rest():
    _, _, outs = stream(ReasoningParser("qwen3"), ["<think>abc</thi", "nk>\n", "\nanswer"])
    assert outs == [("abc", ""), ("", ""), ("", "answer"), ("", "")]
    # reasoning is not held back while no tag could be starting
    _, _, outs = stream(ReasoningParser("deepseek-r1"), ["step one", " and two", "</think>4"])
    assert outs == [("step one", ""), (" and two", ""), ("", "4"), ("", "")]


def test_finish_flushes_what_was_held():
    s = ReasoningParser("qwen3").streamer()
    assert s.feed("<thi") == ("", "")
    assert s.finish() == ("", "<thi")
    s = ReasoningParser("deepseek-r1").streamer()
    assert s.feed("a </") == ("a", "")
    assert s.finish() == (" </", "")  # the cut tag was reasoning text after all


def test_random_texts_stream_like_they_parse():
    """Seeded fuzz over tag fragments: whatever the text and its cuts, stream == parse."""
    frags = ["<think>", "</think>", "<", "</", "think", ">", " ", "\n", "a", "b c", "<thi", "nk>"]
    rng = random.Random(0)
    parsers = [ReasoningParser("qwen3"), ReasoningParser("qwen3", True), ReasoningParser("deepseek-r1")]
    for _ in range(1000):
        text = "".join(rng.choice(frags) for _ in range(rng.randint(0, 10)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(rng.randint(0, 6), len(text) + 1)))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        for parser in parsers:
            reasoning, content = parser.parse(text)
            assert stream(parser, pieces)[:2] == (reasoning or "", content), (parser.name, pieces)


def test_opens_reasoning():
    assert opens_reasoning("<|im_start|>assistant\n<think>\n")
    assert not opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not opens_reasoning("<|im_start|>assistant\n")
