"""The runs table (the start screen): every run and queued launch, filter, sort, mark, annotate, and the run
actions. The cursor belongs to a run, not a row index: whatever is inserted, removed or re-sorted, it stays on
its run (and moves to a run just launched)."""
from __future__ import annotations

from functools import partial

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.widgets import DataTable, Input, Static

from bcdtui.cells import CONFIG_PREFIX
from bcdtui.runs import COLUMN_TITLES, COLUMNS, RunRow, printable, row_cells
from bcdtui.screens.annotate import AnnotateScreen
from bcdtui.screens.base import OpenComparison, OpenRun, WsScreen, steady_cursors
from bcdtui.screens.dialogs import PromptScreen
from bcdtui.screens.launch import LaunchScreen
from bcdtui.views import empty_state, runs_info, styled_state
from bcdtui.widgets import KeyBar, RunsTable, TopBar
from bcdtui.workstation import ActionError

ADD_PER_SYNC = 400  # rows added to the table per frame: the first paint does not wait for 10,000 of them


class RunsScreen(WsScreen):
    TITLE_TEXT = "Runs"
    BINDINGS = [
        Binding("enter", "open", "Open", priority=True, tooltip="open the run: live chart, blocks, log, status"),
        Binding("l", "launch", "Launch", tooltip="launch a recipe (overrides, GPUs, per-GPU limit, sweep preview)"),
        Binding("k", "kill", "Kill",
                tooltip="SIGTERM to the run's process group (it checkpoints, ends killed), SIGKILL after the "
                        "grace period; cancels a queued launch (asks first; refused when it is not running)"),
        Binding("r", "rerun", "Rerun", tooltip="run the same resolved recipe again as a new run"),
        Binding("u", "resume", "Resume", tooltip="continue a killed or failed run from its checkpoint (bcdcore run "
                                                 "--resume; refused for a finished or live run)"),
        Binding("d", "delete", "Delete", tooltip="delete the run directory (asks first; refused while it runs)"),
        Binding("a", "annotate", "Annotate", tooltip="the run's display name, tags and notes (stored in the run)"),
        Binding("space", "mark", "Mark", tooltip="mark or unmark the run for compare"),
        Binding("c", "compare", "Compare", tooltip="compare the marked runs: overlaid curves and recipe differences"),
        Binding("slash", "filter", "Filter", key_display="/",
                tooltip="filter by words in the id, name, recipe, state, GPU, tags or notes; tag:X and state:X "
                        "match exactly (escape clears)"),
        Binding("f", "state_filter", "States", tooltip="cycle the state filter: all, active, finished, problems"),
        Binding("s", "sort", "Sort", tooltip="sort by the next column"),
        Binding("S", "reverse", "Reverse", tooltip="reverse the sort order"),
        Binding("o", "columns", "Columns", show=False,
                tooltip="config columns: recipe keys shown at 160 columns and wider (e.g. algorithm.K)"),
        Binding("e", "recipes", "Recipes", show=False, tooltip="the recipes screen"),
        Binding("q", "app.quit_app", "Quit", show=False, tooltip="quit, as ctrl+q"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.marked: list[str] = []
        self._cells: dict[str, tuple] = {}
        self._dirty: set[str] = set()
        self.columns: tuple[str, ...] = COLUMNS  # the table's columns now (COLUMNS, then cfg:KEY at >= 160)
        self.follow: str | None = None  # a run just launched ("job:ID" or a run id): the cursor goes to it
        self.cursor_run: str | None = None  # the run the cursor is on (the table's row index follows it)

    def compose(self) -> ComposeResult:
        yield TopBar(f"Runs in {self.ws.runs_dir}", id="topbar")
        yield Input(placeholder="filter: words in id, name, recipe, state, GPU, tags, notes; tag:X state:X",
                    id="filter")
        table = RunsTable(id="runs", cursor_type="row", zebra_stripes=True)
        table.fixed_columns = 1
        yield table
        yield Static("", id="empty")
        yield Static("", id="runs-info")
        yield KeyBar()

    def on_mount(self) -> None:
        steady_cursors(self)
        self._set_columns()
        self.query_one("#runs", DataTable).focus()

    def wanted_columns(self) -> tuple[str, ...]:
        """COLUMNS, plus the config columns the user picked when the terminal is 160 columns or wider."""
        wide = (self.size.width or self.app.size.width) >= 160
        keys = self.ws.model.config_keys if wide else ()
        return COLUMNS + tuple(CONFIG_PREFIX + k for k in keys)

    def _set_columns(self) -> None:
        table = self.query_one("#runs", DataTable)
        self.columns = self.wanted_columns()
        table.clear(columns=True)
        self._cells.clear()
        for col in self.columns:
            table.add_column(col.removeprefix(CONFIG_PREFIX) if col.startswith(CONFIG_PREFIX) else COLUMN_TITLES[col],
                             key=col)
        self.rebuild()

    def on_resize(self) -> None:
        if self.is_mounted and self.wanted_columns() != self.columns:
            self._set_columns()

    # --- syncing the table with the model
    # The DataTable measures every cell it is given, so the table is kept in step row by row (add, update,
    # remove) and reordered with DataTable.sort, never cleared and refilled: at 1,000 runs a refill costs
    # about half a second of measuring, an update a few milliseconds.
    def note(self, result) -> None:
        """The app's refresh result; applied now when on top, else when this screen is shown again."""
        self._dirty |= result.added | result.removed | result.changed
        if self.is_current:
            self.on_screen_resume()

    def on_screen_resume(self) -> None:
        try:
            self.sync()
        except NoMatches:  # the app is closing: the widgets are going
            pass

    def cells(self, row: RunRow) -> tuple:
        keys = tuple(c.removeprefix(CONFIG_PREFIX) for c in self.columns if c.startswith(CONFIG_PREFIX))
        c = row_cells(row, keys)
        run = Text(("● " if row.id in self.marked else "") + c["run"], style="bold" if row.id in self.marked else "")
        # Text, never str: a DataTable reads a str as markup, and a run's recipe or GPU comes from its files
        return (run, styled_state(c["state"]), *(Text(c[k]) for k in self.columns[2:]))

    def sync(self, ids: set[str] | None = None) -> None:
        """Bring the rows named in `ids` (default: those the refreshes marked) in line with the model; the cursor
        stays on its run."""
        if ids is None:
            ids, self._dirty = self._dirty, set()
        if not ids:
            self._update_info()
            return
        model = self.ws.model
        table = self.query_one("#runs", DataTable)
        keep = self.cursor_run if self.cursor_run in self._cells else None  # an empty table: the first row
        sort_index = self.columns.index(model.sort_column) if model.sort_column in self.columns else 0
        reorder = False
        view = None  # the model's order, computed at most once per sync (a sort of every row)
        new_ids = [r for r in ids if r not in self._cells]
        if len(new_ids) > ADD_PER_SYNC:  # thousands of new rows (the first start): the top ones now, the rest
            view = model.view()  # in the next frames, in view order
            rank = {r.id: i for i, r in enumerate(view)}
            new_ids.sort(key=lambda r: rank.get(r, len(rank)))
            later = set(new_ids[ADD_PER_SYNC:])
            ids = set(ids) - later
            self._dirty |= later
            self.call_after_refresh(self.on_screen_resume)
        for run_id in ids:
            row = model.rows.get(run_id)
            shown = run_id in self._cells
            if row is None or not model.matches(row):
                if shown:
                    table.remove_row(run_id)
                    del self._cells[run_id]
                continue
            new = self.cells(row)
            if not shown:
                table.add_row(*new, key=run_id)
                reorder = True
            else:
                old = self._cells[run_id]
                merged = []
                for col, a, b in zip(self.columns, old, new):
                    if a != b:  # a cell grown past its column widens it (never cut); a narrower one leaves it
                        # (DataTable re-measures the whole column when a cell shrinks: 10,000 cells)
                        wider = b.cell_len > table.columns[col].content_width
                        table.update_cell(run_id, col, b, update_width=wider)
                    merged.append(b if a != b else a)  # the objects the table holds (reorder keys on them)
                reorder |= old[sort_index] != new[sort_index]
                new = tuple(merged)
            self._cells[run_id] = new
        if reorder:
            self.reorder(view)
        self._place_cursor(keep)
        self._update_info()

    def _place_cursor(self, keep: str | None) -> None:
        """The cursor on the run just launched (once it shows), else on the run it was on."""
        target = keep
        if self.follow is not None:
            follow = self.follow = self.ws.launch_row(self.follow)
            if follow in self._cells:
                target = follow
                if not follow.startswith("job:"):
                    self.follow = None  # arrived at its run directory
        table = self.query_one("#runs", DataTable)
        if target in self._cells:
            index = table.get_row_index(target)
            if index != table.cursor_row:
                table.move_cursor(row=index, animate=False)
            self.cursor_run = target
        else:
            self.cursor_run = self.current_id()

    @on(DataTable.RowHighlighted, "#runs")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.cursor_run = self.current_id()  # where the cursor is now (the event may predate a re-sort)

    def reorder(self, view: list[RunRow] | None = None) -> None:
        """Order the table's rows as the model's view, keeping the cursor's run (no sort when in order)."""
        table = self.query_one("#runs", DataTable)
        current = self.cursor_run if self.cursor_run in self._cells else None  # None: the first row, once sorted
        order = [r.id for r in (self.ws.model.view() if view is None else view) if r.id in self._cells]
        if [row.key.value for row in table.ordered_rows] != order:
            position = {id(self._cells[run_id][0]): i for i, run_id in enumerate(order)}
            table.sort("run", key=lambda cell: position.get(id(cell), len(position)))
        if current in self._cells:
            table.move_cursor(row=table.get_row_index(current), animate=False)
            self.cursor_run = current

    def rebuild(self) -> None:
        """Re-check every run against the filter and the order (after a filter or sort change)."""
        self._dirty.clear()  # all of them now (or, by thousands, the top ones now and the rest left dirty)
        self.sync(set(self.ws.model.rows) | set(self._cells))
        self.reorder()

    def _update_info(self) -> None:
        model = self.ws.model
        info = runs_info(model, len(self._cells), len(self.marked))
        if info != getattr(self, "_info", None):
            self._info = info
            self.query_one("#runs-info", Static).update(info)
        empty = self.query_one("#empty", Static)
        first_start = not model.rows
        empty.display = first_start
        table = self.query_one("#runs", DataTable)
        if table.display == first_start:  # shown again once there is a run: it takes the keys again
            table.display = not first_start
            if not first_start and not self.query_one("#filter", Input).has_focus:
                table.focus()
        if first_start:
            empty.update(empty_state(self.ws.runs_dir, self.ws.recipes_dir, self.app.size.width))

    def current_id(self) -> str | None:
        table = self.query_one("#runs", DataTable)
        try:
            return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        except Exception:  # noqa: BLE001 - an empty or changing table
            return None

    def _current(self) -> str | None:
        run_id = self.current_id()
        if run_id is None:
            self.app.notify("no run selected", severity="warning")
        return run_id

    # --- actions
    @on(DataTable.RowSelected, "#runs")
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_open()

    def action_open(self) -> None:
        box = self.query_one("#filter", Input)
        if box.has_focus:
            self._filter_done(Input.Submitted(box, box.value))
            return
        run_id = self._current()
        if run_id is None:
            return
        if run_id in self.ws.model.rows:  # a launch without a run directory opens too: its state and output
            self.post_message(OpenRun(run_id))

    def action_launch(self) -> None:
        """The launch dialog, with the highlighted run's recipe chosen (a new run of what the user looks at)."""
        self.app.push_screen(LaunchScreen(self.ws.recipe_for_run(self.current_id())), self._launched)

    def _launched(self, jobs) -> None:
        if jobs:
            self.app.notify(f"queued {len(jobs)} run{'s' if len(jobs) > 1 else ''}")
            self.launched(jobs[0])
            self.app.refresh_now()

    def launched(self, job) -> None:
        self.follow = f"job:{job.id}"
        self._place_cursor(self.cursor_run)

    def action_kill(self) -> None:
        self.run_action(self._current(), "kill")

    def action_rerun(self) -> None:
        self.run_action(self._current(), "rerun")

    def action_resume(self) -> None:
        self.run_action(self._current(), "resume")

    def action_delete(self) -> None:
        run_id = self._current()
        if run_id is None:
            return
        row = self.ws.model.rows.get(run_id)
        what = (f"the launch {row.recipe}" if row is not None and row.job_id
                else f"run {printable(row.display if row else run_id)} and all its files")
        self.app.confirm(f"Delete {what}?", partial(self._delete_confirmed, run_id))

    def _delete_confirmed(self, run_id: str, yes: bool | None) -> None:
        if not yes:
            return
        try:
            self.app.notify(self.ws.delete(run_id))
            if run_id in self.marked:
                self.marked.remove(run_id)
            self.app.refresh_now()
        except ActionError as exc:
            self.fail(exc)

    def action_annotate(self) -> None:
        run_id = self._current()
        if run_id is None:
            return
        row = self.ws.model.rows.get(run_id)
        if row is None or row.path is None:
            self.app.notify("a launch without a run directory has nothing to annotate yet", severity="warning")
            return
        self.app.push_screen(AnnotateScreen(run_id), self._annotated)

    def _annotated(self, stored) -> None:
        if stored is not None:
            self.sync()

    def action_columns(self) -> None:
        keys = " ".join(self.ws.model.config_keys)
        self.app.push_screen(PromptScreen(f"Config columns (recipe keys, space separated; shown at 160 columns and "
                                          f"wider), now: {keys or 'none'}", "algorithm.K algorithm.lambda"),
                             self._columns_chosen)

    def _columns_chosen(self, answer: str | None) -> None:
        if answer is None:
            return
        self.ws.model.set_config_keys([] if answer.strip() == "-" else answer.replace(",", " ").split())
        if (self.size.width or self.app.size.width) < 160:
            self.app.notify("config columns show at 160 columns and wider", severity="information")
        self._set_columns()

    def action_mark(self) -> None:
        run_id = self._current()
        if run_id is None:
            return
        if run_id in self.marked:
            self.marked.remove(run_id)
        else:
            self.marked.append(run_id)
        self._dirty.add(run_id)
        self.sync()
        table = self.query_one("#runs", DataTable)
        if table.cursor_row < table.row_count - 1:
            table.move_cursor(row=table.cursor_row + 1)

    def action_compare(self) -> None:
        ids = [r for r in self.marked if r in self.ws.model.rows]
        if len(ids) < 2:
            self.app.notify("mark two or more runs with space, then press c", severity="warning")
            return
        try:
            comparison = self.ws.compare(ids)
        except ActionError as exc:
            self.fail(exc)
            return
        self.post_message(OpenComparison(comparison))

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.add_class("-shown")
        box.focus()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.ws.model.filter_text = event.value
        self.rebuild()

    @on(Input.Submitted, "#filter")
    def _filter_done(self, event: Input.Submitted) -> None:
        if not event.value:
            event.input.remove_class("-shown")
        self.query_one("#runs", DataTable).focus()

    def key_escape(self) -> None:
        box = self.query_one("#filter", Input)
        if box.has_focus or box.has_class("-shown"):
            box.value = ""
            box.remove_class("-shown")
            self.query_one("#runs", DataTable).focus()

    def action_state_filter(self) -> None:
        self.ws.model.cycle_state_filter()
        self.rebuild()

    def action_sort(self) -> None:
        self.ws.model.cycle_sort()
        self.rebuild()

    def action_reverse(self) -> None:
        model = self.ws.model
        model.sort_by(model.sort_column, not model.sort_reverse)
        self.rebuild()

    @on(DataTable.HeaderSelected, "#runs")
    def _header(self, event: DataTable.HeaderSelected) -> None:
        self.ws.model.sort_by(str(event.column_key.value))
        self.rebuild()

    def action_recipes(self) -> None:
        self.app.action_show_recipes()
