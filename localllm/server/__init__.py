"""``localllm serve``: an OpenAI-compatible HTTP server with continuous batching.

Modules: :mod:`.engine` (model, prompts, settings), :mod:`.scheduler` (the
decode thread), :mod:`.protocol` (request validation), :mod:`.app` (Flask
routes), :mod:`.metrics` (Prometheus).

Example:
    >>> from localllm.server import create_app, ServerSettings     # doctest: +SKIP
    >>> app = create_app(ServerSettings(model="smollm2-135m"))      # doctest: +SKIP
"""

from localllm.server.app import create_app, make_app, shutdown
from localllm.server.engine import ServerSettings

__all__ = ["create_app", "make_app", "shutdown", "ServerSettings"]
