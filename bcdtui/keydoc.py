"""`python -m bcdtui.keydoc [--check]`: write (or check) the key map block of docs/tui.md from the bindings.

The block sits between `<!-- keymap:start -->` and `<!-- keymap:end -->`; the rest of the page is prose."""
from __future__ import annotations

import sys
from pathlib import Path

from bcdtui.app import key_sections
from bcdtui.keymap import key_map_markdown

START, END = "<!-- keymap:start -->", "<!-- keymap:end -->"
DOC = Path(__file__).resolve().parent.parent / "docs" / "tui.md"


def with_key_map(page: str) -> str:
    """`page` with its key map block replaced by the one the bindings give."""
    head, found, rest = page.partition(START)
    if not found or END not in rest:
        raise ValueError(f"no {START} ... {END} block to fill")
    return f"{head}{START}\n{key_map_markdown(key_sections()).rstrip()}\n{END}{rest.split(END, 1)[1]}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    page = DOC.read_text()
    new = with_key_map(page)
    if "--check" in args:
        if new != page:
            print(f"{DOC}: the key map differs from the bindings; run python -m bcdtui.keydoc", file=sys.stderr)
            return 1
        return 0
    if new != page:
        DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
