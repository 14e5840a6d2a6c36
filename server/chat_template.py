"""Chat templates in the server process: messages -> the prompt's token ids.

The server tokenizes chat prompts itself and sends ``input_ids``, so the prompt the template
renders is the prompt the engine runs and its token count is exact. The template is the model's
own (its tokenizer files, through transformers' ``AutoTokenizer``) unless the server was started
with ``--chat-template`` (SGLang's ``chat_template``: a file path or the template text). The
tokenizer is loaded once per app, lazily (importing transformers costs seconds), in a worker
thread so that the event loop keeps serving meanwhile. It also names tokens for logprobs.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any, Optional

from starlette.concurrency import run_in_threadpool

from treadle.server.errors import APIError


class ServerTokenizer:
    """The model's tokenizer and chat template, as the OpenAI routes use them."""

    def __init__(self, tokenizer_dir: str, chat_template: Optional[str] = None,
                 default_kwargs: Optional[dict[str, Any]] = None) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.template = load_template(chat_template)
        self.default_kwargs = dict(default_kwargs or {})
        self._token_text: dict[int, str] = {}

    def render(self, messages: list[dict[str, Any]], tools: Optional[list[dict[str, Any]]] = None,
               add_generation_prompt: bool = True, continue_final_message: bool = False,
               template_kwargs: Optional[dict[str, Any]] = None) -> list[int]:
        """The prompt's token ids. A template that fails on these messages (a role it does not know,
        a missing field) is the request's fault: a 400 naming ``messages``."""
        if self.template is None and getattr(self.tok, "chat_template", None) is None:
            raise APIError(400, "This model has no chat template; start the server with --chat-template.", "messages")
        kwargs = {**self.default_kwargs, **(template_kwargs or {})}
        if continue_final_message:
            add_generation_prompt = False
        try:
            ids = self.tok.apply_chat_template(
                messages, tools=tools, chat_template=self.template, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, tokenize=True, return_dict=False, **kwargs)
        except APIError:
            raise
        except Exception as e:  # noqa: BLE001 - jinja's and transformers' errors, raised by the template
            raise APIError(400, f"messages: the chat template could not render them: {e}", "messages") from None
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    def token_text(self, token_id: int) -> str:
        """A token's text as OpenAI's logprobs show it (cached: logprob lists repeat tokens)."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tok.decode([token_id])
        return text

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


def load_template(value: Optional[str]) -> Optional[str]:
    """``--chat-template``: a file (a ``.jinja`` template or a JSON file holding ``chat_template``)
    or the template text itself."""
    if not value:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            text = f.read()
        if value.endswith(".json"):
            return json.loads(text)["chat_template"]
        return text
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"chat_template must be a template file or the template text, got {value!r}.")


def template_kwargs_default(value: Any) -> dict[str, Any]:
    """SGLang's ``default_chat_template_kwargs``: a dict or its JSON text."""
    if not value:
        return {}
    return json.loads(value) if isinstance(value, str) else dict(value)


async def server_tokenizer(state: Any) -> ServerTokenizer:
    """The app's tokenizer, loaded on first use (one load even when requests race for it)."""
    tok = getattr(state, "openai_tokenizer", None)
    if tok is not None:
        return tok
    lock = getattr(state, "openai_tokenizer_lock", None)
    if lock is None:
        lock = state.openai_tokenizer_lock = asyncio.Lock()
    async with lock:
        if getattr(state, "openai_tokenizer", None) is None:
            state.openai_tokenizer = await run_in_threadpool(load_server_tokenizer, state.engine.server_args)
    return state.openai_tokenizer


def load_server_tokenizer(args: Any) -> ServerTokenizer:
    """The tokenizer and chat template ``args`` name (the serve command loads it before listening)."""
    from treadle.runtime.model_files import resolve_model_files

    files = resolve_model_files(args.model_path, getattr(args, "tokenizer_path", None), need_weights=False,
                                revision=getattr(args, "revision", None),
                                download_dir=getattr(args, "download_dir", None))
    return ServerTokenizer(files.tokenizer_dir, getattr(args, "chat_template", None),
                           template_kwargs_default(getattr(args, "default_chat_template_kwargs", None)))
