"""The key map, built from the screens' own bindings: the F1 help screen and docs/tui.md's key map both come from
here, so they cannot drift from what the keys do."""
from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.binding import Binding

_NAMES = {"slash": "/", "space": "space", "enter": "enter", "escape": "escape"}


def key_display(binding: Binding) -> str:
    if binding.key_display:
        return binding.key_display
    keys = []
    for key in binding.key.split(","):
        key = key.strip()
        if key in _NAMES:
            keys.append(_NAMES[key])
        elif key.startswith("f") and key[1:].isdigit():
            keys.append(key.upper())
        else:
            keys.append(key)
    return " / ".join(keys)


Section = tuple[str, list, list[tuple[str, str]]]  # (where, its BINDINGS, extra (keys, what) rows)


def key_map(sections: list[Section]) -> list[tuple[str, list[tuple[str, str]]]]:
    """(where, [(keys, what)]) for each section: its bindings that have a description, then its extra rows.
    The sections come from whoever knows the screens (bcdtui.app.key_sections), so this module imports none."""
    out = []
    for title, bindings, extra in sections:
        rows = [(key_display(b), b.tooltip or b.description) for b in bindings
                if isinstance(b, Binding) and b.description]
        out.append((title, rows + list(extra)))
    return out


def key_map_text(sections: list[Section]) -> Group:
    """The key map as rich renderables: one two-column table per screen (descriptions wrap in their column)."""
    parts: list = []
    for title, rows in key_map(sections):
        table = Table(title=title, title_justify="left", title_style="bold underline", show_header=False,
                      box=None, padding=(0, 1), expand=True)
        table.add_column("keys", style="bold #4fc3f7", no_wrap=True, width=18)
        table.add_column("what", ratio=1)
        for keys, what in rows:
            table.add_row(keys, what)
        parts += [table, Text("")]
    parts.append(Text("Runs are detached processes: quitting bcdtui leaves them running, and the next start finds "
                      "them again (a run whose process died without an end event shows as lost).", style="dim"))
    return Group(*parts)


def key_map_markdown(sections: list[Section]) -> str:
    """The key map as the markdown tables of docs/tui.md."""
    lines = []
    for title, rows in key_map(sections):
        lines.append(f"**{title}**\n")
        lines.append("| key | action |")
        lines.append("|---|---|")
        lines += [f"| `{keys}` | {what} |" for keys, what in rows]
        lines.append("")
    return "\n".join(lines)
