"""The README quickstarts and the adapters' examples, run as a new user
would, one after the other, against one fresh broker (its own nats-server):
each prints its result."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from .conftest import REPO, _stop, start_broker, start_nats

SNIPPET = re.compile(r"```python\n(import asyncio\nfrom handoff import .*?)```", re.S)


def quickstart(readme: Path) -> str:
    """The first Python snippet of `readme` that imports the SDK."""
    m = SNIPPET.search(readme.read_text())
    assert m, f"no quickstart in {readme}"
    return m.group(1)


def test_the_readme_quickstarts_run_one_after_the_other_on_one_broker() -> None:
    snippets = [
        quickstart(REPO / "README.md"),
        quickstart(REPO / "client" / "python" / "README.md"),
    ]
    with tempfile.TemporaryDirectory(prefix="handoff-py-quickstart-") as store:
        nats = start_nats(Path(store))
        try:
            broker = start_broker(nats.url)
            try:
                for code in snippets:
                    code = code.replace("127.0.0.1:7233", broker.addr)
                    done = subprocess.run(
                        [sys.executable, "-c", code],
                        capture_output=True,
                        text=True,
                        timeout=60,
                    )
                    assert done.returncode == 0, done.stderr
                    assert done.stdout.strip() == (
                        "RUN_STATUS_COMPLETED Summarise the report: page 1"
                    ), done.stdout
            finally:
                _stop(broker.proc)
        finally:
            _stop(nats.proc)


def test_the_adapter_examples_run_and_print_their_results() -> None:
    examples = REPO / "client" / "python" / "examples"
    with tempfile.TemporaryDirectory(prefix="handoff-py-examples-") as store:
        nats = start_nats(Path(store))
        try:
            broker = start_broker(nats.url)
            try:
                for name, expected in [
                    ("langgraph_agent.py", "result:"),
                    ("openai_agents_handoff.py", "broker run result: wrote"),
                ]:
                    done = subprocess.run(
                        [sys.executable, str(examples / name), broker.addr],
                        capture_output=True,
                        text=True,
                        timeout=60,
                        env={k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"},
                    )
                    assert done.returncode == 0, done.stderr
                    assert expected in done.stdout, done.stdout
            finally:
                _stop(broker.proc)
        finally:
            _stop(nats.proc)
