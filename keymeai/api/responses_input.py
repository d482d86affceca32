"""A Responses API request as a chat completions body.

Every provider behind the gateway speaks chat completions, so a `POST /v1/responses`
is translated before it is validated, limited and routed like any chat request:
`input` items become messages (`developer` and `system` items system messages, as Codex
sends its instructions), function tools become chat tools, a `namespace` tool's
functions are flattened under names mapped back on the way out, and built-in tools that
no provider runs (`web_search`, ...) are left out and logged rather than refused: Codex
sends `web_search` on every request. Fields that only the Responses API knows are
accepted and kept for the Response object; any other field passes through to the
provider, as in chat completions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ..errors import invalid
from .validation import MAX_TOKENS

log = logging.getLogger(__name__)

# Accepted and answered by the gateway (or ignored): never sent upstream.
RESPONSES_ONLY = (
    "input",
    "instructions",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "max_output_tokens",
    "text",
    "reasoning",
    "store",
    "previous_response_id",
    "metadata",
    "include",
    "user",
    "prompt_cache_key",
    "prompt_cache_retention",
    "client_metadata",
    "truncation",
    "service_tier",
    "safety_identifier",
    "background",
    "stream_options",
    "max_tool_calls",
    "top_logprobs",
    "conversation",
    "prompt",
)
NAMESPACE_SEPARATOR = "__"
# Input items that a model produced and a provider cannot take back (DeepSeek refuses
# its own reasoning in the input); the conversation reads the same without them.
SKIPPED_ITEMS = ("reasoning", "web_search_call", "file_search_call", "computer_call")
TEXT_PARTS = ("input_text", "output_text", "text", "refusal", "summary_text")


@dataclass
class Translated:
    """The chat body, and what the answer needs to speak Responses again."""

    body: dict[str, Any]
    # The conversation's messages without the instructions (what a stored response keeps).
    conversation: list[dict[str, Any]] = field(default_factory=list)
    # Flattened tool name → (namespace, function name), for `namespace` tools.
    names: dict[str, tuple[str, str]] = field(default_factory=dict)


def to_chat(body: dict[str, Any], history: list[dict[str, Any]] | None = None) -> Translated:
    """The chat completions body for a Responses request. `history` holds the messages
    of a stored conversation that `previous_response_id` continues."""
    names: dict[str, tuple[str, str]] = {}
    chat = {k: v for k, v in body.items() if k not in RESPONSES_ONLY}
    tools = _tools(body.get("tools"), names)
    flat = {(ns, name): flat for flat, (ns, name) in names.items()}
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise invalid("instructions must be a string", "instructions")
        messages.append({"role": "system", "content": instructions})
    conversation = [*(history or []), *input_messages(body.get("input"), flat)]
    chat["messages"] = messages + conversation
    if tools:
        chat["tools"] = tools
        choice = _tool_choice(body.get("tool_choice"), flat)
        if choice is not None:
            chat["tool_choice"] = choice
        if isinstance(body.get("parallel_tool_calls"), bool):
            chat["parallel_tool_calls"] = body["parallel_tool_calls"]
    limit = body.get("max_output_tokens")
    if limit is not None:
        if not (isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit <= MAX_TOKENS):
            raise invalid(
                f"max_output_tokens must be an integer from 1 to {MAX_TOKENS}", "max_output_tokens"
            )
        chat["max_tokens"] = limit
    response_format = _response_format(body.get("text"))
    if response_format is not None:
        chat["response_format"] = response_format
    return Translated(chat, conversation, names)


def input_messages(value: Any, flat: dict[tuple[str, str], str]) -> list[dict[str, Any]]:
    """`input` (a string or a list of items) as chat messages."""
    if value is None:
        raise invalid("you must provide an input parameter", "input")
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise invalid("input must be a string or an array of input items", "input")
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise invalid(f"{param} must be an object", param)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            messages.append(_message(item, param))
        elif kind == "function_call":
            _function_call(messages, item, param, flat)
        elif kind == "function_call_output":
            messages.append(_function_output(item, param))
        elif kind in SKIPPED_ITEMS:
            continue
        else:
            raise invalid(f"{param}.type {kind!r} is not supported here", f"{param}.type")
    if not messages:
        raise invalid("input must contain at least one message", "input")
    return messages


def _message(item: dict[str, Any], param: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in ("user", "assistant", "system", "developer"):
        raise invalid(
            f"{param}.role must be one of user, assistant, system, developer", f"{param}.role"
        )
    content = item.get("content")
    if isinstance(content, str):
        parts: list[dict[str, Any]] = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        parts = [_part(part, f"{param}.content[{j}]") for j, part in enumerate(content)]
    else:
        raise invalid(f"{param}.content must be a string or an array", f"{param}.content")
    chat_role = "system" if role == "developer" else role
    if role == "user" and any(p["type"] != "text" for p in parts):
        return {"role": "user", "content": parts}
    for part in parts:
        if part["type"] != "text":
            raise invalid(f"{param}: only user messages may hold images", f"{param}.content")
    return {"role": chat_role, "content": "".join(p["text"] for p in parts)}


def _part(part: Any, param: str) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise invalid(f"{param} must be an object", param)
    kind = part.get("type")
    if kind in TEXT_PARTS:
        text = part.get("text", part.get("refusal"))
        if not isinstance(text, str):
            raise invalid(f"{param}.text must be a string", f"{param}.text")
        return {"type": "text", "text": text}
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str) or not url:
            raise invalid(
                f"{param}.image_url must be a URL or a data: URL (file_id is not supported)",
                f"{param}.image_url",
            )
        image: dict[str, Any] = {"url": url}
        if part.get("detail") in ("low", "high", "auto"):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    raise invalid(f"{param}.type {kind!r} is not supported", f"{param}.type")


def _function_call(
    messages: list[dict[str, Any]], item: dict[str, Any], param: str, flat: dict
) -> None:
    """A call the model made, joined to the assistant message just before it (chat
    completions hold parallel calls in one message)."""
    call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments")
    for key, value in (("call_id", call_id), ("name", name), ("arguments", arguments)):
        if not isinstance(value, str):
            raise invalid(f"{param}.{key} must be a string", f"{param}.{key}")
    namespace = item.get("namespace")
    if isinstance(namespace, str):
        name = flat.get((namespace, name), f"{namespace}{NAMESPACE_SEPARATOR}{name}")
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant":
        last.setdefault("tool_calls", []).append(call)
        if not last.get("content"):
            last["content"] = None
        return
    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _function_output(item: dict[str, Any], param: str) -> dict[str, Any]:
    call_id, output = item.get("call_id"), item.get("output")
    if not isinstance(call_id, str):
        raise invalid(f"{param}.call_id must be a string", f"{param}.call_id")
    if isinstance(output, list):
        texts = [_part(p, f"{param}.output[{j}]") for j, p in enumerate(output)]
        output = "".join(p.get("text", "") for p in texts)
    if not isinstance(output, str):
        raise invalid(f"{param}.output must be a string", f"{param}.output")
    return {"role": "tool", "tool_call_id": call_id, "content": output}


def _tools(value: Any, names: dict[str, tuple[str, str]]) -> list[dict[str, Any]]:
    """Chat tools for the function tools, namespaces flattened; built-in tools left out."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid("tools must be an array", "tools")
    tools: list[dict[str, Any]] = []
    left_out: list[str] = []
    for i, tool in enumerate(value):
        param = f"tools[{i}]"
        if not isinstance(tool, dict) or not isinstance(tool.get("type"), str):
            raise invalid(f"{param} must be an object with a type", param)
        if tool["type"] == "function":
            tools.append(_function_tool(tool, param, tool.get("name")))
        elif tool["type"] == "namespace":
            namespace, inner = tool.get("name"), tool.get("tools")
            if not isinstance(namespace, str) or not isinstance(inner, list):
                raise invalid(f"{param} must have a name and tools", param)
            for j, nested in enumerate(inner):
                where = f"{param}.tools[{j}]"
                if not isinstance(nested, dict) or nested.get("type") != "function":
                    left_out.append(
                        f"{namespace}/{nested.get('type') if isinstance(nested, dict) else '?'}"
                    )
                    continue
                name = nested.get("name")
                flat = f"{namespace}{NAMESPACE_SEPARATOR}{name}"
                tools.append(_function_tool(nested, where, flat))
                names[flat] = (namespace, str(name))
        else:
            left_out.append(tool["type"])
    if left_out:
        log.info("responses: built-in tools left out of the upstream call: %s", ", ".join(left_out))
    return tools


