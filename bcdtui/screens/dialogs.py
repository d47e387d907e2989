"""Small dialogs: yes/no, one line of text, and the F1 key map (whose content the app hands in)."""
from __future__ import annotations

from rich.console import RenderableType
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from bcdtui.screens.base import steady_cursors


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS = [
        Binding("y", "yes", "Yes", tooltip="yes"),
        Binding("n,escape", "no", "No", tooltip="no"),
    ]

    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message

    def compose(self) -> ComposeResult:
        with Vertical(id="box"):
            yield Static(Text(self.message))
            with Horizontal(id="buttons"):
                yield Button("Yes (y)", variant="error", id="yes")
                yield Button("No (n)", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    @on(Button.Pressed, "#yes")
    def action_yes(self) -> None:
        self.dismiss(True)

    @on(Button.Pressed, "#no")
    def action_no(self) -> None:
        self.dismiss(False)


class PromptScreen(ModalScreen):
    BINDINGS = [Binding("escape", "cancel", "Cancel", tooltip="close without launching")]

    def __init__(self, message: str, placeholder: str = "") -> None:
        super().__init__()
        self.message, self.placeholder = message, placeholder

    def compose(self) -> ComposeResult:
        with Vertical(id="box"):
            yield Label(self.message)
            yield Input(placeholder=self.placeholder, id="answer")

    def on_mount(self) -> None:
        steady_cursors(self)

    @on(Input.Submitted, "#answer")
    def _submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class HelpScreen(ModalScreen):
    """F1: the key map of every screen. The app hands it in (bcdtui.keymap builds it from the screens' bindings,
    as it builds docs/tui.md's), so this dialog knows no other screen."""

    BINDINGS = [Binding("escape,f1,q", "close", "Close")]

    def __init__(self, content: RenderableType) -> None:
        super().__init__()
        self.content = content

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Static(self.content)

    def on_mount(self) -> None:
        self.query_one("#help").border_title = "bcdtui keys (escape closes)"
        self.query_one("#help").focus()

    def action_close(self) -> None:
        self.dismiss(None)