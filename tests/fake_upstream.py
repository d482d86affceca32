"""The fake providers on their own, to try the gateway without provider accounts:
`python tests/fake_upstream.py --port 8900` (README, "Try it"). The server is
tests/helpers/fake_upstream.py; this is its command line."""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo

from tests.helpers.fake_replies import MODES, SHAPES
from tests.helpers.fake_upstream import FakeUpstream


def main(argv: list[str] | None = None) -> None:
    """Serve until Ctrl-C so the gateway can be tried without provider accounts."""
    parser = argparse.ArgumentParser(description="Fake OpenAI-compatible LLM providers")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8900)
    parser.add_argument("--api-key", default="sk-fake-upstream")
    args = parser.parse_args(argv)
    fake = FakeUpstream(args.host, args.port, args.api_key).start()
    bases = ", ".join(fake.base_url(shape) for shape in SHAPES)
    print(f"Fake upstream at {fake.url} (key {fake.api_key}): base URLs {bases}")
    print(f"Replace 'ok' in a URL with one of: {', '.join(sorted(MODES))}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()


if __name__ == "__main__":
    main()
