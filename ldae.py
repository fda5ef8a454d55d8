"""LDAE: Latent Diffusion Autoencoders for 3D brain MRI, every network and all the diffusion math.

Reads top to bottom: building blocks, AutoencoderKL, Discriminator, UNet (with the gradient-estimator
branch), SemanticEncoder, Diffusion (schedule, losses, DDIM), metrics shared by training and evaluation,
then the named presets. "METHOD n" points to a section of METHOD.md, which holds the equations.
"""
import csv
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ----------------------------------------------------------------------------------------------------
# Building blocks (all 3D; every axis is down- and up-sampled alike)


def float32_region(device):
    """Autocast off, for what must stay float32 under mixed precision. The meta device (FLOP counting) has no
    autocast: nothing to turn off there."""
    return nullcontext() if device.type == "meta" else torch.autocast(device.type, enabled=False)


def group_norm(channels):
    return nn.GroupNorm(math.gcd(32, channels), channels)


class Conv3d(nn.Conv3d):
    """nn.Conv3d that always takes oneDNN for float32 on the CPU. PyTorch's size heuristic sends batch-1
    volumes with few channels x slices to a naive kernel (the UNet on a cpu-preset latent, the deeper
    autoencoder levels): one cpu-preset UNet call took 0.38 s there and 0.20 s on oneDNN (one thread)."""

    def _conv_forward(self, x, weight, bias):
        if (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
                and not torch.is_autocast_enabled("cpu")):
            return torch.mkldnn_convolution(x, weight, bias, self.padding, self.stride, self.dilation, self.groups)
        return super()._conv_forward(x, weight, bias)


def conv3(cin, cout, stride=1):
    return Conv3d(cin, cout, 3, stride=stride, padding=1)


def zero_init(module):
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a 1x1 shortcut. Each conditioning vector adds one AdaGN
    modulation after the second norm, h = h * (1 + scale) + shift, applied in order (METHOD 3, 4)."""

    def __init__(self, cin, cout, cond_dims=(), dropout=0.0, zero_last=False):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), conv3(cin, cout)
        self.cond = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * cout)) for d in cond_dims)
        self.norm2, self.dropout, self.conv2 = group_norm(cout), nn.Dropout(dropout), conv3(cout, cout)
        if zero_last:  # the block starts as the identity (guided-diffusion's habit)
            zero_init(self.conv2)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, conds=()):
        # In place where autograd allows: every fresh full-resolution activation costs page faults on the CPU
        # (the paper encoder's first SiLU took 150 ms fresh, 37 ms in place). SiLU's backward needs its input.
        inplace = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        h = self.norm2(h)
        for project, c in zip(self.cond, conds):
            scale, shift = project(c)[:, :, None, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h, inplace=inplace)))
        return h.add_(self.skip(x))


class Attention(nn.Module):
    """Multi-head self-attention over every voxel of a feature map, with a residual connection."""

    def __init__(self, channels, heads=1):
        super().__init__()
        self.heads = heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv3d(channels, 3 * channels, 1)
        self.out = zero_init(nn.Conv3d(channels, channels, 1))

    def forward(self, x, conds=()):
        B, C = x.shape[:2]
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, -1)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, voxels, C / heads)
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(h.transpose(-1, -2).reshape(x.shape))


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = conv3(channels, channels, stride=2)

    def forward(self, x, conds=()):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels, out_channels=None):
        super().__init__()
        self.conv = conv3(channels, out_channels or channels)

    def forward(self, x, conds=()):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def timestep_embedding(t, dim):
    """Sinusoidal embedding of integer timesteps t (B,) -> (B, dim), as in the Transformer."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def run_blocks(blocks, h, use_checkpoint):
    """Apply blocks in order; with use_checkpoint, recompute activations in backward to save memory."""
    for block in blocks:
        h = checkpoint(block, h, use_reentrant=False) if use_checkpoint and torch.is_grad_enabled() else block(h)
    return h


# ----------------------------------------------------------------------------------------------------
# Stage 1: 3D KL autoencoder and its patch discriminator (METHOD 2)


