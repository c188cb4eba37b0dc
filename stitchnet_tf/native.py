"""What TensorFlow's native (C++) code prints on stderr, below Python.

TensorFlow prints some lines before it reads `TF_CPP_MIN_LOG_LEVEL` (absl's "All log messages
before absl::InitializeLog()", oneDNN, "Could not find cuda drivers"), LiteRT's interpreter an
"INFO: Created TensorFlow Lite XNNPACK delegate" line whatever the level, and the TFLite
converter its MLIR diagnostics (`error: ...` lines) beside the exception that says the same.
`captured_stderr` runs a block with file descriptor 2 sent to a temporary file and then writes
back the lines its `keep` accepts. The command line (`stitchnet_tf_cli.console`) sets the level
to 3 unless `--verbose`; these lines then follow it.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator

#: native lines that say nothing the user can act on: absl / TensorFlow log lines, the second
#: line of the CPU feature guard's message, LiteRT's delegate notice
NOISE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|[IWE]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] "  # I0000 00:00:1796.. 16730 port.cc:153]
    r"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWE] \S+:\d+\] "  # older TensorFlow
    r"|To enable the following instructions: .* rebuild TensorFlow with"
    r"|INFO: Created TensorFlow Lite \S+ delegate for"
)


def logs_everything() -> bool:
    """Whether TensorFlow logs everything: `TF_CPP_MIN_LOG_LEVEL` unset or 0."""
    return os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0").strip() in ("", "0")


def not_noise(line: str) -> bool:
    """Keeps a line unless it is `NOISE` while TensorFlow's log level hides INFO lines."""
    return logs_everything() or not NOISE.match(line)


@contextlib.contextmanager
def captured_stderr(keep: Callable[[str], bool] = not_noise) -> Iterator[None]:
    """Run the block with file descriptor 2 sent to a temporary file; then write the lines that
    `keep` accepts to stderr. Without a usable stderr the block just runs."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", "replace")
            kept = "".join(ln for ln in text.splitlines(keepends=True) if keep(ln))
            data = kept.encode("utf-8", "replace")
            while data:
                data = data[os.write(2, data) :]
