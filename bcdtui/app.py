"""bcdtui: the terminal workstation. `bcdtui [--runs DIR] [--recipes DIR]`.

The app owns one `Workstation` (bcdtui.workstation: runner, runs model, recipes) and refreshes it four times a
second; screens (bcdtui.screens) draw it and turn keys into workstation calls. Runs are detached processes:
quitting leaves them running, and the next start re-attaches to them through their run directories.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from functools import partial
from pathlib import Path
from typing import Iterable

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from bcdcore.recipe import RecipeError
from bcdcore.rundir import default_runs_dir, printable
from bcdtui.keymap import Section, key_map_text
from bcdtui.recipes import add_plugin_dirs
from bcdtui.runner import Slot, cpu_slot, detect_slots
from bcdtui.screens import (
    AnnotateScreen,
    ClusterScreen,
    CompareScreen,
    ConfirmScreen,
    HelpScreen,
    LaunchScreen,
    LogScreen,
    OpenComparison,
    OpenRun,
    RecipesScreen,
    RunScreen,
    RunsScreen,
    WsScreen,
)
from bcdtui.screens.system import SystemScreen
from bcdtui.system import SystemMonitor
from bcdtui.widgets import TopBar
from bcdtui.workstation import Workstation


class BcdApp(App):
    TITLE = "bcdtui"
    BINDINGS = [
        Binding("f1", "help", "Help", tooltip="this key map"),
        Binding("f2", "show_runs", "Runs", tooltip="the runs table (from any screen)"),
        Binding("f3", "show_recipes", "Recipes", tooltip="the recipes screen: tree, editor with live validation"),
        Binding("f4", "show_system", "System", show=False,
                tooltip="the system panel: per GPU utilisation, memory, power; per live run CPU %, RSS, GPU memory"),
        Binding("f5", "show_cluster", "Cluster", show=False,  # in F1, docs and the palette; not in the key bar
                tooltip="queued and running cluster jobs (sweep --slurm); cancel"),
        Binding("ctrl+q", "quit_app", "Quit", priority=True,
                tooltip="quit (runs keep running; the next start re-attaches)"),
    ]
    CSS_PATH = "bcdtui.tcss"

    def __init__(self, runs_dir: Path | str | None = None, recipes_dir: Path | str = "recipes", *,
                 slots: list[Slot] | None = None, per_slot: int = 1, engine: list[str] | None = None,
                 grace_s: float = 30.0, refresh_s: float = 0.25, workstation: Workstation | None = None,
                 confirm: bool | None = None) -> None:
        super().__init__()
        # k and d ask first unless turned off: --no-confirm, or BCDTUI_CONFIRM=0 in the environment
        self.confirm_prompts = confirm if confirm is not None else os.environ.get("BCDTUI_CONFIRM", "1") not in (
            "0", "no", "off", "false")
        self.ws = workstation or Workstation(runs_dir if runs_dir is not None else default_runs_dir(), recipes_dir,
                                             slots=slots, per_slot=per_slot, engine=engine, grace_s=grace_s)
        self.refresh_s = refresh_s
        self.runs_screen: RunsScreen | None = None
        self.first_paint_callbacks: list = []
        self.system_monitor: SystemMonitor | None = None  # made at the first F4 (tests set one with fake readers)

    # --- start
    def get_default_screen(self) -> Screen:
        # re-attach: every run's status and pid are read before the first paint; the events' tails (val, loss)
        # follow over the next refreshes, newest run first (at 10,000 runs they take seconds)
        self.ws.refresh(defer=True)
        self.ws.drain_changes()
        self.runs_screen = RunsScreen()
        return self.runs_screen

    def on_mount(self) -> None:
        self.install_screen(RecipesScreen(), "recipes")
        self.set_interval(self.refresh_s, self.tick)
        self.set_interval(0.05, self.backfill)
        self._update_topbar()
        for callback in self.first_paint_callbacks:
            self.call_after_refresh(callback)

    def notify(self, message: str, *, markup: bool = False, **kwargs) -> None:
        """Messages carry run names, file contents and OS errors: plain printable text, never markup (a run
        named "[/x]" or an ESC in an error must not break the toast or the terminal)."""
        super().notify(printable(str(message)), markup=markup, **kwargs)

    # --- the periodic step
    def tick(self) -> None:
        if not self.screen_stack:  # starting up or shutting down
            return
        self.ws.refresh()
        result = self.ws.drain_changes()
        for message in self.ws.runner.drain_messages():
            self.notify(message, severity="warning", timeout=10)
        if self.runs_screen is not None:
            self.runs_screen.note(result)
        self._update_topbar()
        screen = self.screen
        if isinstance(screen, WsScreen) and screen is not self.runs_screen:
            screen.tick()

    def backfill(self) -> None:
        """After the first load: the deferred events' tails (val, loss), 30 ms at a time between frames."""
        if self.ws.model.pending and self.runs_screen is not None and self.screen_stack:
            self.runs_screen.note(self.ws.model.fill(0.03))

    def refresh_now(self) -> None:
        self.tick()

    def status_line(self) -> str:
        unread = self.ws.model.unread_statuses
        if unread:  # counts and slots are not known until every status is read
            return f"reading the status of {unread:,} more runs…"
        counts = self.ws.model.counts()
        parts = [f"{counts[s]} {s}" for s in ("running", "starting", "queued", "lost", "failed", "unreadable")
                 if counts.get(s)]
        usage = self.ws.slot_usage()
        per = self.ws.runner.per_slot
        parts.append(" ".join(f"{s.key} {usage.get(s.key, 0)}/{per}" for s in self.ws.slots))
        waiting = len(self.ws.runner.queued())
        if waiting:
            parts.append(f"queue {waiting}")
        return " · ".join(parts)

    def _update_topbar(self) -> None:
        if not self.screen_stack:
            return
        line = self.status_line()
        for bar in self.screen.query(TopBar):
            bar.set_right(line)

    # --- navigation and app-wide actions
    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(key_map_text(key_sections())))

    def on_open_run(self, message: OpenRun) -> None:
        self.push_screen(RunScreen(message.run_id))

    def on_open_comparison(self, message: OpenComparison) -> None:
        self.push_screen(CompareScreen(message.comparison))

    def action_show_runs(self) -> None:
        while len(self.screen_stack) > 1 and self.screen is not self.runs_screen:
            self.pop_screen()

    def action_show_recipes(self) -> None:
        recipes = self.get_screen("recipes")
        if recipes in self.screen_stack:
            while self.screen is not recipes:
                self.pop_screen()
        else:
            self.action_show_runs()
            self.push_screen("recipes")

    def action_show_system(self) -> None:
        if any(isinstance(s, SystemScreen) for s in self.screen_stack):  # one panel (and one sampler) at a time
            while not isinstance(self.screen, SystemScreen):
                self.pop_screen()
            return
        if self.system_monitor is None:
            self.system_monitor = SystemMonitor()  # kept: the GPU probe's answer and psutil's CPU baselines
        self.push_screen(SystemScreen(self.system_monitor, socket.gethostname()))

    def action_show_cluster(self) -> None:
        if not isinstance(self.screen, ClusterScreen):
            self.push_screen(ClusterScreen())

    def confirm(self, message: str, then) -> None:
        """Ask yes/no, then call `then(answer)`; with prompts turned off, `then(True)` at once."""
        if self.confirm_prompts:
            self.push_screen(ConfirmScreen(message), then)
        else:
            then(True)

    def action_quit_app(self) -> None:
        """Quit; unsaved recipe edits always ask first (whatever the prompt setting), then queued launches."""
        recipes = self.get_screen("recipes") if self.is_screen_installed("recipes") else None
        if recipes is not None and recipes.is_mounted and recipes.dirty:
            name = self.ws.recipe_source(recipes.path)
            self.push_screen(ConfirmScreen(f"{name} has unsaved changes that quitting would lose. Quit anyway? "
                                           "(n, then ctrl+s on the recipes screen saves them)"),
                             lambda yes: yes and self._quit_queued())
            return
        self._quit_queued()

    def _quit_queued(self) -> None:
        waiting = len(self.ws.runner.queued())
        if not waiting:
            self.exit()
            return
        self.push_screen(ConfirmScreen(f"{waiting} launch{'es are' if waiting > 1 else ' is'} still queued; "
                                       "queued launches start only while bcdtui runs (they are kept for the next "
                                       "start). Started runs keep running. Quit?"),
                         lambda yes: yes and self.exit())

    # --- command palette: every key of the current screen, plus the app's
    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        seen: set[str] = set()
        for _key, (node, binding, enabled, _tooltip) in screen.active_bindings.items():
            if not binding.description or binding.action in seen or not enabled:
                continue
            seen.add(binding.action)
            key = self.get_key_display(binding)
            yield SystemCommand(binding.description, f"key {key}", partial(self._run_binding, node, binding.action))
        yield from super().get_system_commands(screen)

    def _run_binding(self, node, action: str) -> None:
        self.call_later(self.run_action, action, node)


