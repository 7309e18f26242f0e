"""`--help` that shows every flag's default, so a user reads what a flag does when left out."""

from __future__ import annotations

import argparse


class DefaultsFormatter(argparse.HelpFormatter):
    """Each option's help ends with ``(default: X)``, unless its help already speaks of its default
    or there is none worth saying (None, a switch, an empty list): argparse's own
    ``ArgumentDefaultsHelpFormatter`` would print ``(default: None)`` beside "(default: from a
    memory budget)"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in text or default is None or default is argparse.SUPPRESS
                or isinstance(default, bool) or default in ((), [], "")):
            return text
        return f"{text} (default: %(default)s)"


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """``parser`` and every subcommand's parser under it format their help with ``DefaultsFormatter``."""
    parser.formatter_class = DefaultsFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                show_defaults(sub)
