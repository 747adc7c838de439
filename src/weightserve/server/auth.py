"""Who may call what: the token check on every call, and the audit line of every action.

With `--auth-tokens`, every call but a health check carries `authorization: Bearer
TOKEN`. The interceptor finds the token (UNAUTHENTICATED when it is missing or unknown),
checks the method's scope (PERMISSION_DENIED for a Prefetch without `cache`, a Rebalance
without `control`) and the request's model, wherever the request names it
(server/request_models.py), against the token's globs (PERMISSION_DENIED, whether or not
the model exists, so a refusal names nothing the caller may not see). The
caller's token is then the call's `current_caller()`: ListModels shows only its models,
GetRebalance only its jobs, and the stream gate applies its limits.

Without tokens every caller is ANONYMOUS, which may do everything; the audit trail still
records each control and cache action. An audit line says who (the token's name, never
the token), what, on which model, and how it ended; refusals are audit lines too.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from weightserve.errors import InvalidRequestError, PermissionDeniedError, UnauthenticatedError
from weightserve.recording import Recorder
from weightserve.server.call_context import current_call
from weightserve.server.log_text import escape_text, field
from weightserve.server.request_models import UncheckedRequestError, model_of
from weightserve.server.status_codes import abort_with
from weightserve.server.tokens import ANONYMOUS, UNKNOWN, Token, TokenFile
from weightserve.server.watch_guard import WATCH_METHODS, while_allowed

logger = logging.getLogger(__name__)
audit_log = logging.getLogger("weightserve.audit")

OPEN_SERVICES = frozenset({"grpc.health.v1.Health"})
"""Answered without a token: probes cannot hold one."""

METHOD_SCOPES = {
    "weightserve.v1.WeightService/Prefetch": "cache",
    "weightserve.v1.WeightService/Evict": "cache",
    "weightserve.v1.ControlService/ReportExpertLoad": "control",
    "weightserve.v1.ControlService/Rebalance": "control",
    "weightserve.v1.ControlService/GetRebalance": "control",
    "weightserve.v1.ControlService/WatchExpertMapping": "control",
    "weightserve.v1.VersionService/StartPublish": "publish",
    "weightserve.v1.VersionService/PublishVersion": "publish",
    "weightserve.v1.VersionService/GetPublish": "publish",
    "weightserve.v1.ReplicaService/FillReplica": "replica",
}
"""The scope a method needs beyond reading its model; methods not listed need none."""

_CALLER: contextvars.ContextVar[Token] = contextvars.ContextVar("weightserve_caller", default=ANONYMOUS)


def current_caller() -> Token:
    """The token of the call this task serves (ANONYMOUS when the server checks none)."""
    return _CALLER.get()


def bearer(metadata: Any) -> str | None:
    """The token in `authorization: Bearer TOKEN` metadata, or None."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


