"""scripts/study.py's pieces that the notebooks' headlines rest on, against hand-worked values."""
import hashlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import study  # noqa: E402


def point(fid, accuracy, nfe=2.0):
    return dict(fid=fid, accuracy=accuracy, nfe=nfe)


def test_fid_at_accuracy_interpolates_log_fid_between_the_bracketing_points():
    curve = [point(30.0, 0.95, 1.0), point(40.0, 0.97), point(90.0, 0.99), point(200.0, 1.0)]
    # 0.98 is halfway from 0.97 to 0.99: the geometric mean of 40 and 90 is 60.
    fid, nfe = study.fid_at_accuracy(curve, 0.98)
    assert fid == pytest.approx(60.0, rel=1e-12) and nfe == 2.0
    # a quarter of the way from 0.95 to 0.97: 30^(3/4) 40^(1/4)
    quarter = 30 ** 0.75 * 40 ** 0.25
    assert study.fid_at_accuracy(curve, 0.955)[0] == pytest.approx(quarter, rel=1e-12)
    assert study.fid_at_accuracy(curve, 0.99) == (90.0, 2.0)  # on a point: that point


def test_fid_at_accuracy_at_the_ends():
    curve = [point(30.0, 0.95, 1.0), point(40.0, 0.97)]
    assert study.fid_at_accuracy(curve, 0.90) == (30.0, 1.0)  # the first point already reaches it
    assert study.fid_at_accuracy(curve, 0.98) is None  # never reached
    assert study.fid_at_accuracy([], 0.5) is None
    # the first crossing counts, even if accuracy falls and rises again later
    wavy = [point(10.0, 0.5), point(20.0, 0.7), point(15.0, 0.6), point(25.0, 0.8)]
    assert study.fid_at_accuracy(wavy, 0.6)[0] == pytest.approx(math.sqrt(10.0 * 20.0), rel=1e-12)


def test_lowest_fid_at_accuracy_takes_the_best_strength_that_reaches_it():
    # FID rising with accuracy: the first crossing, as fid_at_accuracy
    curve = [point(30.0, 0.95, 1.0), point(40.0, 0.97), point(90.0, 0.99), point(200.0, 1.0)]
    assert study.lowest_fid_at_accuracy(curve, 0.98)[0] == pytest.approx(60.0, rel=1e-12)
    assert study.lowest_fid_at_accuracy(curve, 0.90) == (30.0, 1.0)
    assert study.lowest_fid_at_accuracy(curve, 1.01) is None
    # a first point above the target, a second closer to it with a lower FID: the second
    start = [point(56.0, 0.984, 1.0), point(44.0, 0.973, 1.0), point(50.0, 0.982, 1.0)]
    assert study.fid_at_accuracy(start, 0.971) == (56.0, 1.0)
    assert study.lowest_fid_at_accuracy(start, 0.971) == (44.0, 1.0)
    # 0.978 is crossed twice: down from 56 (0.984) to 44 (0.973), 6/11 of the way:
    # 56^(5/11) 44^(6/11) = 49.1; up from 44 to 50 (0.982), 5/9 of the way:
    # 44^(4/9) 50^(5/9) = 47.2, the lower, and below both points above 0.978
    fid, nfe = study.lowest_fid_at_accuracy(start, 0.978)
    assert fid == pytest.approx(44.0 ** (4 / 9) * 50.0 ** (5 / 9), rel=1e-12) and nfe == 1.0


def w_of(argv):
    """The w values of a cell's sample.py command line (what follows --w)."""
    return argv[argv.index("--w") + 1:]


def shared_part(argv):
    """A cell's command line without its --seed and --w values: model, sampler, count, rule."""
    head = argv[:argv.index("--w")]
    return head[:head.index("--seed")] + head[head.index("--seed") + 2:]


