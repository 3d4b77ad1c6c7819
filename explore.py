"""The functions behind the notebooks' sliders, and the guided path seen step by step.

Each `*_panel` is a plain function: it computes, draws one figure and returns what it computed,
so the notebooks call it once for a static figure (what a viewer without widgets sees) and hand
it to `slider` for a live one; the tests call it too.

    explore.toy_panel(w=2, logsnr=0)          # notebook 01: the exact toy at one λ
    explore.digits_panel(w=1, c=3)            # notebook 00: the shipped digits model, live
    explore.cifar_panel(w=2)                  # notebook 03: the shipped CIFAR-10 model, live
    explore.live_study("mnist-4k", data_dir=DIR)   # notebooks 02-06: 100 samples per w, scored
    explore.slider(explore.cifar_panel, w=(-1, 6, 0.5))
    explore.path_panel("digits", w=3)         # x̂ of ε(z, c), ε(z, ∅) and ε̃ along one path

Sampling uses the fast sampler and sample.py's noise (image (c, j) from seed noise_seed(0, c, j)),
so moving w changes the guidance and nothing else.
"""
import functools
import inspect
import json
import os
import time

import matplotlib.pyplot as plt
import torch

import guidance as guidance_lib
import metrics
import model as model_lib
import sample as sample_lib
import schedule
import toy


def slider(panel, **ranges):
    """An ipywidgets slider per (low, high, step) range, starting at the panel's default, redrawing
    `panel` on every move."""
    import ipywidgets
    defaults = inspect.signature(panel).parameters
    controls = {name: (ipywidgets.FloatSlider if isinstance(step, float) else
                       ipywidgets.IntSlider)(min=lo, max=hi, step=step, continuous_update=False,
                                             value=max(lo, min(hi, defaults[name].default)))
                for name, (lo, hi, step) in ranges.items()}
    return ipywidgets.interactive(lambda **kw: panel(**kw) and None, **controls)


# ---------------- the exact toy (notebook 01)

def toy_fields(w, logsnr, c=0, n=101, arrows=15):
    """The toy at one noise level: dict(density=(3, n, n), classifier=(n, n), field=(arrows², 2),
    grid=(gx, gy), coarse=(cx, cy)).

    density[k]: the guided density p(z_λ | k) p^i(k | z_λ)^w, normalised on the grid (cell
    masses summing to 1): the density whose scaled score is CFG's ε̃ = (1 + w) ε* (z, k) − w ε*(z).
    classifier: p^i(c | z_λ). field: its gradient −(1/σ_λ)(ε*(z, c) − ε*(z)) on a coarse grid."""
    gx, gy, points = toy.grid(n)
    lam = torch.full((len(points),), float(logsnr), dtype=toy.F64)
    density = []
    for k in range(toy.NUM_CLASSES):
        labels = torch.full((len(points),), k)
        log_dens = toy.log_p(points, lam, labels) + w * toy.log_classifier(points, lam, labels)
        density.append(torch.softmax(log_dens, dim=0).reshape(gx.shape))
    labels = torch.full((len(points),), c)
    classifier = toy.log_classifier(points, lam, labels).exp().reshape(gx.shape)
    cx, cy, coarse = toy.grid(arrows)
    lam_c, c_c = torch.full((len(coarse),), float(logsnr), dtype=toy.F64), torch.full(
        (len(coarse),), c)
    _, sigma = schedule.alpha_sigma(lam_c)
    field = -(toy.eps_exact(coarse, lam_c, c_c)
              - toy.eps_exact(coarse, lam_c, torch.full_like(c_c, toy.NULL))) / sigma[:, None]
    return dict(density=torch.stack(density), classifier=classifier, field=field,
                grid=(gx, gy), coarse=(cx, cy))


