"""``bench/common.py``: the JSON-lines result schema every workload benchmark writes, and the
seeded SGLang CI workload, which must stay the prompts every recorded number was measured on."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "bench" / "common.py"


@pytest.fixture(scope="module")
def common():
    # loaded under its own name: bench/ is a folder of scripts, not a package on sys.path
    spec = importlib.util.spec_from_file_location("bench_common", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_result_line_names_its_context_and_figures(common, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BENCH_COMMIT", "abc1234")
    out = tmp_path / "results.jsonl"
    res = common.Results("demo", str(out), {"tp_size": 2}, shape="tiny")
    res.record("a_batch1_decode", tok_s=1.5, runs=[1.4, 1.5])
    (line,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert line["bench"] == "demo" and line["shape"] == "tiny" and line["commit"] == "abc1234"
    assert line["engine_args"] == {"tp_size": 2} and line["part"] == "a_batch1_decode"
    assert line["figures"] == {"tok_s": 1.5, "runs": [1.4, 1.5]}
    assert line["card"] and line["torch"] and len(line["date"]) == 10
    printed = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert printed[0]["part"] == "meta" and printed[0]["commit"] == "abc1234"
    assert printed[1] == {"shape": "tiny", "part": "a_batch1_decode", "tok_s": 1.5, "runs": [1.4, 1.5]}


def test_echo_off_writes_the_file_only(common, tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    common.Results("demo", str(out), {}, echo=False).record("x", n=1)
    assert capsys.readouterr().out == ""
    assert json.loads(out.read_text())["figures"] == {"n": 1}


def test_the_ci_workload_is_the_one_measured(common):
    ins, outs = common.random_workload(500, (1, 4096), (1, 2048), seed=1, vocab=128256)
    # docs/perf.md's CI runs: 523,262 output tokens over 500 prompts
    assert sum(outs) == 523262 and sum(map(len, ins)) == 1045822
    assert ins[0][:3] == [74706, 111174, 105254] and outs[:3] == [893, 1449, 1026]
    assert all(100 <= t < 128256 for p in ins for t in p)


def test_engine_args_parse_as_json(common):
    a = common.bench_parser(None, hf=True, tokenizer=True).parse_args(["--engine-args", '{"tp_size": 2}', "--skip-hf"])
    assert common.engine_kwargs(a) == {"tp_size": 2} and a.skip_hf and a.tokenizer_dir == "" and a.out == ""
