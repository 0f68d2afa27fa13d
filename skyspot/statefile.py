"""Training state as safetensors files: written in one pass, read in one pass, no pickle.

Guarantee: ``Layout(state)`` + ``write_to`` produce a valid safetensors file (loadable with
``safetensors.torch.load_file``) holding every tensor of ``state`` byte for byte, and the
rest of ``state`` (dicts, lists, tuples, ints, floats, strings, bools, None, bytes, numpy
arrays) as JSON in the header's metadata. ``read_state`` rebuilds ``state`` from the file's
bytes: tensors bit-identical with the same dtype and shape, tuples as tuples, int keys as
ints, floats exactly (JSON keeps repr, nan and inf included). A value of any other type is
refused with a TypeError that names it, before anything is written.

Why this and not ``torch.save`` or ``safetensors.torch.save``:

- Each byte goes to the file once, straight from the tensor's memory: ``safetensors.torch
  .save`` first builds the whole file as one ``bytes`` (a second copy of the state), and
  ``torch.save`` adds a CRC32 of every record on top of the checksum the checkpoint
  manifest already takes. The caller hashes the bytes as they are written (``sink``).
- ``read_state`` deserializes from the buffer the caller read and hashed: tensors are views
  of it (``torch.frombuffer``), so a resume reads every byte once.
- Tensors that share memory (tied embeddings) are written once; the copy in ``state``
  becomes a second reference to the same data.
- Tensors are laid out by item size, largest first, after an 8-byte-aligned header, so
  every tensor is aligned to its item size and can be viewed in place.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

SKELETON_KEY = "skyspot.state"  # the metadata entry holding the non-tensor structure, as JSON
_CHUNK = 8 << 20  # bytes per write: large enough for throughput, small enough to stop early

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_BY_NAME = {name: dtype for dtype, name in _DTYPES.items()}


class StateFileError(ValueError):
    """A file is not a safetensors file this module can read; the message says why."""


@dataclass
class Layout:
    """Where each tensor of one state goes in its file; built on the training thread.

    ``tensors`` are the live tensors (not copied), ``header`` the complete header bytes.
    Building it walks the state once and encodes the small non-tensor part: after that,
    only the tensors' memory is needed to write the file.
    """

    names: list[str]
    tensors: list[torch.Tensor]
    header: bytes

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(tensor) for tensor in self.tensors)

    @property
    def size(self) -> int:  # of the whole file
        return len(self.header) + self.nbytes

    @classmethod
    def of(cls, state: Any) -> Layout:
        names: list[str] = []
        tensors: list[torch.Tensor] = []
        seen: dict[tuple, str] = {}

        def name_for(tensor: torch.Tensor, path: str) -> str:
            key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride(),
                   tensor.device)
            if tensor.numel() and key in seen:  # shared memory: write once
                return seen[key]
            if tensor.dtype not in _DTYPES:
                raise TypeError(f"{path or 'state'}: tensors of dtype {tensor.dtype} can't be "
                                f"stored (supported: {', '.join(map(str, _DTYPES))})")
            name = path or "tensor"
            while name in names_set:
                name += "'"
            names_set.add(name)
            names.append(name)
            tensors.append(tensor.detach())
            if tensor.numel():
                seen[key] = name
            return name

        names_set: set[str] = set()
        flat = isinstance(state, dict) and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
        skeleton = _encode(state, "", name_for)
        flat = flat and len(names) == len(state)  # shared tensors need the skeleton's aliases
        # Largest item size first: every tensor's offset is then a multiple of its item size.
        order = sorted(range(len(tensors)), key=lambda i: -tensors[i].element_size())
        names, tensors = [names[i] for i in order], [tensors[i] for i in order]
        entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        if not flat:  # a plain state dict loads as itself; anything else needs its skeleton
            entries["__metadata__"][SKELETON_KEY] = json.dumps(skeleton, separators=(",", ":"))
        offset = 0
        for name, tensor in zip(names, tensors, strict=True):
            entries[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape),
                             "data_offsets": [offset, offset + _nbytes(tensor)]}
            offset += _nbytes(tensor)
        text = json.dumps(entries, separators=(",", ":")).encode()
        text += b" " * (-(8 + len(text)) % 8)  # data starts 8-byte aligned, as safetensors pads
        return cls(names, tensors, struct.pack("<Q", len(text)) + text)

    def write_to(self, sink: Callable[[memoryview], None],
                 tensors: list[torch.Tensor] | None = None) -> int:
        """Hand the file's bytes to ``sink`` in order, in chunks of at most 8 MiB; returns
        the byte count. ``tensors`` (same shapes and dtypes, e.g. a snapshot) replace the
        live ones. Tensors on a GPU must be copied to the host first."""
        sink(memoryview(self.header))
        for tensor in tensors if tensors is not None else self.tensors:
            view = host_bytes(tensor)
            for start in range(0, len(view), _CHUNK):
                sink(view[start:start + _CHUNK])
        return self.size


def host_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor, in row-major order, without a copy when it is contiguous."""
    if tensor.device.type != "cpu":
        raise ValueError(f"a {tensor.device} tensor has no host bytes; copy it to the CPU first")
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _encode(value: Any, path: str, tensor_name: Callable[[torch.Tensor, str], str]) -> Any:
    """JSON-able skeleton of ``value``; tensors become {"$t": name}."""
    def sub(key: Any) -> str:
        return f"{path}.{key}" if path else str(key)

    if isinstance(value, torch.Tensor):
        return {"$t": tensor_name(value, path)}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _encode(v, sub(k), tensor_name) for k, v in value.items()}
        return {"$dict": [[_encode(k, "", _no_tensor_keys), _encode(v, sub(k), tensor_name)]
                          for k, v in value.items()]}
    if isinstance(value, list):
        return [_encode(v, sub(i), tensor_name) for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, sub(i), tensor_name) for i, v in enumerate(value)]}
    if isinstance(value, bytes | bytearray):
        return {"$bytes": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return {"$nd": [value.dtype.str, list(value.shape),
                        base64.b64encode(np.ascontiguousarray(value).tobytes()).decode()]}
    if isinstance(value, np.bool_ | np.integer | np.floating):
        return value.item()
    raise TypeError(f"{path or 'state'}: a {type(value).__name__} can't be stored in a "
                    "checkpoint (tensors, numbers, strings, lists, tuples, dicts, numpy "
                    "arrays can)")


def _no_tensor_keys(tensor: torch.Tensor, path: str) -> str:
    raise TypeError(f"{path or 'state'}: a tensor as a dict key can't be stored")


def read_state(data: bytearray | memoryview | np.ndarray, what: str = "file") -> Any:
    """The state held by safetensors ``data``; tensors are views of ``data`` (keep it
    writable: a bytearray or a numpy array). ``what`` names the file in errors."""
    view = memoryview(data)
    if len(view) < 8:
        raise StateFileError(f"{what}: {len(view)} bytes, too short for a safetensors file")
    (length,) = struct.unpack("<Q", view[:8])
    if length > len(view) - 8:
        raise StateFileError(f"{what}: header of {length} bytes runs past the end of the file")
    try:
        header = json.loads(bytes(view[8:8 + length]))
    except (UnicodeDecodeError, ValueError) as err:
        raise StateFileError(f"{what}: header is not JSON ({err})") from err
    if not isinstance(header, dict):
        raise StateFileError(f"{what}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    start, body = 8 + length, len(view) - 8 - length
    tensors: dict[str, torch.Tensor] = {}
    for name, entry in header.items():
        try:
            dtype = _BY_NAME[entry["dtype"]]
            shape = [int(n) for n in entry["shape"]]
            begin, end = (int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise StateFileError(f"{what}: tensor {name!r} has a malformed entry ({err!r})") \
                from err
        numel = int(np.prod(shape)) if shape else 1
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not 0 <= begin <= end <= body or end - begin != numel * itemsize:
            raise StateFileError(f"{what}: tensor {name!r} has offsets {begin}..{end} that do "
                                 f"not fit its shape {shape} or the file's {body} data bytes")
        if numel == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        elif (start + begin) % itemsize == 0 and not view.readonly:
            tensors[name] = torch.frombuffer(data, dtype=dtype, count=numel,
                                             offset=start + begin).reshape(shape)
        else:  # unaligned (written elsewhere) or read-only: copy this one tensor
            chunk = bytearray(view[start + begin:start + end])
            tensors[name] = torch.frombuffer(chunk, dtype=dtype, count=numel).reshape(shape)
    if SKELETON_KEY not in metadata:
        return tensors  # a plain state dict
    try:
        return _decode(json.loads(metadata[SKELETON_KEY]), tensors)
    except (KeyError, TypeError, ValueError) as err:
        raise StateFileError(f"{what}: its state skeleton does not match its tensors "
                             f"({err!r})") from err


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (tag, body), = value.items()
        if tag == "$t":
            return tensors[body]
        if tag == "$tuple":
            return tuple(_decode(v, tensors) for v in body)
        if tag == "$dict":
            return {_decode(k, tensors): _decode(v, tensors) for k, v in body}
        if tag == "$bytes":
            return base64.b64decode(body)
        if tag == "$nd":
            dtype, shape, raw = body
            return np.frombuffer(base64.b64decode(raw), dtype=np.dtype(dtype)).reshape(
                shape).copy()
    return {k: _decode(v, tensors) for k, v in value.items()}
