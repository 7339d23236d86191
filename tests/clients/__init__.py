"""Clients on the server as their users point them at it: reasoning models (OpenAI and Anthropic SDKs), ..."""
