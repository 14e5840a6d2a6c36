"""Structured-output overhead: decode throughput of json_schema-constrained requests vs unconstrained.

    python bench/structured_output.py [--batch 32] [--new-tokens 64] [--reps 2] [--out FILE]

The usage guide's JSON schema, the default model on the CPU, ``--batch`` concurrent requests at
temperature 0.8 with the same prompts. A constrained request ends when its JSON is complete, so
for a fair comparison the unconstrained run is given each request's constrained length
(``max_new_tokens`` = that length, ``ignore_eos``): both runs then make the same number of tokens
with the same batch shape, and the difference is the grammar's cost (mask fill in the scheduler,
the bitmask on the wire, masking in the worker, matcher advance). The grammar is compiled during
warm-up. An unconstrained run capped at ``--new-tokens`` is printed for reference.
"""

from __future__ import annotations

import json
import time

from common import Results, bench_parser, engine_kwargs

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string", "format": "email"},
    },
    "required": ["name", "age"],
}
NAMES = ["John", "Maria", "Wei", "Aisha", "Pierre", "Olga", "Kenji", "Fatima", "Carlos", "Emma", "Lars", "Noor",
         "Tomas", "Yuki", "Amara", "Diego"]


def run(eng, prompts: list[str], params: list[dict]) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    outs = eng.generate(prompt=prompts, sampling_params=params)
    dt = time.perf_counter() - t0
    return dt, [o["meta_info"]["completion_tokens"] for o in outs]


def main() -> None:
    p = bench_parser(__doc__)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=2)
    a = p.parse_args()
    res = Results("structured_output", a.out, engine_kwargs(a), echo=False, batch=a.batch, new_tokens=a.new_tokens,
                  reps=a.reps)

    from treadle import Engine

    prompts = [f"Generate information about a person named {NAMES[i % len(NAMES)]} (record {i})."
               for i in range(a.batch)]
    base = {"temperature": 0.8, "max_new_tokens": a.new_tokens}
    constrained = [{**base, "json_schema": json.dumps(SCHEMA)}] * a.batch
    with Engine(model_path="default", **{"random_seed": 0, **engine_kwargs(a)}) as eng:
        run(eng, prompts[:2], constrained[:2])  # warm-up: compiles the schema
        best_c = best_u = 0.0
        for _ in range(a.reps):
            dt_c, lens = run(eng, prompts, constrained)
            matched = [{**base, "max_new_tokens": n, "ignore_eos": True} for n in lens]
            dt_u, lens_u = run(eng, prompts, matched)
            assert lens_u == lens
            best_c, best_u = max(best_c, sum(lens) / dt_c), max(best_u, sum(lens) / dt_u)
            print(f"  rep: constrained {sum(lens)} tokens in {dt_c:.2f} s, unconstrained {dt_u:.2f} s")
        dt_r, lens_r = run(eng, prompts, [base] * a.batch)
    print(f"batch {a.batch}, max_new_tokens {a.new_tokens}, temperature 0.8, best of {a.reps}:")
    print("| run | output tok/s |")
    print("|---|---|")
    print(f"| json_schema constrained | {best_c:.1f} |")
    print(f"| unconstrained, same lengths | {best_u:.1f} |")
    print(f"| unconstrained, up to {a.new_tokens} tokens (reference) | {sum(lens_r) / dt_r:.1f} |")
    print(f"overhead: {100.0 * (1.0 - best_c / best_u):.1f}%")
    res.record("json_schema", constrained_tok_s=round(best_c, 1), unconstrained_same_lengths_tok_s=round(best_u, 1),
               unconstrained_reference_tok_s=round(sum(lens_r) / dt_r, 1),
               overhead_pct=round(100.0 * (1.0 - best_c / best_u), 1))


if __name__ == "__main__":
    main()