def test_notebook_02s_plan_draws_each_setting_on_every_noise_set_from_one_sampler():
    """plan_02: reverse guidance, the higher w and each ablation model on every noise set (the
    seeds of notebook 04's CFG cells, which hold its CFG curve), on the fast sampler; Algorithm
    2 at w = 0 on the first set only."""
    cells = study.plan_02("ckpt.pt", 100, high=(2, 4, 6), ablation=[(0.2, "p0.2.pt")])
    fast = study.common("ckpt.pt", 100)
    for seed in study.SEEDS_04:
        rev, high, abl = (cells[f"{n}-s{seed}"] for n in ("reverse", "cfg-high", "p0.2"))
        for argv in (rev, high, abl):
            assert argv[argv.index("--seed") + 1] == seed and "--guidance" not in argv
        assert shared_part(rev) == shared_part(high) == fast
        assert shared_part(abl) == study.common("p0.2.pt", 100)
        assert w_of(rev) == [-1, -2, -3] and w_of(high) == [2, 4, 6]
        assert w_of(abl) == list(study.W_ABLATION) and w_of(abl)[0] == 0
    check = cells[f"ancestral256-w0-s{study.SEEDS_04[0]}"]
    assert check[check.index("--sampler") + 1] == "ancestral"
    assert check[check.index("--steps") + 1] == 256 and w_of(check) == [0]
    assert len(cells) == 3 * len(study.SEEDS_04) + 1
    plain = study.plan_02("ckpt.pt", 100, check=False)
    assert sorted(plain) == [f"reverse-s{s}" for s in study.SEEDS_04]


def test_notebook_03s_plan_continues_the_check_cells_to_small_w_on_the_same_noise():
    """plan_03: CFG below the 03-check cells' w on the same three noise sets and sampler, so that
    together they span w = 0 … 6 on every set; reverse guidance and Algorithm 2 on the first."""
    cells, check = study.plan_03("ckpt.pt", 100), study.plan_03_check("ckpt.pt", 100)
    for seed in study.SEEDS_04:
        cfg, fast = cells[f"cfg-s{seed}"], check[f"fast-s{seed}"]
        assert cfg[:cfg.index("--w")] == fast[:fast.index("--w")]  # the same model and noise
        assert max(w_of(cfg)) < min(w_of(fast)) and w_of(cfg)[0] == 0
    first = study.SEEDS_04[0]
    rev = cells[f"reverse-s{first}"]
    assert shared_part(rev) == study.common("ckpt.pt", 100) and w_of(rev) == [-1, -2]
    assert cells[f"ancestral256-w0-s{first}"][:-1] == check[f"ancestral256-w3-s{first}"][:-1]
    assert len(cells) == len(study.SEEDS_04) + 2
    assert f"ancestral256-w0-s{first}" not in study.plan_03("ckpt.pt", 100, check=False)


def test_a_cached_cell_is_reused_only_while_its_command_and_checkpoint_are_unchanged(
        tmp_path, monkeypatch):
    """run_cell samples (here a stand-in for sample.py that records each call) the first time,
    reads the cache while nothing changed, and samples again when the command or the
    checkpoint's bytes change (same size and name)."""
    calls = []

    def fake_sample(cmd, **kwargs):
        calls.append(cmd)
        npz = cmd[cmd.index("--npz") + 1]
        w = float(cmd[cmd.index("--w") + 1])
        images = np.full((2, 4, 4, 1), len(calls), np.uint8)
        np.savez(npz, images=images, labels=np.arange(2), w=np.full(2, w))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(study.subprocess, "run", fake_sample)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt.pt").write_bytes(b"a" * 64)
    argv = ["--ckpt", "ckpt.pt", "--w", 1]
    first, _, _ = study.run_cell("c", argv, "cells")
    again, _, ws = study.run_cell("c", argv, "cells")
    assert len(calls) == 1 and (again == first).all() and ws.tolist() == [1.0, 1.0]
    digest = hashlib.sha256(b"a" * 64).hexdigest()
    assert json.load(open("cells/c.json"))["inputs"] == {"ckpt.pt": digest}
    study.run_cell("c", ["--ckpt", "ckpt.pt", "--w", 2], "cells")  # another command
    assert len(calls) == 2
    study.run_cell("c", ["--ckpt", "ckpt.pt", "--w", 2], "cells")
    assert len(calls) == 2
    (tmp_path / "ckpt.pt").write_bytes(b"b" * 64)  # retrained: same path and size, other bytes
    images, _, _ = study.run_cell("c", ["--ckpt", "ckpt.pt", "--w", 2], "cells")
    assert len(calls) == 3 and (images == 3).all()


