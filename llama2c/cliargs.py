"""Flag spellings shared by the `llama2c` subcommands (docs/CLI.md).

Every long flag is kebab-case (`--max-seq-len`, `--top-p`). The older
spellings still parse as hidden aliases: the underscore form of any long flag
(`--max_seq_len`), and the names a parser declares with `Parser.alias`
(llama2.c's `--topp`, a short flag whose letter now means something else in
the other subcommands). An alias is rewritten to its flag before argparse sees
the command line, so --help, usage lines and error messages name only the
kebab-case flags, and abbreviations work as before.

Imports nothing from the package (every command line module uses it).
"""
from __future__ import annotations

import argparse


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose hidden aliases are rewritten before parsing.
    Subparsers made with add_subparsers() are Parsers too, each with aliases
    of its own (a parser rewrites only the arguments it parses itself)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._aliases: dict[str, str] = {}

    def alias(self, flag: str, *old: str) -> None:
        """`old` spellings parse as `flag` (declared already) without showing
        in --help. A short alias ('-t') also takes an attached value ('-tX')."""
        if flag not in self._option_string_actions:
            raise ValueError(f"alias for an undeclared flag {flag}")
        for name in old:
            if name in self._option_string_actions or name in self._aliases:
                raise ValueError(f"{name} is already a flag")
            self._aliases[name] = flag

    def _rewrite(self, arg: str) -> str:
        if not arg.startswith("-") or arg == "-":
            return arg
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            if name in self._aliases:
                return self._aliases[name] + eq + value
            if "_" in name:
                dashed = "--" + name[2:].replace("_", "-")
                # an exact flag, or an abbreviation of one, as argparse allows
                if any(s.startswith(dashed) for s in self._option_string_actions if s.startswith("--")):
                    return dashed + eq + value
            return arg
        short = arg[:2]
        if short in self._aliases and short not in self._option_string_actions:
            return self._aliases[short] + arg[2:]
        return arg

    def rewrite(self, args: list[str]) -> list[str]:
        """args with this parser's aliases replaced by their flags (up to a `--`)."""
        out = []
        for i, arg in enumerate(args):
            if arg == "--":
                return out + list(args[i:])
            out.append(self._rewrite(arg))
        return out

    def parse_known_args(self, args=None, namespace=None):
        if args is None:
            import sys

            args = sys.argv[1:]
        return super().parse_known_args(self.rewrite(list(args)), namespace)

