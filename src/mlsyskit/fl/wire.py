"""What goes over the wire between the FL server and its clients: a generic bytes service.

No .proto file and no pickle: every gRPC message is raw bytes. A call's first message is a
JSON header; a model follows as a safetensors blob (one float32 tensor named ``w``) cut into
chunks of at most CHUNK bytes, so a model of any size streams under gRPC's message limit.
Authentication rides in the call metadata: ``x-client-id`` and ``x-token``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

SERVICE = "mlsyskit.fl.Federation"
JOIN = f"/{SERVICE}/Join"  # unary: header -> header with the run's config
GET_TASK = f"/{SERVICE}/GetTask"  # unary -> stream: header, then the global model's chunks
SUBMIT = f"/{SERVICE}/Submit"  # stream -> unary: header, then the client model's chunks
CHUNK = 1 << 20
MAX_MESSAGE = 4 << 20  # each message stays below gRPC's default limit
TENSOR = "w"


def header(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode()


def parse_header(data: bytes) -> dict[str, Any]:
    """The JSON header of a call; ValueError if it is not a JSON object."""
    obj = json.loads(data.decode())
    if not isinstance(obj, dict):
        raise ValueError("header is not a JSON object")
    return obj


def encode_model(flat: Any) -> bytes:
    """A flat float32 torch vector as safetensors bytes."""
    from safetensors.torch import save

    return save({TENSOR: flat.detach().contiguous()})


def decode_model(blob: bytes, num_params: int) -> Any:
    """The flat float32 vector of a safetensors blob; ValueError saying what is wrong."""
    import torch
    from safetensors.torch import load

    try:
        tensors = load(blob)
    except Exception as e:  # noqa: BLE001 - any parse failure is a malformed update
        raise ValueError(f"not a safetensors blob ({type(e).__name__})") from None
    if set(tensors) != {TENSOR}:
        raise ValueError(f"expected one tensor {TENSOR!r}, got {sorted(tensors)[:5]}")
    w = tensors[TENSOR]
    if w.dtype != torch.float32:
        raise ValueError(f"dtype {w.dtype}, expected float32")
    if tuple(w.shape) != (num_params,):
        raise ValueError(f"wrong shape {tuple(w.shape)}, expected ({num_params},)")
    return w


CODES, SCALES = "q", "s"


def encode_update(w: Any, global_w: Any, compress: str | None) -> bytes:
    """What a client sends for its model `w`: the model itself, or (``int8``) its update from
    `global_w` as int8 codes and bfloat16 block scales (`mlsyskit.fl.compress`)."""
    if compress is None:
        return encode_model(w)
    from safetensors.torch import save

    from mlsyskit.fl.compress import quantize_update

    codes, scales = quantize_update(w - global_w)
    return save({CODES: codes, SCALES: scales.bfloat16()})


def decode_update(blob: bytes, num_params: int, global_w: Any, compress: str | None) -> Any:
    """A client's float32 model from what it sent; ValueError saying what is wrong."""
    if compress is None:
        return decode_model(blob, num_params)
    import torch
    from safetensors.torch import load

    from mlsyskit.fl.compress import BLOCK, dequantize_update

    try:
        tensors = load(blob)
    except Exception as e:  # noqa: BLE001 - any parse failure is a malformed update
        raise ValueError(f"not a safetensors blob ({type(e).__name__})") from None
    codes, scales = tensors.get(CODES), tensors.get(SCALES)
    if codes is None or scales is None or len(tensors) != 2:
        raise ValueError(f"expected tensors {CODES!r} and {SCALES!r} (an int8 update), got {sorted(tensors)[:5]}")
    blocks = -(-num_params // BLOCK)
    if codes.dtype != torch.int8 or tuple(codes.shape) != (num_params,) or scales.dtype != torch.bfloat16 or tuple(scales.shape) != (blocks,):
        raise ValueError(f"wrong shape: int8 update {tuple(codes.shape)} with scales {tuple(scales.shape)}, expected ({num_params},) and ({blocks},)")
    return global_w + dequantize_update(codes, scales)


MASKED = "m"


def encode_masked(values: Any) -> bytes:
    """A --secagg client's masked uint32 vector (numpy), sent as int32 bits."""
    import torch
    from safetensors.torch import save

    return save({MASKED: torch.from_numpy(values.view("int32").copy())})


def decode_masked(blob: bytes, num_params: int) -> Any:
    """The masked uint32 numpy vector of a blob; ValueError saying what is wrong."""
    import torch
    from safetensors.torch import load

    try:
        tensors = load(blob)
    except Exception as e:  # noqa: BLE001 - any parse failure is a malformed update
        raise ValueError(f"not a safetensors blob ({type(e).__name__})") from None
    m = tensors.get(MASKED)
    if m is None or len(tensors) != 1:
        raise ValueError(f"expected one tensor {MASKED!r} (a masked update), got {sorted(tensors)[:5]}")
    if m.dtype != torch.int32 or tuple(m.shape) != (num_params,):
        raise ValueError(f"masked update of dtype {m.dtype} and shape {tuple(m.shape)}, expected int32 ({num_params},)")
    return m.numpy().view("uint32")


def chunks(blob: bytes) -> Iterator[bytes]:
    for i in range(0, len(blob), CHUNK):
        yield blob[i : i + CHUNK]


def stream(head: dict[str, Any], blob: bytes) -> Iterable[bytes]:
    """The messages of one streamed call: the header, then the blob in chunks."""
    return [header(head), *chunks(blob)]
