"""The model services over gRPC: clients that take and return the backends' domain dataclasses
and turn gRPC statuses into the domain's errors."""

from __future__ import annotations

import grpc

from specserve import codec
from specserve.contracts import PrefillOutput, ProposeOutput, VerifyOutput, WorkerInfo
from specserve.errors import DeadlineExceeded, InvalidArgument, Unavailable
from specserve.v1 import common_pb2, drafter_pb2_grpc, verifier_pb2, verifier_pb2_grpc


def _translate(exc: grpc.aio.AioRpcError, service: str) -> Exception:
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field, _, message = details.partition(":")
        return InvalidArgument(field or service, message.strip() or "invalid")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"{service} did not answer in time")
    return Unavailable(f"{service} is unavailable ({code.name}: {details})")


class _GrpcClient:
    service = ""

    def __init__(self, channel: grpc.aio.Channel, stub):
        self.channel, self.stub = channel, stub

    async def _call(self, method: str, request, timeout: float | None):
        try:
            return await getattr(self.stub, method)(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc, self.service) from None

    async def info(self, timeout=None) -> WorkerInfo:
        return codec.info_from_pb(await self._call("Info", common_pb2.InfoRequest(), timeout))

    async def release(self, session_ids, timeout=None, owner="") -> int:
        request = common_pb2.ReleaseRequest(session_ids=session_ids, owner=owner)
        return (await self._call("Release", request, timeout)).released


class GrpcVerifier(_GrpcClient):
    service = "verifier"

    def __init__(self, channel: grpc.aio.Channel):
        super().__init__(channel, verifier_pb2_grpc.VerifierStub(channel))

    async def prefill(self, items, timeout=None) -> PrefillOutput:
        return codec.prefill_output_from_pb(await self._call("Prefill", codec.prefill_request_to_pb(items), timeout))

    async def verify(self, items, prefills=(), timeout=None) -> VerifyOutput:
        return codec.verify_output_from_pb(
            await self._call("Verify", codec.verify_request_to_pb(items, prefills), timeout))

    async def end_burst(self, timeout=None) -> None:
        await self._call("EndBurst", verifier_pb2.EndBurstRequest(), timeout)


class GrpcDrafter(_GrpcClient):
    service = "drafter"

    def __init__(self, channel: grpc.aio.Channel):
        super().__init__(channel, drafter_pb2_grpc.DrafterStub(channel))

    async def propose(self, items, timeout=None) -> ProposeOutput:
        return codec.propose_output_from_pb(await self._call("Propose", codec.propose_request_to_pb(items), timeout))


CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


def connect_verifier(address: str) -> GrpcVerifier:
    return GrpcVerifier(grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS))


def connect_drafter(address: str) -> GrpcDrafter:
    return GrpcDrafter(grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS))
