"""Anthropic's Messages API (Claude Code, the anthropic SDK) on the gateway's keys.

`POST /v1/messages` translates the Anthropic body into a chat completions body, which
is validated, limited, routed, relayed and metered exactly as `/v1/chat/completions`
(keymeai.api.serve.serve); the answer is translated back by keymeai.api.anthropic. The views are
on the API blueprint, so the key, its request limit and the error handling are the
same (errors take Anthropic's shape there: keymeai.errors). `anthropic-version` and
`anthropic-beta` are ignored; so is `?beta=true`, which Claude Code adds.

`POST /v1/messages/count_tokens` answers the gateway's own estimate of the prompt, the
one the quota reserves, without an upstream call. It is a POST on the blueprint, so it
counts against the key's request limit like any other (the one window of all API POSTs): a client
that floods it is limited, one that calls it before each message spends a request.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Response, jsonify, request

from .. import gateway
from ..errors import invalid
from . import concurrency
from .anthropic import AnthropicMessages
from .serve import bp, read_body, require_allowed, serve
from .validation import ChatRequest, parse_chat_request, parse_json_body

# Claude Code also sends `system` messages among the turns (reminders to the model).
ROLES = ("user", "assistant", "system")
TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}


@bp.post("/messages")  # its key's request limits already counted: `api.init_app`
@concurrency.holding_slot
def messages() -> Response:
    chat = _chat_request(require_max_tokens=True)
    return serve(chat, AnthropicMessages(chat.model.id, chat.prompt_estimate))


@bp.post("/messages/count_tokens")
def count_tokens() -> Response:
    chat = _chat_request(require_max_tokens=False)
    require_allowed(chat.model)  # the same answer as a message to that model would get
    return jsonify({"input_tokens": chat.prompt_estimate})


def _chat_request(*, require_max_tokens: bool) -> ChatRequest:
    gw = gateway.current()
    raw = read_body(gw.config.gateway.max_request_bytes)
    body = parse_json_body(raw, request.content_type)
    return parse_chat_request(
        to_chat(body, require_max_tokens), gw.config.models, gw.config.quota.image_tokens
    )


def to_chat(body: dict[str, Any], require_max_tokens: bool = True) -> dict[str, Any]:
    """The chat completions body for an Anthropic Messages body; a 400 naming the
    Anthropic parameter for what cannot be translated."""
    chat: dict[str, Any] = {"model": body.get("model")}
    if require_max_tokens and body.get("max_tokens") is None:
        raise invalid("max_tokens: Field required", "max_tokens")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages: must be a non-empty array of messages", "messages")
    chat["messages"] = _system(body.get("system")) + [
        out for i, message in enumerate(messages) for out in _message(message, f"messages.{i}")
    ]
    for name, target in (
        ("max_tokens", "max_tokens"),
        ("stop_sequences", "stop"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("stream", "stream"),
    ):
        if body.get(name) is not None:
            chat[target] = body[name]
    stop = chat.get("stop")
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise invalid("stop_sequences: must be an array of strings", "stop_sequences")
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        chat["user"] = metadata["user_id"]
    tools = _tools(body.get("tools"))
    if tools:
        chat["tools"] = tools
    _tool_choice(body.get("tool_choice"), chat)
    return chat  # `thinking`, `top_k`, `service_tier` and the like are accepted, not sent


def _system(system: Any, param: str = "system") -> list[dict[str, Any]]:
    if system is None or system == "" or system == []:
        return []
    if isinstance(system, str):
        return [{"role": "system", "content": system}]
    if isinstance(system, list) and all(_is_block(b, "text") for b in system):
        return [{"role": "system", "content": "\n\n".join(b["text"] for b in system)}]
    raise invalid(f"{param}: must be a string or an array of text blocks", param)


def _is_block(block: Any, kind: str) -> bool:
    return (
        isinstance(block, dict)
        and block.get("type") == kind
        and (kind != "text" or isinstance(block.get("text"), str))
    )


def _message(message: Any, param: str) -> list[dict[str, Any]]:
    """One Anthropic message as chat messages: tool results become `tool` messages
    (first, right after the assistant's calls), the rest one user or assistant message."""
    if not isinstance(message, dict):
        raise invalid(f"{param}: must be an object with a role and content", param)
    if message.get("role") not in ROLES:
        shown = _show(message.get("role"))
        raise invalid(
            f"{param}.role: must be user, assistant or system (got {shown})", f"{param}.role"
        )
    role, content = message["role"], message.get("content")
    if role == "system":
        return _system(content, f"{param}.content") or [{"role": "system", "content": ""}]
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list) or not all(isinstance(b, dict) for b in content):
        raise invalid(
            f"{param}.content: must be a string or an array of blocks", f"{param}.content"
        )
    if role == "assistant":
        return [_assistant(content, param)]
    out: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        where = f"{param}.content.{j}"
        if block.get("type") == "tool_result":
            out.append(_tool_result(block, where))
        else:
            parts.append(_part(block, where))
    if parts:
        out.append({"role": "user", "content": parts})
    return out


