"""A compact class-conditional U-Net for ε-prediction, ε_θ(z_λ, λ, c), and its checkpoints.

One network gives both ε_θ(z_λ, c) and ε_θ(z_λ) = ε_θ(z_λ, ∅) (Ho & Salimans, arXiv
2207.12598): the null label ∅ is the extra class index `num_classes`, with its own embedding
row, so it never coincides with a real class. The architecture is the DDPM / ADM U-Net that the
paper reuses, in continuous time: λ enters as u(λ) = (2/π)·arctan(e^{−λ/2}) ∈ (0, 1) through a
sinusoidal embedding and an MLP; the class embedding is added to it and injected into every
residual block; self-attention at the configured resolutions; skips from every down block.

`UNetConfig(strength_input=True)` adds guidance-free training's input β (train.gft_loss), whose
last layer starts at zero; off, the network is exactly the paper's. `NoisyClassifier` is
p_φ(c | z_λ) of classifier guidance (noisy_classifier.py): the same encoder and a pooled head. The
named configurations and their recipes are in presets.py.

    net = UNet(UNetConfig(image_size=28, in_channels=1, channels=16, channel_mult=(1, 2, 4)))
    eps = net(z, logsnr, labels)          # (B, C, H, W), (B,), (B,) long -> (B, C, H, W)
    net, ckpt = load_model("out/mnist/ckpt.pt")   # weights_only: no pickled code runs
    net, ckpt = load_model("cifar10-cpu")         # a shipped model: checkpoints/cifar10-cpu.pt

This file imports only torch and the standard library.
"""
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class UNetConfig:
    image_size: int = 32  # H = W of the input
    in_channels: int = 3  # C of the input (and of the predicted ε)
    channels: int = 128  # base width; level i has channels * channel_mult[i]
    channel_mult: tuple = (1, 2, 2, 2)  # one entry per resolution level
    num_res_blocks: int = 2  # residual blocks per level down (one more up)
    attention_resolutions: tuple = (16,)  # resolutions (H) that get self-attention
    num_heads: int = 1
    dropout: float = 0.1
    num_classes: int = 10  # real classes are 0..num_classes−1; num_classes is the null label ∅
    strength_input: bool = False  # GFT's β as an input (train.gft_loss); off: the paper's network


def logsnr_to_unit(logsnr):
    """u(λ) = (2/π)·arctan(e^{−λ/2}) ∈ (0, 1): a bounded network input for any λ."""
    return torch.atan(torch.exp(-0.5 * logsnr)) * (2 / math.pi)


def sinusoidal_embedding(x, dim, max_period=10000.0):
    """(B,) -> (B, dim): [cos(x·f_k), sin(x·f_k)], log-spaced f_k (Transformer / DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device) / half)
    angles = x.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)  # (B, dim)


def group_norm(channels):
    return nn.GroupNorm(min(32, channels // 4), channels)


def zero_init(module):
    """Zero the last layer of a residual branch, so every block starts as the identity (ADM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, in_ch, out_ch, emb_dim, dropout):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb):  # x: (B, in_ch, H, W), emb: (B, emb_dim)
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]  # (B, out_ch, 1, 1) broadcast
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, channels, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x):  # (B, C, H, W)
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.num_heads, C // self.num_heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, H*W, C/heads)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, H*W, C/heads)
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj(h)


class Block(nn.Module):
    """A residual block, followed by self-attention at the chosen resolutions."""

    def __init__(self, in_ch, out_ch, emb_dim, dropout, attention, num_heads):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim, dropout)
        self.attn = Attention(out_ch, num_heads) if attention else nn.Identity()

    def forward(self, x, emb):
        return self.attn(self.res(x, emb))


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x, emb):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size):
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


@dataclass
class ClassifierConfig:
    image_size: int = 32  # H = W of the input z_λ
    in_channels: int = 3  # C of the input
    channels: int = 128  # base width; level i has channels * channel_mult[i]
    channel_mult: tuple = (1, 2, 2, 2)  # one entry per resolution level
    num_res_blocks: int = 2  # residual blocks per level (ADM's "classifier_depth")
    attention_resolutions: tuple = (16,)  # resolutions (H) that get self-attention
    num_heads: int = 1
    dropout: float = 0.0
    num_classes: int = 10  # c = 0..num_classes−1 (no null label: p_φ always names a class)


