"""Atomic writing: a reader never sees a half-written file or folder."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

from stitchnet_tf.errors import DataError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _respect_umask(path: str | os.PathLike, mode: int) -> None:
    """mkdtemp/mkstemp create 0700/0600; give the user's usual permissions instead (a TF
    Serving container under another uid must be able to read an export)."""
    os.chmod(path, mode & ~_umask())


def temp_prefix(name: str) -> str:
    """Name prefix of a temporary written beside `name`: hidden, and carrying this process's id
    so that a later run can tell a leftover of a killed process from a live one."""
    return f".{name}.tmp-{os.getpid()}-"


def old_name(name: str) -> str:
    """Name a replaced output is moved to until the new one is in place."""
    return f".{name}.old-{os.getpid()}"


_LEFTOVER = re.compile(r"^\..+\.(?:tmp|old)-(\d+)(?:[-.]|$)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but another user's
        return True
    return True


def sweep_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries (`temp_prefix`, `old_name`) in `folder` whose process is gone
    (killed with -9, or the machine stopped); return what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _LEFTOVER.match(entry.name)
        if match is None or _alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        removed.append(entry)
    return removed


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def check_apart(
    output: str | os.PathLike,
    inputs: Mapping[str, str | os.PathLike | None],
    nest_ok: Collection[str] = (),
) -> None:
    """Refuse an output that is, contains or lies inside an input (writing it would change or
    delete what the command reads), whatever the flags.

    `inputs` maps an option name (for the message) to a path; None is skipped. The output may
    lie inside the inputs named in `nest_ok` (e.g. an evaluation folder inside the run folder
    whose model it scores).
    """
    out = _real(output)
    for name, path in inputs.items():
        if path is None:
            continue
        source = _real(path)
        if out == source:
            raise DataError(output, f"output is the input {name} ({path})")
        if out in source.parents:
            raise DataError(output, f"output contains the input {name} ({path})")
        if source in out.parents and name not in nest_ok:
            raise DataError(output, f"output lies inside the input {name} ({path})")


def model_input(model_path: str | os.PathLike) -> tuple[dict, tuple[str, ...]]:
    """`check_apart` arguments for a `--model`: outputs may lie inside a run or export folder
    (e.g. `runs/x/eval`) but never be the model or contain it."""
    from stitchnet_tf.shipped import resolve

    model_path = resolve(model_path)
    return {"--model": model_path}, ("--model",) if Path(model_path).is_dir() else ()


def check_model_output(
    output: str | os.PathLike,
    model_path: str | os.PathLike,
    inputs: Mapping[str, str | os.PathLike | None] | None = None,
    *,
    overwrite: bool = False,
    marker: str | None = None,
) -> None:
    """The checks of a command that reads `--model` (and `inputs`) and writes the folder
    `output`, before anything slow: `check_apart` (the output may lie inside a run or export
    folder, never be or contain the model) and `check_output_dir`."""
    sources, nest_ok = model_input(model_path)
    check_apart(output, sources | dict(inputs or {}), nest_ok)
    check_output_dir(output, overwrite, marker)


def check_parents(target: str | os.PathLike) -> None:
    """`target` can be created: none of the folders above it is a file."""
    target = Path(target)
    for parent in target.parents:
        if parent.exists() and not parent.is_dir():
            raise DataError(target, f"cannot create the output: {parent} is a file")


def check_output_dir(
    target: str | os.PathLike, overwrite: bool = False, marker: str | None = None
) -> None:
    """The checks of `atomic_dir`, to run before any slow work: `target` is a folder or absent,
    empty unless `overwrite`, and with `marker` a non-empty folder is replaced only when it
    holds that file (it is then this command's own earlier output)."""
    target = Path(target)
    check_parents(target)
    if target.exists() and not target.is_dir():
        raise DataError(target, "output exists and is not a folder")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise DataError(target, "output folder exists and is not empty (use --overwrite)")
        if marker is not None and not (target / marker).exists():
            raise DataError(
                target,
                f"--overwrite replaces only this command's own output, and this folder has "
                f"no {marker}",
            )


@contextlib.contextmanager
def atomic_dir(
    target: str | os.PathLike, overwrite: bool = False, marker: str | None = None
) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it becomes `target`.

    An existing non-empty `target` is an error unless `overwrite`, in which case it is
    replaced only after the new content is complete (and, with `marker`, only when it holds
    that file: see `check_output_dir`). On failure the temporary folder is removed and
    `target` is untouched.
    """
    target = Path(target)
    check_output_dir(target, overwrite, marker)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target.name), dir=target.parent))
    _respect_umask(tmp, 0o777)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(old_name(target.name))
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename."""
    path = Path(path)
    check_parents(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), dir=path.parent)
    try:
        _respect_umask(tmp, 0o666)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_figure(fig, output: Path, dpi: int = 100) -> None:
    """Write a Matplotlib figure to `output` atomically (a temporary beside it, then a rename)
    and close it."""
    import matplotlib.pyplot as plt

    output = Path(output)
    tmp = output.with_name(f"{temp_prefix(output.name)}{output.suffix}")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, output)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
