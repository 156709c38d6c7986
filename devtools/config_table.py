"""Render the ``[asyncq]`` options as a Markdown table, and keep the docs' copies of it current.

The table is generated from ``get_provider_info()["config"]["asyncq"]["options"]``, the one place the
options are declared, so the docs cannot drift from the code unnoticed::

    python devtools/config_table.py                       # print the table
    python devtools/config_table.py --check docs/CONFIGURATION.md README.md
    python devtools/config_table.py --write docs/CONFIGURATION.md README.md

A file carries the table between two marker lines; ``--write`` replaces what is between them and
``--check`` exits 1 when it differs from the rendered table (or the markers are missing).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
START = "<!-- config-table:start -->"
END = "<!-- config-table:end -->"
SECTION = "asyncq"
HEADER = ("Option", "Environment variable", "Type", "Default", "Description")


class MarkerError(ValueError):
    """The file does not hold exactly one well-ordered pair of markers."""


def provider_options() -> Mapping[str, Mapping[str, Any]]:
    try:
        from airflow_asyncq_provider.get_provider_info import get_provider_info
    except ImportError:  # run from a checkout whose package is not installed
        sys.path.insert(0, str(REPO))
        from airflow_asyncq_provider.get_provider_info import get_provider_info
    return get_provider_info()["config"][SECTION]["options"]


def _cell(text: str) -> str:
    """One table cell: a single line, with the characters that would break a Markdown table escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _code(value: str) -> str:
    return f"`{value}`" if "`" not in value else f"`` {value} ``"


def render_table(options: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """The Markdown table, one row per option in declaration order. Ends without a newline."""
    options = provider_options() if options is None else options
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    for name, spec in options.items():
        option = _code(name) + (" (sensitive)" if spec.get("sensitive") else "")
        env = _code(f"AIRFLOW__{SECTION.upper()}__{name.upper()}")
        default = spec.get("default")
        default_cell = "(empty)" if default in (None, "") else _code(_cell(default))
        description = _cell(spec.get("description") or "")
        example = spec.get("example")
        if example not in (None, "") and example != default:
            description += f" Example: {_code(_cell(example))}."
        if spec.get("sensitive"):
            env_name = f"AIRFLOW__{SECTION.upper()}__{name.upper()}"
            description += (f" Sensitive: it may also come from a command ({_code(env_name + '_CMD')}) or "
                            f"a secrets backend ({_code(env_name + '_SECRET')}).")
        lines.append("| " + " | ".join((option, env, _code(spec.get("type") or "string"), default_cell,
                                        description)) + " |")
    return "\n".join(lines)


def _bounds(text: str, where: str) -> tuple[int, int]:
    starts, ends = text.count(START), text.count(END)
    if starts != 1 or ends != 1:
        raise MarkerError(f"{where} must hold exactly one {START} and one {END} line "
                          f"(found {starts} and {ends})")
    start, end = text.index(START) + len(START), text.index(END)
    if end < start:
        raise MarkerError(f"{where}: {END} comes before {START}")
    return start, end


def splice(text: str, table: str, where: str = "the file") -> str:
    """``text`` with whatever is between the markers replaced by ``table``."""
    start, end = _bounds(text, where)
    return text[:start] + "\n" + table + "\n" + text[end:]


def check_text(text: str, table: str | None = None, where: str = "the file") -> str | None:
    """None when ``text`` carries exactly the rendered table between the markers, else why not."""
    table = render_table() if table is None else table
    try:
        start, end = _bounds(text, where)
    except MarkerError as exc:
        return str(exc)
    if text[start:end] != "\n" + table + "\n":
        return (f"{where}: the [{SECTION}] table between the markers is out of date; "
                f"run `python devtools/config_table.py --write {where}`")
    return None


def check_file(path: str | Path, table: str | None = None) -> str | None:
    path = Path(path)
    if not path.is_file():
        return f"{path}: no such file"
    return check_text(path.read_text(encoding="utf-8"), table, where=str(path))


def write_file(path: str | Path, table: str | None = None) -> bool:
    """Rewrite the table in ``path``; True when the file changed."""
    path = Path(path)
    table = render_table() if table is None else table
    old = path.read_text(encoding="utf-8")
    new = splice(old, table, where=str(path))
    if new != old:
        path.write_text(new, encoding="utf-8")
    return new != old


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", nargs="+", metavar="FILE",
                      help=f"exit 1 unless every FILE has the current table between {START} and {END}")
    mode.add_argument("--write", nargs="+", metavar="FILE",
                      help="rewrite the table between the markers of every FILE")
    args = parser.parse_args(argv)
    table = render_table()
    if args.check:
        problems = [p for p in (check_file(f, table) for f in args.check) if p]
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1 if problems else 0
    if args.write:
        status = 0
        for name in args.write:
            try:
                changed = write_file(name, table)
            except (MarkerError, OSError) as exc:
                print(f"error: {exc}", file=sys.stderr)
                status = 1
                continue
            print(f"{name}: {'updated' if changed else 'already current'}")
        return status
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
