"""Line 3 of Algorithm 2, every rule of it: ε̃ from the network's evaluations at z_λ.

Ho & Salimans, "Classifier-Free Diffusion Guidance" (arXiv 2207.12598), Alg. 2, line 3:

    ε̃_t = (1 + w) ε_θ(z_t, c) − w ε_θ(z_t)        ε_θ(z_t) = ε_θ(z_t, ∅), the null label

w = 0 is the conditional model, w = −1 the unconditional one. Every rule takes
the paper's w; a "scale" (diffusers' guidance_scale, k-diffusion's cfg_scale)
is s = 1 + w. Every rule has the one signature sample.sample calls:

    rule(model, z, logsnr, labels, w, state=None, **params) -> ε̃ or (ε̃, ε to re-noise)

model: ε_θ(z, λ, c) with model.null_label = ∅; z: z_λ (B, C, H, W); logsnr: λ,
a number or (B,); labels: c (B,); w: a number or (B,); state: a fresh dict per
run (APG's momentum). params: the rule's keywords, each checked by the rule (a
one-line ValueError); one without a default is a second network, annotated with
its class. Bind them with functools.partial:

    rule = functools.partial(guidance.interval_guided_eps, logsnr_lo=-4.0, logsnr_hi=0.0)
    x = sample.sample(model, labels, w, guidance=rule)

`RULES` names them (sample.py --guidance NAME). Imports only torch, math,
schedule.py and model.py: it lifts out with them and sample.py.
"""
import math

import torch

from model import NoisyClassifier, UNet
from schedule import alpha_sigma, logsnr_cosine_inverse, per_example, predict_eps, predict_x

# ε_θ(z, c) and ε_θ(z, ∅) as one batch of 2B (the paper's; unlisted devices) or
# two passes of B: on a CPU the 2B batch costs more (docs/results.md, "Performance").
ONE_BATCH = {"cpu": False}


def unguided(w):
    """True where w = 0 everywhere: a rule then returns ε_θ(z, c) from its one pass."""
    return not torch.as_tensor(w).any()


def w_outside(w, inside):
    """The distinct w (number or (B,)) where inside(w) is False, NaN too, sorted."""
    w = torch.as_tensor(w)
    return sorted(set(w[~inside(w)].tolist()))


def eps_pair(model, z, logsnr, labels, logsnr_b, labels_b):
    """(ε_θ(z, λ, c), ε_θ(z, λ_b, c_b)) at one z: a batch of 2B or two passes of B (ONE_BATCH)."""
    if not ONE_BATCH.get(z.device.type, True):
        return model(z, logsnr, labels), model(z, logsnr_b, labels_b)
    logsnr = torch.as_tensor(logsnr, device=z.device).expand(len(z))
    logsnr_b = torch.as_tensor(logsnr_b, device=z.device).expand(len(z))
    return model(torch.cat([z, z]), torch.cat([logsnr, logsnr_b]),
                 torch.cat([labels, labels_b])).chunk(2)  # (2B, C, H, W) in one pass


def cond_and_uncond_eps(model, z, logsnr, labels):
    """(ε_θ(z, c), ε_θ(z, ∅)) at one z: a batch of 2B or two passes of B (ONE_BATCH)."""
    return eps_pair(model, z, logsnr, labels, logsnr, torch.full_like(labels, model.null_label))


# ---------------- the paper's rule

def guided_eps(model, z, logsnr, labels, w, state=None):
    """Classifier-free guidance (Alg. 2, line 3): ε̃ = (1 + w) ε_θ(z, c) − w ε_θ(z, ∅).

    w: a number or (B,). Only the conditional pass runs where w = 0 everywhere."""
    if unguided(w):
        return model(z, logsnr, labels)
    eps_cond, eps_uncond = cond_and_uncond_eps(model, z, logsnr, labels)
    w = per_example(w, z)  # (B,) -> (B, 1, 1, 1)
    return (1 + w) * eps_cond - w * eps_uncond


