"""One progress bar for long loops: ``with progress_bar(enabled, total, label) as advance: advance()``.

A rich bar (description, bar, done/total, time left) or, when disabled, a no-op ``advance``.
"""

from __future__ import annotations


class progress_bar:
    """A rich progress bar (or nothing) as a context manager yielding an ``advance()`` callable."""

    def __init__(self, enabled: bool, total: int, label: str):
        self.enabled, self.total, self.label = enabled, total, label

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        self.bar.__enter__()
        task = self.bar.add_task(self.label, total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)
