"""Helpers shared by several test modules (`from helpers import ...`: tests/ is on the path)."""

from __future__ import annotations

import os
import subprocess
import threading

import numpy as np
from click.testing import CliRunner

from stitchnet_tf.data.classes import MaskValueMap, allowed_to_onehot
from stitchnet_tf.data.intensity import window_hu
from stitchnet_tf.data.preprocess import RawSlice, prepare
from stitchnet_tf.data.synthetic import synth_patient


def run(*args, expect=0):
    """Invoke the CLI with `args` (stringified); assert its exit code and return the result."""
    from stitchnet_tf_cli.main import cli

    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == expect, result.output + repr(result.exception)
    return result


def error_line(result) -> str:
    """The single line a failing command prints (no traceback)."""
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def lesion_batch(size=64, n=4):
    """n preprocessed synthetic slices with lesions: x [n,S,S,1], allowed [n,S,S,4]."""
    slices = [s for s in synth_patient(6, 12, 96) if (s.lesion > 0).mean() > 0.02][:n]
    mask_map = MaskValueMap.parse("medseg")
    xs, sets = [], []
    for s in slices:
        p = prepare(RawSlice(window_hu(s.hu), mask_map.to_allowed(s.lesion), s.lung), size)
        xs.append(p.x[..., None])
        sets.append(allowed_to_onehot(p.allowed))
    return np.stack(xs).astype("float32"), np.stack(sets)


def forged_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width × height pixels (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def run_on_terminal(command: list, env: dict, cwd=None, timeout: float = 900):
    """Run `command` with its stderr on a pseudo-terminal (as a user at a terminal sees it:
    progress bars drawn); returns (exit code, stdout, stderr)."""
    import pty

    master, slave = pty.openpty()
    child = subprocess.Popen(
        [str(c) for c in command], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=slave,
        text=True,
    )  # fmt: skip
    os.close(slave)
    chunks: list[bytes] = []

    def drain():
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    stdout, _ = child.communicate(timeout=timeout)
    reader.join(timeout=60)
    os.close(master)
    return child.returncode, stdout, b"".join(chunks).decode("utf-8", "replace")
