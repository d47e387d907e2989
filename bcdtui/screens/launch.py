"""The launch dialog: recipe, overrides, slots (GPUs or the CPU), per-slot limit, and the plan it would start."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, SelectionList, Static

from bcdtui.recipes import list_recipes, parse_overrides
from bcdtui.screens.base import NO_CHOICE, steady_cursors
from bcdtui.views import launch_preview
from bcdtui.workstation import ActionError

if TYPE_CHECKING:
    from bcdtui.workstation import Workstation


class LaunchScreen(ModalScreen):
    """Recipe, overrides, slots (GPUs, or the CPU), per-slot limit and the plan: what will start where."""

    BINDINGS = [
        Binding("ctrl+l", "launch", "Launch", priority=True,
                tooltip="start: queue the run(s); each starts when its slot has room"),
        Binding("escape", "cancel", "Cancel", tooltip="close without launching"),
    ]

    def __init__(self, recipe: Path | None = None) -> None:
        super().__init__()
        self.recipe = recipe
        self.plan = None

    @property
    def ws(self) -> "Workstation":
        return self.app.ws  # type: ignore[attr-defined]

    def compose(self) -> ComposeResult:
        ws = self.ws
        files = list_recipes(ws.recipes_dir)
        options = [(ws.recipe_source(p), p) for p in files]
        if self.recipe is not None and all(p.resolve() != Path(self.recipe).resolve() for p in files):
            options.insert(0, (ws.recipe_source(self.recipe), Path(self.recipe)))
        value = next((p for _, p in options if self.recipe is not None
                      and p.resolve() == Path(self.recipe).resolve()), options[0][1] if options else NO_CHOICE)
        usage = ws.slot_usage()
        with Vertical(id="dialog"):
            yield Label("[b]Launch[/b]  (ctrl+l starts, escape cancels)")
            with Horizontal(classes="row"):
                yield Label("recipe", classes="label")
                yield Select(options, value=value, allow_blank=not options, id="recipe", prompt="no recipes found",
                             compact=True)
            with Horizontal(classes="row"):
                yield Label("overrides", classes="label")
                yield Input(placeholder="algorithm.K=5 run.seed=1  (KEY=VALUE, space separated)", id="overrides",
                            compact=True)
            with Horizontal(classes="row"):
                yield Label("GPUs" if any(s.is_gpu for s in ws.slots) else "slots", classes="label")
                yield SelectionList(*[(f"{s.label}  [{usage.get(s.key, 0)} running]", s.key, True)
                                      for s in ws.slots], id="slots", compact=True)
            with Horizontal(classes="row"):
                yield Label("per slot", classes="label")
                yield Input(str(ws.runner.per_slot), id="per-slot", type="integer", compact=True)
                yield Static("", id="queue-info")
            yield Static("", id="plan")
            with Horizontal(id="buttons"):
                yield Button("Launch ^l", variant="primary", id="launch", compact=True)
                yield Button("Cancel esc", id="cancel", compact=True)

    def on_mount(self) -> None:
        steady_cursors(self)
        self.update_plan()
        self.query_one("#overrides", Input).focus()

    def choices(self) -> tuple[Path | None, list[str], list[str], int]:
        recipe = self.query_one("#recipe", Select).value
        recipe = None if recipe is NO_CHOICE or recipe is Select.BLANK else Path(recipe)
        overrides = parse_overrides(self.query_one("#overrides", Input).value)
        slots = [str(s) for s in self.query_one("#slots", SelectionList).selected]
        raw = self.query_one("#per-slot", Input).value.strip()
        per = int(raw) if raw.isdigit() else self.ws.runner.per_slot
        return recipe, overrides, slots, per

    @on(Select.Changed)
    @on(Input.Changed)
    @on(SelectionList.SelectedChanged)
    def update_plan(self, event=None) -> None:
        box = self.query_one("#plan", Static)
        queue = len(self.ws.runner.queued())
        self.query_one("#queue-info", Static).update(f"queue: {queue} waiting · a run starts when its slot "
                                                     f"has fewer than this many running")
        self.plan = None
        try:
            recipe, overrides, slots, per = self.choices()
            if recipe is None:
                raise ActionError("no recipe: make one on the recipes screen (F3)")
            if not slots:
                raise ActionError("select at least one slot")
            plan = self.ws.plan(recipe, overrides)
        except Exception as exc:  # noqa: BLE001 - RecipeError / ActionError: shown as the plan
            box.add_class("-error")
            box.update(Text("✗ " + str(exc)))
            return
        self.plan = plan
        box.remove_class("-error")
        lines = launch_preview(plan, self.ws.slot_usage(), slots, per)
        box.update(Text("\n").join(lines))

    @on(Input.Submitted, "#overrides")
    @on(Button.Pressed, "#launch")
    def action_launch(self) -> None:
        try:
            recipe, overrides, slots, per = self.choices()
            if recipe is None:
                raise ActionError("no recipe selected")
            jobs = self.ws.launch(recipe, overrides, slots=slots, per_slot=per)
        except Exception as exc:  # noqa: BLE001 - shown in the dialog (which stays open), not only as a toast
            self.update_plan()
            box = self.query_one("#plan", Static)
            box.add_class("-error")
            box.update(Text("✗ could not launch: " + str(exc)))
            return
        self.dismiss(jobs)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)

