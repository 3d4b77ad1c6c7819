"""Guidance after the paper: later rules for line 3 of Algorithm 2, each one function (APG a small class).

Ho & Salimans (arXiv 2207.12598) guide with ε̃ = (1 + w) ε_θ(z_λ, c) − w ε_θ(z_λ, ∅) at every λ (sample.guided_eps).
Later papers change that line in small ways. Each change is a rule with the same signature,

    rule(model, z, logsnr, labels, w) -> ε̃,

that sample.sample runs with every sampler where the rule is defined. Every rule uses the paper's w (w = 0 means
no guidance); where a paper writes a guidance "scale" s (their w, γ, ω or λ), s = 1 + w.

    interval_guided_eps  Kynkäänniemi et al. 2024: CFG only for λ in [λ_lo, λ_hi], elsewhere ε_θ(z, c) alone
    autoguided_eps       Karras et al. 2024: ε̃ = (1 + w) ε_θ(z, c) − w ε_bad(z, c), a worse model in place of ∅
    rescaled_guided_eps  Lin et al. 2023: the guided v-prediction rescaled to the conditional one's std, blend φ
    APG                  Sadat et al. 2024: the guidance difference of x̂ split along x̂_c and across it (η),
                         its norm capped at r, with momentum β
    cfgpp_eps            Chung et al. 2024 (CFG++): x̃ from CFG at w ∈ [−1, 0], re-noised with ε_θ(z, ∅); DDIM only

On x̃ rather than ε̃, Imagen's dynamic thresholding replaces the fixed clip: sample.sample(..., clip_x=0.995)
(sample.dynamic_threshold). Parameters are bound with functools.partial:

    rule = functools.partial(interval_guided_eps, logsnr_lo=-1.0, logsnr_hi=2.5)
    x = sample.sample(model, labels, w, guidance=rule)
    x = sample.sample(model, labels, w, guidance=APG())                      # a fresh APG for every run
    x = sample.sample(model, labels, w - 1, sampler="ddim", guidance=cfgpp_eps)  # CFG++'s γ = 1 + w

Command line (sample.py):
    python sample.py --ckpt CKPT --guidance {cfg,classifier,interval,autoguidance,rescale,apg,cfgpp} \
        [--interval LO HI] [--guide-ckpt PATH] [--rescale-phi PHI] [--apg-eta ETA --apg-r R --apg-beta BETA] \
        [--cfgpp-gamma G ...] [--dynamic-threshold P]
This file imports sample.py (guided_eps and its two-pass helper) and schedule.py; sample.py's library does not
import it.
"""
import math

import torch

import schedule
from sample import cond_and_uncond_eps, guided_eps


def _per_example(w, z):
    """w (or λ), a number or (B,), as a tensor of z's dtype that broadcasts over z: (B,) -> (B, 1, 1, 1)."""
    w = torch.as_tensor(w, dtype=z.dtype, device=z.device)
    return w.reshape(-1, *[1] * (z.ndim - 1)) if w.ndim == 1 else w


# ------------------------------------------------------------------ guidance interval

# Kynkäänniemi et al.'s FID-best interval for EDM2-XXL on ImageNet-512 (their code: guidance at steps 17-22 of 32
# EDM steps, σ from 1.61 down to 0.28, weight 2.0, i.e. w = 1), in λ = −2 log σ. It was tuned for SD-VAE latents, not
# this project's pixels: a starting point. Measured on mnist-4k (notebook 05's map): [−4, 0] holds what guidance does
# there, with 2 of the fast sampler's 24 steps guided.
INTERVAL = (-2 * math.log(1.61), -2 * math.log(0.28))  # (λ_lo, λ_hi) ≈ (−0.95, 2.55)


def interval_guided_eps(model, z, logsnr, labels, w, *, logsnr_lo=INTERVAL[0], logsnr_hi=INTERVAL[1]):
    """Guidance in a limited interval (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited Interval Improves
    Sample and Distribution Quality in Diffusion Models"):

        ε̃ = (1 + w) ε_θ(z_λ, c) − w ε_θ(z_λ, ∅)    if λ_lo ≤ λ ≤ λ_hi
        ε̃ = ε_θ(z_λ, c)                             otherwise: one network evaluation, ∅ is not run

    They write the interval in EDM's noise level σ = σ_λ/α_λ = e^{−λ/2}, σ ∈ (σ_lo, σ_hi], so λ = −2 log σ (closed
    at both ends here), and their guidance weight is the scale 1 + w. logsnr: a number or (B,); rows outside the interval get w = 0, so a
    batch with no row inside runs one pass of B, otherwise one batch of 2B (sample.guided_eps)."""
    logsnr_t = torch.as_tensor(logsnr, device=z.device)
    inside = (logsnr_lo <= logsnr_t) & (logsnr_t <= logsnr_hi)  # () or (B,)
    return guided_eps(model, z, logsnr, labels, torch.as_tensor(w, dtype=z.dtype, device=z.device) * inside)


