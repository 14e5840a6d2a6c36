"""An EBNF grammar (xgrammar's dialect) that forces tool calls in a parser's format, with each
call's arguments following its function's JSON schema: how ``tool_choice`` "required" or a named
function is enforced (SGLang builds an EBNF or a structural tag per detector for the same job).

A JSON schema alone cannot say "inside ``<tool_call>`` tags", so the arguments' schema is turned
into EBNF rules here. Supported: ``type`` (one or a list), ``properties`` / ``required`` (in the
declared order), ``items``, ``minItems`` >= 1, ``enum``, ``const``, ``anyOf`` / ``oneOf``, a
one-item ``allOf``, ``additionalProperties: false`` on an object without properties (only ``{}``);
a function without ``parameters`` takes no arguments (``{}``). Other keywords (``pattern``, ``minimum``, ``$ref`` ...) are not enforced: such a
part of the schema accepts any JSON value of its type, so the grammar is looser than the schema,
never stricter. JSON is written the way ``json.dumps`` writes it (``", "`` and ``": "``).
"""

from __future__ import annotations

import json
from typing import Any

_BASE = {
    "value": "object_any | array_any | string | number | boolean | null",
    "object_any": '"{" ( string ": " value ( ", " string ": " value )* )? "}"',
    "array_any": '"[" ( value ( ", " value )* )? "]"',
    "string": '"\\"" char* "\\""',
    "char": '[^"\\\\\\x00-\\x1f] | "\\\\" escape',
    "escape": '["\\\\/bfnrt] | "u" hex hex hex hex',
    "hex": "[0-9a-fA-F]",
    "integer": '"-"? ( "0" | [1-9] [0-9]* )',
    "number": 'integer ( "." [0-9]+ )? ( [eE] [-+]? [0-9]+ )?',
    "boolean": '"true" | "false"',
    "null": '"null"',
}
_SIMPLE_TYPES = {"string": "string", "integer": "integer", "number": "number", "boolean": "boolean",
                 "null": "null", "array": "array_any", "object": "object_any"}


def literal(text: str) -> str:
    """``text`` as an EBNF string literal."""
    esc = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f'"{esc}"'


class SchemaGrammar:
    """Collects the rules of one grammar; ``rule_for(schema)`` names the rule matching a schema's values."""

    def __init__(self) -> None:
        self.rules: dict[str, str] = dict(_BASE)
        self._n = 0

    def add(self, body: str, hint: str = "r") -> str:
        self._n += 1
        name = f"{hint}_{self._n}"
        self.rules[name] = body
        return name

    def text(self) -> str:
        return "\n".join(f"{k} ::= {v}" for k, v in self.rules.items()) + "\n"

    def rule_for(self, schema: Any) -> str:
        if not isinstance(schema, dict) or not schema:
            return "value"
        if "const" in schema:
            return self.add(literal(json.dumps(schema["const"], ensure_ascii=False)), "const")
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return self.add(" | ".join(literal(json.dumps(v, ensure_ascii=False)) for v in schema["enum"]), "enum")
        for key in ("anyOf", "oneOf"):
            if isinstance(schema.get(key), list) and schema[key]:
                return self.add(" | ".join(self.rule_for(s) for s in schema[key]), "any")
        if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) == 1:
            return self.rule_for(schema["allOf"][0])
        kind = schema.get("type")
        if kind is None and "properties" in schema:
            kind = "object"
        if isinstance(kind, list):
            rest = {k: v for k, v in schema.items() if k != "type"}
            return self.add(" | ".join(self.rule_for({**rest, "type": t}) for t in kind), "types")
        if kind == "object" and isinstance(schema.get("properties"), dict) and schema["properties"]:
            return self._object(schema["properties"], schema.get("required") or [])
        if kind == "object" and schema.get("additionalProperties") is False:
            return '"{}"'  # no properties (those were handled above) and no others allowed
        if kind == "array" and "items" in schema:
            item = self.rule_for(schema["items"])
            seq = f"{item} ( \", \" {item} )*"
            body = f'"[" {seq} "]"' if schema.get("minItems", 0) >= 1 else f'"[" ( {seq} )? "]"'
            return self.add(body, "array")
        return _SIMPLE_TYPES.get(kind, "value") if isinstance(kind, str) else "value"

    def _object(self, properties: dict[str, Any], required: list[str]) -> str:
        """Declared properties in order; required ones always, optional ones maybe; commas right."""
        props = [(literal(json.dumps(k, ensure_ascii=False) + ": ") + " " + self.rule_for(v), k in required)
                 for k, v in properties.items()]
        # tail[i]: properties i.. each after a comma (required ones mandatory)
        tails = [""] * (len(props) + 1)
        for i in range(len(props) - 1, -1, -1):
            item, req = props[i]
            piece = f'", " {item}' if req else f'( ", " {item} )?'
            tails[i] = f"{piece} {tails[i + 1]}".strip()
        firsts = []
        for i, (item, req) in enumerate(props):  # the first property written is i: all before it optional
            firsts.append(f"{item} {tails[i + 1]}".strip())
            if req:
                break
        else:
            firsts.append('""')  # everything optional: {} too
        body = " | ".join(f"( {f} )" for f in firsts)
        return self.add(f'"{{" ( {body} ) "}}"', "object")


def tool_call_grammar(call_open: str, call_close: str, separator: str, arg_key: str,
                      functions: dict[str, Any], at_least_one: bool) -> str:
    """EBNF for exactly one call (``at_least_one`` False, one function given) or one or more calls
    of ``functions`` (name -> parameters schema), each ``call_open {"name": N, "<arg_key>": {...}} call_close``."""
    g = SchemaGrammar()
    calls = []
    for name, params in functions.items():
        head = literal(call_open + json.dumps({"name": name}, ensure_ascii=False)[:-1] + f', "{arg_key}": ')
        args = g.rule_for(params) if params else '"{}"'  # no parameters: a function of no arguments
        if args == "value":  # arguments are an object whatever the schema says
            args = "object_any"
        calls.append(g.add(f"{head} {args} {literal('}' + call_close)}", "call"))
    g.rules["tool_call"] = " | ".join(calls)
    root = f"tool_call ( {literal(separator)} tool_call )*" if at_least_one else "tool_call"
    return f"root ::= {root}\n" + g.text()