def audit(caller: Token, method: str, model: str, outcome: str, details: str = "") -> None:
    """One audit line: who did what to which model, and how it ended.

    The caller's values (the model, an error quoting what it sent) are escaped, so no
    request can end the line and write a forged one into the audit trail.
    """
    audit_log.info(
        "token=%s action=%s model=%s outcome=%s%s",
        field(caller.name),
        field(method),
        field(model) if model else "-",
        outcome,
        f" ({escape_text(details[:200])})" if details else "",
        extra={"token": caller.name, "action": method, "model": model, "outcome": outcome, "details": details[:200]},
    )


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks tokens and scopes (when the server has a token file) and audits actions.

    Install it after the observing interceptor, so that refusals are counted and logged
    like any other call.
    """

    def __init__(self, tokens: TokenFile | None, recorder: Recorder) -> None:
        self.tokens = tokens
        self.recorder = recorder

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        full = handler_call_details.method.lstrip("/")
        service, _, method = full.rpartition("/")
        if handler is None or service in OPEN_SERVICES:
            return handler
        check = _Check(self, method, METHOD_SCOPES.get(full, ""))
        check.authenticate(handler_call_details.invocation_metadata)
        if handler.request_streaming and handler.stream_unary is not None:  # an upload: the servicer checks its model
            return grpc.stream_unary_rpc_method_handler(
                check.wrap_streamed(handler.stream_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.request_streaming:  # reflection's bidi stream: a token is all it needs
            return handler if check.refusal is None else _refusing_stream_stream(handler, check)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                check.wrap(handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        behavior = handler.unary_stream
        if behavior is None:  # a stream-unary handler: none in this server
            return handler
        wrapped = check.wrap_generator(behavior) if inspect.isasyncgenfunction(behavior) else check.wrap(behavior)
        return grpc.unary_stream_rpc_method_handler(
            wrapped, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )

    def refused(self, reason: str, caller: Token, method: str, model: str, error: Exception) -> None:
        """Count and audit a refusal."""
        self.recorder.auth_refused(reason)
        outcome = "UNAUTHENTICATED" if isinstance(error, UnauthenticatedError) else "PERMISSION_DENIED"
        audit(caller, method, model, outcome, str(error))


class _Check:
    """One call's checks: the token from its metadata, then the model once its request is read."""

    def __init__(self, owner: AuthInterceptor, method: str, scope: str) -> None:
        self.owner, self.method, self.scope = owner, method, scope
        self.caller = ANONYMOUS
        self.refusal: Exception | None = None
        self.digest = ""
        self.model = ""
        self.audited = False

    def authenticate(self, metadata: Any) -> None:
        tokens = self.owner.tokens
        if tokens is None:
            return
        secret = bearer(metadata)
        token = None if secret is None else tokens.lookup(secret)
        if token is None:
            self.caller = UNKNOWN
            reason = "missing_token" if secret is None else "unknown_token"
            message = "unknown token" if secret else "this server needs a token: send 'authorization: Bearer TOKEN'"
            self.refusal = UnauthenticatedError(message)
            self.owner.refused(reason, UNKNOWN, self.method, "", self.refusal)
            return
        self.caller, self.digest = token, token.sha256
        if not token.may(self.scope):
            self.refusal = PermissionDeniedError(
                f"token {token.name!r} may not call {self.method} (it needs {self.scope} = true)"
            )
            self.owner.refused("scope", token, self.method, "", self.refusal)

    async def admit(self, request: Any, context: Any) -> None:
        """Make the token the call's caller, or end the call with the refusal."""
        current_call().caller = self.caller.name
        if self.refusal is None and request is not None and self.owner.tokens is not None:
            self.check_model(request)
        if self.refusal is not None:
            await abort_with(context, self.refusal)
        _CALLER.set(self.caller)

    def check_model(self, request: Any) -> None:
        """Refuse a request whose model (in whatever field: request_models.MODEL_OF) the token does not cover.

        A malformed name is refused here too (INVALID_ARGUMENT, as the servicer would), so
        no name the check could not read ever reaches a servicer unchecked.
        """
        try:
            model = model_of(request)
        except InvalidRequestError as e:
            self.refusal = e
            if self.scope:
                audit(self.caller, self.method, "", "INVALID_ARGUMENT", str(e))
            return
        except UncheckedRequestError as e:
            logger.error("refusing %s: %s", self.method, e)
            model, self.refusal = "", PermissionDeniedError(f"{self.method} cannot be checked against token scopes")
        else:
            self.model = model
            if not model or self.caller.may_read(model):
                return
            self.refusal = PermissionDeniedError(f"token {self.caller.name!r} does not cover model {model!r}")
        self.owner.refused("model", self.caller, self.method, model, self.refusal)

    def withdrawn(self) -> Exception | None:
        """Why this call's token no longer admits it (revoked, or its scope or models narrowed), or None."""
        tokens = self.owner.tokens
        if tokens is None:
            return None
        token = tokens.find(self.digest)
        if token is None:
            return UnauthenticatedError(f"token {self.caller.name!r} was revoked while this call streamed")
        if not token.may(self.scope) or (self.model and not token.may_read(self.model)):
            return PermissionDeniedError(f"token {token.name!r} no longer covers this call")
        return None

    async def end_withdrawn(self, error: Exception, context: Any) -> None:
        """Count, audit and end a stream whose token was withdrawn while it ran."""
        reason = "unknown_token" if isinstance(error, UnauthenticatedError) else "model"
        self.owner.refused(reason, self.caller, self.method, self.model, error)
        self.audited = True
        await abort_with(context, error)

    def audit_end(self, outcome: str | None) -> None:
        """The audit line of a scoped action (Prefetch, Evict, the control calls)."""
        if self.scope and not self.audited:
            record = current_call()
            audit(self.caller, self.method, record.model, outcome or record.code, record.details)

    def wrap(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def checked(request: Any, context: Any) -> Any:
            await self.admit(request, context)
            outcome: str | None = "UNKNOWN"
            try:
                result = await behavior(request, context)
                outcome = None
                return result
            except grpc.aio.AbortError:
                outcome = None  # the record has the code
                raise
            except asyncio.CancelledError:
                outcome = "CANCELLED"
                raise
            finally:
                self.audit_end(outcome)

        return checked

    def wrap_streamed(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        """A client-streaming call: the token and scope checked first, the model by the servicer."""

        async def checked(request_iterator: Any, context: Any) -> Any:
            await self.admit(None, context)
            outcome: str | None = "UNKNOWN"
            try:
                result = await behavior(request_iterator, context)
                outcome = None
                return result
            except grpc.aio.AbortError:
                outcome = None
                raise
            except asyncio.CancelledError:
                outcome = "CANCELLED"
                raise
            finally:
                self.audit_end(outcome)

        return checked

    def wrap_generator(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def checked(request: Any, context: Any) -> AsyncIterator[Any]:
            await self.admit(request, context)
            outcome: str | None = "UNKNOWN"
            stream = behavior(request, context)
            if self.method in WATCH_METHODS and self.owner.tokens is not None:
                stream = while_allowed(stream, self.withdrawn)
            try:
                async with contextlib.aclosing(stream):
                    try:
                        async for message in stream:
                            yield message
                    except (UnauthenticatedError, PermissionDeniedError) as e:  # only while_allowed raises these
                        await self.end_withdrawn(e, context)
                outcome = None
            except grpc.aio.AbortError:
                outcome = None
                raise
            except (asyncio.CancelledError, GeneratorExit):
                outcome = "CANCELLED"
                raise
            finally:
                self.audit_end(outcome)

        return checked


def _refusing_stream_stream(handler: grpc.RpcMethodHandler, check: _Check) -> grpc.RpcMethodHandler:
    async def refuse(request_iterator: Any, context: Any) -> None:
        await check.admit(None, context)

    return grpc.stream_stream_rpc_method_handler(
        refuse, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )
