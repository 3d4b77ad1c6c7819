"""Execute every notebook in quick mode (CFG_QUICK=1: small settings) and check what it computed,
so a change to a .py file that breaks a notebook fails the suite. The committed notebooks keep
the outputs of their real runs; this executes copies in memory and writes nothing.

Each executed notebook must show no error, an image for every cell that draws at top level,
and sane values: after its last cell a probe cell prints, as JSON, the numbers the notebook
computed (closed-form identities, metrics, grids), which the checks below read.

Notebooks 02, 04, 05 and 06 train on mnist-4k (4,000 real MNIST digits), read from
CFG_DATA_DIR, else from ../shared/data/mnist-4k beside the checkout (CI keeps it there); with
neither, their tests are skipped and say so. `python scripts/make_mnist_subset.py --out DIR`
makes a comparable folder; `CFG_DATA_DIR=DIR python -m pytest ...` then runs them.

The committed notebooks must show what they draw: a code cell that makes a figure has an image
among its saved outputs. Execute a notebook for commit with the inline backend (`jupyter
nbconvert --to notebook --execute --inplace`, MPLBACKEND unset): Agg keeps no figures."""
import glob
import json
import math
import os
import re

import pytest
from conftest import shared_data

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
# Notebooks that cannot run without mnist-4k. Notebook 02 also uses Fashion-MNIST where it
# finds it (CFG_FASHION_DIR or ../shared/data/fashion-mnist) and leaves it out in quick mode
# where it does not; notebook 06 uses it outside quick mode only.
NEEDS_MNIST_4K = {"02_mnist_tradeoff.ipynb", "04_classifier_guidance.ipynb",
                  "05_guidance_family.ipynb", "06_guidance_free.ipynb",
                  "07_guidance_without_null.ipynb"}
# Notebooks that read ../shared/data outside quick mode only: in quick mode they write small
# image files of their own (03: a synthetic CIFAR-10 folder), so they run in a fresh clone.
OWN_QUICK_DATA = {"03_cifar10_tradeoff.ipynb"}

DRAWS = re.compile(r"plt\.subplots\(|plt\.figure\(|plt\.show\(|display\(Image\(")
# A drawing call on an unindented line: it runs whenever the cell does (an indented one may
# sit under a condition, as notebook 04's figure of the samples that fool p_φ).
DRAWS_ALWAYS = re.compile(r"^(?:\S.*)?(?:" + DRAWS.pattern + ")", re.M)

# The probe: the notebook's own values, as JSON, from its kernel after its last cell.
PROBE = '''import json
def _metrics(obj):  # every metrics dict (FID, IS, accuracy) inside obj
    if isinstance(obj, dict) and {"fid", "is", "accuracy"} <= set(obj):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    return [m for v in obj for m in _metrics(v)] if isinstance(obj, (list, tuple)) else []
print(json.dumps(%s, default=float))'''

