"""Error mapping for every servicer, in one place."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from server.errors import ServiceError, internal_error

log = logging.getLogger(__name__)

R = TypeVar("R")


def unary_errors(method: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """Turn a ServiceError into the call's status (with trailing metadata); log anything unexpected."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            return await method(self, request, context)
        except ServiceError as exc:
            await context.abort(exc.code, exc.message, trailing_metadata=exc.trailing_metadata())
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            log.exception("unexpected error in %s", method.__name__)
            error = _unexpected(exc)
            await context.abort(error.code, error.message)
        raise AssertionError("unreachable: context.abort raises")

    return wrapper


def as_service_error(exc: BaseException) -> ServiceError:
    if isinstance(exc, ServiceError):
        return exc
    log.error("unexpected error in a stream", exc_info=exc)
    return _unexpected(exc)


def _unexpected(exc: BaseException) -> ServiceError:
    return internal_error(f"{type(exc).__name__}: {exc}")
