"""The lift-out promise: schedule.py, model.py, guidance.py and sample.py copied alone into another folder sample
with every guidance rule and every step, in a Python where matplotlib and tqdm cannot be imported.

A fresh interpreter (a subprocess) runs in an empty folder holding only copies of the four files; an import hook
refuses matplotlib and tqdm, and the project folder is not on its path. It checks what it imported, then draws a
batch with each rule of guidance.RULES (its second network built from model.py) on each sampler it is defined for,
and checks the images: finite, of the right shape, and different from the unguided ones where the rule guides."""
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
import dataclasses, functools, math
import torch
import guidance, model, sample

assert not any(m.split(".")[0] in ("matplotlib", "tqdm", "train", "classifier", "metrics", "data", "fast_cpu")
               for m in sys.modules), sorted(sys.modules)
torch.manual_seed(0)
net = model.UNet(model.PRESETS["digits"]).eval()
gft = model.UNet(dataclasses.replace(model.PRESETS["digits"], strength_input=True)).eval()  # guidance-free's
for p in [*net.parameters(), *gft.parameters()]:  # random weights, the zero-initialised layers too
    if not p.any():
        p.data.normal_(0, 0.1)
second = {"classifier": model.NoisyClassifier(model.ClassifierConfig(image_size=8, in_channels=1, channels=16,
                                                                     channel_mult=(1, 2), num_res_blocks=1,
                                                                     attention_resolutions=())).eval(),
          "autoguidance": model.UNet(model.UNetConfig(image_size=8, in_channels=1, channels=16, channel_mult=(1, 2),
                                                      num_res_blocks=1, attention_resolutions=(), dropout=0.0)).eval()}
for p in second["classifier"].parameters():
    if not p.any():
        p.data.normal_(0, 0.1)
labels = torch.tensor([1, 4, 7])
runs = 0
for name, rule in guidance.RULES.items():
    params = {"classifier": {"classifier": second["classifier"]}, "autoguidance": {"guide": second["autoguidance"]},
              "interval": {"logsnr_lo": -10.0, "logsnr_hi": 10.0}}.get(name, {})  # an interval that 4 steps meet
    bound = functools.partial(rule, **params)
    w = -0.5 if name == "cfgpp" else 2.0
    unet = gft if name == "guidance-free" else net
    for sampler, entry in sample.SAMPLERS.items():
        if name == "cfgpp" and not entry.get("renoise"):
            continue
        run = lambda rule, w: sample.sample(unet, labels, w, steps=4, sampler=sampler, guidance=rule,
                                            generator=torch.Generator().manual_seed(1))
        x = run(bound, w)
        assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all(), (name, sampler)
        assert (x - run(guidance.guided_eps, 0.0)).abs().max() > 1e-4, (name, sampler)
        runs += 1
print("lifted out:", runs, "runs")
'''


def test_the_four_method_files_sample_alone_without_matplotlib_or_tqdm(tmp_path):
    for name in FILES:
        shutil.copy(os.path.join(REPO, name), tmp_path / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True,
                          env={**env, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rules_times_samplers = 7 * 4 + 1  # CFG++ is defined on the one step that re-noises
    assert f"lifted out: {rules_times_samplers} runs" in proc.stdout, proc.stdout
