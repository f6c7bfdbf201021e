"""CLI subcommands; each module exposes ``main(argv) -> int``."""