def _part(block: dict[str, Any], where: str) -> dict[str, Any]:
    """A text or image block as a chat content part."""
    kind = block.get("type")
    if _is_block(block, "text"):
        return {"type": "text", "text": block["text"]}
    if kind == "image":
        source = block.get("source")
        if isinstance(source, dict) and source.get("type") == "base64":
            media, data = source.get("media_type"), source.get("data")
            if isinstance(media, str) and isinstance(data, str):
                return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{data}"}}
        if (
            isinstance(source, dict)
            and source.get("type") == "url"
            and isinstance(source.get("url"), str)
        ):
            return {"type": "image_url", "image_url": {"url": source["url"]}}
        raise invalid(f"{where}.source: an image needs a base64 or url source", f"{where}.source")
    raise invalid(f"{where}: unsupported content block type {_show(kind)}", f"{where}.type")


def _tool_result(block: dict[str, Any], where: str) -> dict[str, Any]:
    tool_use_id = block.get("tool_use_id")
    if not isinstance(tool_use_id, str) or not tool_use_id:
        raise invalid(f"{where}.tool_use_id: Field required", f"{where}.tool_use_id")
    content = block.get("content")
    if content is None or isinstance(content, str):
        text = content or ""
    elif isinstance(content, list):
        # Chat's tool messages hold text: an image in a result is named, not sent.
        text = "\n".join(
            b["text"] if _is_block(b, "text") else f"[{_show(b.get('type'))} block]"
            for b in content
            if isinstance(b, dict)
        )
    else:
        raise invalid(f"{where}.content: must be a string or an array of blocks", where)
    if block.get("is_error") is True:
        text = f"Error: {text}"
    return {"role": "tool", "tool_call_id": tool_use_id, "content": text}


def _assistant(content: list[dict[str, Any]], param: str) -> dict[str, Any]:
    """An assistant turn: its text, and its tool_use blocks as tool_calls. Thinking
    blocks are dropped: providers refuse reasoning sent back to them."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        kind, where = block.get("type"), f"{param}.content.{j}"
        if _is_block(block, "text"):
            texts.append(block["text"])
        elif kind == "tool_use":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise invalid(f"{where}: a tool_use block needs an id and a name", where)
            arguments = json.dumps(block.get("input") or {}, ensure_ascii=False)
            function = {"name": block["name"], "arguments": arguments}
            calls.append({"id": block["id"], "type": "function", "function": function})
        elif kind not in ("thinking", "redacted_thinking"):
            raise invalid(f"{where}: unsupported content block type {_show(kind)}", where)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
    if calls:
        message["tool_calls"] = calls
    elif message["content"] is None:
        message["content"] = ""
    return message


def _tools(tools: Any) -> list[dict[str, Any]]:
    """Client tools as functions. Anthropic's server tools (a `type` such as
    web_search_20250305, no input_schema) run at Anthropic, not at these providers:
    they are left out, so the model cannot call what nobody would run."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise invalid("tools: must be an array of tools", "tools")
    functions = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise invalid(f"tools.{i}: must be an object", f"tools.{i}")
        if tool.get("type") not in (None, "custom"):
            continue
        name, schema = tool.get("name"), tool.get("input_schema")
        if not isinstance(name, str) or not isinstance(schema, dict):
            raise invalid(f"tools.{i}: a tool needs a name and an input_schema", f"tools.{i}")
        function: dict[str, Any] = {"name": name, "parameters": schema}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        functions.append({"type": "function", "function": function})
    return functions


def _tool_choice(choice: Any, chat: dict[str, Any]) -> None:
    if choice is None:
        return
    kind = choice.get("type") if isinstance(choice, dict) else None
    if not isinstance(kind, str):
        raise invalid("tool_choice: must be an object with a type", "tool_choice")
    if kind == "tool" and isinstance(choice.get("name"), str):
        chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    elif kind in TOOL_CHOICES:
        chat["tool_choice"] = TOOL_CHOICES[kind]
    else:
        raise invalid("tool_choice: must be auto, any, none or a named tool", "tool_choice")
    if isinstance(choice, dict) and choice.get("disable_parallel_tool_use") is True:
        chat["parallel_tool_calls"] = False


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