def test_the_cfgpp_step_plan_pairs_both_rules_on_the_ddim_step_at_each_t_and_noise_set():
    """plan_05_steps: at each T and noise set, CFG and CFG++ on the DDIM step with that T and that
    --seed (the same noise), from one checkpoint; CFG++'s γ = 1 + w inside its range [0, 1]."""
    cells = study.plan_05_steps("ckpt.pt", 100)
    assert len(cells) == (3 * len(study.STEPS_05) - 1) * len(study.SEEDS_05)  # γ = 0.4 but at 256
    for T in study.STEPS_05:
        for seed in study.SEEDS_05:
            cfg, pp = cells[f"ddim{T}-cfg-s{seed}"], cells[f"ddim{T}-cfgpp-s{seed}"]
            middle = [] if T == 256 else [cells[f"ddim{T}-cfgpp-g0.4-s{seed}"]]
            assert all(m[:m.index("--w")] == pp[:pp.index("--w")] for m in middle)
            for argv in (cfg, pp, *middle):
                assert argv[argv.index("--sampler") + 1] == "ddim"
                assert argv[argv.index("--steps") + 1] == T
                assert argv[argv.index("--seed") + 1] == seed
                assert argv[argv.index("--ckpt") + 1] == "ckpt.pt"
            assert "--guidance" not in cfg and pp[pp.index("--guidance") + 1] == "cfgpp"
            assert 0 in w_of(cfg) and len(w_of(cfg)) >= 2
            assert all(0 <= 1 + w <= 1 for w in w_of(pp))


def test_the_classifier_guidance_plan_pairs_cfg_and_both_bases_on_each_noise_set():
    """plan_04: on each noise set, CFG and classifier guidance on both bases from one diffusion
    model, sampler and --seed; the conditional base from its first w above 0 (at w = 0 it is the
    conditional model, CFG's w = 0)."""
    cells = study.plan_04("ckpt.pt", "clf.pt", 100)
    assert len(cells) == 4 * len(study.SEEDS_04)
    for seed in study.SEEDS_04:
        cfg, unc, cond = (cells[f"{r}-s{seed}"] for r in ("cfg", "classifier-uncond",
                                                            "classifier-cond"))
        shared = cfg[:cfg.index("--w")]
        for argv in (unc, cond):
            assert argv[:len(shared)] == shared  # same model, sampler, count and noise
            assert argv[argv.index("--guidance") + 1] == "classifier"
            assert argv[argv.index("--guide-ckpt") + 1] == "clf.pt"
        assert shared[shared.index("--seed") + 1] == seed and "--guidance" not in cfg
        assert "-p" not in unc and cond[cond.index("-p") + 1] == "base=cond"
        assert w_of(cfg) == w_of(unc) == list(study.W_04) and w_of(cond) == list(study.W_04[1:])
        mid = cells[f"cfg-mid-s{seed}"]
        assert mid[:mid.index("--w")] == shared and 0 < min(w_of(mid)) <= max(w_of(mid)) < 0.5


def test_curve_at_interpolates_on_the_curve_and_names_the_side_off_it():
    curve = [point(30.0, 0.95, 1.0), point(40.0, 0.97), point(90.0, 0.99)]
    fid, where = study.curve_at(curve, 0.98)
    assert where == "on" and fid == pytest.approx(60.0, rel=1e-12)  # √(40·90)
    assert study.curve_at(curve, 0.5) == (30.0, "below")
    assert study.curve_at(curve, 0.999) == (90.0, "above")
    bare = [dict(fid=p["fid"], accuracy=p["accuracy"]) for p in curve]  # metrics without "nfe"
    fid, where = study.curve_at(bare, 0.98)
    assert where == "on" and fid == pytest.approx(60.0, rel=1e-12)
    assert study.curve_at(bare, 0.95) == (30.0, "on")  # on its first point


def test_verdict_calls_a_difference_clear_only_with_one_sign_and_above_its_spread():
    assert study.verdict([-3.0, -2.0, -4.0]).endswith("lower on every set")  # mean −3, std 1
    assert study.verdict([5.0, 7.0, 6.0]).endswith("higher on every set")
    assert study.verdict([-3.0, 1.0, -4.0]).endswith("within the spread")  # signs differ
    assert study.verdict([1.0, 0.1, 3.0]).endswith("within the spread")  # mean 1.37 < std 1.48
    assert study.verdict([-3.0, -2.0, -4.0]).startswith("   -3.00 ±   1.00")
    assert study.mean_sd([1.0, 2.0, 3.0]) == "2.00 ± 1.00"


