# Source on the lent GPU machine (see ../shared/DEVICE.md): install the carried wheels; the
# checkout itself imports as `treadle` from the repository root (treadle/__init__.py).
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TREADLE_CACHE_DIR=/tmp/treadle-cache
