"""Trainable states as Flower records, and what a message weighs (payload and framing, from the message itself)."""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from ...errors import TrainingError

JOB = "job"  # ConfigRecord holding one JSON string: what the message asks for
STATE = "state"  # ArrayRecord: a trainable state (``delta:…``, ``head:…``, ``hdelta:…`` keys)
GLOBAL = "global"  # ArrayRecord: the global adapter file's bytes (unlearning runs)
REPLY = "reply"  # ConfigRecord holding one JSON string: the node's answer


def state_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """An ArrayRecord of fp32 tensors, keys in sorted order (the wire never depends on dict order)."""
    rec = ArrayRecord()
    for k in sorted(state):
        rec[k] = Array(np.ascontiguousarray(state[k].detach().to(torch.float32).numpy()))
    return rec


def record_state(rec: ArrayRecord, expect: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    """Tensors back from an ArrayRecord; with ``expect`` (key -> shape) the keys and shapes must match.

    Raises: TrainingError naming the first key that does not.
    """
    out: dict[str, torch.Tensor] = {}
    for k in rec:
        arr = rec[k]
        if arr.dtype != "float32":
            raise TrainingError(f"state tensor {k!r} has dtype {arr.dtype}, expected float32")
        out[k] = torch.from_numpy(np.array(arr.numpy(), dtype=np.float32, copy=True))
    if expect is not None:
        if set(out) != set(expect):
            diff = sorted(set(out) ^ set(expect))
            raise TrainingError(f"state keys differ from this model's: {diff[:3]}")
        for k, shape in expect.items():
            if tuple(out[k].shape) != tuple(shape):
                raise TrainingError(f"state tensor {k!r} has shape {tuple(out[k].shape)}, expected {tuple(shape)}")
    return out


def bytes_record(data: bytes) -> ArrayRecord:
    """Raw bytes (an adapter file) as a one-array record of uint8."""
    rec = ArrayRecord()
    rec["bytes"] = Array("uint8", (len(data),), "numpy.ndarray", b"") if not data else \
        Array(np.frombuffer(data, dtype=np.uint8).copy())
    return rec


def record_bytes(rec: ArrayRecord) -> bytes:
    return bytes(rec["bytes"].numpy().astype(np.uint8).tobytes())


def json_record(doc: Mapping[str, Any]) -> ConfigRecord:
    return ConfigRecord({"json": json.dumps(doc, sort_keys=True, separators=(",", ":"))})


def record_json(content: RecordDict, key: str) -> dict[str, Any]:
    """The JSON document of ConfigRecord ``key`` (an empty dict when missing or not an object)."""
    if key not in content.config_records:
        return {}
    raw = content.config_records[key].get("json")
    try:
        doc = json.loads(raw) if isinstance(raw, str) else {}
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


@dataclass
class WireBytes:
    """Bytes of messages, counted from the messages themselves (the objects Flower transfers).

    ``payload``: tensor data (the values and adapter bytes the protocol needs); ``framing``: everything
    else Flower serialises around them (object headers, metadata, record and array descriptors, JSON).
    HTTP/TLS framing underneath is not included.
    """

    messages: int = 0
    payload: int = 0
    framing: int = 0

    def add(self, msg: Message) -> None:
        total = sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())
        payload = 0
        if msg.has_content():
            for rec in msg.content.array_records.values():
                # the values only: numel x item size (Flower's own array encoding around them is framing)
                payload += sum(int(np.prod(rec[k].shape, dtype=np.int64)) * np.dtype(rec[k].dtype).itemsize
                               for k in rec)
        self.messages += 1
        self.payload += payload
        self.framing += total - payload

    def to_json(self) -> dict[str, int]:
        return asdict(self)
