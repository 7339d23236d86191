"""Client programs and SDKs pointed at a live server: each API as its official client calls it (the Responses API, ...)."""
