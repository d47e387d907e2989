"""The full-screen log (`L` on a run): its log.txt (the last 4 MiB of it), searched, wrapped or not, followed."""
from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Input, RichLog, Static

from bcdcore.rundir import printable
from bcdtui.screens.base import FOLLOW_S, WsScreen, steady_cursors
from bcdtui.tailer import TextTail
from bcdtui.widgets import KeyBar, TopBar

MAX_LOG_BYTES = 4 << 20


class LogScreen(WsScreen):
    BINDINGS = [
        Binding("escape", "back", "Back", tooltip="back to the run (escape in the search box closes it)"),
        Binding("slash", "search", "Search", key_display="/", tooltip="search the log (enter: next match)"),
        Binding("n", "next_match", "Next", tooltip="the next match of the search"),
        Binding("N", "previous_match", "Previous", tooltip="the previous match of the search"),
        Binding("w", "wrap", "Wrap", tooltip="wrap long lines, or cut them (scroll right to read on)"),
        Binding("f", "follow", "Follow", tooltip="follow: stay at the end as lines arrive (on at first)"),
    ]

    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id
        self.lines: list[str] = []
        self.query_text = ""
        self.matches: list[int] = []  # indices into `lines`
        self.match = -1
        self.wrap = False
        self.following = True
        self._starts: list[int] = []  # the y at which each line starts in the widget (wrapping makes it differ)

    def compose(self) -> ComposeResult:
        row = self.ws.model.rows.get(self.run_id)
        yield TopBar(f"Log of {printable(row.display if row is not None else self.run_id)}", id="topbar")
        yield RichLog(id="full-log", wrap=False, auto_scroll=True, markup=False, highlight=False)
        yield Input(placeholder="search the log (enter: next match, escape: close)", id="log-search")
        yield Static("", id="log-info")
        yield KeyBar()

    def on_mount(self) -> None:
        steady_cursors(self)
        self.tail = TextTail(self.ws.run_path(self.run_id) / "log.txt", max_initial_bytes=MAX_LOG_BYTES)
        self.lines = self.tail.poll()
        self.call_after_refresh(self.redraw)  # once the log has its size: wrapped heights are known then
        self.set_interval(FOLLOW_S * 2.5, self.poll)
        self.query_one("#full-log").focus()

    def poll(self) -> None:
        new = self.tail.poll()
        if not new:
            return
        first = len(self.lines)
        self.lines += new
        for i, line in enumerate(new, first):
            self._write(i, line)
        if self.query_text:
            self.matches += [i for i, line in enumerate(new, first) if self.query_text in line.lower()]
        self._info()

    def _write(self, index: int, line: str) -> None:
        log = self.query_one("#full-log", RichLog)
        self._starts.append(len(log.lines))
        text = Text(line)
        if self.query_text:
            text.highlight_words([self.query_text], style="black on yellow", case_sensitive=False)
        log.write(text, scroll_end=self.following)

    def redraw(self) -> None:
        log = self.query_one("#full-log", RichLog)
        log.clear()
        log.wrap = self.wrap
        log.auto_scroll = self.following
        self._starts = []
        for i, line in enumerate(self.lines):
            self._write(i, line)
        self._info()

    def _info(self) -> None:
        parts = [f"{len(self.lines)} lines", f"wrap {'on' if self.wrap else 'off'}",
                 f"follow {'on' if self.following else 'off'}"]
        if self.query_text:
            where = f"{self.match + 1} of {len(self.matches)}" if self.match >= 0 else f"{len(self.matches)} matches"
            parts.append(f"search {self.query_text!r}: {where}")
        self.query_one("#log-info", Static).update(" · ".join(parts))

    # --- actions
    def action_back(self) -> None:
        box = self.query_one("#log-search", Input)
        if box.has_class("-shown"):
            box.remove_class("-shown")
            self.query_one("#full-log").focus()
            return
        self.app.pop_screen()

    def action_search(self) -> None:
        box = self.query_one("#log-search", Input)
        box.add_class("-shown")
        box.focus()

    @on(Input.Submitted, "#log-search")
    def _searched(self, event: Input.Submitted) -> None:
        wanted = event.value.strip().lower()
        event.input.remove_class("-shown")  # back to the log: n / N / w / f answer again
        self.query_one("#full-log").focus()
        self.following = False  # a match to read: stop following (before the redraw, which would scroll down)
        if wanted != self.query_text:
            self.query_text = wanted
            self.matches = [i for i, line in enumerate(self.lines) if wanted and wanted in line.lower()]
            self.match = -1
            self.redraw()
        self.call_after_refresh(self.action_next_match)  # once the redrawn lines are laid out

    def action_next_match(self) -> None:
        self._go(+1)

    def action_previous_match(self) -> None:
        self._go(-1)

    def _go(self, step: int) -> None:
        if not self.matches:
            if self.query_text:
                self.app.notify(f"no line holds {self.query_text!r}", severity="warning")
            return
        self.match = (self.match + step) % len(self.matches)
        self.following = False  # a match to read: stop following
        log = self.query_one("#full-log", RichLog)
        log.auto_scroll = False
        y = self._starts[self.matches[self.match]] if self.matches[self.match] < len(self._starts) else 0
        log.scroll_to(y=max(0, y - 2), animate=False, immediate=True)
        self._info()

    def action_wrap(self) -> None:
        self.wrap = not self.wrap
        self.redraw()

    def action_follow(self) -> None:
        self.following = not self.following
        log = self.query_one("#full-log", RichLog)
        log.auto_scroll = self.following
        if self.following:
            log.scroll_end(animate=False, immediate=True)
        self._info()

    def matched_line(self) -> str:
        """The line of the current match ("" without one): what the search landed on."""
        return self.lines[self.matches[self.match]] if self.matches and self.match >= 0 else ""
