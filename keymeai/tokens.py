"""Token estimates: what a request may be billed as prompt, before the upstream says.

The quota and the spend cap reserve a request's prompt estimate (plus its completion
allowance) before it is forwarded, and a record whose upstream reported no usage is
billed with it (flagged as estimated). So the estimate counts everything providers bill
as prompt: each message (its text, the `tool_calls` of an assistant, its name and
ids), the tool and function schemas, `tool_choice`, the `response_format` schema, and
a fixed allowance per image.

Text follows the rule of thumb DeepSeek publishes: one English character is about 0.3
token, one Chinese character about 0.6 token. Schemas and other structures count as
their compact JSON text, which real tokenizers split at least as coarsely (about 4
characters a token for JSON). Estimates are kept in integer tenths of a token while
pieces (stream chunks, messages) are summed, so that the sum is exact and rounds up the
same way however the text was split. Counts from an upstream's `usage` are always
preferred.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

# CJK ideographs, kana and hangul: the scripts priced like Chinese.
_CJK = re.compile(r"[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]")
PER_MESSAGE_OVERHEAD = 3  # role and separators
# An image part, whatever its size: the most OpenAI bills one at high detail (scaled to
# 768 x 2048, 8 tiles of 512 px: 8 x 170 + 85), which also covers Qwen-VL's default
# ceiling of 1280 tokens (+2) per image. `[quota] image_tokens` changes it.
IMAGE_TOKENS = 1445
# Qwen-VL with `vl_high_resolution_images: true` lets one image use up to 16384 tokens.
HIGH_RES_IMAGE_TOKENS = 16384
IMAGE_PARTS = ("image_url", "image")
# Request fields that providers render into the prompt.
PROMPT_FIELDS = ("tools", "functions", "tool_choice", "function_call", "response_format")


def estimate_tenths(text: str) -> int:
    """Estimated tokens in `text`, in tenths of a token (so that pieces add up exactly)."""
    cjk = len(_CJK.findall(text))
    return cjk * 6 + (len(text) - cjk) * 3


def tokens(tenths: int) -> int:
    """Whole tokens for an estimate in tenths, rounded up."""
    return -(-tenths // 10)


def json_text(value: Any) -> str:
    """What a value adds to the prompt: a string as itself, anything else as compact JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _content_tenths(content: Any, image_tokens: int) -> int:
    """A message's content: a string, or parts (text, images at the fixed allowance,
    anything else as its JSON text)."""
    if not isinstance(content, list):
        return estimate_tenths(json_text(content))
    total = 0
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            total += estimate_tenths(part["text"])
        elif kind in IMAGE_PARTS:
            total += image_tokens * 10
        else:
            total += estimate_tenths(json_text(part))
    return total


def _message_tenths(message: Mapping[str, Any], image_tokens: int) -> int:
    """Every field of a message but its role (which the overhead covers) is prompt."""
    total = PER_MESSAGE_OVERHEAD * 10
    for name, value in message.items():
        if name == "role" or value is None:
            continue
        if name == "content":
            total += _content_tenths(value, image_tokens)
        else:
            total += estimate_tenths(json_text(value))
    return total


def estimate_prompt_tokens(body: Mapping[str, Any], image_tokens: int = IMAGE_TOKENS) -> int:
    """The prompt tokens a chat completion request may be billed for (rounded up)."""
    if body.get("vl_high_resolution_images") is True:
        image_tokens = max(image_tokens, HIGH_RES_IMAGE_TOKENS)
    messages = body.get("messages")
    total = sum(
        _message_tenths(message, image_tokens)
        for message in (messages if isinstance(messages, list) else ())
        if isinstance(message, dict)
    )
    total += sum(
        estimate_tenths(json_text(body[name]))
        for name in PROMPT_FIELDS
        if body.get(name) is not None
    )
    return tokens(total)


def delta_text(delta: Any) -> str:
    """The generated text a stream chunk's delta (or a message) carries."""
    if not isinstance(delta, dict):
        return ""
    parts = [delta.get("content"), delta.get("reasoning_content")]
    for call in delta.get("tool_calls") or ():
        if isinstance(call, dict) and isinstance(call.get("function"), dict):
            parts += [call["function"].get("name"), call["function"].get("arguments")]
    return "".join(p for p in parts if isinstance(p, str))
