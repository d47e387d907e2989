"""The headless workstation: every action of the UI as a plain method (the screens only call these).

    ws = Workstation("runs", "recipes", slots=[cpu_slot()])
    jobs = ws.launch("recipes/quickstart.toml", ["algorithm.K=5"])
    ws.wait_for(lambda: ws.state_of_job(jobs[0]) == "finished", timeout=120)
    ws.kill(run_id); ws.rerun(run_id); ws.delete(run_id); ws.compare([a, b]); ws.validate(text, path)

`refresh()` is the periodic step (the UI calls it four times a second): the runner starts queued launches
and reaps exited ones, then the runs model re-reads what changed on disk.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bcdcore.annotations import Annotations, read_annotations, update_annotations
from bcdcore.recipe import RecipeError
from bcdcore.rundir import printable
from bcdtui.charts import PALETTE, Series
from bcdtui.diff import DiffRow, diff_runs
from bcdtui.recipes import (
    LaunchPlan,
    Validation,
    display_name,
    full_check,
    list_recipes,
    new_recipe,
    plan_launch,
    save_recipe,
    validate_text,
)
from bcdtui.runner import Job, LaunchSpec, Runner, RunnerError, Slot
from bcdtui.runs import RefreshResult, RunRow, RunsModel
from bcdtui.tailer import RunFollower


class ActionError(Exception):
    """An action the workstation refuses, phrased as the one line the user sees."""


@dataclass
class Comparison:
    run_ids: list[str]
    followers: list[RunFollower]
    diff: list[DiffRow]

    def metric_names(self) -> list[str]:
        names: list[str] = []
        for f in self.followers:
            for m in f.metric_names():
                if m not in names:
                    names.append(m)
        return names or ["train_loss"]

    def series(self, metric: str, x: str = "round") -> list[Series]:
        out = []
        for i, (run_id, f) in enumerate(zip(self.run_ids, self.followers)):
            xs, ys = f.series(metric, x)
            out.append(Series(f"{i + 1}: {printable(run_id)}", xs, ys, PALETTE[i % len(PALETTE)]))
        return out


class Workstation:
    def __init__(self, runs_dir: Path | str, recipes_dir: Path | str = "recipes", *, runner: Runner | None = None,
                 slots: list[Slot] | None = None, per_slot: int = 1, engine: list[str] | None = None,
                 grace_s: float = 30.0, cwd: Path | None = None) -> None:
        self.runs_dir = Path(runs_dir)
        self.recipes_dir = Path(recipes_dir)
        self.engine = engine
        self.runner = runner or Runner(self.runs_dir, slots=slots, per_slot=per_slot, engine=engine,
                                       grace_s=grace_s, cwd=cwd)
        self.model = RunsModel(self.runs_dir)
        self._changes = RefreshResult()

    # --- the periodic step
    def refresh(self, defer: bool = False, fill_s: float = 0.03) -> RefreshResult:
        """The periodic step. `defer` (the first load): statuses now, the events' tails later; each refresh then
        reads deferred tails for up to `fill_s` seconds."""
        self.runner.tick(live=self.known_live())
        result = self.model.refresh(jobs=list(self.runner.jobs.values()), defer=defer)
        if self.model.pending and not defer:
            result.merge(self.model.fill(fill_s))
        self._changes.merge(result)
        return result

    def known_live(self) -> list[tuple[str, str]] | None:
        """The model's live runs, or None while the first load still reads statuses (the runner then scans for
        them itself: a slot is never taken as free because its run's status is not read yet)."""
        return None if self.model.unread_statuses else self.model.live_runs()

    def drain_changes(self) -> RefreshResult:
        """Everything that changed since the last call (across refreshes made by actions too)."""
        out, self._changes = self._changes, RefreshResult()
        return out

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 60.0, interval: float = 0.1) -> bool:
        """Refresh until `predicate()` holds (headless use and tests); False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            self.refresh()
            if predicate():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)

    # --- lookups
    def row(self, run_id: str) -> RunRow:
        try:
            return self.model.rows[run_id]
        except KeyError:
            raise ActionError(f"no run {run_id!r} in {self.runs_dir}") from None

    def run_path(self, run_id: str) -> Path:
        row = self.row(run_id)
        if row.path is None:
            raise ActionError(f"{row.recipe}: not started yet (no run directory)")
        return row.path

    def run_id_of(self, job: Job) -> str:
        return Path(job.run_dir).name if job.run_dir else f"job:{job.id}"

    def launch_row(self, row_id: str | None) -> str | None:
        """The row that shows a launch now: `job:ID` until its run directory is known, then that run (a resume's
        is the run it resumes, from the start); other ids as they are; None for a launch that is gone."""
        if row_id is None or not row_id.startswith("job:"):
            return row_id
        job = self.runner.jobs.get(row_id.removeprefix("job:"))
        if job is None:
            return None
        if job.spec.resume:
            return Path(job.spec.resume).name
        return self.run_id_of(job)

    def state_of_job(self, job: Job) -> str:
        row = self.model.rows.get(self.run_id_of(job))
        return row.state if row else job.state

    @property
    def slots(self) -> list[Slot]:
        return self.runner.slots

    def slot_usage(self) -> dict[str, int]:
        live = self.known_live()
        return self.runner.usage(self.runner.live_runs() if live is None else live)

    # --- launch
    def plan(self, recipe: Path | str, overrides: list[str] | tuple[str, ...] = ()) -> LaunchPlan:
        """Validate and expand (sweep) without starting anything: the launch screen's preview."""
        path = Path(recipe)
        return plan_launch(path, list(overrides), source=display_name(path, self.recipes_dir))

    def launch(self, recipe: Path | str, overrides: list[str] | tuple[str, ...] = (),
               slots: list[str] | tuple[str, ...] = (), per_slot: int | None = None) -> list[Job]:
        """Queue one run (or one per grid point of the recipe's [sweep]); they start as slots free up."""
        try:
            plan = self.plan(recipe, overrides)
        except RecipeError as exc:
            raise ActionError(str(exc)) from None
        if per_slot is not None:
            self.set_per_slot(per_slot)
        jobs = []
        try:
            for i, run_overrides in enumerate(plan.runs):
                label = plan.label if len(plan.runs) == 1 else f"{plan.label} [{i + 1}/{len(plan.runs)}]"
                jobs.append(self.runner.submit(LaunchSpec(recipe=str(plan.recipe), overrides=run_overrides,
                                                          label=label, slots=list(slots),
                                                          sweep_point=plan.sweep_point)))
        except RunnerError as exc:
            raise ActionError(str(exc)) from None
        self.refresh()
        return jobs

    def set_per_slot(self, n: int) -> None:
        if int(n) < 1:
            raise ActionError("the per-GPU limit must be at least 1")
        self.runner.per_slot = int(n)

    # --- run actions
    def kill(self, run_id: str) -> str:
        row = self.row(run_id)
        try:
            if row.job_id:
                request = self.runner.kill(job_id=row.job_id)
            else:
                request = self.runner.kill(row.path)
        except RunnerError as exc:
            raise ActionError(str(exc)) from None
        if request is None:
            self.refresh()
            return f"cancelled the queued launch {row.recipe}"
        return (f"sent SIGTERM to {run_id}: it finishes its round, checkpoints and ends as killed "
                f"(SIGKILL after {self.runner.grace_s:.0f} s)")

    def kill_problem(self, run_id: str) -> str:
        """Why `k` cannot apply to this run ("" when it can): only a queued, starting or running one is killed."""
        row = self.row(run_id)
        label = row.recipe if row.job_id else row.display
        if row.job_id:
            job = self.runner.jobs.get(row.job_id)
            if job is None or job.state not in ("queued", "starting", "started"):
                return f"{label}: the launch did not start ({row.error or row.state}); nothing to kill (d removes it)"
            return ""
        if row.state not in ("queued", "running"):
            return f"{label} is {row.state}, not running: nothing to kill"
        if row.host not in ("", self.model.host):
            return f"{label} runs on {row.host}: kill it there"
        return ""

    def rerun(self, run_id: str) -> Job:
        try:
            job = self.runner.rerun(self.run_path(run_id))
        except RunnerError as exc:
            raise ActionError(str(exc)) from None
        self.refresh()
        return job

    def resume(self, run_id: str) -> Job:
        try:
            job = self.runner.resume(self.run_path(run_id))
        except RunnerError as exc:
            raise ActionError(str(exc)) from None
        self.refresh()
        return job

    def delete(self, run_id: str) -> str:
        """Delete a run directory (the UI asks for confirmation first); for a launch row, drop it (a queued
        launch is cancelled)."""
        row = self.row(run_id)
        try:
            if row.job_id:
                job = self.runner.jobs.get(row.job_id)
                if job is not None and job.alive:
                    raise ActionError(f"{row.recipe} is starting; kill it first")
                self.runner.jobs.pop(row.job_id, None)
                self.runner.save_queue()
            else:
                self.runner.delete(row.path)
        except RunnerError as exc:
            raise ActionError(str(exc)) from None
        self.refresh()
        return f"deleted {row.recipe if row.job_id else run_id}"

    # --- tags, notes, display name (RUN_DIR/annotations.json)
    def annotations(self, run_id: str) -> tuple[Annotations, str]:
        """The run's annotations and, when its file cannot be read, why."""
        return read_annotations(self.run_path(run_id))

    def annotate(self, run_id: str, name: str, tags: list[str], notes: str) -> Annotations:
        """Store what the dialog holds (the whole set: tags not listed are removed)."""
        path = self.run_path(run_id)
        try:
            current, _problem = read_annotations(path)
            stored = update_annotations(path, name=name, add_tags=tags,
                                        remove_tags=[t for t in current.tags if t not in tags], notes=notes)
        except (RecipeError, OSError) as exc:  # AnnotationError is a RecipeError: one line naming the field
            raise ActionError(str(exc)) from None
        self.model.refresh(list(self.runner.jobs.values()), force={run_id})
        self._changes.changed.add(run_id)
        return stored

    def recipe_for_run(self, run_id: str | None) -> Path | None:
        """The recipe file under the recipes directory that a run (or launch) came from, for the launch dialog's
        first choice: the launch's own file, else the recipe whose file stem or run.name is the run's recipe."""
        row = self.model.rows.get(run_id) if run_id else None
        if row is None:
            return None
        if row.job_id:
            job = self.runner.jobs.get(row.job_id)
            if job is not None and job.spec.recipe and not job.spec.recipe.endswith("recipe.toml"):
                return Path(job.spec.recipe)
        files = list_recipes(self.recipes_dir)
        name = row.recipe.split(" [")[0].removesuffix(" (rerun)")
        by_stem = [p for p in files if p.stem == name]
        if by_stem:
            return by_stem[0]
        for path in files:  # a recipe whose file is named otherwise than its run.name
            try:
                head = path.read_text(errors="replace")[:4096]
            except OSError:
                continue
            if f'name = "{name}"' in head:
                return path
        return None

    def launch_output(self, run_id: str, limit: int = 2000) -> list[str]:
        """The last lines a launch printed (its file under .bcdtui/launches), printable; [] without one."""
        row = self.row(run_id)
        job = self.runner.jobs.get(row.job_id) if row.job_id else None
        if job is None or not job.out_path:
            return []
        try:
            with open(job.out_path, "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - (256 << 10)))
                text = f.read().decode("utf-8", "replace")
        except OSError as exc:
            return [f"(could not read {job.out_path}: {exc.strerror or exc})"]
        return [printable(line) for line in text.splitlines()[-limit:]]

    def follow(self, run_id: str) -> RunFollower:
        return RunFollower(self.run_path(run_id))

    def compare(self, run_ids: list[str], only_differences: bool = True) -> Comparison:
        if len(run_ids) < 2:
            raise ActionError("mark at least two runs to compare (space marks a run)")
        paths = [self.run_path(r) for r in run_ids]
        followers = [RunFollower(p) for p in paths]
        for f in followers:
            f.poll()
        return Comparison(list(run_ids), followers, diff_runs(paths, only_differences))

    # --- recipes
    def recipe_source(self, path: Path | str) -> str:
        return display_name(Path(path), self.recipes_dir)

    def validate(self, text: str, path: Path | str | None = None) -> Validation:
        return validate_text(text, self.recipe_source(path) if path else "<recipe>")

    def check(self, path: Path | str, overrides: list[str] | tuple[str, ...] = ()) -> tuple[bool, str]:
        """The full `bcdcore check` (builds the model) in a subprocess."""
        return full_check(Path(path), list(overrides), engine=self.engine)

    def save_recipe(self, path: Path | str, text: str) -> Validation:
        save_recipe(Path(path), text)
        return self.validate(text, path)

    def new_recipe(self, name: str) -> Path:
        try:
            return new_recipe(self.recipes_dir, name)
        except RecipeError as exc:
            raise ActionError(str(exc)) from None
