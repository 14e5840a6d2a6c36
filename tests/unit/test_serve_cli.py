"""``treadle serve``'s flags, generated from ServerArgs: every field is a flag, values of each kind
round-trip into ServerArgs, bad values are argparse errors (exit status 2), --help works."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from treadle.runtime.server_args import ServerArgs
from treadle.server.serve_args import build_parser, parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_server_args_field_is_a_flag() -> None:
    options = {s for a in build_parser()._actions for s in a.option_strings}
    missing = [f.name for f in dataclasses.fields(ServerArgs) if "--" + f.name.replace("_", "-") not in options]
    assert missing == []
    assert {"--tp-size", "--tensor-parallel-size", "--chunked-prefill-size", "--mem-fraction-static",
            "--enable-lora", "--lora-paths", "--log-level", "--graceful-shutdown-timeout"} <= options


def test_defaults_are_server_args_own(monkeypatch) -> None:
    monkeypatch.delenv("TREADLE_API_KEY", raising=False)
    args, ns = parse_args([])
    expected = ServerArgs(log_level="info")  # the CLI's one different default, as SGLang's launch_server
    assert args == expected
    assert (args.host, args.port, args.api_key) == ("127.0.0.1", 30000, None)
    assert ns.graceful_shutdown_timeout == 30.0


def test_values_of_each_kind_round_trip() -> None:
    args, ns = parse_args([
        "--model-path", "some/model", "--tp-size", "2", "--chunked-prefill-size", "-1",
        "--mem-fraction-static", "0.7", "--served-model-name", "m", "--api-key", "k", "--port", "31000",
        "--enable-lora", "--lora-paths", "a=/x", "b=/y", "--lora-target-modules", "q_proj", "v_proj",
        "--disable-radix-cache", "--no-enable-allreduce-fusion", "--preferred-sampling-params", '{"temperature": 0.5}',
        "--log-level", "warning", "--context-length", "2048", "--attention-backend", "triton",
        "--cuda-graph-bs", "[1, 2, 4]", "--nccl-port", "1234", "--enable-torch-compile",
        "--graceful-shutdown-timeout", "5"])
    assert (args.model_path, args.tp_size, args.chunked_prefill_size) == ("some/model", 2, -1)
    assert (args.mem_fraction_static, args.served_model_name, args.api_key, args.port) == (0.7, "m", "k", 31000)
    assert args.enable_lora is True and args.lora_paths == ["a=/x", "b=/y"]
    assert args.lora_target_modules == ["q_proj", "v_proj"]
    assert args.disable_radix_cache is True and args.enable_allreduce_fusion is False
    assert args.preferred_sampling_params == '{"temperature": 0.5}'
    assert (args.log_level, args.context_length, args.attention_backend) == ("warning", 2048, "triton")
    assert args.cuda_graph_bs == [1, 2, 4] and args.nccl_port == 1234 and args.enable_torch_compile is True
    assert ns.graceful_shutdown_timeout == 5.0
    assert parse_args(["--model", "other"])[0].model_path == "other"  # SGLang's alias
    chat = parse_args(["--reasoning-parser", "qwen3", "--tool-call-parser", "hermes", "--chat-template", "t.jinja"])[0]
    assert (chat.reasoning_parser, chat.tool_call_parser, chat.chat_template) == ("qwen3", "hermes", "t.jinja")


def test_the_api_key_from_the_environment_when_the_flag_is_absent(monkeypatch) -> None:
    """How a fleet supervisor passes its key: ``TREADLE_API_KEY``, out of the process list."""
    monkeypatch.setenv("TREADLE_API_KEY", "from-env")
    assert parse_args([])[0].api_key == "from-env"
    assert parse_args(["--api-key", "flag"])[0].api_key == "flag"  # SGLang's flag still wins
    monkeypatch.setenv("TREADLE_API_KEY", "")
    assert parse_args([])[0].api_key is None


@pytest.mark.parametrize("argv", [
    ["--tp-size", "two"],                   # not an int
    ["--mem-fraction-static", "1.5"],       # ServerArgs refuses the range
    ["--log-level", "loud"],                # not a choice
    ["--no-such-flag"],                     # unknown
    ["--cuda-graph-bs", "[1, 2"],           # a JSON value that does not parse
    ["--graceful-shutdown-timeout", "-1"],
    ["--reasoning-parser", "qwen4"],        # a parser Treadle does not have: the start fails, not each request
    ["--tool-call-parser", "mistral"],
])
def test_bad_flags_are_argparse_errors(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert "treadle serve: error:" in capsys.readouterr().err


def test_help_lists_the_flags() -> None:
    env = {**os.environ, "PYTHONPATH": ROOT}
    for cmd in ([sys.executable, "-m", "treadle.serve", "--help"], [sys.executable, "-m", "treadle", "serve", "--help"]):
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        for flag in ("--model-path", "--port", "--api-key", "--tp-size", "--chunked-prefill-size",
                     "--enable-lora", "--graceful-shutdown-timeout", "--no-enable-allreduce-fusion"):
            assert flag in out.stdout
