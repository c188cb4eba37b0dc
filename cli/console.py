"""The command line's console: a quiet start-up, progress bars, `--quiet` and `--verbose`.

Imported by `main` before anything imports TensorFlow, this module
- sets `TF_CPP_MIN_LOG_LEVEL=3` unless the user set it: no INFO, WARNING or ERROR lines of
  TensorFlow's C++ runtime, such as the "failed call to cuInit" of a machine without a GPU;
- filters the native lines TensorFlow prints while it is imported, before it reads that
  variable (absl's "All log messages before absl::InitializeLog()", oneDNN, the CPU feature
  guard, "Could not find cuda drivers"): the first `import tensorflow` runs with file
  descriptor 2 sent to a temporary file, whose lines are then printed, bar those
  (`stitchnet_tf.native`, which also quiets LiteRT and the TFLite converter);
- hides the Python warnings of Keras, TensorFlow and TensorFlow Probability that the user cannot
  act on (`QUIET_WARNINGS`) and lowers absl's and TensorFlow's Python loggers to errors.

`stitchnet-tf --verbose COMMAND` undoes all of it; `stitchnet-tf --quiet COMMAND` hides the
progress bars and informational lines (`info`): results, warnings and errors still print.
Progress bars (`progress`) go to stderr.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import sys
import warnings
from collections.abc import Iterator

import click

from stitchnet_tf import native

TF_LOG_LEVEL = "TF_CPP_MIN_LOG_LEVEL"

#: the native start-up lines dropped from what `import tensorflow` prints
NATIVE_NOISE = native.NOISE

#: (category, message regex, module regex) of the library warnings hidden without --verbose
QUIET_WARNINGS = (
    # `fit` on a tf.data.Dataset: the pipeline shuffles (training.py passes shuffle=False too)
    (UserWarning, r"`shuffle=True` was passed, but will be ignored", ""),
    # deprecations inside TensorFlow, TensorFlow Probability, tf_keras and Keras
    (DeprecationWarning, "", r"(tensorflow_probability|tf_keras|tensorflow|keras)(\.|$)"),
    (FutureWarning, "", r"(tensorflow_probability|tf_keras|tensorflow|keras)(\.|$)"),
)

_state = {"quiet": False, "set_env": False, "filters": [], "bar": None}


def _quiet_filters() -> list:
    """Install QUIET_WARNINGS; returns the filter entries added."""
    added = []
    for category, message, module in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
        added.append(warnings.filters[0])
    return added


def _drop_filters(entries: list) -> None:
    warnings.filters[:] = [f for f in warnings.filters if f not in entries]
    mutated = getattr(warnings, "_filters_mutated", None)  # forget cached "ignore" decisions
    if mutated is not None:
        mutated()


def _set_python_loggers(level: int) -> None:
    logging.getLogger("tensorflow").setLevel(level)
    try:
        from absl import logging as absl_logging
    except ImportError:  # pragma: no cover - absl comes with TensorFlow
        return
    absl_logging.set_verbosity(
        absl_logging.ERROR if level >= logging.ERROR else absl_logging.WARNING
    )


def _filtered_native_stderr():
    """File descriptor 2 to a temporary file; then its lines but `NATIVE_NOISE` to stderr."""
    return native.captured_stderr()


class _QuietLoader(importlib.abc.Loader):
    """Runs a module's loader with the native start-up lines filtered."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = self.loader  # the module sees its own loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        with _filtered_native_stderr():
            self.loader.exec_module(module)


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Wraps the first `import tensorflow` (whoever asks for it) in `_filtered_native_stderr`."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        _remove_import_hook()
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


_HOOK = _QuietTensorFlowImport()


def _remove_import_hook() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def _quiet_start() -> None:
    """The quiet defaults, before anything imports TensorFlow."""
    if TF_LOG_LEVEL not in os.environ:
        os.environ[TF_LOG_LEVEL] = "3"
        _state["set_env"] = True
    if "tensorflow" not in sys.modules and _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
    if not _state["filters"]:
        _state["filters"] = _quiet_filters()
    _set_python_loggers(logging.ERROR)


