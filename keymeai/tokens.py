"""Token estimates, for the rare records the upstream gave no usage for.

DeepSeek publishes the rule of thumb used here: one English character is about 0.3
token, one Chinese character about 0.6 token. Estimates are kept in integer tenths of a
token while pieces (stream chunks, messages) are summed, so that the sum is exact and
rounds up the same way however the text was split. Counts from an upstream's `usage`
are always preferred; estimates are flagged as such in the ledger.
"""

from __future__ import annotations

import re
from typing import Any

# CJK ideographs, kana and hangul: the scripts priced like Chinese.
_CJK = re.compile(r"[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]")
PER_MESSAGE_OVERHEAD = 3  # role and separators


def estimate_tenths(text: str) -> int:
    """Estimated tokens in `text`, in tenths of a token (so that pieces add up exactly)."""
    cjk = len(_CJK.findall(text))
    return cjk * 6 + (len(text) - cjk) * 3


def tokens(tenths: int) -> int:
    """Whole tokens for an estimate in tenths, rounded up."""
    return -(-tenths // 10)


def content_text(content: Any) -> str:
    """The text of a message's content: a string, or the text of its parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def estimate_prompt_tokens(messages: list[Any]) -> int:
    total = 0
    for message in messages:
        if isinstance(message, dict):
            total += estimate_tenths(content_text(message.get("content")))
            total += PER_MESSAGE_OVERHEAD * 10
    return tokens(total)


def delta_text(delta: Any) -> str:
    """The generated text a stream chunk's delta (or a message) carries."""
    if not isinstance(delta, dict):
        return ""
    parts = [delta.get("content"), delta.get("reasoning_content")]
    for call in delta.get("tool_calls") or ():
        if isinstance(call, dict) and isinstance(call.get("function"), dict):
            parts.append(call["function"].get("arguments"))
    return "".join(p for p in parts if isinstance(p, str))
