"""The doors: Model, the CLI, every flag and option through every door, hostile GGUFs, one size parser."""
