"""The presets: one entry each, holding a network and the recipe that trains it.

    from presets import PRESETS
    preset = PRESETS["mnist"]
    UNet(preset.network)             # the U-Net (model.UNetConfig)
    preset.recipe.lr                 # train.py's settings (a flag given on the command line wins)
    NoisyClassifier(preset.guide)    # p_φ (noisy_classifier.py trains it with guide_recipe)

train.py (--preset), noisy_classifier.py, bench.py (--presets) and scripts/recipe_search.py read
them; a dataset names the preset it trains with by default (data.DATASETS). A new preset is one
entry here. How each was chosen and what it measures: docs/results.md.

    python presets.py                # every preset's network size
"""
from dataclasses import dataclass, replace

from model import ClassifierConfig, UNetConfig


@dataclass(frozen=True)
class Recipe:
    """train.py's optimisation settings (Algorithm 1 with DDPM's recipe)."""
    batch_size: int
    lr: float  # Adam
    warmup_steps: int  # linear learning-rate warm-up
    max_steps: int
    grad_clip: float = 1.0  # on the gradient norm
    ema_decay: float = 0.9999
    ema_warmup: bool = False  # decay min(ema_decay, (1 + step) / (10 + step)) (CPU presets)
    log_every: int = 100  # steps between loss readings (the only GPU syncs)
    ckpt_every: int = 500
    sample_every: int = 1000  # steps between preview grids
    sample_steps: int = 64  # T of the preview grids


@dataclass(frozen=True)
class GuideRecipe:
    """noisy_classifier.py's settings for p_φ: AdamW, learning rate annealed linearly to 0 (ADM)."""
    batch_size: int
    lr: float
    max_steps: int
    log_every: int = 100
    ckpt_every: int = 500


@dataclass(frozen=True)
class Preset:
    name: str
    network: UNetConfig
    recipe: Recipe
    guide: ClassifierConfig = None  # p_φ(c | z_λ) for this preset's images, if it has one
    guide_recipe: GuideRecipe = None


# Deviation from the paper (the CPU presets): a 5-10x larger learning rate, a short warm-up and
# the EMA ramp, so that minutes on a CPU already give good samples; previews at T = 64, not 256.
CPU_RECIPE = Recipe(batch_size=64, lr=2e-3, warmup_steps=100, max_steps=4000, ema_warmup=True)

_PRESETS = [
    # 8×8 scikit-learn digits: recognisable samples after minutes on a CPU.
    Preset("digits",
           UNetConfig(image_size=8, in_channels=1, channels=32, channel_mult=(1, 2),
                      num_res_blocks=1, attention_resolutions=(4,), dropout=0.0),
           replace(CPU_RECIPE, lr=1e-3, max_steps=2000, log_every=50, sample_every=500),
           ClassifierConfig(image_size=8, in_channels=1, channels=32, channel_mult=(1, 2),
                            num_res_blocks=1, attention_resolutions=(4,)),
           GuideRecipe(batch_size=64, lr=1e-3, max_steps=1000)),
    # 28×28 MNIST family: the best samples per CPU minute among the candidates searched
    # (docs/results.md). p_φ is the encoder of an earlier, wider U-Net (32 channels).
    Preset("mnist",
           UNetConfig(image_size=28, in_channels=1, channels=16, channel_mult=(1, 2, 4),
                      num_res_blocks=1, attention_resolutions=(7,), dropout=0.0),
           CPU_RECIPE,
           ClassifierConfig(image_size=28, in_channels=1, channels=32, channel_mult=(1, 2, 4),
                            num_res_blocks=1, attention_resolutions=(7,)),
           GuideRecipe(batch_size=64, lr=1e-3, max_steps=2000)),
    # The DDPM CIFAR-10 network and recipe (Ho et al. 2020, appendix B), for GPUs. p_φ: ADM's
    # classifier recipe on this U-Net's encoder.
    Preset("cifar10",
           UNetConfig(image_size=32, in_channels=3, channels=128, channel_mult=(1, 2, 2, 2),
                      num_res_blocks=2, attention_resolutions=(16,), dropout=0.1),
           Recipe(batch_size=128, lr=2e-4, warmup_steps=5000, max_steps=800_000, ckpt_every=5000,
                  sample_every=20_000, sample_steps=256),
           ClassifierConfig(image_size=32, in_channels=3, channels=128, channel_mult=(1, 2, 2, 2),
                            num_res_blocks=2, attention_resolutions=(16,)),
           GuideRecipe(batch_size=256, lr=3e-4, max_steps=300_000, log_every=1000,
                       ckpt_every=10_000)),
    # 32×32 colour on a CPU: the mnist network and recipe at CIFAR-10's shape (attention at 8×8),
    # trained longer; the same search on CIFAR-10 chose it (docs/results.md).
    Preset("cifar10-cpu",
           UNetConfig(image_size=32, in_channels=3, channels=16, channel_mult=(1, 2, 4),
                      num_res_blocks=1, attention_resolutions=(8,), dropout=0.0),
           replace(CPU_RECIPE, max_steps=18000, sample_every=2000)),
]
PRESETS = {preset.name: preset for preset in _PRESETS}


def fits(network, dataset):
    """Whether a network takes a named dataset's images and classes."""
    shape = (network.in_channels, network.image_size, network.image_size)
    return shape == tuple(dataset.shape) and network.num_classes == len(dataset.classes)


def fit_config(config, image_size, in_channels, num_classes):
    """A preset's network for other images (size, channels, classes), with self-attention at the
    same U-Net levels (level i works at H halved i times, rounding up, as UNet does)."""
    def level_sizes(size):
        sizes = [size]
        for _ in config.channel_mult[1:]:
            sizes.append((sizes[-1] + 1) // 2)
        return sizes
    levels = zip(level_sizes(config.image_size), level_sizes(image_size))
    attention = tuple(new for old, new in levels if old in config.attention_resolutions)
    return replace(config, image_size=image_size, in_channels=in_channels,
                   num_classes=num_classes, attention_resolutions=attention)


if __name__ == "__main__":
    from model import UNet
    for name, preset in PRESETS.items():
        n = sum(p.numel() for p in UNet(preset.network).parameters())
        c = preset.network
        print(f"{name:12s} {n / 1e6:6.2f}M parameters, input {c.in_channels}×{c.image_size}"
              f"×{c.image_size}, batch {preset.recipe.batch_size}, {preset.recipe.max_steps} steps")
