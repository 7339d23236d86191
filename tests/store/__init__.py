"""The model store on disk: import, verify, remove, defaults, and its behaviour under faults."""
