"""Line 3 of Algorithm 2, every rule of it: ε̃ from the network's evaluations at z_λ.

Ho & Salimans, "Classifier-Free Diffusion Guidance" (arXiv 2207.12598), Algorithm 2, line 3:

    ε̃_t = (1 + w) ε_θ(z_t, c) − w ε_θ(z_t)          ε_θ(z_t) = ε_θ(z_t, ∅), the null label

w = 0 is the conditional model, w = −1 the unconditional one, w > 0 guidance. Libraries that use a "scale"
s (diffusers' guidance_scale, k-diffusion's cfg_scale) have s = 1 + w; every rule here takes the paper's w.

Every rule has one signature, the one sample.sample calls at each step:

    rule(model, z, logsnr, labels, w, state=None, **params) -> ε̃, or the pair (ε̃, ε to re-noise with)

model: ε_θ(z, λ, c) with a null label (model.null_label = ∅); z: z_λ (B, C, H, W); logsnr: λ, a number or (B,);
labels: c (B,); w: a number or (B,). state: a dict the loop makes fresh for each sampling run, for a rule that
carries something from step to step (APG's momentum); the others ignore it. params: the rule's own keyword
parameters, each checked by the rule (ValueError, one line), so the command line and a Python caller get the
same check. Bind them with functools.partial:

    rule = functools.partial(guidance.interval_guided_eps, logsnr_lo=-4.0, logsnr_hi=0.0)
    x = sample.sample(model, labels, w, guidance=rule)

`RULES` names them (sample.py --guidance NAME):

    cfg           the paper's rule (guided_eps)
    classifier    classifier guidance (Dhariwal & Nichol 2021) with a noise-conditional classifier p_φ(c | z_λ)
    interval      Kynkäänniemi et al. 2024: CFG only for λ in [λ_lo, λ_hi], elsewhere ε_θ(z, c) alone
    autoguidance  Karras et al. 2024: ε̃ = (1 + w) ε_θ(z, c) − w ε_bad(z, c), a worse model in place of ∅
    rescale       Lin et al. 2023: the guided v-prediction rescaled to the conditional one's std, blend φ
    apg           Sadat et al. 2024: the guidance difference of x̂ split along x̂_c and across it (η), its norm
                  capped at r, with momentum β
    cfgpp         Chung et al. 2024 (CFG++): x̃ from CFG at w ∈ [−1, 0], re-noised with ε_θ(z, ∅); the ddim step only
    guidance-free Chen et al. 2025 (GFT): a network trained by train.gft_loss gives CFG's ε̃ at w in one evaluation,
                  ε_s(z, c, β = 1/(1 + w)), w ≥ 0

A rule's second network (p_φ for classifier guidance, the bad model for autoguidance) is a keyword parameter
without a default, annotated with its class (model.NoisyClassifier, model.UNet). On x̃ rather than ε̃, Imagen's
dynamic thresholding replaces line 4's clip: sample.sample(..., clip_x=0.995).

The two evaluations ε_θ(z, c) and ε_θ(z, ∅) share z (`cond_and_uncond_eps`). The paper runs them as one batch of
2B, which costs about one pass of B on a GPU; on a CPU a batch of 2B costs more than two passes of B, so there the
two run one after the other (`ONE_BATCH`; bench.py measures both ways).

This file imports torch, math, schedule.py and model.py, and nothing else: it lifts out with them and sample.py.
"""
import math

import torch

from model import NoisyClassifier, UNet
from schedule import alpha_sigma, per_example, predict_eps, predict_x

# Whether ε_θ(z, c) and ε_θ(z, ∅) run as one batch of 2B (the paper's way) on a device type, else as two passes of
# B; device types not listed take one batch. The reason is measured, not assumed: bench.py's guided ÷ unguided step.
ONE_BATCH = {"cpu": False}


def unguided(w):
    """True where w = 0 everywhere: the rules then return ε_θ(z, c) from its one pass, whatever else they do."""
    return not torch.as_tensor(w).any()


