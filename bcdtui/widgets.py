"""Small widgets: they draw what they are given (charts, keys, a status line) and hold no workstation logic."""
from __future__ import annotations

from typing import Sequence

from rich.segment import Segment
from rich.text import Text
from textual.binding import Binding
from textual.strip import Strip
from textual.widget import Widget
from textual.widgets import DataTable, Static, TextArea

from bcdtui.charts import Series, heat_map, line_chart


class KeyBar(Static):
    """The footer: every key the current screen answers to (bindings with show=True), wrapped over as many
    lines as the width needs, so nothing is cut off at 80 columns."""

    DEFAULT_CSS = """
    KeyBar {
        dock: bottom;
        height: auto;
        max-height: 4;
        background: $footer-background;
        color: $footer-foreground;
        padding: 0 1;
    }
    """

    def on_mount(self) -> None:
        self.screen.bindings_updated_signal.subscribe(self, self._bindings_changed)
        self.call_after_refresh(self._update)

    def on_unmount(self) -> None:
        self.screen.bindings_updated_signal.unsubscribe(self)

    def _bindings_changed(self, screen) -> None:
        if self.is_attached and screen is self.screen:
            self._update()

    def on_resize(self) -> None:
        self._update()

    def entries(self) -> list[tuple[str, str, bool]]:
        """(key display, description, enabled) of the shown bindings, one per action."""
        seen: set[str] = set()
        out = []
        for _node, binding, enabled, _tooltip in self.screen.active_bindings.values():
            if not binding.show or binding.action in seen:
                continue
            seen.add(binding.action)
            out.append((self.app.get_key_display(binding), binding.description, enabled))
        palette = self.app.COMMAND_PALETTE_BINDING
        if self.app.ENABLE_COMMAND_PALETTE and "command_palette" not in seen:
            out.append((self.app.get_key_display(Binding(palette, "command_palette")), "palette", True))
        return out

    def _update(self) -> None:
        width = max(20, (self.size.width or self.app.size.width) - 2)
        text = Text(no_wrap=False, overflow="fold")
        line_len = 0
        for key, desc, enabled in self.entries():
            item_len = len(key) + 1 + len(desc) + 2
            if line_len and line_len + item_len > width:
                text.append("\n")
                line_len = 0
            text.append(f" {key} ", style="bold reverse" if enabled else "dim reverse")
            text.append(f" {desc} ", style="" if enabled else "dim")
            line_len += item_len + 1
        self.update(text)