def key_sections() -> list[Section]:
    """Every screen's keys, in the order a user meets them: what F1 shows and docs/tui.md lists."""
    return [
        ("Everywhere", BcdApp.BINDINGS, [("ctrl+p", "command palette: every action of the screen, by name")]),
        ("Runs (the start screen)", RunsScreen.BINDINGS, [
            ("up / down, pgup / pgdn", "move in the table (the cursor stays on its run through changes)"),
            ("left / right", "scroll the table one column (the run id stays)")]),
        ("Run (enter on a run)", RunScreen.BINDINGS, []),
        ("Full-screen log (L on a run)", LogScreen.BINDINGS, []),
        ("Annotate (a on a run)", AnnotateScreen.BINDINGS, [("tab", "next field")]),
        ("Compare (space marks runs, c compares)", CompareScreen.BINDINGS, []),
        ("System (F4)", SystemScreen.BINDINGS, []),
        ("Recipes (F3 or e)", RecipesScreen.BINDINGS, [("tab", "move focus: tree, editor (tab never inserts; "
                                                               "indent with spaces)"),
                                                       ("enter (tree)", "edit the highlighted recipe")]),
        ("Launch dialog (l, or ctrl+l on a recipe)", LaunchScreen.BINDINGS, [("tab", "next field; space ticks a GPU")]),
        ("Cluster jobs (F5)", ClusterScreen.BINDINGS, []),
        ("Confirmations", ConfirmScreen.BINDINGS, []),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bcdtui", description="Terminal workstation over recipes and run "
                                                                "directories (runs keep running when it quits)")
    parser.add_argument("--runs", type=Path, default=None, help="runs directory (default ./runs or $BCD_RUNS)")
    parser.add_argument("--recipes", type=Path, default=Path("recipes"), help="recipes directory (default ./recipes)")
    parser.add_argument("--per-gpu", type=int, default=1, metavar="N",
                        help="runs at once per GPU (or on the CPU when there is no GPU); default 1")
    parser.add_argument("--gpus", default=None, metavar="LIST",
                        help="GPU indices to use, e.g. 0,2 (default: all that nvidia-smi reports); 'none' = CPU")
    parser.add_argument("--grace", type=float, default=30.0, metavar="S",
                        help="seconds between SIGTERM and SIGKILL when killing a run (default 30)")
    parser.add_argument("--plugins", action="append", type=Path, default=[], metavar="DIR",
                        help="a folder of your own packages named by recipes (models, datasets, solvers); runs "
                             "launched from here get it on PYTHONPATH")
    parser.add_argument("--no-confirm", action="store_true",
                        help="k (kill) and d (delete) act without asking (also BCDTUI_CONFIRM=0); unsaved recipe "
                             "edits still ask")
    args = parser.parse_args(argv)
    if args.plugins:
        try:
            add_plugin_dirs(args.plugins)
        except RecipeError as exc:
            parser.error(str(exc))
    if args.per_gpu < 1:
        parser.error("--per-gpu must be at least 1")
    if args.gpus is not None and args.gpus.strip().lower() in ("none", "cpu", ""):
        slots = [cpu_slot()]
    else:
        slots = detect_slots()
        if args.gpus is not None:
            wanted = {f"gpu{g.strip()}" for g in args.gpus.split(",") if g.strip()}
            slots = [s for s in slots if s.key in wanted]
            if not slots:
                parser.error(f"--gpus {args.gpus}: no such GPU here")
    app = BcdApp(args.runs, args.recipes, slots=slots, per_slot=args.per_gpu, grace_s=args.grace,
                 confirm=False if args.no_confirm else None)
    app.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