PROBES = {
    "00_walkthrough.ipynb": """dict(
        unit=(alpha**2 + sigma**2 - 1).abs().max().item(),
        density=(density_sech - density_autograd).abs().max().item(),
        ks=[scipy.stats.kstest(d.double().numpy(), cdfs[k]).pvalue for k, d in draws.items()],
        drop_rate=drop_rate.item(), losses=losses, real_accuracy=real_accuracy,
        samples=[x_samples.min().item(), x_samples.max().item()],
        measured=[row for rows in measured.values() for row in rows])""",
    "01_implicit_classifier.ipynb": """dict(
        identity=relative.max(), losses=losses,
        curl=max(e.abs().max().item() for e, _ in curl_maps.values()),
        mean_error=[(samples[0.0][labels == c].mean(0) - (toy.LOG_PI.exp()[toy.COMP_CLASS == c,
                     None] * toy.COMP_MEAN[toy.COMP_CLASS == c]).sum(0)).abs().max().item()
                    for c in range(NUM_CLASSES)],
        finite=[x.isfinite().all().item() for x in samples.values()])""",
    "02_mnist_tradeoff.ipynb": """dict(
        metrics=_metrics(res), datasets=list(DATA), n=10 * N_PER_CLASS,
        grids={f"{d} {c} {s}": sorted(cv) for d in DATA for (c, s), cv in res[d]["curves"].items()},
        cfg={"mnist": sorted(study.W_04 + study.W_04_MID + study.W_REVERSE),
             "fashion-mnist": sorted(study.W_FASHION + study.W_HIGH_02 + study.W_REVERSE)},
        ablation=list(study.W_ABLATION), seeds=SEEDS,
        counts=[len(y) for d in DATA for _, y in res[d]["images"].values()],
        diffs=[x for ds in ablation_diffs.values() for x in ds])""",
    "03_cifar10_tradeoff.ipynb": """dict(
        metrics=_metrics([curves, floor]), n=10 * N_PER_CLASS, seeds=SEEDS,
        grids={f"{m} {s}": sorted(c) for (m, s), c in curves.items()},
        fast=sorted(study.W_03 + study.W_CHECK_03), reverse=list(study.W_REVERSE_03),
        alg2=[0, *study.W_CHECK_03], counts=[len(y) for _, y in images.values()],
        gpu_check=report["stages"]["cifar10"]["status"])""",
    "04_classifier_guidance.ipynb": """dict(
        metrics=_metrics([curves, floor]), w=list(study.W_04), mid=list(study.W_04_MID),
        grids={f"{r} {s}": sorted(c) for (r, s), c in curves.items()},
        matched=[d for ds in matched.values() for d in ds], seconds=[unguided, *cost.values()])""",
    "05_guidance_family.ipynb": """dict(
        metrics=_metrics([results, interval_map, floor, steps_res, step_floor]),
        points=[len(pts) for sets in results.values() for pts in sets.values()],
        sets=[sorted(sets) for sets in results.values()], seeds=SEEDS,
        nfe=[r["nfe"] for sets in results.values() for pts in sets.values() for r in pts.values()],
        intervals=len(interval_map), chosen=CHOSEN in interval_map,
        map=len([1 for lo in study.MAP_LO for hi in study.MAP_HI if lo < hi]),
        headline=[h for hs in headline.values() for h in hs if h],
        toy={n: [toy_res[n, T][:, 0].mean() for T in TOY_TS] for n in TOY_RULES},
        steps={f"{r} {T} {s}": sorted(c) for (r, T, s), c in steps_res.items()},
        step_diffs=[d for ds, _ in step_diffs.values() for d in ds])""",
    "06_guidance_free.ipynb": """dict(
        metrics=_metrics(res),
        grids={f"{m} {s}": sorted(c) for (m, s), c in res["mnist"]["curves"].items()},
        size=[(d.norm(dim=1) / at_one.norm(dim=1)).mean().item() for d in diffs.values()],
        expected=sorted(study.W_04 + study.W_04_MID), cos=list(cos.values()),
        gft_vs_cfg=[d for ds in gft_vs_cfg.values() for d in ds])""",
    "07_guidance_without_null.ipynb": """dict(
        metrics=_metrics([curves, floor]), w=study.W_07,
        grids={f"{r} {s}": sorted(c) for (r, s), c in curves.items()},
        toy={n: dict(mmd=float(np.mean([x["data"] for x in r["rows"]])), evals=r["evals"])
             for n, r in toy_rows.items()},
        floor=[float(np.mean(toy_floor["data"])), float(np.std(toy_floor["data"], ddof=1))])""",
}


def assert_metrics(found):
    """Metrics dicts a notebook computed: some, each FID >= 0, IS in [1, 10], accuracy in [0, 1]."""
    assert found, "the notebook computed no metrics: the checks would pass on anything"
    for m in found:  # NaN fails every comparison
        assert m["fid"] >= 0 and 1 - 1e-6 <= m["is"] <= 10 + 1e-6, m
        assert 0 <= m["accuracy"] <= 1, m


def assert_finite(values):
    assert all(math.isfinite(v) for v in values), values


def check_00(v):
    assert v["unit"] < 1e-12  # α_λ² + σ_λ² = 1 in float64
    assert v["density"] < 1e-12  # the closed-form p(λ) against autograd's |du/dλ|
    assert min(v["ks"]) > 1e-3  # train.sample_logsnr's λ follow the closed-form CDFs
    assert abs(v["drop_rate"] - 0.1) < 0.005  # p_uncond = 0.1; 5 standard deviations
    assert_finite(v["losses"])
    assert -1 <= v["samples"][0] and v["samples"][1] <= 1  # samples in the data range
    assert v["real_accuracy"] > 0.85  # logistic regression on real 8×8 digits
    for w, accuracy, spread in v["measured"]:
        assert 0 <= accuracy <= 1 and 0 <= spread < math.inf