class TopBar(Static):
    """One line: the screen's title on the left, the workstation's live counts on the right."""

    DEFAULT_CSS = """
    TopBar {
        dock: top;
        height: 1;
        background: $panel;
        color: $foreground;
        padding: 0 1;
    }
    """

    def __init__(self, title: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.title_text = title
        self.right = ""

    def set_title(self, title: str) -> None:
        self.title_text = title
        self._draw()

    def set_right(self, right: str) -> None:
        if right != self.right:
            self.right = right
            self._draw()

    def on_mount(self) -> None:
        status_line = getattr(self.app, "status_line", None)
        if callable(status_line) and not self.right:
            self.right = status_line()
        self._draw()

    def on_resize(self) -> None:
        self._draw()

    def _draw(self) -> None:
        width = max(10, (self.size.width or 80) - 2)
        left = Text(self.title_text, style="bold")
        right = Text(self.right, style="dim")
        space = width - left.cell_len - right.cell_len
        if space < 1:
            left.truncate(max(1, width - right.cell_len - 1), overflow="ellipsis")
            space = max(1, width - left.cell_len - right.cell_len)
        self.update(Text.assemble(left, " " * space, right))


class TextLines(Widget):
    """Draws a list of rich Text lines exactly as given: one line per row, cropped, never wrapped (charts and
    status lines whose columns must stay where they were put). Subclasses override `build(width, height)`."""

    DEFAULT_CSS = """
    TextLines { height: auto; }
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._lines: list[Text] | None = None
        self._strips: dict[int, Strip] = {}
        self._drawn_size = (0, 0)

    def build(self, width: int, height: int) -> list[Text]:
        return []

    def invalidate(self) -> None:
        self._lines = None
        self._strips = {}
        self.refresh()

    def lines(self) -> list[Text]:
        size = (self.content_size.width, self.content_size.height)
        if self._lines is None or size != self._drawn_size:
            self._drawn_size = size
            self._lines = self.build(*size)
            self._strips = {}
        return self._lines

    def get_content_height(self, container, viewport, width: int) -> int:
        return len(self.build(width, 0))

    def render_line(self, y: int) -> Strip:
        lines = self.lines()
        width = self.content_size.width
        if y >= len(lines):
            return Strip.blank(width, self.rich_style)
        strip = self._strips.get(y)
        if strip is None:
            line = lines[y].copy()
            line.no_wrap, line.overflow, line.end = True, "crop", ""
            segments = list(line.render(self.app.console))
            base = self.rich_style
            segments = [Segment(t, base + st if st else base, c) for t, st, c in segments]
            strip = Strip(segments).crop_extend(0, width, base)
            self._strips[y] = strip
        return strip


class StatusLines(TextLines):
    """A few fixed lines (the run screen's status)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.text_lines: list[Text] = []

    def set_lines(self, lines: list[Text]) -> None:
        if [l.markup for l in lines] != [l.markup for l in self.text_lines]:
            self.text_lines = list(lines)
            self.invalidate()
            self.refresh(layout=True)

    def build(self, width: int, height: int) -> list[Text]:
        """The lines, wrapped at the width (at 80 columns the status line's host:pid and test metrics go on
        the next line instead of off the edge)."""
        if width <= 0:
            return self.text_lines
        out: list[Text] = []
        for line in self.text_lines:
            out += list(line.wrap(self.app.console, width, overflow="fold")) or [Text("")]
        return out


class LineChart(TextLines):
    """A braille line chart of one or more series (bcdtui.charts.line_chart)."""

    DEFAULT_CSS = """
    LineChart {
        height: 1fr;
        min-height: 6;
    }
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.series: list[Series] = []
        self.log_y = False
        self.x_label = ""

    def set_data(self, series: Sequence[Series], *, log_y: bool = False, x_label: str = "") -> None:
        self.series, self.log_y, self.x_label = list(series), log_y, x_label
        self.invalidate()

    def build(self, width: int, height: int) -> list[Text]:
        return line_chart(self.series, width, height, log_y=self.log_y, x_label=self.x_label,
                          legend=len(self.series) > 1)


class HeatMap(TextLines):
    """A matrix as colored half blocks with a scale line (a number or a list is a 1xN matrix)."""

    DEFAULT_CSS = """
    HeatMap {
        height: 1fr;
    }
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.heading = ""
        self.matrix: list[list[float]] | None = None
        self.notes: list[str] = []

    def set_data(self, title: str, matrix: list[list[float]] | None, notes: list[str] | None = None) -> None:
        """`matrix` None shows `notes` only (a measurement that is not numbers: its fields as text)."""
        self.heading, self.matrix, self.notes = title, matrix, list(notes or [])
        self.invalidate()

    def build(self, width: int, height: int) -> list[Text]:
        head = Text(self.heading, style="bold")
        notes = [Text(n, style="dim") for n in self.notes]
        if self.matrix is None:
            return [head, *(notes or [Text("no measurements yet", style="dim")])]
        return [head, *heat_map(self.matrix, width, max(2, height - 1 - len(notes))), *notes]


class RecipeEditor(TextArea):
    """A TOML TextArea that marks the line the validator names."""

    DEFAULT_CSS = """
    RecipeEditor {
        height: 1fr;
    }
    """

    error_line: int | None = None  # 1-based

    def set_error_line(self, line: int | None) -> None:
        if line != self.error_line:
            self.error_line = line
            self._line_cache.clear()
            self.refresh()

    def get_line(self, line_index: int) -> Text:
        text = super().get_line(line_index)
        if self.error_line is not None and line_index == self.error_line - 1:
            text.stylize("on #5f1f1f")
            text.stylize("underline", 0, max(1, len(text.plain)))
        return text


class RunsTable(DataTable):
    """The runs table: left / right scroll by whole columns (the first, the run id, stays put), so a narrow
    terminal reaches every column without cutting one in half."""

    def column_starts(self) -> list[int]:
        """x offsets (in the scrolled part, after the fixed columns) at which each scrollable column starts."""
        widths = [c.get_render_width(self) for c in self.ordered_columns[self.fixed_columns:]]
        starts, x = [], 0
        for w in widths:
            starts.append(x)
            x += w
        return starts

    def scroll_columns(self, step: int) -> None:
        starts = self.column_starts()
        x = round(self.scroll_x)
        if step > 0:
            target = next((s for s in starts if s > x), None)
        else:
            target = next((s for s in reversed(starts) if s < x), 0)
        if target is not None:
            self.scroll_to(x=min(target, self.max_scroll_x), animate=False, immediate=True)

    def action_cursor_right(self) -> None:
        if self.cursor_type == "row":
            self.scroll_columns(+1)
        else:
            super().action_cursor_right()

    def action_cursor_left(self) -> None:
        if self.cursor_type == "row":
            self.scroll_columns(-1)
        else:
            super().action_cursor_left()
