"""Shared fixtures: one default-model engine and one MiniLM embedding engine for the whole session
(each start-up costs 12-17 s on the 2-core CI machine), and HF's reference model."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# This process runs HF references and tests' own torch work beside the engines' workers on a few
# cores: a short OpenMP spin (as runtime/procs.thread_env gives the CPU worker) keeps its idle
# threads from holding the cores a worker needs. Set before torch is imported.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")


@pytest.fixture(autouse=True)
def _treadle_logger_as_found():
    """An Engine built in this process (even one refused at its checks) gives the ``treadle`` logger
    a handler of its own and stops propagation; put it back so later tests' ``caplog`` sees records."""
    import logging

    logger = logging.getLogger("treadle")
    handlers, propagate, level = list(logger.handlers), logger.propagate, logger.level
    yield
    logger.handlers[:], logger.propagate, logger.level = handlers, propagate, level


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    from treadle.runtime.model_files import resolve_model_files

    return resolve_model_files("default").model_dir


@pytest.fixture(scope="session")
def engine():
    """The shared engine on the default model (float32, CPU); tests must leave it idle."""
    from treadle import Engine

    eng = Engine(model_path="default", random_seed=0)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def tp2_engine():
    """The usage guide's "With Configuration" engine as written (model_path changed): ``tp_size=2``
    over gloo on the CPU. ``test_parallel`` and ``test_usage_guide`` share it (a start-up of two
    workers costs 15-25 s on the 2-core CI machine); tests leave it idle."""
    from treadle import Engine

    engine = Engine(
        model_path="default",
        tp_size=2,
        mem_fraction_static=0.8,
        trust_remote_code=True,
        log_level="info"
    )
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def minilm():
    """One all-MiniLM-L6-v2 embedding engine for every module that serves it (in process, over
    HTTP, through ``RemoteEngine``): encode calls leave it as they found it."""
    from treadle import Engine

    eng = Engine(model_path="all-MiniLM-L6-v2", is_embedding=True)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def hf_tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="session")
def hf_gguf_model():
    """HF transformers' own dequantization of the packaged GGUF: the parity reference."""
    import torch
    from transformers import AutoModelForCausalLM

    from treadle.runtime.model_files import default_gguf_path

    path = default_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory, request) -> str:
    """A tiny random LLaVA checkpoint (``tests/tiny_llava.py``): CLIP tower on 32x32 images (16
    tokens each), 2-layer Llama text model, the default model's tokenizer plus ``<image>``
    (``TREADLE_TEST_TOKENIZER_DIR`` names another tokenizer directory: the GPU machine has no
    default-model package)."""
    from tiny_llava import build_tiny_llava

    tok_dir = os.environ.get("TREADLE_TEST_TOKENIZER_DIR") or request.getfixturevalue("default_model_dir")
    return build_tiny_llava(str(tmp_path_factory.mktemp("tiny_llava")), tok_dir)
