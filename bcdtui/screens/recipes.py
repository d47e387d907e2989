"""Recipes: the tree of recipe files, an editor with live validation, save, new, full check, $EDITOR, launch."""
from __future__ import annotations

import subprocess
from functools import partial
from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Static, TextArea, Tree

from bcdtui.recipes import RecipeError, editor_command, error_line, list_recipes, read_recipe_text
from bcdtui.screens.base import WsScreen, steady_cursors
from bcdtui.screens.dialogs import ConfirmScreen, PromptScreen
from bcdtui.screens.launch import LaunchScreen
from bcdtui.widgets import KeyBar, RecipeEditor, TopBar
from bcdtui.workstation import ActionError


class RecipesScreen(WsScreen):
    BINDINGS = [
        Binding("escape", "back", "Back", tooltip="back to the previous screen"),
        Binding("ctrl+s", "save", "Save", priority=True, tooltip="save the recipe"),
        Binding("ctrl+n", "new", "New", priority=True, tooltip="new recipe from the template"),
        Binding("ctrl+l", "launch", "Launch", priority=True,
                tooltip="launch a recipe (overrides, GPUs, per-GPU limit, sweep preview)"),
        Binding("ctrl+t", "check", "Full check", priority=True,
                tooltip="bcdcore check: builds the model and opens the data"),
        Binding("ctrl+o", "external_editor", "$EDITOR", priority=True,
                tooltip="open the recipe in $VISUAL / $EDITOR"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.path: Path | None = None
        self.saved_text = ""
        self._validate_timer = None
        self._loading = False

    def compose(self) -> ComposeResult:
        yield TopBar("Recipes", id="topbar")
        with Horizontal():
            tree: Tree = Tree("recipes", id="recipe-tree")
            tree.show_root = False
            yield tree
            with Vertical(id="recipe-pane"):
                # tab moves focus, as the help says (the code editor's default would insert spaces)
                yield RecipeEditor.code_editor("", language=toml_language(), id="editor", soft_wrap=False,
                                               show_line_numbers=True, theme="monokai", tab_behavior="focus")
                yield Static("select a recipe on the left (enter edits it); ctrl+n makes a new one",
                             id="validation")
        yield KeyBar()

    def on_mount(self) -> None:
        steady_cursors(self)
        self.query_one("#recipe-tree").border_title = str(self.ws.recipes_dir)
        self.reload_tree()
        self.query_one("#recipe-tree", Tree).focus()

    def reload_tree(self, select: Path | None = None) -> None:
        tree = self.query_one("#recipe-tree", Tree)
        tree.clear()
        root_dir = self.ws.recipes_dir
        tree.root.data = root_dir
        folders = {Path("."): tree.root}
        target = None
        for path in list_recipes(root_dir):
            rel = path.relative_to(root_dir)
            parent = Path(".")
            for part in rel.parts[:-1]:
                child = parent / part
                if child not in folders:
                    folders[child] = folders[parent].add(part + "/", data=None, expand=True)
                parent = child
            node = folders[parent].add_leaf(rel.name, data=path)
            if select is not None and path.resolve() == Path(select).resolve():
                target = node
        tree.root.expand()
        target = target or (tree.root.children[0] if tree.root.children else None)
        if target is not None:
            self.call_after_refresh(tree.move_cursor, target)

    @property
    def dirty(self) -> bool:
        return self.path is not None and self.query_one("#editor", RecipeEditor).text != self.saved_text

    def load(self, path: Path) -> None:
        try:
            text = read_recipe_text(path)
        except RecipeError as exc:
            self.fail(exc)
            return
        self.path, self.saved_text = path, text
        editor = self.query_one("#editor", RecipeEditor)
        self._loading = True
        editor.load_text(text)
        self._loading = False
        self._set_title()
        result = self.validate_now()
        if result is not None and result.line:  # show the offending line
            editor.scroll_to(y=max(0, result.line - 4), animate=False)

    def _set_title(self) -> None:
        editor = self.query_one("#editor", RecipeEditor)
        name = self.ws.recipe_source(self.path) if self.path else ""
        editor.border_title = f"{name}{' ● modified' if self.dirty else ''}"

    @on(Tree.NodeHighlighted, "#recipe-tree")
    def _highlighted(self, event: Tree.NodeHighlighted) -> None:
        path = event.node.data
        if isinstance(path, Path) and path.is_file() and not self.dirty and path != self.path:
            self.load(path)

    @on(Tree.NodeSelected, "#recipe-tree")
    def _selected(self, event: Tree.NodeSelected) -> None:
        path = event.node.data
        if not (isinstance(path, Path) and path.is_file()):
            return
        if path != self.path and self.dirty:
            self.app.push_screen(ConfirmScreen(f"Discard the unsaved changes to {self.ws.recipe_source(self.path)}?"),
                                 lambda yes: yes and (self.load(path), self.query_one("#editor").focus()))
            return
        if path != self.path:
            self.load(path)
        self.query_one("#editor", RecipeEditor).focus()

    @on(RecipeEditor.Changed, "#editor")
    def _edited(self, event) -> None:
        self._set_title()
        if self._validate_timer is not None:
            self._validate_timer.stop()
        self._validate_timer = self.set_timer(0.15, self.validate_now)

    def validate_now(self):
        if self.path is None:
            return None
        editor = self.query_one("#editor", RecipeEditor)
        result = self.ws.validate(editor.text, self.path)
        editor.set_error_line(result.line)
        box = self.query_one("#validation", Static)
        box.set_class(not result.ok, "-error")
        box.set_class(result.ok, "-ok")
        prefix = "✓ " if result.ok else "✗ "
        box.update(Text(prefix + result.message))
        return result

    # --- actions
    def action_back(self) -> None:
        editor = self.query_one("#editor", RecipeEditor)
        if editor.has_focus:
            self.query_one("#recipe-tree", Tree).focus()
        else:
            self.app.action_show_runs()

    def action_save(self) -> bool:
        if self.path is None:
            self.app.notify("nothing to save: select or create a recipe first", severity="warning")
            return False
        text = self.query_one("#editor", RecipeEditor).text
        try:
            self.ws.save_recipe(self.path, text)
        except OSError as exc:
            self.fail(exc)
            return False
        self.saved_text = text
        self._set_title()
        result = self.validate_now()
        self.app.notify(f"saved {self.ws.recipe_source(self.path)}" + ("" if result.ok else " (it has an error)"),
                        severity="information" if result.ok else "warning")
        return True

    def action_new(self) -> None:
        self.app.push_screen(PromptScreen("New recipe name (a file in the recipes directory):", "my_recipe"),
                             self._new_named)

    def _new_named(self, name: str | None) -> None:
        if not name:
            return
        try:
            path = self.ws.new_recipe(name)
        except ActionError as exc:
            self.fail(exc)
            return
        self.reload_tree(select=path)
        self.load(path)
        self.query_one("#editor", RecipeEditor).focus()

    def action_launch(self) -> None:
        if self.path is None:
            self.app.notify("select a recipe to launch", severity="warning")
            return
        if self.dirty and not self.action_save():
            return
        self.app.push_screen(LaunchScreen(self.path), self._launched)

    def _launched(self, jobs) -> None:
        if jobs:
            self.app.notify(f"queued {len(jobs)} run{'s' if len(jobs) > 1 else ''}; F2 shows the runs")
            self.app.refresh_now()

    def action_check(self) -> None:
        if self.path is None:
            return
        if self.dirty and not self.action_save():
            return
        box = self.query_one("#validation", Static)
        box.update(Text("… bcdcore check (builds the model, opens the data)"))
        path = self.path
        self.run_worker(partial(self._check_worker, path), thread=True, exclusive=True, group="check")

    def _check_worker(self, path: Path) -> None:
        ok, line = self.ws.check(path)
        self.app.call_from_thread(self._checked, path, ok, line)

    def _checked(self, path: Path, ok: bool, line: str) -> None:
        if path != self.path:
            return
        box = self.query_one("#validation", Static)
        box.set_class(not ok, "-error")
        box.set_class(ok, "-ok")
        box.update(Text(("✓ full check: " if ok else "✗ full check: ") + line))
        if not ok:
            self.query_one("#editor", RecipeEditor).set_error_line(error_line(line, str(path))
                                                                  or error_line(line, self.ws.recipe_source(path)))

    def action_external_editor(self) -> None:
        if self.path is None:
            return
        if self.dirty and not self.action_save():
            return
        cmd = editor_command(self.path)
        try:
            with self.app.suspend():
                subprocess.call(cmd)
        except Exception as exc:  # noqa: BLE001 - headless (no terminal to hand over) or a missing editor
            self.app.notify(f"could not open {cmd[0]}: {exc}", severity="error")
            return
        self.load(self.path)


def toml_language() -> str | None:
    """"toml" when Textual can highlight it (tree-sitter and tree-sitter-toml installed), else plain text."""
    return "toml" if "toml" in TextArea().available_languages else None