def check_01(v):
    assert v["identity"] < 1e-10  # ∇ log p(c|z) = −(ε*(z, c) − ε*(z)) / σ
    assert v["curl"] < 1e-10  # exact ε̃ is a gradient field: its curl is round-off
    # w = 0 with the exact ε*: each class mean within about 3 standard errors of p(x|c)'s
    assert max(v["mean_error"]) < 0.15, v["mean_error"]
    assert all(v["finite"])
    losses = v["losses"]
    assert_finite(losses)
    assert sum(losses[-20:]) < 0.75 * sum(losses[:20])  # Algorithm 1 fits the toy network


def check_02(v):
    """CFG on each noise set over notebook 04's (mnist) or 06's and the higher (Fashion) w with
    reverse guidance, the ablation's two models on each set, Algorithm 2 at w = 0 on the first."""
    assert_metrics(v["metrics"])
    expected = {f"{d} CFG {s}": v["cfg"][d] for d in v["datasets"] for s in v["seeds"]}
    expected.update({f"mnist p = {p} {s}": v["ablation"] for p in (0.2, 0.5) for s in v["seeds"]})
    expected[f"mnist Algorithm 2 {v['seeds'][0]}"] = [0]
    assert v["grids"] == expected, v["grids"]
    assert v["counts"] and set(v["counts"]) == {v["n"]}, v["counts"]
    assert_finite(v["diffs"])


def check_03(v):
    """The fast sampler from w = -2 to 6 on the first noise set and from 0 to 6 on the others,
    Algorithm 2 at w = 0 and around the minimum on the first; the GPU stage's dry run."""
    assert_metrics(v["metrics"])
    first, *others = v["seeds"]
    expected = {f"fast {first}": sorted(v["reverse"] + v["fast"]),
                f"Algorithm 2 {first}": v["alg2"], **{f"fast {s}": v["fast"] for s in others}}
    assert v["grids"] == expected, v["grids"]
    assert v["counts"] and set(v["counts"]) == {v["n"]}, v["counts"]
    assert v["gpu_check"] == "ok"  # the GPU stage's dry run on this CPU


def check_04(v):
    assert_metrics(v["metrics"])
    w, cfg = v["w"], sorted(v["w"] + v["mid"])  # every rule over W_04 on each of 3 noise sets
    assert v["grids"] == {f"{r} {s}": cfg if r == "cfg" else w for r in
                          ("cfg", "classifier-uncond", "classifier-cond") for s in (0, 1, 2)}
    assert len(v["matched"]) == 3 * (2 * len(w) - 1)  # both bases but the cond base's w = 0
    assert_finite(v["matched"])
    assert all(0 < s < math.inf for s in v["seconds"])


def check_05(v):
    assert_metrics(v["metrics"])
    assert min(v["points"]) >= 3  # every rule over several strengths
    assert all(sets == v["seeds"] for sets in v["sets"])  # on every noise set
    assert all(1 <= nfe <= 2 for nfe in v["nfe"]), v["nfe"]
    assert v["intervals"] == v["map"] and v["chosen"]  # the whole interval map, and its pick
    for fid, nfe in v["headline"]:
        assert 0 <= fid < math.inf and 1 <= nfe <= 2
    for rule, dist in v["toy"].items():  # distance to p(x | c) at T = 10, 24, 50, 256
        if rule.startswith("CFG++"):  # no limit as T grows
            assert dist == sorted(dist) and dist[-1] > 10 * dist[0], (rule, dist)
        else:  # DDIM and CFG settle
            assert abs(dist[-1] - dist[-2]) < abs(dist[0] - dist[-1]), (rule, dist)
    # CFG++ against CFG at each T (quick: T = 2, 3), each rule on every noise set
    ws = {"cfg": [0, 0.5, 1], "cfgpp": [-0.8, -0.6, -0.4]}
    assert v["steps"] == {f"{r} {T} {s}": w for r, w in ws.items()
                          for T in (2, 3) for s in (0, 1, 2)}, v["steps"]
    assert len(v["step_diffs"]) == 3 * 2 * 3  # three γ at each of two T, on three sets
    assert all(math.isfinite(d) for d in v["step_diffs"])


