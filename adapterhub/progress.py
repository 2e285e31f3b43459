"""What a long operation tells its caller while it runs (the CLI draws it as a bar, or as log lines).

A :data:`Progress` callback is called ``progress(phase, done, total)`` in the operation's own thread. The
phases, by operation:

* deployments (:mod:`adapterhub.apply`): ``"copying"`` (``deploy create``: bytes of the base's files copied, of
  all of them); ``"hashing"`` (a full measurement: ``create``, ``verify``, ``--verify``, files changed outside
  adapterhub: bytes hashed, of all to hash); ``"checking"``, ``"patching"``, ``"writing back"``, ``"recording"``
  (``apply``, ``revert``, ``rollback``: tensors patched of the tensors to patch for ``"patching"``; ``0, 0`` for
  the others, a phase without a count);
* ``base add`` (:func:`adapterhub.bases.sources.fingerprint_folder`): ``"hashing"``, bytes;
* ``export --format peft`` (:func:`adapterhub.interop.peft.export_peft_shira`): ``"counting"`` then ``"writing"``,
  tensors;
* ``diff`` (:func:`adapterhub.views.diff.diff_sources`): ``"comparing"``, tensors.

``"copying"`` and ``"hashing"`` count bytes, every other phase counts tensors. A callback must not raise.
"""
from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]
Count = Callable[[int], None]  # ``add(n)``: ``n`` more units of a phase done (negative: some started again)
BYTE_PHASES = ("copying", "hashing")  # the phases whose counts are bytes; the others count tensors


def quiet(phase: str, done: int, total: int) -> None:
    """The :data:`Progress` of a caller that gave none: an operation calls ``(progress or quiet)(...)``."""


def counter(progress: Progress | None, phase: str, total: int, *, every: int = 0) -> Count:
    """The :data:`Count` of ``phase`` toward ``total``: reports ``(phase, 0, total)`` now, then
    ``(phase, done, max(total, done))`` as ``add(n)`` adds to ``done`` — on every call, or (``every``) once that
    many more are done since the last report, and when ``done`` reaches ``total``."""
    report = progress or quiet
    done = told = 0
    report(phase, 0, total)

    def add(n: int) -> None:
        nonlocal done, told
        done += n
        if abs(done - told) >= every or done == total:
            report(phase, done, max(total, done))
            told = done

    return add


__all__ = ["BYTE_PHASES", "Count", "Progress", "counter", "quiet"]
