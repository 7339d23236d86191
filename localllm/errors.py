"""Every error localllm raises, under one base class.

Each subclass also inherits the builtin it behaves like (so ``except
FileNotFoundError`` still works), carries structured fields, an HTTP status
for the server, and a ``hint``: the next step a user should take.

Example:
    >>> try:
    ...     raise ModelNotFoundError("no such model", path="x.gguf")
    ... except FileNotFoundError as e:
    ...     e.status
    404
"""

from __future__ import annotations

from typing import Any


class LocalLLMError(Exception):
    """Base class. ``status`` is the HTTP status, ``code`` a stable machine name."""

    status: int = 500
    code: str = "internal_error"
    type: str = "server_error"  # OpenAI error "type"

    def __init__(self, message: str, *, hint: str | None = None, param: str | None = None,
                 **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.param = param
        self.fields = fields
        for key, value in fields.items():
            setattr(self, key, value)

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        """OpenAI-shaped error body."""
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


class _ClientError(LocalLLMError):
    status = 400
    type = "invalid_request_error"


class InvalidArgumentError(_ClientError, ValueError):
    """A parameter has a wrong value or type (bad flag, bad request field)."""

    code = "invalid_argument"


class ModelNotFoundError(_ClientError, FileNotFoundError):
    """A model path or name that does not exist."""

    status = 404
    code = "model_not_found"


class InvalidModelFileError(_ClientError, ValueError):
    """A file that is not a usable GGUF (bad magic, truncated, corrupt header)."""

    code = "invalid_model_file"


class ModelIntegrityError(InvalidModelFileError):
    """A store model whose size or hash disagrees with its manifest (changed or corrupted on disk)."""

    code = "model_integrity"


class UnsupportedArchitectureError(_ClientError, ValueError):
    """The GGUF's architecture is unknown to this llama.cpp build or converter."""

    code = "unsupported_architecture"


class ContextOverflowError(_ClientError, ValueError):
    """A prompt that does not fit the context window. Never truncated silently."""

    code = "context_length_exceeded"


class TemplateError(_ClientError, ValueError):
    """A chat template that fails to render (or tries to escape the sandbox)."""

    code = "chat_template_error"


class ModelBusyError(LocalLLMError, RuntimeError):
    """A Model used from two threads at once."""

    status = 409
    code = "model_busy"
    type = "invalid_request_error"


class ModelClosedError(LocalLLMError, RuntimeError):
    """A Model used after ``close()``."""

    status = 409
    code = "model_closed"
    type = "invalid_request_error"


class ModelLoadError(LocalLLMError, RuntimeError):
    """llama.cpp could not load or run a model for a reason not covered above."""

    code = "model_load_failed"


class InsufficientMemoryError(LocalLLMError, MemoryError):
    """The model (at this context) does not fit the memory available."""

    status = 507
    code = "insufficient_memory"


class ModelTooLargeError(_ClientError, MemoryError):
    """The requested model can never fit this server's memory budget (carries ``needed`` bytes)."""

    code = "model_too_large"


class PrerequisiteError(LocalLLMError, RuntimeError):
    """Something the machine lacks (an optional package, a CPU feature, a tool)."""

    code = "missing_prerequisite"


class RuntimeFailure(LocalLLMError, RuntimeError):
    """llama.cpp failed while decoding or sampling."""

    code = "runtime_failure"


# --------------------------------------------------------------------------- server errors

class AuthenticationError(LocalLLMError, PermissionError):
    """A missing or wrong API key (``localllm serve --api-key``)."""

    status = 401
    code = "invalid_api_key"
    type = "authentication_error"


class QueueFullError(LocalLLMError, RuntimeError):
    """Every slot is busy and the wait queue is full; retry after ``retry_after`` seconds."""

    status = 503
    code = "server_busy"
    type = "server_error"

    def __init__(self, message: str, *, retry_after: int = 1, **fields: Any) -> None:
        super().__init__(message, retry_after=retry_after, **fields)


class PayloadTooLargeError(_ClientError):
    """A request body over the server's size limit."""

    status = 413
    code = "payload_too_large"


class NotFoundError(_ClientError):
    """An unknown URL or a model name the server does not serve."""

    status = 404
    code = "not_found"


class MethodNotAllowedError(_ClientError):
    """A known URL called with the wrong HTTP method."""

    status = 405
    code = "method_not_allowed"


class ServiceUnavailableError(LocalLLMError, RuntimeError):
    """The server is still loading its model, or is shutting down."""

    status = 503
    code = "unavailable"
    type = "server_error"


class CheckpointError(_ClientError, ValueError):
    """A Hugging Face checkpoint that cannot be converted as it is (missing or
    corrupt shard, bad JSON, a tensor that disagrees with the config). The
    message names the file."""

    code = "invalid_checkpoint"


class ConversionCheckError(LocalLLMError, RuntimeError):
    """A converted model that fails a check (tokenizer probe with ``--strict``,
    or ``--verify`` past its thresholds). The file is still written."""

    code = "conversion_check_failed"


class DiskFullError(LocalLLMError, OSError):
    """The disk filled up while writing (nothing is left at the output path)."""

    status = 507
    code = "disk_full"
