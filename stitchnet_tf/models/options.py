"""StitchNet's option choices and defaults, importable without TensorFlow (for the CLI)."""

from __future__ import annotations

from stitchnet_tf.errors import DataError

#: Reconstruction terms: the exact stitch likelihood (the paper) or the authors' Jensen bound.
LIKELIHOODS = ("exact", "jensen")
#: Decision rules: softmax(π) alone, or the posterior r_k ∝ π_k Beta_k(x).
DECISIONS = ("prior", "posterior")
#: Supervised terms: set cross-entropy + soft Dice (default), or the authors' set focal loss.
SUPERVISED = ("ce_dice", "focal")
#: Normalisation in the ladder and head: GroupNorm (default) or BatchNorm (the paper).
NORMS = ("group", "batch")
#: Channels of the deterministic backbone skip into the head (0 = none, the paper).
DEFAULT_HEAD_SKIPS = 16
#: Default global gradient-norm clip (benchmarks/results/gradients.md).
DEFAULT_GLOBAL_CLIPNORM = 20.0
#: Scale of every prior σ when drawing samples (docs/DESIGN.md §7.15).
SAMPLE_TEMPERATURE = 1.0
#: Batches over which BatchNorm statistics are re-estimated before each validation.
RECALIBRATION_STEPS = 20


def check_deterministic(model, samples: int = 0, decision: str | None = None) -> None:
    """A deterministic model (no latent to sample, no decision rule) refuses `samples` and
    `decision` with one line instead of ignoring them."""
    if samples or decision is not None:
        raise DataError(
            None,
            f"--samples and --decision apply to StitchNet only, not to {type(model).__name__}",
        )
