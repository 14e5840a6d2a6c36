"""server/tool_parsers.py (+ tool_formats.py, tool_grammar.py): parsing tool calls of both formats,
the streamer agreeing with the whole-text parse at every split, tools validation, and the
tool_choice grammar compiled and run by xgrammar."""

import json
import random

import pytest

from treadle.server.tool_parsers import ToolCallParser, merge_call_deltas

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["c", "f"]}, "days": {"type": "integer"},
        "hours": {"type": "array", "items": {"type": "number"}}}, "required": ["city"]}}}
NOARGS = {"type": "function", "function": {"name": "ping"}}
TOOLS = [WEATHER, NOARGS]


def call(name, args):
    return {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}


QWEN_CASES = [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     ("", [call("get_weather", {"city": "Paris"})])),
    ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "a}b\\"{"}}\n</tool_call>\n'
     '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>\nDone.',
     ("Let me check.Done.", [call("get_weather", {"city": 'a}b"{'}), call("ping", {})])),
    ('<tool_call>{"name": "nope", "arguments": {}}</tool_call> x',  # unknown function: content
     ('<tool_call>{"name": "nope", "arguments": {}}</tool_call> x', [])),
    ('<tool_call>\n{"name": "ping", "arguments": {]\n</tool_call>', ('<tool_call>\n{"name": "ping", "arguments": {]\n</tool_call>', [])),
    ('<tool_call>\n{"name": "ping", "arguments": {"a": 1}}', ("", [call("ping", {"a": 1})])),  # cut before the close tag
    ('<tool_call>\n{"name": "ping", "argu', ('<tool_call>\n{"name": "ping", "argu', [])),
    ('<tool_call>{"name": "ping", "parameters": "{\\"a\\": 2}"}</tool_call>', ("", [call("ping", {"a": 2})])),
    ("no calls here <tool_ca", ("no calls here <tool_ca", [])),
    ("  spaced out \n", ("  spaced out \n", [])),
    ("<tool_call>", ("<tool_call>", [])),
    ("", ("", [])),
]
LLAMA_CASES = [
    ('{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "c"}}',
     ("", [call("get_weather", {"city": "Oslo", "unit": "c"})])),
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "a;b"}}; {"name": "ping", "parameters": {}}',
     ("", [call("get_weather", {"city": "a;b"}), call("ping", {})])),
    ('Sure. <|python_tag|>{"name": "ping", "arguments": {"n": [1, {"x": "}"}]}}',
     ("Sure.", [call("ping", {"n": [1, {"x": "}"}]})])),
    ('{"name": "nope", "parameters": {}}; {"name": "ping", "parameters": {}}',
     ('{"name": "nope", "parameters": {}}', [call("ping", {})])),
    ('{"name": "ping", "parameters": {"a": tru}}', ('{"name": "ping", "parameters": {"a": tru}}', [])),
    ('{"name": "ping", "parameters": {', ('{"name": "ping", "parameters": {', [])),
    ("The answer is {not a call}.", ("The answer is {not a call}.", [])),
    ('<|python_tag|>print("hi")', ('print("hi")', [])),
    ("<|python", ("<|python", [])),
    ("", ("", [])),
]
CASES = [("qwen25", t, e) for t, e in QWEN_CASES] + [("llama3", t, e) for t, e in LLAMA_CASES]


@pytest.mark.parametrize("name,text,expected", CASES)
def test_parse(name, text, expected):
    assert ToolCallParser(name, TOOLS).parse(text) == expected


def stream(parser, pieces):
    s = parser.streamer()
    outs = [s.feed(p) for p in pieces] + [s.finish()]
    return "".join(c for c, _ in outs), merge_call_deltas([d for _, ds in outs for d in ds])


@pytest.mark.parametrize("name,text,expected", CASES)
def test_stream_matches_parse_at_every_split(name, text, expected):
    parser = ToolCallParser(name, TOOLS)
    for i in range(len(text) + 1):
        assert stream(parser, [text[:i], text[i:]]) == expected, f"split at {i}"
    assert stream(parser, list(text)) == expected
    rng = random.Random(len(text))
    for _ in range(20):
        cuts = sorted(rng.sample(range(len(text) + 1), min(5, len(text) + 1)))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert stream(parser, pieces) == expected, pieces


