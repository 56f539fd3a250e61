"""OpenAI-style errors: {"error": {"message", "type", "param", "code"}} with an HTTP status.

    MeshError (mesh/errors.py)            status  type
    RequestRejected "overloaded"          429     rate_limit_error
    RequestRejected (other codes)         400     invalid_request_error
    MeshUnavailable                       503     service_unavailable
    Cancelled (coordinator shutting down) 503     service_unavailable
    Timeout                               504     timeout
    anything else                         500     server_error
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.errors import Cancelled, MeshError, MeshUnavailable, RequestRejected, Timeout


@dataclass
class ApiError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


def from_mesh_error(exc: MeshError) -> ApiError:
    """The HTTP error for a typed error of the SDK or the coordinator."""
    text = str(exc)  # message and hint
    if isinstance(exc, RequestRejected):
        if exc.code == "overloaded":
            return ApiError(429, text, "rate_limit_error", None, exc.code)
        return ApiError(400, text, "invalid_request_error", "slo_class" if exc.code == "unknown_slo_class" else None,
                        exc.code)
    if isinstance(exc, MeshUnavailable | Cancelled):
        return ApiError(503, text, "service_unavailable", None, exc.code)
    if isinstance(exc, Timeout):
        return ApiError(504, text, "timeout", None, exc.code)
    return ApiError(500, text, "server_error", None, exc.code)
