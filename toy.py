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
implicit classifier on it; `explore.toy_panel` draws it under sliders; notebook 07 measures every
guidance rule against its exact targets (`sample_tilted`, `mmd2`, `bayes_accuracy`, `mode_shares`).
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


def noised_components(logsnr, blur=0.0):
    """Means α_λ m_k (B, M, 2) and covariances α_λ² (S_k + b² I) + σ_λ² I (B, M, 2, 2) at λ (B,);
    blur b > 0: the data convolved with N(0, b² I), a worse model of it (autoguidance's guide)."""
    alpha, sigma = schedule.alpha_sigma(logsnr.to(F64))
    mean = alpha[:, None, None] * COMP_MEAN
    eye = torch.eye(2, dtype=F64)
    cov = (alpha[:, None, None, None] ** 2 * (COMP_COV + blur ** 2 * eye)
           + sigma[:, None, None, None] ** 2 * eye)
    return mean, cov


def component_logits(z, logsnr, labels, blur=0.0):
    """(log[weight_k N(z; α m_k, α² S_k + σ² I)] (B, M), means, covariances): −inf for the
    components outside class c; labels == NULL weigh every component by p(c) π_ck (p(z_λ))."""
    mean, cov = noised_components(logsnr, blur)
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


def eps_exact(z, logsnr, labels, blur=0.0):
    """ε*(z_λ, c) = σ_λ Σ_k r_k (α²S_k + σ²I)⁻¹(z − α m_k), closed form (no autograd); (B, 2)."""
    logits, mean, cov = component_logits(z, logsnr, labels, blur)
    resp = torch.softmax(logits, dim=1)  # (B, M)
    precision_times_diff = torch.linalg.solve(cov, (z[:, None, :] - mean)[..., None])[..., 0]
    _, sigma = schedule.alpha_sigma(logsnr.to(F64))
    return sigma[:, None] * (resp[..., None] * precision_times_diff).sum(dim=1)


class ExactEps(nn.Module):
    """The exact ε*(z_λ, c) behind the interface sample.py expects; with blur b > 0, the exact ε
    of the data convolved with N(0, b² I) (a worse model: autoguidance's guide)."""
    null_label = NULL

    def __init__(self, blur=0.0):
        super().__init__()
        self.blur = blur

    def forward(self, z, logsnr, labels):
        logsnr = torch.as_tensor(logsnr, dtype=F64).expand(z.shape[0])
        return eps_exact(z.to(F64), logsnr, labels, self.blur).to(z.dtype)


class ExactClassifier(nn.Module):
    """The exact p(c | z_λ) as a noisy classifier (guidance.classifier_guided_eps): forward(z, λ)
    -> logits log p(z_λ | c) (B, 3), whose softmax is p(c | z_λ) under the equal priors."""

    def forward(self, z, logsnr):
        logsnr = torch.as_tensor(logsnr, dtype=F64).expand(z.shape[0])
        return torch.stack([log_p(z.to(F64), logsnr, torch.full((len(z),), c))
                            for c in range(NUM_CLASSES)], dim=1).to(z.dtype)


class ExactGuidanceFree(ExactEps):
    """The minimiser of guidance-free training on the toy: ε_s(z, c, β) = CFG's ε̃ at w = 1/β − 1,
    one evaluation (guidance.guidance_free_eps)."""
    strength_input = True

    def forward(self, z, logsnr, labels, strength=None):
        w = 1 / torch.as_tensor(strength, dtype=F64).expand(len(z))[:, None] - 1
        eps_c = super().forward(z, logsnr, labels).to(F64)
        eps_u = super().forward(z, logsnr, torch.full_like(labels, NULL)).to(F64)
        return ((1 + w) * eps_c - w * eps_u).to(z.dtype)


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


# ---------------- what a rule's samples are measured against (notebook 07)

def log_class_densities(x):
    """log p(x | c) for every class at the data (λ = +inf): (N, 3), from one evaluation of the
    components."""
    log_n = torch.distributions.MultivariateNormal(COMP_MEAN, covariance_matrix=COMP_COV).log_prob(
        x.to(F64)[:, None, :])  # (N, M)
    return torch.stack([torch.logsumexp((LOG_PI + log_n)[:, COMP_CLASS == c], dim=1)
                        for c in range(NUM_CLASSES)], dim=1)


def log_tilted(x, labels, w):
    """log p(x | c) + w log p(c | x) at the data, unnormalised: the distribution whose scaled
    score CFG's ε̃ is at λ = +inf (not, in general, what CFG samples: notebook 07)."""
    log_pc = log_class_densities(x)  # equal priors: log p(c | x) = log_pc − logsumexp
    log_post = log_pc - torch.logsumexp(log_pc, dim=1, keepdim=True)
    rows = torch.arange(len(x))
    return log_pc[rows, labels] + w * log_post[rows, labels]


def sample_tilted(labels, w, generator=None, n=1201, lim=5.0):
    """Draws from p(x | c) p(c | x)^w, one per label: normalised on an n × n grid over [−lim,
    lim]², a cell by its mass, then uniform within it (cells of 2 lim / (n − 1) = 0.008)."""
    _, _, points = grid(n, lim)
    cell = 2 * lim / (n - 1)
    out = torch.empty(len(labels), 2, dtype=F64)
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero()[:, 0]
        log_mass = log_tilted(points, torch.full((len(points),), c), w)
        pick = torch.multinomial(torch.softmax(log_mass, 0), len(rows), replacement=True,
                                 generator=generator)
        jitter = (torch.rand(len(rows), 2, generator=generator, dtype=F64) - 0.5) * cell
        out[rows] = points[pick] + jitter
    return out


MMD_BANDWIDTHS = (0.1, 0.3, 1.0)  # Gaussian kernels summed: a mode's shape, its place, the whole


def mmd2(a, b, bandwidths=MMD_BANDWIDTHS):
    """The unbiased squared MMD of point sets a (N, 2) and b (M, 2), with the sum of Gaussian
    kernels exp(−‖x − y‖² / 2h²) over the bandwidths h: 0 on average for two draws of one
    distribution at any N."""
    a, b = a.to(F64), b.to(F64)

    def k(x, y):
        d2 = torch.cdist(x, y).pow(2)
        return sum(torch.exp(-d2 / (2 * h ** 2)) for h in bandwidths)

    def within(x):
        kxx = k(x, x)
        return (kxx.sum() - kxx.diagonal().sum()) / (len(x) * (len(x) - 1))

    return (within(a) + within(b) - 2 * k(a, b).mean()).item()


def bayes_accuracy(x, labels):
    """The fraction of x whose exact Bayes class argmax_c p(c | x) (at the data) is its label."""
    return (log_class_densities(x).argmax(1) == labels).double().mean().item()


def mode_shares(x, labels):
    """{component k: the share of its class's samples that k explains best} for the classes with
    more than one component; p(x | c) itself gives about π_ck (COMPONENTS)."""
    inf = torch.full((len(x),), math.inf, dtype=F64)
    logits, _, _ = component_logits(x.to(F64), inf, labels)
    best = logits.argmax(1)
    shares = {}
    for k, (c, _, _, _) in enumerate(COMPONENTS):
        if (COMP_CLASS == c).sum() > 1:
            shares[k] = (best[labels == c] == k).double().mean().item()
    return shares