def w_outside(w, inside):
    """The distinct values of w (a number or (B,)) where inside(w) is False (NaN included), sorted: a rule's range
    check names them in its one-line error."""
    w = torch.as_tensor(w)
    return sorted(set(w[~inside(w)].tolist()))


def cond_and_uncond_eps(model, z, logsnr, labels):
    """(ε_θ(z, c), ε_θ(z, ∅)): the two evaluations at the same z, as one batch of 2B or two passes of B (ONE_BATCH)."""
    null = torch.full_like(labels, model.null_label)  # ∅
    if not ONE_BATCH.get(z.device.type, True):
        return model(z, logsnr, labels), model(z, logsnr, null)
    logsnr = torch.as_tensor(logsnr, device=z.device).expand(len(z))
    return model(torch.cat([z, z]), torch.cat([logsnr, logsnr]), torch.cat([labels, null])).chunk(2)


# ------------------------------------------------------------------ the paper's rule

def guided_eps(model, z, logsnr, labels, w, state=None):
    """Classifier-free guidance (Alg. 2, line 3): ε̃ = (1 + w) ε_θ(z, c) − w ε_θ(z, ∅).

    w: a number, or (B,) with one w per example. Only the conditional pass runs when w = 0 everywhere."""
    if unguided(w):
        return model(z, logsnr, labels)
    eps_cond, eps_uncond = cond_and_uncond_eps(model, z, logsnr, labels)
    w = per_example(w, z)  # (B,) -> (B, 1, 1, 1)
    return (1 + w) * eps_cond - w * eps_uncond


# ------------------------------------------------------------------ classifier guidance

def classifier_grad(classifier, z, logsnr, labels):
    """∇_z log p_φ(c | z_λ), the shape of z, by autograd; works inside torch.no_grad (as sample() runs),
    not inside torch.inference_mode.

    The gradient of Σ_b log p_φ(c_b | z_b) with respect to z_b is that of row b alone, because the rows
    do not interact: the classifier must be in eval mode (no batch statistics, no dropout)."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        log_p = torch.log_softmax(classifier(z, logsnr), dim=1)  # (B, K): log p_φ(c | z_λ) for every c
        log_p_c = log_p.gather(1, labels[:, None]).sum()  # Σ_b log p_φ(c_b | z_b)
        return torch.autograd.grad(log_p_c, z)[0]


CLASSIFIER_BASES = ("uncond", "cond")


def classifier_guided_eps(model, z, logsnr, labels, w, state=None, *, classifier: NoisyClassifier, base="uncond"):
    """Classifier guidance (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs") on the paper's w axis: the
    implicit classifier of CFG replaced by a trained noise-conditional one, p_φ(c | z_λ) (classifier.py):

        base "uncond":  ε̂ = ε_θ(z_λ) − (1 + w) σ_λ ∇_z log p_φ(c | z_λ)     (1 + w = their scale s)
        base "cond":    ε̂ = ε_θ(z_λ, c) − w σ_λ ∇_z log p_φ(c | z_λ)       (the paper's equation for a
                                                                          conditional model)

    With the exact scores and the exact classifier both equal CFG's ε̃ (Bayes: ∇ log p^i(c | z_λ) =
    −(ε(z_λ, c) − ε(z_λ))/σ_λ). classifier: p_φ, forward(z, logsnr) -> logits, in eval mode. Where the
    classifier's factor (1 + w, or w) is zero everywhere, only the one pass of ε_θ runs."""
    if base not in CLASSIFIER_BASES:
        raise ValueError(f"unknown base {base!r}: use 'uncond' (ε_θ(z_λ)) or 'cond' (ε_θ(z_λ, c))")
    w = torch.as_tensor(w, dtype=z.dtype, device=z.device)
    scale = 1 + w if base == "uncond" else w  # the factor of −σ_λ ∇_z log p_φ
    eps = model(z, logsnr, torch.full_like(labels, model.null_label) if base == "uncond" else labels)
    if unguided(scale):
        return eps
    logsnr = torch.as_tensor(logsnr, device=z.device).expand(len(z))
    sigma = per_example(alpha_sigma(logsnr)[1], z)  # σ_λ, (B, 1, 1, 1)
    return eps - per_example(scale, z) * sigma * classifier_grad(classifier, z, logsnr, labels)


