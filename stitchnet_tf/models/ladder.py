"""The SVAE: a ladder VAE whose d → z mapping is shared by inference and generation.

Top-down pass with x given (DESIGN-NOTES §2):
1. level L: q(z_L | x) = (b)_L(d_L), prior N(0, I);
2. for i = L−1 … 1: d̃_i = (a)_{i+1}((c)_{i+1}(z_{i+1})); prior p(z_i | z_{i+1}) = (b)_i(d̃_i);
   q̂ = (b)_i(d_i); posterior = precision-weighted merge of q̂ and the prior;
3. (c)_1(z_1) -> the features the StitchNet head turns into π, α, β.
Generation runs the same pass with q = p at every level.
"""

from __future__ import annotations

import keras
from keras import layers, ops

from stitchnet_tf.likelihood import gaussian_kl, gaussian_kl_mc
from stitchnet_tf.models.layers import LatentParams, LatentToFeatures, TopDown

KL_ESTIMATORS = ("analytic", "mc")


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
        **kwargs,
    ):
        super().__init__(**kwargs)
        if kl not in KL_ESTIMATORS:
            raise ValueError(f"kl must be one of {KL_ESTIMATORS}, got {kl!r}")
        self.filters, self.light_c, self.kl, self.seed = tuple(filters), light_c, kl, seed
        self.norm = norm
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
            TopDown(self.filters[i], norm=norm, dtype=policy, name=f"a_{i + 2}")
            for i in range(n - 1)
        ]
        self.seed_generator = keras.random.SeedGenerator(seed)

    @property
    def levels(self) -> int:
        return len(self.filters)

    def _draw(self, mu, sigma, sample):
        if not sample:
            return mu
        return mu + sigma * keras.random.normal(ops.shape(mu), seed=self.seed_generator)

    def _kl(self, z, mu_q, sigma_q, mu_p, sigma_p):
        """KL of one level per image: [B] (summed over its latent pixels)."""
        if self.kl == "analytic":
            kl = gaussian_kl(mu_q, sigma_q, mu_p, sigma_p)
        else:  # single-sample estimate log q(z) − log p(z)
            kl = gaussian_kl_mc(z, mu_q, sigma_q, mu_p, sigma_p)
        return ops.sum(kl, axis=(1, 2, 3))

    def call(self, ds, training=None, sample=None, kl=True):
        """Inference path: bottom-up features `ds` -> features for the head, the z, q and p
        parameters of every level and the per-level KL [B, L] (`kl=False` leaves the KL out,
        for the exported segmentation path)."""
        sample = bool(training) if sample is None else sample
        n = self.levels
        mu, sigma = self.latent_params[-1](ds[-1], training=training)
        prior_mu, prior_sigma = ops.zeros_like(mu), ops.ones_like(mu)
        z = self._draw(mu, sigma, sample)
        out = {k: [None] * n for k in ("z", "mu", "sigma", "prior_mu", "prior_sigma")}
        kls = [None] * n

        def keep(i, z, mu, sigma, prior_mu, prior_sigma):
            out["z"][i], out["mu"][i], out["sigma"][i] = z, mu, sigma
            out["prior_mu"][i], out["prior_sigma"][i] = prior_mu, prior_sigma
            if kl:
                kls[i] = self._kl(z, mu, sigma, prior_mu, prior_sigma)

        keep(n - 1, z, mu, sigma, prior_mu, prior_sigma)
        for i in range(n - 2, -1, -1):
            d_tilde = self.top_down[i](
                self.to_features[i + 1](ops.cast(z, self.compute_dtype), training=training),
                training=training,
            )
            prior_mu, prior_sigma = self.latent_params[i](d_tilde, training=training)
            mu_hat, sigma_hat = self.latent_params[i](ds[i], training=training)
            mu, sigma = precision_weighted_merge(mu_hat, sigma_hat, prior_mu, prior_sigma)
            z = self._draw(mu, sigma, sample)
            keep(i, z, mu, sigma, prior_mu, prior_sigma)
        features = self.to_features[0](ops.cast(z, self.compute_dtype), training=training)
        out = {"features": features, **out}
        if kl:
            out["kl"] = ops.stack(kls, axis=1)
        return out

    def generate(self, top_shape, training=False, sample=True):
        """Generation (no x): z_L ~ N(0, I), then z_i ~ p(z_i | z_{i+1}); q = p everywhere.

        `top_shape` is (B, h_L, w_L, 1). With `sample=False` every z is its prior mean.
        Returns the features of `call` and the list of z.
        """
        z = (
            keras.random.normal(top_shape, seed=self.seed_generator)
            if sample
            else ops.zeros(top_shape)
        )
        zs = [None] * self.levels
        zs[-1] = z
        for i in range(self.levels - 2, -1, -1):
            d_tilde = self.top_down[i](
                self.to_features[i + 1](ops.cast(z, self.compute_dtype), training=training),
                training=training,
            )
            mu, sigma = self.latent_params[i](d_tilde, training=training)
            z = self._draw(mu, sigma, sample)
            zs[i] = z
        features = self.to_features[0](ops.cast(z, self.compute_dtype), training=training)
        return features, zs

    def get_config(self):
        return super().get_config() | {
            "filters": list(self.filters),
            "light_c": self.light_c,
            "kl": self.kl,
            "seed": self.seed,
            "norm": self.norm,
        }