# ------------------------------------------------------------------ autoguidance

def autoguided_eps(model, z, logsnr, labels, w, *, guide):
    """Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself", eq. 2):
    D_w(x; σ, c) = w_K D_1(x; σ, c) + (1 − w_K) D_0(x; σ, c) with their weight w_K = 1 + w. The two denoisers mix
    with weights that sum to 1 at the same z_λ, so the mix is the same in x̂ and in ε:

        ε̃ = (1 + w) ε_θ(z_λ, c) − w ε_bad(z_λ, c)

    guide: ε_bad, a worse model of the same conditional task (same data, image shape and classes), smaller and/or
    trained for less time: an early checkpoint of the same run, or a smaller preset trained briefly. It is called
    with the label c, not ∅. Two networks, so two passes of B; only `model` runs where w = 0 everywhere."""
    w = _per_example(w, z)
    eps_good = model(z, logsnr, labels)
    if not w.any():
        return eps_good
    return (1 + w) * eps_good - w * guide(z, logsnr, labels)


# ------------------------------------------------------------------ CFG rescale

RESCALE_PHI = 0.7  # φ, Lin et al.'s value


def rescaled_guided_eps(model, z, logsnr, labels, w, *, phi=RESCALE_PHI):
    """CFG rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", sec. 3.4; φ = 0.7
    is theirs), on the v-prediction v = α_λ ε − σ_λ x̂ = (ε − σ_λ z_λ)/α_λ, the output of their networks:

        v_cfg = (1 + w) v_c − w v_∅                                      (their scale 1 + w)
        v̂ = φ · v_cfg · std(v_c) / std(v_cfg) + (1 − φ) · v_cfg           std over one sample's C, H, W
        ε̃ = α_λ v̂ + σ_λ z_λ

    Computed with u = α_λ v = ε − σ_λ z_λ (the std ratio does not see the factor α_λ, so nothing is divided by a
    tiny α_λ). diffusers' rescale_noise_cfg applies the same lines to ε itself: for an ε-prediction network that
    is a different rule. Only the conditional pass runs where w = 0 everywhere (ε̃ = ε_θ(z_λ, c))."""
    w = _per_example(w, z)
    if not w.any():
        return model(z, logsnr, labels)
    eps_cond, eps_uncond = cond_and_uncond_eps(model, z, logsnr, labels)
    sigma_z = schedule.alpha_sigma(_per_example(logsnr, z))[1] * z  # σ_λ z_λ
    u_cond, u_uncond = eps_cond - sigma_z, eps_uncond - sigma_z  # α_λ v_c, α_λ v_∅
    u_cfg = (1 + w) * u_cond - w * u_uncond
    dims = tuple(range(1, z.ndim))
    ratio = u_cond.std(dim=dims, keepdim=True) / u_cfg.std(dim=dims, keepdim=True)  # std(v_c) / std(v_cfg)
    return (phi * ratio + 1 - phi) * u_cfg + sigma_z


# ------------------------------------------------------------------ adaptive projected guidance (APG)

def apg_project(diff, x_cond):
    """(Δ∥, Δ⊥): `diff` split along x̂_c and orthogonal to it, per sample (inner products over C, H, W):
    Δ∥ = (⟨Δ, x̂_c⟩ / ⟨x̂_c, x̂_c⟩) x̂_c, Δ⊥ = Δ − Δ∥. In float64, as in the paper's code."""
    dims = tuple(range(1, diff.ndim))
    d, x = diff.double(), x_cond.double()
    unit = x / torch.linalg.vector_norm(x, dim=dims, keepdim=True).clamp(min=1e-12)  # x̂_c / ‖x̂_c‖
    parallel = (d * unit).sum(dim=dims, keepdim=True) * unit
    return parallel.to(diff.dtype), (d - parallel).to(diff.dtype)


# η = 0: Sadat et al.'s recommendation; β = −0.75 and r = 2.5: the defaults of public code that follows the paper
# (r bounds a norm over all of an image's pixels, so it depends on the image size: to be measured here).
APG_ETA, APG_R, APG_BETA = 0.0, 2.5, -0.75


