"""Typed errors shared by the client SDK, the coordinator, node daemons and expert workers.

Every error the mesh raises on purpose is a `MeshError`: it carries a stable `.code` (what goes
on the wire in an `ErrorReply`, what scripts match on) and a `.hint` (what the user should do
about it). `str(err)` is the message followed by the hint, so a traceback alone tells the user
what happened and what to try.

    MeshError                      code
    ├── MeshUnavailable            "unavailable"        coordinator (or a node) unreachable
    ├── RequestRejected            "rejected"           bad request, unknown SLO class, overloaded
    │                              (+ "bad_request", "unknown_slo_class", "overloaded")
    ├── Timeout                    "timeout"            a wait ran past its deadline
    ├── Cancelled                  "cancelled"          the request was cancelled
    ├── FunctionFailed             "function_failed"    a worker died or errored
    ├── UnknownExpert              "unknown_expert"     a (layer, expert) no function serves
    ├── ConfigError                "config_error"       launch.toml / overrides are wrong
    └── ProtocolError              "protocol_error"     a wire message that cannot be decoded
        ├── MalformedFrame         "malformed_frame"    bad layout, header, missing/mistyped field
        ├── UnknownMessageType     "unknown_message_type"
        ├── OversizedMessage       "oversized_message"  beyond a mesh.protocol.Limits bound
        └── BadTensor              "bad_tensor"         dtype not allowed, size/shape mismatch

Codes round-trip: `error_from_reply(reply)` turns an `ErrorReply` received from a peer back into
the class that raised it. Subclasses register their codes on definition (`__init_subclass__`),
so a class defined elsewhere maps back as well once its module is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:  # only for the annotation; mesh.protocol imports this module
    from mesh.protocol import ErrorReply

__all__ = [
    "BadTensor",
    "Cancelled",
    "ConfigError",
    "FunctionFailed",
    "MeshError",
    "MalformedFrame",
    "MeshUnavailable",
    "OversizedMessage",
    "ProtocolError",
    "RequestRejected",
    "Timeout",
    "UnknownExpert",
    "UnknownMessageType",
    "error_class_for",
    "error_from_reply",
]

# code -> class; filled by MeshError.__init_subclass__.
_CLASS_BY_CODE: dict[str, type[MeshError]] = {}


class MeshError(Exception):
    """Base of every error the mesh raises on purpose.

    message: what went wrong, naming the thing (request id, key, field, instance).
    code:    stable identifier; defaults to the class's `code`, or one of its `aliases`.
    hint:    what to do about it; defaults to the class's `default_hint`.

    Subclasses keep `(message, *, code=None, hint=None)` constructible (extra keyword arguments
    optional), so that `error_from_reply` can rebuild any of them from the wire.
    """

    code: str = "mesh_error"  # overridden per instance when an alias code is given
    aliases: ClassVar[tuple[str, ...]] = ()
    default_hint: ClassVar[str] = "see the coordinator log for details"

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        for code in (cls.code, *cls.aliases):
            # The first class to claim a code owns it; subclasses that inherit a code don't steal it.
            _CLASS_BY_CODE.setdefault(code, cls)

    def __init__(self, message: str, *, code: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.hint = self.default_hint if hint is None else hint

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


_CLASS_BY_CODE[MeshError.code] = MeshError
_CLASS_BY_CODE["internal"] = MeshError  # an unexpected exception on the far side


class MeshUnavailable(MeshError):
    """The coordinator (or a node daemon) cannot be reached."""

    code = "unavailable"
    default_hint = "start it with `mesh-up` or check --address"


class RequestRejected(MeshError):
    """The coordinator refused a request: malformed, unknown SLO class, or overloaded."""

    code = "rejected"
    aliases = ("bad_request", "unknown_slo_class", "overloaded")
    default_hint = "fix the request as the message says, or retry later if the mesh is overloaded"


class Timeout(MeshError):
    """A wait ran past its deadline (request, call, spawn or handshake)."""

    code = "timeout"
    default_hint = (
        "raise the timeout in launch.toml (coordinator.request_timeout_s, "
        "policy.call_timeout_s) or check that the mesh is not overloaded"
    )


class Cancelled(MeshError):
    """The request was cancelled (by the client, or by the coordinator shutting down)."""

    code = "cancelled"
    default_hint = "nothing to do: the request was cancelled on purpose"


class FunctionFailed(MeshError):
    """An expert function died or answered with an error.

    The coordinator normally retries or recomputes the call locally, so callers rarely see
    this; it surfaces only when retries (policy.retries) are exhausted.
    """

    code = "function_failed"
    default_hint = (
        "see the node daemon's log for the worker's exit; raise policy.retries to retry more"
    )


class UnknownExpert(MeshError):
    """A (layer, expert) pair that the model does not have or that no function serves."""

    code = "unknown_expert"
    default_hint = "check the plan's experts against the model's layers and experts per layer"


class ConfigError(MeshError):
    """launch.toml, a config dict, or a command-line override is wrong.

    key:  dotted key of the offending value, e.g. "nodes[1].capacity_gb" (None if global)
    path: the file (or "<dict>", "<override>") the value came from (None if unknown)

    The message reads `path: key: problem`, e.g.
    `launch.toml: nodes[1].capacity_gb: expected a number > 0, got "abc"`.
    """

    code = "config_error"
    default_hint = "fix the key in launch.toml (or the matching --set override) and start again"

    def __init__(
        self,
        problem: str,
        *,
        key: str | None = None,
        path: str | None = None,
        code: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.problem = problem
        self.key = key
        self.path = path
        where = ": ".join(part for part in (path, key) if part)
        super().__init__(f"{where}: {problem}" if where else problem, code=code, hint=hint)

    def under(self, prefix: str) -> ConfigError:
        """The same error with its key nested under `prefix` ("nodes[1]" + "cpus" -> "nodes[1].cpus")."""
        if not self.key:
            key = prefix
        elif self.key.startswith("["):
            key = prefix + self.key
        else:
            key = f"{prefix}.{self.key}"
        return ConfigError(self.problem, key=key, path=self.path, hint=self.hint)

    def in_file(self, path: str) -> ConfigError:
        """The same error, naming the file (or source) the value came from."""
        return ConfigError(self.problem, key=self.key, path=path, hint=self.hint)


class ProtocolError(MeshError):
    """A wire message that cannot be decoded (or encoded). `.field` names the offending field."""

    code = "protocol_error"
    default_hint = (
        "the peer sent a message this version cannot read: check that client, coordinator, "
        "node daemons and workers run the same moemesh version"
    )

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        code: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, code=code, hint=hint)
        self.field = field


class MalformedFrame(ProtocolError):
    """Wrong frame layout, undecodable header, missing field or a field of the wrong type."""

    code = "malformed_frame"


class UnknownMessageType(ProtocolError):
    """The type byte names no message this version knows."""

    code = "unknown_message_type"


class OversizedMessage(ProtocolError):
    """A frame count, header, string, list or tensor beyond its `Limits` bound."""

    code = "oversized_message"
    default_hint = (
        "send smaller messages (policy.micro_batch_tokens, policy.payload_cap_bytes) or raise "
        "the matching field of mesh.protocol.Limits on the receiving side"
    )


class BadTensor(ProtocolError):
    """A tensor frame whose dtype is not allowed or whose size or shape does not fit its header."""

    code = "bad_tensor"
    default_hint = (
        "send C-contiguous tensors of an allowed dtype (float32, float16, bfloat16, int64, "
        "int32) and sizes that match the header"
    )


def error_class_for(code: str) -> type[MeshError]:
    """The MeshError subclass that owns `code` (MeshError itself for unknown codes)."""
    return _CLASS_BY_CODE.get(code, MeshError)


def error_from_reply(reply: ErrorReply) -> MeshError:
    """Turn an `ErrorReply` received from a peer back into the typed error it stands for.

    Unknown codes (a newer peer) give a plain `MeshError` that keeps the code.
    """
    cls = error_class_for(reply.code)
    return cls(reply.message, code=reply.code, hint=reply.hint)
