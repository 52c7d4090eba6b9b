"""Progress bars (rich), silent unless enabled; a bar is a callable ``bar(done, total)``."""

from __future__ import annotations

import contextlib
import sys


class Progress:
    def __init__(self, enabled: bool = False):
        self.enabled = enabled and sys.stderr.isatty()

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None):
        if not self.enabled:
            yield lambda done, total=None: None
            return
        from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

        with RichProgress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                          TimeElapsedColumn(), transient=True) as bar:
            tid = bar.add_task(description, total=total)

            def update(done, total=None):
                bar.update(tid, completed=done, total=total)

            yield update
