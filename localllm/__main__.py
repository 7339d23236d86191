"""``python -m localllm`` is the ``localllm`` command."""

from localllm.cli import main

if __name__ == "__main__":
    main()
