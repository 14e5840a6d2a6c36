"""``python -m treadle [question]``: answer one question with the default model, chat template applied.

This is the README's first command: it proves the whole engine works on a fresh machine.
``treadle serve ...`` (or ``python -m treadle serve ...``) starts the HTTP server instead
(``server/serve_cmd.py``); ``treadle fleet up|status|down SPEC`` runs a fleet of them behind a router
(``deploy/cli.py``).
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["serve"]:
        from treadle.server.serve_cmd import main as serve_main

        return serve_main(args[1:])
    if args[:1] == ["fleet"]:
        from treadle.deploy.cli import main as fleet_main

        return fleet_main(args[1:])
    p = argparse.ArgumentParser(prog="treadle", description=__doc__)
    p.add_argument("question", nargs="?", default="What is the capital of France?")
    p.add_argument("--model-path", default="default")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    p.add_argument("--log-level", default="warning")
    a = p.parse_args(argv)

    from treadle import Engine
    from treadle.runtime.model_files import resolve_model_files

    t0 = time.perf_counter()
    files = resolve_model_files(a.model_path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(files.tokenizer_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": a.question}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    params = {"temperature": a.temperature, "max_new_tokens": a.max_new_tokens}
    with Engine(model_path=a.model_path, log_level=a.log_level) as engine:
        print(f"Q: {a.question}", flush=True)
        if a.stream:
            print("A: ", end="", flush=True)
            for chunk in engine.generate(input_ids=list(ids), sampling_params=params, stream=True):
                print(chunk["text"], end="", flush=True)
            print()
        else:
            print(f"A: {engine.generate(input_ids=list(ids), sampling_params=params)['text']}", flush=True)
    print(f"({time.perf_counter() - t0:.1f} s including engine start-up)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