def check_06(v):
    assert_metrics(v["metrics"])
    w = v["expected"]  # both models over notebook 04's w on three noise sets
    assert v["grids"] == {f"{m} {s}": w for m in ("CFG", "GFT") for s in (0, 1, 2)}, v["grids"]
    assert_finite(v["size"] + v["cos"] + v["gft_vs_cfg"])
    assert all(-1 - 1e-6 <= c <= 1 + 1e-6 for c in v["cos"])


def check_07(v):
    assert_metrics(v["metrics"])
    for name, grid in v["grids"].items():  # ICG and CFG over the whole grid, the others guided
        assert grid == (v["w"] if name.split()[0] in ("cfg", "icg") else v["w"][1:]), name
    toy, (floor, spread) = v["toy"], v["floor"]
    cfg = toy["CFG"]["mmd"]
    for same in ("classifier, exact p(c | z)", "guidance-free, its minimiser"):  # CFG, to float32
        assert abs(toy[same]["mmd"] - cfg) < 1e-4 * cfg, (same, toy[same], cfg)
    assert abs(toy["conditional, w = 0"]["mmd"] - floor) < 5 * spread + 1e-3  # p(x | c) itself
    assert cfg > floor + 10 * spread  # guidance moves the distribution
    evals = {n: t["evals"] for n, t in toy.items()}
    assert evals["CFG"] == 2 and evals["guidance-free, its minimiser"] == 1, evals
    assert evals["autoguidance, blur 0.5"] == 2 and 1 < evals["interval"] < 2, evals


CHECKS = {"00_walkthrough.ipynb": check_00, "01_implicit_classifier.ipynb": check_01,
          "02_mnist_tradeoff.ipynb": check_02, "03_cifar10_tradeoff.ipynb": check_03,
          "04_classifier_guidance.ipynb": check_04, "05_guidance_family.ipynb": check_05,
          "06_guidance_free.ipynb": check_06, "07_guidance_without_null.ipynb": check_07}


def code_cells(path):
    with open(path, encoding="utf-8") as f:
        cells = json.load(f)["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


def images(cell):
    return sum("image/png" in out.get("data", {}) for out in cell.get("outputs", []))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_in_quick_mode(path, monkeypatch):
    name = os.path.basename(path)
    if name in NEEDS_MNIST_4K:
        hint = "make a comparable folder with scripts/make_mnist_subset.py; set CFG_DATA_DIR to it"
        data_dir = os.environ.get("CFG_DATA_DIR") or shared_data("mnist-4k", hint=hint)
        # the kernel runs in notebooks/
        monkeypatch.setenv("CFG_DATA_DIR", os.path.abspath(data_dir))
    monkeypatch.setenv("CFG_QUICK", "1")
    # the inline backend, as for commit: each figure shown becomes an image output
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE % PROBES[name]))
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": NOTEBOOK_DIR}})
    client.execute()
    *cells, probe = [c for c in nb.cells if c.cell_type == "code"]
    errors = [i for i, c in enumerate(cells) if any(o.output_type == "error" for o in c.outputs)]
    assert not errors, f"code cells {errors} show an error"
    bare = [i for i, c in enumerate(cells) if DRAWS_ALWAYS.search(c.source) and not images(c)]
    assert not bare, f"code cells {bare} (counted among code cells) draw but show no image"
    text = "".join(o.text for o in probe.outputs if o.get("name") == "stdout")
    CHECKS[name](json.loads(text))


def test_every_notebook_that_reads_shared_data_is_skipped_without_it():
    """A notebook whose code reads ../shared/data must be listed above, or a fresh clone fails
    instead of skipping."""
    readers = {os.path.basename(p) for p in NOTEBOOKS if "shared/data" in code_cells(p)}
    assert readers, "no notebook reads ../shared/data: the check below would pass on anything"
    unguarded = readers - NEEDS_MNIST_4K - OWN_QUICK_DATA
    assert not unguarded, f"read ../shared/data but are not skipped without it: {unguarded}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_every_figure_a_notebook_draws_is_in_its_committed_outputs(path):
    with open(path, encoding="utf-8") as f:
        cells = [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]
    drawing = [i for i, c in enumerate(cells) if DRAWS.search("".join(c["source"]))]
    assert drawing, "no cell draws a figure: the check would pass on anything"
    bare = [i for i in drawing if not images(cells[i])]
    assert not bare, (f"code cells {bare} (counted among code cells) draw a figure but their "
                      "saved outputs hold none")
