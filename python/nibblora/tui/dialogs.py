"""The modal dialogs: start a job from a config file, and yes / no before stopping one."""

from __future__ import annotations

import os
from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.suggester import SuggestFromList
from textual.widgets import Button, Input, Label

from nibblora.tui.launch import find_configs


class StartJobScreen(ModalScreen[str | None]):
    """Ask for a config file; the app validates it and starts `python -m nibblora.train CONFIG`."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    DEFAULT_CSS = """
    StartJobScreen { align: center middle; }
    StartJobScreen > Vertical { width: 80; height: auto; border: thick $primary; padding: 1 2; background: $surface; }
    StartJobScreen Label { width: 100%; }
    StartJobScreen #error { color: $error; height: auto; }
    StartJobScreen Horizontal { height: auto; margin-top: 1; }
    """

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(
                f"Start a training job: the path of its TOML config, relative to {os.getcwd()} "
                "(\u2192 accepts a suggestion)"
            )
            yield Input(
                placeholder="path/to/config.toml",
                id="config",
                suggester=SuggestFromList(find_configs(Path.cwd()), case_sensitive=False),
            )
            yield Label("", id="error")
            with Horizontal():
                yield Button("Start", variant="primary", id="start")
                yield Button("Cancel", id="cancel")

    @on(Input.Submitted)
    @on(Button.Pressed, "#start")
    def _submit(self) -> None:
        path = self.query_one("#config", Input).value.strip()
        if not path:
            self.query_one("#error", Label).update("enter the path of a config file")
            return
        error = self.app.start_job(path)
        if error:
            self.query_one("#error", Label).update(error)
        else:
            self.dismiss(path)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Vertical { width: 70; height: auto; border: thick $warning; padding: 1 2; background: $surface; }
    ConfirmScreen Label { width: 100%; }
    ConfirmScreen Horizontal { height: auto; margin-top: 1; }
    """

    def __init__(self, question: str):
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.question)
            with Horizontal():
                yield Button("Yes (y)", variant="warning", id="yes")
                yield Button("No (n)", id="no")

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)