class Encoder(nn.Module):
    """What the U-Net and the noise-conditional classifier share: the embedding of λ (and of c,
    for the U-Net) and the down path and middle that encode z_λ. The classifier is ADM's: the
    U-Net's encoder without the skip connections, then a pooled head."""

    def __init__(self, config, num_labels=None):
        super().__init__()
        self.config = config
        ch, emb_dim = config.channels, 4 * config.channels
        self.logsnr_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))
        if num_labels is not None:
            self.label_emb = nn.Embedding(num_labels, emb_dim)
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)

        # Down path: every module's output is kept for the U-Net's skip connections.
        self.down = nn.ModuleList()
        self.skip_channels, res, cur = [ch], config.image_size, ch
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                self.down.append(Block(cur, ch * mult, emb_dim, config.dropout,
                                       res in config.attention_resolutions, config.num_heads))
                cur = ch * mult
                self.skip_channels.append(cur)
            if level < len(config.channel_mult) - 1:
                self.down.append(Downsample(cur))
                self.skip_channels.append(cur)
                res = (res + 1) // 2
        self.mid = nn.ModuleList([Block(cur, cur, emb_dim, config.dropout, attn, config.num_heads)
                                  for attn in (True, False)])
        self.width, self.resolution = cur, res  # channels and H after the middle

    def encode(self, z, logsnr, labels=None, extra_emb=None):
        """(h after the middle, the down path's outputs for the skips, the embedding (B, emb_dim)).
        extra_emb: (B, emb_dim) added to the embedding of λ and c (the U-Net's β), or None."""
        logsnr = torch.as_tensor(logsnr, device=z.device, dtype=torch.float32).expand(z.shape[0])
        # u(λ) scaled to [0, 1000] for the sinusoids, as DDPM's t; z's dtype: float64 runs (tests).
        u = sinusoidal_embedding(1000 * logsnr_to_unit(logsnr), self.config.channels)
        emb = self.logsnr_mlp(u.to(z.dtype))
        if labels is not None:
            emb = emb + self.label_emb(labels)  # (B, emb_dim)
        if extra_emb is not None:
            emb = emb + extra_emb
        h = self.conv_in(z)
        skips = [h]
        for module in self.down:
            h = module(h, emb)
            skips.append(h)
        for module in self.mid:
            h = module(h, emb)
        return h, skips, emb


