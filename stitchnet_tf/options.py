"""Every option choice and default the library and the CLI share, importable without TensorFlow.

The one owner of each list: the models, training, export and the CLI import them from here, so a
choice is added or a default changed in one place. `MODEL_REGISTRY` says which options each model
takes, so that the CLI needs no per-model branches."""

from __future__ import annotations

from stitchnet_tf.errors import DataError

#: The trainable models (`training.build_model`, `--model`).
MODELS = ("stitchnet", "unet", "segnet")
#: Reconstruction terms: the exact stitch likelihood (the paper) or the authors' Jensen bound.
LIKELIHOODS = ("exact", "jensen")
#: Decision rules: softmax(π) alone, or the posterior r_k ∝ π_k Beta_k(x).
DECISIONS = ("prior", "posterior")
#: Supervised terms: set cross-entropy + soft Dice (default), or the authors' set focal loss.
SUPERVISED = ("ce_dice", "focal")
#: Normalisation in the ladder and head: GroupNorm (default) or BatchNorm (the paper).
NORMS = ("group", "batch")
#: Per-level KL: analytic, or the authors' single-sample Monte Carlo estimate.
KL_ESTIMATORS = ("analytic", "mc")
#: Upsampling in the ladder and head: ×2 resize then conv, or the paper's transposed conv.
UPSAMPLE_MODES = ("resize", "transpose")
#: The baselines' losses: set cross-entropy + soft Dice, the paper's set focal loss, plain CE.
BASELINE_LOSSES = ("ce_dice", "focal", "ce")
#: Style parameters: per pixel (the paper) or one Beta per class per image (cannot copy the image).
STYLE_MODES = ("pixel", "image")
#: Consistency teachers: the model itself (FixMatch, UniMatch) or an EMA of its weights (mean
#: teacher).
TEACHERS = ("self", "ema")
#: The strong view's intensity transforms: `intensity` jitters brightness, contrast and gamma
#: besides noise and blur (FixMatch/UniMatch's colour jitter); `texture` keeps each pixel's
#: attenuation and adds noise and blur only (in CT the intensity is what tells healthy lung,
#: GGO and consolidation apart, so a jittered pixel may no longer be of its pseudo-label's class).
STRONG_VIEWS = ("intensity", "texture")
#: Weak-to-strong consistency on unlabelled pixels, for every model (docs/DESIGN.md §7.17).
CONSISTENCY_DEFAULTS = dict(
    consistency_weight=0.0,
    consistency_threshold=0.95,
    consistency_rampup=0,
    teacher=TEACHERS[0],
    teacher_decay=0.99,
    consistency_strong=STRONG_VIEWS[0],
    consistency_align=False,
    consistency_balance=0.0,
)
#: StitchNet's defaults: its constructor's and the CLI's.
STITCHNET_DEFAULTS = dict(
    likelihood=LIKELIHOODS[0],
    kl=KL_ESTIMATORS[0],
    supervised=SUPERVISED[0],
    supervised_weight=1.0,
    generative_weight=0.0,
    focal_gamma=2.0,
    kl_warmup_steps=0,
    free_bits=0.0,
    style_pool=1,
    style_mode=STYLE_MODES[0],
    ordered_styles=False,
    norm=NORMS[0],
    decision=DECISIONS[0],
)
#: Channels of the deterministic backbone skip into the head (0 = none, the paper).
DEFAULT_HEAD_SKIPS = 16
#: The paper's model size (pixels); every model size is a positive multiple of 32.
PAPER_SIZE = 352
#: Size, widths and budget. `paper`: the paper's 352 px, widths and 80 x 100 steps (more than
#: a day on a 2-core CPU). `cpu`: what reached the best accuracy within about an hour on a
#: 2-core CPU (docs/MEDSEG.md: StitchNet 1200 steps at 128 px in 48 min). Model widths not
#: named keep the model's default (StitchNet width 0.5; U-Net and SegNet 1.0).
PRESETS = {
    "cpu": dict(size=128, epochs=12, steps_per_epoch=100, batch_size=8, backbone_alpha=0.5),
    "paper": dict(
        size=PAPER_SIZE, epochs=80, steps_per_epoch=100, batch_size=8, width=1.0, backbone_alpha=1.0
    ),
}
#: Crop margin around the lung field, as a fraction of its larger side (preprocessing).
CROP_MARGIN = 0.05
#: Training choices (`training.TrainConfig`).
OPTIMIZERS = ("adamw", "adam")
LR_SCHEDULES = ("cosine", "constant")
AUGMENTATIONS = ("recipe", "paper", "none")
STRATEGIES = ("auto", "one-device", "mirrored", "multi-worker")
#: `TrainConfig`'s defaults that the CLI shows.
TRAIN_DEFAULTS = dict(
    learning_rate=1e-3,
    optimizer=OPTIMIZERS[0],
    weight_decay=1e-2,
    lr_schedule=LR_SCHEDULES[0],
    fractions=(0.6, 0.2, 0.2),
    augmentation=AUGMENTATIONS[0],
    strategy=STRATEGIES[0],
)
#: The parts of a split.
PARTS = ("train", "val", "test")
#: Export formats and TFLite quantisations.
EXPORT_FORMATS = ("savedmodel", "tflite")
QUANTIZE = ("none", "float16", "dynamic", "int8")
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


#: Which training options each model takes, as {option name: the model's argument name}.
#: `supervised` is StitchNet's supervised term and the baselines' loss; `backbone_alpha` is
#: MobileNetV2's width in StitchNet and the U-Net (SegNet has none).
MODEL_REGISTRY: dict[str, dict[str, str]] = {
    "stitchnet": {
        **{k: k for k in STITCHNET_DEFAULTS},
        **{k: k for k in CONSISTENCY_DEFAULTS},
        "width": "width",
        "backbone_alpha": "backbone_alpha",
        "head_skips": "head_skips",
    },
    "unet": {
        "supervised": "loss",
        "focal_gamma": "focal_gamma",
        "width": "width",
        "backbone_alpha": "alpha",
        **{k: k for k in CONSISTENCY_DEFAULTS},
    },
    "segnet": {
        "supervised": "loss",
        "focal_gamma": "focal_gamma",
        "width": "width",
        **{k: k for k in CONSISTENCY_DEFAULTS},
    },
}


def model_options(model: str, values: dict) -> dict:
    """The constructor arguments of `model` from training options `values` (None: not given,
    the model's default applies); options the model does not take are dropped."""
    if model not in MODEL_REGISTRY:
        raise DataError(None, f"unknown model {model!r}: use one of {', '.join(MODELS)}")
    names = MODEL_REGISTRY[model]
    return {names[k]: v for k, v in values.items() if k in names and v is not None}


def check_model_size(size: int) -> int:
    """A model size must be a positive multiple of 32 (five stride-2 levels)."""
    if int(size) != size or size < 32 or size % 32:
        raise DataError(None, f"image size {size} is not a positive multiple of 32")
    return int(size)
