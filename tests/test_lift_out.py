"""The lift-out promise: schedule.py, model.py, guidance.py and sample.py, copied alone into
an empty folder, sample with every guidance rule on every step, without matplotlib or tqdm.

A fresh interpreter runs in a folder that holds only copies of the four files, with an
import hook that refuses matplotlib and tqdm (both installed here, so the hook is checked
first, as is the absence of the project's other files). Then each rule of guidance.RULES
(its second network built from model.py) samples on each step it is defined for, with
each clip (fixed, none, dynamic) and per-example w: the images are finite, of the right
shape, and differ from the unguided ones in the guided row; CFG++ elsewhere is refused."""
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ("schedule.py", "model.py", "guidance.py", "sample.py")

SCRIPT = r'''
import importlib.abc, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("matplotlib", "tqdm"):
            raise ImportError(f"{name} is not installed here")

sys.meta_path.insert(0, Refuse())
for name in ("matplotlib", "tqdm", *sys.argv[1:]):  # refused, or not copied here
    try:
        __import__(name)
    except ImportError:
        continue
    raise AssertionError(f"{name} can be imported: the test would not test anything")
import dataclasses, functools
import torch
import guidance, model, sample

torch.manual_seed(0)
digits = model.UNetConfig(image_size=8, in_channels=1, channels=32, channel_mult=(1, 2),
                          num_res_blocks=1, attention_resolutions=(4,), dropout=0.0)
net = model.UNet(digits).eval()
gft = model.UNet(dataclasses.replace(digits, strength_input=True)).eval()  # guidance-free's
small = dict(image_size=8, in_channels=1, channels=16, channel_mult=(1, 2), num_res_blocks=1,
             attention_resolutions=())
second = {"classifier": model.NoisyClassifier(model.ClassifierConfig(**small)).eval(),
          "autoguidance": model.UNet(model.UNetConfig(**small, dropout=0.0)).eval()}
for p in [*net.parameters(), *gft.parameters(), *second["classifier"].parameters()]:
    if not p.any():  # random weights, the zero-initialised layers too
        p.data.normal_(0, 0.1)
labels = torch.tensor([1, 4, 7])
runs = 0
for name, rule in guidance.RULES.items():
    params = {"classifier": {"classifier": second["classifier"]},
              "autoguidance": {"guide": second["autoguidance"]},
              "interval": {"logsnr_lo": -10.0, "logsnr_hi": 10.0}}.get(name, {})  # 4 steps meet it
    bound = functools.partial(rule, **params)
    w = {"cfgpp": [0.0, -0.4, -1.0], "guidance-free": [0.0, 2.0, 0.5]}.get(name, [0.0, 2.0, -1.0])
    unet = gft if name == "guidance-free" else net
    for sampler, entry in sample.SAMPLERS.items():
        def run(rule, w, clip):
            return sample.sample(unet, labels, torch.tensor(w), steps=4, sampler=sampler,
                                 guidance=rule, clip_x=clip,
                                 generator=torch.Generator().manual_seed(1))
        if name == "cfgpp" and not entry.get("renoise"):
            try:
                run(bound, w, True)
            except ValueError as e:
                assert "only these samplers take: ddim" in str(e), e
                continue
            raise AssertionError(f"cfgpp ran on {sampler}")
        for clip in (True, False, 0.995):
            x = run(bound, w, clip)
            assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all(), (name, sampler, clip)
            unguided = run(guidance.guided_eps, [0.0] * 3, clip)
            assert (x - unguided)[1].abs().max() > 1e-4, (name, sampler, clip)
        runs += 1
print("lifted out:", runs, "runs")
'''


def test_the_four_method_files_sample_alone_without_matplotlib_or_tqdm(tmp_path):
    for name in FILES:
        shutil.copy(os.path.join(REPO, name), tmp_path / name)
    others = sorted(p[:-3] for p in os.listdir(REPO) if p.endswith(".py") and p not in FILES)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *others], cwd=tmp_path, timeout=300,
                          capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert others and "train" in others  # the project's other files were checked absent
    rules_times_samplers = 11 * 4 + 1  # CFG++ is defined on the one step that re-noises
    assert f"lifted out: {rules_times_samplers} runs" in proc.stdout, proc.stdout
