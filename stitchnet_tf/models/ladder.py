"""The SVAE: a ladder VAE whose d → z mapping is shared by inference and generation.

Top-down pass with x given (docs/DESIGN.md §2):
1. level L: q(z_L | x) = (b)_L(d_L), prior N(0, I);
2. for i = L−1 … 1: d̃_i = (a)_{i+1}(h_{i+1}); prior p(z_i | z_{i+1}) = (b)_i(d̃_i);
   q̂ = (b)_i(d_i); posterior = precision-weighted merge of q̂ and the prior;
   h_i = d̃_i + g_i·(c)_i(z_i) (a residual top-down stream; the paper has h_i = (c)_i(z_i));
3. h_1 -> the features the StitchNet head turns into π, α, β.
Generation runs the same pass with q = p at every level.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers, ops

from stitchnet_tf.likelihood import gaussian_kl, gaussian_kl_mc
from stitchnet_tf.models.layers import RESIDUAL_GAIN, LatentParams, LatentToFeatures, TopDown
from stitchnet_tf.options import KL_ESTIMATORS


def precision_weighted_merge(mu_q, sigma_q, mu_p, sigma_p):
    """Ladder-VAE merge of two Gaussians: σ² = 1/(σ_q⁻² + σ_p⁻²), μ = (μ_q σ_q⁻² + μ_p σ_p⁻²) σ².

    The precisions are taken relative to s = min(σ_q, σ_p), so they lie in [0, 1]: the same
    numbers in float32, but no 1/σ² that overflows float16 (TFLite float16 inference) when σ is
    near its floor, and no ∞/∞ when a trained σ is huge.
    """
    s = ops.minimum(sigma_q, sigma_p)
    prec_q = ops.reciprocal(ops.square(sigma_q / s))
    prec_p = ops.reciprocal(ops.square(sigma_p / s))
    total = prec_q + prec_p
    return (mu_q * prec_q + mu_p * prec_p) / total, s / ops.sqrt(total)


@keras.saving.register_keras_serializable(package="stitchnet_tf")
class SVAELadder(layers.Layer):
    """The shared ladder: [d_1 … d_L] -> features, per-level KL and latents.

    Args:
        filters: f_1 … f_L, the channels of d_1 … d_L.
        light_c: use a LightSmooth instead of the last Smooth in mapping (c) (faster).
        kl: `analytic` Gaussian KL, or `mc` (single-sample log q − log p, the authors').
        seed: seeds the reparameterised samples.
        norm: `batch` (the paper) or `group` normalisation in every block.
        upsample: `resize` (×2 resize then conv) or `transpose` (the paper's) in mapping (a).

    `call(ds, training, sample)` returns a dict:
        features [B, H/2, W/2, f_1]; kl [B, L] (KL of level i, summed over its pixels, in column
        i−1); z, mu, sigma, prior_mu, prior_sigma: lists over levels 1 … L of [B, h_i, w_i, 1].
    z is sampled when `sample` (default: when training), else the posterior mean.
    """

    def __init__(
        self,
        filters=(32, 64, 128, 256, 512),
        light_c: bool = False,
        kl: str = "analytic",
        seed: int | None = None,
        norm: str = "batch",
        upsample: str = "resize",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if kl not in KL_ESTIMATORS:
            raise ValueError(f"kl must be one of {KL_ESTIMATORS}, got {kl!r}")
        self.filters, self.light_c, self.kl, self.seed = tuple(filters), light_c, kl, seed
        self.norm, self.upsample = norm, upsample
        policy = self.dtype_policy
        n = len(self.filters)
        # (b): ONE layer per level, used on d_i (inference) and on d̃_i (prior)
        self.latent_params = [
            LatentParams(f, norm=norm, dtype=policy, name=f"b_{i + 1}")
            for i, f in enumerate(self.filters)
        ]
        # (c): z_i -> d_i
        self.to_features = [
            LatentToFeatures(f, light_c, norm=norm, dtype=policy, name=f"c_{i + 1}")
            for i, f in enumerate(self.filters)
        ]
        # (a): d_{i+1} -> d̃_i, for i = 1 … L−1
        self.top_down = [
            TopDown(self.filters[i], norm=norm, upsample=upsample, dtype=policy, name=f"a_{i + 2}")
            for i in range(n - 1)
        ]
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        self.gains = [
            self.add_weight(
                shape=(),
                initializer=keras.initializers.Constant(RESIDUAL_GAIN),
                name=f"gain_{i + 1}",
                dtype="float32",
            )
            for i in range(self.levels)
        ]
        if tf.executing_eagerly():
            self._build_blocks(input_shape)

    def _build_blocks(self, ds_shape):
        """Create every block's weights with one eager pass on zeros (1 px at level L).

        Keras would otherwise trace `call` into a throw-away graph to infer the output shapes
        of the functional StitchNet: some 46 000 graph ops, half a minute on a CPU for every
        model built or loaded, against about a second eagerly. `compute_output_spec` then gives
        the shapes from this pass.
        """
        n = self.levels
        ds = [
            ops.zeros((1, 2 ** (n - 1 - i), 2 ** (n - 1 - i), shape[-1]), self.compute_dtype)
            for i, shape in enumerate(ds_shape)
        ]
        out = self._descend(ds, training=False, sample=False, kl=True)
        firsts = {k: v[0] if isinstance(v, list) else v for k, v in out.items()}
        # key -> (channels, dtype); the entries of a list (one per level) share theirs
        self._spec = {k: (v.shape[-1], v.dtype) for k, v in firsts.items()}

    def compute_output_spec(self, ds, training=None, sample=None, kl=True):
        if not hasattr(self, "_spec"):
            return super().compute_output_spec(ds, training=training, sample=sample, kl=kl)

        def like(d, key):
            channels, dtype = self._spec[key]
            return keras.KerasTensor((*d.shape[:-1], channels), dtype=dtype)

        out = {"features": like(ds[0], "features")}
        for key in ("z", "mu", "sigma", "prior_mu", "prior_sigma"):
            out[key] = [like(d, key) for d in ds]
        if kl:
            out["kl"] = keras.KerasTensor((ds[0].shape[0], self.levels), dtype=self._spec["kl"][1])
        return out

    @property
    def levels(self) -> int:
        return len(self.filters)

    def _draw(self, mu, sigma, sample, temperature: float = 1.0):
        if not sample:
            return mu
        noise = keras.random.normal(ops.shape(mu), seed=self.seed_generator)
        return mu + temperature * sigma * noise

    def _kl(self, z, mu_q, sigma_q, mu_p, sigma_p):
        """KL of one level per image: [B] (summed over its latent pixels)."""
        if self.kl == "analytic":
            kl = gaussian_kl(mu_q, sigma_q, mu_p, sigma_p)
        else:  # single-sample estimate log q(z) − log p(z)
            kl = gaussian_kl_mc(z, mu_q, sigma_q, mu_p, sigma_p)
        return ops.sum(kl, axis=(1, 2, 3))

    def _descend(self, ds, training, sample, kl, top_shape=None, temperature: float = 1.0):
        """The one top-down pass. With bottom-up features `ds` the posterior of every level is
        the merge of q̂ = (b)_i(d_i) with the prior; with `ds=None` (generation) q = p.

        The top-down stream is residual: h_L = g_L·(c)_L(z_L) and, for i < L,
        d̃_i = (a)_{i+1}(h_{i+1}), h_i = d̃_i + g_i·(c)_i(z_i), where g_i is a learnt gain that
        starts at `RESIDUAL_GAIN`. Each level adds to the stream instead of replacing it
        (VDVAE, NVAE), which keeps gradients through the five-level chain bounded.
        """
        n = self.levels
        out = {k: [None] * n for k in ("z", "mu", "sigma", "prior_mu", "prior_sigma")}
        kls = [None] * n
        h = None
        for i in range(n - 1, -1, -1):
            if h is None:  # top level: prior N(0, I)
                if ds is not None:
                    mu, sigma = self.latent_params[i](ds[i], training=training)
                else:
                    mu = ops.zeros(top_shape)
                    sigma = ops.ones(top_shape)
                prior_mu, prior_sigma = ops.zeros_like(mu), ops.ones_like(mu)
            else:
                d_tilde = self.top_down[i](h, training=training)
                prior_mu, prior_sigma = self.latent_params[i](d_tilde, training=training)
                if ds is not None:
                    mu_hat, sigma_hat = self.latent_params[i](ds[i], training=training)
                    mu, sigma = precision_weighted_merge(mu_hat, sigma_hat, prior_mu, prior_sigma)
                else:
                    mu, sigma = prior_mu, prior_sigma
            z = self._draw(mu, sigma, sample, temperature)
            out["z"][i], out["mu"][i], out["sigma"][i] = z, mu, sigma
            out["prior_mu"][i], out["prior_sigma"][i] = prior_mu, prior_sigma
            if kl:
                kls[i] = self._kl(z, mu, sigma, prior_mu, prior_sigma)
            branch = self.to_features[i](ops.cast(z, self.compute_dtype), training=training)
            branch = ops.cast(self.gains[i], branch.dtype) * branch
            h = branch if h is None else d_tilde + branch
        out = {"features": h, **out}
        if kl:
            out["kl"] = ops.stack(kls, axis=1)
        return out

    def call(self, ds, training=None, sample=None, kl=True):
        """Inference path: bottom-up features `ds` -> features for the head, the z, q and p
        parameters of every level and the per-level KL [B, L] (`kl=False` leaves the KL out,
        for the exported segmentation path)."""
        sample = bool(training) if sample is None else sample
        return self._descend(ds, training, sample, kl)

    def generate(self, top_shape, training=False, sample=True, temperature: float = 1.0):
        """Generation (no x): z_L ~ N(0, I), then z_i ~ p(z_i | z_{i+1}); q = p everywhere.

        `top_shape` is (B, h_L, w_L, 1). With `sample=False` every z is its prior mean;
        `temperature` < 1 scales every prior σ down (NVAE, VDVAE: fewer off-manifold draws).
        Returns the features of `call` and the list of z.
        """
        out = self._descend(
            None, training, sample, kl=False, top_shape=top_shape, temperature=temperature
        )
        return out["features"], out["z"]

    def get_config(self):
        return super().get_config() | {
            "filters": list(self.filters),
            "light_c": self.light_c,
            "kl": self.kl,
            "seed": self.seed,
            "norm": self.norm,
            "upsample": self.upsample,
        }
