"""Progress reporting: silent by default for the API, a rich progress bar for the CLI."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def stage(self, name: str, total: int | None = None) -> None: ...

    def advance(self, completed: int) -> None: ...

    def note(self, message: str) -> None: ...

    def status(self, message: str) -> None: ...


class Silent:
    """Reports nothing; library calls stay quiet unless the caller asks."""

    def stage(self, name: str, total: int | None = None) -> None:
        pass

    def advance(self, completed: int) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def status(self, message: str) -> None:
        pass


class RichProgress:
    """One line per stage on stderr, with a live sample counter for long stages."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console = Console(stderr=True)
        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("[dim]{task.fields[status]}"),
            console=self.console,
            transient=True,
            disable=not self.console.is_terminal,
        )
        self._task = None

    def __enter__(self) -> RichProgress:
        self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.stop()

    def stage(self, name: str, total: int | None = None) -> None:
        if self._task is not None:
            self._bar.remove_task(self._task)
        self._task = self._bar.add_task(name, total=total, status="")
        self.console.print(f"[dim]·[/dim] {name}")

    def advance(self, completed: int) -> None:
        if self._task is not None:
            self._bar.update(self._task, completed=completed)

    def note(self, message: str) -> None:
        self.console.print(f"  {message}")

    def status(self, message: str) -> None:
        """What the stage is on now (layer, loss): shown on the live line only."""
        if self._task is not None:
            self._bar.update(self._task, status=message)
