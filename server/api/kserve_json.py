"""KServe v2 over HTTP (JSON, and Triton's binary tensor extension) <-> the Triton protocol's protobuf messages.

The REST edge (server/api/rest.py) turns each HTTP request into the ModelInferRequest a gRPC client would
have sent and hands it to the Triton servicer's own methods, so the sequence rules, the validation and the
statistics exist once; this module is only the conversion, stateless, as server/api/triton_convert.py is
for protobuf <-> the server's types.

Request body (https://github.com/kserve/open-inference-protocol, Triton's binary data extension):

    [JSON header][binary tensor bytes...]     Inference-Header-Content-Length: length of the JSON header

- the header: {"id", "parameters": {...}, "inputs": [{"name", "datatype", "shape", "data" | "parameters":
  {"binary_data_size": n}}], "outputs": [{"name", "parameters": {"binary_data": bool}}]};
- a parameter's JSON type picks its protobuf field: bool -> bool_param, integer -> int64_param (uint64_param
  past int64), string -> string_param, other number -> double_param; so `"sequence_id": 42` and
  `"sequence_id": "sensor-7"` are Triton's integer and string ids, and "sequence_start": "true" (a string) is
  refused by the same check as over gRPC, naming the parameter;
- an input with `binary_data_size` takes its bytes from after the header, in input order (little-endian FP32).

Response: JSON, or with binary outputs (`binary_data_output` on the request, or `binary_data` on an output)
the JSON header, the raw bytes after it, and the header's length in `Inference-Header-Content-Length`.
Every refusal is a ServiceError INVALID_ARGUMENT naming the field, raised before anything is applied.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from lstm_stream.triton import grpc_service_pb2 as pb
from server.errors import invalid_argument

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_DATA_SIZE = "binary_data_size"
BINARY_DATA = "binary_data"
BINARY_DATA_OUTPUT = "binary_data_output"
_INT64_MAX = 2**63 - 1
_UINT64_MAX = 2**64 - 1


RepositoryRequest = TypeVar("RepositoryRequest", pb.RepositoryModelLoadRequest, pb.RepositoryModelUnloadRequest)


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A converted HTTP infer request: the protobuf message, and how its outputs go back."""

    message: pb.ModelInferRequest
    binary_output: bool  # `binary_data_output`: every output not named otherwise is sent as raw bytes
    binary_outputs: Mapping[str, bool]  # per requested output, its own `binary_data`


# --- request --------------------------------------------------------------------------------------

