"""``deploy verify`` checks undo records without torch (adapterhub.apply.deploy_folders.undo_doc): it must refuse
exactly what the tensor decoder (adapterhub.apply.disk.decode_undo) refuses, and read the same document."""
from __future__ import annotations

import random

import torch

from adapterhub.apply.deploy_folders import undo_doc
from adapterhub.apply.disk import decode_undo, encode_undo
from adapterhub.apply.patching import UndoEntry
from adapterhub.errors import DeploymentError


def _record() -> bytes:
    idx = torch.tensor([0, 3, 70000, 70001, 200000], dtype=torch.int64)  # two escaped gaps
    ents = [UndoEntry("a", idx, torch.randn(5), chunks=torch.tensor([0, 1]),
                      chunk_hashes=torch.zeros(2, 32, dtype=torch.uint8), patched=torch.randn(5)),
            UndoEntry("b", torch.tensor([1, 2]), torch.randn(2).to(torch.bfloat16))]
    return encode_undo(ents, {"ref": "x@1", "scale": 1.0})


def _outcome(f, data):
    try:
        return ("ok", f(data))
    except DeploymentError as e:
        return ("err", str(e))


def test_undo_doc_refuses_what_decode_undo_refuses():
    data = _record()
    assert undo_doc(data) == decode_undo(data)[1]
    rng = random.Random(0)
    n_err = 0
    for _ in range(400):
        b = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        if rng.random() < 0.2:
            b = b[:rng.randrange(len(b))]
        got = _outcome(undo_doc, bytes(b))
        want = _outcome(lambda d: decode_undo(d)[1], bytes(b))
        assert got == want
        n_err += got[0] == "err"
    assert 0 < n_err < 400


def test_undo_doc_and_decode_undo_agree_on_every_damaged_gap_and_escape_byte():
    """Random flips rarely land in the few bytes of gap coding; here every byte of the gap and escape arrays is
    set to each of a few values (a zero gap without an escape, an escape below the gap limit, a gap of 0xffff):
    the two readers must refuse the same records and read the same document from the rest."""
    from adapterhub import st_io

    data = _record()
    header = st_io.parse_header(data, "undo record")
    outcomes: set[str] = set()
    for key in ("000000.gap", "000000.esc"):
        e = header.entries[key]
        for pos in range(header.data_start + e.begin, header.data_start + e.begin + e.nbytes):
            for v in (0x00, 0x01, 0x7F, 0x80, 0xFF):
                if data[pos] == v:
                    continue
                b = bytearray(data)
                b[pos] = v
                got = _outcome(undo_doc, bytes(b))
                assert got == _outcome(lambda d: decode_undo(d)[1], bytes(b)), (key, pos, v)
                outcomes.add(got[0])
    assert outcomes == {"ok", "err"}  # both kinds occur: the damage is seen, and harmless changes pass
