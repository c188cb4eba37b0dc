"""Where StitchNet's compute goes: forward-pass FLOPs per part, against the U-Net.

Usage (from the repository root; about 2 minutes, tracing only, nothing is run):
    python benchmarks/flops.py [--size 352] [--batch 8]

Counts floating-point operations of the traced training-mode forward pass with TensorFlow's
profiler, for the U-Net and for StitchNet with its defaults (backbone, backbone + ladder, all)
and at the paper's widths. Writes benchmarks/results/flops.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=352)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    import tensorflow as tf
    from speed import graph_flops

    from stitchnet_tf.training import build_model

    spec = tf.TensorSpec([args.batch, args.size, args.size, 1], tf.float32)

    def gflop(fn) -> float:
        return graph_flops(tf.function(fn).get_concrete_function(spec)) / 1e9

    rows = []

    def row(model: str, part: str, fn, params: int) -> None:
        rows.append({"model": model, "part": part, "gflop": gflop(fn), "params_m": params / 1e6})
        print(json.dumps(rows[-1]), flush=True)

    unet = build_model("unet", {}, None, None, 0)
    row("U-Net", "all", lambda x: unet(x, training=True), unet.count_params())
    for name, options in (
        ("StitchNet (defaults: width 0.5, light_c, head skips 16)", {}),
        (
            "StitchNet (paper widths, no head skips)",
            {"width": 1.0, "light_c": False, "head_skips": 0},
        ),
    ):
        m = build_model("stitchnet", options, None, None, 0)
        if not options:
            backbone = m.backbone.count_params()
            row(name, "backbone", lambda x, m=m: m.backbone(x, training=True), backbone)
            row(
                name,
                "backbone + ladder",
                lambda x, m=m: m.ladder(m.backbone(x, training=True), training=True)["features"],
                backbone + m.ladder.count_params(),
            )
        row(name, "all", lambda x, m=m: m(x, training=True), m.count_params())
    unet_gflop = rows[0]["gflop"]
    out = {
        "size": args.size,
        "batch": args.batch,
        "rows": rows,
        "command": "python benchmarks/flops.py " + " ".join(sys.argv[1:]),
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "flops.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [
        f"# Forward-pass FLOPs at {args.size}×{args.size}, batch {args.batch} (training mode)",
        "",
        f"TensorFlow's profiler on the traced graph. Command: `{out['command'].strip()}`.",
        "",
        "| model | part | GFLOP | × U-Net | parameters (M) |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['model']} | {r['part']} | {r['gflop']:.1f} | {r['gflop'] / unet_gflop:.2f} | "
        f"{r['params_m']:.2f} |"
        for r in rows
    ]
    (args.output / "flops.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output / 'flops.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
