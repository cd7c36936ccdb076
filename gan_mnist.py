#!/usr/bin/env python3
"""gan_mnist: train a GAN on MNIST, watch it learn, sample from it, measure it.

    python gan_mnist.py --epochs 200                       # train; everything lands in outputs/<run>/
    python gan_mnist.py --resume outputs/<run>/checkpoints/last.pt --epochs 300
    python gan_mnist.py generate --checkpoint outputs/<run>/generator.pt --out digits.png
    python gan_mnist.py evaluate --checkpoint outputs/<run>/generator.pt
    python gan_mnist.py interpolate --checkpoint outputs/<run>/generator.pt --out walk.gif

The recipe is the classic tutorial's: an MLP generator (z 100 -> 256 -> 512 -> 1024 -> 784, LeakyReLU 0.2,
Tanh) against an MLP discriminator (784 -> 512 -> 256 -> 1, LeakyReLU 0.2), alternating binary cross-entropy
updates with Adam (lr 2e-4, betas 0.5/0.999), batch 64, images in [-1, 1]. The default adds a lazy R1 penalty.
Read it top to bottom: 1 config, 2 data, 3 models, 4 the training step, 5 the epoch loop. That is the whole GAN.
Below the line "support code" come checkpoints and resume, evaluation, outputs, run-folder safety and commands.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import hashlib
import html
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import string
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 28, 28)

# ============================================================================================ 1. config


def _f(default: Any, help: str, **extra: Any) -> Any:
    """A Config field with its --help text; `defining=True` marks a setting that a resume may not change."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class Config:
    # the recipe
    epochs: int = _f(200, "total number of epochs; with --resume, the total to continue up to")
    batch_size: int = _f(64, "images per training step", defining=True)
    lr: float = _f(2e-4, "Adam learning rate of both networks")
    b1: float = _f(0.5, "Adam beta1 of both networks")
    b2: float = _f(0.999, "Adam beta2 of both networks")
    latent_dim: int = _f(100, "size of the noise vector z", defining=True)
    conditional: bool = _f(False, "class-conditional GAN: G and D both see the digit label", defining=True)
    arch: str = _f("mlp", "networks: mlp (the tutorial's) or dcgan (convolutional G and D)", defining=True)
    loss: str = _f("bce", "bce (the tutorial's) or wgan-gp (a critic with a gradient penalty; presets its recipe)",
                   defining=True)  # fmt: skip
    clusters: int = _f(0, "self-conditioned: G and D see which of N clusters of the training digits (found "
                       "without labels) a digit is in; sampling stays unconditional (0 = off)", metavar="N",
                       defining=True)  # fmt: skip
    ema_decay: float = _f(0.999, "EMA of G's weights for samples, generate and evaluate (0 = off)", defining=True)
    # the stabilisers: --recipe, --loss, --conditional and --arch preset them (PRESETS below); a flag typed wins
    recipe: str = _f("stable", "stable: the tutorial's maths plus lazy R1; tutorial: as published", defining=True)
    r1_gamma: float = _f(1.0, "weight of the R1 penalty on D's gradient at real digits (0 = off)")
    r1_every: int = _f(8, "apply the R1 penalty every N D steps, its weight scaled by N (lazy R1)", metavar="N")
    lr_decay: str = _f("none", "learning-rate schedule over the run's --epochs: linear (to 0), or none")
    d_lr: float = _f(0.0, "D's Adam learning rate, if not --lr (two time-scale update rule, TTUR)")
    spectral_norm: bool = _f(False, "spectral normalisation of each of D's layers", defining=True)
    gp_weight: float = _f(0.0, "weight (lambda) of the WGAN-GP gradient penalty at points between real and fake")
    n_critic: int = _f(1, "D (critic) steps per G step: G trains on every N-th batch", metavar="N")
    # data and run
    data_dir: str = _f("./data", "folder holding MNIST/raw/ (downloaded there when absent)")
    out_dir: str = _f("", "run folder (default: a new outputs/run-YYYYmmdd-HHMMSS)", metavar="DIR")
    subset: int = _f(0, "train on the first N training images only (0 = all 60000)", metavar="N", defining=True)
    seed: int = _f(1, "random seed for weights, noise and data order", defining=True)
    device: str = _f("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    threads: int = _f(0, "CPU threads for torch (0 = auto: one fewer than the CPUs available, at most 4)")
    precision: str = _f("auto", "matmuls: auto (bf16 on CPUs with native bf16, TF32 on CUDA), fp32, bf16")
    cuda_graph: bool = _f(False, "on CUDA, capture each training step as one CUDA graph (eager elsewhere)")
    # outputs
    sample_every: int = _f(1, "save a sample grid every N epochs", metavar="N")
    checkpoint_every: int = _f(10, "keep a checkpoints/epoch_NNNN.pt every N epochs", metavar="N")
    keep_checkpoints: int = _f(5, "keep only the newest N periodic checkpoints (0 = keep all)", metavar="N")
    eval_every: int = _f(10, "evaluate every N epochs and at the end (0 = at the end only, -1 = never)", metavar="N")
    eval_num: int = _f(10000, "generated digits per evaluation", metavar="N")
    judge: str = _f("", "judge network cache (default: ~/.cache/gan_mnist/judge-<hash>.pt)", metavar="PATH")
    resume: str = _f("", "continue the run saved in this checkpoint (e.g. <run>/checkpoints/last.pt)", metavar="PATH")
    tensorboard: bool = _f(True, "TensorBoard event files in <run>/tensorboard; --no-tensorboard: off")
    quiet: bool = _f(False, "no progress bar; print only the per-epoch summaries")
    debug: bool = _f(False, "show the full traceback of an error")

    @property
    def labelled(self) -> bool:  # whether each training digit comes with a label: its digit, or its cluster
        return self.conditional or self.clusters > 0


# A resumed run must keep these: they define the model or the data stream that the checkpoint continues.
RUN_DEFINING = tuple(f.name for f in dataclasses.fields(Config) if f.metadata.get("defining"))
RECIPES = ("stable", "tutorial")
# What the choices preset, each entry where all its choices hold, in this order, then the flags the user typed
# (README, 'The default recipe', 'Which GAN?'). "stable" is the Config defaults; "tutorial" the blog's maths;
# WGAN-GP's the paper's, with no R1 beside its gradient penalty. The DCGAN trains best self-conditioned on 40
# clusters, with the default's R1 (without clusters: 8 times it); the conditional MLP without R1; the conditional
# DCGAN, whose D is stronger, with the default's.
PRESETS: list[tuple[dict[str, Any], dict[str, Any]]] = [
    ({"recipe": "tutorial"}, {"r1_gamma": 0.0}),
    ({"arch": "dcgan", "loss": "bce", "conditional": False}, {"clusters": 40}),
    ({"arch": "dcgan", "conditional": False, "clusters": 0}, {"r1_gamma": 8.0}),
    ({"loss": "wgan-gp"}, {"lr": 1e-4, "b2": 0.9, "n_critic": 5, "gp_weight": 10.0, "r1_gamma": 0.0}),
    ({"conditional": True, "arch": "mlp"}, {"r1_gamma": 0.0}),
]


def recipe_config(flags: dict[str, Any]) -> Config:
    chosen = {k: flags.get(k, getattr(Config, k)) for k in ("recipe", "arch", "loss", "conditional", "clusters")}
    preset: dict[str, Any] = {}
    for when, settings in PRESETS:
        if when.items() <= chosen.items():
            preset |= settings
            chosen |= {k: v for k, v in settings.items() if k in chosen and k not in flags}  # what later entries see
    return Config(**(preset | flags))


# ============================================================================================== 2. data
# MNIST is read once, through torchvision (load_mnist, in the support code), as uint8 tensors kept on the device.


def to_model_range(images: Tensor, device: torch.device | str = "cpu") -> Tensor:
    """uint8 N x 28 x 28 -> float N x 1 x 28 x 28 in [-1, 1], what ToTensor + Normalize(0.5, 0.5) give."""
    return images.to(device).unsqueeze(1).float().div_(127.5).sub_(1.0)


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] -> uint8 in MNIST's convention (0 = black background, 255 = white stroke)."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def epoch_batches(num_images: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """One epoch's index batches: a seeded permutation, each image once; the last batch keeps the remainder, unless
    that is one image (G's batch norm cannot train on one), which sits that epoch out."""
    batches = list(torch.randperm(num_images, generator=generator).split(batch_size))
    return batches[:-1] if batch_size > 1 and len(batches[-1]) == 1 else batches


CLUSTERS = range(2, 256)  # --clusters: each digit's cluster id is kept in a byte


def digit_clusters(images: Tensor, k: int, neighbours: int = 10) -> Tensor:
    """k clusters of the digits, found without labels: spectral clustering (Ng et al. 2002) of the graph joining each
    digit to its 10 nearest in pixel space, the scales self-tuned (Zelnik-Manor & Perona 2004). A digit's nearest
    neighbour is the same digit 97 % of the time, so these clusters are purer than k-means of the pixels (README)."""
    import scipy.sparse.linalg  # here, not at the top: 0.13 s that every command's start would pay

    x = images.float().flatten(1) / 255
    dist, near = (t[:, 1:].numpy() for t in nearest(x, x, neighbours + 1))  # the nearest is the digit itself
    scale = dist[:, -1:]  # a digit's distance to its 10th neighbour: dense and sparse regions alike
    weights = np.exp(-(dist**2) / (scale * scale[near].squeeze(-1) + 1e-8))
    n = len(x)
    A = scipy.sparse.csr_matrix((weights.ravel(), (np.repeat(np.arange(n), neighbours), near.ravel())), shape=(n, n))
    A = A.maximum(A.T)
    norm = scipy.sparse.diags(1 / np.sqrt(np.asarray(A.sum(1)).ravel()))
    _, vectors = scipy.sparse.linalg.eigsh(norm @ A @ norm, k=k, which="LA", v0=np.ones(n) / np.sqrt(n))
    return kmeans(torch.from_numpy(vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).float(), k)


def kmeans(x: Tensor, k: int, iters: int = 30) -> Tensor:
    """Each row's cluster by Lloyd's k-means from k-means++ seeds (Arthur & Vassilvitskii 2007), on its own stream."""
    rng = torch.Generator().manual_seed(0)
    centres = x[torch.randint(len(x), (1,), generator=rng)]
    for _ in range(k - 1):
        far = torch.cdist(x, centres).min(1).values.square()
        centres = torch.cat([centres, x[torch.multinomial(far, 1, generator=rng)]])
    for _ in range(iters):
        ids = torch.cdist(x, centres).argmin(1)
        centres = torch.stack([x[ids == j].mean(0) if (ids == j).any() else centres[j] for j in range(k)])
    return ids


# ============================================================================================ 3. models


LABEL_DIM = 10  # G's label embedding (50 measured worse: benchmarks/conditional_ablation.py)
DCGAN_WIDTH = 32  # channels of the DCGAN's 14 x 14 layer, twice as many at 7 x 7 (64: 2.5x slower, README)
ARCHS = ("mlp", "dcgan")


def _mlp(sizes: list[int], last_activation: bool = False) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or last_activation:
            layers.append(nn.LeakyReLU(0.2, inplace=True))
    return layers


def generator_body(arch: str, in_dim: int, hidden: bool = True) -> nn.Sequential:
    """in_dim -> 1 x 28 x 28 in [-1, 1]: the tutorial's MLP, or a DCGAN (Radford et al. 2016) sized for MNIST.
    `hidden`: the DCGAN's hidden layer of 256 after z; the unconditional G gains from it, the conditional loses."""
    if arch == "mlp":
        return nn.Sequential(*_mlp([in_dim, 256, 512, 1024, 784]), nn.Tanh())
    c = DCGAN_WIDTH  # a linear map to 2c x 7 x 7, then transposed convolutions to 14 x 14 and 28 x 28
    first = [nn.Linear(in_dim, 256, bias=False), nn.BatchNorm1d(256), nn.ReLU(True)] if hidden else []
    return nn.Sequential(*first, nn.Linear(256 if hidden else in_dim, 2 * c * 49, bias=False),
                         nn.Unflatten(1, (2 * c, 7, 7)), nn.BatchNorm2d(2 * c), nn.ReLU(True),
                         nn.ConvTranspose2d(2 * c, c, 4, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(True),
                         nn.ConvTranspose2d(c, 1, 4, 2, 1), nn.Tanh())  # fmt: skip


def discriminator_body(arch: str) -> tuple[nn.Sequential, int]:
    """Image -> features, and their size. No batch norm: R1 and the gradient penalty are per-sample gradients."""
    if arch == "mlp":
        return nn.Sequential(nn.Flatten(), *_mlp([784, 512, 256], last_activation=True)), 256
    c = DCGAN_WIDTH  # strided convolutions 28 -> 14 -> 7, then a hidden layer over the whole digit (README)
    return nn.Sequential(nn.Conv2d(1, c, 4, 2, 1), nn.LeakyReLU(0.2, True), nn.Conv2d(c, 2 * c, 4, 2, 1),
                         nn.LeakyReLU(0.2, True), nn.Flatten(), *_mlp([2 * c * 49, 256], True)), 256  # fmt: skip


class Generator(nn.Module):
    """z (+ digit label) -> 1 x 28 x 28 image in [-1, 1]. With `clusters`, still unconditional: z picks a cluster."""

    def __init__(self, latent_dim: int = 100, num_classes: int = 0, arch: str = "mlp", clusters: int = 0) -> None:
        super().__init__()
        self.latent_dim, self.num_classes, self.arch, self.clusters = latent_dim, num_classes, arch, clusters
        labels = num_classes or clusters  # conditional: the label enters as a learned embedding joined to z
        self.label_embedding = nn.Embedding(labels, LABEL_DIM) if labels else None
        self.net = generator_body(arch, latent_dim + (LABEL_DIM if labels else 0), hidden=not labels)
        if clusters:  # the clusters' cumulative shares of the training digits: z's first coordinate picks one
            self.register_buffer("cluster_cdf", torch.linspace(1 / clusters, 1, clusters))

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        if self.clusters and labels is None:
            z, labels = self.pick_clusters(z)
        return self.decode(z, None if self.label_embedding is None else self.label_embedding(labels))

    def pick_clusters(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Cluster k with its share of the digits: where Phi(z_0) falls among the cumulative shares; z_0 is then
        spread back over N(0, 1) within that slice, so (z, k) are independent, as in training."""
        u, cdf = 0.5 * (1 + torch.erf(z[:, 0].float() / math.sqrt(2))), self.cluster_cdf  # erf: MPS lacks ndtri
        k = torch.searchsorted(cdf, u.contiguous(), right=True).clamp_(max=self.clusters - 1)
        low = torch.where(k > 0, cdf[(k - 1).clamp(min=0)], 0.0)
        v = ((u - low) / (cdf[k] - low).clamp(min=1e-12)).clamp(1e-6, 1 - 1e-6)
        return torch.cat([math.sqrt(2) * torch.erfinv(2 * v[:, None] - 1).to(z.dtype), z[:, 1:]], dim=1), k

    def decode(self, z: Tensor, label_vectors: Tensor | None = None) -> Tensor:
        """From z and (conditional) label embedding vectors: what `interpolate` walks between digits with."""
        if label_vectors is not None:
            z = torch.cat([z, label_vectors], dim=1)
        return self.net(z).view(-1, *IMAGE_SHAPE)


class Discriminator(nn.Module):
    """Image (+ digit label) -> one logit: > 0 means 'real' (a critic's score under --loss wgan-gp)."""

    def __init__(self, num_classes: int = 0, spectral_norm: bool = False, arch: str = "mlp") -> None:
        super().__init__()
        self.features, width = discriminator_body(arch)
        self.head = nn.Linear(width, 1)
        # Conditional: a projection term <embed(y), features(x)> (Miyato & Koyama 2018).
        self.label_projection = nn.Embedding(num_classes, width) if num_classes else None
        if spectral_norm:  # Miyato et al. 2018: each weight matrix scaled to spectral norm 1
            for layer in [m for m in self.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]:
                nn.utils.parametrizations.spectral_norm(layer)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        h = self.features(x)
        logits = self.head(h).squeeze(1)
        if self.label_projection is not None:
            logits = logits + (self.label_projection(labels) * h).sum(dim=1)
        return logits


# ================================================================================= 4. the training step


@functools.cache
def real_then_fake(batch: int, device: torch.device) -> Tensor:
    """BCE's targets for [real; fake], 1 then 0: made once per batch size, not in every step."""
    return torch.cat([torch.ones(batch), torch.zeros(batch)]).to(device)


def bce_d_loss(logits: Tensor) -> Tensor:
    """The tutorial's D loss, of D's logits on [real; fake]: BCE against 1 for real digits, 0 for fakes."""
    return F.binary_cross_entropy_with_logits(logits, real_then_fake(len(logits) // 2, logits.device))


def bce_g_loss(fake_logits: Tensor) -> Tensor:
    """G's non-saturating loss: BCE against 1 ('real') on its fakes, i.e. maximise log D(G(z))."""
    ones = real_then_fake(len(fake_logits), fake_logits.device)[: len(fake_logits)]
    return F.binary_cross_entropy_with_logits(fake_logits, ones)


def critic_loss(scores: Tensor) -> Tensor:
    """WGAN (Arjovsky et al. 2017): the critic maximises E[D(real)] - E[D(fake)], an estimate of the distance."""
    real, fake = scores.chunk(2)
    return fake.mean() - real.mean()


class Loss(NamedTuple):
    d: Callable[[Tensor], Tensor]  # D's loss, of its outputs on [real; fake]
    g: Callable[[Tensor], Tensor]  # G's, of D's outputs on fake
    output: Callable[[Tensor], Tensor]  # what the logs average of D's outputs: a probability, or a critic's score
    columns: tuple[str, str]  # their names in losses.csv, on real and on fake digits
    name: str  # what the logs call D


LOSSES = {  # WGAN-GP adds its gradient penalty in the step
    "bce": Loss(bce_d_loss, bce_g_loss, torch.sigmoid, ("d_x", "d_g_z"), "D"),
    "wgan-gp": Loss(critic_loss, lambda scores: -scores.mean(), lambda s: s, ("critic_real", "critic_fake"), "critic"),
}


@dataclass
class Nets:
    """The two networks, their optimisers and the EMA generator, with what the step keeps on the device."""

    G: Generator
    D: Discriminator
    opt_g: torch.optim.Adam
    opt_d: torch.optim.Adam
    ema: Generator | None
    ema_decay: float
    stats: Tensor  # running sums of d_loss, g_loss, D(x), D(G(z)) over this epoch's steps
    ema_updates: Tensor  # on the device: the EMA warm-up needs no host value (and can be graph-captured)
    loss: Loss = LOSSES["bce"]
    bf16: bool = False  # bf16 matmuls under autocast
    r1_weight: float = 0.0  # gamma / 2 * every: lazy R1 applies the whole penalty on one step in `every`
    gp_weight: float = 0.0  # lambda of the WGAN-GP gradient penalty (0 = off)

    ema_fitted_at: int = -1  # the EMA update its batch-norm statistics were last re-estimated at

    def sampler(self) -> Generator:
        """The generator to draw from: the EMA, its batch-norm statistics re-estimated for its weights, or G."""
        if self.ema is not None and self.ema_fitted_at != int(self.ema_updates):
            fit_batch_norm(self.ema)
            self.ema_fitted_at = int(self.ema_updates)
        return self.ema if self.ema is not None else self.G

    def autocast(self) -> torch.autocast:
        # Each region casts a weight once (WGAN-GP's D runs twice in one: 3-5 % faster on CPU); the cache ends with the
        # region, before D's weights change. CUDA graphs need it off.
        on_cpu = self.stats.device.type == "cpu"
        return torch.autocast(self.stats.device.type, torch.bfloat16, enabled=self.bf16, cache_enabled=on_cpu)

    def update_ema(self) -> None:
        """EMA of G's weights, warmed up (decay (1+t)/(10+t) up to ema_decay: early grids are not init noise)."""
        if self.ema is None:
            return
        self.ema_updates += 1
        decay = ((1 + self.ema_updates) / (10 + self.ema_updates)).clamp(max=self.ema_decay)
        ema = list(self.ema.parameters())  # the weight as tensors: as a Scalar it is read back (.item(), a host sync)
        torch._foreach_lerp_(ema, list(self.G.parameters()), [1 - decay] * len(ema))


@torch.no_grad()
def fit_batch_norm(G: Generator, batches: int = 16, batch_size: int = 256) -> None:
    """Re-estimates G's batch-norm statistics for its own weights, as SWA's update_bn does: G's running statistics
    fit G's weights, not the EMA's average of them (copied, the DCGAN's FID decayed late: README)."""
    norms = [m for m in G.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    device, momenta, was_training = next(G.parameters()).device, [m.momentum for m in norms], G.training
    rng = torch.Generator(device).manual_seed(0)  # its own stream: training's RNG never moves
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over all the batches
    G.train()
    for i in range(batches if norms else 0):
        z = torch.randn(batch_size, G.latent_dim, generator=rng, device=device)
        G(z, torch.arange(i * batch_size, (i + 1) * batch_size, device=device) % NUM_CLASSES if G.num_classes else None)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    G.train(was_training)


def make_adam(params: Any, cfg: Config, lr: float, capturable: bool = False) -> torch.optim.Adam:
    params = list(params)
    kwargs: dict[str, Any] = {"lr": lr, "betas": (cfg.b1, cfg.b2)}
    if capturable:  # lr as a device tensor: a captured CUDA graph then sees the schedule change it
        kwargs.update(capturable=True, lr=torch.tensor(lr, device=params[0].device))
    try:  # one fused kernel for all parameters where the device has it
        return torch.optim.Adam(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, foreach=True, **kwargs)


def build_nets(cfg: Config, device: torch.device, capturable: bool = False) -> Nets:
    classes = NUM_CLASSES if cfg.conditional else 0
    # Convolutions run faster on channels-last weights (README, Speed); the MLP has none, so it is unchanged.
    G = Generator(cfg.latent_dim, classes, cfg.arch, cfg.clusters)
    D = Discriminator(classes or cfg.clusters, cfg.spectral_norm, cfg.arch)
    G, D = (net.to(device, memory_format=torch.channels_last) for net in (G, D))
    # The EMA is a copy, not a new Generator: a new one's init would draw from the RNG and shift training.
    ema = copy.deepcopy(G).requires_grad_(False) if cfg.ema_decay > 0 else None
    opt_g = make_adam(G.parameters(), cfg, cfg.lr, capturable)
    opt_d = make_adam(D.parameters(), cfg, cfg.d_lr or cfg.lr, capturable)
    zeros = functools.partial(torch.zeros, device=device)
    return Nets(G, D, opt_g, opt_d, ema, cfg.ema_decay, zeros(4), zeros(()), LOSSES[cfg.loss],
                use_bf16(cfg.precision, device), cfg.r1_gamma / 2 * cfg.r1_every, cfg.gp_weight)  # fmt: skip


def set_schedule(nets: Nets, cfg: Config, epoch: int) -> None:
    """This epoch's learning rates (--lr-decay), set as each epoch starts, also a resumed one: resume is exact."""
    decay = 1.0 - (epoch - 1) / cfg.epochs if cfg.lr_decay == "linear" else 1.0  # linear: 1/epochs in the last
    for opt, lr in ((nets.opt_g, cfg.lr), (nets.opt_d, cfg.d_lr or cfg.lr)):
        for group in opt.param_groups:
            if not group.get("capturable"):
                group["lr"] = lr * decay
            elif isinstance(group["lr"], Tensor) and group["lr"].device == group["params"][0].device:
                group["lr"].fill_(lr * decay)  # in place: a captured graph reads it at this address
            else:  # a float, or a tensor a checkpoint loaded to the CPU, where a graph would bake its value in
                group["lr"] = torch.tensor(lr * decay, device=group["params"][0].device)
            group["betas"] = (cfg.b1, cfg.b2)  # flags given at a resume win over the saved optimiser settings


def train_step(nets: Nets, real: Tensor, labels: Tensor | None, r1: bool = False, update_g: bool = True) -> None:
    """One GAN step: D (with R1 when `r1`), then G unless a critic-only step. No value is read back to the host."""
    G, D, batch, gp = nets.G, nets.D, real.size(0), nets.gp_weight > 0

    # (1) Update D: maximise log D(x) + log(1 - D(G(z))) (BCE; a critic: D(x) - D(G(z))). Real and fake go through
    # D as one batch: D has no batch statistics, so this is the mean of the two terms, in one pass instead of two.
    with nets.autocast():
        z = torch.randn(batch, G.latent_dim, device=real.device)
        with torch.set_grad_enabled(update_g):  # a critic-only step needs no graph through G
            fake = G(z, labels)
        d_in = torch.cat([real, fake.detach()]).requires_grad_(r1)
        d_logits = D(d_in, None if labels is None else torch.cat([labels, labels])).float()
        if gp:  # WGAN-GP's points x_hat on lines from real to fake digits: one alpha per sample, not per pixel
            alpha = torch.rand(batch, 1, 1, 1, device=real.device)
            x_hat = torch.lerp(real, fake.detach().to(real.dtype), alpha).requires_grad_(True)
            hat_logits = D(x_hat, labels).float()  # a pass of their own: the double backward then covers them only
    d_loss = d_total = nets.loss.d(d_logits)  # d_total: with the penalties below, what D steps on
    if r1:  # R1 (Mescheder et al. 2018): gamma/2 * |grad_x D(x)|^2 at real digits keeps D smooth where data is
        (grad,) = torch.autograd.grad(d_logits[:batch].sum(), d_in, create_graph=True)
        d_total = d_total + nets.r1_weight * grad[:batch].float().square().sum(dim=(1, 2, 3)).mean()
    if gp:  # Gulrajani et al. 2017: lambda * (|grad D(x_hat)| - 1)^2, the norm over all of a sample's pixels
        (grad,) = torch.autograd.grad(hat_logits.sum(), x_hat, create_graph=True)
        d_total = d_total + nets.gp_weight * (grad.float().flatten(1).norm(dim=1) - 1).square().mean()
    nets.opt_d.zero_grad(set_to_none=True)
    d_total.backward()
    nets.opt_d.step()

    # (2) Update G: maximise log D(G(z)) (BCE's non-saturating form; a critic: D(G(z))). D's weights get no gradients.
    if update_g:
        D.requires_grad_(False)
        with nets.autocast():
            g_logits = D(fake, labels).float()
        g_loss = nets.loss.g(g_logits)
        nets.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        nets.opt_g.step()
        D.requires_grad_(True)
    else:  # for the logs: G's loss against the critic as it was before this step
        g_loss = nets.loss.g(d_logits[batch:].detach())

    with torch.no_grad():
        if update_g:
            nets.update_ema()
        outputs = nets.loss.output(d_logits)
        nets.stats += torch.stack([d_loss, g_loss, outputs[:batch].mean(), outputs[batch:].mean()])


# ================================================================================== 5. the epoch loop


@dataclass
class RunState:
    """The loop's state between steps: what a checkpoint saves besides the networks, its fields typed for loading."""

    fixed_noise: Tensor  # the noise behind every sample grid, drawn once from the seed
    fixed_labels: Tensor | None  # conditional: row k of each grid is digit k
    rng: dict  # random states: "torch" and "cuda" when saved, "data" as the epoch in progress began
    cluster_ids: Tensor | None = None  # --clusters: each training digit's cluster (uint8), found once at the start
    epoch: int = 0  # epochs completed
    step: int = 0  # steps done in the next epoch (non-zero after an interruption)
    epoch_steps: int = 0
    epoch_seconds: float = 0.0
    epoch_stats: Tensor = field(default_factory=lambda: torch.zeros(4))  # Nets.stats of a part-done epoch
    history: list = field(default_factory=list)  # a row per epoch: losses.csv
    metrics: list = field(default_factory=list)  # a row per evaluation: metrics.csv
    best: dict | None = None  # {"epoch", "fid"} of the lowest-FID evaluation so far: generator_best.pt
    invocations: list = field(default_factory=list)  # what really ran, at the start and at each resume
    run_id: str = field(default_factory=lambda: os.urandom(8).hex())  # whose folder it is: never another run's

    @classmethod
    def new(cls, cfg: Config, data_rng: torch.Generator) -> RunState:
        gen = torch.Generator().manual_seed(cfg.seed)  # its own stream: it does not shift the training noise
        rows, labels = (100, torch.arange(10).repeat_interleave(10)) if cfg.conditional else (64, None)
        rng = {"torch": torch.get_rng_state(), "cuda": None, "data": data_rng.get_state()}
        return cls(torch.randn(rows, cfg.latent_dim, generator=gen), labels, rng)


@dataclass
class Run:
    """A training run in progress: config and folder, networks, the data on the device, the loop state, outputs."""

    cfg: Config
    dir: Path
    device: torch.device
    nets: Nets
    data: Tensor  # the training digits, uint8 on the device (a quarter of their size as floats)
    labels: Tensor
    data_rng: torch.Generator  # the data order
    state: RunState
    step_fn: Callable[[Tensor, Tensor | None, bool, bool], None]  # train_step, or its CUDA graphs
    fixed: tuple[Tensor, Tensor | None]  # the fixed noise and labels, on the device
    train_images: Tensor  # all training digits: the judge's cache key, the memorisation reference
    test_images: Tensor | None = None  # read at the start when the run evaluates: a bad file fails at once
    evaluator: Evaluator | None = None
    tb: Any = None  # a torch.utils.tensorboard.SummaryWriter
    last_plot: float = field(default_factory=time.monotonic)
    last_gif: float = field(default_factory=time.monotonic)

    @property
    def ckpt_dir(self) -> Path:
        return self.dir / "checkpoints"

    def log(self, scalars: dict[str, float | None], epoch: int) -> None:
        for tag, value in scalars.items():
            if self.tb is not None and value is not None:
                self.tb.add_scalar(tag, value, epoch)


def train(cfg: Config, given: set[str]) -> Result:
    """Trains a new run, or resumes one (`given`: the flags typed; the rest come from the checkpoint)."""
    with open_run(cfg, given) as run, StopSignal() as stop:  # held to the end: the last outputs always finish
        cfg = run.cfg
        if evaluation_pending(cfg, run.state):  # a stop signal cut the last evaluation short: it is done now
            evaluate_epoch(run, run.state.epoch)
            save_epoch_checkpoint(run, run.state.epoch)
        while run.state.epoch < cfg.epochs:
            epoch = run.state.epoch + 1
            if not train_epoch(run, epoch, stop):
                break  # stopped by a signal, saved mid-epoch
            record_epoch(run, epoch)
            final = epoch == cfg.epochs
            if epoch % cfg.sample_every == 0 or final:
                sample_epoch(run, epoch)
            if evaluates(cfg, epoch) and not stop.signum:  # after a signal, save and stop: no new work
                evaluate_epoch(run, epoch)
            write_logs(run, final)
            save_epoch_checkpoint(run, epoch)
        return finish_run(run, stop.signum)


def evaluates(cfg: Config, epoch: int) -> bool:
    """Whether the run evaluates after this epoch: every --eval-every epochs, and after the last one."""
    return cfg.eval_every >= 0 and (epoch == cfg.epochs or cfg.eval_every > 0 and epoch % cfg.eval_every == 0)


def evaluation_pending(cfg: Config, state: RunState) -> bool:
    """Whether the last finished epoch is due an evaluation that it has not had (a stop signal came first)."""
    done = state.epoch > 0 and state.step == 0 and evaluates(cfg, state.epoch)
    return done and not any(row["epoch"] == state.epoch for row in state.metrics)


def train_epoch(run: Run, epoch: int, stop: StopSignal) -> bool:
    """One epoch's steps from the saved step; False if a signal stopped it, the part-done epoch saved to last.pt."""
    cfg, state, nets = run.cfg, run.state, run.nets
    set_schedule(nets, cfg, epoch)
    batches = epoch_batches(len(run.data), cfg.batch_size, run.data_rng)
    started = time.perf_counter() - state.epoch_seconds
    bar = tqdm(total=len(batches), initial=state.step, desc=f"epoch {epoch}/{cfg.epochs}", unit="step",
               leave=False, disable=cfg.quiet or None, dynamic_ncols=True)  # fmt: skip
    next_refresh = time.monotonic() + 0.5
    for i in range(state.step, len(batches)):
        if stop.signum:
            break
        idx = batches[i].to(run.device, non_blocking=True)
        done = (epoch - 1) * len(batches) + i  # steps before this one: the lazy R1 and critic schedules
        r1, update_g = cfg.r1_gamma > 0 and done % cfg.r1_every == 0, done % cfg.n_critic == 0
        run.step_fn(to_model_range(run.data[idx]), run.labels[idx] if cfg.labelled else None, r1, update_g)
        state.epoch_steps += 1
        state.step = i + 1
        bar.update(1)
        if not bar.disable and time.monotonic() > next_refresh:  # the only host sync: twice a second
            d_loss, g_loss, _, _ = (nets.stats / state.epoch_steps).tolist()
            bar.set_postfix_str(f"D {d_loss:.3f} G {g_loss:.3f}", refresh=False)
            next_refresh = time.monotonic() + 0.5
    bar.close()
    state.epoch_seconds = time.perf_counter() - started
    if not stop.signum:
        return True
    check_finite((nets.stats / max(1, state.epoch_steps)).tolist(), epoch, cfg, run.ckpt_dir)
    state.epoch_stats = nets.stats.detach().cpu()
    save_checkpoint(checkpoint_dict(run), run.ckpt_dir / "last.pt")
    return False


def loss_columns(cfg: Config) -> tuple[str, ...]:
    return ("epoch", "d_loss", "g_loss", *LOSSES[cfg.loss].columns, "seconds")


def record_epoch(run: Run, epoch: int) -> None:
    """The epoch's mean losses and D outputs (one read from the device): a history row and the console line."""
    state = run.state
    means = (run.nets.stats / state.epoch_steps).tolist()
    check_finite(means, epoch, run.cfg, run.ckpt_dir)
    state.history.append(dict(zip(loss_columns(run.cfg), [epoch, *means, state.epoch_seconds])))
    d = LOSSES[run.cfg.loss].name
    tags = ("loss/D", "loss/G", f"{d}_output/real", f"{d}_output/fake", "speed/seconds_per_epoch")
    run.log(dict(zip(tags, [*means, state.epoch_seconds])), epoch)
    say(
        f"epoch {epoch:>4}/{run.cfg.epochs}  d_loss {means[0]:.4f}  g_loss {means[1]:.4f}  {d}(x) {means[2]:.3f}  "
        f"{d}(G(z)) {means[3]:.3f}  {state.epoch_seconds:.1f}s ({state.epoch_steps / state.epoch_seconds:.0f} steps/s)"
    )
    state.epoch, state.step, state.epoch_steps, state.epoch_seconds = epoch, 0, 0, 0.0
    state.rng["data"], state.epoch_stats = run.data_rng.get_state(), torch.zeros(4)  # the next epoch's order
    run.nets.stats.zero_()


# ###########################################################################################################
# Support code below: devices, starting and resuming a run, checkpoint files, evaluation, outputs, run-folder
# safety, and the commands. The GAN itself is all above.
# ###########################################################################################################


def cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def auto_threads() -> int:  # torch's threads spin-wait for each other: one busy core stalls them all (README)
    return max(1, min(4, cpus() - 1))


def resolve_device(name: str) -> torch.device:
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available() or device.type == "mps" and not mps:
        raise GanError(f"--device {name}: {device.type.upper()} is not available on this machine (use --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise GanError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 matmuls (fp32 weights and sums) where they are fast: CPUs with native bf16. CUDA has TF32 instead."""
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return precision == "bf16" if precision != "auto" else device.type == "cpu" and native


class CudaGraphStep:
    """train_step as CUDA graphs, one per kind of step, after 3 eager warm-ups; a short last batch runs eagerly."""

    def __init__(self, nets: Nets, batch_size: int, conditional: bool, device: torch.device) -> None:
        self.nets, self.batch_size, self.side_stream = nets, batch_size, torch.cuda.Stream(device)
        self.graphs: dict[tuple[bool, bool], torch.cuda.CUDAGraph] = {}
        self.warmups: dict[tuple[bool, bool], int] = {}
        self.real = torch.zeros(batch_size, *IMAGE_SHAPE, device=device)
        self.labels = torch.zeros(batch_size, dtype=torch.long, device=device) if conditional else None

    def __call__(self, real: Tensor, labels: Tensor | None, r1: bool = False, update_g: bool = True) -> None:
        if real.size(0) != self.batch_size:
            return train_step(self.nets, real, labels, r1, update_g)
        self.real.copy_(real)
        if labels is not None:
            self.labels.copy_(labels)
        kind = r1, update_g
        if kind in self.graphs:
            self.graphs[kind].replay()
        elif self.warmups.setdefault(kind, 0) < 3:
            self.warmups[kind] += 1
            self.side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side_stream):
                train_step(self.nets, self.real, self.labels, *kind)
            torch.cuda.current_stream().wait_stream(self.side_stream)
        else:  # gradients must be allocated from the graph's private pool, so they start as None
            self.nets.opt_d.zero_grad(set_to_none=True)
            self.nets.opt_g.zero_grad(set_to_none=True)
            self.graphs[kind] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graphs[kind]):
                train_step(self.nets, self.real, self.labels, *kind)
            self.graphs[kind].replay()  # capture records without running: this batch still has to be trained on


# ======================================================================== starting and resuming a run


@contextlib.contextmanager
def open_run(cfg: Config, given: set[str]) -> Iterator[Run]:
    """The run to train, its folder locked; a start that fails before saving removes exactly what it created."""
    checkpoint, run_dir = None, Path(cfg.out_dir) if cfg.out_dir else None
    if cfg.resume:  # absolute now: `--resume last.pt` from inside checkpoints/ names that run (links not followed)
        cfg = dataclasses.replace(cfg, resume=os.path.abspath(cfg.resume))
        checkpoint = load_checkpoint(cfg.resume, CHECKPOINT_FORMAT)
        cfg, run_dir = resume_config(cfg, given, checkpoint)
    elif run_dir is not None:
        check_new_run_dir(run_dir)
    device = resolve_device(cfg.device)
    before = set(os.listdir(run_dir)) if run_dir is not None and run_dir.is_dir() else None  # None: a new folder
    run_dir = run_dir or new_run_dir()
    make_folder(run_dir, f"--out-dir {run_dir}")
    run_dir = run_dir.resolve()  # absolute paths everywhere: a resume from another working directory finds all
    judge = str(Path(cfg.judge).resolve()) if cfg.judge else ""
    cfg = dataclasses.replace(cfg, out_dir=str(run_dir), data_dir=str(Path(cfg.data_dir).resolve()), judge=judge)
    try:
        with run_lock(run_dir):
            yield start_run(cfg, run_dir, device, checkpoint)
    except BaseException:
        if not holds_run(run_dir):  # a start that failed before saving anything leaves no litter
            for name in os.listdir(run_dir) if before is not None else []:
                if name not in before and name in (*RUN_OUTPUTS, LOCK):
                    shutil.rmtree(run_dir / name) if (run_dir / name).is_dir() else (run_dir / name).unlink()
            if before is None:
                shutil.rmtree(run_dir, ignore_errors=True)
        raise


def start_run(cfg: Config, run_dir: Path, device: torch.device, checkpoint: dict | None) -> Run:
    """Seeds, reads the data, builds the networks (restored on a resume) and the loop state, tidies the folder."""
    torch.set_num_threads(cfg.threads or auto_threads())
    torch.manual_seed(cfg.seed)
    torch.backends.cuda.matmul.allow_tf32 = device.type == "cuda"  # the MLP's matmuls; well inside GAN noise
    use_graph = cfg.cuda_graph and device.type == "cuda"
    if cfg.cuda_graph and not use_graph:
        print(f"note: --cuda-graph needs a CUDA device; training eagerly on {device}", file=sys.stderr)
    all_images, images, labels, test_images = read_run_data(cfg)
    nets = build_nets(cfg, device, capturable=use_graph)
    data_rng = torch.Generator().manual_seed(cfg.seed)
    state = RunState.new(cfg, data_rng) if checkpoint is None else restore(nets, checkpoint, cfg, device, data_rng)
    if cfg.clusters:
        labels = use_clusters(nets, state, images, cfg.clusters)
    nets.stats.copy_(state.epoch_stats)
    precision = "bf16" if nets.bf16 else "tf32" if device.type == "cuda" else "fp32"
    state.invocations = [*state.invocations, {
        "started": datetime.now().isoformat(timespec="seconds"), "from_epoch": state.epoch, "epochs": cfg.epochs,
        "device": str(device), "threads": torch.get_num_threads(), "precision": precision,
        "torch": str(torch.__version__), "resume": cfg.resume or None}]  # fmt: skip
    step = CudaGraphStep(nets, cfg.batch_size, cfg.labelled, device) if use_graph else None
    fixed = state.fixed_noise.to(device), None if state.fixed_labels is None else state.fixed_labels.to(device)
    run = Run(cfg, run_dir, device, nets, images.to(device), labels.to(device), data_rng, state,
              step or functools.partial(train_step, nets), fixed, all_images, test_images)  # fmt: skip
    prepare_run_folder(run, resumed=checkpoint is not None)
    resumed = f"\nresumed from {cfg.resume} at epoch {state.epoch}" + (f" step {state.step}" if state.step else "")
    steps = len(epoch_batches(len(run.data), cfg.batch_size, torch.Generator()))  # its own stream: order unmoved
    say(f"gan_mnist: training on {device} ({torch.get_num_threads()} CPU threads), {len(run.data)} images, {steps} "
        f"steps/epoch, epochs {state.epoch + 1}..{cfg.epochs} -> {run_dir}{resumed if checkpoint else ''}")  # fmt: skip
    if cfg.tensorboard:
        open_tensorboard(run)
    return run


def use_clusters(nets: Nets, state: RunState, images: Tensor, k: int) -> Tensor:
    """--clusters: each training digit's cluster (found when the run starts, then kept in its checkpoints), and the
    clusters' shares of the digits, which the generators sample by."""
    if state.cluster_ids is None:
        say(f"gan_mnist: finding {k} clusters among {len(images)} training digits (about a minute for 60,000)")
        state.cluster_ids = digit_clusters(images, k).to(torch.uint8)
    ids = state.cluster_ids.long()
    if len(ids) != len(images) or int(ids.max()) >= k:
        raise GanError(f"the checkpoint's cluster ids do not fit its {len(images)} training digits and {k} clusters")
    cdf = torch.bincount(ids, minlength=k).cumsum(0).float() / len(ids)
    for G in filter(None, (nets.G, nets.ema)):
        G.cluster_cdf.copy_(cdf)
    return ids


def read_run_data(cfg: Config) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Every file the run needs, read before the first step: a bad one fails now, not after the last epoch."""
    all_images, labels = load_mnist(cfg.data_dir, train=True)
    if cfg.subset > len(all_images):
        raise GanError(f"--subset {cfg.subset} is more than the {len(all_images)} training images")
    images, labels = (all_images[: cfg.subset], labels[: cfg.subset]) if cfg.subset else (all_images, labels)
    if cfg.clusters * 4 > len(images):
        raise GanError(f"--clusters {cfg.clusters} needs 4 training digits per cluster; there are {len(images)}")
    test_images = load_mnist(cfg.data_dir, train=False)[0] if cfg.eval_every >= 0 else None
    if cfg.eval_every >= 0 and cfg.judge:
        check_judge_path(Path(cfg.judge))
    return all_images, images, labels, test_images


def resume_config(cfg: Config, given: set[str], checkpoint: dict[str, Any]) -> tuple[Config, Path]:
    """The checkpoint's config with the flags typed (never a run-defining one), and the folder it may write."""
    known = {f.name for f in dataclasses.fields(Config)}
    saved = Config(**{k: v for k, v in checkpoint["config"].items() if k in known})
    for name in [name for name in RUN_DEFINING if name in given and getattr(cfg, name) != getattr(saved, name)]:
        was, now, flag = getattr(saved, name), getattr(cfg, name), _flag(name)
        trained = f"{'with' if was else 'without'} {flag}" if isinstance(was, bool) else f"with {flag} {was}, not {now}"
        raise GanError(f"checkpoint {cfg.resume} was trained {trained}; drop the flag to continue that run")
    merged, state = dataclasses.replace(saved, **{name: getattr(cfg, name) for name in given}), state_of(checkpoint)
    if state.epoch >= merged.epochs and not evaluation_pending(merged, state):
        raise GanError(f"checkpoint {cfg.resume} has already trained {plural(state.epoch, 'epoch')}; pass --epochs N "
                       f"with N > {state.epoch} to train further")  # fmt: skip
    resume_path = Path(cfg.resume)
    own_dir = resume_path.parent.parent if resume_path.parent.name == "checkpoints" else Path(saved.out_dir)
    if "out_dir" in given and Path(cfg.out_dir).resolve() != own_dir.resolve():
        check_new_run_dir(Path(cfg.out_dir))  # branching the run into a new folder: a run of its own from now on
        checkpoint["run_id"] = os.urandom(8).hex()
        return merged, Path(cfg.out_dir)
    branch = "pass --out-dir NEW to branch it into a new folder"
    taken = f"{own_dir} now holds another run than checkpoint {cfg.resume}; {branch}"
    with contextlib.suppress(OSError, ValueError, AttributeError):
        other = json.loads((own_dir / "config.json").read_text()).get("run_id")
        if state.run_id and other and other != state.run_id:
            raise GanError(taken)
    last = own_dir / "checkpoints" / "last.pt"
    if last.exists() and last.resolve() != resume_path.resolve():
        latest = state_of(load_checkpoint(last, CHECKPOINT_FORMAT))
        if state.run_id and latest.run_id not in ("", state.run_id):
            raise GanError(taken)
        if (latest.epoch, latest.step) > (state.epoch, state.step):
            raise GanError(f"{own_dir} has trained past this checkpoint (to epoch {latest.epoch}); resuming from it "
                           f"there would overwrite that: {branch}")  # fmt: skip
    return merged, own_dir


def load_problem(exc: Exception) -> str:
    """What load_state_dict found that does not fit: its first detail line (its first line only says that it failed)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [repr(exc)]
    return lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines[0]


def state_of(checkpoint: dict[str, Any]) -> RunState:  # the loop state saved in a checkpoint
    return RunState(**{f.name: checkpoint[f.name] for f in dataclasses.fields(RunState)})


def restore(nets: Nets, ckpt: dict[str, Any], cfg: Config, device: torch.device, data_rng: torch.Generator) -> RunState:
    """Loads the networks, optimisers and random states of a checkpoint; returns its loop state."""
    try:
        nets.G.load_state_dict(ckpt["generator"])
        nets.D.load_state_dict(ckpt["discriminator"])
        if nets.ema is not None:
            nets.ema.load_state_dict(ckpt["ema"] if ckpt["ema"] is not None else ckpt["generator"])
            nets.ema_updates.copy_(ckpt["ema_updates"])
        nets.opt_g.load_state_dict(ckpt["opt_g"])
        nets.opt_d.load_state_dict(ckpt["opt_d"])
        for opt in (nets.opt_g, nets.opt_d):  # fused Adam reads a weight and its moments as flat memory: one layout
            for p, s in opt.state.items():  # (checkpoints from before channels-last weights hold them row-major)
                s.update({k: torch.empty_like(p).copy_(v) for k, v in s.items() if v.shape == p.shape})
    except (RuntimeError, KeyError, ValueError) as exc:
        raise GanError(f"checkpoint {cfg.resume} does not fit this version's {cfg.arch} networks (saved by another "
                       f"version of gan_mnist?): {load_problem(exc)}") from None  # fmt: skip
    state = state_of(ckpt)
    torch.set_rng_state(state.rng["torch"])
    if device.type == "cuda" and state.rng["cuda"] is not None:
        torch.cuda.set_rng_state(state.rng["cuda"], device)
    data_rng.set_state(state.rng["data"])
    return state


def check_finite(means: list[float], epoch: int, cfg: Config, ckpt_dir: Path) -> None:
    if not all(math.isfinite(v) for v in means):
        kept = ckpt_dir / "last.pt"
        kept = f"the last good checkpoint {kept} is kept" if kept.exists() else "no checkpoint was written"
        raise GanError(f"training diverged in epoch {epoch} (d_loss {means[0]}, g_loss {means[1]}); {kept}; "
                       f"try a lower --lr than {cfg.lr:g}")  # fmt: skip


# ================================================================================== checkpoint files


CHECKPOINT_FORMAT, GENERATOR_FORMAT, JUDGE_FORMAT = "gan_mnist.checkpoint", "gan_mnist.generator", "gan_mnist.judge"
FORMAT_VERSION = 1
# The fields of each file format and their types, as annotations write them: a file with the right tag but a
# missing or mistyped field is refused in one line, before anything is built from it.
SCHEMAS: dict[str, dict[str, str]] = {
    CHECKPOINT_FORMAT: {"config": "dict", **{f.name: f.type for f in dataclasses.fields(RunState)}, "generator": "dict",
                        "discriminator": "dict", "ema": "dict | None", "ema_updates": "Tensor", "opt_g": "dict",
                        "opt_d": "dict"},
    GENERATOR_FORMAT: {"epoch": "int", "ema": "bool", "latent_dim": "int", "num_classes": "int", "arch": "str",
                       "clusters": "int", "state_dict": "dict"},
    JUDGE_FORMAT: {"state_dict": "dict", "sha256": "str", "test_accuracy": "float", "train_images": "int"},
    "rng": {"torch": "Tensor", "cuda": "Tensor | None", "data": "Tensor"},
}  # fmt: skip
KINDS = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "list": (list,), "dict": (dict,),
         "Tensor": (Tensor,), "None": (type(None),)}  # fmt: skip


def type_problem(obj: dict[str, Any], types: dict[str, str], what: str = "field", required: bool = True) -> str | None:
    """What is missing or of the wrong type in `obj`, given the type (as an annotation writes it) of each key."""
    for key, written in types.items():
        if key not in obj and required:
            return f"its {what} {key!r} is missing"
        allowed = tuple(kind for name in written.split("|") for kind in KINDS[name.strip()])
        if key in obj and (not isinstance(obj[key], allowed) or isinstance(obj[key], bool) and bool not in allowed):
            return f"its {what} {key!r} is {obj[key]!r:.40}, not {written}"
    return None


def schema_problem(obj: dict[str, Any]) -> str | None:
    problem = type_problem(obj, SCHEMAS[obj["format"]])
    if problem or obj["format"] == JUDGE_FORMAT:
        return problem
    if obj["format"] == GENERATOR_FORMAT:
        return first_error([
            (0 < obj["latent_dim"] <= MAX_LATENT, f"latent_dim {obj['latent_dim']} is outside 1..{MAX_LATENT}"),
            (obj["arch"] in ARCHS, f"arch {obj['arch']!r} is not one of {', '.join(ARCHS)}"),
            (obj["num_classes"] in (0, NUM_CLASSES), f"num_classes {obj['num_classes']} is not 0 or 10"),
            (obj["clusters"] in (0, *CLUSTERS), f"clusters {obj['clusters']} is outside 2..255"),
        ])  # fmt: skip
    if obj["epoch"] < 0 or obj["step"] < 0:
        return f"epoch {obj['epoch']} / step {obj['step']} is negative"
    problem = type_problem(obj["rng"], SCHEMAS["rng"], "random-number state")
    if problem or any(obj["rng"][k].dtype != torch.uint8 for k in ("torch", "data")):
        return problem or "its random-number state is not a byte tensor"
    return config_problem(obj["config"])


def config_problem(saved: dict[str, Any]) -> str | None:
    """What is wrong with a saved config: a mistyped value, a setting this version lacks, a refused value."""
    types = {f.name: f.type for f in dataclasses.fields(Config)}
    problem = type_problem(saved, types, "config value", required=False)
    unknown = [f"{k}={v!r}" for k, v in saved.items() if k not in types and v not in (0, False, "", None)]
    if not problem and unknown:  # e.g. a stabiliser removed since: resuming without it would change the maths
        problem = f"it was trained with {', '.join(unknown)}, which this version of gan_mnist does not have"
    known = {k: v for k, v in saved.items() if k in types and k != "threads"}  # threads: another machine's CPUs
    problem = problem or check_config(dataclasses.replace(Config(), **known))
    return f"its config is invalid ({problem})" if problem else None


def checkpoint_dict(run: Run) -> dict[str, Any]:
    nets, state = run.nets, run.state
    state.rng["torch"] = torch.get_rng_state()
    state.rng["cuda"] = torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None
    return {"format": CHECKPOINT_FORMAT, "version": FORMAT_VERSION, "torch_version": str(torch.__version__),
            "config": dataclasses.asdict(run.cfg), **vars(state), "generator": nets.G.state_dict(),
            "discriminator": nets.D.state_dict(), "ema": None if nets.ema is None else nets.sampler().state_dict(),
            "ema_updates": nets.ema_updates.cpu(), "opt_g": nets.opt_g.state_dict(),
            "opt_d": nets.opt_d.state_dict()}  # fmt: skip


def save_checkpoint(obj: dict[str, Any], *paths: Path) -> None:
    """Serialised once in memory, then written: a plain write reports a full disk as the OSError it is."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    for path in paths:
        atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def load_checkpoint(path: str | Path, *formats: str) -> dict[str, Any]:
    """torch.load(weights_only=True): tensors and plain containers only, so a crafted file cannot run code."""
    path = Path(path)
    if not path.is_file():
        found = "is a folder, not a file" if path.is_dir() else "is not a regular file (a device or a pipe?)"
        raise GanError(f"checkpoint not found: {path}" if not path.exists() else f"{path} {found}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if "Unsupported global" in str(exc):  # what torch's weights-only unpickler says of a code-running object
            raise GanError(f"refusing to load {path}: it holds Python objects that could run code, not just weights; "
                           "gan_mnist never loads such files") from None  # fmt: skip
        raise GanError(f"cannot read checkpoint {path}: truncated, or not a PyTorch file") from None
    if not isinstance(obj, dict) or obj.get("format") not in formats:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise GanError(f"{path} is not a {' or '.join(formats)} file (found {found!r})")
    if obj["format"] == CHECKPOINT_FORMAT:
        obj.setdefault("run_id", "")  # saved before runs had ids: its folder alone says whose it is
        obj.setdefault("cluster_ids", None)  # saved before --clusters existed
    elif obj["format"] == GENERATOR_FORMAT:
        obj.setdefault("arch", "mlp")  # saved before --arch existed
        obj.setdefault("clusters", 0)
    problem = schema_problem(obj)
    if problem:
        raise GanError(f"{path} is damaged: {problem}")
    return obj


def save_generator(path: Path, nets: Nets, epoch: int, **extra: Any) -> None:
    G = nets.sampler()
    save_checkpoint({"format": GENERATOR_FORMAT, "version": FORMAT_VERSION, "epoch": epoch, "ema": nets.ema is not None,
                     "latent_dim": G.latent_dim, "num_classes": G.num_classes, "arch": G.arch, "clusters": G.clusters,
                     "state_dict": G.state_dict(), **extra}, path)  # fmt: skip


def load_generator(path: str | Path, device: torch.device, raw: bool = False) -> tuple[Generator, dict[str, Any]]:
    """A Generator from generator.pt or a checkpoint (its EMA unless `raw`); the file's "ema" says which."""
    obj = load_checkpoint(path, GENERATOR_FORMAT, CHECKPOINT_FORMAT)
    if obj["format"] == CHECKPOINT_FORMAT:  # the networks are what its config says
        config = obj["config"]
        latent_dim, classes = config.get("latent_dim", 100), NUM_CLASSES * config.get("conditional", 0)
        arch, clusters = config.get("arch", "mlp"), config.get("clusters", 0)
        state_dict = obj["ema"] if obj["ema"] is not None and not raw else obj["generator"]
        obj["ema"] = state_dict is obj["ema"]
    else:
        latent_dim, classes, state_dict, arch = obj["latent_dim"], obj["num_classes"], obj["state_dict"], obj["arch"]
        clusters = obj["clusters"]
    G = Generator(latent_dim, classes, arch, clusters)
    try:
        G.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise GanError(f"{path}: its weights do not fit this version's {arch} generator (latent_dim {latent_dim}, "
                       f"{classes} classes; saved by another version?): {load_problem(exc)}") from None  # fmt: skip
    return G.to(device).eval(), obj


# ======================================================================================== evaluation


EVAL_CHUNK = 250  # images (or feature rows) at a time: bounds the memory evaluation adds to a run
JUDGE_FEATURES = 128  # the judge's penultimate layer: FID's feature space


class Judge(nn.Module):
    """A small MNIST classifier: its 128-d features are FID's space (MNIST-native), its softmax gives IS and modes."""

    def __init__(self) -> None:
        super().__init__()
        conv = lambda a, b: [nn.Conv2d(a, b, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]  # noqa: E731
        self.features = nn.Sequential(*conv(1, 16), *conv(16, 32), nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU())
        self.classifier = nn.Linear(JUDGE_FEATURES, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def weights_sha256(state_dict: dict[str, Tensor]) -> str:
    data = (name.encode() + t.detach().cpu().contiguous().numpy().tobytes() for name, t in state_dict.items())
    return hashlib.sha256(b"".join(data)).hexdigest()


def train_judge(data_dir: str | Path, quiet: bool = False) -> tuple[Judge, float, int]:
    """Seeded, 4 one-cycle epochs (>= 150 steps): the judge, its test accuracy, its number of training digits."""
    (images, labels), (test_images, test_labels) = load_mnist(data_dir), load_mnist(data_dir, train=False)
    x, batches = to_model_range(images), math.ceil(len(images) / 128)
    epochs = max(4, math.ceil(150 / batches))
    with torch.random.fork_rng(devices=[]):  # the judge's seed must not shift a training run's noise
        torch.manual_seed(0)
        judge = Judge()
        opt = torch.optim.Adam(judge.parameters(), lr=1e-3)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * batches)
        order = torch.Generator().manual_seed(0)
        for _ in tqdm(range(epochs), desc="training the judge network", leave=False, disable=quiet or None):
            for idx in torch.randperm(len(x), generator=order).split(128):
                check_stop()
                loss = F.cross_entropy(judge(x[idx]), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
    probs = judge_outputs(judge.eval(), test_images)[1]
    return judge, float((probs.argmax(1) == test_labels.numpy()).mean()), len(x)


def default_judge_path(train_images: Tensor) -> Path:
    """In the user's cache, keyed by the training digits: a subset's judge is never the full set's."""
    digest = hashlib.sha256(train_images.cpu().numpy().tobytes()).hexdigest()[:16]
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gan_mnist" / f"judge-{digest}.pt"


def check_judge_path(path: Path) -> None:
    """A --judge path the user named is written only if it is new or holds a judge; else a GanError, file untouched."""
    try:
        if path.exists():
            load_checkpoint(path, JUDGE_FORMAT)
    except GanError as exc:
        raise GanError(f"--judge {path}: {exc}; it is not a gan_mnist judge cache, so it is left as it is") from None
    if run_part(path.resolve()):  # a run's samples/, checkpoints/ ... hold only what training writes there
        raise GanError(f"--judge {path} is among the files of a training run; name a path outside them")


def load_or_train_judge(
    path: Path, data_dir: str | Path, quiet: bool = False, owned: bool = True
) -> tuple[Judge, dict]:
    """The judge cached at `path`, trained when missing, corrupt or tampered; a user's path written only if new."""
    if not owned:
        check_judge_path(path)
    if path.exists():
        try:
            saved = load_checkpoint(path, JUDGE_FORMAT)
            with torch.random.fork_rng(devices=[]):  # its throwaway init must not shift a training run's noise
                judge = Judge()
            judge.load_state_dict(saved["state_dict"])
            if weights_sha256(judge.state_dict()) == saved["sha256"]:
                return judge.eval(), {k: saved[k] for k in ("sha256", "test_accuracy", "train_images")}
            reason = "its weights do not match their recorded hash"
        except (GanError, RuntimeError, KeyError, TypeError, ValueError) as exc:
            reason = str(exc)
        print(f"note: retraining the judge network, the cached one is unusable: {reason}", file=sys.stderr)
    elif not quiet:
        print(f"training the judge network for evaluation once (cached at {path})", file=sys.stderr)
    judge, accuracy, num_train = train_judge(data_dir, quiet=quiet)
    info = {"sha256": weights_sha256(judge.state_dict()), "test_accuracy": accuracy, "train_images": num_train}
    if accuracy < 0.99:
        print(f"warning: the judge network reaches only {accuracy:.2%} test accuracy (< 99%): its metrics are rough",
              file=sys.stderr)  # fmt: skip
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint({"format": JUDGE_FORMAT, "version": FORMAT_VERSION, "state_dict": judge.state_dict(), **info},
                        path)  # fmt: skip
    except (GanError, OSError) as exc:  # a read-only cache costs a retrain next time, nothing more
        hint = "; pass --judge PATH to cache it elsewhere" if owned else ""
        print(f"note: the judge network is not cached ({exc}){hint}", file=sys.stderr)
    return judge, info


@torch.no_grad()
def judge_outputs(judge: Judge, images: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """float64 features (N x 128) and class probabilities of images in [-1, 1], or of uint8 MNIST digits (brought
    to [-1, 1] a chunk at a time, never all as floats)."""
    feats, probs = (torch.empty(len(images), n, dtype=torch.float64) for n in (JUDGE_FEATURES, NUM_CLASSES))
    for start in range(0, len(images), EVAL_CHUNK):  # filled in place: no second copy for a concatenation
        check_stop()
        x = images[start : start + EVAL_CHUNK]
        h = judge.features(to_model_range(x) if x.dtype == torch.uint8 else x.float().cpu())
        feats[start : start + len(h)] = h
        probs[start : start + len(h)] = F.softmax(judge.classifier(h).double(), dim=1)
    return feats.numpy(), probs.numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two feature sets (float64; scipy's matrix square root, as pytorch-fid does)."""
    import scipy.linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # a singular product is handled just below, as pytorch-fid does
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # near-singular product: regularise as pytorch-fid does
        offset = np.eye(len(s1)) * 1e-6
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(covmean)))


def distances(queries: Tensor, bank: Tensor, chunk: int = EVAL_CHUNK) -> Iterator[Tensor]:
    """Euclidean distances of each chunk of queries to the bank, in one reused buffer (freed chunks bloat the heap)."""
    bank_sq, buffer = bank.square().sum(1), torch.empty(min(chunk, len(queries)), len(bank))
    for q in queries.split(chunk):
        check_stop()
        d = torch.addmm(bank_sq, q, bank.T, alpha=-2, out=buffer[: len(q)])
        yield d.add_(q.square().sum(1, keepdim=True)).clamp_min_(0).sqrt_()


def nearest(queries: Tensor, bank: Tensor, k: int = 1, chunk: int = EVAL_CHUNK) -> tuple[Tensor, Tensor]:
    """The distances from each query row to its k nearest bank rows, and their indices."""
    found = [d.topk(k, dim=1, largest=False) for d in distances(queries, bank, chunk)]
    return torch.cat([f.values for f in found]), torch.cat([f.indices for f in found])


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019: the share of fakes in the reals' k-NN manifold, and of reals in the fakes'."""
    r, f = torch.from_numpy(real).float(), torch.from_numpy(fake).float()
    r_radii, f_radii = (nearest(x, x, k + 1)[0][:, k] for x in (r, f))  # the k-th neighbour other than itself
    inside_real = torch.cat([(d <= r_radii).any(1) for d in distances(f, r)])
    inside_fake = torch.cat([(d <= f_radii).any(1) for d in distances(r, f)])
    return inside_real.double().mean().item(), inside_fake.double().mean().item()


def sample_metrics(feats: np.ndarray, probs: np.ndarray, ref_feats: np.ndarray) -> dict[str, Any]:
    eps, p_y = 1e-12, probs.mean(0)
    inception = float(np.exp((probs * (np.log(probs + eps) - np.log(p_y + eps))).sum(1).mean()))
    hist = np.bincount(probs.argmax(1), minlength=NUM_CLASSES) / len(probs)
    nonzero = hist > 0
    enough = min(len(feats), len(ref_feats)) > 3  # k-NN radii need k + 1 = 4 points
    precision, recall = precision_recall(ref_feats, feats) if enough else (None, None)
    return {"fid": frechet_distance(feats, ref_feats), "inception_score": inception,
            "modes_covered": int((hist >= 0.02).sum()), "class_histogram": [round(float(h), 4) for h in hist],
            "kl_to_uniform": float((hist[nonzero] * np.log(hist[nonzero] * NUM_CLASSES)).sum()),
            "precision": precision, "recall": recall}  # fmt: skip


def memorisation(evaluator: Evaluator, images: Tensor, feats: np.ndarray | None = None) -> dict[str, Any]:
    """Does G copy its training digits? Nearest-training-digit distances of samples against unseen test digits'."""
    started, n, judge = time.perf_counter(), len(images), evaluator.judge
    train = to_model_range(evaluator.train_images).flatten(1)
    feats = judge_outputs(judge, images)[0] if feats is None else feats
    train_feats = torch.from_numpy(judge_outputs(judge, evaluator.train_images)[0]).float()
    out: dict[str, Any] = {}
    for space, fake, test, bank in (
        ("pixel", images.float().flatten(1), to_model_range(evaluator.test_images[:n]).flatten(1), train),
        ("feature", torch.from_numpy(feats).float(), torch.from_numpy(evaluator.test_feats[:n]).float(), train_feats),
    ):
        fake_d, test_d = nearest(fake, bank)[0][:, 0], nearest(test, bank)[0][:, 0]
        fake_m, test_m = fake_d.median().item(), test_d.median().item()
        out.update({f"{space}_nearest_median": fake_m, f"{space}_nearest_median_test": test_m,
                    f"{space}_ratio": fake_m / test_m})  # fmt: skip
        if space == "pixel":
            threshold = torch.quantile(test_d, 0.01).item()
            out.update(near_copy_threshold=threshold, near_copy_share=(fake_d < threshold).float().mean().item())
    return {**out, "num_samples": n, "num_test": len(test), "seconds": round(time.perf_counter() - started, 2)}


def nearest_picture(path: Path, images: Tensor, train_images: Tensor, rows: int = 8, k: int = 5) -> None:
    """Generated digits in the first column, their k nearest training digits (pixels) beside them."""
    queries = images[:rows].float()
    _, idx = nearest(queries.flatten(1), to_model_range(train_images).flatten(1), k=k)
    neighbours = to_model_range(train_images[idx.flatten()]).view(len(queries), k, *IMAGE_SHAPE)
    save_png(path, grid_image(torch.cat([queries[:, None], neighbours], dim=1).reshape(-1, *IMAGE_SHAPE), 1 + k, 2))


class Evaluator:
    """What evaluation needs, computed once: the judge, the test digits' features, the real-data floor."""

    def __init__(self, data_dir: str | Path, judge_path: str | Path | None, num: int, quiet: bool = False,
                 train_images: Tensor | None = None, test_images: Tensor | None = None) -> None:  # fmt: skip
        self.num = num
        self.train_images = load_mnist(data_dir, train=True)[0] if train_images is None else train_images
        path = Path(judge_path) if judge_path else default_judge_path(self.train_images)
        self.judge, self.judge_info = load_or_train_judge(path, data_dir, quiet, owned=not judge_path)
        self.test_images = load_mnist(data_dir, train=False)[0] if test_images is None else test_images
        self.test_feats = judge_outputs(self.judge, self.test_images)[0]
        # The floor takes longer than an evaluation (k-NN radii of 2 x 10,000 points): cached beside a judge in
        # gan_mnist's own cache, never beside a --judge the user named.
        self.floor = self._floor(None if judge_path else path.with_name(f"{path.stem}.floor-{num}.json"))

    def _floor(self, cache: Path | None) -> dict[str, Any]:
        numbers = dict.fromkeys(("fid", "inception_score", "kl_to_uniform", "modes_covered"), "float")
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):  # unusable: recompute
            cached = json.loads(cache.read_text())
            if cached["judge_sha256"] == self.judge_info["sha256"] and not type_problem(cached["floor"], numbers):
                return cached["floor"]
        floor = sample_metrics(*judge_outputs(self.judge, self.train_images[: self.num].cpu()), self.test_feats)
        if cache is not None:
            with contextlib.suppress(GanError):  # an unwritable cache costs the computation next time, no more
                write_json(cache, {"judge_sha256": self.judge_info["sha256"], "floor": floor})
        return floor

    @torch.no_grad()
    def sample(self, G: nn.Module, seed: int = 0) -> tuple[Tensor, Tensor | None]:
        """`num` digits of G in eval mode (equal shares per digit if conditional), and their labels."""
        device, labels = next(G.parameters()).device, torch.arange(self.num) % NUM_CLASSES if G.num_classes else None
        z = torch.randn(self.num, G.latent_dim, generator=torch.Generator().manual_seed(seed))  # never shifts training
        images, was_training = torch.empty(self.num, *IMAGE_SHAPE), G.training
        G.eval()
        try:
            for s in range(0, self.num, EVAL_CHUNK):
                y = None if labels is None else labels[s : s + EVAL_CHUNK].to(device)
                images[s : s + EVAL_CHUNK] = G(z[s : s + EVAL_CHUNK].to(device), y).float().cpu()
        finally:
            G.train(was_training)
        return images, labels

    def __call__(self, G: nn.Module, seed: int = 0) -> dict[str, Any]:
        started = time.perf_counter()
        return self.score(*self.sample(G, seed), started=started)

    def score(self, images: Tensor, labels: Tensor | None = None, memorise: bool = False,
              started: float | None = None) -> dict[str, Any]:  # fmt: skip
        """Metrics of any images in [-1, 1]: per-digit accuracy if labels are given, the memorisation check if asked."""
        started = started or time.perf_counter()
        feats, probs = judge_outputs(self.judge, images)
        metrics = sample_metrics(feats, probs, self.test_feats)
        if labels is not None:
            read = probs.argmax(1)
            metrics["digit_accuracy"] = [float((read[labels.numpy() == k] == k).mean()) for k in range(NUM_CLASSES)]
        if memorise:
            metrics["memorisation"] = memorisation(self, images, feats)
        return {**metrics, "num_samples": len(feats), "real_floor": self.floor, "judge": self.judge_info,
                "seconds": round(time.perf_counter() - started, 2)}  # fmt: skip


METRIC_COLUMNS = ("epoch", "fid", "inception_score", "modes_covered", "kl_to_uniform", "precision", "recall")
DIGIT_COLUMNS = ("digit_accuracy_min", "digit_accuracy_mean")  # conditional runs


def metrics_line(m: dict[str, Any]) -> str:
    digits = f", weakest digit read as asked {min(m['digit_accuracy']):.3f}" if "digit_accuracy" in m else ""
    return (f"FID {m['fid']:.2f} (real digits {m['real_floor']['fid']:.2f}), IS {m['inception_score']:.2f} (real "
            f"{m['real_floor']['inception_score']:.2f}), modes {m['modes_covered']}/10, KL to uniform "
            f"{m['kl_to_uniform']:.3f}, precision {m['precision']:.3f}, recall {m['recall']:.3f}{digits}")  # fmt: skip


def evaluate_epoch(run: Run, epoch: int) -> None:
    """Scores the sampler: metrics.csv/.json/.png, generator_best.pt on a new best; a stop signal defers it."""
    cfg, state = run.cfg, run.state
    try:
        if run.evaluator is None:
            run.evaluator = Evaluator(cfg.data_dir, cfg.judge, cfg.eval_num, cfg.quiet, run.train_images,
                                      run.test_images)  # fmt: skip
        metrics = run.evaluator(run.nets.sampler(), seed=cfg.seed)
    except Interrupted:
        say(f"           evaluation of epoch {epoch} stopped: it is redone when the run resumes")
        return
    row = {"epoch": epoch, **{c: metrics[c] for c in METRIC_COLUMNS[1:]}}
    if "digit_accuracy" in metrics:
        accuracy = metrics["digit_accuracy"]
        row.update(digit_accuracy_min=min(accuracy), digit_accuracy_mean=float(np.mean(accuracy)))
    state.metrics.append(row)
    if state.best is None or metrics["fid"] < state.best["fid"]:
        state.best = {"epoch": epoch, "fid": metrics["fid"]}
        save_generator(run.dir / "generator_best.pt", run.nets, epoch, fid=metrics["fid"])
    write_csv(run.dir / "metrics.csv", state.metrics, METRIC_COLUMNS + DIGIT_COLUMNS)
    write_json(run.dir / "metrics.json", {"epoch": epoch, **metrics, "best": state.best})
    # FID falls from hundreds to a few units: on a log scale the late epochs, where a run gains or decays, show.
    panels = [("FID on judge features (lower is better)", [("fid", "FID")]), ("score", [("inception_score", "IS")])]
    plot_curves(run.dir / "metrics.png", state.metrics, panels, log_y=(panels[0][0],))
    run.log({f"metrics/{k}": v for k, v in row.items() if k != "epoch"}, epoch)
    early = "  [early FIDs in the hundreds are normal: watch the trend]" if epoch <= 10 and metrics["fid"] > 50 else ""
    say(f"           {metrics_line(metrics)}  ({metrics['seconds']:.1f}s){early}")


# =========================================================================================== outputs


def write_csv(path: Path, rows: list[dict[str, float]], columns: Iterable[str]) -> None:
    """losses.csv and metrics.csv: epochs as integers, the rest to 6 significant digits."""
    columns = [c for c in columns if not rows or c in rows[0]]
    lines = [",".join(f"{r[c]:.6g}" if c != "epoch" else str(r[c]) for c in columns) for r in rows]
    atomic_write(path, lambda f: f.write(("\n".join([",".join(columns), *lines]) + "\n").encode()))


def grid_image(images: Tensor, nrow: int, scale: int = 1) -> Image.Image:
    """A grid as a PIL image, -1 black and +1 white as MNIST's digits, each digit scaled K times (no blur)."""
    import torchvision  # imported on first use: its import takes about 3 s, which --help need not wait for

    images = F.interpolate(images.float(), scale_factor=scale, mode="nearest") if scale > 1 else images.float()
    grid = torchvision.utils.make_grid(images, nrow=nrow, normalize=True, value_range=(-1, 1), padding=2 * scale)
    return Image.fromarray(grid.mul(255).add_(0.5).clamp_(0, 255).byte()[0].numpy(), mode="L")


def save_png(path: Path, image: Image.Image) -> Image.Image:
    atomic_write(path, lambda f: image.save(f, "PNG"))
    return image


def save_gif(path: Path, frames: list[Image.Image], duration: int) -> None:
    frames = [frame.convert("P") for frame in frames]
    atomic_write(path, lambda f: frames[0].save(f, "GIF", save_all=True, append_images=frames[1:], duration=duration,
                                                loop=0))  # fmt: skip


@torch.no_grad()
def save_samples(G: Generator, noise: Tensor, labels: Tensor | None, path: Path) -> Image.Image:
    """A grid of G's images for fixed noise, in eval mode: 8 x 8, or one row per digit if conditional."""
    was_training = G.training
    grid = grid_image(G.eval()(noise, labels), 10 if labels is not None else 8)
    G.train(was_training)
    return save_png(path, grid)


def sample_epoch(run: Run, epoch: int) -> None:
    """The fixed-noise grid of this epoch, to samples/ and TensorBoard."""
    grid = save_samples(run.nets.sampler(), *run.fixed, run.dir / "samples" / f"epoch_{epoch:04d}.png")
    if run.tb is not None:
        run.tb.add_image("samples/fixed_noise", np.asarray(grid), epoch, dataformats="HW")


def open_tensorboard(run: Run) -> None:
    """Event files in <run>/tensorboard; a resume purges the epochs it redoes, a new run logs its config."""
    try:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams
    except ImportError:
        raise GanError("TensorBoard logging needs the tensorboard package: pip install tensorboard "
                       "(or train with --no-tensorboard)") from None  # fmt: skip
    epoch, config, folder = run.state.epoch, dataclasses.asdict(run.cfg), run.dir / "tensorboard"
    try:
        run.tb = SummaryWriter(str(folder), purge_step=epoch + 1 if epoch else None)
    except OSError as exc:
        raise GanError(f"cannot write TensorBoard logs to {folder}: {exc.strerror or exc} (--no-tensorboard: none)"
                       ) from None  # fmt: skip
    if epoch == 0 and run.state.step == 0:
        shown = {k: v for k, v in config.items() if not k.endswith("dir") and k != "resume"}
        for summary in hparams(shown, {"metrics/fid": 0.0, "metrics/inception_score": 0.0}):
            run.tb.file_writer.add_summary(summary)
        run.tb.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)


def write_losses(run: Run, plot: bool) -> None:
    write_csv(run.dir / "losses.csv", run.state.history, loss_columns(run.cfg))
    if plot and run.state.history:
        (real, fake), d = LOSSES[run.cfg.loss].columns, LOSSES[run.cfg.loss].name
        panels = [("loss", [("d_loss", "D loss"), ("g_loss", "G loss")]),
                  (f"mean {d} output", [(real, f"{d}(x), real"), (fake, f"{d}(G(z)), fake")])]  # fmt: skip
        plot_curves(run.dir / "losses.png", run.state.history, panels)


def plot_curves(path: Path, rows: list[dict], panels: list[tuple[str, list]], log_y: tuple = ()) -> None:
    """One panel per (y label, series); the panels named in `log_y` on a log scale."""
    import matplotlib
    import matplotlib.ticker as ticker

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    marker = "o" if len(rows) < 30 else None  # points only while they can be told apart
    for ax, (ylabel, series) in zip(axes[0], panels):
        for key, label in series:
            ax.plot([r["epoch"] for r in rows], [r[key] for r in rows], marker=marker, ms=3, label=label)
        ax.set(xlabel="epoch", ylabel=ylabel, yscale="log" if ylabel in log_y else "linear")
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        if ylabel in log_y:
            ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
            ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def write_gif(run_dir: Path) -> None:
    """progress.gif of every readable sample grid; after a stop signal it waits for the next run."""
    frames = []
    with contextlib.suppress(Interrupted):
        for _, path in own_files(run_dir / "samples", "epoch_", ".png"):
            check_stop()
            with contextlib.suppress(OSError, ValueError, Image.DecompressionBombError), Image.open(path) as image:
                frames.append(image.copy())  # read now: the file closes; save_gif converts
        if frames:
            save_gif(run_dir / "progress.gif", frames, duration=150)


def write_logs(run: Run, final: bool) -> None:
    """losses.csv every epoch; the plot and the GIF at most every 10 and 30 s (they take a while), and at the end."""
    now = time.monotonic()
    plot = final or now - run.last_plot > 10
    write_losses(run, plot=plot)
    run.last_plot = now if plot else run.last_plot
    if final or now - run.last_gif > 30:
        write_gif(run.dir)
        run.last_gif = now


def save_epoch_checkpoint(run: Run, epoch: int) -> None:
    """last.pt every epoch (an epoch_NNNN.pt copy every --checkpoint-every), and generator.pt."""
    every = epoch % run.cfg.checkpoint_every == 0 or epoch == run.cfg.epochs
    periodic = [run.ckpt_dir / f"epoch_{epoch:04d}.pt"] * every
    save_checkpoint(checkpoint_dict(run), run.ckpt_dir / "last.pt", *periodic)
    if periodic:
        prune_checkpoints(run.ckpt_dir, run.cfg.keep_checkpoints)
    save_generator(run.dir / "generator.pt", run.nets, epoch)


SUMMARY_PAGE = string.Template("""<!doctype html>
<html><head><meta charset="utf-8"><title>gan_mnist run $name</title>
<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
figure{display:inline-block;margin:0 1em 1em 0;vertical-align:top} img{image-rendering:pixelated;max-width:520px}
figure img[src$$=".png"][src^="samples"],figure img[src$$=".gif"]{width:260px}
table{border-collapse:collapse;margin-bottom:1em} td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
pre{background:#f4f4f4;padding:.6em;overflow-x:auto}</style></head><body>
<h1>gan_mnist run <code>$name</code></h1><p>$status</p>
$figures
<h2>Metrics</h2><table><tr>$header</tr>$metrics</table>
<h2>Commands</h2><pre>$commands</pre>
<h2>Config</h2><table>$config</table>
</body></html>
""")


def write_summary(run: Run, status: str) -> Path:
    """summary.html: one self-contained page of the run's grids, curves, metrics, commands and config."""
    state, cfg, esc, best = run.state, run.cfg, html.escape, run.state.best
    grids = own_files(run.dir / "samples", "epoch_", ".png")
    pictures = [
        (grids[-1][1].relative_to(run.dir).as_posix() if grids else "", f"fixed-noise samples, epoch {state.epoch}"),
        (f"samples/epoch_{best['epoch']:04d}.png" if best else "", "the best FID: generator_best.pt"),
        ("progress.gif", "every epoch's grid, same noise"),
        ("losses.png", f"losses and mean {LOSSES[cfg.loss].name} outputs"),
        ("metrics.png", "FID and Inception Score"),
    ]
    figure = '<figure><img src="{0}" alt="{1}"><figcaption>{1}</figcaption></figure>'
    figures = "".join(figure.format(esc(src), esc(cap)) for src, cap in pictures if src and (run.dir / src).is_file())
    columns = [c for c in METRIC_COLUMNS if state.metrics and c in state.metrics[0]]
    rows = "".join("<tr>" + "".join(f"<td>{row[c]:.4g}</td>" for c in columns) + "</tr>" for row in state.metrics)
    more = cfg.epochs + 100 if state.epoch == cfg.epochs else cfg.epochs  # a stopped run first finishes
    generator, ckpt = run.dir / ("generator_best.pt" if best else "generator.pt"), run.dir / "generator.pt"
    commands = [
        ["python", "gan_mnist.py", "--resume", run.ckpt_dir / "last.pt", "--epochs", more],
        ["python", "gan_mnist.py", "generate", "--checkpoint", generator, "--out", "digits.png", "--scale", 2],
        ["python", "gan_mnist.py", "evaluate", "--checkpoint", ckpt, "--data-dir", cfg.data_dir],
        ["python", "gan_mnist.py", "interpolate", "--checkpoint", ckpt, "--out", "walk.gif"],
    ] + [["tensorboard", "--logdir", run.dir.parent]] * cfg.tensorboard
    line = f"{status}. Recipe {cfg.recipe} ({cfg.arch}, {cfg.loss}), seed {cfg.seed}, "
    line += f"{state.epoch} of {cfg.epochs} epochs."
    if best:
        line += f" Best FID {best['fid']:.2f} at epoch {best['epoch']} (judge reference: MNIST test digits)."
    config = "".join(f"<tr><td>{esc(k)}</td><td>{esc(str(v))}</td></tr>" for k, v in dataclasses.asdict(cfg).items())
    page = SUMMARY_PAGE.substitute(name=esc(run.dir.name), status=esc(line), figures=figures, metrics=rows,
                                   header="".join(f"<th>{c}</th>" for c in columns), config=config,
                                   commands=esc("\n".join(shell_command(c) for c in commands)))  # fmt: skip
    atomic_write(run.dir / "summary.html", lambda f: f.write(page.encode()))
    return run.dir / "summary.html"


def shell_command(words: list[Any]) -> str:
    """A command line that pastes into a shell as it is: each word quoted where it needs to be."""
    return " ".join(shlex.quote(str(w)) for w in words)


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def finish_run(run: Run, signum: int) -> Result:
    """The last plot and GIF, the summary page, and what to do next: resume after a signal, or the results."""
    state, ckpt, cfg = run.state, run.ckpt_dir / "last.pt", run.cfg
    finished, pending = state.epoch == cfg.epochs, evaluation_pending(cfg, state)
    write_losses(run, plot=True)
    write_gif(run.dir)
    if run.tb is not None:
        run.tb.close()
    status = f"finished {plural(state.epoch, 'epoch')}" if finished else f"stopped at epoch {state.epoch}"
    summary = write_summary(run, status)
    name = signal.Signals(signum).name if signum else ""
    if signum and finished and not pending:  # the signal came after the last step, while the outputs were written
        print(f"\n{name}: the run had finished all {plural(state.epoch, 'epoch')}; saved {ckpt}", file=sys.stderr)
    elif signum:
        where = f"in epoch {state.epoch}'s evaluation" if pending else f"at epoch {state.epoch + 1} step {state.step}"
        resume = shell_command(["python", "gan_mnist.py", "--resume", ckpt, "--epochs", cfg.epochs])
        print(f"\n{name}: stopped {where}; saved {ckpt}. Resume with: {resume}", file=sys.stderr, flush=True)
    else:
        say(f"done: {plural(state.epoch, 'epoch')} ({sum(row['seconds'] for row in state.history):.0f}s of training) "
            f"-> {run.dir}/ (samples/, progress.gif, losses.png, generator.pt, checkpoints/)")  # fmt: skip
        if state.best is not None:
            say(f"best: epoch {state.best['epoch']} (FID {state.best['fid']:.2f}) -> {run.dir / 'generator_best.pt'}")
        say(f"summary: {summary}")
    return Result(128 + signum if signum else 0, run.dir, state.history)


# ================================================================================= run-folder safety


class GanError(Exception):
    """A problem the user can fix: reported as one line on stderr with a non-zero exit, no traceback."""


class Interrupted(BaseException):
    """A stop signal, raised where the work can simply be redone (or abandoned, outside training)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Temporary file, fsync, rename: a crash or a full disk leaves the previous file whole, never half a file."""
    tmp, existed = path.with_name(f".{path.name}.tmp{os.getpid()}"), path.exists()
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:  # a signal too: commands turn SIGTERM into an exception, so this runs
        with contextlib.suppress(OSError):  # on a read-only folder there is nothing to remove
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            kept = "the previous version is intact" if existed else "nothing was written"
            raise GanError(f"could not write {path}: {exc.strerror or exc}; {kept}") from exc
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def make_folder(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GanError(f"cannot create {what}: {exc.strerror or exc}") from exc


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class StopSignal:
    """Training: INT, TERM, HUP set a flag the loop checks; `raising` (commands): TERM, HUP raise. SIG_IGN stays."""

    active: StopSignal | None = None  # the one the running training loop holds

    def __init__(self, raising: bool = False) -> None:
        self.signum, self.raising, self._old = 0, raising, {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.raising:
            raise Interrupted(signum)
        self.signum = self.signum or signum

    def __enter__(self) -> StopSignal:
        for sig in STOP_SIGNALS[self.raising :]:
            with contextlib.suppress(ValueError):  # signals can only be caught in the main thread
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._old[sig] = signal.signal(sig, self._handle)
        if not self.raising:
            StopSignal.active = self
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.raising:
            StopSignal.active = None
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def check_stop() -> None:
    """In a long phase of a training run: raises Interrupted once a stop signal has come."""
    if StopSignal.active is not None and StopSignal.active.signum:
        raise Interrupted(StopSignal.active.signum)


def say(line: str) -> None:
    """A line on stdout. If its reader has gone (`| head`), a training run stops as at a signal, saved; if stdout
    cannot be written (a full disk), training goes on without it and a command fails in one line."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        if StopSignal.active is None:  # not training: main() stops quietly
            raise
        StopSignal.active.signum = StopSignal.active.signum or signal.SIGPIPE
    except OSError as exc:
        if StopSignal.active is None:
            raise GanError(f"cannot write to standard output: {exc.strerror or exc}") from None
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (the rest of the run's lines go nowhere)
        print(f"note: cannot write to standard output ({exc.strerror or exc}); training goes on", file=sys.stderr)


LOCK = ".gan_mnist.lock"  # a name of its own: a user's `.lock` in the folder is never written over


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """An exclusive lock on the run folder while training; the OS drops it when the process dies (POSIX only)."""
    try:
        lock = open(run_dir / LOCK, "a+")  # noqa: SIM115 (closed by the `with` below, after the checks)
    except OSError as exc:
        raise GanError(f"cannot write to the run folder {run_dir}: {exc.strerror}") from exc
    with lock:  # closing releases the lock; the file stays, harmless
        try:
            if os.name == "posix":
                import fcntl

                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            owner = lock.read().strip() or "another process"
            raise GanError(f"{run_dir} is in use by a training run ({owner}); wait for it or choose another --out-dir"
                           ) from None  # fmt: skip
        try:
            lock.seek(0)
            lock.truncate()
            lock.write(f"pid {os.getpid()}")
            lock.flush()
        except OSError as exc:  # a full disk
            raise GanError(f"cannot write to the run folder {run_dir}: {exc.strerror or exc}") from None
        yield


def holds_run(folder: Path) -> bool:
    """A folder holds a resumable run once it has a checkpoint."""
    return (folder / "checkpoints" / "last.pt").exists()


def is_run_folder(folder: Path) -> bool:
    """A run's folder, resumable or not: users delete checkpoints/ to free the disk and keep the rest."""
    if holds_run(folder):
        return True
    with contextlib.suppress(OSError, ValueError):
        config = json.loads((folder / "config.json").read_text())
        return isinstance(config, dict) and "run_id" in config
    return False


def run_part(path: Path) -> Path | None:
    """The output of a run folder (samples/, losses.png ...) that the absolute `path` is or lies inside, if any."""
    return next((p for p in (path, *path.parents) if p.name in RUN_OUTPUTS and is_run_folder(p.parent)), None)


# Every name gan_mnist writes in a run folder. A new run starts only where none of them exists, so it never
# writes over results (a finished run whose checkpoints were deleted, `--out-dir .` in a project folder).
RUN_OUTPUTS = ("config.json", "losses.csv", "losses.png", "metrics.csv", "metrics.json", "metrics.png",
               "progress.gif", "generator.pt", "generator_best.pt", "samples", "checkpoints", "tensorboard",
               "summary.html")  # fmt: skip


def check_new_run_dir(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise GanError(f"--out-dir {folder} is a file, not a folder")
    if part := run_part(folder.resolve()):  # e.g. run/samples, or a link to it: among a run's own files
        raise GanError(f"--out-dir {folder} is inside {part.name}/ of the run {part.parent}; choose another folder")
    if holds_run(folder):
        last = folder / "checkpoints" / "last.pt"
        raise GanError(f"{folder} already holds a run; resume it with --resume {shlex.quote(str(last))}, or choose "
                       "another --out-dir")  # fmt: skip
    found = [name for name in RUN_OUTPUTS if (folder / name).exists()]
    if found:
        raise GanError(f"{folder} already holds results of gan_mnist ({', '.join(found[:4])}); choose another "
                       "--out-dir (a new run starts only in a folder without gan_mnist's outputs)")  # fmt: skip


def new_run_dir() -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    if part := run_part(Path("outputs").resolve()):  # run from inside a run's samples/: its outputs/ would be there
        raise GanError(f"outputs/ here would be inside {part.name}/ of the run {part.parent}; pass --out-dir DIR")
    make_folder(Path("outputs"), "the folder outputs/")
    for n in range(1, 1000):
        candidate = Path("outputs") / (f"run-{stamp}" if n == 1 else f"run-{stamp}-{n}")
        try:
            candidate.mkdir()  # exist_ok=False: two starts never share a folder
            return candidate
        except FileExistsError:
            continue
        except OSError as exc:
            raise GanError(f"cannot create {candidate}: {exc.strerror}") from exc
    raise GanError("cannot find a free folder name under outputs/")


def prepare_run_folder(run: Run, resumed: bool) -> None:
    """Sub-folders, stale temporaries gone, config.json; on a resume, outputs cut back to the checkpoint."""
    for folder in (run.ckpt_dir, run.dir / "samples"):
        if folder.is_symlink():  # pruning there would delete files outside the run
            raise GanError(f"{folder} is a link; gan_mnist keeps a run's files in real folders inside the run folder")
        make_folder(folder, f"the folder {folder}")
    for tmp in [p for folder in (run.dir, run.ckpt_dir, run.dir / "samples") for p in folder.glob(".*.tmp*")]:
        name = m.group(1) if (m := re.fullmatch(r"\.(.+)\.tmp\d+", tmp.name)) else ""  # of a writer killed mid-write
        if name in RUN_OUTPUTS or re.fullmatch(r"(epoch_\d{4,}|last)\.(pt|png)", name):  # gan_mnist's own names only
            tmp.unlink(missing_ok=True)
    config = {**dataclasses.asdict(run.cfg), "run_id": run.state.run_id, "invocations": run.state.invocations}
    write_json(run.dir / "config.json", config)
    if resumed:
        write_losses(run, plot=False)
        for epoch, png in own_files(run.dir / "samples", "epoch_", ".png"):
            if epoch > run.state.epoch:
                png.unlink()
        if run.state.metrics:
            write_csv(run.dir / "metrics.csv", run.state.metrics, METRIC_COLUMNS + DIGIT_COLUMNS)


def own_files(folder: Path, prefix: str, suffix: str) -> list[tuple[int, Path]]:
    """gan_mnist's numbered files (prefix + 4+ digits + suffix, nothing else), by number: never a user's copy."""
    pattern = re.compile(re.escape(prefix) + r"(\d{4,})" + re.escape(suffix))
    return sorted((int(m.group(1)), p) for p in folder.glob(f"{prefix}*{suffix}") if (m := pattern.fullmatch(p.name)))


def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    for _, old in own_files(ckpt_dir, "epoch_", ".pt")[:-keep] if keep else []:
        old.unlink()


MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")  # fmt: skip


def load_mnist(data_dir: str | Path, train: bool = True) -> tuple[Tensor, Tensor]:
    """MNIST through torchvision: (uint8 images N x 28 x 28, int64 labels N). Downloads when absent."""
    from torchvision.datasets import mnist

    root, raw = Path(data_dir), Path(data_dir) / "MNIST" / "raw"
    if root.exists() and not root.is_dir():
        raise GanError(f"--data-dir {root} is a file, not a folder")
    if not all((raw / name).is_file() for name in MNIST_FILES):
        new_folders = [d for d in (raw, raw.parent, root) if not d.exists()]
        try:  # torchvision prints each failed mirror; the one line below says it all
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                mnist.MNIST(root, train=train, download=True)
        except Exception as exc:
            for folder in new_folders:  # a failed download leaves no empty folders behind
                with contextlib.suppress(OSError):
                    folder.rmdir()
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1].strip(" <>")
            raise GanError(f"MNIST is not in {raw} (--data-dir {root}) and could not be downloaded ({reason}); put the "
                           f"four files {', '.join(MNIST_FILES)} (or their .gz) in {raw}, e.g. from https://ossci-"
                           "datasets.s3.amazonaws.com/mnist/, or pass --data-dir DIR where DIR/MNIST/raw holds them"
                           ) from exc  # fmt: skip
    tensors = []
    for name in MNIST_FILES[:2] if train else MNIST_FILES[2:]:  # what torchvision's MNIST reads, file by file
        try:
            tensors.append(mnist.read_sn3_pascalvincent_tensor(str(raw / name)))
        except Exception as exc:
            raise GanError(f"corrupt MNIST file {raw / name}: truncated or not an IDX file") from exc
    images, labels = tensors[0], tensors[1].long()
    if images.shape[1:] != (28, 28) or len(images) != len(labels) or labels.min() < 0 or labels.max() >= 10:
        raise GanError(f"corrupt MNIST files in {raw}: images {tuple(images.shape)}, labels {tuple(labels.shape)}")
    return images, labels


# ========================================================================================== commands


@dataclass
class Result:
    """What a command returns to a caller of main(): exit code, run folder, per-epoch history, metrics."""

    exit_code: int
    out_dir: Path | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, Any] | None = None


MAX_SEED = 2**63 - 1  # torch.manual_seed takes a signed 64-bit integer
MAX_LATENT = 4096  # z's size, trained and loaded alike: a generator.pt trained is one that loads
MAX_EVAL_NUM = 50_000  # digits per evaluation: images and features stay under about 250 MB
MAX_GRID = 10_000  # digits in one .png grid or one folder
MAX_NPY = 10_000_000  # digits in one .npy (7.8 GB on disk; written in chunks, memory stays small)
MAX_PIXELS = 40_000_000  # in one picture, or all frames of a GIF: about 650 MB while it is drawn
GENERATE_CHUNK = 10_000


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _device_arg(text: str) -> str:
    with contextlib.suppress(RuntimeError):
        if text == "auto" or torch.device(text).type in ("cpu", "cuda", "mps"):
            return text
    raise argparse.ArgumentTypeError(f"unknown device {text!r} (auto, cpu, cuda, cuda:N, mps)")


def _seed_arg(text: str) -> int:
    if not re.fullmatch(r"\d+", text.strip()) or int(text) > MAX_SEED:
        raise argparse.ArgumentTypeError(f"--seed must be in 0..{MAX_SEED}")
    return int(text)


def first_error(rules: list[tuple[bool, str]]) -> str | None:
    return next((message for ok, message in rules if not ok), None)


def build_train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gan_mnist.py", description="Train a GAN on MNIST. Other commands: "
                                     "generate, evaluate, interpolate (see gan_mnist.py generate --help).")  # fmt: skip
    for f in dataclasses.fields(Config):
        help_text = f.metadata["help"] + ("" if "default" in f.metadata["help"] else f" (default: {f.default!r})")
        kind = _device_arg if f.name == "device" else {"int": int, "float": float, "str": str}.get(f.type)
        typed = {"type": kind, "metavar": f.metadata.get("metavar")} if kind else {}  # a bool on by default: --no-X
        action = "store" if kind else argparse.BooleanOptionalAction if f.default else "store_true"
        # SUPPRESS keeps the flags not typed out of the namespace: a resume takes those from the checkpoint.
        parser.add_argument(_flag(f.name), action=action, default=argparse.SUPPRESS, help=help_text, **typed)
    return parser


def check_config(cfg: Config) -> str | None:
    """What is wrong with a configuration, from the command line or a file; None if nothing."""
    positive = ("epochs", "batch_size", "r1_every", "sample_every", "checkpoint_every", "n_critic")
    return first_error([(getattr(cfg, name) > 0, f"{_flag(name)} must be a positive integer") for name in positive] + [
        (cfg.lr > 0 and math.isfinite(cfg.lr), "--lr must be a positive number"),
        (0 <= cfg.b1 < 1 and 0 <= cfg.b2 < 1, "--b1 and --b2 must be in [0, 1)"),
        (0 <= cfg.ema_decay < 1, "--ema-decay must be in [0, 1)"),
        (cfg.subset == 0 or cfg.subset >= cfg.batch_size, f"--subset must be 0 or >= --batch-size {cfg.batch_size}"),
        (cfg.arch != "dcgan" or cfg.batch_size > 1, "--arch dcgan needs --batch-size 2 or more (G's batch norm)"),
        (0 <= cfg.threads <= cpus(), f"--threads must be 0 (auto) to {cpus()}, the CPUs this process may use"),
        (0 <= cfg.seed <= MAX_SEED, f"--seed must be in 0..{MAX_SEED}"),
        (1 <= cfg.latent_dim <= MAX_LATENT, f"--latent-dim must be 1 to {MAX_LATENT}"),
        (cfg.clusters in (0, *CLUSTERS), f"--clusters must be 0 (off) or {CLUSTERS[0]} to {CLUSTERS[-1]}"),
        (not (cfg.clusters and cfg.conditional), "--clusters stands in for the digit labels of --conditional: use one"),
        (cfg.keep_checkpoints >= 0, "--keep-checkpoints must be >= 0"),
        (cfg.eval_every >= -1, "--eval-every must be a positive integer, 0 or -1"),
        (10 <= cfg.eval_num <= MAX_EVAL_NUM, f"--eval-num must be 10 to {MAX_EVAL_NUM}"),
        (cfg.precision in ("auto", "fp32", "bf16"), "--precision must be auto, fp32 or bf16"),
        (cfg.recipe in RECIPES, f"--recipe must be one of {', '.join(RECIPES)}"),
        (cfg.arch in ARCHS, f"--arch must be one of {', '.join(ARCHS)}"),
        (cfg.loss in LOSSES, f"--loss must be one of {', '.join(LOSSES)}"),
        (cfg.recipe != "tutorial" or (cfg.arch, cfg.loss) == ("mlp", "bce"),
         "--recipe tutorial is the blog's MLP with BCE: drop --arch/--loss, or --recipe"),
        (0 <= cfg.gp_weight < math.inf, "--gp-weight must be >= 0"),
        (0 <= cfg.r1_gamma < math.inf and 0 <= cfg.d_lr < math.inf, "--r1-gamma and --d-lr must be >= 0"),
        (cfg.lr_decay in ("none", "linear"), "--lr-decay must be none or linear"),
    ])  # fmt: skip


def command_parser(name: str, description: str, out_help: str) -> argparse.ArgumentParser:
    """The flags every command besides training shares."""
    p = argparse.ArgumentParser(prog=f"gan_mnist.py {name}", description=description)
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="generator.pt or a checkpoint .pt")
    p.add_argument("--out", required=name != "evaluate", default="", metavar="FILE", help=out_help)
    p.add_argument("--seed", type=_seed_arg, default=0, help="noise seed (default: 0)")
    p.add_argument("--device", type=_device_arg, default="auto", help="default: auto")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return p


def check_output(path: Path, inputs: Iterable[str], named: bool = True, file: bool = True) -> None:
    """Before the work: a command writes over none of its inputs, nor a `named` path over a run's files or into its
    samples/ ...; and a `file` is not a folder."""
    where = path.resolve()
    if where in {Path(p).resolve() for p in inputs if p} or named and run_part(where):
        raise GanError(f"{path} is an input or a file of a training run; name a new file")
    if file and path.is_dir():
        raise GanError(f"{path} is a folder; name a file to write")


def command_generator(args: argparse.Namespace, raw: bool = False) -> tuple[Generator, dict[str, Any], torch.device]:
    """The commands' prologue: the device, the CPU threads, the generator of --checkpoint."""
    device = resolve_device(args.device)
    torch.set_num_threads(auto_threads())
    return *load_generator(args.checkpoint, device, raw=raw), device


def generate_args(argv: list[str]) -> argparse.Namespace:
    out_help = "FILE.png: a grid image; FILE.npy: uint8 N x 28 x 28; DIR/: one digit_NNNNN.png per digit"
    p = command_parser("generate", "Draw digits from a trained generator.", out_help)
    p.add_argument("--num", type=int, default=64, help="how many digits (default: 64)")
    p.add_argument("--digit", default=None, help="conditional models: 0-9, or 'all' for one row per digit")
    p.add_argument("--scale", type=int, default=1, help="enlarge each digit K times, nearest neighbour (default: 1)")
    args = p.parse_args(argv)
    args.to_folder = args.out.endswith(("/", os.sep)) or bool(args.out) and Path(args.out).is_dir()  # a PNG per digit
    kind = "folder" if args.to_folder else Path(args.out).suffix.lower()
    limit = MAX_NPY if kind == ".npy" else MAX_GRID
    error = first_error([
        (kind in ("folder", ".png", ".npy"), f"--out {args.out!r}: name a .png or .npy file, or a folder (ending /)"),
        (1 <= args.scale <= 32, "--scale must be 1 to 32"),
        (0 < args.num <= limit, f"--num must be 1 to {limit} for a {kind if kind == 'folder' else kind + ' file'}"),
        (kind != ".png" or args.num * (30 * args.scale) ** 2 <= MAX_PIXELS,
         f"--num {args.num} at --scale {args.scale} is a picture of over {MAX_PIXELS // 10**6} million pixels"),
    ])  # fmt: skip
    return p.error(error) if error else args


def generate(args: argparse.Namespace) -> Result:
    out, digit, labels, nrow = Path(args.out), args.digit, None, max(1, int(math.sqrt(args.num)))
    check_output(out, [args.checkpoint], file=not args.to_folder)
    if args.to_folder and out.is_dir() and any(out.iterdir()):
        raise GanError(f"--out {out} already holds files; give a new or empty folder for one file per digit")
    G, _, device = command_generator(args)
    torch.manual_seed(args.seed)
    if digit is not None and not G.num_classes:
        raise GanError(f"--digit needs a conditional generator; {args.checkpoint} is unconditional")
    if G.num_classes and digit in (None, "all"):  # a conditional model draws one row per digit unless asked for one
        nrow = math.ceil(args.num / 10)
        if nrow * 10 != args.num:
            say(f"note: {plural(nrow, 'digit')} of each kind, {nrow * 10} in all (one row per digit)")
        labels = torch.arange(10).repeat_interleave(nrow)
    elif digit is not None and digit not in tuple("0123456789"):  # not isdigit(): it takes '²', which int() refuses
        raise GanError(f"--digit {digit}: choose a digit 0-9 or 'all'")
    elif digit is not None:
        labels = torch.full((args.num,), int(digit))
    num = len(labels) if labels is not None else args.num

    @torch.no_grad()
    def draw(start: int, count: int) -> Tensor:
        z = torch.randn(count, G.latent_dim).to(device)
        return G(z, None if labels is None else labels[start : start + count].to(device))

    def write_npy(f: IO[bytes]) -> None:  # streamed in chunks: a million digits need no more memory than 10,000
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (num, 28, 28)})
        for start in range(0, num, GENERATE_CHUNK):
            f.write(to_uint8(draw(start, min(GENERATE_CHUNK, num - start))).numpy().tobytes())

    make_folder(out if args.to_folder else out.parent, f"the folder of --out {out}")
    if args.to_folder:
        for i, image in enumerate(draw(0, num)):
            name = f"digit_{i:05d}" + ("" if labels is None else f"_{int(labels[i])}") + ".png"
            save_png(out / name, grid_image(image[None], 1, args.scale))
    elif out.suffix.lower() == ".npy":
        atomic_write(out, write_npy)
    else:
        save_png(out, grid_image(draw(0, num), nrow, args.scale))
    files = f" (digit_00000.png ... digit_{num - 1:05d}*.png)" if args.to_folder else ""
    say(f"wrote {plural(num, 'digit')} to {out}{files}")
    return Result(0, out.parent)


def evaluate_args(argv: list[str]) -> argparse.Namespace:
    p = command_parser("evaluate", "Score a generator with an MNIST judge network: prints a summary and writes every "
                       "metric to CHECKPOINT.eval.json beside it (generator.pt -> generator.eval.json).",
                       "metrics file (default: CHECKPOINT with .eval.json)")  # fmt: skip
    p.add_argument("--num", type=int, default=10000, help="generated digits to score (default: 10000)")
    p.add_argument("--data-dir", default="./data", help="folder holding MNIST/raw/ (default: ./data)")
    p.add_argument("--judge", default="", metavar="PATH", help=Config.__dataclass_fields__["judge"].metadata["help"])
    p.add_argument("--raw", action="store_true", help="score the raw generator of a checkpoint, not its EMA")
    p.add_argument("--json", action="store_true", help="print the full metrics as one JSON line")
    p.add_argument("--nearest", default="", metavar="FILE.png", help="samples beside their nearest training digits")
    args = p.parse_args(argv)
    error = first_error([
        (10 <= args.num <= MAX_EVAL_NUM, f"--num must be 10 to {MAX_EVAL_NUM}"),  # as --eval-num: FID needs a sample
        (not args.nearest or args.nearest.lower().endswith(".png"), "--nearest must name a .png file"),
        (not args.out or args.out.lower().endswith(".json"), "--out must name a .json file"),
    ])  # fmt: skip
    return p.error(error) if error else args


def evaluate_command(args: argparse.Namespace) -> Result:
    # Beside the checkpoint, named after it (in checkpoints/ too): never the run's own metrics.json.
    out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix(".eval.json")
    for path in (out, *([Path(args.nearest)] if args.nearest else [])):  # outputs checked before the work
        check_output(path, (args.checkpoint, args.judge, args.data_dir), named=bool(args.out) or path is not out)
        make_folder(path.parent, f"the folder of {path}")
    G, obj, _ = command_generator(args, raw=args.raw)  # a bad checkpoint fails before any work
    evaluator = Evaluator(args.data_dir, args.judge, args.num)
    images, labels = evaluator.sample(G, seed=args.seed)
    weights = "ema" if obj["ema"] else "raw"
    metrics = {"checkpoint": str(args.checkpoint), "epoch": obj.get("epoch"), "weights": weights,
               **evaluator.score(images, labels, memorise=True)}  # fmt: skip
    m = metrics["memorisation"]
    try:  # the summary first: a failed write never hides what was measured; nor an unwritable stdout the file
        say(json.dumps(metrics) if args.json else f"{args.checkpoint} (epoch {metrics['epoch']}, {weights} weights), "
            f"{len(images)} digits: {metrics_line(metrics)}\nmemorisation: nearest training digit "
            f"{m['pixel_nearest_median']:.2f} px-distance (median) for samples vs {m['pixel_nearest_median_test']:.2f} "
            f"for unseen test digits (ratio {m['pixel_ratio']:.2f}; judge features {m['feature_ratio']:.2f}); "
            f"near-copies {m['near_copy_share']:.1%} (test digits: 1% by construction)")  # fmt: skip
    finally:
        write_json(out, metrics)
    if args.nearest:
        nearest_picture(Path(args.nearest), images, evaluator.train_images)
    if not args.json:
        say(f"wrote all metrics to {out}" + (f", nearest training digits to {args.nearest}" if args.nearest else ""))
    return Result(0, out.parent, metrics=metrics)


def interpolate_args(argv: list[str]) -> argparse.Namespace:
    p = command_parser("interpolate", "Walk smoothly through the generator's noise space (spherical interpolation "
                       "between seeded random points): a GIF of several walks side by side, or a PNG of one walk per "
                       "row. For a conditional generator, --digits morphs through digits with the noise held fixed.",
                       "walk.gif (animated) or walk.png (one walk per row)")  # fmt: skip
    p.add_argument("--paths", type=int, default=8, help="walks side by side / rows (default: 8)")
    p.add_argument("--points", type=int, default=0, help="random points each walk passes (default: 4 GIF, 2 PNG)")
    p.add_argument("--frames", type=int, default=0, help="GIF frames / PNG columns (default: 48 GIF, 10 PNG)")
    p.add_argument("--digits", default=None, help="conditional models: digits to morph through, e.g. 0123456789")
    p.add_argument("--scale", type=int, default=0, help="enlarge each digit K times (default: 2 GIF, 1 PNG)")
    args = p.parse_args(argv)
    error = first_error([
        (Path(args.out).suffix.lower() in (".gif", ".png"), "--out must end in .gif or .png"),
        (1 <= args.paths <= 100, "--paths must be 1 to 100"),
        (args.frames == 0 or 2 <= args.frames <= 1000, "--frames must be 2 to 1000"),
        (args.points == 0 or 2 <= args.points <= 100, "--points must be 2 to 100"),
        (0 <= args.scale <= 32, "--scale must be 1 to 32"),
        (args.digits is None or len(args.digits) >= 2 and set(args.digits) <= set("0123456789"),
         "--digits must be two or more of 0-9, e.g. 0123456789"),
    ])  # fmt: skip
    if error:
        p.error(error)
    gif = args.gif = Path(args.out).suffix.lower() == ".gif"  # the defaults depend on it
    steps = (len(args.digits or "") - 1 + gif) * (12 if gif else 3) + (not gif)  # 12 GIF frames per digit, 3 columns
    args.frames = args.frames or (steps if args.digits else 48 if gif else 10)
    args.points, args.scale = args.points or (4 if gif else 2), args.scale or (2 if gif else 1)
    if args.frames * args.paths * (30 * args.scale) ** 2 > MAX_PIXELS:  # frames and --digits both add frames
        p.error(f"{args.frames} frames of {plural(args.paths, 'walk')} at --scale {args.scale} are over "
                f"{MAX_PIXELS // 10**6} million pixels; ask for fewer")  # fmt: skip
    return args


def slerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """Spherical interpolation of a to b (T x N x d) at fractions t (T): a straight line passes low-norm noise."""
    omega = torch.acos(F.cosine_similarity(a, b, dim=-1).clamp(-1, 1))[..., None]
    t, sin = t[:, None, None], torch.sin(omega).clamp_min(1e-6)
    return torch.sin((1 - t) * omega) / sin * a + torch.sin(t * omega) / sin * b


@torch.no_grad()
def walk(args: argparse.Namespace, G: Generator, device: torch.device) -> Tensor:
    """frames x paths x 1 x 28 x 28 images along the walks: through --digits, or through random points."""
    rng, points = torch.Generator().manual_seed(args.seed), len(args.digits) if args.digits else args.points
    segments = points if args.gif else points - 1  # a GIF loops back to where it started
    position = torch.linspace(0, segments, args.frames + args.gif)[: args.frames]  # each frame's place on the walk
    segment = position.floor().long().clamp(max=segments - 1)
    t, after = (position - segment).to(device), (segment + 1) % points
    if args.digits:  # z held fixed per walk; the label embedding moves from digit to digit
        z = torch.randn(args.paths, G.latent_dim, generator=rng).to(device)
        waypoints = G.label_embedding(torch.tensor([int(d) for d in args.digits], device=device))
        vectors = torch.lerp(waypoints[segment], waypoints[after], t[:, None])
        return torch.stack([G.decode(z, v.expand(args.paths, -1)) for v in vectors])
    waypoints = torch.randn(args.points, args.paths, G.latent_dim, generator=rng).to(device)
    labels = (torch.arange(args.paths, device=device) % NUM_CLASSES) if G.num_classes else None
    return torch.stack([G(zf, labels) for zf in slerp(waypoints[segment], waypoints[after], t)])


def interpolate(args: argparse.Namespace) -> Result:
    out = Path(args.out)
    check_output(out, [args.checkpoint])
    G, _, device = command_generator(args)
    if args.digits and not G.num_classes:
        raise GanError(f"--digits needs a conditional generator; {args.checkpoint} is unconditional")
    images = walk(args, G, device)
    make_folder(out.parent, f"the folder of --out {out}")
    if args.gif:
        save_gif(out, [grid_image(frame, math.ceil(math.sqrt(args.paths)), args.scale) for frame in images], 80)
    else:  # one walk per row
        save_png(out, grid_image(images.transpose(0, 1).reshape(-1, *IMAGE_SHAPE), args.frames, args.scale))
    say(f"wrote {plural(args.paths, 'walk')} of {args.frames} frames to {out}")
    return Result(0, out.parent)


def out_of_memory(exc: BaseException) -> str:
    """What to say of an allocation that failed (CPU allocators raise a RuntimeError that says so); "" if none did."""
    if not isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)) and "can't allocate memory" not in str(exc):
        return ""
    size = m.group(1) if (m := re.search(r"(?i)tried to allocate ([\d.]+ ?\w+)", str(exc))) else "more than there is"
    return f"out of memory (tried to allocate {size}); a smaller --batch-size, --eval-num or --num needs less"


# Each command besides training: what reads (and checks) its arguments, and what runs it.
COMMANDS = {"generate": (generate_args, generate), "evaluate": (evaluate_args, evaluate_command),
            "interpolate": (interpolate_args, interpolate)}  # fmt: skip


def main(argv: list[str] | None = None) -> Result:
    """Entry point: `main(["--epochs", "2"])` trains, `main(["generate", ...])` samples; returns a Result."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        parse, command = COMMANDS[argv[0]]
        args = parse(argv[1:])
        run, debug = functools.partial(command, args), args.debug
    else:
        parser = build_train_parser()
        namespace = vars(parser.parse_args(argv))
        cfg = recipe_config(namespace)
        if check_config(cfg):
            parser.error(check_config(cfg))
        run, debug = functools.partial(train, cfg, set(namespace)), cfg.debug
    with StopSignal(raising=True):  # SIGTERM and SIGHUP end a command as Ctrl-C does: a write removes its temporary
        try:
            return run()
        except (GanError, KeyboardInterrupt, Interrupted, MemoryError, RuntimeError) as exc:  # a stop outside training
            if isinstance(exc, RuntimeError) and not out_of_memory(exc):  # a bug: its traceback is what helps
                raise
            if debug:
                traceback.print_exc()
            stopped = isinstance(exc, (KeyboardInterrupt, Interrupted))  # Ctrl-C, or a signal outside training
            code = 128 + getattr(exc, "signum", signal.SIGINT) if stopped else 1
            print(f"gan_mnist: error: {out_of_memory(exc) or exc}" if code == 1 else "gan_mnist: interrupted",
                  file=sys.stderr, flush=True)  # fmt: skip
            return Result(code)
        except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, as shell tools do
            return Result(128 + signal.SIGPIPE)


if __name__ == "__main__":
    sys.exit(main().exit_code)
