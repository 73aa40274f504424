"""The native API as JSON over HTTP <-> its protobuf messages (proto3 JSON, google.protobuf.json_format).

A body is the proto3 JSON of the gRPC request (`PredictRequest`, `ResetStreamRequest`); the stream id comes
from the path. Two conveniences for people with curl, both plain JSON of the same message once read:
- `values` may be an array of arrays, one per timestep ([[0.1], [0.2]]); `timesteps` is then their number
  (and must agree when also given);
- the body may be empty where every field has a default (`:reset`).
Answers are the proto3 JSON of the gRPC answer with the proto field names and every field written
(`"replayed": false` rather than nothing), 64-bit integers as strings, as proto3 JSON has them.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from server.errors import invalid_argument

M = TypeVar("M", bound=Message)


def _rows(values: list[Any], timesteps: object) -> tuple[list[Any], int]:
    """An array of arrays (one per timestep) as the flat row-major list PredictRequest holds, and its length."""
    width = len(values[0]) if isinstance(values[0], list) else 0
    for index, row in enumerate(values):
        if not isinstance(row, list):
            raise invalid_argument(f"values[{index}]", "is not an array; send every timestep as an array, or all "
                                   "values flat with `timesteps`")
        if len(row) != width:
            raise invalid_argument(f"values[{index}]", f"has {len(row)} values; values[0] has {width}")
    if timesteps not in (None, 0, len(values), str(len(values))):
        raise invalid_argument("timesteps", f"is {timesteps!r}; values has {len(values)} rows")
    return [value for row in values for value in row], len(values)


def parse_message(body: bytes, message_type: type[M], path_fields: dict[str, str]) -> M:
    """The message a JSON body stands for, with the fields the path names; INVALID_ARGUMENT naming the field."""
    document: Any = {}
    if body.strip():
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise invalid_argument("body", f"is not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise invalid_argument("body", f"is a JSON {type(document).__name__}; expected an object")
    for name, value in path_fields.items():
        given = document.get(name)
        if given not in (None, "", value):
            raise invalid_argument(name, f"is {str(given)[:300]!r} in the body but {value!r} in the path; send it "
                                   "once, in the path")
        document[name] = value
    values = document.get("values")
    if isinstance(values, list) and values and isinstance(values[0], list):
        document["values"], document["timesteps"] = _rows(values, document.get("timesteps"))
    message = message_type()
    try:
        json_format.ParseDict(document, message)
    except json_format.ParseError as exc:
        # Its message names the field: 'Failed to parse timesteps field: ...', 'Message type ... has no field ...'.
        raise invalid_argument("body", str(exc)) from None
    return message


def message_body(message: Message) -> bytes:
    return json_format.MessageToJson(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True, indent=None
    ).encode()