def toy_panel(w=1.0, logsnr=0.0, c=0):
    """Left: the guided densities of the three classes at λ (contours of 50% and 90% mass).
    Right: the implicit classifier p^i(c | z_λ) and its gradient, arrows on one fixed scale."""
    f = toy_fields(w, logsnr, c)
    gx, gy = (g.numpy() for g in f["grid"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for k, dens in enumerate(f["density"]):
        axes[0].contourf(gx, gy, dens.numpy(), levels=_mass_levels(dens, (0.9, 0.5)) + [1.0],
                         colors=toy.COLORS[k], alpha=0.35)
    axes[0].set_title(f"guided density p(z_λ | c) p(c | z_λ)^w, w = {w:g}, λ = {logsnr:g}")
    im = axes[1].pcolormesh(gx, gy, f["classifier"].numpy(), cmap="Blues", vmin=0, vmax=1,
                            shading="auto")
    cx, cy = (g.numpy() for g in f["coarse"])
    field = f["field"].numpy()
    q = axes[1].quiver(cx, cy, field[:, 0].reshape(cx.shape), field[:, 1].reshape(cx.shape),
                       angles="xy", scale_units="xy",
                       scale=4, width=0.004)  # 1 unit of gradient = 1/4 unit of z, at every λ
    axes[1].quiverkey(q, 0.55, -0.14, 2, "arrow: |∇ log p| = 2 (one scale at every λ)",
                      labelpos="E")
    axes[1].set_title(f"p(c = {c} | z_λ) and ∇_z log p(c | z_λ)")
    fig.colorbar(im, ax=axes[1], shrink=0.8)
    for ax in axes:
        ax.set_aspect("equal")
        ax.set(xlim=(-toy.LIM, toy.LIM), ylim=(-toy.LIM, toy.LIM))
    plt.show()
    return f


def _mass_levels(dens, masses):
    """Density thresholds whose upper sets hold the given masses, ascending."""
    ordered, _ = dens.flatten().sort(descending=True)
    at = torch.searchsorted(ordered.cumsum(0), torch.tensor(masses, dtype=ordered.dtype))
    return sorted(ordered[at.clamp(max=len(ordered) - 1)].tolist())


# ---------------- the shipped models, sampled live (notebooks 00 and 03)

@functools.lru_cache(maxsize=None)
def shipped(name):
    """A shipped model (checkpoints/NAME.pt), loaded once, and its checkpoint dict."""
    return model_lib.load_model(name)


def samples(model, classes, w, per_class, steps=None, seed=0, guidance=guidance_lib.guided_eps):
    """uint8 images (len(classes) · per_class, C, H, W): image (c, j) from sample.py's noise."""
    labels = torch.tensor([c for c in classes for _ in range(per_class)])
    generators = [torch.Generator().manual_seed(sample_lib.noise_seed(seed, c, j))
                  for c in classes for j in range(per_class)]
    with torch.no_grad():
        x = sample_lib.sample(model, labels, float(w), steps, sample_lib.FAST_SAMPLER,
                              guidance=guidance, generator=generators)
    return sample_lib.to_uint8(x)


def show_images(ax, images, ncol, title=None):
    """uint8 (N, C, H, W) as one picture of ncol columns on `ax`."""
    N, C, H, W = images.shape
    rows = -(-N // ncol)
    canvas = torch.full((C, rows * (H + 1) + 1, ncol * (W + 1) + 1), 255, dtype=torch.uint8)
    for i, image in enumerate(images):
        r, k = divmod(i, ncol)
        canvas[:, 1 + r * (H + 1):1 + r * (H + 1) + H, 1 + k * (W + 1):1 + k * (W + 1) + W] = image
    picture = (canvas[0] if C == 1 else canvas.permute(1, 2, 0)).numpy()
    ax.imshow(picture, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)


def digits_panel(w=0.0, c=3, n=12, name="digits"):
    """n samples of class c at w from the shipped digits model (24 steps): returns the images."""
    model, ckpt = shipped(name)
    images = samples(model, [c], w, n)
    fig, ax = plt.subplots(figsize=(0.75 * n, 1.1))
    show_images(ax, images, n, f"{ckpt['class_names'][c]}, w = {w:g}")
    plt.show()
    return images


def cifar_panel(w=0.0, per_class=2, name="cifar10-cpu"):
    """per_class samples of each CIFAR-10 class at w from the shipped model: returns the images."""
    model, ckpt = shipped(name)
    images = samples(model, range(10), w, per_class)
    fig, ax = plt.subplots(figsize=(9, 2.2))
    show_images(ax, images, 10 * per_class, f"w = {w:g}: " + ", ".join(ckpt["class_names"]))
    plt.show()
    return images


def full_scores(name):
    """The 1,000-per-w scores of a shipped model (checkpoints/scores/NAME.json: its command, the
    SHA-256 of the file it scored, {w: row} and the floor), or None where none were measured."""
    path = os.path.join(model_lib.SHIPPED_DIR, "scores", f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        scores = json.load(f)
    scores["by_w"] = {row["w"]: row for row in scores["rows"]}
    return scores


FLOOR_SETS = 10  # real sets drawn for live_study's floor: its KID's mean and spread


def live_study(name, ws=(0.0, 0.5, 1.0, 2.0, 4.0), per_class=10, data_dir=None,
               guidance=guidance_lib.guided_eps, compare=True):
    """A small study on a shipped model: per_class images of each class at each w (the same noise
    at every w), sampled with `guidance` (a rule of guidance.py, its networks bound) and scored by
    the shipped metrics classifier of its dataset. Accuracy and IS need nothing else; with the
    dataset at `data_dir`, KID (metrics.kernel_distance, unbiased at a few hundred samples, where
    FID's bias swamps it) against its held-out images, and the real-data floor at the same count
    (KID about 0). With `compare`, the model's 1,000-per-w CFG scores (`full_scores`) stand beside,
    where that w was measured. Prints a table with the seconds each w took; returns {w: metrics,
    "floor": ...}."""
    model, ckpt = shipped(name)
    dataset = ckpt["args"]["dataset"]
    clf = metrics.load_classifier(f"metrics-{dataset}", dataset=dataset)  # the shipped one
    full = full_scores(name) if compare else None
    ref_feats, floor_pool = None, None
    if data_dir is not None:
        (ref_x, _), floor_pool = metrics.reference_and_floor(*metrics.load_held(dataset, data_dir))
        ref_feats = metrics.classifier_features(clf, ref_x).double()
        rms = ref_feats.pow(2).mean().sqrt()  # KID's (xᵀy / D + 1)³ wants features of order 1
        ref_feats = ref_feats / rms
    classes = range(model.config.num_classes)
    labels, results = torch.arange(len(classes)).repeat_interleave(per_class), {}
    print(f"{name}: {len(labels)} samples per w, {sample_lib.FAST_SAMPLER}, scored by "
          f"metrics-{dataset}" + ("" if data_dir else " (no data: KID left out)"))
    beside = f"   | CFG, {full['rows'][0]['n']:,} per w: FID  accuracy" if full else ""
    print(f"{'w':>6} {'accuracy':>9} {'IS':>6} {'KID×1000':>14} {'seconds':>8}{beside}")

    def score(images, asked):
        feats, probs = metrics.classifier_outputs(clf, images)
        return dict(accuracy=(probs.argmax(1) == asked).double().mean().item(),
                    **{"is": metrics.inception_score(probs)[0]},
                    **({} if ref_feats is None else
                       {"kid": metrics.kernel_distance(feats.double() / rms, ref_feats)}))

    def show(label, scores, row, kid):
        far = f"   | {row['fid']:20.2f} {row['accuracy']:9.3f}" if row else ""
        print(f"{label:>6} {scores['accuracy']:9.3f} {scores['is']:6.2f} {kid:>14} "
              f"{scores['seconds']:8.1f}{far}")

    for w in ws:
        start = time.perf_counter()
        scores = score(samples(model, classes, w, per_class, guidance=guidance), labels)
        results[w] = dict(scores, seconds=time.perf_counter() - start)
        show(f"{w:g}", results[w], full and full["by_w"].get(float(w)),
             f"{1000 * scores['kid']:.1f}" if "kid" in scores else "—")
    if data_dir is not None:  # real held-out images outside the reference, as many as per w
        start, generator, sets = time.perf_counter(), torch.Generator().manual_seed(0), []
        for _ in range(FLOOR_SETS):
            pick = torch.randperm(len(floor_pool[1]), generator=generator)[:len(labels)]
            sets.append(score(floor_pool[0][pick], floor_pool[1][pick]))
        kids = torch.tensor([s["kid"] for s in sets])
        results["floor"] = dict(sets[0], kid=kids.mean().item(), kid_std=kids.std().item(),
                                seconds=time.perf_counter() - start)
        show("real", results["floor"], full and full["real"],
             f"{1000 * kids.mean():.1f} ± {1000 * kids.std():.1f}")
        print(f"(real: {FLOOR_SETS} sets of {len(labels)} held-out images; KID's ± is their "
              f"spread: a KID inside it is as close to the data as real images at this count)")
    if full:
        print(f"(right: checkpoints/scores/{name}.json, {full['machine']}; FID is biased at few "
              f"samples, so it is read at 1,000; KID is unbiased at {len(labels)})")
    return results


# ---------------- one guided path, step by step (notebook 00)

def path_predictions(model, labels, w, steps=32, every=4, seed=0, from_logsnr=-10.0):
    """Along one CFG sampling path (fast sampler, `steps` steps), every `every`-th step from
    λ = from_logsnr on (below it x̂ = (z_λ − σ_λ ε)/α_λ multiplies ε's error by σ/α > e^5), and
    at the last: λ and the x̂ of ε_θ(z, c), of ε_θ(z, ∅) and of ε̃, each (B, C, H, W) in [−1, 1].

    Returns (final images, [(λ, x̂_cond, x̂_uncond, x̂_guided), ...])."""
    record, steps = [], steps or sample_lib.SAMPLERS[sample_lib.FAST_SAMPLER]["steps"]

    def rule(model, z, logsnr, labels, w, state=None):  # CFG, keeping both of its predictions
        eps_c, eps_u = guidance_lib.cond_and_uncond_eps(model, z, logsnr, labels)
        w = schedule.per_example(w, z)
        eps = (1 + w) * eps_c - w * eps_u  # Alg. 2, line 3
        lam = float(torch.as_tensor(logsnr).flatten()[0])
        state["n"] = state.get("n", -1) + 1
        last = state["n"] == steps - 1
        kept = state["kept"] = state.get("kept", 0) + (lam >= from_logsnr)
        if lam >= from_logsnr and (kept - 1) % every == 0 or last:
            record.append((lam, *(schedule.predict_x(z, e, lam).clamp(-1, 1)
                                  for e in (eps_c, eps_u, eps))))
        return eps

    index = [int((labels[:i] == c).sum()) for i, c in enumerate(labels)]  # j within its class
    generators = [torch.Generator().manual_seed(sample_lib.noise_seed(seed, int(c), j))
                  for c, j in zip(labels, index)]
    with torch.no_grad():
        x = sample_lib.sample(model, labels, w, steps, sample_lib.FAST_SAMPLER, guidance=rule,
                              generator=generators)
    return x, record


def path_panel(name="mnist-4k", classes=(0, 3, 7), w=3.0, steps=32, every=3):
    """The figure of `path_predictions` on a shipped model: a column per recorded λ, three rows
    per class (x̂ of ε_θ(z, c), of ε_θ(z, ∅), of ε̃), the final sample at the right."""
    model, _ = shipped(name)
    x, record = path_predictions(model, torch.tensor(classes), w, steps, every)
    kinds = ("x̂ of ε(z, c)", "x̂ of ε(z, ∅)", "x̂ of ε̃")
    fig, axes = plt.subplots(3 * len(classes), len(record) + 1,
                             figsize=(1.1 * (len(record) + 1), 1.1 * 3 * len(classes)))
    for i, c in enumerate(classes):
        for k in range(3):
            row = axes[3 * i + k]
            for col, (lam, *preds) in enumerate(record):
                show_images(row[col], sample_lib.to_uint8(preds[k][i:i + 1]), 1,
                            f"λ = {lam:.1f}" if 3 * i + k == 0 else None)
            show_images(row[-1], sample_lib.to_uint8(x[i:i + 1]) if k == 2 else
                        torch.full((1, *x.shape[1:]), 255, dtype=torch.uint8), 1,
                        "sample" if 3 * i + k == 0 else None)
            row[0].text(-0.1, 0.5, f"c = {c}\n{kinds[k]}", transform=row[0].transAxes,
                        ha="right", va="center", fontsize=8)
    fig.subplots_adjust(left=0.16)
    fig.suptitle(f"one guided path, w = {w:g}: the clean image that ε_θ(z, c), ε_θ(z, ∅) and ε̃ "
                 "each imply, step by step")
    plt.show()
    return x, record
