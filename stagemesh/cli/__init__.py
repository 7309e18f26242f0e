"""The `stagemesh` command line: commands (`commands`), the bench (`bench/`), demo checkpoints (`demo`)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """The `stagemesh` entry point (imported lazily, so `import stagemesh.cli.bench` stays light)."""
    from stagemesh.cli.commands import main as run

    return run(argv)