def configure(*, verbose: bool = False, quiet: bool = False) -> None:
    """The console of one command: `verbose` shows TensorFlow's start-up lines and the library
    warnings again (TensorFlow imported earlier in this process keeps its log level); `quiet`
    hides progress bars and `info` lines."""
    _state["quiet"] = bool(quiet)
    if not verbose:
        _quiet_start()
        return
    _remove_import_hook()
    if _state["set_env"] and "tensorflow" not in sys.modules:
        os.environ.pop(TF_LOG_LEVEL, None)
        _state["set_env"] = False
    _drop_filters(_state["filters"])
    _state["filters"] = []
    _set_python_loggers(logging.WARNING)


def is_quiet() -> bool:
    return _state["quiet"]


def info(message: str) -> None:
    """An informational line (stdout), left out with --quiet; it does not break a bar. A
    library `log` line that is a warning (`warning: ...`) goes to stderr, also with --quiet."""
    if message.startswith("warning: "):
        _echo(message, err=True)
    elif not _state["quiet"]:
        _echo(message, err=False)


def warn(message: str) -> None:
    """`warning: <message>` on stderr, also with --quiet; it does not break a bar."""
    _echo(f"warning: {message}", err=True)


def _echo(message: str, err: bool) -> None:
    bar = _state["bar"]
    if bar is not None and bar.finished:
        bar.close()  # a finished bar stays on its line; the message goes below it
        bar = None
    if bar is not None:
        bar.clear()
    click.echo(message, err=err)
    if bar is not None:
        bar.redraw()


class Bar:
    """A progress callback for the library (`progress(n)`, `expect(total)`, see
    `stitchnet_tf.progress`) drawing a click progress bar on stderr. The bar appears when the
    total is known (`expect`, or `length` here; 0 or a first step without it: a bar without an
    end), its label then naming the total ("predict (12 slices)"); off a terminal click prints
    that label once. With --quiet it draws nothing."""

    def __init__(self, label: str, unit: str = "", length: int | None = None):
        self.label, self.unit, self._bar = label, unit, None
        if length is not None:
            self.expect(length)

    def expect(self, total: int) -> None:
        total = max(0, int(total))
        if _state["quiet"]:
            return
        if self._bar is not None:  # a second total: added to the first
            self._bar.length = (self._bar.length or 0) + total
            return
        unit = f" ({total} {self.unit})" if self.unit and total else ""
        self._bar = click.progressbar(
            (i for i in ()) if not total else None,  # no length: a bar without an end
            length=total or None,
            label=f"{self.label}{unit}",
            file=sys.stderr,
            show_pos=True,
        )
        self._bar.__enter__()
        _state["bar"] = self

    def __call__(self, n: int = 1) -> None:
        if _state["quiet"]:
            return
        if self._bar is None:
            self.expect(0)
        bar = self._bar
        if bar.length is not None and bar.pos + n > bar.length:  # more than announced
            bar.length = bar.pos + n
        bar.update(n)

    @property
    def finished(self) -> bool:
        bar = self._bar
        return bar is not None and bar.length is not None and bar.pos >= bar.length

    def _on_terminal(self) -> bool:
        return self._bar is not None and getattr(self._bar, "_is_atty", False)

    def clear(self) -> None:
        """Wipe the bar's line on a terminal (before another line is printed)."""
        if self._on_terminal():
            self._bar.file.write("\r\033[K")
            self._bar.file.flush()

    def redraw(self) -> None:
        if self._on_terminal():
            self._bar._last_line = None  # click draws only a changed line
            self._bar.render_progress()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None
        if _state["bar"] is self:
            _state["bar"] = None


@contextlib.contextmanager
def progress(label: str, unit: str = "", length: int | None = None) -> Iterator[Bar]:
    """A `Bar`, finished (its line ended) when the block ends, also on an error."""
    bar = Bar(label, unit, length)
    try:
        yield bar
    finally:
        bar.close()


_quiet_start()