def test_the_cifar10_check_plan_pairs_algorithm_2_with_the_fast_sampler_on_one_noise_set():
    """plan_03_check: Algorithm 2 at T = 256 at each w around the minimum, on the noise of the
    fast sampler's first set; the fast sampler at the same w on three sets."""
    cells = study.plan_03_check("ckpt.pt", 100)
    first = cells[f"fast-s{study.SEEDS_04[0]}"]
    for w in study.W_CHECK_03:
        a = cells[f"ancestral256-w{w}-s{study.SEEDS_04[0]}"]
        assert a[a.index("--sampler") + 1] == "ancestral" and a[a.index("--steps") + 1] == 256
        assert a[a.index("--seed") + 1] == first[first.index("--seed") + 1] and w_of(a) == [w]
    for seed in study.SEEDS_04:
        fast = cells[f"fast-s{seed}"]
        assert fast[fast.index("--sampler") + 1] == study.FAST_SAMPLER and "--steps" not in fast
        assert fast[fast.index("--seed") + 1] == seed and w_of(fast) == list(study.W_CHECK_03)
    assert len(cells) == len(study.W_CHECK_03) + len(study.SEEDS_04)


def test_provenance_names_the_shipped_file_only_when_its_hash_matches(tmp_path):
    """study.provenance: a cell that read a shipped name with the manifest's SHA-256 is the
    shipped file; another SHA-256 under that name is not; a path gets its hash's start."""
    with open(study.MANIFEST) as f:
        shipped = json.load(f)["mnist-4k"]["sha256"]
    cells = {"a": {"mnist-4k": shipped}, "b": {"mnist-4k": "0" * 64},
             "c": {"../out/m.pt": "ab" * 32}}
    for name, inputs in cells.items():
        with open(tmp_path / f"{name}.json", "w") as f:
            json.dump(dict(argv=[], inputs=inputs, seconds=12.4, threads=1), f)
    assert study.provenance("a", tmp_path) == "a: 12 s at 1 thread(s); mnist-4k: the shipped file"
    assert study.provenance("b", tmp_path).endswith("mnist-4k: NOT the shipped file")
    assert study.provenance("c", tmp_path).endswith("../out/m.pt: sha256 abababababab…")


def test_notebook_05s_rules_on_noise_sets_pair_every_rule_with_cfg_on_one_model():
    """plan_05_sets: the interval map on the first noise set only; the chosen interval,
    autoguidance and the nonlinear rules on every set, from one model and sampler (notebook 04's
    CFG cells, the same --seed, hold CFG's curve)."""
    cells = study.plan_05_sets("ckpt.pt", {"1205": "bad.pt", "602": "worse.pt"}, 100)
    fast = study.common("ckpt.pt", 100)
    cfg = study.plan_04("ckpt.pt", "clf.pt", 100)
    for name, argv in cells.items():
        seed = argv[argv.index("--seed") + 1]
        assert argv[:argv.index("--seed")] == fast and seed in study.SEEDS_05
        assert argv[:argv.index("--seed") + 2] == cfg[f"cfg-s{seed}"][:len(fast) + 2]
        assert name.endswith(f"-s{seed}")
    maps = [n for n in cells if n.startswith("interval") and not n.startswith("interval-s")]
    assert maps and all(n.endswith(f"-s{study.SEEDS_05[0]}") for n in maps)
    assert all(w_of(cells[n]) == [study.MAP_W] for n in maps)
    for seed in study.SEEDS_05:
        interval = cells[f"interval-s{seed}"]
        assert interval[interval.index("-p") + 1:interval.index("--w")] == ["logsnr_lo=-4",
                                                                           "logsnr_hi=0"]
        assert w_of(cells[f"auto-602-s{seed}"]) == [0.5, 1]
        assert w_of(cells[f"auto-1205-s{seed}"]) == [0.5, 1, 2, 3]
        assert cells[f"auto-1205-s{seed}"][-7:-5] == ["--guide-ckpt", "bad.pt"]
        dthresh = cells[f"dthresh-s{seed}"]
        assert w_of(dthresh) == [1, 2, 4] and "--clip" in dthresh
