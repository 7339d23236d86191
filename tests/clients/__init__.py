"""The clients people point at a local server (SDKs, editors, agents), each driven for real against `localllm serve`."""
