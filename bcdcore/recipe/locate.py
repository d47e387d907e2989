"""Where a key sits in a recipe's text: the file:line every recipe error points at."""
from __future__ import annotations

import re
from pathlib import Path


def read_text_or_empty(source: str) -> str:
    try:
        return Path(source).read_text()
    except OSError:
        return ""


class Locator:
    """Finds the line of `section.key` in the recipe text so messages can point at it."""

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def where(self, dotted: str) -> str:
        line = self.line_of(dotted)
        return f"{self.path}:{line}" if line else self.path

    def line_of(self, dotted: str) -> int | None:
        dotted = re.sub(r"\[\d+\]$", "", dotted)  # list items: point at the list's line
        parts = dotted.split(".")
        header = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?")
        if len(parts) == 1:  # a section name: its header line
            for number, line in enumerate(self.lines, 1):
                m = header.match(line)
                if m and m.group(1).strip().split(".")[0] == dotted:
                    return number
        section, key = (parts[0], parts[-1]) if len(parts) > 1 else ("", parts[0])
        current = ""
        assign = re.compile(r'^\s*"?' + re.escape(key) + r'"?\s*=')
        sec_line = None
        for number, line in enumerate(self.lines, 1):
            m = header.match(line)
            if m:
                current = m.group(1).strip()
                if current == section and sec_line is None:
                    sec_line = number
                continue
            if current == section and assign.match(line):
                return number
            if not section and current == "" and assign.match(line):
                return number
        return sec_line