class AutoencoderKL(nn.Module):
    """x (B, 1, D, H, W) -> latent (B, latent_channels, D/f, H/f, W/f), f = 2^(levels-1); and back."""

    def __init__(self, channels=(64, 128, 128, 128), latent_channels=3, blocks=2, checkpointing=False):
        super().__init__()
        self.checkpointing = checkpointing
        encoder, ch = [conv3(1, channels[0])], channels[0]
        for level, c in enumerate(channels):
            for _ in range(blocks):
                encoder.append(ResBlock(ch, c))
                ch = c
            if level < len(channels) - 1:
                encoder.append(Downsample(ch))
        encoder += [group_norm(ch), nn.SiLU(), conv3(ch, 2 * latent_channels)]
        self.encoder = nn.ModuleList(encoder)
        self.moments = nn.Conv3d(2 * latent_channels, 2 * latent_channels, 1)  # mean and log-variance heads

        # The decoder mirrors the encoder. Each upsampling convolution already maps to the finer level's
        # channels, so no full-resolution convolution runs at the coarser width (half the decoder's cost).
        decoder = [conv3(latent_channels, ch)]
        for level in reversed(range(len(channels))):
            decoder += [ResBlock(ch, ch) for _ in range(blocks)]
            if level > 0:
                decoder.append(Upsample(ch, channels[level - 1]))
                ch = channels[level - 1]
        decoder += [group_norm(ch), nn.SiLU(), conv3(ch, 1)]  # no output activation
        self.decoder = nn.ModuleList(decoder)

    def encode(self, x):
        mean, logvar = self.moments(run_blocks(self.encoder, x, self.checkpointing)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        # The output convolution runs in float32 under autocast: bfloat16 rounding of the image itself moved
        # the cpu demo's reconstruction SSIM by up to 0.0019, with this one layer in float32 by 0.0003 at most.
        h = run_blocks(self.decoder[:-1], z, self.checkpointing)
        with float32_region(h.device):
            return self.decoder[-1](h.float())

    def forward(self, x):
        mean, logvar = self.encode(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)  # reparameterised sample
        return self.decode(z), mean, logvar


def kl_divergence(mean, logvar):
    """KL(N(mean, var) || N(0, I)), summed over latent elements, averaged over the batch (METHOD 2)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - logvar - 1).flatten(1).sum(1).mean()


class Discriminator(nn.Module):
    """3D PatchGAN: `layers` stride-2 convolutions (kernel 4), one stride-1, then a 1-channel patch head."""

    def __init__(self, base=64, layers=3):
        super().__init__()
        net, ch = [nn.Conv3d(1, base, 4, stride=2, padding=1), nn.LeakyReLU(0.2)], base
        for i in range(1, layers + 1):
            out = base * 2 ** min(i, 3)
            stride = 2 if i < layers else 1
            net += [nn.Conv3d(ch, out, 4, stride=stride, padding=1), group_norm(out), nn.LeakyReLU(0.2)]
            ch = out
        net.append(nn.Conv3d(ch, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*net)

    def forward(self, x):
        return self.net(x)


# ----------------------------------------------------------------------------------------------------
# Stage 2: latent UNet eps_theta(z_t, t) with the gradient estimator G_psi(z_t, t, y_sem) (METHOD 3, 4)


class UpPath(nn.Module):
    """Middle block, up path with skip connections, output head. The UNet owns two of them: one for
    eps_theta (conditioned on time) and one for the gradient estimator (time, then y_sem)."""

    def __init__(self, out_channels, base, mults, blocks, attention, heads, dropout, cond_dims, skips):
        super().__init__()
        ch = base * mults[-1]
        block = lambda cin, cout: ResBlock(cin, cout, cond_dims, dropout, zero_last=True)
        self.middle = nn.ModuleList([block(ch, ch), Attention(ch, heads), block(ch, ch)])
        self.up = nn.ModuleList()
        skips = list(skips)
        for level in reversed(range(len(mults))):
            factor = 2**level
            for i in range(blocks + 1):
                step = [block(ch + skips.pop(), base * mults[level])]
                ch = base * mults[level]
                if factor in attention:
                    step.append(Attention(ch, heads))
                if level > 0 and i == blocks:
                    step.append(Upsample(ch))
                self.up.append(nn.ModuleList(step))
        self.head = nn.Sequential(group_norm(ch), nn.SiLU(), zero_init(conv3(ch, out_channels)))

    def forward(self, h, skips, conds):
        skips = list(skips)
        for layer in self.middle:
            h = layer(h, conds)
        for step in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            for layer in step:
                h = layer(h, conds)
        return self.head(h)


class UNet(nn.Module):
    """Guided-diffusion-style 3D UNet. forward(z_t, t) -> (eps_theta, None);
    forward(z_t, t, y_sem) -> (eps_theta, G_psi), both from one pass through the shared down path."""

    def __init__(self, channels=3, base=256, mults=(1, 2, 3), blocks=2, attention=(2, 4), heads=1,
                 dropout=0.1, y_dim=768, latent_size=None, v_output=False):
        super().__init__()
        self.base, emb = base, 4 * base
        self.time_embed = nn.Sequential(nn.Linear(base, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.input = conv3(channels, base)
        self.down, skips, ch = nn.ModuleList(), [base], base
        for level, mult in enumerate(mults):
            for _ in range(blocks):
                step = [ResBlock(ch, base * mult, (emb,), dropout, zero_last=True)]
                ch = base * mult
                if 2**level in attention:
                    step.append(Attention(ch, heads))
                self.down.append(nn.ModuleList(step))
                skips.append(ch)
            if level < len(mults) - 1:
                self.down.append(nn.ModuleList([Downsample(ch)]))
                skips.append(ch)
        sizes = (channels, base, mults, blocks, attention, heads, dropout)
        self.eps_path = UpPath(*sizes, cond_dims=(emb,), skips=skips)
        self.y_embed = nn.Linear(y_dim, emb)
        self.estimator = UpPath(*sizes, cond_dims=(emb, emb), skips=skips)  # head zero-initialised: G = 0
        # The spatial route from y_sem (not in METHOD 4; docs/design.md): G += W (y_sem * (1 + gate(t))), a linear
        # map from y_sem to a latent-shaped tensor, each code dimension scaled by a learned function of the
        # timestep. Through AdaGN alone (one scale and shift per channel, spatially uniform) the estimator left
        # even an oracle code unused; this path uses it at once. W starts at zero, so G = 0 at the start still.
        self.latent_size = latent_size
        if latent_size is not None:
            self.y_latent = nn.Linear(y_dim, channels * math.prod(latent_size))
            nn.init.zeros_(self.y_latent.weight)
            nn.init.zeros_(self.y_latent.bias)
            self.y_gate = zero_init(nn.Linear(emb, y_dim))
        # v output (not in METHOD 3; docs/design.md): the network predicts v = sqrt(abar) eps - sqrt(1 - abar) z0
        # and eps_theta = sqrt(1 - abar) z_t + sqrt(abar) v. Predicting eps directly, a short-trained network's error
        # at t near T is divided by sqrt(abar) = 0.006 in DDIM's estimate of the clean latent: at the cpu preset its
        # samples lay 3.4x farther from the data than held-out scans. Here the same error costs sqrt(1 - abar) times
        # itself. The loss is still the eps MSE.
        self.v_output = v_output
        if v_output:
            self.register_buffer("abar", Diffusion().abar.float())
        self.eps_frozen = False

    def eps_theta_modules(self):
        return [self.time_embed, self.input, self.down, self.eps_path]

    def estimator_modules(self):
        extra = [self.y_latent, self.y_gate] if self.latent_size is not None else []
        return [self.y_embed, self.estimator] + extra

    def freeze_eps_theta(self):
        """Stage 2b: the pre-trained eps_theta is fixed; only y_embed and the estimator train."""
        for module in self.eps_theta_modules():
            module.requires_grad_(False)
        self.eps_frozen = True

    def train(self, mode=True):
        super().train(mode)
        if self.eps_frozen:  # the frozen UNet stays in eval mode: no dropout (METHOD 4)
            for module in self.eps_theta_modules():
                module.eval()
        return self

    def forward(self, z, t, y_sem=None):
        temb = self.time_embed(timestep_embedding(t, self.base))
        h, skips = self.input(z), []
        skips.append(h)
        for step in self.down:
            for layer in step:
                h = layer(h, (temb,))
            skips.append(h)
        eps = self.eps_path(h, skips, (temb,))
        if self.v_output:
            abar = self.abar[t].reshape(-1, *[1] * (z.dim() - 1))
            eps = (1 - abar).sqrt() * z + abar.sqrt() * eps.float()
        if y_sem is None:
            return eps, None
        g = self.estimator(h, skips, (temb, self.y_embed(y_sem)))
        if self.latent_size is not None:
            g = g + self.y_latent(y_sem * (1 + self.y_gate(temb))).reshape(z.shape[0], -1, *self.latent_size)
        return eps, g


# ----------------------------------------------------------------------------------------------------
# Stage 2b: 2.5D semantic encoder x -> y_sem (METHOD 4), trained from scratch


def position_encoding(n, dim, device):
    """Sinusoidal encoding of slice positions 0..n-1 -> (n, dim)."""
    return timestep_embedding(torch.arange(n, device=device), dim)


def strided_positions(shape, stages):
    """Positions left of a map of this shape after `stages` stride-2 convolutions (each: ceil(s / 2))."""
    return math.prod(-(-s // 2 ** stages) for s in shape)


class SliceCNN(nn.Module):
    """Small 2D CNN shared by every axial slice: strided stages of conv-GN-SiLU, then a linear head over the
    global average pool, or, given slice_shape (D, H), over the flattened map, which keeps where a feature is."""

    def __init__(self, widths, out_dim, slice_shape=None):
        super().__init__()
        layers, ch = [], 1
        for w in widths:
            layers += [nn.Conv2d(ch, w, 3, stride=2, padding=1), nn.GroupNorm(math.gcd(32, w), w), nn.SiLU(),
                       nn.Conv2d(w, w, 3, padding=1), nn.GroupNorm(math.gcd(32, w), w), nn.SiLU()]
            ch = w
        self.net = nn.Sequential(*layers)
        self.flatten = slice_shape is not None
        if self.flatten:
            ch *= strided_positions(slice_shape, len(widths))
        self.proj = nn.Linear(ch, out_dim)

    def forward(self, x):  # (N, 1, D, H) -> (N, out_dim)
        h = self.net(x)
        return self.proj(h.flatten(1) if self.flatten else h.mean(dim=(2, 3)))


class SemanticEncoder(nn.Module):
    """Image (B, 1, D, H, W) -> y_sem (B, y_dim). Slices are taken along the last (superior) axis."""

    def __init__(self, y_dim=768, widths=(32, 64, 128, 256), heads=8, dropout=0.1, slice_shape=None):
        super().__init__()
        self.heads = heads
        self.slice_cnn = SliceCNN(widths, y_dim, slice_shape)
        self.dropout = nn.Dropout(dropout)
        self.pool_score = nn.Linear(y_dim, 1)
        self.q, self.k, self.v, self.out = (nn.Linear(y_dim, y_dim) for _ in range(4))
        self.norm = nn.LayerNorm(y_dim)
        # Not in METHOD 4: y_sem standardised over the batch (running statistics at inference). A code with a
        # constant part lets a linear map in the estimator use it as a bias, and then training shrinks what
        # varies (docs/design.md); without a mean, y_sem is only worth anything by differing between scans.
        self.standardise = nn.BatchNorm1d(y_dim, affine=False)

    def forward(self, x):
        B, _, D, H, W = x.shape
        slices = x.permute(0, 4, 1, 2, 3).reshape(B * W, 1, D, H)
        tokens = self.slice_cnn(slices).reshape(B, W, -1)  # (B, slices, y_dim)
        tokens = self.dropout(tokens + position_encoding(W, tokens.shape[-1], x.device).to(tokens.dtype))
        weights = torch.softmax(self.pool_score(tokens), dim=1)  # soft-attention pooling over slices
        pooled = (weights * tokens).sum(dim=1, keepdim=True)  # (B, 1, y_dim): the query token
        split = lambda u: u.reshape(B, u.shape[1], self.heads, -1).transpose(1, 2)  # (B, heads, n, d)
        h = F.scaled_dot_product_attention(split(self.q(pooled)), split(self.k(tokens)), split(self.v(tokens)))
        h = self.out(h.transpose(1, 2).reshape(B, 1, -1))
        return self.standardise(self.norm(pooled + h).squeeze(1))


class VolumeEncoder(nn.Module):
    """Image (B, 1, D, H, W) -> y_sem (B, y_dim) by a 3D CNN, not METHOD 4's slices: strided stages of
    conv-GN-SiLU, a linear head over the flattened map (it keeps where each feature lies), then the same
    LayerNorm and batch standardisation as SemanticEncoder. On held-out subjects of real anatomy it carries a new
    subject's latent where the slice encoder carries none of it (docs/results.md)."""

    def __init__(self, y_dim, widths, image_shape):
        super().__init__()
        layers, ch = [], 1
        for w in widths:
            layers += [nn.Conv3d(ch, w, 3, stride=2, padding=1), nn.GroupNorm(math.gcd(8, w), w), nn.SiLU()]
            ch = w
        self.net = nn.Sequential(*layers)
        self.proj = nn.Linear(ch * strided_positions(image_shape, len(widths)), y_dim)
        self.norm = nn.LayerNorm(y_dim)
        self.standardise = nn.BatchNorm1d(y_dim, affine=False)

    def forward(self, x):
        return self.standardise(self.norm(self.proj(self.net(x).flatten(1))))


# ----------------------------------------------------------------------------------------------------
# Diffusion (METHOD 0, 3, 4, 5). Symbols, each a float64 tensor over t = 0..T-1:
#   beta        linear from 1e-4 to 0.02           alpha      = 1 - beta
#   abar        = prod_{i<=t} alpha_i              abar_prev  = abar_{t-1}, with abar_{-1} = 1
#   snr         = abar / (1 - abar)                w          = snr^0.1 / (1 + snr)        stage-2b loss weight
#   k           = -sqrt(alpha) (1 - abar_prev) / sqrt(1 - abar)                              stage-2b guidance


def scale_latent(mean, latent_mean, latent_scale):
    """Autoencoder latent -> the DDPM's z0 = s (mean - latent_mean). METHOD 0 has z0 = s E(x) with s = 1 / std;
    we also subtract the training latents' average: it is most of the cpu demo's latent (mean |average| 0.61,
    std around it 0.43 of 1.0), which the DDPM would otherwise have to learn as well."""
    return (mean - latent_mean.to(mean.device)) * latent_scale


def unscale_latent(z0, latent_mean, latent_scale):
    """The DDPM's z0 -> autoencoder latent, for the decoder."""
    return z0 / latent_scale + latent_mean.to(z0.device)


def ddim_timesteps(steps, T=1000):
    """tau = sorted(set(int(v) for v in linspace(0, T-1, steps+1))) (METHOD 5)."""
    return sorted({int(v) for v in torch.linspace(0, T - 1, steps + 1, dtype=torch.float64).tolist()})


class Diffusion:
    def __init__(self, T=1000, beta_start=1e-4, beta_end=0.02):
        self.T = T
        self.beta = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        self.alpha = 1 - self.beta
        self.abar = torch.cumprod(self.alpha, dim=0)
        self.abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.abar[:-1]])
        self.snr = self.abar / (1 - self.abar)
        self.w = self.snr**0.1 / (1 + self.snr)
        self.k = -self.alpha.sqrt() * (1 - self.abar_prev) / (1 - self.abar).sqrt()

    @staticmethod
    def at(values, t, like):
        """values[t] for a batch of timesteps, shaped to broadcast against `like` (B, ...)."""
        return values.to(like.device)[t].to(torch.float32).reshape(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, z0, t, eps):
        """z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps (METHOD 0)."""
        return self.at(self.abar.sqrt(), t, z0) * z0 + self.at((1 - self.abar).sqrt(), t, z0) * eps

    def noised(self, z0, t_probs=None):
        """(t, eps, z_t): t uniform over 0..T-1, or drawn from the probabilities t_probs (T,)."""
        if t_probs is None:
            t = torch.randint(0, self.T, (z0.shape[0],), device=z0.device)
        else:
            t = torch.multinomial(t_probs, z0.shape[0], replacement=True).to(z0.device)
        eps = torch.randn_like(z0)
        return t, eps, self.q_sample(z0, t, eps)

    def pretrain_loss(self, unet, z0):
        """Stage 2a: mean((eps - eps_theta(z_t, t))^2), t uniform (METHOD 3)."""
        t, eps, z_t = self.noised(z0)
        eps_theta, _ = unet(z_t, t)
        return F.mse_loss(eps_theta.float(), eps)

    def repr_loss(self, unet, y_sem, z0, t_probs=None):
        """Stage 2b: mean(w_t (eps - eps_theta - k_t G_psi)^2) with eps_theta frozen (METHOD 4); y_sem = Enc(x)."""
        return self.repr_loss_per_scan(unet, y_sem, z0, t_probs).mean()

    def repr_loss_per_scan(self, unet, y_sem, z0, t_probs=None):
        """Stage 2b's loss of each scan (B,): one draw of (t, eps) per scan, averaged over its latent elements.
        y_sem None: the estimator off (eps_hat = eps_theta), the loss stage 2b starts from. With t drawn from
        t_probs instead of uniformly, each draw is weighted by 1 / (T p_t): the expected loss stays the same."""
        t, eps, z_t = self.noised(z0, t_probs)
        eps_theta, g = unet(z_t, t, y_sem)
        eps_hat = eps_theta.float() if g is None else eps_theta.float() + self.at(self.k, t, z0) * g.float()
        weight = self.at(self.w, t, z0)
        if t_probs is not None:
            weight = weight / (self.T * t_probs[t].reshape(weight.shape))
        return (weight * (eps - eps_hat) ** 2).flatten(1).mean(1)

    def code_saving(self, latents):
        """(T,) how much a y_sem that knew each latent exactly could lower stage 2b's loss at each t, were the
        latents Gaussian with the covariance of `latents` (N, *latent_shape). Its mean over t is the scale for the
        gap between own and other y_sem (evaluate.py's perfect-code bound).

        Along a direction of variance lam, z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps. The best prediction of eps
        from z_t alone (eps_theta without y) errs by Var(eps | z_t) = snr_t lam / (snr_t lam + 1); with a y that
        knows z0, eps = (z_t - sqrt(abar_t) z0) / sqrt(1 - abar_t) exactly: error 0. The loss is a mean over latent
        elements weighted by w_t: the saving at t is w_t sum_j snr_t lam_j / (snr_t lam_j + 1) / elements. A trained
        eps_theta is not the Gaussian-optimal predictor and real latents are not Gaussian: a scale, not a strict
        limit. Directions the N latents do not span count as 0.
        """
        flat = latents.flatten(1).double()  # (N, elements)
        n, elements = flat.shape
        centred = flat - flat.mean(0)
        lam = torch.linalg.eigvalsh(centred @ centred.T / (n - 1)).clamp_min(0)  # the covariance's nonzero eigenvalues
        snr = self.snr[:, None]  # (T, 1)
        return self.w * (snr * lam / (snr * lam + 1)).sum(1) / elements

    def code_focused_t(self, latents):
        """Stage 2b's t distribution (T,): half uniform, half in proportion to code_saving(latents), so a step
        spends its draws where y_sem can lower the loss (on the cpu demo 80% of the saving lies in t = 150-570)
        and no draw's weight 1 / (T p_t) exceeds 2. Uniform when the latents do not vary."""
        saving = self.code_saving(latents)
        share = saving / saving.sum() if saving.sum() > 0 else torch.full_like(saving, 1 / self.T)
        return (0.5 / self.T + 0.5 * share).float()

    def ddim_step(self, unet, z, t, t_next, y_sem=None, clip_z0=None):
        """One deterministic DDIM move of z from timestep t to t_next (either direction; t_next = -1 is the
        clean latent). With y_sem, eps_hat = eps_theta - sqrt(1 - abar_t) G (METHOD 5)."""
        tt = torch.full((z.shape[0],), t, device=z.device, dtype=torch.long)
        eps, g = unet(z, tt, y_sem)
        abar = self.abar[t].item()
        abar_next = self.abar[t_next].item() if t_next >= 0 else 1.0
        eps = eps.float() if g is None else eps.float() - math.sqrt(1 - abar) * g.float()
        z0 = (z - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
        if clip_z0 is not None:
            z0 = z0.clamp(-clip_z0, clip_z0)
        eps = (z - math.sqrt(abar) * z0) / math.sqrt(1 - abar)  # re-derived from z0 (differs only if clipped)
        return math.sqrt(abar_next) * z0 + math.sqrt(1 - abar_next) * eps

    @torch.no_grad()
    def ddim_sample(self, unet, z_T, y_sem=None, steps=100, clip_z0=None):
        """Decode: z_T at t = T-1 down the DDIM sub-sequence to t = 0 (steps network calls)."""
        tau, z = ddim_timesteps(steps, self.T), z_T.float()
        for t, t_next in zip(tau[::-1], tau[-2::-1]):
            z = self.ddim_step(unet, z, t, t_next, y_sem, clip_z0)
        return z

    @torch.no_grad()
    def ddim_encode(self, unet, z0, y_sem=None, steps=100):
        """Inversion: the same update run upwards from the clean latent (first call at t = 0) to t = T-1."""
        tau, z = ddim_timesteps(steps, self.T), z0.float()
        for t, t_next in zip(tau[:-1], tau[1:]):
            z = self.ddim_step(unet, z, t, t_next, y_sem)
        return z


def lerp(a, b, alpha):
    return (1 - alpha) * a + alpha * b


def slerp(a, b, alpha):
    """Spherical interpolation of two batches of noise tensors; the angle from their flattened cosine."""
    fa, fb = a.flatten(1).double(), b.flatten(1).double()
    cos = (fa * fb).sum(1) / (fa.norm(dim=1) * fb.norm(dim=1))
    theta = torch.arccos(cos.clamp(-1, 1))[:, None]
    sin = torch.sin(theta).clamp_min(1e-8)
    out = torch.where(theta > 1e-4, (torch.sin((1 - alpha) * theta) * fa + torch.sin(alpha * theta) * fb) / sin,
                      lerp(fa, fb, alpha))
    return out.to(a.dtype).reshape(a.shape)


def spread_of(y_sem):
    """Has y_sem collapsed? Over scans (N, y_dim): spread = mean per-dimension std across scans, magnitude =
    mean |y_sem|, effective rank = exp(entropy of the covariance's normalised eigenvalues), 1 for a code that
    varies along one direction only (Roy and Vetterli 2007). None for fewer than 2 scans: nothing can spread."""
    if len(y_sem) < 2:
        return None
    y = y_sem.double()
    eig = torch.linalg.eigvalsh(torch.cov(y.T)).clamp_min(0)
    p = eig / eig.sum().clamp_min(1e-300)
    rank = math.exp(-(p * p.clamp_min(1e-300).log()).sum().item())
    return {"spread": y.std(0).mean().item(), "magnitude": y.abs().mean().item(), "effective_rank": rank}


# ----------------------------------------------------------------------------------------------------
# 3D SSIM: the structural term of the stage-1 loss and the reconstruction metric (METHOD 6)


def gaussian_window(size, sigma):
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return (g / g.sum()).float()


def ssim3d(x, y, data_range=1.0, size=7, sigma=1.5, mask=None):
    """Mean SSIM per volume (B,) of x, y (B, 1, D, H, W): Gaussian window, valid convolution,
    k1 = 0.01, k2 = 0.03. With a mask (B, 1, D, H, W), averaged over the masked voxels only."""
    # The variances below are differences of blurred squares: in bfloat16 they cancel to noise or below zero
    # (a bfloat16 stage-1 run hit a -inf loss at step 94), so SSIM runs in float32 even under autocast.
    with float32_region(x.device):
        g = gaussian_window(size, sigma).to(x.device)
        x, y = x.float(), y.float()

        def blur(u):  # separable Gaussian, valid region only
            for axis in range(3):
                shape = [1, 1, 1, 1, 1]
                shape[2 + axis] = size
                u = F.conv3d(u, g.reshape(shape))
            return u

        c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
        mx, my = blur(x), blur(y)
        vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
        ssim_map = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        if mask is None:
            return ssim_map.flatten(1).mean(1)
        D, H, W = ssim_map.shape[2:]
        m = mask.float()[..., size // 2:, size // 2:, size // 2:][..., :D, :H, :W]
        return (ssim_map * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)


# ----------------------------------------------------------------------------------------------------
# Presets: every size in one place. `tiny` is for tests (seconds), `cpu` for the demo on 2 cores,
# `paper` for a CUDA GPU (1x128x160x128 at 1.5 mm -> 3x16x20x16).


@dataclass(frozen=True)
class Preset:
    image_shape: tuple  # (D, H, W) voxels in RAS order
    spacing: float  # mm; the grid covers image_shape * spacing
    ae_channels: tuple
    ae_blocks: int
    latent_channels: int
    disc_channels: int
    disc_layers: int
    unet_base: int
    unet_mults: tuple
    unet_blocks: int
    unet_attention: tuple  # downsample factors with self-attention
    unet_heads: int
    unet_dropout: float  # in the UNet's residual blocks (METHOD 3's 0.1); 0 where stage 2a is short
    encoder_dropout: float  # after the slice position encoding (METHOD 4's 0.1)
    y_dim: int
    encoder_widths: tuple
    encoder_heads: int
    encoder_flatten: bool  # slice head over the flattened map (keeps position) instead of the average pool
    encoder_volume: tuple  # widths of VolumeEncoder, a 3D CNN in place of METHOD 4's slices (then encoder_widths,
    # heads, dropout and flatten are unused); () for METHOD's slices, as at the paper preset
    v_output: bool  # the UNet's output is v, and eps_theta follows from it (UNet)
    stage1: dict  # train_ae.py's schedule: defaults of its flags
    stage2: dict  # train_ldae.py's schedule

    @property
    def latent_shape(self):
        f = 2 ** (len(self.ae_channels) - 1)
        return (self.latent_channels, *(s // f for s in self.image_shape))

    def autoencoder(self, checkpointing=False):
        return AutoencoderKL(self.ae_channels, self.latent_channels, self.ae_blocks, checkpointing)

    def discriminator(self):
        return Discriminator(self.disc_channels, self.disc_layers)

    def unet(self):
        return UNet(self.latent_channels, self.unet_base, self.unet_mults, self.unet_blocks, self.unet_attention,
                    self.unet_heads, self.unet_dropout, self.y_dim, self.latent_shape[1:], self.v_output)

    def encoder(self):
        if self.encoder_volume:
            return VolumeEncoder(self.y_dim, self.encoder_volume, self.image_shape)
        return SemanticEncoder(self.y_dim, self.encoder_widths, self.encoder_heads, self.encoder_dropout,
                               self.image_shape[:2] if self.encoder_flatten else None)

    def untrained_encoder(self, seed):
        """The encoder stage 2b starts from: train_ldae.py seeds with the run's first --seed, then builds the UNet
        and the encoder, so doing the same draws the same random weights. The global RNG is left as it was."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.unet()
            return self.encoder()


# Schedules. The paper's values are METHOD 2-4's (2a's batch of 128 as 16 x 8 accumulated, to fit a GPU; METHOD
# gives no stage-2b length: 100 epochs is ours). The cpu schedule was measured on the demo cohort (docs/results.md)
# and counts optimiser steps, not epochs: the demo's 4, 40 and 44 epochs of its 512 training scans, which README
# command 1 trains within 30 minutes on 2 cores, whatever the size of the cohort. Its adversarial term stays off,
# as it did in the demo's 4 epochs (adv_start inf).
PAPER_STAGE1 = dict(epochs=100, lr=5e-5, lr_d=1e-4, batch_size=1, accumulate=4, adv_start=5.0)
PAPER_STAGE2 = dict(pretrain_epochs=500, repr_epochs=100, batch_size=16, accumulate=8, repr_batch_size=4,
                    repr_accumulate=4, lr=2.5e-5, repr_lr=2.5e-5, ema=0.999)
CPU_STAGE1 = dict(steps=2048, lr=1e-3, lr_d=1e-4, batch_size=1, accumulate=1, adv_start=math.inf)
CPU_STAGE2 = dict(pretrain_steps=1280, repr_steps=2816, batch_size=16, accumulate=1, repr_batch_size=8,
                  repr_accumulate=1, lr=5e-4, repr_lr=5e-4, ema=0.99)
# A stage's length, given in epochs or in optimiser steps: a flag for either replaces the schedule's length.
LENGTHS = (("epochs", "steps"), ("pretrain_epochs", "pretrain_steps"), ("repr_epochs", "repr_steps"))

PRESETS = {
    "tiny": Preset(image_shape=(16, 20, 16), spacing=12.0, ae_channels=(8, 16), ae_blocks=1, latent_channels=3,
                   disc_channels=8, disc_layers=1, unet_base=16, unet_mults=(1, 2), unet_blocks=1,
                   unet_attention=(2,), unet_heads=1, unet_dropout=0.0, encoder_dropout=0.1, y_dim=16,
                   encoder_widths=(8, 16), encoder_heads=2, encoder_flatten=True, encoder_volume=(8, 16),
                   v_output=True, stage1=CPU_STAGE1, stage2=CPU_STAGE2),
    "cpu": Preset(image_shape=(48, 64, 48), spacing=3.5, ae_channels=(16, 32, 64), ae_blocks=1, latent_channels=2,
                  disc_channels=16, disc_layers=3, unet_base=32, unet_mults=(1, 2, 2), unet_blocks=1,
                  unet_attention=(4,), unet_heads=1, unet_dropout=0.0, encoder_dropout=0.1, y_dim=128,
                  encoder_widths=(16, 32, 64, 128), encoder_heads=8, encoder_flatten=True,
                  encoder_volume=(16, 32, 64),
                  v_output=True, stage1=CPU_STAGE1, stage2=CPU_STAGE2),
    "paper": Preset(image_shape=(128, 160, 128), spacing=1.5, ae_channels=(64, 128, 128, 128), ae_blocks=2,
                    latent_channels=3, disc_channels=64, disc_layers=3, unet_base=256, unet_mults=(1, 2, 3),
                    unet_blocks=2, unet_attention=(2, 4), unet_heads=1, unet_dropout=0.1, encoder_dropout=0.1,
                    y_dim=768, encoder_widths=(64, 128, 256, 512), encoder_heads=8, encoder_flatten=False,
                    encoder_volume=(), v_output=False, stage1=PAPER_STAGE1, stage2=PAPER_STAGE2),
}


# ----------------------------------------------------------------------------------------------------
# Run plumbing shared by the scripts: config flags, devices and processes, EMA, safe checkpoints


def parse_config(config_class, argv=None):
    """argparse generated from a dataclass: each field is a flag (--batch-size for batch_size)."""
    import argparse
    import dataclasses

    parser = argparse.ArgumentParser(description=config_class.__doc__)
    for f in dataclasses.fields(config_class):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:  # a default of None: the preset's schedule decides (with_schedule)
            parser.add_argument(flag, type=f.type if f.default is None else type(f.default), default=f.default)
    return config_class(**vars(parser.parse_args(argv)))


def with_schedule(cfg, schedule):
    """cfg with every field left at None (no flag given) taken from the preset's schedule. A stage's length
    (LENGTHS) comes whole from the flags when one of its two forms is given, else from the schedule; its
    form left unset becomes 0 (unused)."""
    import dataclasses

    schedule = dict(schedule)
    lengths = [pair for pair in LENGTHS if all(hasattr(cfg, k) for k in pair)]
    for pair in lengths:
        if any(getattr(cfg, k) is not None for k in pair):
            for k in pair:
                schedule.pop(k, None)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in schedule.items() if getattr(cfg, k) is None})
    return dataclasses.replace(cfg, **{k: 0 for pair in lengths for k in pair if getattr(cfg, k) is None})


def default_preset():
    """Without --preset: the paper's model on a CUDA machine, the cpu demo's elsewhere."""
    return "paper" if torch.cuda.is_available() else "cpu"


def setup_process():
    """(rank, world_size, device). Under torchrun, joins the process group (nccl on CUDA, gloo on CPU)."""
    import os

    import torch.distributed as dist

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def run_summary(steps, seconds, device):
    """How a training run ends its log: steps, seconds, seconds per step and, on CUDA, the peak GPU memory."""
    text = f"{steps} steps in {seconds:.0f} s ({seconds / max(steps, 1):.2f} s/step)"
    if device.type == "cuda":
        text += f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.1f} GiB"
    return text


def cpu_has_bf16():
    """True where oneDNN has native bfloat16 kernels (AVX-512 BF16 or AMX). Elsewhere a bfloat16 Conv3d falls
    back to a naive kernel ~50x slower than float32 (seen on an AVX2-only Zen 3)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def autocast(device, amp, inference=False):
    """(autocast context, its dtype). amp: 'auto', 'bf16', 'fp16' or 'off'. 'auto' is bfloat16 on a CPU with
    native bfloat16 (without it ~50x slower: float32), for training and inference. Training steps at the cpu
    preset, 2 threads: autoencoder 0.30 -> 0.16 s, stage 2a 0.37 -> 0.17 s, stage 2b 0.39 -> 0.24 s; paper
    autoencoder with checkpointing 103 -> 62 s. At inference the autoencoder's output layer stays float32 (the
    demo's test reconstruction SSIM moved by 0.0001-0.0009). On CUDA, training takes bfloat16 where supported, else
    float16, and inference float32: on an H100 at batch 1 bfloat16 made the latent UNet step slower."""
    if amp == "auto" and device.type == "cpu":
        amp = "bf16" if cpu_has_bf16() else "off"
    elif amp == "auto":
        amp = "off" if inference else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    if amp not in ("bf16", "fp16", "off"):
        raise ValueError(f"--amp {amp!r}: choose auto, bf16, fp16 or off")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": torch.float32}[amp]
    return torch.autocast(device.type, dtype=dtype, enabled=amp != "off"), dtype


def memory_format(device, training_dtype=None):
    """Layout of the networks and their inputs, for inference (training_dtype None) and for training in
    training_dtype: channels_last_3d on the CPU, where oneDNN runs these convolutions faster (paper UNet step in
    bfloat16 0.77 -> 0.68 s, float32 1.41 -> 1.33 s; cpu-preset decoding 0.27 -> 0.21 s), except for training in
    reduced precision, where PyTorch's GroupNorm backward is slow in channels_last_3d (1x64x128x160x128 bfloat16:
    1.0-1.3 s against 0.05 s; cpu-preset bfloat16 autoencoder step 0.28 s against 0.16 s, stage 2a 0.36 against
    0.23 s). Float32 training steps at the cpu preset on an AVX2-only AMD EPYC, 2 threads, default layout ->
    channels_last_3d: autoencoder 1.31 -> 1.12 s, stage 2a 1.64 -> 1.36 s. The default layout on other devices."""
    if device.type != "cpu" or training_dtype not in (None, torch.float32):
        return torch.contiguous_format
    return torch.channels_last_3d


@contextmanager
def heap_memory():
    """Inference only: glibc serves large tensors from its heap and keeps freed memory there. By default it maps
    every block over 32 MB fresh from the OS and returns it when freed, so each full-resolution activation
    page-faults its memory in again. Measured (with the in-place SiLU, 2 threads): paper encode 4.35 -> 3.74 s,
    decode 6.65 -> 5.87 s, resident size of an encode 1.3 -> 3.7 GiB. Not for training: a paper-preset stage-1
    step with checkpointing peaked at 17.9 GiB instead of 10.5, no faster. glibc's defaults come back on exit."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to tune
        mallopt = malloc_trim = lambda *args: None
    mallopt(-4, 0)  # M_MMAP_MAX: no mmap-backed blocks
    mallopt(-1, 2**30)  # M_TRIM_THRESHOLD: give memory back only when 1 GiB lies free at the top
    try:
        yield
    finally:
        mallopt(-4, 65536)  # glibc's defaults
        mallopt(-1, 128 * 1024)
        malloc_trim(0)


@torch.no_grad()
def update_ema(ema, model, decay, step):
    """EMA after optimiser step `step` (0-based). The decay ramps up as (1 + step) / (10 + step) to `decay`, so
    a short run's average is not held back by the random initial weights (0.99^160 = 20% of them at step 160)."""
    decay = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def learning_rate(base, step, total, warmup=20):
    """Short linear warm-up, then cosine decay to 10% of base: short CPU budgets end annealed."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def step_seed(seed, step, rank):
    """All randomness of a training step comes from (seed, step, rank): resuming at any step is exact,
    whatever ran before it, so no RNG state needs to travel in the checkpoint."""
    torch.manual_seed(seed * 1_000_003 + step * 1_009 + rank)


class TrainingLog:
    """RUN/log.csv, for plotting: one line per `every` optimiser steps (their mean loss, the learning rate, seconds
    per step) and one per validation, each with its stage; columns named in the header, blank where a line has
    no such figure. Every line is flushed as it is written. A resumed stage first drops its own lines past the
    checkpoint's step (those steps run again), so the file continues where the checkpoint does."""

    COLUMNS = ("stage", "step", "epoch", "loss", "lr", "seconds_per_step", "val_ssim", "val_mse", "val_loss",
               "val_other_subject_loss", "y_sem_spread", "y_sem_magnitude", "y_sem_effective_rank")

    def __init__(self, path, stage, step, steps_per_epoch, every=20, enabled=True):
        self.path, self.stage, self.steps_per_epoch, self.every = Path(path), stage, steps_per_epoch, every
        self.enabled, self.pending = enabled, []
        if not enabled:
            return
        rows = []
        if self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("stage") != stage or int(r["step"]) <= step]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, self.COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def write(self, step, **values):
        if not self.enabled:
            return
        row = {"stage": self.stage, "step": step, "epoch": f"{step / self.steps_per_epoch:.3f}"}
        row |= {k: f"{v:.6g}" for k, v in values.items() if v is not None}
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.COLUMNS).writerow(row)

    def train_step(self, step, loss, lr, seconds):
        """After optimiser step `step` (counted from 1): its loss, learning rate and duration."""
        self.pending.append((loss, seconds))
        if step % self.every == 0:
            losses, times = zip(*self.pending)
            self.write(step, loss=sum(losses) / len(losses), lr=lr, seconds_per_step=sum(times) / len(times))
            self.pending = []


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(state, path):
    """Write to a temporary file, fsync, then rename: a kill at any moment leaves the previous checkpoint
    whole. The one it replaces is kept as NAME.prev.pt, so the last two are always there."""
    import os
    from pathlib import Path

    path = Path(path)
    tmp, prev = path.with_name(path.name + ".tmp"), path.with_suffix(".prev.pt")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():  # a second name for the current file, so NAME.pt itself never goes missing
            prev.unlink(missing_ok=True)
            os.link(path, prev)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{path}: could not save the checkpoint ({e.strerror or e}); the previous one is "
                              f"unchanged. Free disk space or choose a writable --out.") from e


def load_weights(module, weights, path, what):
    """load_state_dict, refusing with the file's name where the weights are of another shape: a preset's networks
    can change between versions of ldae, or be edited (say, encoder_volume set) after a run was trained."""
    try:
        module.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: its {what} does not fit this preset's networks ({str(e).splitlines()[0]}); "
                              f"it was written by another version of ldae or before the preset was edited: train "
                              f"that stage again into a new --out")


def load_checkpoint(path, fallback=False):
    """Load with weights_only=True (a crafted file cannot run code). With fallback, a damaged file is
    replaced by NAME.prev.pt, and the message says so."""
    from pathlib import Path

    path = Path(path)
    candidates = [path, path.with_suffix(".prev.pt")] if fallback else [path]
    problems = []
    for candidate in candidates:
        if not candidate.exists():
            problems.append(f"{candidate}: not found")
            continue
        try:
            state = torch.load(candidate, map_location="cpu", weights_only=True)
            if candidate != path:
                print(f"warning: {problems[-1]}; resuming from the previous checkpoint {candidate}")
            return state
        except Exception as e:  # truncated zip, bad pickle, or a pickle that tries to run code
            problems.append(f"{candidate}: not a loadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})")
    raise CheckpointError("; ".join(problems) + ". Re-run the stage that writes it, or copy a good checkpoint there.")
