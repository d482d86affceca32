"""The gateway's config as the tests build it: the public models pointed at the fake
provider, with the test prices and the fake's key in the environment."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import tomli_w

from keymeai.config import Config, parse_config

ROOT = Path(__file__).resolve().parents[2]  # the repository
UPSTREAM_KEY = "sk-fake-upstream"
PROVIDER_ENV = {
    "DEEPSEEK_API_KEY": UPSTREAM_KEY,
    "DASHSCOPE_API_KEY": UPSTREAM_KEY,
    "ARK_API_KEY": UPSTREAM_KEY,
}
PRICES = {
    "deepseek-chat": {"input": 0.27, "cached_input": 0.07, "output": 1.10},
    "deepseek-reasoner": {"input": 0.55, "cached_input": 0.14, "output": 2.19},
    "doubao-pro-32k": {"input": 0.11, "cached_input": 0.022, "output": 0.28},
    "qwen-max": {"input": 1.6, "cached_input": 0.64, "output": 6.4},
    "qwen-plus": {"input": 0.4, "cached_input": 0.16, "output": 1.2},
}
MODEL = "deepseek-chat"  # the model the limit, quota and usage tests ask


def base_config(fake_url: str, database_url: str) -> dict[str, Any]:
    """The five public models of config.toml, their providers pointed at the fake."""
    return copy.deepcopy(
        {
            "gateway": {"key_cache_seconds": 1, "stream_keepalive_seconds": 10},
            "database": {"url": database_url},
            "ratelimit": {"storage_uri": "memory://"},
            "routing": {"failure_threshold": 3, "cooldown_seconds": 30},
            "tiers": {
                "free": {"requests": ["100 per day"]},
                "hobby": {"requests": ["600 per minute"], "tokens_per_month": 5_000_000},
                "standard": {"requests": ["3000 per minute"]},
                "scale": {"requests": ["10000 per minute"]},
            },
            "providers": {
                "deepseek": {
                    "base_url": f"{fake_url}/deepseek/ok/v1",
                    "api_key_env": "DEEPSEEK_API_KEY",
                    "connect_timeout": 2,
                    "read_timeout": 10,
                },
                "dashscope": {
                    "base_url": f"{fake_url}/dashscope/ok/compatible-mode/v1",
                    "api_key_env": "DASHSCOPE_API_KEY",
                    "connect_timeout": 2,
                    "read_timeout": 10,
                },
                "ark": {
                    "base_url": f"{fake_url}/ark/ok/api/v3",
                    "api_key_env": "ARK_API_KEY",
                    "connect_timeout": 2,
                    "read_timeout": 10,
                },
            },
            "models": {
                "deepseek-chat": {
                    "owned_by": "deepseek",
                    "upstreams": [{"provider": "deepseek", "model": "deepseek-chat"}],
                    "price": PRICES["deepseek-chat"],
                },
                "deepseek-reasoner": {
                    "owned_by": "deepseek",
                    "upstreams": [{"provider": "deepseek", "model": "deepseek-reasoner"}],
                    "price": PRICES["deepseek-reasoner"],
                },
                "doubao-pro-32k": {
                    "owned_by": "bytedance",
                    "upstreams": [{"provider": "ark", "model": "doubao-pro-32k-241215"}],
                    "price": PRICES["doubao-pro-32k"],
                },
                "qwen-max": {
                    "owned_by": "alibaba",
                    "upstreams": [{"provider": "dashscope", "model": "qwen-max"}],
                    "price": PRICES["qwen-max"],
                },
                "qwen-plus": {
                    "owned_by": "alibaba",
                    "upstreams": [{"provider": "dashscope", "model": "qwen-plus"}],
                    "price": PRICES["qwen-plus"],
                },
            },
        }
    )


def add_provider(data: dict[str, Any], name: str, base_url: str, **options: Any) -> None:
    """Add a provider (e.g. one in a fault mode of the fake) using the deepseek key."""
    data["providers"][name] = {
        "base_url": base_url,
        "api_key_env": "DEEPSEEK_API_KEY",
        "connect_timeout": 2,
        "read_timeout": 10,
        **options,
    }


def add_model(data: dict[str, Any], model_id: str, upstreams: list[tuple[str, str]]) -> None:
    """Add a model served by `upstreams` ((provider, upstream model) pairs) at MODEL's price."""
    data["models"][model_id] = {
        "upstreams": [{"provider": p, "model": m} for p, m in upstreams],
        "price": PRICES[MODEL],
    }


def write_toml(data: dict[str, Any], path: Path) -> Path:
    path.write_text(tomli_w.dumps(data))
    return path


def build_config(data: dict[str, Any], env: dict[str, str] | None = None) -> Config:
    """The parsed config, with the providers' keys (and `env`) as its environment."""
    return parse_config(data, {**PROVIDER_ENV, **(env or {})})