def _object(value: object, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid_argument(field, f"is {_kind(value)}; expected a JSON object")
    return value


def _kind(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(value), type(value).__name__)


def _set_parameter(parameter: pb.InferParameter | pb.ModelRepositoryParameter, value: object, field: str) -> None:
    # A repository request's parameter has no uint64_param or double_param: such values are refused there.
    has = parameter.DESCRIPTOR.fields_by_name
    if isinstance(value, bool):  # before int: a JSON true is a Python bool, which is an int too
        parameter.bool_param = value
    elif isinstance(value, int):
        if -_INT64_MAX - 1 <= value <= _INT64_MAX:
            parameter.int64_param = value
        elif _INT64_MAX < value <= _UINT64_MAX and "uint64_param" in has:
            parameter.uint64_param = value
        else:
            raise invalid_argument(field, f"is {value}; an integer parameter fits in 64 bits")
    elif isinstance(value, str):
        parameter.string_param = value
    elif isinstance(value, float) and "double_param" in has:
        parameter.double_param = value
    else:
        raise invalid_argument(field, f"is {_kind(value)}; expected a boolean, an integer or a string")


def _parameters(value: object, field: str, target: Any, *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Copy a JSON parameters object into a protobuf parameters map; returns the JSON object."""
    parameters = _object(value, field)
    for key, item in parameters.items():
        if key not in skip:
            _set_parameter(target[key], item, f"{field}.{key}")
    return parameters


def _shape(value: object, field: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise invalid_argument(field, f"is {_kind(value)}; expected an array of integers")
    if any(d < 0 or d > _INT64_MAX for d in value):
        raise invalid_argument(field, f"is {value}; dimensions are at least 0")
    return value


def _fp32_data(value: object, field: str) -> np.ndarray:
    """A JSON tensor (flat or nested, row-major) as float32 values; strings, booleans, null or ragged nesting
    are refused (numpy alone would read "1.5" as a number and null as NaN)."""
    if not isinstance(value, list):
        raise invalid_argument(field, f"is {_kind(value)}; expected an array of numbers")
    if not _all_numbers(value):
        raise invalid_argument(field, "must hold only numbers (no strings, booleans or null)")
    try:
        array = np.asarray(value, dtype=np.float64)
    except ValueError:
        raise invalid_argument(field, "nests arrays of unequal length; send it flat or as equal rows") from None
    with np.errstate(over="ignore"):  # past float32's range is infinite, which the servicer refuses by value
        return array.astype(np.float32).reshape(-1)


def _all_numbers(value: object) -> bool:
    if isinstance(value, list):
        return all(_all_numbers(item) for item in value)
    return isinstance(value, int | float) and not isinstance(value, bool)


def _document(body: bytes) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid_argument("body", f"is not valid JSON ({exc})") from None
    return _object(document, "body")


def parse_infer_request(body: bytes, header_length: str | None, model_name: str, model_version: str) -> InferRequest:
    """The ModelInferRequest an HTTP infer request stands for; INVALID_ARGUMENT naming the field otherwise."""
    header, binary = body, b""
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            raise invalid_argument(HEADER_LENGTH, f"is {header_length[:40]!r}; expected a byte count") from None
        if not 0 < length <= len(body):
            raise invalid_argument(HEADER_LENGTH, f"is {length}; the body has {len(body)} bytes")
        header, binary = body[:length], body[length:]
    document = _document(header)

    message = pb.ModelInferRequest(model_name=model_name, model_version=model_version)
    request_id = document.get("id", "")
    if not isinstance(request_id, str):
        raise invalid_argument("id", f"is {_kind(request_id)}; expected a string")
    message.id = request_id
    parameters = _parameters(document.get("parameters", {}), "parameters", message.parameters,
                             skip=(BINARY_DATA_OUTPUT,))
    binary_output = parameters.get(BINARY_DATA_OUTPUT, False)
    if not isinstance(binary_output, bool):
        raise invalid_argument(f"parameters.{BINARY_DATA_OUTPUT}", f"is {_kind(binary_output)}; expected a boolean")

    inputs = document.get("inputs")
    if not isinstance(inputs, list):
        raise invalid_argument("inputs", f"is {_kind(inputs)}; expected an array of tensors")
    position = 0  # into the binary section
    for index, item in enumerate(inputs):
        field = f"inputs[{index}]"
        tensor = _object(item, field)
        name, datatype = tensor.get("name"), tensor.get("datatype")
        for key, text in (("name", name), ("datatype", datatype)):
            if not isinstance(text, str):
                raise invalid_argument(f"{field}.{key}", f"is {_kind(text)}; expected a string")
        added = message.inputs.add(name=name, datatype=datatype, shape=_shape(tensor.get("shape"), f"{field}.shape"))
        tensor_parameters = _parameters(tensor.get("parameters", {}), f"{field}.parameters", added.parameters,
                                        skip=(BINARY_DATA_SIZE,))
        size = tensor_parameters.get(BINARY_DATA_SIZE)
        if size is not None:
            size_field = f"{field}.parameters.{BINARY_DATA_SIZE}"
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise invalid_argument(size_field, f"is {size!r}; expected a byte count")
            if "data" in tensor:
                raise invalid_argument(f"{field}.data", f"must be absent when {BINARY_DATA_SIZE} is given")
            if position + size > len(binary):
                raise invalid_argument(size_field, f"is {size}; only {len(binary) - position} bytes follow the "
                                       f"JSON header for it ({HEADER_LENGTH})")
            message.raw_input_contents.append(binary[position:position + size])
            position += size
        elif datatype == "FP32":
            added.contents.fp32_contents.extend(_fp32_data(tensor.get("data"), f"{field}.data"))
        # Another datatype carries no data here: the servicer refuses it by its datatype, naming the field.
    if position != len(binary):
        raise invalid_argument(HEADER_LENGTH, f"leaves {len(binary) - position} bytes after the JSON header that no "
                               f"input's {BINARY_DATA_SIZE} claims")
    if message.raw_input_contents and len(message.raw_input_contents) != len(message.inputs):
        raise invalid_argument("inputs", f"mix binary and JSON data; send every input one way ({BINARY_DATA_SIZE})")

    binary_outputs: dict[str, bool] = {}
    outputs = document.get("outputs", [])
    if not isinstance(outputs, list):
        raise invalid_argument("outputs", f"is {_kind(outputs)}; expected an array")
    for index, item in enumerate(outputs):
        field = f"outputs[{index}]"
        output = _object(item, field)
        name = output.get("name")
        if not isinstance(name, str):
            raise invalid_argument(f"{field}.name", f"is {_kind(name)}; expected a string")
        added = message.outputs.add(name=name)
        output_parameters = _parameters(output.get("parameters", {}), f"{field}.parameters", added.parameters,
                                        skip=(BINARY_DATA,))
        if BINARY_DATA in output_parameters:
            wanted = output_parameters[BINARY_DATA]
            if not isinstance(wanted, bool):
                raise invalid_argument(f"{field}.parameters.{BINARY_DATA}", f"is {_kind(wanted)}; expected a boolean")
            binary_outputs[name] = wanted
    return InferRequest(message, binary_output, binary_outputs)


# --- the repository extension: POST /v2/repository/index, .../models/{name}/load and .../unload ----

def parse_index_request(body: bytes) -> bool:
    """Whether the index asks for ready models only (`{"ready": true}`); an empty body asks for every one."""
    if not body.strip():
        return False
    ready = _document(body).get("ready", False)
    if not isinstance(ready, bool):
        raise invalid_argument("ready", f"is {_kind(ready)}; expected a boolean")
    return ready


def parse_repository_request(body: bytes, message: RepositoryRequest) -> RepositoryRequest:
    """`message` (a load or unload request, its model named) with the body's `parameters` (Triton's
    `{"parameters": {"version": 2}}`; an empty body has none), each by its JSON type as for infer."""
    if body.strip():
        _parameters(_document(body).get("parameters", {}), "parameters", message.parameters)
    return message


def repository_index_json(index: pb.RepositoryIndexResponse) -> list[dict[str, str]]:
    """Triton's HTTP index: an array of {name, version, state, reason}, without an empty reason."""
    return [{key: value for key, value in message_json(model).items() if value != "" or key != "reason"}
            for model in index.models]


# --- response -------------------------------------------------------------------------------------

def _parameter_value(parameter: pb.InferParameter) -> bool | int | float | str:
    kind = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, kind) if kind else ""


