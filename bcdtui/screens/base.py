"""What every screen shares: the workstation at hand, steady cursors in tests, the chart keys, navigation."""
from __future__ import annotations

from typing import TYPE_CHECKING

from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Select

from bcdcore.rundir import printable
from bcdtui.tailer import X_AXES
from bcdtui.workstation import ActionError, Comparison

if TYPE_CHECKING:
    from bcdtui.workstation import Workstation

FOLLOW_S = 0.1  # how often an open run (or comparison) reads its new events
NO_CHOICE = getattr(Select, "NULL", Select.BLANK)  # an empty Select's value (Textual 8 renamed BLANK to NULL)


def steady_cursors(screen) -> None:
    """Headless (tests, snapshots): no blinking cursors, so what is drawn does not depend on the moment."""
    if screen.app.is_headless:
        for widget in screen.query("Input, TextArea"):
            widget.cursor_blink = False


class WsScreen(Screen):
    """A screen with the app's workstation at hand and the shared top bar / key bar."""

    TITLE_TEXT = ""

    @property
    def ws(self) -> "Workstation":
        return self.app.ws  # type: ignore[attr-defined]

    def fail(self, exc: Exception) -> None:
        self.app.notify(str(exc), severity="error", timeout=8)

    def run_action(self, run_id: str | None, action: str) -> None:
        """kill / rerun / resume `run_id` through the workstation; the outcome becomes a notification. A kill is
        refused at once where it cannot apply, and asks first (as delete does) unless prompts are off."""
        if run_id is None:
            return
        if action == "kill":
            problem = self.ws.kill_problem(run_id)
            if problem:
                self.app.notify(problem, severity="warning", timeout=8)
                return
            what = self.ws.row(run_id)
            label = what.recipe if what.job_id else what.display
            self.app.confirm(f"Kill {printable(label)}? It finishes its round, checkpoints and ends as killed "  # type: ignore[attr-defined]
                             "(u resumes it).", lambda yes: yes and self._act(run_id, action))
            return
        self._act(run_id, action)

    def _act(self, run_id: str, action: str) -> None:
        try:
            if action == "kill":
                message = self.ws.kill(run_id)
            elif action == "rerun":
                self.launched(self.ws.rerun(run_id))
                message = f"queued a rerun of {run_id}"
            else:
                self.launched(self.ws.resume(run_id))
                message = f"queued: resume {run_id}"
        except ActionError as exc:
            self.fail(exc)
            return
        self.app.notify(message)
        self.app.refresh_now()  # type: ignore[attr-defined]

    def launched(self, job) -> None:
        """A launch this screen made (the runs screen moves its cursor to it)."""

    def tick(self) -> None:
        """Called by the app after every workstation refresh while this screen is on top."""



# ----------------------------------------------------------------------------------------------------------
# a metric chart's keys (the run screen and the compare screen)

CHART_BINDINGS = [
    Binding("escape", "back", "Back", tooltip="back to the previous screen"),
    Binding("y", "metric", "Metric", tooltip="chart the next metric (train_loss, val_loss, val_acc, ...)"),
    Binding("x", "x_axis", "X axis", tooltip="x axis: round, grad_evals, wall_s, samples, flops"),
    Binding("g", "log_y", "Log y", tooltip="toggle a logarithmic y axis"),
]


class ChartAxes:
    """Mixin of a screen with one metric chart: the back key, and the metric / x axis / log y keys, which change
    what is charted and redraw. The screen lists CHART_BINDINGS in its BINDINGS (kept there, not here, so that
    each screen's key bar order stays explicit) and provides `chart_metrics()` and `_draw_chart()`."""

    # the chart at first: train_loss against rounds, linear y (class defaults; the keys set them per screen)
    metric = "train_loss"
    x_axis = "round"
    log_y = False

    def chart_metrics(self) -> list[str]:
        """The metric names the y key cycles through."""
        raise NotImplementedError

    def _draw_chart(self) -> None:
        raise NotImplementedError

    def chart_title(self, value: str = "") -> str:
        """The chart's border title: the metric (then `value`, e.g. its latest one), the x axis, log y or not."""
        return f"{self.metric}{value} vs {self.x_axis}{' (log y)' if self.log_y else ''}"

    def action_back(self) -> None:
        self.app.pop_screen()  # type: ignore[attr-defined]

    def action_metric(self) -> None:
        names = self.chart_metrics()
        self.metric = names[(names.index(self.metric) + 1) % len(names)] if self.metric in names else names[0]
        self._draw_chart()

    def action_x_axis(self) -> None:
        self.x_axis = X_AXES[(X_AXES.index(self.x_axis) + 1) % len(X_AXES)]
        self._draw_chart()

    def action_log_y(self) -> None:
        self.log_y = not self.log_y
        self._draw_chart()


# ----------------------------------------------------------------------------------------------------------
# navigation: a screen says where the user wants to go and the app opens it, so screens do not import each other

class OpenRun(Message):
    """Open the run screen of `run_id`."""

    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id


class OpenComparison(Message):
    """Open the compare screen over `comparison`."""

    def __init__(self, comparison: Comparison) -> None:
        super().__init__()
        self.comparison = comparison
