"""The test suite: one folder per part of localllm (see README.md, "Layout"); shared helpers in
helpers.py and the modules beside it, fixtures in conftest.py."""
