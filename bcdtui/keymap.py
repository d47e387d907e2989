"""The key map, built from the screens' own bindings: the F1 help screen and the README key map both come from here,
so they cannot drift from what the keys do."""
from __future__ import annotations

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


def key_map() -> list[tuple[str, list[tuple[str, str]]]]:
    """(where, [(keys, what)]) for every screen, in the order a user meets them."""
    from bcdtui.app import BcdApp
    from bcdtui.screens import (CompareScreen, ConfirmScreen, LaunchScreen, RecipesScreen, RunScreen,
                                RunsScreen)

    sections = [
        ("Everywhere", BcdApp, [("ctrl+p", "command palette: every action of the screen, by name")]),
        ("Runs (the start screen)", RunsScreen, [("arrows, pgup/pgdn", "move in the table")]),
        ("Run (enter on a run)", RunScreen, []),
        ("Compare (space marks runs, c compares)", CompareScreen, []),
        ("Recipes (F3 or e)", RecipesScreen, [("tab", "move between the tree and the editor"),
                                              ("enter (tree)", "edit the highlighted recipe")]),
        ("Launch dialog (l, or ctrl+l on a recipe)", LaunchScreen, [("tab", "next field; space ticks a GPU")]),
        ("Confirmations", ConfirmScreen, []),
    ]
    out = []
    for title, cls, extra in sections:
        rows = [(key_display(b), b.tooltip or b.description) for b in cls.__dict__.get("BINDINGS", [])
                if isinstance(b, Binding) and b.description]
        out.append((title, rows + extra))
    return out


def key_map_text():
    """The key map as rich renderables: one two-column table per screen (descriptions wrap in their column)."""
    from rich.console import Group
    from rich.table import Table

    parts = []
    for title, rows in key_map():
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


def key_map_markdown() -> str:
    lines = []
    for title, rows in key_map():
        lines.append(f"**{title}**\n")
        lines.append("| key | action |")
        lines.append("|---|---|")
        lines += [f"| `{keys}` | {what} |" for keys, what in rows]
        lines.append("")
    return "\n".join(lines)
