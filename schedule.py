"""The forward process of Classifier-Free Diffusion Guidance, in log-SNR form.

Ho & Salimans, "Classifier-Free Diffusion Guidance" (arXiv 2207.12598), sec. 2.
Pure functions of tensors; imports only torch and math, so it copies as is.

    λ = log(α_λ² / σ_λ²)          log signal-to-noise ratio (larger: less noise)
    α_λ² = sigmoid(λ), σ_λ² = sigmoid(−λ)          (α_λ² + σ_λ² = 1)
    q(z_λ | x) = N(α_λ x, σ_λ² I),  i.e.  z_λ = α_λ x + σ_λ ε
    for λ < λ′:
    q(z_λ | z_λ′) = N((α_λ/α_λ′) z_λ′, σ²_{λ|λ′} I),  σ²_{λ|λ′} = (1 − e^{λ−λ′}) σ_λ²
    q(z_λ′ | z_λ, x) = N(μ̃_{λ′|λ}(z_λ, x), σ̃²_{λ′|λ} I)
        μ̃_{λ′|λ} = e^{λ−λ′} (α_λ′/α_λ) z_λ + (1 − e^{λ−λ′}) α_λ′ x
        σ̃²_{λ′|λ} = (1 − e^{λ−λ′}) σ_λ′²

Training draws λ = −2 log tan(a u + b), u ~ U(0, 1) (the "cosine" schedule: a
hyperbolic secant truncated to [λ_min, λ_max]); sampling walks it from u = 1 to 0.

A `logsnr` may be a float, a 0-d tensor or a (B,) tensor that broadcasts over x
of shape (B, ...). sigmoid / logsigmoid / expm1, never "1 − something", keep
float32 accurate over λ ∈ [−20, 20] (α at λ = −20 is about 4.5e-5).

Run `python schedule.py` to print α_λ, σ_λ and the schedule at a few points.
"""
import math

import torch

LOGSNR_MIN = -20.0  # λ_min, the paper's value for every model
LOGSNR_MAX = 20.0  # λ_max


def per_example(value, like):
    """A number or (B,) tensor (λ, w, a scale) as a tensor that broadcasts over
    `like`, in its dtype and device: (B,) becomes (B, 1, ..., 1). The one helper."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if value.ndim == 1 and like.ndim > 1:
        value = value.reshape(-1, *([1] * (like.ndim - 1)))  # (B,) -> (B, 1, 1, 1)
    return value


def _as_tensor(logsnr, like=None):
    """λ as a tensor; with `like`, one that broadcasts over it (per_example)."""
    return torch.as_tensor(logsnr) if like is None else per_example(logsnr, like)


def alpha_sigma(logsnr):
    """α_λ = sqrt(sigmoid(λ)), σ_λ = sqrt(sigmoid(−λ)); each from its own sigmoid."""
    logsnr = _as_tensor(logsnr)
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


def _cosine_ab(logsnr_min, logsnr_max):
    b = math.atan(math.exp(-0.5 * logsnr_max))
    a = math.atan(math.exp(-0.5 * logsnr_min)) - b
    return a, b


def logsnr_cosine(u, logsnr_min=LOGSNR_MIN, logsnr_max=LOGSNR_MAX):
    """λ = −2 log tan(a u + b): u = 0 gives λ_max, u = 1 gives λ_min."""
    a, b = _cosine_ab(logsnr_min, logsnr_max)
    return -2.0 * torch.log(torch.tan(a * _as_tensor(u) + b))


def logsnr_cosine_inverse(logsnr, logsnr_min=LOGSNR_MIN, logsnr_max=LOGSNR_MAX):
    """u = (arctan(e^{−λ/2}) − b) / a, the inverse of `logsnr_cosine`."""
    a, b = _cosine_ab(logsnr_min, logsnr_max)
    return (torch.atan(torch.exp(-0.5 * _as_tensor(logsnr))) - b) / a


def logsnr_uniform(u, logsnr_min=LOGSNR_MIN, logsnr_max=LOGSNR_MAX):
    """λ = λ_max + u (λ_min − λ_max): uniform in λ, oriented as cosine."""
    return logsnr_max + _as_tensor(u) * (logsnr_min - logsnr_max)


def logsnr_uniform_inverse(logsnr, logsnr_min=LOGSNR_MIN, logsnr_max=LOGSNR_MAX):
    """u = (λ_max − λ) / (λ_max − λ_min), the inverse of `logsnr_uniform`."""
    return (logsnr_max - _as_tensor(logsnr)) / (logsnr_max - logsnr_min)


# u ∈ [0, 1] -> λ, with u = 0 at λ_max
SCHEDULES = {"cosine": logsnr_cosine, "uniform": logsnr_uniform}


def logsnr_schedule(u, schedule="cosine"):
    """λ at u by name: "cosine" (the paper's, for training and Alg. 2) or "uniform"."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown log-SNR schedule {schedule!r}: "
                         f"use one of {', '.join(SCHEDULES)}")
    return SCHEDULES[schedule](u)


