"""`stagemesh ... --help`: every flag of every subcommand says what it does, and its default."""

from __future__ import annotations

import argparse

import pytest

from stagemesh.cli.commands import build_parser


def _parsers(parser: argparse.ArgumentParser, path: str = "stagemesh"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


PARSERS = dict(_parsers(build_parser()))


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_every_option_has_a_help_text(command):
    parser = PARSERS[command]
    missing = [a.option_strings or a.dest for a in parser._actions
               if not isinstance(a, argparse._SubParsersAction) and not (a.help or "").strip()]
    assert missing == [], f"{command}: options without help: {missing}"
    parser.format_help()  # a help text with a stray % fails here


def test_help_shows_defaults_once():
    text = " ".join(PARSERS["stagemesh up"].format_help().split())
    assert "pipeline stages (one worker process each) (default: 1)" in text
    assert "(default: from a memory budget)" in text and "(default: None)" not in text
    generate = " ".join(PARSERS["stagemesh generate"].format_help().split())
    assert "tokens per KV-cache block (default: 16)" in generate
    assert "context. (default: 16) (default" not in generate  # the sampling flags say their own, once
    assert "(default: False)" not in generate and "(default: True)" not in generate
