"""Triton's generated messages and stubs, as this process can hold them.

The server's own copy (`lstm_stream.triton`) and tritonclient's (`tritonclient.grpc.service_pb2`) both declare the
protobuf package `inference` with the same wire format, and only one of them fits in protobuf's default
descriptor pool: importing the second fails. So the one already loaded is used; `prefer` says which to import
when neither is.
"""

from __future__ import annotations

import sys
from types import ModuleType


def triton_modules(prefer: str = "lstm_stream") -> tuple[ModuleType, ModuleType]:
    """(messages, stubs): the copy this process loaded, else `prefer`'s ("lstm_stream" or "tritonclient")."""
    if "lstm_stream.triton.grpc_service_pb2" in sys.modules:
        use_own = True
    elif "tritonclient.grpc.service_pb2" in sys.modules:
        use_own = False
    else:
        use_own = prefer != "tritonclient"
    if use_own:
        from lstm_stream.triton import grpc_service_pb2 as messages
        from lstm_stream.triton import grpc_service_pb2_grpc as stubs
    else:
        from tritonclient.grpc import service_pb2 as messages
        from tritonclient.grpc import service_pb2_grpc as stubs
    return messages, stubs
