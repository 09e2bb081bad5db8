"""The async context manager of everything that holds a stream or a
connection: `async with` closes it on the way out."""

from __future__ import annotations

from types import TracebackType
from typing import TypeVar

_C = TypeVar("_C", bound="Closing")


class Closing:
    """Closes itself (`close()`) when an `async with` block ends."""

    async def close(self) -> None:
        """Releases what it holds."""
        raise NotImplementedError

    async def __aenter__(self: _C) -> _C:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
