"""Encode throughput: Treadle's ``encode`` beside sentence-transformers' ``encode`` (all-MiniLM-L6-v2).

    python bench/embeddings.py [--sentences 512] [--batch 64] [--out FILE]

Same model files, same sentences, on the CPU; prints sentences/s for both and the lowest cosine
similarity between the two sets of vectors.
"""

from __future__ import annotations

import time

import numpy as np

from common import Results, bench_parser, engine_kwargs, model_files_dir


def sentences(n: int) -> list[str]:
    topics = ["the weather", "a football match", "quantum physics", "cooking pasta", "the stock market",
              "a trip to Japan", "machine learning", "ancient Rome"]
    return [f"Sentence {i} is a short remark about {topics[i % len(topics)]} and why it matters." for i in range(n)]


def main() -> None:
    p = bench_parser(__doc__)
    p.add_argument("--sentences", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    a = p.parse_args()
    res = Results("embeddings", a.out, engine_kwargs(a), echo=False, sentences=a.sentences, batch=a.batch)
    texts = sentences(a.sentences)

    from treadle import Engine

    with Engine(model_path="all-MiniLM-L6-v2", **{"is_embedding": True, **engine_kwargs(a)}) as eng:
        eng.encode(prompt=texts[:8])
        t0 = time.perf_counter()
        ours = [v for i in range(0, len(texts), a.batch) for v in eng.encode(prompt=texts[i:i + a.batch])["embedding"]]
        treadle_rate = len(texts) / (time.perf_counter() - t0)

    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(model_files_dir("all-MiniLM-L6-v2"), device="cpu")
    st.encode(texts[:8])
    t0 = time.perf_counter()
    ref = st.encode(texts, batch_size=a.batch)
    st_rate = len(texts) / (time.perf_counter() - t0)
    ours_a = np.asarray(ours)
    cos = (ours_a * ref).sum(1) / np.linalg.norm(ours_a, axis=1) / np.linalg.norm(ref, axis=1)
    print("| encoder | sentences/s | min cosine vs sentence-transformers |")
    print("|---|---|---|")
    print(f"| Treadle `encode` (batches of {a.batch}) | {treadle_rate:.1f} | {cos.min():.6f} |")
    print(f"| sentence-transformers `encode` (batch_size={a.batch}) | {st_rate:.1f} | 1 |")
    res.record("encode", treadle_sentences_s=round(treadle_rate, 1), sentence_transformers_sentences_s=round(st_rate, 1),
               min_cosine=round(float(cos.min()), 6))


if __name__ == "__main__":
    main()
