"""The two model services as the step loop sees them.

Two kinds implement these protocols with the same domain dataclasses: gRPC clients
(`gateway.backends.grpc`, what the gateway process runs) and in-process workers
(`gateway.backends.local`, for tests and the benchmark's one-process baseline), so the step loop
runs unchanged in one process or across services.
"""

from __future__ import annotations

from typing import Protocol

from specserve.contracts import (
    PrefillItem,
    PrefillOutput,
    ProposeItem,
    ProposeOutput,
    VerifyItem,
    VerifyOutput,
    WorkerInfo,
)


class DrafterBackend(Protocol):
    async def info(self, timeout: float | None = None) -> WorkerInfo: ...
    async def propose(self, items: list[ProposeItem], timeout: float | None = None) -> ProposeOutput: ...
    async def release(self, session_ids: list[str], timeout: float | None = None, owner: str = "") -> int:
        """Free sessions by id, and with `owner` every session named "<owner>/..."; how many were held."""


class VerifierBackend(Protocol):
    async def info(self, timeout: float | None = None) -> WorkerInfo: ...
    async def prefill(self, items: list[PrefillItem], timeout: float | None = None) -> PrefillOutput: ...
    async def verify(self, items: list[VerifyItem], prefills: list[PrefillItem] = (),
                     timeout: float | None = None) -> VerifyOutput:
        """One step: verify rows and prompt chunks in one forward (or a decode burst of several)."""
    async def end_burst(self, timeout: float | None = None) -> None:
        """End the decode burst under way after its current forward."""
    async def release(self, session_ids: list[str], timeout: float | None = None, owner: str = "") -> int: ...