# ------------------------------------------------------------------ guidance interval

# Kynkäänniemi et al.'s FID-best interval for EDM2-XXL on ImageNet-512 (their code: guidance at steps 17-22 of 32
# EDM steps, σ from 1.61 down to 0.28, weight 2.0, i.e. w = 1), in λ = −2 log σ. It was tuned for SD-VAE latents, not
# pixels: a starting point (notebook 05 maps the interval on MNIST; docs/results.md has what it found).
INTERVAL = (-2 * math.log(1.61), -2 * math.log(0.28))  # (λ_lo, λ_hi) ≈ (−0.95, 2.55)


def interval_guided_eps(model, z, logsnr, labels, w, state=None, *, logsnr_lo=INTERVAL[0], logsnr_hi=INTERVAL[1]):
    """Guidance in a limited interval (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited Interval Improves
    Sample and Distribution Quality in Diffusion Models"):

        ε̃ = (1 + w) ε_θ(z_λ, c) − w ε_θ(z_λ, ∅)    if λ_lo ≤ λ ≤ λ_hi
        ε̃ = ε_θ(z_λ, c)                             otherwise: one network evaluation, ∅ is not run

    They write the interval in EDM's noise level σ = σ_λ/α_λ = e^{−λ/2}, σ ∈ (σ_lo, σ_hi], so λ = −2 log σ (closed
    at both ends here), and their guidance weight is the scale 1 + w. logsnr: a number or (B,); rows outside the
    interval get w = 0, so a batch with no row inside runs one pass of B (guided_eps)."""
    if not (math.isfinite(logsnr_lo) and math.isfinite(logsnr_hi) and logsnr_lo < logsnr_hi):
        raise ValueError(f"the interval [{logsnr_lo}, {logsnr_hi}] must be two finite λ with logsnr_lo < logsnr_hi")
    logsnr_t = torch.as_tensor(logsnr, device=z.device)
    inside = (logsnr_lo <= logsnr_t) & (logsnr_t <= logsnr_hi)  # () or (B,)
    return guided_eps(model, z, logsnr, labels, torch.as_tensor(w, dtype=z.dtype, device=z.device) * inside)


# ------------------------------------------------------------------ autoguidance

def autoguided_eps(model, z, logsnr, labels, w, state=None, *, guide: UNet):
    """Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself", eq. 2):
    D_w(x; σ, c) = w_K D_1(x; σ, c) + (1 − w_K) D_0(x; σ, c) with their weight w_K = 1 + w. The two denoisers mix
    with weights that sum to 1 at the same z_λ, so the mix is the same in x̂ and in ε:

        ε̃ = (1 + w) ε_θ(z_λ, c) − w ε_bad(z_λ, c)

    guide: ε_bad, a worse model of the same conditional task (same data, image shape and classes), smaller and/or
    trained for less time: an early checkpoint of the same run, or a smaller preset trained briefly. It is called
    with the label c, not ∅. Two networks, so two passes of B; only `model` runs where w = 0 everywhere."""
    eps_good = model(z, logsnr, labels)
    if unguided(w):
        return eps_good
    w = per_example(w, z)
    return (1 + w) * eps_good - w * guide(z, logsnr, labels)


# ------------------------------------------------------------------ CFG rescale

RESCALE_PHI = 0.7  # φ, Lin et al.'s value


