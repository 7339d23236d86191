"""``localllm serve``: an OpenAI-compatible HTTP server over the generation core.

Modules: :mod:`.app` (settings, the app factory, auth and errors),
:mod:`.routes` (the blueprint), :mod:`.protocol` (request bodies →
``SamplingParams``), :mod:`.openai_format` (response shapes), :mod:`.metrics`
(Prometheus). Decoding itself is :mod:`localllm.core`, the same as ``Model``.

Example:
    >>> from localllm.server import create_app, ServerSettings     # doctest: +SKIP
    >>> app = create_app(ServerSettings.create(model="smollm2-135m"))  # doctest: +SKIP
"""

from localllm.server.app import ServerSettings, create_app, drain, make_app, shutdown

__all__ = ["create_app", "drain", "make_app", "shutdown", "ServerSettings"]