class APG:
    """Adaptive projected guidance (Sadat et al. 2024, "Eliminating Oversaturation and Artifacts of High Guidance
    Scales in Diffusion Models", Algorithm 1), on the data prediction x̂ = (z_λ − σ_λ ε)/α_λ. Their CFG is
    x̂_c + (s − 1)(x̂_c − x̂_∅) with the scale s = 1 + w; APG replaces the difference by Δ′:

        Δ_t = x̂_c − x̂_∅                              the guidance difference at step t
        D_t = Δ_t + β D_{t−1},  D_0 = 0                momentum (β < 0: their "reverse momentum")
        D_t ← D_t · min(1, r / ‖D_t‖)                  norm threshold; ‖·‖ over one sample's C, H, W
        Δ′ = D⊥ + η D∥                                 D_t split along x̂_c and across it (apg_project)
        x̂ = x̂_c + w Δ′,  ε̃ = (z_λ − α_λ x̂)/σ_λ

    This is the paper's form; diffusers' AdaptiveProjectedGuidance adds s Δ′ to x̂_∅ instead unless asked for the
    original formulation. Defaults: APG_ETA, APG_R, APG_BETA above. r = inf switches the threshold off; η = 1,
    r = inf, β = 0 is CFG.

    Stateful: D_{t−1} is kept between the calls of one sampling run, so make a fresh APG for every sample.sample
    call (the command line makes one per batch). A call at a λ not above the previous call's (a new run on the same
    instance) raises ValueError rather than carry a stale momentum into it."""

    def __init__(self, eta=APG_ETA, r=APG_R, beta=APG_BETA):
        self.eta, self.r, self.beta = eta, r, beta
        self.momentum = 0.0  # D_{t−1}
        self.logsnr_prev = None  # λ of the previous call

    def __call__(self, model, z, logsnr, labels, w):
        logsnr_t = torch.as_tensor(logsnr, device=z.device)
        if self.logsnr_prev is not None and not (logsnr_t > self.logsnr_prev).all():
            raise ValueError("this APG instance was used by an earlier sampling run (λ did not increase): "
                             "make a fresh APG() for every sample() call")
        self.logsnr_prev = logsnr_t.clone()
        w = _per_example(w, z)
        if not w.any():  # no guidance: ε_θ(z, c), one pass (the momentum is not needed)
            return model(z, logsnr, labels)
        eps_cond, eps_uncond = cond_and_uncond_eps(model, z, logsnr, labels)
        x_cond, x_uncond = schedule.predict_x(z, eps_cond, logsnr), schedule.predict_x(z, eps_uncond, logsnr)
        diff = x_cond - x_uncond + self.beta * self.momentum  # D_t = Δ_t + β D_{t−1}
        self.momentum = diff
        norm = torch.linalg.vector_norm(diff, dim=tuple(range(1, z.ndim)), keepdim=True)
        diff = diff * torch.clamp(self.r / norm, max=1.0)  # min(1, r / ‖D_t‖)
        parallel, orthogonal = apg_project(diff, x_cond)
        return schedule.predict_eps(z, x_cond + w * (orthogonal + self.eta * parallel), logsnr)


# ------------------------------------------------------------------ CFG++

CFGPP_GAMMAS = (0.2, 0.4, 0.6, 0.8)  # the command line's default rows: CFG++'s scales γ = 1 + w across its range [0, 1]


def cfgpp_eps(model, z, logsnr, labels, w):
    """CFG++ (Chung et al. 2024, "CFG++: Manifold-constrained Classifier Free Guidance for Diffusion Models"), a
    change to the DDIM step. Their guidance scale (they call it λ; γ here, as λ is the log-SNR) is γ ∈ [0, 1], and
    their ε̂ = ε_∅ + γ (ε_c − ε_∅) is CFG's with the scale γ = 1 + w, i.e. w = γ − 1 ∈ [−1, 0]:

        ε̃ = (1 + w) ε_θ(z_λ, c) − w ε_θ(z_λ, ∅)          x̃_λ = (z_λ − σ_λ ε̃)/α_λ from it (line 4)
        z_λ′ = α_λ′ x̃_λ + σ_λ′ ε_θ(z_λ, ∅)               re-noised with the unconditional ε, not with ε̃

    Returns the pair (ε̃, ε_θ(z_λ, ∅)); sample.sample passes the second to ddim_step and refuses it with the other
    samplers (the paper defines CFG++ on the DDIM step). γ = 0 (w = −1) is DDIM on the unconditional model. γ = 1
    (w = 0) takes x̃ from the conditional model but still re-noises with ε_θ(z_λ, ∅): unlike the other rules,
    CFG++ at w = 0 is not the conditional model. Both ε come from one batch of 2B at every w."""
    eps_cond, eps_uncond = cond_and_uncond_eps(model, z, logsnr, labels)
    w = _per_example(w, z)
    return (1 + w) * eps_cond - w * eps_uncond, eps_uncond
