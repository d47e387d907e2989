"""The annotate dialog (`a` on a run): its display name, tags and notes, stored in RUN_DIR/annotations.json."""
from __future__ import annotations

from functools import partial

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, Static, TextArea

from bcdcore.rundir import display_id, printable
from bcdtui.screens.base import steady_cursors
from bcdtui.screens.dialogs import ConfirmScreen
from bcdtui.workstation import ActionError


class AnnotateScreen(ModalScreen):
    BINDINGS = [
        Binding("ctrl+s", "save", "Save", priority=True, tooltip="store the name, tags and notes in the run"),
        Binding("escape", "cancel", "Cancel", tooltip="close (asks first when something was changed)"),
    ]

    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id
        self.loaded: tuple[str, str, str] = ("", "", "")

    def compose(self) -> ComposeResult:
        ws = self.app.ws  # type: ignore[attr-defined]
        notes, problem = ws.annotations(self.run_id)
        self.loaded = (notes.name, " ".join(notes.tags), notes.notes)
        with Vertical(id="box"):
            yield Label(Text(f"Annotate {printable(display_id(self.run_id, notes.name))}  "
                             "(ctrl+s saves, escape cancels, tab moves)", style="bold"))
            with Horizontal(classes="row"):
                yield Label("name", classes="label")
                yield Input(notes.name, placeholder="display name (shown instead of the recipe's name)", id="name",
                            compact=True)
            with Horizontal(classes="row"):
                yield Label("tags", classes="label")
                yield Input(" ".join(notes.tags), placeholder="baseline best-lr  (space separated)", id="tags",
                            compact=True)
            yield Label("notes", classes="label")
            yield TextArea(notes.notes, id="notes", tab_behavior="focus", soft_wrap=True)
            yield Static(Text(problem, style="bold") if problem else "", id="annotate-error")

    def on_mount(self) -> None:
        steady_cursors(self)
        self.query_one("#name", Input).focus()

    def values(self) -> tuple[str, str, str]:
        return (self.query_one("#name", Input).value, self.query_one("#tags", Input).value,
                self.query_one("#notes", TextArea).text)

    @on(Input.Submitted)
    def action_save(self) -> None:
        name, tags, notes = self.values()
        try:
            stored = self.app.ws.annotate(self.run_id, name, tags.replace(",", " ").split(), notes)  # type: ignore
        except ActionError as exc:
            self.query_one("#annotate-error", Static).update(Text(f"✗ {exc}", style="bold"))  # stays open
            return
        self.dismiss(stored)

    def action_cancel(self) -> None:
        if self.values() == self.loaded:
            self.dismiss(None)
            return
        self.app.push_screen(ConfirmScreen("Discard the changes to this run's name, tags and notes?"),
                             partial(self._discard))

    def _discard(self, yes: bool | None) -> None:
        if yes:
            self.dismiss(None)