def infer_response_body(response: pb.ModelInferResponse, request: InferRequest) -> tuple[bytes, int | None]:
    """The HTTP body of an answer, and the JSON header's length when binary outputs follow it (else None)."""
    document: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        document["id"] = response.id
    if response.parameters:
        document["parameters"] = {key: _parameter_value(value) for key, value in response.parameters.items()}
    outputs, raw_parts = [], []
    for output, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": list(output.shape)}
        if request.binary_outputs.get(output.name, request.binary_output):
            entry["parameters"] = {BINARY_DATA_SIZE: len(raw)}
            raw_parts.append(raw)
        else:
            # float32 -> Python float is exact, and its repr reads back to the same float32.
            entry["data"] = np.frombuffer(raw, dtype="<f4").tolist()
        outputs.append(entry)
    document["outputs"] = outputs
    header = json.dumps(document, separators=(",", ":")).encode()
    if not raw_parts:
        return header, None
    return header + b"".join(raw_parts), len(header)


# --- metadata, configuration, statistics: protobuf -> the JSON Triton's HTTP API answers -------------

_WIDE_INTEGERS = (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
                  FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64)


def message_json(message: Message) -> dict[str, Any]:
    """A message as Triton's HTTP API writes it: proto field names, every field, 64-bit integers as numbers.

    proto3 JSON writes 64-bit integers as strings; Triton's HTTP answers (metadata shapes, config dims,
    statistics counts) are numbers, and tritonclient.http hands them to the caller as they come."""
    document = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)
    _numbers(message.DESCRIPTOR, document)
    return document


def _numbers(descriptor: Any, document: dict[str, Any]) -> None:
    for field in descriptor.fields:
        if field.name not in document:
            continue
        value = document[field.name]
        if field.message_type is not None:
            if field.message_type.GetOptions().map_entry:
                value_field = field.message_type.fields_by_name["value"]
                if value_field.message_type is not None:
                    for item in value.values():
                        _numbers(value_field.message_type, item)
                elif value_field.type in _WIDE_INTEGERS:
                    document[field.name] = {key: int(item) for key, item in value.items()}
            elif field.is_repeated:
                for item in value:
                    _numbers(field.message_type, item)
            else:
                _numbers(field.message_type, value)
        elif field.type in _WIDE_INTEGERS:
            document[field.name] = [int(item) for item in value] if isinstance(value, list) else int(value)