def _function_tool(tool: dict[str, Any], param: str, name: Any) -> dict[str, Any]:
    if not isinstance(tool.get("name"), str) or not tool["name"]:
        raise invalid(f"{param}.name must be a non-empty string", f"{param}.name")
    function: dict[str, Any] = {"name": name}
    for key in ("description", "parameters"):
        if tool.get(key) is not None:
            function[key] = tool[key]
    if tool.get("strict") is True:  # Codex sends `strict: false`, which some providers refuse
        function["strict"] = True
    return {"type": "function", "function": function}


def _tool_choice(value: Any, flat: dict[tuple[str, str], str]) -> Any:
    if value is None or value in ("auto", "none", "required"):
        return value
    if isinstance(value, dict) and value.get("type") == "function":
        name = value.get("name")
        if not isinstance(name, str):
            raise invalid("tool_choice.name must be a string", "tool_choice.name")
        namespace = value.get("namespace")
        if isinstance(namespace, str):
            name = flat.get((namespace, name), name)
        return {"type": "function", "function": {"name": name}}
    return None  # a built-in tool, or allowed_tools: the provider chooses


def _response_format(text: Any) -> dict[str, Any] | None:
    if text is None:
        return None
    if not isinstance(text, dict):
        raise invalid("text must be an object", "text")
    fmt = text.get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("name"), str) or not isinstance(fmt.get("schema"), dict):
            raise invalid("text.format needs a name and a schema object", "text.format")
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": schema}
    raise invalid("text.format.type must be text, json_object or json_schema", "text.format.type")
