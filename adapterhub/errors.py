"""Exceptions raised by the adapterhub library.

The library never prints or exits; the CLI turns these into one-line errors (exit 1).
"""
from __future__ import annotations


class AdapterHubError(Exception):
    """Base class of every expected failure. ``str(e)`` is a one-line, user-facing message.

    Messages speak in library terms (``allow_nonfinite=True``, "give a name"), never in a front
    end's: ``keywords`` names the keyword arguments or settings the failure is about
    (``("allow_nonfinite",)``), so a front end can point at its own spelling of them — the CLI
    appends the matching ``--flag`` of the command that was run (``cli/common.py``).
    """

    def __init__(self, *args: object, keywords: tuple[str, ...] = ()) -> None:
        super().__init__(*args)
        self.keywords = tuple(keywords)


class FormatError(AdapterHubError):
    """An adapter file is malformed: names the tensor and what is wrong."""


class HeaderError(FormatError):
    """A safetensors header is malformed (raised only by :mod:`adapterhub.st_io`): names the file and the problem."""


class StoreError(AdapterHubError):
    """The content-addressed store is missing a blob or a blob fails verification."""


class CatalogError(AdapterHubError):
    """A catalog operation failed (conflict, constraint, unknown record)."""


class RefError(AdapterHubError):
    """A REF (``name``, ``name@N``, ``name@tag``, ``sha256:<hex>``) is malformed or unknown."""


class NameError_(AdapterHubError):
    """A user-supplied name is not acceptable (path separators, ``..``, too long...)."""


class BaseModelError(AdapterHubError):
    """A base model cannot be loaded, or an adapter does not fit its base."""


class DeploymentError(AdapterHubError):
    """A deployment operation failed; the deployment is unchanged or recovered."""


class HubError(AdapterHubError):
    """A Hugging Face Hub transfer failed or returned something we refuse to trust."""


class TrainingError(AdapterHubError):
    """Training or evaluation cannot run with the given inputs."""


class DataError(AdapterHubError):
    """A dataset cannot be loaded (unknown task, missing column, empty...)."""


class MergeError(AdapterHubError):
    """Adapters cannot be merged (different bases, bad weights...)."""


class UnlearningError(AdapterHubError):
    """An unlearning request is invalid (unknown client or class, K too large...)."""


class FederationError(AdapterHubError):
    """A federated run on Flower failed (SuperLink unreachable, too few nodes, a refused node, a failed run)."""


class UiError(AdapterHubError):
    """The web view cannot be served as asked (another address without a token, an unusable token file)."""