def rescaled_guided_eps(model, z, logsnr, labels, w, state=None, *, phi=RESCALE_PHI):
    """CFG rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", sec. 3.4; φ = 0.7
    is theirs), on the v-prediction v = α_λ ε − σ_λ x̂ = (ε − σ_λ z_λ)/α_λ, the output of their networks:

        v_cfg = (1 + w) v_c − w v_∅                                      (their scale 1 + w)
        v̂ = φ · v_cfg · std(v_c) / std(v_cfg) + (1 − φ) · v_cfg           std over one sample's C, H, W
        ε̃ = α_λ v̂ + σ_λ z_λ

    Computed with u = α_λ v = ε − σ_λ z_λ (the std ratio does not see the factor α_λ, so nothing is divided by a
    tiny α_λ). diffusers' rescale_noise_cfg applies the same lines to ε itself: for an ε-prediction network that
    is a different rule. Only the conditional pass runs where w = 0 everywhere (ε̃ = ε_θ(z_λ, c))."""
    if not 0 <= phi <= 1:
        raise ValueError(f"rescale's phi = {phi} is outside [0, 1] (Lin et al.: 0.7)")
    if unguided(w):
        return model(z, logsnr, labels)
    eps_cond, eps_uncond = cond_and_uncond_eps(model, z, logsnr, labels)
    w = per_example(w, z)
    sigma_z = alpha_sigma(per_example(logsnr, z))[1] * z  # σ_λ z_λ
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
# (r bounds a norm over all of an image's pixels, so it depends on the image size: notebook 05 measures it on MNIST).
APG_ETA, APG_R, APG_BETA = 0.0, 2.5, -0.75


def apg_eps(model, z, logsnr, labels, w, state=None, *, eta=APG_ETA, r=APG_R, beta=APG_BETA):
    """Adaptive projected guidance (Sadat et al. 2024, "Eliminating Oversaturation and Artifacts of High Guidance
    Scales in Diffusion Models", Algorithm 1), on the data prediction x̂ = (z_λ − σ_λ ε)/α_λ. Their CFG is
    x̂_c + (s − 1)(x̂_c − x̂_∅) with the scale s = 1 + w; APG replaces the difference by Δ′:

        Δ_t = x̂_c − x̂_∅                              the guidance difference at step t
        D_t = Δ_t + β D_{t−1},  D_0 = 0                momentum (β < 0: their "reverse momentum")
        D_t ← D_t · min(1, r / ‖D_t‖)                  norm threshold; ‖·‖ over one sample's C, H, W
        Δ′ = D⊥ + η D∥                                 D_t split along x̂_c and across it (apg_project)
        x̂ = x̂_c + w Δ′,  ε̃ = (z_λ − α_λ x̂)/σ_λ

    This is the paper's form; diffusers' AdaptiveProjectedGuidance adds s Δ′ to x̂_∅ instead unless asked for the
    original formulation. r = inf switches the threshold off; η = 1, r = inf, β = 0 is CFG.

    state: the run's dict (sample.sample makes one per run), where D_{t−1} is kept from step to step; a caller who
    steps by hand passes one dict for the whole run. Where w = 0 everywhere, ε_θ(z, c) alone (no momentum needed)."""
    if not 0 <= eta <= 1:
        raise ValueError(f"apg's eta = {eta} is outside [0, 1] (Sadat et al.: 0)")
    if not r > 0:
        raise ValueError(f"apg's r = {r} must be positive (inf: no norm threshold)")
    if not -1 < beta < 1:
        raise ValueError(f"apg's beta = {beta} is outside (-1, 1)")
    if state is None:
        raise ValueError("apg_eps keeps its momentum in `state` from step to step: pass one dict for the whole run "
                         "(sample.sample does)")
    if unguided(w):
        return model(z, logsnr, labels)
    eps_cond, eps_uncond = cond_and_uncond_eps(model, z, logsnr, labels)
    x_cond, x_uncond = predict_x(z, eps_cond, logsnr), predict_x(z, eps_uncond, logsnr)
    diff = x_cond - x_uncond + beta * state.get("apg_momentum", 0.0)  # D_t = Δ_t + β D_{t−1}
    state["apg_momentum"] = diff
    norm = torch.linalg.vector_norm(diff, dim=tuple(range(1, z.ndim)), keepdim=True)
    diff = diff * torch.clamp(r / norm, max=1.0)  # min(1, r / ‖D_t‖)
    parallel, orthogonal = apg_project(diff, x_cond)
    return predict_eps(z, x_cond + per_example(w, z) * (orthogonal + eta * parallel), logsnr)


