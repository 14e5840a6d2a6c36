"""``treadle serve``'s command line: one ``--flag`` per ``ServerArgs`` field, in SGLang's spelling.

The flags are generated from the dataclass, so a field added to ``ServerArgs`` is a flag at once.
A flag's kind follows the field's type, or its default for SGLang's untyped compatibility fields:
bools are switches (``--no-X`` too where the default is on), lists take several values, dicts a
JSON string. Only the flags given reach ``ServerArgs``, so its defaults stay the only ones; its
own checks (a bad choice, a value out of range) are reported as argparse errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from typing import Any, Optional

from treadle.runtime.server_args import ServerArgs
from treadle.runtime.sglang_compat import REFUSED
from treadle.runtime.sglang_no_effect import NO_EFFECT

GRACEFUL_SHUTDOWN_TIMEOUT_S = 30.0
# the API key when --api-key is absent: a supervisor passes it here, out of the process list
API_KEY_ENV = "TREADLE_API_KEY"
# SGLang's other spellings of a few flags (its launch_server accepts both)
ALIASES = {"model_path": ["--model"], "tp_size": ["--tensor-parallel-size"], "dp_size": ["--data-parallel-size"],
           "pp_size": ["--pipeline-parallel-size"]}
# the server's own flags that are ServerArgs fields: listed first in --help
SERVER_FIELDS = ("model_path", "host", "port", "api_key", "served_model_name", "log_level", "chat_template",
                 "reasoning_parser", "tool_call_parser", "default_chat_template_kwargs")
CLI_LOG_LEVEL = "info"  # SGLang's CLI default (the in-process Engine's is "error")


def json_value(text: str) -> Any:
    """A dict or list field's value, given as JSON (``'{"temperature": 0.5}'``)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None


def loose_value(text: str) -> Any:
    """A field with no type and no default: a number or JSON object/list when it reads as one,
    else the string (a path, a parser's name)."""
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    if text[:1] in "[{":
        return json_value(text)
    return text


def _add(group: argparse._ArgumentGroup, field: dataclasses.Field, hint: Any, help_text: str) -> None:
    name = field.name
    flags = ["--" + name.replace("_", "-"), *ALIASES.get(name, [])]
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
    kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": f"{help_text} (default: {default!r})"}
    args = typing.get_args(hint)
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if base is Any:
        base = type(default) if default is not None else None
    if base is bool:
        if default is True:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw.update(action="store_const", const=True)
    elif base in (list, tuple):
        kw.update(nargs="*", type=loose_value)
    elif base is dict:
        kw["type"] = json_value
    elif base in (int, float, str):
        kw["type"] = base
    else:
        kw["type"] = loose_value
    group.add_argument(*flags, **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="treadle serve", usage="treadle serve --model-path M [--host H] [--port P] [--api-key KEY] "
        "[--served-model-name N] [ServerArgs flags ...]", description="Serve one Engine over HTTP: OpenAI's /v1 API and SGLang's native "
        "routes. Every ServerArgs field is a flag; SIGTERM drains in-flight requests, then exits 0.")
    serving = p.add_argument_group("serving")
    engine = p.add_argument_group("engine (ServerArgs)")
    carried = p.add_argument_group("SGLang arguments accepted with no effect here")
    refused = p.add_argument_group("SGLang arguments refused unless left at their default")
    hints = typing.get_type_hints(ServerArgs)
    fields = {f.name: f for f in dataclasses.fields(ServerArgs)}
    for name in SERVER_FIELDS:
        _add(serving, fields[name], hints[name], "")
    for action in serving._group_actions:
        if action.dest == "log_level":
            action.help = f"(default: {CLI_LOG_LEVEL!r})"
        elif action.dest == "api_key":
            action.help = f"clients must send 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, else none)"
    serving.add_argument("--graceful-shutdown-timeout", type=float, default=GRACEFUL_SHUTDOWN_TIMEOUT_S,
                         help="seconds in-flight requests get to finish after SIGTERM before they are aborted "
                              f"(default: {GRACEFUL_SHUTDOWN_TIMEOUT_S})")
    for name, f in fields.items():
        if name in SERVER_FIELDS:
            continue
        if name in REFUSED:
            _add(refused, f, hints[name], f"refused: {REFUSED[name][1]}")
        elif name in NO_EFFECT:
            _add(carried, f, hints[name], "accepted, no effect")
        else:
            _add(engine, f, hints[name], "")
    return p


def parse_args(argv: Optional[list[str]] = None) -> tuple[ServerArgs, argparse.Namespace]:
    """The ``ServerArgs`` the flags describe, and the namespace (for the serve-only flags). A value
    ``ServerArgs`` refuses exits as an argparse error (status 2) naming the flag."""
    p = build_parser()
    ns = p.parse_args(argv)
    names = {f.name for f in dataclasses.fields(ServerArgs)}
    given = {k: v for k, v in vars(ns).items() if k in names}
    given.setdefault("log_level", CLI_LOG_LEVEL)
    if os.environ.get(API_KEY_ENV) and given.get("api_key") is None:
        given["api_key"] = os.environ[API_KEY_ENV]
    if ns.graceful_shutdown_timeout < 0:
        p.error("--graceful-shutdown-timeout must be >= 0")
    try:
        server_args = ServerArgs(**given)
        check_parsers(server_args)
    except (TypeError, ValueError) as e:
        p.error(str(e))
    return server_args, ns


def check_parsers(server_args: ServerArgs) -> None:
    """A misspelt ``--reasoning-parser`` / ``--tool-call-parser`` stops the start, not every chat request."""
    from treadle.server import reasoning_parser, tool_parsers

    for flag, value, known in (("--reasoning-parser", server_args.reasoning_parser, reasoning_parser.KNOWN),
                               ("--tool-call-parser", server_args.tool_call_parser, tool_parsers.KNOWN)):
        if value is not None and value not in known:
            raise ValueError(f"{flag} {value!r} is unknown; known: {', '.join(known)}")
