"""The OpenAI request protocol: error bodies, JSON parsing and validation of every request field of
POST /v1/chat/completions and POST /v1/completions.

Every field of OpenAI's two request schemas is handled in exactly one of four ways:
- used: checked (type, range, finiteness) and passed to the sampler (model, messages / prompt,
  max_tokens, max_completion_tokens, temperature, top_p, seed, stop, stream, stream_options, echo,
  plus the common extensions top_k and repetition_penalty);
- ignored metadata: type-checked, then dropped because it cannot change the answer (user, metadata,
  store, service_tier, prompt_cache_key, safety_identifier, parallel_tool_calls);
- features this server does not implement (n > 1, logprobs, logit_bias, penalties, tools, response
  formats, audio, ...): accepted only at their no-op value (null, false, 0, 1, {}, [], "text"),
  anything else is refused with code "unsupported_parameter" / "unsupported_value" rather than
  silently ignored;
- anything else: refused as an unknown parameter, as OpenAI does.
The body itself must be a standard JSON object: NaN, Infinity and -Infinity (which Python's json
accepts), numbers that overflow to infinity (1e400), integers too long to convert, nesting too deep to
parse, invalid UTF-8 and lone surrogates (\\ud800) are refused. Every refusal is an `APIError` that the
app turns into a 400 with OpenAI's body {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

INT32_MAX = 2**31 - 1
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _bad(param: str | None, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


# ---------------------------------------------------------------- the body
class _Constant:
    """Stands in for a NaN / Infinity / -Infinity literal until the walk finds where it sits."""

    def __init__(self, name: str):
        self.name = name


def _walk(v: Any, path: str) -> None:
    """Refuses non-standard constants, non-finite numbers and strings that are not valid Unicode
    anywhere in the parsed body (iteratively: the body may be as deep as json allowed)."""
    stack = [(v, path)]
    while stack:
        v, path = stack.pop()
        if isinstance(v, _Constant):
            raise _bad(path or None, f"'{path}': {v.name} is not valid JSON (use a finite number)", "invalid_json")
        if isinstance(v, float) and not math.isfinite(v):
            raise _bad(path or None, f"'{path}': the number is too large (not finite)", "invalid_json")
        if isinstance(v, str):
            _check_unicode(v, path)
        elif isinstance(v, dict):
            for k, x in v.items():
                _check_unicode(k, path)
                stack.append((x, f"{path}.{k}" if path else k))
        elif isinstance(v, list):
            stack.extend((x, f"{path}[{i}]") for i, x in enumerate(v))


def _check_unicode(s: str, path: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(path or None, f"'{path}' is not valid Unicode (it holds a lone surrogate \\ud800-\\udfff)",
                   "invalid_json") from None


def parse_body(raw: bytes) -> dict[str, Any]:
    """Request bytes -> the JSON object, or APIError(400)."""
    def constant(name):
        return _Constant(name)

    try:
        body = json.loads(raw, parse_constant=constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"We could not parse the JSON body of your request: {e}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "We could not parse the JSON body of your request: nested too deeply",
                       code="invalid_json") from None
    except ValueError as e:  # e.g. an integer literal longer than Python's int-conversion limit
        raise APIError(400, f"We could not parse the JSON body of your request: {e}", code="invalid_json") from None
    if isinstance(body, _Constant) or not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    _walk(body, "")
    return body


# ---------------------------------------------------------------- fields
def _type_name(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(v), type(v).__name__)


def _invalid_type(param: str, want: str, v) -> APIError:
    return _bad(param, f"Invalid type for '{param}': expected {want}, but got {_type_name(v)} instead.",
                "invalid_type")


def get_int(body: dict, name: str, default, lo: int, hi: int, param: str | None = None):
    """An integer in [lo, hi] (a float with an integral value such as 5.0 counts), or default when
    absent / null."""
    param = param or name
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _invalid_type(param, "an integer", v)
    if isinstance(v, float):
        if not v.is_integer():
            raise _invalid_type(param, "an integer", v)
        v = int(v)
    if not lo <= v <= hi:
        raise _bad(param, f"Invalid '{param}': expected an integer in [{lo}, {hi}], but got {v} instead.")
    return v


def get_float(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    """A finite number in [lo, hi], or default when absent / null."""
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _invalid_type(name, "a number", v)
    v = float(v)
    if not math.isfinite(v) or not lo <= v <= hi:
        raise _bad(name, f"Invalid '{name}': expected a number in [{lo:g}, {hi:g}], but got {v:g} instead.")
    return v


def get_bool(body: dict, name: str, default: bool, param: str | None = None) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _invalid_type(param or name, "a boolean", v)
    return v


def get_str(body: dict, name: str, param: str | None = None) -> str | None:
    v = body.get(name)
    if v is not None and not isinstance(v, str):
        raise _invalid_type(param or name, "a string", v)
    return v


def _stop(body: dict) -> tuple[str, ...]:
    s = body.get("stop")
    if s is None:
        return ()
    if isinstance(s, str):
        s = [s]
    if not isinstance(s, list) or not all(isinstance(x, str) and x for x in s) or len(s) > 4:
        raise _bad("stop", "'stop' must be a non-empty string or a list of up to 4 non-empty strings")
    return tuple(s)


def _metadata(body: dict) -> None:
    m = body.get("metadata")
    if m is None:
        return
    if not isinstance(m, dict):
        raise _invalid_type("metadata", "an object", m)
    for k, x in m.items():
        if not isinstance(x, str):
            raise _invalid_type(f"metadata.{k}", "a string", x)


def _unsupported(name: str, v, why: str) -> APIError:
    return _bad(name, f"Unsupported value for '{name}': {json.dumps(v)[:80]} ({why}).", "unsupported_value")


def _noop(body: dict, name: str, allowed: tuple, why: str) -> None:
    """A feature this server does not implement: only its no-op values pass."""
    v = body.get(name)
    if v is None:
        return
    if not any(type(v) is type(a) and v == a for a in allowed):
        raise _unsupported(name, v, why)


# name -> (checker, why) for the features we do not implement; shared by both endpoints unless noted
_NO_N = "this server returns one choice per request"
_NO_LOGPROBS = "this server does not return log-probabilities"
_NO_PENALTY = "frequency/presence penalties are not implemented; use repetition_penalty"


def _common_noops(body: dict) -> None:
    n = get_int(body, "n", 1, 1, 128)
    if n != 1:
        raise _unsupported("n", n, _NO_N)
    for name in ("frequency_penalty", "presence_penalty"):
        if get_float(body, name, 0.0, -2.0, 2.0) != 0.0:
            raise _unsupported(name, body[name], _NO_PENALTY)
    lb = body.get("logit_bias")
    if lb is not None and not isinstance(lb, dict):
        raise _invalid_type("logit_bias", "an object", lb)
    if lb:
        raise _unsupported("logit_bias", lb, "logit_bias is not implemented")


def _stream_opts(body: dict) -> tuple[bool, bool]:
    stream = get_bool(body, "stream", False)
    so = body.get("stream_options")
    if so is None:
        return stream, False
    if not isinstance(so, dict):
        raise _invalid_type("stream_options", "an object", so)
    if not stream:
        raise _bad("stream_options", "The 'stream_options' parameter is only allowed when 'stream' is enabled.")
    for k in so:
        if k not in ("include_usage", "include_obfuscation"):
            raise _bad(f"stream_options.{k}", f"Unknown parameter: 'stream_options.{k}'.", "unknown_parameter")
    get_bool(so, "include_obfuscation", False, "stream_options.include_obfuscation")
    return stream, get_bool(so, "include_usage", False, "stream_options.include_usage")


def _unknown(body: dict, known: frozenset, where: str = "") -> None:
    for k in body:
        if k not in known:
            raise _bad(f"{where}{k}", f"Unrecognized request argument supplied: '{where}{k}'.", "unknown_parameter")


@dataclasses.dataclass
class ParsedRequest:
    """A validated request. max_tokens is None when the client sent none (the app picks a default
    that fits the context); max_tokens_param names the field it came from (for error messages)."""
    model: str
    stream: bool
    include_usage: bool
    max_tokens: int | None
    max_tokens_param: str
    sampling: dict  # temperature, top_p, top_k, repetition_penalty, stop, seed (SamplingParams fields)
    messages: list[dict[str, str]] | None = None  # chat
    prompt: str | None = None  # completions
    echo: bool = False


def _common(body: dict) -> dict:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "you must provide a model parameter", "invalid_type" if model is not None else None)
    for name in ("user", "prompt_cache_key", "safety_identifier", "service_tier"):
        get_str(body, name)
    _metadata(body)
    get_bool(body, "store", False)
    _common_noops(body)
    stream, include_usage = _stream_opts(body)
    mt_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    get_int(body, "max_tokens", None, 1, INT32_MAX)
    max_tokens = get_int(body, mt_name, None, 1, INT32_MAX)
    sampling = dict(
        temperature=get_float(body, "temperature", 1.0, 0.0, 2.0),
        top_p=get_float(body, "top_p", 1.0, 0.0, 1.0),
        top_k=get_int(body, "top_k", 0, 0, INT32_MAX),
        repetition_penalty=get_float(body, "repetition_penalty", 1.0, 0.01, 10.0),
        stop=_stop(body),
        seed=get_int(body, "seed", None, SEED_MIN, SEED_MAX),
    )
    return dict(model=model, stream=stream, include_usage=include_usage, max_tokens=max_tokens,
                max_tokens_param=mt_name, sampling=sampling)


_COMMON_FIELDS = frozenset({
    "model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty",
    "stop", "seed", "n", "frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "user", "metadata",
    "store", "service_tier", "prompt_cache_key", "safety_identifier"})
CHAT_FIELDS = _COMMON_FIELDS | {
    "messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls",
    "functions", "function_call", "response_format", "modalities", "audio", "prediction", "web_search_options",
    "reasoning_effort", "verbosity"}
COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "echo", "suffix", "best_of"}


# ---------------------------------------------------------------- messages
_MESSAGE_KEYS = {
    "system": {"role", "content", "name"},
    "developer": {"role", "content", "name"},
    "user": {"role", "content", "name"},
    "assistant": {"role", "content", "name", "refusal", "tool_calls", "function_call", "audio"},
}
_PART_WHY = {"image_url": "images", "input_audio": "audio", "file": "files", "refusal": "refusal parts"}


def _content(m: dict, p: str) -> str:
    c = m.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list) and c:
        texts = []
        for j, part in enumerate(c):
            q = f"{p}.content[{j}]"
            if not isinstance(part, dict):
                raise _invalid_type(q, "an object (a content part)", part)
            t = part.get("type")
            if t in _PART_WHY:
                raise _bad(f"{q}.type", f"'{q}': this text-only model does not accept {_PART_WHY[t]}",
                           "unsupported_value")
            if t != "text":
                raise _bad(f"{q}.type", f"Invalid value for '{q}.type': expected 'text', but got "
                                        f"{json.dumps(t)[:40]} instead.")
            _unknown(part, frozenset({"type", "text"}), f"{q}.")
            text = part.get("text")
            if not isinstance(text, str):
                raise _invalid_type(f"{q}.text", "a string", text)
            texts.append(text)
        return "".join(texts)
    if isinstance(c, list):
        raise _bad(f"{p}.content", f"'{p}.content' must not be an empty array")
    if c is None:
        raise _bad(f"{p}.content", f"'{p}.content' is required (this server has no tool calls)")
    raise _invalid_type(f"{p}.content", "a string or an array of content parts", c)


def _messages(body: dict) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "'messages' must be a non-empty array",
                   "invalid_type" if msgs is not None and not isinstance(msgs, list) else None)
    out = []
    for i, m in enumerate(msgs):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _invalid_type(p, "an object", m)
        role = m.get("role")
        if role in ("tool", "function"):
            raise _bad(f"{p}.role", f"'{p}': {role} messages are not supported (this server has no tool calls)",
                       "unsupported_value")
        if not isinstance(role, str) or role not in _MESSAGE_KEYS:
            raise _bad(f"{p}.role", f"'{p}.role' must be one of system, developer, user, assistant; got "
                                    f"{json.dumps(role)[:40]}")
        _unknown(m, frozenset(_MESSAGE_KEYS[role]), f"{p}.")
        get_str(m, "name", f"{p}.name")  # accepted, not shown to the model (ChatML has no names)
        if role == "assistant":
            get_str(m, "refusal", f"{p}.refusal")
            for k in ("tool_calls", "function_call", "audio"):
                if m.get(k):
                    raise _bad(f"{p}.{k}", f"'{p}.{k}' is not supported (this server has no tool calls or audio)",
                               "unsupported_value")
        out.append({"role": "system" if role == "developer" else role, "content": _content(m, p)})
    return out


def parse_chat(body: dict) -> ParsedRequest:
    """Validates a /v1/chat/completions body (see the module docstring)."""
    _unknown(body, CHAT_FIELDS)
    common = _common(body)
    msgs = _messages(body)
    if get_bool(body, "logprobs", False):
        raise _unsupported("logprobs", True, _NO_LOGPROBS)
    if get_int(body, "top_logprobs", 0, 0, 20):
        raise _unsupported("top_logprobs", body["top_logprobs"], _NO_LOGPROBS)
    get_bool(body, "parallel_tool_calls", True)
    for name in ("tools", "functions"):
        v = body.get(name)
        if v is not None and not isinstance(v, list):
            raise _invalid_type(name, "an array", v)
        if v:
            raise _unsupported(name, v, "this server has no tool calls")
    for name in ("tool_choice", "function_call"):
        _noop(body, name, ("none", "auto"), "this server has no tool calls")
    _noop(body, "response_format", ({"type": "text"},), "only plain text responses")
    _noop(body, "modalities", (["text"],), "only text output")
    for name in ("audio", "prediction", "web_search_options", "reasoning_effort", "verbosity"):
        _noop(body, name, (), "not implemented by this server")
    return ParsedRequest(messages=msgs, **common)


def parse_completion(body: dict) -> ParsedRequest:
    """Validates a /v1/completions body (see the module docstring)."""
    _unknown(body, COMPLETION_FIELDS)
    common = _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt:
        def is_id(x):
            return isinstance(x, int) and not isinstance(x, bool)

        if all(is_id(x) for x in prompt) or all(isinstance(x, list) and all(map(is_id, x)) for x in prompt):
            raise _bad("prompt", "token-id prompts are not supported: send the prompt as text", "unsupported_value")
        if all(isinstance(x, str) for x in prompt):
            raise _bad("prompt", "one prompt per request: send a string (or a list of one string)",
                       "unsupported_value")
    if not isinstance(prompt, str):
        raise _bad("prompt", "'prompt' must be a string", "invalid_type" if prompt is not None else None)
    echo = get_bool(body, "echo", False)
    if get_str(body, "suffix"):
        raise _unsupported("suffix", body["suffix"], "insertion is not implemented")
    best_of = get_int(body, "best_of", 1, 1, 20)
    if best_of != 1:
        raise _unsupported("best_of", best_of, _NO_N)
    lp = get_int(body, "logprobs", None, 0, 5)
    if lp is not None:
        raise _unsupported("logprobs", lp, _NO_LOGPROBS)
    return ParsedRequest(prompt=prompt, echo=echo, **common)
