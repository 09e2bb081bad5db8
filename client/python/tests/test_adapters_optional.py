"""The adapters are optional: the core imports without their frameworks, and
an adapter imported without its framework names the extra to install."""

from __future__ import annotations

import subprocess
import sys

# Setting a module to None in sys.modules makes importing it fail, as when the
# package is not installed.
PROBE = """
import sys
for name in ("langgraph", "langchain_core", "agents", "openai"):
    sys.modules[name] = None
import handoff, handoff.adapters
assert handoff.Client is not None
for adapter, extra in (("langgraph", "handoff[langgraph]"),
                       ("openai_agents", "handoff[openai-agents]")):
    try:
        __import__("handoff.adapters." + adapter)
    except ImportError as e:
        assert extra in str(e), str(e)
    else:
        raise SystemExit(adapter + " imported without its framework")
print("ok")
"""


def test_the_core_imports_without_the_frameworks() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok"]
