"""Progress reporting of the long library functions.

A function that takes `progress` calls `progress(n)` after every `n` units of work it finishes
(slices, figures, samples). Once it knows how many units there will be, and before the first,
it may say so with `expect(progress, total)`: a callback with an `expect(total)` method (the
command line's progress bars) is told; any other callable (e.g. `list.append`) is left alone.
Functions with stages rather than units take a `log` callable and call it with one line per
stage.
"""

from __future__ import annotations

from collections.abc import Callable

#: `progress(n)`: n more units of work are done
Progress = Callable[[int], None]


def expect(progress: Progress | None, total: int) -> None:
    """Tell `progress` that `total` units of work are coming (when it wants to know)."""
    hook = getattr(progress, "expect", None)
    if hook is not None:
        hook(int(total))


def step(progress: Progress | None, n: int = 1) -> None:
    """`progress(n)`, when there is a `progress`."""
    if progress is not None:
        progress(n)