def test_stream_sends_content_early_and_each_call_once_complete():
    s = ToolCallParser("qwen", TOOLS).streamer()
    assert s.feed("Checking") == ("Checking", [])
    assert s.feed(" now\n<tool_") == (" now", [])  # the newline waits: a call may follow it
    assert s.feed('call>\n{"name": "ping", "arguments": {}}') == ("", [])
    content, deltas = s.feed("\n</tool_call>\n")
    assert content == "" and deltas == [{"index": 0, "name": "ping"}, {"index": 0, "arguments_delta": "{}"}]
    assert s.feed('<tool_call>{"name": "ping"}</tool_call>')[1][0] == {"index": 1, "name": "ping"}
    assert s.finish() == ("", [])


def test_aliases_and_unknown_names():
    text = '<tool_call>{"name": "ping", "arguments": {}}</tool_call>'
    assert ToolCallParser("hermes", TOOLS).parse(text) == ToolCallParser("qwen25", TOOLS).parse(text)
    with pytest.raises(ValueError, match="llama3, qwen25, qwen, hermes"):
        ToolCallParser("mistral", TOOLS)
    assert ToolCallParser("qwen25", []).parse(text) == (text, [])  # no tools: nothing is a call


@pytest.mark.parametrize("tools,field", [
    ({"name": "x"}, "tools"),
    ([{"type": "retrieval"}], "tools[0]"),
    ([{"type": "function"}], "tools[0].function"),
    ([{"type": "function", "function": {"name": ""}}], "tools[0].function.name"),
    ([NOARGS, NOARGS], "tools[1].function.name"),
    ([WEATHER, {"type": "function", "function": {"name": "f", "parameters": "{}"}}], "tools[1].function.parameters"),
])
def test_malformed_tools_name_the_field(tools, field):
    with pytest.raises(ValueError) as e:
        ToolCallParser("qwen25", tools)
    assert str(e.value).split(" ")[0] == field


# ---------------------------------------------------------------- tool_choice grammars, run by xgrammar
@pytest.fixture(scope="module")
def compiler():
    import xgrammar as xgr  # the scheduler's grammar backend
    vocab = ["</s>"] + [chr(c) for c in range(32, 127)] + ["\n", "é", "<tool_call>", "</tool_call>"]
    return xgr.GrammarCompiler(xgr.TokenizerInfo(vocab, stop_token_ids=[0]), cache_enabled=False)


def accepts(compiler, ebnf: str, text: str) -> bool:
    """The whole of ``text`` matches the grammar, which may end there (the stop token is accepted)."""
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(compiler.compile_grammar(ebnf))
    return matcher.accept_string(text) and matcher.accept_token(0) and matcher.is_terminated()


