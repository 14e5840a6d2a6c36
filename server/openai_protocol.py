"""OpenAI's request bodies as pydantic models: a wrong type becomes a 400 naming the field.

Unknown fields are ignored, as SGLang's server ignores them (OpenAI itself refuses them), so a
client that sends OpenAI's newer fields still gets an answer. SGLang's own extras (``top_k``,
``regex``, ``lora_path``, ...) are fields here too; ``openai_sampling.py`` maps them onto the
engine's sampling parameters.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from treadle.server.errors import APIError


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=(), strict=True)


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaFormat(_Body):
    name: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")  # "schema" would shadow BaseModel's
    strict: Optional[bool] = None
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class _Sampling(_Body):
    """The fields completions and chat share: OpenAI's sampling knobs and SGLang's extras."""
    model: Optional[str] = None
    n: int = 1
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    logit_bias: Optional[dict[str, float]] = None
    response_format: Optional[ResponseFormat] = None
    # SGLang's extra parameters
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    regex: Optional[str] = None
    ebnf: Optional[str] = None
    json_schema: Optional[str] = None
    lora_path: Optional[str] = None
    priority: Optional[int] = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    min_tokens: int = 0
    stop_token_ids: Optional[list[int]] = None
    rid: Optional[str] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = None
    echo: bool = False
    suffix: Optional[str] = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[dict[str, Any]], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[str] = None
    reasoning_content: Optional[str] = None


class ToolFunction(_Body):
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: ToolFunction


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None
    parallel_tool_calls: Optional[bool] = None
    # SGLang's chat extras
    separate_reasoning: bool = True
    chat_template_kwargs: Optional[dict[str, Any]] = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class EmbeddingRequest(_Body):
    model: Optional[str] = None
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = None
    user: Optional[str] = None


def parse_body(model: type[BaseModel], body: dict[str, Any]) -> Any:
    """Validate a JSON body; the first error becomes a 400 naming its field (``messages.0.role``)."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if not _is_union_tag(p)]
        param = ".".join(loc).replace("schema_", "schema") or None
        raise APIError(400, f"{param}: {first.get('msg', 'invalid value')}" if param else str(e), param) from None


def _is_union_tag(part: Any) -> bool:
    """pydantic names the union member it tried (``list[int]``, ``str``) in a location: not a field."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "function-after"))