# ------------------------------------------------------------------ CFG++

def cfgpp_eps(model, z, logsnr, labels, w, state=None):
    """CFG++ (Chung et al. 2024, "CFG++: Manifold-constrained Classifier Free Guidance for Diffusion Models"), a
    change to the DDIM step. Their guidance scale (they call it λ; γ here, as λ is the log-SNR) is γ ∈ [0, 1], and
    their ε̂ = ε_∅ + γ (ε_c − ε_∅) is CFG's with the scale γ = 1 + w, i.e. w = γ − 1 ∈ [−1, 0]:

        ε̃ = (1 + w) ε_θ(z_λ, c) − w ε_θ(z_λ, ∅)          x̃_λ = (z_λ − σ_λ ε̃)/α_λ from it (line 4)
        z_λ′ = α_λ′ x̃_λ + σ_λ′ ε_θ(z_λ, ∅)               re-noised with the unconditional ε, not with ε̃

    Returns the pair (ε̃, ε_θ(z_λ, ∅)); sample.sample gives the second to a step that re-noises (ddim) and refuses
    it with the others (the paper defines CFG++ on the DDIM step). w = −1 (γ = 0) is DDIM on the unconditional
    model. w = 0 (γ = 1) takes x̃ from the conditional model but still re-noises with ε_θ(z_λ, ∅): unlike the
    other rules, CFG++ at w = 0 is not the conditional model. Both ε are evaluated at every w."""
    outside = w_outside(w, lambda w: (w >= -1) & (w <= 0))
    if outside:
        raise ValueError(f"cfgpp takes w = γ − 1 in [-1, 0] (CFG++'s scale γ in [0, 1]), got w = {outside}")
    eps_cond, eps_uncond = cond_and_uncond_eps(model, z, logsnr, labels)
    w = per_example(w, z)
    return (1 + w) * eps_cond - w * eps_uncond, eps_uncond


# ------------------------------------------------------------------ guidance-free training (GFT)

def guidance_free_eps(model, z, logsnr, labels, w, state=None):
    """The sampling model of guidance-free training (Chen et al. 2025, "Visual Generation Without Guidance"; trained
    by train.gft_loss), on the paper's w axis: one network evaluation, no ε_θ(z, ∅),

        ε̃ = ε_s(z_λ, c, β),   β = 1/(1 + w)          (their temperature β = 1/s, with CFG's scale s = 1 + w)

    GFT trains ε_s so that β ε_s(z, c, β) + (1 − β) ε_s(z, ∅, 1) is the conditional model, whose minimiser is
    ε_s(z, c, β) = (1 + w) ε(z, c) − w ε(z, ∅): CFG's ε̃. w = 0 (β = 1) is the conditional model. w: a number or
    (B,), w ≥ 0, since training draws β in (0, 1] (w < 0 would ask for β > 1, which the network never saw). model:
    a UNet with the strength input (UNetConfig(strength_input=True)). One pass of B at every w."""
    if not getattr(model, "strength_input", False):
        raise ValueError("guidance-free needs a network trained by guidance-free training (train.gft_loss, "
                         "UNetConfig(strength_input=True)); this one has no strength input: use --guidance cfg")
    outside = w_outside(w, lambda w: w >= 0)
    if outside:
        raise ValueError(f"guidance-free takes w >= 0 (β = 1/(1 + w) in (0, 1], the range it was trained on), "
                         f"got w = {outside}")
    beta = 1 / (1 + torch.as_tensor(w, dtype=torch.float64, device=z.device))  # () or (B,)
    return model(z, logsnr, labels, strength=beta)


RULES = {"cfg": guided_eps, "classifier": classifier_guided_eps, "interval": interval_guided_eps,
         "autoguidance": autoguided_eps, "rescale": rescaled_guided_eps, "apg": apg_eps, "cfgpp": cfgpp_eps,
         "guidance-free": guidance_free_eps}
