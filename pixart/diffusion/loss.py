"""The PixArt training loss: IDDPM's "MSE + learned-range variational bound" (Nichol & Dhariwal 2021).

    loss = mean_flat((eps - eps_theta(x_t, t))^2) + L_vb(t)          (per sample, then averaged over the batch)

L_vb is KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) in bits, or at t = 0 the discretized-Gaussian decoder
NLL, computed with the eps prediction *detached*: the bound only trains the variance channels, the mean is
trained by the MSE alone. PixArt uses the plain (not rescaled) MSE loss type, so L_vb is not multiplied by
T / 1000. Everything is float32; the schedule's per-step values are gathered from constant tables.

`DiffusionLoss` is a pure function of (model parameters, x_0, t, noise, conditioning): every random draw is an
input, which is what lets a test compare the cache with on-the-fly encoding, and one process with two ranks.
"""
from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from pixart.diffusion.schedule import NoiseSchedule, default_schedule

_LOG2 = math.log(2.0)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + ops.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * ops.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """The tanh approximation of the standard normal CDF that IDDPM uses."""
    return 0.5 * (1.0 + ops.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(x) in nats of N(means, e^(2 log_scales)) integrated over the bin of width 2/255 around x, with open
    outer bins below -0.999 and above 0.999 (IDDPM's decoder, applied by PixArt to latents unchanged)."""
    centered = x - means
    inv_stdv = ops.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = ops.log(ops.clamp(cdf_plus, min=1e-12))
    log_one_minus_cdf_min = ops.log(ops.clamp(1.0 - cdf_min, min=1e-12))
    log_cdf_delta = ops.log(ops.clamp(cdf_plus - cdf_min, min=1e-12))
    return ops.where(x < -0.999, log_cdf_plus, ops.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def mean_flat(x):
    """Mean over every axis but the batch axis: (B, ...) -> (B,)."""
    return x.reshape(x.shape[0], -1).mean(-1)


class DiffusionLoss(nn.Cell):
    """(x_0, t, noise, caption, mask, micro-conditions, caption-drop flags) -> (loss, per-sample terms).

    x0 (B, C, H, W) scaled latents; t (B,) int32 in [0, T); noise (B, C, H, W); y (B, 1, L, C_text); mask (B, L);
    img_hw (B, 2) and aspect_ratio (B, 1) (used only by micro-conditioned models); drop (B,) 1 = null caption.
    Returns the batch-mean loss and a (3, B) stack of per-sample [loss, mse, vb] for logging.
    """

    def __init__(self, model: nn.Cell, schedule: NoiseSchedule | None = None, learn_sigma: bool | None = None,
                 snr_gamma: float | None = None):
        super().__init__(auto_prefix=False)  # the model's parameters keep their checkpoint names
        self.model = model
        s = schedule or default_schedule()
        self.num_timesteps = s.num_timesteps
        self.learn_sigma = model.out_channels == 2 * model.config.in_channels if learn_sigma is None else learn_sigma

        def table(arr):  # float64 host values, rounded once to float32 as IDDPM's _extract_into_tensor does
            return Tensor(np.asarray(arr, np.float64).astype(np.float32))

        self.sqrt_ac = table(s.sqrt_alphas_cumprod)
        self.sqrt_1m_ac = table(s.sqrt_one_minus_alphas_cumprod)
        self.sqrt_recip_ac = table(s.sqrt_recip_alphas_cumprod)
        self.sqrt_recipm1_ac = table(s.sqrt_recipm1_alphas_cumprod)
        self.coef1 = table(s.posterior_mean_coef1)
        self.coef2 = table(s.posterior_mean_coef2)
        self.post_logvar = table(s.posterior_log_variance_clipped)
        self.log_betas = table(s.log_betas)
        # Min-SNR-gamma (Hang et al. 2023, diffusers' --snr_gamma): the noise MSE at step t weighted by
        # min(SNR_t, gamma) / SNR_t, which lowers the weight of the low-noise steps
        self.snr_gamma = snr_gamma
        if snr_gamma:
            snr = np.asarray(s.alphas_cumprod, np.float64) / (1.0 - np.asarray(s.alphas_cumprod, np.float64))
            self.mse_weight = table(np.minimum(snr, snr_gamma) / snr)

    def _at(self, table, t):
        return ops.gather(table, t, 0).reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)

    def construct(self, x0, t, noise, y, mask, img_hw, aspect_ratio, drop):
        x0, t = x0.astype(ms.float32), t.astype(ms.int32)
        x_t = self.noised(x0, t, noise)
        data_info = {"img_hw": img_hw, "aspect_ratio": aspect_ratio}
        out = self.model(x_t, t.astype(ms.float32), y, mask, data_info, drop)  # (B, 2C, H, W)
        return self.terms(out, x0, x_t, t, noise)

    def noised(self, x0, t, noise):
        """q(x_t | x_0): the training input at step t (B,) int32."""
        return self._at(self.sqrt_ac, t) * x0 + self._at(self.sqrt_1m_ac, t) * noise

    def terms(self, out, x0, x_t, t, noise):
        """The model's output (B, C or 2C, H, W) at x_t -> (batch-mean loss, (3, B) per-sample [loss, mse, vb])."""
        out = out.astype(ms.float32)
        c = x0.shape[1]
        eps = out[:, :c]
        mse = mean_flat((noise - eps) ** 2)  # (B,)
        if self.snr_gamma:
            mse = mse * ops.gather(self.mse_weight, t, 0)
        if self.learn_sigma:
            vb = self.vb_terms(ops.stop_gradient(eps), out[:, c:], x0, x_t, t)
        else:
            vb = mse * 0.0
        loss = mse + vb
        return loss.mean(), ops.stack([loss, mse, vb])

    def vb_terms(self, eps, v, x0, x_t, t):
        """L_vb per sample, in bits: KL of the true and the predicted posterior; the decoder NLL at t = 0."""
        # true posterior q(x_{t-1} | x_t, x_0)
        true_mean = self._at(self.coef1, t) * x0 + self._at(self.coef2, t) * x_t
        true_logvar = self._at(self.post_logvar, t)
        # model posterior: mean from the (detached) eps, log-variance interpolated by v in [-1, 1]
        pred_x0 = self._at(self.sqrt_recip_ac, t) * x_t - self._at(self.sqrt_recipm1_ac, t) * eps
        mean = self._at(self.coef1, t) * pred_x0 + self._at(self.coef2, t) * x_t
        frac = (v + 1.0) * 0.5
        logvar = frac * self._at(self.log_betas, t) + (1.0 - frac) * true_logvar
        kl = mean_flat(normal_kl(true_mean, true_logvar, mean, logvar)) / _LOG2
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar)) / _LOG2
        return ops.where(t == 0, nll, kl)