def q_sample(x, logsnr, eps):
    """z_λ = α_λ x + σ_λ ε, a draw from q(z_λ | x) given the noise ε."""
    alpha, sigma = alpha_sigma(_as_tensor(logsnr, like=x))
    return alpha * x + sigma * eps


def predict_x(z, eps, logsnr):
    """x = (z_λ − σ_λ ε) / α_λ: the data implied by a noise prediction."""
    alpha, sigma = alpha_sigma(_as_tensor(logsnr, like=z))
    return (z - sigma * eps) / alpha


def predict_eps(z, x, logsnr):
    """ε = (z_λ − α_λ x) / σ_λ: the noise implied by a data prediction."""
    alpha, sigma = alpha_sigma(_as_tensor(logsnr, like=z))
    return (z - alpha * x) / sigma


def q_posterior(z, x, logsnr, logsnr_next):
    """Mean and variance of q(z_λ′ | z_λ, x) for λ = logsnr < λ′ = logsnr_next.

    μ̃ = e^{λ−λ′} (α_λ′/α_λ) z_λ + (1 − e^{λ−λ′}) α_λ′ x,   σ̃² = (1 − e^{λ−λ′}) σ_λ′².
    """
    logsnr = _as_tensor(logsnr, like=z)
    logsnr_next = _as_tensor(logsnr_next, like=z)
    alpha_next, sigma_next = alpha_sigma(logsnr_next)
    one_minus_r = -torch.expm1(logsnr - logsnr_next)  # 1 − e^{λ−λ′}, accurate for small λ′ − λ
    # e^{λ−λ′} α_λ′/α_λ in log space: α_λ can be 4.5e-5, the product is ≤ 1.
    z_coef = torch.exp(logsnr - logsnr_next
                       + 0.5 * (torch.nn.functional.logsigmoid(logsnr_next)
                                - torch.nn.functional.logsigmoid(logsnr)))
    mean = z_coef * z + one_minus_r * alpha_next * x
    var = one_minus_r * sigma_next ** 2
    return mean, var


def reverse_variance(logsnr, logsnr_next, v):
    """(σ̃²_{λ′|λ})^{1−v} (σ²_{λ|λ′})^v: Algorithm 2's log-space blend (λ < λ′).

    v = 0: the posterior variance σ̃²_{λ′|λ} = (1 − e^{λ−λ′}) σ_λ′²;
    v = 1: the forward variance σ²_{λ|λ′} = (1 − e^{λ−λ′}) σ_λ².
    """
    logsnr = _as_tensor(logsnr)
    logsnr_next = _as_tensor(logsnr_next)
    log_one_minus_r = torch.log(-torch.expm1(logsnr - logsnr_next))
    log_sigma2 = torch.nn.functional.logsigmoid(-logsnr)  # log σ_λ²
    log_sigma2_next = torch.nn.functional.logsigmoid(-logsnr_next)  # log σ_λ′²
    return torch.exp(log_one_minus_r + (1 - v) * log_sigma2_next + v * log_sigma2)


if __name__ == "__main__":
    u = torch.linspace(0, 1, 9, dtype=torch.float64)
    logsnr = logsnr_cosine(u)
    alpha, sigma = alpha_sigma(logsnr)
    print(f"{'u':>6} {'λ':>9} {'α_λ':>11} {'σ_λ':>11}")
    for row in zip(u.tolist(), logsnr.tolist(), alpha.tolist(), sigma.tolist()):
        print("{:6.3f} {:9.3f} {:11.4e} {:11.4e}".format(*row))
