"""Every error the daemon raises on purpose, in one place.

Each class carries the HTTP status a caller sees and a stable machine-readable code. The /prpc
bridge turns any of them into ``{"error", "message", "code"}`` (JSON) or ``PrpcError`` (protobuf);
anything that is not a ``VmmError`` is a bug and becomes a logged 500.

    VmmError
    ├── BadRequest (400, ValueError)        bad input; names the field and the reason
    │   ├── InvalidField                    one request field is wrong
    │   ├── UnknownMethod                   /prpc/<Method> names no RPC
    │   └── DecodeError                     the body is not valid JSON / protobuf for the method
    ├── PayloadTooLarge (413)               the body is over the configured limit
    ├── Unauthorized (401)                  missing or wrong credentials
    ├── NotFound (404, LookupError)         unknown VM (or other named object)
    ├── Conflict (409)                      the VM is in the wrong state for the call
    │   └── Unsupported                     the active backend cannot do it; names feature and backend
    ├── ResourceExhausted (409)             a limit (CIDs, vCPUs, memory, ports) is reached
    ├── Unavailable (503)                   a dependency (KMS, guest agent, supervisor) is down
    │   └── RegistryError                   the image registry is down, refused, or sent bad data
    ├── StorageError (507)                  writing the daemon's state failed; names the file
    │   └── InsufficientStorage             ... because the disk or the quota is full (ENOSPC, EDQUOT)
    ├── ConfigError (ValueError)            vmm.toml is invalid; raised at start, names the key
    └── BackendError                        the backend (supervisor, libvirtd) refused or failed
        └── SupervisorError                 ... the supervisor of the QEMU backend
            └── SupervisorUnavailable (503) it does not answer (also an Unavailable)
"""

from __future__ import annotations

import errno
from collections.abc import Sequence


class VmmError(Exception):
    """Base class: an error with a status code and a stable code for clients."""

    status_code: int = 500
    code: str = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(VmmError, ValueError):
    status_code = 400
    code = "INVALID_ARGUMENT"


class InvalidField(BadRequest):
    """One field of a request is wrong; the message names it and says why."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"invalid field `{field}`: {reason}")
        self.field = field
        self.reason = reason


class UnknownMethod(BadRequest):
    code = "UNKNOWN_METHOD"

    def __init__(self, method: str) -> None:
        super().__init__(f"unknown method: {method!r}")
        self.method = method


class DecodeError(BadRequest):
    code = "DECODE_ERROR"


class PayloadTooLarge(VmmError):
    status_code = 413
    code = "PAYLOAD_TOO_LARGE"


class Unauthorized(VmmError):
    status_code = 401
    code = "UNAUTHENTICATED"


class NotFound(VmmError, LookupError):
    status_code = 404
    code = "NOT_FOUND"


class VmNotFound(NotFound):
    code = "VM_NOT_FOUND"

    def __init__(self, vm_id: str) -> None:
        super().__init__(f"VM not found: {vm_id!r}")
        self.vm_id = vm_id


class Conflict(VmmError):
    status_code = 409
    code = "FAILED_PRECONDITION"


class ResourceExhausted(VmmError):
    status_code = 409
    code = "RESOURCE_EXHAUSTED"


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


class Unavailable(VmmError):
    status_code = 503
    code = "UNAVAILABLE"


class RegistryError(Unavailable):
    """The image registry cannot be reached, refused, or answered something invalid."""

    code = "REGISTRY_ERROR"


OUT_OF_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


class StorageError(VmmError):
    """A write of the daemon's state failed; the call changed nothing.

    ``path`` is the file as the daemon names it to clients, relative to its state directory:
    never an absolute host path.
    """

    status_code = 507
    code = "STORAGE"

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot write {path}: {reason}")
        self.path = path

    @classmethod
    def of(cls, exc: OSError, path: str) -> StorageError:
        """``exc`` as the error a client sees: InsufficientStorage when space or quota ran out."""
        kind = InsufficientStorage if exc.errno in OUT_OF_SPACE else StorageError
        return kind(path, exc.strerror or type(exc).__name__)


class InsufficientStorage(StorageError):
    code = "INSUFFICIENT_STORAGE"


class ConfigError(VmmError, ValueError):
    """The configuration is invalid. Raised before the daemon serves anything."""

    code = "CONFIG"


class BackendError(VmmError):
    """The backend that runs VMs refused or failed a request."""

    status_code = 500
    code = "BACKEND"


class SupervisorError(BackendError):
    """The supervisor process refused a request or could not be reached."""

    code = "SUPERVISOR"


class SupervisorUnavailable(SupervisorError, Unavailable):
    """The supervisor does not answer (dead, restarting, or too slow); the call may be retried."""

    status_code = 503
    code = "UNAVAILABLE"
