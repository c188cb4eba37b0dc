"""The battery's child process: runs hostile-input cases through the CLI, one after another.

`python battery_child.py CASES.json RESULTS.jsonl`. Each case is `{"id", "args", "watch",
"output"}`; for each, a `{"start": id}` line and then a result line are appended to RESULTS
(flushed), so that a parent that kills a hung child knows which case hung.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

from click.testing import CliRunner


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (symlinks as their target) with the hash of its bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p)] = "-> " + str(p.readlink())
        elif p.is_file():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


def main(cases_file: str, results_file: str) -> None:
    from stitchnet_tf_cli.main import cli

    cases = json.loads(Path(cases_file).read_text())
    with open(results_file, "a", encoding="utf-8") as results:
        for case in cases:
            print(json.dumps({"start": case["id"]}), file=results, flush=True)
            watch = [Path(w) for w in case["watch"]]
            before = {w: snapshot(w) for w in watch}
            start = time.perf_counter()
            r = CliRunner().invoke(cli, case["args"], prog_name="stitchnet-tf")
            seconds = time.perf_counter() - start
            exception = None
            if r.exception is not None and not isinstance(r.exception, SystemExit):
                exception = f"{type(r.exception).__name__}: {r.exception}"
            output = Path(case["output"])
            result = {
                "id": case["id"],
                "seconds": round(seconds, 2),
                "exit": r.exit_code,
                "output": r.output,
                "exception": exception,
                "changed": [str(w) for w in watch if snapshot(w) != before[w]],
                "leftovers": leftovers(output.parent) + sum((leftovers(w) for w in watch), []),
                "output_exists": output.exists() or output.is_symlink(),
            }
            print(json.dumps(result), file=results, flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