class UNet(Encoder):
    """ε_θ(z_λ, λ, c): forward(z, logsnr, labels) -> eps, with labels == num_classes meaning ∅.
    With config.strength_input, GFT's sampling model ε_s(z_λ, λ, c, β): strength=β."""

    def __init__(self, config: UNetConfig):
        super().__init__(config, num_labels=config.num_classes + 1)  # the last row is ∅
        self.null_label = config.num_classes
        ch, emb_dim = config.channels, 4 * config.channels
        cur, res = self.width, self.resolution
        skip_channels = list(self.skip_channels)

        # Up path: num_res_blocks + 1 blocks per level, each eating one skip connection.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for _ in range(config.num_res_blocks + 1):
                self.up.append(Block(cur + skip_channels.pop(), ch * mult, emb_dim, config.dropout,
                                     res in config.attention_resolutions, config.num_heads))
                cur = ch * mult
            if level > 0:
                self.up.append(Upsample(cur))
                res = res * 2  # nominal; Upsample restores the exact size of the skip

        self.norm_out = group_norm(cur)
        self.conv_out = zero_init(nn.Conv2d(cur, config.in_channels, 3, padding=1))

        # GFT's β, built last so that every other weight is drawn as without it; its zero last
        # layer makes the network start as without it.
        self.strength_input = config.strength_input
        if config.strength_input:
            self.strength_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(),
                                              zero_init(nn.Linear(emb_dim, emb_dim)))

    def strength_embedding(self, strength, z):
        """(B, emb_dim): the embedding of β (None: β = 1); None for a network without β."""
        if not self.strength_input:
            if strength is not None:
                raise ValueError("this UNet has no strength input β (UNetConfig.strength_input="
                                 "False): it was not trained by guidance-free training "
                                 "(train.gft_loss)")
            return None
        beta = 1.0 if strength is None else strength
        beta = torch.as_tensor(beta, device=z.device, dtype=torch.float32)
        beta = beta.expand(z.shape[0])  # (B,)
        u = sinusoidal_embedding(1000 * beta, self.config.channels)
        return self.strength_mlp(u.to(z.dtype))

    def forward(self, z, logsnr, labels, strength=None):
        """z: (B, C, H, W); logsnr: (B,) or scalar λ; labels: (B,) long, num_classes = ∅.
        strength: GFT's β ∈ (0, 1], a number or (B,), only for a network with that input; None
        there is β = 1 (the conditional model, and with ∅ the unconditional one)."""
        h, skips, emb = self.encode(z, logsnr, labels, self.strength_embedding(strength, z))
        for module in self.up:
            if isinstance(module, Upsample):
                h = module(h, skips[-1].shape[-2:])
            else:
                h = module(torch.cat([h, skips.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


class NoisyClassifier(Encoder):
    """p_φ(c | z_λ) for classifier guidance (guidance.classifier_guided_eps; noisy_classifier.py):
    forward(z, logsnr) -> logits (B, num_classes), whose log_softmax is log p_φ(c | z_λ).

    ADM's design at this scale: the U-Net's encoder (conditioned on λ, without a label), then
    GroupNorm → SiLU → average pool → linear (ADM's "adaptive" pooling; its ImageNet
    classifiers used attention pooling and scale-shift normalisation)."""

    def __init__(self, config: ClassifierConfig):
        super().__init__(config)
        self.norm_out = group_norm(self.width)
        self.head = zero_init(nn.Linear(self.width, config.num_classes))  # zero, as ADM's

    def forward(self, z, logsnr):
        """z: (B, C, H, W); logsnr: (B,) or scalar λ -> logits (B, num_classes)."""
        h = self.encode(z, logsnr)[0]
        h = F.silu(self.norm_out(h)).mean(dim=(2, 3))  # (B, C, H, W) -> (B, C)
        return self.head(h)  # (B, num_classes)


# A checkpoint's networks by its "network" entry (train.py: unet, noisy_classifier.py: classifier).
NETWORKS = {"unet": (UNetConfig, UNet), "classifier": (ClassifierConfig, NoisyClassifier)}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line: why, and what to do."""


def save_checkpoint(ckpt, path):
    """Write `ckpt` to a temporary file beside `path`, flush it to disk, then rename it over
    `path`: a crash at any moment leaves the old file or the new one, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints")


def shipped_names():
    """The names of the trained models in checkpoints/ beside this file (none if it is absent)."""
    if not os.path.isdir(SHIPPED_DIR):
        return []
    return sorted(f[:-3] for f in os.listdir(SHIPPED_DIR) if f.endswith(".pt"))


def checkpoint_path(path):
    """`path` itself where it is a file, else checkpoints/<path>.pt where `path` (with or without
    .pt, no folder) names a shipped model, else `path` unchanged (reading it gives the error)."""
    path = os.fspath(path)
    name = path[:-3] if path.endswith(".pt") else path
    shipped = os.path.join(SHIPPED_DIR, f"{name}.pt")
    is_name = not any(sep and sep in path for sep in (os.sep, os.altsep))
    return shipped if is_name and not os.path.isfile(path) and os.path.isfile(shipped) else path


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint (a path, or the name of a shipped model) with weights_only=True; raise
    CheckpointError with a one-line reason."""
    path = checkpoint_path(path)
    if not os.path.isfile(path):
        names = ", ".join(shipped_names())
        raise CheckpointError(f"no checkpoint at {path}: check the path, "
                              + (f"name a shipped model ({names}), " if names else "")
                              + "or train one (train.py, noisy_classifier.py)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        # A class or function: pickled code ("Unsupported class": PyTorch before 2.4).
        if "Unsupported global" in str(e) or "Unsupported class" in str(e):
            raise CheckpointError(f"{path} holds pickled Python objects, not only tensors; "
                                  "refusing to load it (only load checkpoints this project "
                                  "wrote: train.py, noisy_classifier.py)") from None
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt: "
                              f"{type(e).__name__}); use an intact copy or train again") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "ema" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint of train.py or noisy_classifier.py "
                              "(no 'config' or 'ema' entry)")
    return ckpt


def network_kind(ckpt):
    """'unet' or 'classifier': the checkpoint's "network" entry, or for an older checkpoint
    without it, told by its weights (only the classifier has a head)."""
    return ckpt.get("network") or ("classifier" if "head.weight" in ckpt["ema"] else "unet")


def config_from_dict(d, kind="unet"):
    """The config dataclass of a network kind from a stored dict (lists back to tuples)."""
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return NETWORKS[kind][0](**fields)


def model_from_checkpoint(ckpt, weights="ema"):
    """The checkpoint's network (a UNet or a NoisyClassifier) with ckpt[weights] ('ema' or
    'model')."""
    kind = network_kind(ckpt)
    model = NETWORKS[kind][1](config_from_dict(ckpt["config"], kind))
    model.load_state_dict(ckpt[weights])
    return model


def load_model(path, map_location="cpu"):
    """(the network with its EMA weights, in eval mode, the checkpoint dict) from a file of
    train.py or noisy_classifier.py, or a shipped model's name; else CheckpointError, one line
    (no pickled code runs)."""
    ckpt = load_checkpoint(path, map_location)
    try:
        return model_from_checkpoint(ckpt).eval(), ckpt
    except (RuntimeError, KeyError, TypeError) as e:  # a config that does not match its weights
        raise CheckpointError(f"{path}: the stored weights do not fit the stored config "
                              f"({type(e).__name__}); use the checkpoint as train.py or "
                              "noisy_classifier.py wrote it") from None
