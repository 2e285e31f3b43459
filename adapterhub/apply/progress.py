"""What a long deployment operation tells its caller while it runs (the CLI draws it as a bar, or log lines).

A :data:`Progress` callback is called ``progress(phase, done, total)`` in the operation's own thread:

* ``"copying"`` (``deploy create``): bytes of the base's weights files copied so far, of all of them;
* ``"hashing"`` (a full measurement: ``create``, ``verify``, ``--verify``, files changed outside adapterhub):
  bytes hashed, of all the bytes to hash;
* ``"checking"``, ``"patching"``, ``"writing back"``, ``"recording"`` (``apply``, ``revert``, ``rollback``):
  tensors patched of the tensors to patch for ``"patching"``; ``0, 0`` for the others (a phase, no count).

The phases come in that order, each any number of times; a callback must not raise.
"""
from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]

__all__ = ["Progress"]