def as_call(name: str, text: str, args: dict, key: str) -> str:
    body = json.dumps({"name": text, key: args}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>" if name == "qwen25" else body


RICH = {"type": "function", "function": {"name": "book", "parameters": {"type": "object", "properties": {
    "who": {"type": "object", "properties": {"first": {"type": "string"}, "age": {"type": ["integer", "null"]}},
            "required": ["first"]},
    "seats": {"type": "array", "items": {"anyOf": [{"type": "integer"}, {"const": "any"}]}, "minItems": 1},
    "vip": {"type": "boolean"}, "note": {"type": "string", "pattern": "^x"},
    "none": {"type": "object", "additionalProperties": False}, "extra": {"type": "object"}}}}}


@pytest.mark.parametrize("name,key", [("qwen25", "arguments"), ("llama3", "parameters")])
def test_named_tool_choice_forces_exactly_that_call(compiler, name, key):
    parser = ToolCallParser(name, TOOLS + [RICH])
    ebnf = parser.constraint({"type": "function", "function": {"name": "get_weather"}})["ebnf"]
    good = {"city": "Zürich \"old\" town", "unit": "f", "days": 3, "hours": [1.5, -2e3, 0]}
    text = as_call(name, "get_weather", good, key)
    assert accepts(compiler, ebnf, text)
    assert parser.parse(text) == ("", [call("get_weather", good)])  # what it forces, the parser reads back
    assert accepts(compiler, ebnf, as_call(name, "get_weather", {"city": "x"}, key))  # optional ones left out
    for bad in [as_call(name, "ping", {}, key),  # another function
                as_call(name, "get_weather", {"unit": "c"}, key),  # required city missing
                as_call(name, "get_weather", {"city": "x", "days": "3"}, key),  # wrong type
                as_call(name, "get_weather", {"city": "x", "unit": "k"}, key),  # not in the enum
                "Sure! " + as_call(name, "get_weather", {"city": "x"}, key),  # content before it
                as_call(name, "get_weather", {"city": "x"}, key) * 2]:  # two calls
        assert not accepts(compiler, ebnf, bad), bad


@pytest.mark.parametrize("name,key", [("qwen25", "arguments"), ("llama3", "parameters")])
def test_required_tool_choice_forces_one_call_or_more(compiler, name, key):
    parser = ToolCallParser(name, TOOLS + [RICH])
    ebnf = parser.constraint("required")["ebnf"]
    rich = {"who": {"first": "Ada", "age": None}, "seats": [3, "any"], "vip": True, "note": "y (not enforced)",
            "none": {}, "extra": {"k": [1.5, {"n": None}]}}
    calls = [("ping", {}), ("book", rich), ("book", {}), ("get_weather", {"city": "é"})]
    texts = [as_call(name, n, a, key) for n, a in calls]
    joined = ("\n" if name == "qwen25" else "; ").join(texts)
    assert accepts(compiler, ebnf, joined)
    assert parser.parse(joined) == ("", [call(n, a) for n, a in calls])
    for text in texts:
        assert accepts(compiler, ebnf, text)
    for bad in ["", "I will not call anything.", as_call(name, "nope", {}, key),
                as_call(name, "ping", {"x": 1}, key),  # a function without parameters takes no arguments
                as_call(name, "book", {"seats": []}, key),  # minItems 1
                as_call(name, "book", {"who": {"age": 3}}, key),  # who.first required
                as_call(name, "book", {"vip": "yes"}, key),
                as_call(name, "book", {"none": {"a": 1}}, key),  # additionalProperties false
                as_call(name, "book", {"vip": True, "who": {"first": "A"}}, key)]:  # out of declared order
        assert not accepts(compiler, ebnf, bad), bad


def test_tool_choice_auto_none_and_errors():
    parser = ToolCallParser("qwen25", TOOLS)
    assert parser.constraint("auto") is None and parser.constraint("none") is None and parser.constraint(None) is None
    for bad in ["always", {"type": "function"}, {"type": "function", "function": {"name": 3}},
                {"type": "code", "function": {"name": "ping"}}]:
        with pytest.raises(ValueError, match="^tool_choice must be"):
            parser.constraint(bad)
    with pytest.raises(ValueError, match="^tool_choice names function 'nope', which is not in tools"):
        parser.constraint({"type": "function", "function": {"name": "nope"}})
    with pytest.raises(ValueError, match="^tool_choice 'required' needs"):
        ToolCallParser("llama3", []).constraint("required")


def test_random_texts_stream_like_they_parse():
    """Seeded fuzz over call fragments: whatever the text and its cuts, stream == parse, and
    every call's arguments are a JSON object."""
    frags = ["<tool_call>", "</tool_call>", "<|python_tag|>", "{", "}", '"', ";", " ", "\n", "x", "\\", "[", "]",
             '{"name": "ping", "arguments": {}}', '{"name": "ping", "parameters": {"a": "}"}}', "<tool_", "call>"]
    rng = random.Random(0)
    parsers = [ToolCallParser("qwen25", TOOLS), ToolCallParser("llama3", TOOLS)]
    found = 0
    for _ in range(1000):
        text = "".join(rng.choice(frags) for _ in range(rng.randint(0, 10)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(rng.randint(0, 6), len(text) + 1)))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        for parser in parsers:
            expected = parser.parse(text)
            assert stream(parser, pieces) == expected, (parser.name, pieces)
            assert all(isinstance(json.loads(c["arguments"]), dict) for c in expected[1])
            found += len(expected[1])
    assert found > 50  # the fuzz does reach calls


def test_grammar_compiles_for_the_default_models_tokenizer():
    """The scheduler's own compile path (grammar_compiler.compile_key) on a real vocabulary."""
    from treadle.runtime.model_files import resolve_model_files
    from treadle.scheduler_proc.grammar_compiler import Invalid, build_compiler, compile_key

    import xgrammar as xgr

    compiler, _ = build_compiler(resolve_model_files("default").model_dir, None, {2}, False, 1)
    parser = ToolCallParser("qwen25", TOOLS + [RICH])
    compiled = compile_key(compiler, ("ebnf", parser.constraint("required")["ebnf"]))
    assert not isinstance(compiled, Invalid), compiled
    assert xgr.GrammarMatcher(compiled).accept_string(as_call("qwen25", "get_weather", {"city": "Rome"}, "arguments"))
