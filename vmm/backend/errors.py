"""Errors of the backend seam. ``Unsupported`` moves to vmm/exceptions.py with the integration."""

from __future__ import annotations

from collections.abc import Sequence

from vmm.exceptions import Conflict


class Unsupported(Conflict):
    """The active backend cannot run what the VM asks for on this host (409 ``UNSUPPORTED``).

    The request itself is well formed; another backend or host could run it, so this is a
    precondition failure rather than bad input. The message names the backend and each feature.
    """

    code = "UNSUPPORTED"

    def __init__(self, backend: str, features: Sequence[str]) -> None:
        super().__init__(f"the {backend} backend cannot run this VM: " + "; ".join(features))
        self.backend = backend
        self.features = tuple(features)