# ---------------- classifier guidance

def classifier_grad(classifier, z, logsnr, labels):
    """∇_z log p_φ(c | z_λ) by autograd; works under torch.no_grad, not inference_mode.

    The classifier must be in eval mode, so that rows do not interact (row b's gradient
    of Σ_b log p_φ(c_b | z_b) is its own)."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        log_p = torch.log_softmax(classifier(z, logsnr), dim=1)  # (B, K) log p_φ(c | z_λ)
        log_p_c = log_p.gather(1, labels[:, None]).sum()  # Σ_b log p_φ(c_b | z_b)
        return torch.autograd.grad(log_p_c, z)[0]


CLASSIFIER_BASES = ("uncond", "cond")


def classifier_guided_eps(model, z, logsnr, labels, w, state=None, *,
                          classifier: NoisyClassifier, base="uncond"):
    """Classifier guidance (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs"):

        "uncond":  ε̂ = ε_θ(z_λ) − (1 + w) σ_λ ∇_z log p_φ(c | z_λ)   (their scale s = 1 + w)
        "cond":    ε̂ = ε_θ(z_λ, c) − w σ_λ ∇_z log p_φ(c | z_λ)     (the paper's form)

    classifier: a trained p_φ(c | z_λ) (noisy_classifier.py), forward(z, logsnr) ->
    logits, in eval mode. With exact scores and classifier both are CFG's ε̃
    (Bayes: ∇ log p^i(c | z_λ) = −(ε(z_λ, c) − ε(z_λ))/σ_λ). Only ε_θ's one
    pass runs where the factor (1 + w, or w) is 0 everywhere."""
    if base not in CLASSIFIER_BASES:
        raise ValueError(f"unknown base {base!r}: use 'uncond' (ε_θ(z_λ)) or 'cond' (ε_θ(z_λ, c))")
    w = torch.as_tensor(w, dtype=z.dtype, device=z.device)
    scale = 1 + w if base == "uncond" else w  # the factor of −σ_λ ∇_z log p_φ
    null = torch.full_like(labels, model.null_label)
    eps = model(z, logsnr, null if base == "uncond" else labels)
    if unguided(scale):
        return eps
    logsnr = torch.as_tensor(logsnr, device=z.device).expand(len(z))
    sigma = per_example(alpha_sigma(logsnr)[1], z)  # σ_λ, (B, 1, 1, 1)
    grad = classifier_grad(classifier, z, logsnr, labels)
    return eps - per_example(scale, z) * sigma * grad


# ---------------- guidance interval

# Kynkäänniemi et al.'s FID-best interval for EDM2-XXL on ImageNet-512 (their code: steps
# 17-22 of 32, σ from 1.61 down to 0.28, weight 2 = 1 + w), in λ = −2 log σ. Tuned for
# SD-VAE latents, not pixels: a starting point (notebook 05 maps it on MNIST).
INTERVAL = (-2 * math.log(1.61), -2 * math.log(0.28))  # (λ_lo, λ_hi) ≈ (−0.95, 2.55)


def interval_guided_eps(model, z, logsnr, labels, w, state=None, *,
                        logsnr_lo=INTERVAL[0], logsnr_hi=INTERVAL[1]):
    """Guidance in a limited interval (Kynkäänniemi et al. 2024, "Applying Guidance
    in a Limited Interval Improves Sample and Distribution Quality in Diffusion Models"):

        ε̃ = (1 + w) ε_θ(z_λ, c) − w ε_θ(z_λ, ∅)   if λ_lo ≤ λ ≤ λ_hi
        ε̃ = ε_θ(z_λ, c)                             otherwise (∅ is not run)

    Finite logsnr_lo < logsnr_hi. They use EDM's σ = e^{−λ/2}, σ ∈ (σ_lo, σ_hi]
    (closed here), and the weight 1 + w. logsnr: a number or (B,); a batch with
    no row inside runs one pass of B."""
    if not (math.isfinite(logsnr_lo) and math.isfinite(logsnr_hi) and logsnr_lo < logsnr_hi):
        raise ValueError(f"the interval [{logsnr_lo}, {logsnr_hi}] must be two finite λ "
                         "with logsnr_lo < logsnr_hi")
    logsnr_t = torch.as_tensor(logsnr, device=z.device)
    inside = (logsnr_lo <= logsnr_t) & (logsnr_t <= logsnr_hi)  # () or (B,)
    w = torch.as_tensor(w, dtype=z.dtype, device=z.device) * inside
    return guided_eps(model, z, logsnr, labels, w)


# ---------------- autoguidance

def autoguided_eps(model, z, logsnr, labels, w, state=None, *, guide: UNet):
    """Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version
    of Itself", eq. 2), their weight w_K = 1 + w; a worse model in place of ∅:

        ε̃ = (1 + w) ε_θ(z_λ, c) − w ε_bad(z_λ, c)     (weights sum to 1: same in x̂ and ε)

    guide: ε_bad, a weaker model of the same data, image shape and classes (an
    early checkpoint, a small preset trained briefly), called with c, not ∅.
    Two passes of B; only `model` runs where w = 0 everywhere."""
    eps_good = model(z, logsnr, labels)
    if unguided(w):
        return eps_good
    w = per_example(w, z)
    return (1 + w) * eps_good - w * guide(z, logsnr, labels)


# ---------------- CFG rescale

RESCALE_PHI = 0.7  # φ, Lin et al.'s value


def rescaled_guided_eps(model, z, logsnr, labels, w, state=None, *, phi=RESCALE_PHI):
    """CFG rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample
    Steps are Flawed", sec. 3.4) on v = α_λ ε − σ_λ x̂ = (ε − σ_λ z_λ)/α_λ, φ ∈ [0, 1]:

        v_cfg = (1 + w) v_c − w v_∅                          (their scale 1 + w)
        v̂ = φ v_cfg std(v_c) / std(v_cfg) + (1 − φ) v_cfg     std over C, H, W
        ε̃ = α_λ v̂ + σ_λ z_λ

    Computed on α_λ v = ε − σ_λ z_λ, so nothing is divided by a tiny α_λ.
    diffusers' rescale_noise_cfg rescales ε itself: for an ε-network, another
    rule. Only the conditional pass runs where w = 0 everywhere."""
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
    ratio = u_cond.std(dim=dims, keepdim=True) / u_cfg.std(dim=dims, keepdim=True)
    return (phi * ratio + 1 - phi) * u_cfg + sigma_z


# ---------------- adaptive projected guidance

def apg_project(diff, x_cond):
    """(Δ∥, Δ⊥): Δ along x̂_c and across it, per sample, in float64 (as APG's code).

    Δ∥ = (⟨Δ, x̂_c⟩ / ⟨x̂_c, x̂_c⟩) x̂_c, inner products over C, H, W; Δ⊥ = Δ − Δ∥."""
    dims = tuple(range(1, diff.ndim))
    d, x = diff.double(), x_cond.double()
    norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True).clamp(min=1e-12)
    unit = x / norm  # x̂_c / ‖x̂_c‖
    parallel = (d * unit).sum(dim=dims, keepdim=True) * unit
    return parallel.to(diff.dtype), (d - parallel).to(diff.dtype)


# η = 0: Sadat et al.'s advice; β = −0.75, r = 2.5: public code's defaults.
# r bounds a norm over a whole image: it depends on the image size (notebook 05).
APG_ETA, APG_R, APG_BETA = 0.0, 2.5, -0.75


def apg_eps(model, z, logsnr, labels, w, state=None, *, eta=APG_ETA, r=APG_R, beta=APG_BETA):
    """Adaptive projected guidance (Sadat et al. 2024, "Eliminating Oversaturation
    and Artifacts of High Guidance Scales in Diffusion Models", Alg. 1), on the data
    prediction x̂ = (z_λ − σ_λ ε)/α_λ:

        Δ_t = x̂_c − x̂_∅,  D_t = Δ_t + β D_{t−1},  D_0 = 0    momentum β ∈ (−1, 1)
        D_t ← D_t min(1, r / ‖D_t‖)                          ‖·‖ over C, H, W; r > 0
        x̂ = x̂_c + w (D⊥ + η D∥),  ε̃ = (z_λ − α_λ x̂)/σ_λ     apg_project; η ∈ [0, 1]

    Their CFG is x̂_c + (s − 1)(x̂_c − x̂_∅), s = 1 + w; β < 0 is their "reverse
    momentum", r = inf no threshold, and η = 1, r = inf, β = 0 is CFG. (diffusers
    adds s Δ′ to x̂_∅ unless asked for this original form.) state: one dict for the
    whole run, holding D_{t−1} (sample.sample makes it). w = 0 everywhere: ε_θ(z, c)."""
    if not 0 <= eta <= 1:
        raise ValueError(f"apg's eta = {eta} is outside [0, 1] (Sadat et al.: 0)")
    if not r > 0:
        raise ValueError(f"apg's r = {r} must be positive (inf: no norm threshold)")
    if not -1 < beta < 1:
        raise ValueError(f"apg's beta = {beta} is outside (-1, 1)")
    if state is None:
        raise ValueError("apg_eps keeps its momentum in `state` from step to step: "
                         "pass one dict for the whole run (sample.sample does)")
    if unguided(w):
        return model(z, logsnr, labels)
    eps_cond, eps_uncond = cond_and_uncond_eps(model, z, logsnr, labels)
    x_cond, x_uncond = predict_x(z, eps_cond, logsnr), predict_x(z, eps_uncond, logsnr)
    diff = x_cond - x_uncond + beta * state.get("apg_momentum", 0.0)  # D_t = Δ_t + β D_{t−1}
    state["apg_momentum"] = diff
    norm = torch.linalg.vector_norm(diff, dim=tuple(range(1, z.ndim)), keepdim=True)
    diff = diff * torch.clamp(r / norm, max=1.0)  # min(1, r / ‖D_t‖)
    parallel, orthogonal = apg_project(diff, x_cond)
    x = x_cond + per_example(w, z) * (orthogonal + eta * parallel)
    return predict_eps(z, x, logsnr)


# ---------------- CFG++

def cfgpp_eps(model, z, logsnr, labels, w, state=None):
    """CFG++ (Chung et al. 2024, "CFG++: Manifold-constrained Classifier Free Guidance
    for Diffusion Models"), a change to DDIM; their scale γ (their λ) is 1 + w ∈ [0, 1]:

        ε̃ = (1 + w) ε_θ(z_λ, c) − w ε_θ(z_λ, ∅)     x̃ from it (line 4); w ∈ [−1, 0]
        z_λ′ = α_λ′ x̃ + σ_λ′ ε_θ(z_λ, ∅)             re-noised with ε_∅, not with ε̃

    Returns (ε̃, ε_θ(z_λ, ∅)): sample.sample takes the pair on the ddim step only.
    w = −1 is DDIM on the unconditional model; w = 0 is not the conditional one
    (ε_∅ still re-noises). Both ε are evaluated at every w.

    Its strength grows with the number of steps T. Written against DDIM on ε̃,
        z_λ′ = [α_λ′ x̃ + σ_λ′ ε̃]  +  σ_λ′ γ (ε_θ(z_λ, ∅) − ε_θ(z_λ, c)),
    every step adds a change of order one that does not shrink with λ′ − λ, where
    DDIM's own change does: T steps add T of them, so CFG++ has no limit as T grows
    (tests/test_toy.py: on exact scores it drifts from p(x | c) as T goes from 10 to
    256, where DDIM converges). γ is a strength per step, not a point on one
    trade-off curve: results hold for the T they were measured at. sample.py
    runs it at its paper's T (sample.RULE_STEPS: 50) unless --steps says."""
    outside = w_outside(w, lambda w: (w >= -1) & (w <= 0))
    if outside:
        raise ValueError(f"cfgpp takes w = γ − 1 in [-1, 0] (CFG++'s scale γ in [0, 1]), "
                         f"got w = {outside}")
    eps_cond, eps_uncond = cond_and_uncond_eps(model, z, logsnr, labels)
    w = per_example(w, z)
    return (1 + w) * eps_cond - w * eps_uncond, eps_uncond


# ---------------- guidance without the null label

def _generator(state, key, seed, device):
    """The run's generator for a rule's own draws, seeded once per run and kept in `state`."""
    if state is None:
        raise ValueError("this rule draws random numbers from step to step: pass one `state` "
                         "dict for the whole run (sample.sample does)")
    if key not in state:
        state[key] = torch.Generator(device=device).manual_seed(seed)
    return state[key]


def icg_eps(model, z, logsnr, labels, w, state=None, *, seed=0):
    """Independent condition guidance (Sadat et al. 2024, "No Training, No Problem: Rethinking
    Classifier-Free Guidance for Diffusion Models", sec. 4): CFG with ∅ replaced by a label ĉ
    drawn independently of the sample,

        ε̃ = (1 + w) ε_θ(z_λ, c) − w ε_θ(z_λ, ĉ),   ĉ ~ uniform over the classes, at every step

    If ĉ carries no information about z_λ then p(z_λ | ĉ) = p(z_λ), so ε_θ(z_λ, ĉ) stands in
    for ε_θ(z_λ): a network trained without label dropout (p_uncond = 0) can be guided. On a
    network whose ε does not depend on the label it is exactly CFG. ĉ is drawn afresh per
    sample and per step from the run's generator (seeded by `seed`, kept in `state`), so a run
    is reproducible. Two passes of B; only ε_θ(z, c) runs where w = 0 everywhere."""
    if unguided(w):
        return model(z, logsnr, labels)
    generator = _generator(state, "icg_generator", seed, z.device)
    other = torch.randint(model.null_label, labels.shape, generator=generator,
                          device=z.device)  # ĉ ∈ {0, …, K − 1}: ∅ = K is never drawn
    eps_cond, eps_other = eps_pair(model, z, logsnr, labels, logsnr, other)
    w = per_example(w, z)
    return (1 + w) * eps_cond - w * eps_other


TSG_SCALE = 1.0  # the spread of the perturbed λ, in λ units: free (notebook 07 tries 1 and 4)


def tsg_eps(model, z, logsnr, labels, w, state=None, *, scale=TSG_SCALE, seed=0):
    """Time-step guidance (Sadat et al. 2024, same paper, sec. 5): guidance away from the network
    at a perturbed noise level, which needs neither ∅ nor a label,

        ε̃ = (1 + w) ε_θ(z_λ, λ, c) − w ε_θ(z_λ, λ + s ξ, c),   ξ ~ N(0, 1) per sample and step

    They perturb the network's time embedding; here the perturbation is on its noise-level input
    λ (the same for any network, no hook into its embedding), with s = `scale` > 0 in λ units.
    ξ comes from the run's generator (seeded by `seed`, kept in `state`). Two passes of B; only
    the first runs where w = 0 everywhere."""
    if not scale > 0:
        raise ValueError(f"tsg's scale = {scale} must be positive (the spread of λ's perturbation)")
    if unguided(w):
        return model(z, logsnr, labels)
    generator = _generator(state, "tsg_generator", seed, z.device)
    logsnr = torch.as_tensor(logsnr, dtype=z.dtype, device=z.device).expand(len(z))
    xi = torch.randn(len(z), generator=generator, device=z.device, dtype=z.dtype)
    eps, eps_perturbed = eps_pair(model, z, logsnr, labels, logsnr + scale * xi, labels)
    w = per_example(w, z)
    return (1 + w) * eps - w * eps_perturbed


# ---------------- CFG-Zero*

CFG_ZERO_STEPS = 1  # steps zeroed at the start (their code's default: the first step alone)


def flow_velocity(z, eps, logsnr):
    """α_λ v, the rectified-flow velocity v = ε − x̂ of ε at z_λ, times α_λ: (α_λ + σ_λ) ε − z_λ.

    z_λ = α_λ x + σ_λ ε is, divided by α_λ + σ_λ, the straight path x_t = (1 − t) x + t ε at
    t = σ_λ/(α_λ + σ_λ), whose velocity is ε − x; times α_λ (so nothing divides by a small α_λ)
    it is (α_λ + σ_λ) ε − z_λ."""
    alpha, sigma = alpha_sigma(per_example(logsnr, z))
    return (alpha + sigma) * eps - z


def cfg_zero_eps(model, z, logsnr, labels, w, state=None, *, zero_steps=CFG_ZERO_STEPS):
    """CFG-Zero* (Fan et al. 2025, "CFG-Zero*: Improved Classifier-Free Guidance for Flow
    Matching Models"), on the velocity of the flow that this ε-network's z_λ traces
    (`flow_velocity`, u = α_λ v), their scale 1 + w:

        s* = ⟨u_c, u_∅⟩ / ‖u_∅‖²                 per sample, over C, H, W: the least-squares
                                                   scale of u_∅ onto u_c (their optimised scale)
        û = (1 + w) u_c − w s* u_∅               their s* v_∅ + (1 + w)(v_c − s* v_∅), times α_λ
        ε̃ = (û + z_λ) / (α_λ + σ_λ)              back from u = (α_λ + σ_λ) ε − z_λ

    and zero-init: the first `zero_steps` steps give û = 0 (their zeroed velocity), ε̃ = z_λ /
    (α_λ + σ_λ), so z_λ / (α_λ + σ_λ) does not move. Written in ε, ε̃ = (1 + w) ε_c − w s* ε_∅
    + w (s* − 1) z_λ / (α_λ + σ_λ): s* = 1 is CFG. The projection is on v, not on ε: v is affine
    in ε, so the two give different s*. state: one dict for the whole run (it counts the
    steps). w = 0 everywhere: ε_θ(z, c) after the zeroed steps."""
    if zero_steps < 0:
        raise ValueError(f"cfg-zero's zero_steps = {zero_steps} must be 0 or more")
    if state is None:
        raise ValueError("cfg_zero_eps counts the steps in `state`: pass one dict for the whole "
                         "run (sample.sample does)")
    step = state["cfg_zero_step"] = state.get("cfg_zero_step", -1) + 1
    alpha, sigma = alpha_sigma(per_example(logsnr, z))
    if step < zero_steps:
        return z / (alpha + sigma)  # û = 0
    if unguided(w):
        return model(z, logsnr, labels)
    eps_cond, eps_uncond = cond_and_uncond_eps(model, z, logsnr, labels)
    u_cond, u_uncond = flow_velocity(z, eps_cond, logsnr), flow_velocity(z, eps_uncond, logsnr)
    dims = tuple(range(1, z.ndim))
    s_star = ((u_cond * u_uncond).sum(dims, keepdim=True)
              / (u_uncond * u_uncond).sum(dims, keepdim=True).clamp(min=1e-12))
    w = per_example(w, z)
    return ((1 + w) * u_cond - w * s_star * u_uncond + z) / (alpha + sigma)


# ---------------- guidance-strength schedules

def schedule_time(logsnr):
    """t ∈ [0, 1] of λ under the paper's cosine schedule (schedule.logsnr_cosine_inverse): 0 at
    λ_max (data), 1 at λ_min (noise); a time that does not depend on the sampler's steps."""
    return logsnr_cosine_inverse(torch.as_tensor(logsnr)).clamp(0, 1)


SCHEDULES = {  # w(t) / w: each averages 1 over t ∈ [0, 1], so w is still the mean strength
    "constant": lambda t: torch.ones_like(t),
    "linear": lambda t: 2 * (1 - t),  # 0 at the noise end, 2 at the data end
    "cosine": lambda t: 1 + torch.cos(math.pi * t),
}


def scheduled_eps(model, z, logsnr, labels, w, state=None, *, shape="linear"):
    """CFG with a strength that moves with the noise level (Wang et al. 2024, "Analysis of
    Classifier-Free Guidance Weight Schedulers"): ε̃ = (1 + w(λ)) ε_θ(z, c) − w(λ) ε_θ(z, ∅),
    w(λ) = w · f(t(λ)), t = `schedule_time`. f: "constant" (CFG), "linear" 2(1 − t) or "cosine"
    1 + cos(π t), their increasing schedulers, each with mean 1 over t ∈ [0, 1]. Only ε_θ(z, c)
    runs where w(λ) = 0 everywhere (the first step of "linear" and "cosine")."""
    if shape not in SCHEDULES:
        raise ValueError(f"unknown schedule shape {shape!r}: use one of {', '.join(SCHEDULES)}")
    t = schedule_time(torch.as_tensor(logsnr, device=z.device)).to(z.dtype)
    return guided_eps(model, z, logsnr, labels,
                      torch.as_tensor(w, dtype=z.dtype, device=z.device) * SCHEDULES[shape](t))


# ---------------- guidance-free training

def guidance_free_eps(model, z, logsnr, labels, w, state=None):
    """Guidance-free training (Chen et al. 2025, "Visual Generation Without Guidance"),
    sampled: CFG's ε̃ in one pass of B, no ε_θ(z, ∅). Trained by train.gft_loss:

        ε̃ = ε_s(z_λ, c, β),  β = 1/(1 + w)     (their temperature β = 1/s, s = 1 + w)

    GFT's minimiser is ε_s = (1 + w) ε(z, c) − w ε(z, ∅). w ≥ 0: training draws
    β in (0, 1]. model: a UNet with UNetConfig(strength_input=True)."""
    if not getattr(model, "strength_input", False):
        raise ValueError("guidance-free needs a network trained by guidance-free training "
                         "(train.gft_loss, UNetConfig(strength_input=True)); this one has no "
                         "strength input: use --guidance cfg")
    outside = w_outside(w, lambda w: w >= 0)
    if outside:
        raise ValueError("guidance-free takes w >= 0 (β = 1/(1 + w) in (0, 1], the range it "
                         f"was trained on), got w = {outside}")
    beta = 1 / (1 + torch.as_tensor(w, dtype=torch.float64, device=z.device))  # () or (B,)
    return model(z, logsnr, labels, strength=beta)


RULES = {
    "cfg": guided_eps,  # the paper's
    "classifier": classifier_guided_eps,  # Dhariwal & Nichol 2021, a noisy classifier
    "interval": interval_guided_eps,  # Kynkäänniemi et al. 2024
    "autoguidance": autoguided_eps,  # Karras et al. 2024, a worse model
    "rescale": rescaled_guided_eps,  # Lin et al. 2023
    "apg": apg_eps,  # Sadat et al. 2024
    "cfgpp": cfgpp_eps,  # Chung et al. 2024, on the ddim step only
    "icg": icg_eps,  # Sadat et al. 2024: no ∅, a random label
    "tsg": tsg_eps,  # Sadat et al. 2024: no ∅, a perturbed λ
    "cfg-zero": cfg_zero_eps,  # Fan et al. 2025
    "schedule": scheduled_eps,  # Wang et al. 2024
    "guidance-free": guidance_free_eps,  # Chen et al. 2025, a GFT network
}
