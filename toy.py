"""A 2-D, three-class Gaussian mixture whose noise predictions are known exactly at every λ.

Each class is a mixture p(x | c) = Σ_k π_ck N(x; m_ck, S_ck) with equal priors p(c) = 1/3 (the
paper's Figure 2 uses three Gaussians). Noising keeps it a mixture,
p(z_λ | c) = Σ_k π_ck N(z_λ; α_λ m_ck, α_λ² S_ck + σ_λ² I), so

    ε*(z_λ, c) = σ_λ Σ_k r_ck(z_λ) (α_λ² S_ck + σ_λ² I)⁻¹ (z_λ − α_λ m_ck)

with r_ck the components' responsibilities, and ε*(z_λ) = ε*(z_λ, ∅) the same sum over every
component with weights p(c) π_ck. `ExactEps` puts ε* behind the interface of the project's
networks (forward(z, logsnr, labels), null_label), so `sample.sample` runs on it unchanged:

    x = sample.sample(toy.ExactEps(), labels, w, steps=256, clip_x=False, shape=(2,))

All in float64; λ = +inf is the data itself (α = 1, σ = 0). Notebook 01 derives and checks the
implicit classifier on it; `explore.toy_panel` draws it under sliders.
"""
import math

import torch
import torch.nn as nn

import schedule

F64 = torch.float64
NUM_CLASSES, NULL = 3, 3  # labels 0, 1, 2; the null label ∅ = 3 (as in model.py)
LOG_PRIOR = math.log(1 / NUM_CLASSES)  # log p(c)
COLORS = ["tab:blue", "tab:orange", "tab:green"]
LIM = 3.2  # the square [−LIM, LIM]² holds the data and the figures


def rotated_cov(std_along, std_across, degrees):
    """A 2×2 covariance with these standard deviations along / across the direction `degrees`."""
    a = math.radians(degrees)
    rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=F64)
    return rot @ torch.diag(torch.tensor([std_along ** 2, std_across ** 2], dtype=F64)) @ rot.T


COMPONENTS = [  # (class c, weight π_ck within the class, mean m_ck, covariance S_ck)
    (0, 1.0, (0.0, 1.0), rotated_cov(0.85, 0.4, 0)),  # class 0: one elongated Gaussian on top
    (1, 0.6, (-0.95, -0.45), rotated_cov(0.7, 0.35, 120)),  # class 1: two, lower left
    (1, 0.4, (-0.35, -0.85), rotated_cov(0.5, 0.3, 30)),
    (2, 0.5, (0.65, -0.35), rotated_cov(0.5, 0.3, 60)),  # class 2: two, lower right
    (2, 0.5, (1.15, -0.75), rotated_cov(0.5, 0.3, 60)),
]
COMP_CLASS = torch.tensor([c for c, _, _, _ in COMPONENTS])  # (M,)
LOG_PI = torch.log(torch.tensor([p for _, p, _, _ in COMPONENTS], dtype=F64))  # (M,) log π_ck
COMP_MEAN = torch.tensor([m for _, _, m, _ in COMPONENTS], dtype=F64)  # (M, 2)
COMP_COV = torch.stack([S for _, _, _, S in COMPONENTS])  # (M, 2, 2)


def noised_components(logsnr):
    """Means α_λ m_k (B, M, 2) and covariances α_λ² S_k + σ_λ² I (B, M, 2, 2) at λ (B,)."""
    alpha, sigma = schedule.alpha_sigma(logsnr.to(F64))
    mean = alpha[:, None, None] * COMP_MEAN
    cov = (alpha[:, None, None, None] ** 2 * COMP_COV
           + sigma[:, None, None, None] ** 2 * torch.eye(2, dtype=F64))
    return mean, cov


def component_logits(z, logsnr, labels):
    """(log[weight_k N(z; α m_k, α² S_k + σ² I)] (B, M), means, covariances): −inf for the
    components outside class c; labels == NULL weigh every component by p(c) π_ck (p(z_λ))."""
    mean, cov = noised_components(logsnr)
    log_n = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov).log_prob(
        z[:, None, :])  # (B, M)
    uncond = (labels == NULL)[:, None]  # (B, 1)
    log_w = torch.where(uncond, LOG_PRIOR + LOG_PI, LOG_PI)  # (B, M)
    in_class = uncond | (COMP_CLASS[None, :] == labels[:, None])  # (B, M)
    return torch.where(in_class, log_w + log_n, torch.tensor(-math.inf, dtype=F64)), mean, cov


def log_p(z, logsnr, labels):
    """log p(z_λ | c), or log p(z_λ) where labels == NULL: (B,)."""
    return torch.logsumexp(component_logits(z, logsnr, labels)[0], dim=1)


def log_classifier(z, logsnr, labels):
    """The exact classifier log p(c | z_λ) = log p(z_λ | c) + log p(c) − log p(z_λ): (B,)."""
    return log_p(z, logsnr, labels) + LOG_PRIOR - log_p(z, logsnr, torch.full_like(labels, NULL))


def eps_exact(z, logsnr, labels):
    """ε*(z_λ, c) = σ_λ Σ_k r_k (α²S_k + σ²I)⁻¹(z − α m_k), closed form (no autograd); (B, 2)."""
    logits, mean, cov = component_logits(z, logsnr, labels)
    resp = torch.softmax(logits, dim=1)  # (B, M)
    precision_times_diff = torch.linalg.solve(cov, (z[:, None, :] - mean)[..., None])[..., 0]
    _, sigma = schedule.alpha_sigma(logsnr.to(F64))
    return sigma[:, None] * (resp[..., None] * precision_times_diff).sum(dim=1)


class ExactEps(nn.Module):
    """The exact ε*(z_λ, c) behind the interface sample.py expects."""
    null_label = NULL

    def forward(self, z, logsnr, labels):
        logsnr = torch.as_tensor(logsnr, dtype=F64).expand(z.shape[0])
        return eps_exact(z.to(F64), logsnr, labels).to(z.dtype)


def sample_data(labels, generator=None):
    """Exact draws x ~ p(x | c), one per label: a component of the class by π, then its Gaussian."""
    probs = torch.where(COMP_CLASS[None, :] == labels[:, None], LOG_PI.exp(), torch.zeros(()))
    k = torch.multinomial(probs, 1, generator=generator)[:, 0]  # (B,)
    noise = torch.randn(len(labels), 2, generator=generator, dtype=F64)
    return COMP_MEAN[k] + (torch.linalg.cholesky(COMP_COV[k]) @ noise[..., None])[..., 0]


def grid(n=161, lim=LIM):
    """(gx, gy, points): an n × n grid over [−lim, lim]² and its points (n², 2), float64."""
    axis = torch.linspace(-lim, lim, n, dtype=F64)
    gx, gy = torch.meshgrid(axis, axis, indexing="xy")
    return gx, gy, torch.stack([gx.flatten(), gy.flatten()], dim=1)
