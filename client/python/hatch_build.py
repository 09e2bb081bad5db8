"""Build hook: generates the protobuf and gRPC modules from the schema.

`handoff.v1` (`proto/handoff/v1/handoff.proto`) becomes `handoff.v1.handoff_pb2`
and `handoff.demo.v1` becomes `handoff.demo.v1.demo_pb2`, inside the `handoff`
package, so the imports protoc writes (`from handoff.v1 import handoff_pb2`)
resolve. Each module gets a `.pyi` stub from mypy-protobuf. The files are
ignored by git and shipped in the wheel: users never run protoc.
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

PROTOS = [
    "handoff/v1/handoff.proto",
    "handoff/demo/v1/demo.proto",
    "handoff/langgraph/v1/langgraph.proto",
]


def proto_root(root: Path) -> Path:
    """The directory holding `handoff/v1/handoff.proto`: the repository's
    `proto/` from a checkout, or the copy an sdist carries."""
    for candidate in (root / "proto", root.parent.parent / "proto"):
        if (candidate / PROTOS[0]).is_file():
            return candidate
    raise RuntimeError(f"no proto/{PROTOS[0]} next to {root} or two levels up")


def plugin(directory: Path, name: str, entry: str) -> Path:
    """A protoc plugin executable that runs mypy-protobuf's `entry` with this
    interpreter (its console script may not be on PATH in a build env)."""
    path = directory / name
    path.write_text(f"#!{sys.executable}\nfrom mypy_protobuf.main import {entry}\n{entry}()\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def generate(root: Path) -> None:
    """Runs protoc (from grpcio-tools) over the schema into `src/`."""
    import grpc_tools
    from grpc_tools import protoc

    protos = proto_root(root)
    out = root / "src"
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        mypy = plugin(Path(tmp), "protoc-gen-mypy", "main")
        mypy_grpc = plugin(Path(tmp), "protoc-gen-mypy_grpc", "grpc")
        args = [
            "protoc",
            f"-I{protos}",
            f"-I{well_known}",
            f"--plugin=protoc-gen-mypy={mypy}",
            f"--plugin=protoc-gen-mypy_grpc={mypy_grpc}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--mypy_out={out}",
            f"--mypy_grpc_out={out}",
            *(str(protos / p) for p in PROTOS),
        ]
        code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed ({code}): {' '.join(args)}")
    generate_reasons(protos, out)


def generate_reasons(protos: Path, out: Path) -> None:
    """`handoff.v1.reasons`: the table of what a caller does about each
    refusal's reason, from `handoff/v1/reasons.txt` (shared with the broker
    and the Rust SDK)."""
    rows = [
        line.split()[:2]
        for line in (protos / "handoff/v1/reasons.txt").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    body = "".join(f'    "{reason}": "{disposition}",\n' for reason, disposition in rows)
    (out / "handoff/v1/reasons.py").write_text(
        '"""Generated from proto/handoff/v1/reasons.txt: what a caller does about\n'
        'each refusal\'s reason (retryable, conflict, terminal, superseded)."""\n\n'
        f"DISPOSITIONS: dict[str, str] = {{\n{body}}}\n"
    )


class CustomBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    """Generates the stubs before the wheel (or the editable install) is built."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        """Called by hatchling before it collects the files."""
        if os.environ.get("HANDOFF_SKIP_PROTOC") == "1":
            return
        generate(Path(self.root))


if __name__ == "__main__":
    generate(Path(__file__).parent)
