"""Evaluate a trained LDAE run: probes, reconstruction, sampling, manipulation, interpolation, variations, throughput.

    python evaluate.py --task ad|age|reconstruct|sample|manipulate|interpolate|variations|throughput [--out runs]

Reads runs/ae.pt and runs/ldae.pt (EMA encoder and UNet), scores the run's test split, prints a table
and writes runs/eval/TASK.json (NIfTI and PNG outputs under runs/eval/TASK/).

The first part holds the metrics and the linear probes (METHOD.md section 6) as plain
functions on torch tensors; the evaluation tasks that use them follow below it.
Probes run in float64: the inputs are cast there, whatever dtype the caller passes.
"""
import json
import math
import os
import struct
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # huge pages: large 3D activations without page-fault storms

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import ldae

# -----------------------------------------------------------------------------
# Metrics and linear probes (METHOD.md section 6)


def roc_auc(scores, labels):
    """Area under the ROC curve by the Mann-Whitney U statistic; tied scores get average ranks.

    Label 1 is the positive class. AUC = P(score of a positive > score of a negative),
    ties counted as one half.
    """
    scores, labels = scores.double().flatten(), labels.flatten().bool()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"roc_auc needs both classes, got {n_pos} positives and {n_neg} negatives")
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    last_rank = counts.cumsum(0).double()  # 1-based rank of the last member of each tie group
    ranks = (last_rank - (counts - 1) / 2)[inverse]  # average rank within the tie group
    u_statistic = ranks[labels].sum() - n_pos * (n_pos + 1) / 2
    return float(u_statistic / (n_pos * n_neg))


def classification_metrics(scores, labels, threshold=0.5):
    """Accuracy, precision, recall, F1 and ROC-AUC; scores are probabilities of label 1 (positive)."""
    labels = labels.flatten().bool()
    predicted = scores.flatten() >= threshold
    true_pos = int((predicted & labels).sum())
    false_pos = int((predicted & ~labels).sum())
    false_neg = int((~predicted & labels).sum())
    precision = true_pos / (true_pos + false_pos) if true_pos + false_pos else 0.0
    recall = true_pos / (true_pos + false_neg) if true_pos + false_neg else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": float((predicted == labels).double().mean()),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "roc_auc": roc_auc(scores, labels),
    }


def standardize(train, *others, std_floor=1e-8):
    """Z-score train and every other split with the train mean/std (population std, floored
    so constant features map to 0 instead of blowing up). Returns a tuple (train, *others)."""
    mean = train.mean(0)
    std = train.std(0, correction=0).clamp_min(std_floor)
    return tuple((x - mean) / std for x in (train, *others))


def logistic_objective(X, y, w, b, l2):
    """L2-regularised logistic loss divided by n: mean log-loss + l2 / (2 n) |w|^2.

    Same minimiser as sklearn's LogisticRegression(C=1/l2); the intercept is not penalised.
    """
    logits = X @ w + b
    return F.binary_cross_entropy_with_logits(logits, y) + l2 / (2 * len(y)) * w.square().sum()


def fit_logistic(X, y, l2=1.0, max_iter=100, grad_tol=1e-7):
    """Fit L2-regularised logistic regression (logistic_objective) by Newton's method. Returns (w, b).

    The gradient X^T (p - y) / n + l2 / n w vanishes only for w in the row space of X, so w = V^T c with
    V (r, d) the right singular vectors of X, r <= min(n, d), and Newton runs on (c, b): an (r + 1)-square
    system. Newton, unlike a line-search method, needs no loss comparisons near the optimum, where they
    drown in float64 rounding when the features are correlated (large Hessian eigenvalues).
    """
    if l2 <= 0:
        raise ValueError(f"fit_logistic needs l2 > 0, got {l2}")
    X, y = X.double(), y.double().flatten()
    n = len(y)
    _, S, Vh = torch.linalg.svd(X, full_matrices=False)
    Z = torch.cat([X @ Vh.T, torch.ones(n, 1, dtype=X.dtype)], dim=1)  # (n, r + 1): reduced features, bias
    penalty = torch.full((Z.shape[1],), l2 / n, dtype=X.dtype)
    penalty[-1] = 0.0  # the intercept is not penalised
    theta = torch.zeros(Z.shape[1], dtype=X.dtype)  # [c, b]

    def loss(theta):
        return float(F.binary_cross_entropy_with_logits(Z @ theta, y) + 0.5 * (penalty * theta.square()).sum())

    for _ in range(max_iter):
        p = torch.sigmoid(Z @ theta)
        grad = Z.T @ (p - y) / n + penalty * theta
        if grad.abs().max() <= grad_tol:
            break
        hessian = (Z.T * (p * (1 - p))) @ Z / n + torch.diag(penalty)
        hessian.diagonal().add_(1e-12)  # keeps the solve defined when every p saturates; fixed point unchanged
        step, t, current = torch.linalg.solve(hessian, grad), 1.0, loss(theta)
        while loss(theta - t * step) > current + 1e-12 * max(1.0, abs(current)) and t > 1e-8:
            t /= 2  # damped far from the optimum; full steps (quadratic convergence) close to it
        theta = theta - t * step
    else:
        raise RuntimeError(f"fit_logistic did not converge in {max_iter} Newton steps: max |grad| = "
                           f"{grad.abs().max():.2e}; raise l2 or standardize the features")
    return Vh.T @ theta[:-1], theta[-1]


def predict_logistic(X, w, b):
    """Probability of label 1."""
    return torch.sigmoid(X.double() @ w + b)


def fit_ridge(X, y, l2=1.0):
    """Ridge regression in closed form, intercept not penalised. Returns (w, b).

    Centring X and y removes the intercept; then w = (Xc^T Xc + l2 I)^-1 Xc^T yc, or its dual
    w = Xc^T (Xc Xc^T + l2 I)^-1 yc when n < d, so only a min(n, d)-sized system is solved.
    y may be (n,) or (n, k). With n <= d, l2 must be > 0 (Xc has rank < n).
    """
    if l2 < 0:
        raise ValueError(f"fit_ridge needs l2 >= 0, got {l2}")
    X, y = X.double(), y.double()
    x_mean, y_mean = X.mean(0), y.mean(0)
    Xc, yc = X - x_mean, y - y_mean
    n, d = Xc.shape
    if n >= d:
        w = torch.linalg.solve(Xc.T @ Xc + l2 * torch.eye(d, dtype=X.dtype), Xc.T @ yc)
    else:
        w = Xc.T @ torch.linalg.solve(Xc @ Xc.T + l2 * torch.eye(n, dtype=X.dtype), yc)
    return w, y_mean - x_mean @ w


def predict_ridge(X, w, b):
    return X.double() @ w + b


def choose_l2(fit, score, X, y, groups, grid, val_fraction=0.3, seed=0):
    """Pick the l2 in grid with the best validation score, on a split by group (subject).

    A fixed-seed permutation of the unique groups puts val_fraction of them in validation,
    so scans of one subject never sit on both sides. fit(X, y, l2) -> (w, b);
    score(X, y, w, b) -> float, higher is better (e.g. AUC, or minus the MAE).
    """
    group_list = groups.tolist() if torch.is_tensor(groups) else list(groups)
    unique_groups = sorted(set(group_list), key=str)
    if len(unique_groups) < 2:
        raise ValueError(f"choose_l2 needs at least 2 groups (subjects) to split, got {len(unique_groups)}")
    order = torch.randperm(len(unique_groups), generator=torch.Generator().manual_seed(seed))
    n_val = min(max(1, round(val_fraction * len(unique_groups))), len(unique_groups) - 1)
    val_groups = {unique_groups[i] for i in order[:n_val].tolist()}
    is_val = torch.tensor([g in val_groups for g in group_list])
    scores = []
    for l2 in grid:
        w, b = fit(X[~is_val], y[~is_val], l2)
        scores.append(score(X[is_val], y[is_val], w, b))
    return grid[max(range(len(grid)), key=scores.__getitem__)]


def pca_fit(X, k):
    """PCA of the centred data from the eigenvectors of its smaller Gram matrix: X X^T (n x n) when there are
    fewer rows than columns, as for the probes' voxels (n in the hundreds, d ~147k: 10x faster than a thin SVD of
    X), else X^T X. k is capped at min(n - 1, d) and at the data's rank.

    Returns (mean (d,), components (k, d) with orthonormal rows, explained_variance (k,) descending).
    """
    X = X.double()
    n, d = X.shape
    mean = X.mean(0)
    centred = X - mean
    eigenvalues, vectors = torch.linalg.eigh(centred @ centred.T if n < d else centred.T @ centred)
    eigenvalues, vectors = eigenvalues.flip(0), vectors.flip(1)  # descending
    k = min(k, n - 1, int((eigenvalues > 1e-12 * eigenvalues[0]).sum()))
    components = vectors[:, :k].T
    if n < d:  # X = U S V^T: X X^T = U S^2 U^T, and the components V^T = S^-1 U^T X
        components = components @ centred / eigenvalues[:k, None].sqrt()
    return mean, components, eigenvalues[:k] / (n - 1)


def pca_transform(X, mean, components):
    """Project onto the principal components: (n, d) -> (n, k)."""
    return (X.double() - mean) @ components.T


def intensity_histogram(x, bins=32, floor=0.02):
    """Scans (B, ...) in [0, 1] -> (B, bins): the share of each scan's voxels above `floor` (the background) that
    falls in each of `bins` equal intervals of (floor, 1]: the scan's tissue composition."""
    flat = x.flatten(1)
    inside = flat > floor
    index = ((flat - floor) / (1 - floor) * bins).long().clamp(0, bins - 1)
    counts = torch.zeros(x.shape[0], bins, device=x.device).scatter_add_(1, index, inside.float())
    return counts / inside.sum(1, keepdim=True).clamp(min=1)


def regression_metrics(pred, target):
    """MAE, RMSE and R^2 = 1 - MSE / the target's variance (1: perfect; 0: no better than the target's mean)."""
    target = target.double().flatten()
    error = pred.double().flatten() - target
    return {"mae": float(error.abs().mean()), "rmse": float(error.square().mean().sqrt()),
            "r2": float(1 - error.square().mean() / target.var(unbiased=False))}


def psnr(x, y, data_range=1.0):
    """Peak signal-to-noise ratio in dB over all elements: 10 log10(data_range^2 / MSE)."""
    mse = float((x.double() - y.double()).square().mean())
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


# -----------------------------------------------------------------------------
# Evaluation tasks (probes, reconstruction, sampling, manipulation, interpolation, variations, throughput)


@dataclass
class Config:
    """Evaluate a trained LDAE run on its test split."""
    task: str = ""  # ad | age | reconstruct | sample | manipulate | interpolate | variations | throughput
    out: str = "runs"  # the run folder with ae.pt and ldae.pt
    steps: int = 50  # DDIM steps of sample, manipulate, interpolate and variations
    steps_list: str = ""  # reconstruct: "10,20,50,100", throughput: "10,50,100" when empty
    max_scans: int = 48  # reconstruct: test scans scored
    n_samples: int = 16  # sample: z_T ~ N(0, I) decoded without y_sem
    n_scans: int = 16  # manipulate: test scans edited
    alphas: str = "-2,-1,1,2"  # manipulate: steps along the AD direction, in units of alpha_unit
    alpha_unit: str = "groups"  # manipulate: a = 1 is the CN-to-AD distance of the training means along the
    # direction ("groups"), or METHOD's sqrt(y_dim) z-scored units ("sqrt_d")
    n: int = 4  # variations: random z_T
    scan: int = 0  # variations: which test scan
    clip_z0: float = 0.0  # clamp z0_hat to [-c, c] at every DDIM step (METHOD 5); 0: off
    batch_size: int = 4
    folds: int = None  # ad, age: also K-fold cross-validation over every scan, split by subject; by default 5
    # where the cohort has 10 subjects or more (a test split of a few subjects is a noisy figure); 0: test split only
    dae_base: int = 32  # throughput: base channels of the voxel-space diffusion autoencoder
    repeats: int = 1  # throughput: timed volumes per setting (after one warm-up volume)
    amp: str = "auto"  # auto (see ldae.autocast) | bf16 | fp16 | off
    seed: int = 0


TASKS = ("ad", "age", "reconstruct", "sample", "manipulate", "interpolate", "variations", "throughput", "summary")
L2_GRID = [0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0]  # the logistic l2 is sklearn's 1 / C
BRAIN_THRESHOLD = 0.05  # voxels of the scaled input above this are brain for the masked SSIM


@dataclass
class Run:
    """Everything the tasks read from a trained run; networks on `device`, in eval mode."""
    path: Path
    preset: ldae.Preset
    ae_config: dict
    ldae_config: dict  # train_ldae.py's config of stage 2b
    init_seed: int  # the seed stage 2 drew its networks' random start with (stage 2a's, when 2b ran with another)
    rows: list
    images: np.ndarray  # (N, 1, D, H, W) memory-mapped, rows' order
    latents: torch.Tensor  # (N, *latent_shape), the DDPM's z0 (ldae.scale_latent)
    latent_mean: torch.Tensor
    latent_scale: float
    split: dict  # subject -> train | val | test
    ae: torch.nn.Module
    unet: torch.nn.Module  # EMA UNet: eps_theta and the gradient estimator
    encoder: torch.nn.Module  # EMA semantic encoder
    diffusion: ldae.Diffusion
    device: torch.device
    amp: object  # autocast context, reusable
    precision: torch.dtype  # what amp computes in (float32 when off)

    def indices(self, *parts):
        return [i for i, r in enumerate(self.rows) if self.split.get(r["subject"]) in parts]

    def x(self, indices):
        return torch.tensor(np.asarray(self.images[indices]), device=self.device)  # (B, 1, D, H, W)


def open_run(cfg):
    """Load ae.pt, ldae.pt, the cohort and the latent cache; refuse with the command to run if a stage is missing."""
    path = Path(cfg.out)
    ae_path, ldae_path = path / "ae.pt", path / "ldae.pt"
    if not ae_path.exists():
        raise SystemExit(f"error: {ae_path} not found: train stage 1 first with `python train_ae.py --out {cfg.out}` "
                         f"(plus your --data and --preset), then `python train_ldae.py --out {cfg.out}`")
    ae_state = ldae.load_checkpoint(ae_path)
    if "latent_mean" not in ae_state:
        raise SystemExit(f"error: {ae_path}: stage 1 has not finished; run `python train_ae.py --out {cfg.out} "
                         f"--resume` first")
    if not ldae_path.exists():
        raise SystemExit(f"error: {ldae_path} not found: train stage 2 first with "
                         f"`python train_ldae.py --out {cfg.out}`")
    state = ldae.load_checkpoint(ldae_path)
    if state["stage"] != "repr":
        raise SystemExit(f"error: {ldae_path} holds only stage 2a (no trained semantic encoder); run "
                         f"`python train_ldae.py --out {cfg.out} --stage repr` first")
    if state["config"].get("oracle"):
        raise SystemExit(f"error: {ldae_path} is from an --oracle diagnostic run (`train_ldae.py --oracle`): its "
                         f"estimator learnt from an oracle code, so it has no trained encoder to evaluate; evaluate a "
                         f"run trained without --oracle")
    if not state["finished"]:
        print(f"warning: {ldae_path}: stage 2b stopped at step {state['step']} before the end; evaluating its EMA "
              f"weights as they are (finish with `python train_ldae.py --out {cfg.out} --resume`)")
    ae_cfg = ae_state["config"]
    if state["preset"] != ae_cfg["preset"] or abs(state["latent_scale"] - ae_state["latent_scale"]) > 1e-12:
        raise SystemExit(f"error: {ldae_path} was trained on another stage 1 than {ae_path}; retrain stage 2 "
                         f"with `python train_ldae.py --out NEW_FOLDER` on this ae.pt")
    preset = ldae.PRESETS[ae_cfg["preset"]]
    rows, images = data.load_cohort(ae_state["data_dir"], ae_cfg["csv"], preset, path, ae_cfg["clip_percentile"],
                                    ae_cfg["skip_bad"])
    latents = data.load_latents(path / "latents.pt", ae_state["model"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ae, unet, encoder = preset.autoencoder(), preset.unet(), preset.encoder()
    ldae.load_weights(ae, ae_state["model"], ae_path, "autoencoder")
    ldae.load_weights(unet, state["unet_ema"], ldae_path, "latent UNet")
    ldae.load_weights(encoder, state["encoder_ema"], ldae_path, "semantic encoder")
    amp, precision = ldae.autocast(device, cfg.amp, inference=True)
    print(f"{path}: preset {ae_cfg['preset']}, {len(rows)} scans, device {device}")
    layout = ldae.memory_format(device)
    ae, unet = ae.to(device, memory_format=layout).eval(), unet.to(device, memory_format=layout).eval()
    init_seed = state.get("init_seed", state["config"]["seed"])  # checkpoints before init_seed: 2b's own seed
    return Run(path, preset, ae_cfg, state["config"], init_seed, rows, images, latents, ae_state["latent_mean"],
               ae_state["latent_scale"], ae_state["split"], ae, unet, encoder.to(device).eval(), ldae.Diffusion(),
               device, amp, precision)


# ---- network passes, batched; every output float32 on the device


def batches(indices, size, desc=None):
    chunks = [indices[i:i + size] for i in range(0, len(indices), size)]
    return tqdm(chunks, desc=desc, disable=desc is None or len(chunks) < 2)


@torch.no_grad()
def semantic(run, indices, batch_size, desc="semantic encoder", encoder=None):
    """y_sem of the given scans (N, y_dim), on the CPU; by run.encoder unless another encoder is given."""
    encoder = encoder or run.encoder
    out = []
    for chunk in batches(indices, batch_size, desc):
        with run.amp:
            out.append(encoder(run.x(chunk)).float().cpu())
    return torch.cat(out)


def untrained_encoder(run):
    """The semantic encoder stage 2b started from (the same architecture and random weights)."""
    return run.preset.untrained_encoder(run.init_seed).to(run.device).eval()


@torch.no_grad()
def semantic_of(run, x):
    """y_sem of images already on the device (B, y_dim)."""
    with run.amp:
        return run.encoder(x).float()


@torch.no_grad()
def decode_latent(run, z0):
    """Scaled latent -> image: divide by s, AE decoder (no clamp, METHOD 5)."""
    with run.amp:
        return run.ae.decode(ldae.unscale_latent(z0, run.latent_mean, run.latent_scale)).float()


@torch.no_grad()
def ddim_encode(run, z0, y_sem, steps):
    with run.amp:
        return run.diffusion.ddim_encode(run.unet, z0.to(run.device), y_sem.to(run.device), steps)


@torch.no_grad()
def ddim_latent(run, z_T, y_sem, steps, clip_z0=0.0):
    """z_T -> scaled latent by DDIM, guided by y_sem; y_sem None: eps_theta alone (the unconditional DDPM)."""
    y_sem = None if y_sem is None else y_sem.to(run.device)
    with run.amp:
        return run.diffusion.ddim_sample(run.unet, z_T.to(run.device), y_sem, steps, clip_z0 or None)


def ddim_decode(run, z_T, y_sem, steps, clip_z0=0.0):
    """z_T -> image: guided DDIM to a latent, then the AE decoder."""
    return decode_latent(run, ddim_latent(run, z_T, y_sem, steps, clip_z0))


def image_metrics(x_hat, x):
    """Per-volume SSIM, SSIM inside the brain mask, MSE and PSNR of x_hat against x, both (B, 1, D, H, W)."""
    mask = x > BRAIN_THRESHOLD
    ssim, ssim_brain = ldae.ssim3d(x_hat, x).tolist(), ldae.ssim3d(x_hat, x, mask=mask).tolist()
    return [{"ssim": s, "ssim_brain": sb, "mse": float(F.mse_loss(a, b)), "psnr": psnr(a, b)}
            for s, sb, a, b in zip(ssim, ssim_brain, x_hat.float(), x.float())]


def mean_metrics(per_scan):
    return {k: sum(m[k] for m in per_scan) / len(per_scan) for k in per_scan[0]} | {"n": len(per_scan)}


# ---- tiny PNG writer and mid-slice montages (no matplotlib)


def write_png(path, rgb):
    """rgb: (H, W, 3) uint8 -> 8-bit RGB PNG, one unfiltered scanline per row."""
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[row].tobytes() for row in range(height))

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6))
                           + chunk(b"IEND", b""))


def mid_slices(volume):
    """Axial, coronal, sagittal mid slices of a RAS (D, H, W) grid volume, superior/anterior up."""
    D, H, W = volume.shape
    return [volume[:, :, W // 2].T[::-1], volume[:, H // 2, :].T[::-1], volume[D // 2].T[::-1]]


def montage(path, columns, min_panel=128):
    """A PNG grid. Each column is a list of (volume, kind) cells, each cell drawn top to bottom as its axial,
    coronal and sagittal mid-slices, so every row of the grid is one orientation. kind 'image' shows [0, 1] in
    gray; 'difference' shows + in red and - in blue, full colour at the largest |difference| in the grid, which
    is returned (None without differences) for the caption. A short column leaves its lower cells black."""
    to_numpy = lambda v: v.detach().float().cpu().numpy() if torch.is_tensor(v) else np.asarray(v)
    columns = [[(to_numpy(v).reshape(v.shape[-3:]), kind) for v, kind in cells] for cells in columns]
    diffs = [np.abs(v).max() for cells in columns for v, kind in cells if kind == "difference"]
    diff_scale = max(diffs + [1e-8])
    panels = [[(s, kind) for v, kind in cells for s in mid_slices(v)] for cells in columns]
    ph = max(s.shape[0] for column in panels for s, _ in column)
    pw = max(s.shape[1] for column in panels for s, _ in column)
    zoom, gap = max(1, min_panel // max(ph, pw)), 2
    n_rows = max(len(column) for column in panels)
    canvas = np.zeros(((ph * zoom + gap) * n_rows, (pw * zoom + gap) * len(panels), 3), np.uint8)
    for c, column in enumerate(panels):
        for r, (s, kind) in enumerate(column):
            if kind == "difference":
                d = np.clip(s / diff_scale, -1, 1)
                rgb = np.stack([np.clip(d, 0, 1), np.zeros_like(d), np.clip(-d, 0, 1)], -1)
            else:
                rgb = np.repeat(np.clip(s, 0, 1)[..., None], 3, -1)
            rgb = (rgb * 255).round().astype(np.uint8).repeat(zoom, 0).repeat(zoom, 1)
            top = r * (ph * zoom + gap) + (ph * zoom - rgb.shape[0]) // 2  # centred in its cell
            left = c * (pw * zoom + gap) + (pw * zoom - rgb.shape[1]) // 2
            canvas[top:top + rgb.shape[0], left:left + rgb.shape[1]] = rgb
    write_png(path, canvas)
    return float(diff_scale) if diffs else None


def scan_meta(run, row):
    """The meta data.save_like needs to put a grid volume back on the scan's own voxels."""
    return data.load_scan(row["path"], run.preset.image_shape, run.preset.spacing,
                          run.ae_config["clip_percentile"] or None)[1]


def scan_name(row):
    return f"{row['subject']}_{row['session']}"


# ---- linear probes on y_sem and the two baselines (METHOD 6)


@dataclass
class Probe:
    l2: float
    w: torch.Tensor  # weights on the z-scored features
    b: torch.Tensor


def fit_probe(kind, X, y, groups):
    """A logistic or ridge probe on z-scored features X: l2 chosen on a by-subject split of X (choose_l2),
    then refit on all of X. The logistic l2 is chosen by validation log-loss (defined even when a
    validation fold holds one class only), the ridge l2 by validation MAE."""
    one_class = []

    def fit(X_fit, y_fit, l2):
        if kind == "ridge":
            return fit_ridge(X_fit, y_fit, l2)
        if y_fit.min() == y_fit.max():  # the fitting fold holds one diagnosis: no finite optimum
            one_class.append(l2)
            return torch.zeros(X_fit.shape[1], dtype=torch.float64), torch.tensor(20.0 * (2 * float(y_fit[0]) - 1))
        return fit_logistic(X_fit, y_fit, l2)

    if kind == "logistic":
        score = lambda Xv, yv, w, b: -float(F.binary_cross_entropy(predict_logistic(Xv, w, b), yv.double()))
    else:
        score = lambda Xv, yv, w, b: -float((predict_ridge(Xv, w, b) - yv.double()).abs().mean())
    l2 = choose_l2(fit, score, X, y, groups, L2_GRID)
    if one_class:
        l2 = 1.0
        print("warning: the by-subject l2 search left one diagnosis in its fitting fold (too few subjects); "
              "using l2 = 1 (sklearn's default C = 1)")
    w, b = fit(X, y, l2)
    return Probe(l2, w, b)


def probe_scores(kind, X_train, y_train, groups, X_test, y_test):
    """Fit on the train features, score on the test features: classification or regression metrics."""
    X_train, X_test = standardize(X_train.double(), X_test.double())
    probe = fit_probe(kind, X_train, y_train, groups)
    if kind == "logistic":
        metrics = classification_metrics(predict_logistic(X_test, probe.w, probe.b), y_test)
    else:
        metrics = regression_metrics(predict_ridge(X_test, probe.w, probe.b), y_test)
    return metrics | {"l2": probe.l2}


def ad_scans(run):
    """(train indices, test indices) of the AD and CN scans (MCI left out); train = train + val splits."""
    train = [i for i in run.indices("train", "val") if run.rows[i]["diagnosis"] in ("AD", "CN")]
    test = [i for i in run.indices("test") if run.rows[i]["diagnosis"] in ("AD", "CN")]
    for name, indices in (("train+val", train), ("test", test)):
        present = {run.rows[i]["diagnosis"] for i in indices}
        if present != {"AD", "CN"}:
            missing = " and ".join(d for d in ("AD", "CN") if d not in present)
            raise SystemExit(f"error: the {name} split of {run.path / 'ae.pt'} has no {missing} scan, so AD vs CN "
                             f"cannot be scored; use a cohort with both diagnoses in every split (data.make_split "
                             f"stratifies by diagnosis) and retrain")
    return train, test


# The synthetic cohorts' ground truth: the procedural cohort's structure sizes, measured on its label maps, and a
# --from cohort's atrophy, the amounts its warp applied to each scan.
MEASURES = ("ventricle_ml", "hippocampus_ml", "cortex_thickness_mm", "cortical_thinning_mm", "ventricle_expansion")


def cohort_measures(run, scans):
    """The MEASURES the cohort table gives for every one of the scans (none for a cohort of your own)."""
    values = lambda m: [data._float(run.rows[i].get(m)) for i in scans]
    return [m for m in MEASURES if all(v is not None and math.isfinite(v) for v in values(m))]


def probe_features(run, y_sem, y_sem_untrained, train, test, measures):
    """(train, test) features per method, fitted on train only: y_sem (rows of the (N, y_dim) y_sem), the same
    from the encoder's random start (what training added), PCA of the voxels (k = min(50, n - 1)), the
    flattened AE latent, the intensity histogram (the tissue composition alone); and given the cohort's measures
    (cohort_measures), those: a ceiling, what a code that knew the atrophy exactly would score."""
    voxels = lambda idx: torch.tensor(np.asarray(run.images[idx]).reshape(len(idx), -1))  # (n, D * H * W)
    train_voxels, test_voxels = voxels(train), voxels(test)
    mean, components, _ = pca_fit(train_voxels, 50)
    features = {"ldae": (y_sem[train], y_sem[test]),
                "baseline_untrained_encoder": (y_sem_untrained[train], y_sem_untrained[test]),
                "baseline_pca": (pca_transform(train_voxels, mean, components),
                                 pca_transform(test_voxels, mean, components)),
                "baseline_latent": (run.latents[train].flatten(1), run.latents[test].flatten(1)),
                "baseline_histogram": (intensity_histogram(train_voxels), intensity_histogram(test_voxels))}
    if measures:
        measured = lambda idx: torch.tensor([[float(run.rows[i][m]) for m in measures] for i in idx])
        features["reference_measured_atrophy"] = measured(train), measured(test)
    return features


def subject_folds(run, scans, k, seed):
    """Split scans into k folds by subject, round-robin over shuffled subjects sorted by their first
    diagnosis, so each fold gets its share of every diagnosis."""
    first = {}
    for i in scans:
        first.setdefault(run.rows[i]["subject"], run.rows[i]["diagnosis"])
    if len(first) < 2 * k:
        raise SystemExit(f"error: --folds {k} needs at least {2 * k} subjects, {run.path / 'ae.pt'} has {len(first)}")
    subjects = sorted(first, key=str)
    order = torch.randperm(len(subjects), generator=torch.Generator().manual_seed(seed)).tolist()
    ranked = sorted((subjects[j] for j in order), key=lambda s: first[s])  # stable: shuffled within a diagnosis
    fold_of = {s: n % k for n, s in enumerate(ranked)}
    return [[i for i in scans if fold_of[run.rows[i]["subject"]] == f] for f in range(k)]


def probe_task(run, cfg, kind):
    """The y_sem probe beside four baselines fed to the same probe: y_sem of the untrained encoder, PCA of the
    voxels, the flattened AE latent, the intensity histogram. Scored on the run's test split, and by K-fold
    cross-validation over every scan (--folds; 5 by default where the cohort has 10 subjects or more). Where the
    cohort has measured structure sizes, the age task also fits each size from each feature (same ridge probe)
    and reports R^2 as r2_<measure>: which of the atrophy a feature carries."""
    if kind == "logistic":
        train, test = ad_scans(run)
        target = lambda idx: torch.tensor([float(run.rows[i]["diagnosis"] == "AD") for i in idx])
    else:
        train, test = run.indices("train", "val"), run.indices("test")
        if not test:
            raise SystemExit(f"error: the test split of {run.path / 'ae.pt'} is empty")
        target = lambda idx: torch.tensor([run.rows[i]["age"] for i in idx], dtype=torch.float64)
    scans = sorted(train + test)
    measures = cohort_measures(run, scans)
    y_sem, y_sem_untrained = torch.zeros(2, len(run.rows), run.preset.y_dim)
    y_sem[scans] = semantic(run, scans, cfg.batch_size)
    y_sem_untrained[scans] = semantic(run, scans, cfg.batch_size, "untrained encoder", untrained_encoder(run))

    def scores(fit_idx, test_idx):
        groups, y_fit, y_test = [run.rows[i]["subject"] for i in fit_idx], target(fit_idx), target(test_idx)
        features = probe_features(run, y_sem, y_sem_untrained, fit_idx, test_idx, measures)
        out = {name: probe_scores(kind, X_fit, y_fit, groups, X_test, y_test)
               for name, (X_fit, X_test) in features.items()}
        if kind == "ridge":  # the floor a feature has to beat: every test scan gets the mean training age
            out["baseline_mean_age"] = regression_metrics(torch.full_like(y_test, float(y_fit.mean())), y_test)
        if kind == "ridge" and "reference_measured_atrophy" in features:  # what each feature carries of each size
            sizes_fit, sizes_test = features.pop("reference_measured_atrophy")
            for name, (X_fit, X_test) in features.items():
                for j, measure in enumerate(measures):
                    fitted = probe_scores(kind, X_fit, sizes_fit[:, j], groups, X_test, sizes_test[:, j])
                    out[name][f"r2_{measure}"] = fitted["r2"]
        return out

    result = scores(train, test) | {"n_train": len(train), "n_test": len(test),
                                    "pca_components": min(50, len(train) - 1),
                                    "y_sem_spread": ldae.spread_of(y_sem[test])}
    k = cfg.folds
    if k is None:
        k = 5 if len({run.rows[i]["subject"] for i in scans}) >= 10 else 0
    if k:
        folds = subject_folds(run, scans, k, cfg.seed)
        per_fold = [scores([i for g in folds if g is not fold for i in g], fold)
                    for fold in tqdm(folds, desc="cross-validation")]
        headline = "roc_auc" if kind == "logistic" else "mae"
        result["cross_validation"] = {name: {metric: float(np.mean([f[name][metric] for f in per_fold]))
                                             for metric in per_fold[0][name] if metric != "l2"}
                                      for name in per_fold[0]}
        result["cross_validation"] |= {"folds": k, f"per_fold_{headline}": {
            name: [f[name][headline] for f in per_fold] for name in per_fold[0]}}
    return result


def task_ad(run, cfg):
    """AD vs CN logistic probe; AD is the positive class (AUC is the same either way)."""
    return probe_task(run, cfg, "logistic") | {"positive_class": "AD"}


def task_age(run, cfg):
    """Age ridge probe over every diagnosis; MAE and RMSE in years, beside guessing the mean training age."""
    return probe_task(run, cfg, "ridge")


# ---- reconstruction (METHOD 5)


def steps_list(cfg, default):
    return [int(s) for s in (cfg.steps_list or default).split(",")]


def task_reconstruct(run, cfg):
    """AE alone; LDAE through DDIM-encoded z_T for each S; LDAE from y_sem only with z_T ~ N(0, I), and from the
    same z_T with another subject's y_sem: the scan is in y_sem if its own decodes closer to it."""
    indices = run.indices("test")[:cfg.max_scans]
    if not indices:
        raise SystemExit(f"error: the test split of {run.path / 'ae.pt'} is empty")
    steps = steps_list(cfg, "10,20,50,100")
    y_sem = semantic(run, indices, cfg.batch_size).to(run.device)  # (N, y_dim)
    partner = other_subject_partner([run.rows[i]["subject"] for i in indices])
    per_scan = {"autoencoder": []} | {f"ldae_S{s}": [] for s in steps} | {"ldae_random_zT": []}
    ssim_other_subject = []
    generator = torch.Generator().manual_seed(cfg.seed)
    for chunk in batches(list(range(len(indices))), cfg.batch_size, "reconstruct"):  # positions in indices
        scans = [indices[p] for p in chunk]
        x, z0, y = run.x(scans), run.latents[scans].to(run.device), y_sem[chunk]
        per_scan["autoencoder"] += image_metrics(decode_latent(run, z0), x)
        for s in steps:
            z_T = ddim_encode(run, z0, y, s)
            per_scan[f"ldae_S{s}"] += image_metrics(ddim_decode(run, z_T, y, s, cfg.clip_z0), x)
        z_T = torch.randn(z0.shape, generator=generator)
        per_scan["ldae_random_zT"] += image_metrics(ddim_decode(run, z_T, y, max(steps), cfg.clip_z0), x)
        if partner:
            y_other = y_sem[[partner[p] for p in chunk]]
            ssim_other_subject += ldae.ssim3d(ddim_decode(run, z_T, y_other, max(steps), cfg.clip_z0), x).tolist()
    result = {name: mean_metrics(m) for name, m in per_scan.items()}
    train = run.indices("train")
    result["latent_readout"] = latent_readout(run, semantic(run, train, cfg.batch_size, "y_sem of training scans"),
                                              train, y_sem.cpu(), indices)
    losses = stage2b_loss_by_y_sem(run, run.latents[indices], y_sem, cfg.seed, partner)
    # how much a y_sem that knew each latent exactly could save, on a Gaussian model of the training latents, and of
    # that the part a code could save by knowing each visit once it knows the subject (docs/results.md)
    bound, within = float(run.diffusion.code_saving(run.latents[train]).mean()), within_subject_bound(run, train)
    share = lambda part: part / bound if part is not None and bound > 0 else None
    losses |= {"perfect_code_bound": bound, "within_subject_bound": within, "within_subject_share": share(within)}
    if partner:
        losses["gap_over_bound"] = share(losses["mean_gap_other_minus_own"])
        ssim_own = [m["ssim"] for m in per_scan["ldae_random_zT"]]
        result["random_zT_own_vs_other_subject"] = {
            "own_better_fraction": sum(a > b for a, b in zip(ssim_own, ssim_other_subject)) / len(ssim_own),
            "ssim_own_mean": sum(ssim_own) / len(ssim_own),
            "ssim_other_mean": sum(ssim_other_subject) / len(ssim_other_subject)}
    return result | {"random_zT_steps": max(steps), "clip_z0": cfg.clip_z0 or None, "stage2b_loss": losses,
                     "y_sem_spread": ldae.spread_of(y_sem)}


def latent_readout(run, y_train, train, y_test, test):
    """Does y_sem carry a new scan as it carries a training scan? A ridge map from y_sem to the scaled latent, fitted
    on the training scans (l2 chosen on a by-subject split), and the share of the test latents' variance about
    their mean that it explains (1 - SSE / SST; below 0 when it predicts worse than their mean). Beside it the same
    share for the training latents' first y_dim principal components, the linear code of that size that fits the
    training latents best: about as much of a new subject's latent as a code learned from these subjects carries."""
    L_train, L_test = run.latents[train].flatten(1).double(), run.latents[test].flatten(1).double()
    explained = lambda pred: 1 - float(((pred - L_test) ** 2).sum() / ((L_test - L_test.mean(0)) ** 2).sum())
    X_train, X_test = standardize(y_train.double(), y_test.double())
    mse = lambda X, L, w, b: -float(((predict_ridge(X, w, b) - L) ** 2).mean())
    l2 = choose_l2(fit_ridge, mse, X_train, L_train, [run.rows[i]["subject"] for i in train], L2_GRID)
    w, b = fit_ridge(X_train, L_train, l2)
    mean, components, _ = pca_fit(L_train, y_train.shape[1])
    return {"y_sem": explained(predict_ridge(X_test, w, b)), "l2": l2,
            "latent_pca": explained(pca_transform(L_test, mean, components) @ components + mean)}


def scans_by_subject(run, indices):
    """{subject: its scans among indices, in the order given}."""
    by_subject = {}
    for i in indices:
        by_subject.setdefault(run.rows[i]["subject"], []).append(i)
    return by_subject


def within_subject_bound(run, indices):
    """The perfect-code bound (Diffusion.code_saving) of the scans' latents about their own subject's mean latent:
    what a code could save by knowing each visit once it knows whose scan it is. That is the change between visits
    (atrophy, and whatever else differs from scan to scan), not the subject's anatomy. Subjects seen once drop out;
    each deviation is scaled by sqrt(n / (n - 1)), n the subject's scans, so its variance is unbiased. None when
    no subject has two scans."""
    deviations = [(run.latents[s] - run.latents[s].mean(0)) * math.sqrt(len(s) / (len(s) - 1))
                  for s in scans_by_subject(run, indices).values() if len(s) > 1]
    if not deviations:
        return None
    return float(run.diffusion.code_saving(torch.cat(deviations)).mean())


def other_subject_partner(subjects):
    """For each scan (subjects: its subject, per scan), the position of a scan of a different subject; None when
    every scan is of one subject. Subjects, in order of first appearance, pass to the next one round a cycle, and
    a subject's j-th scan pairs with the next subject's scan j modulo its count: fixed, so reruns compare alike."""
    order = list(dict.fromkeys(subjects))
    if len(order) < 2:
        return None
    scans_of = {s: [p for p, q in enumerate(subjects) if q == s] for s in order}
    next_subject = dict(zip(order, order[1:] + order[:1]))
    partner = []
    for p, s in enumerate(subjects):
        others = scans_of[next_subject[s]]
        partner.append(others[scans_of[s].index(p) % len(others)])
    return partner


@torch.no_grad()
def stage2b_loss_per_scan(run, z0, y_sem, seed, draws):
    """Stage 2b's loss per scan, averaged over `draws` draws of (t, eps). The seed fixes the draws, so every y_sem
    meets the same timesteps and noise. (N,) float64 on the CPU, so means of differences are differences of means."""
    torch.manual_seed(seed)
    total = sum(run.diffusion.repr_loss_per_scan(run.unet, y_sem, z0) for _ in range(draws))
    return (total / draws).double().cpu()


def stage2b_loss_by_y_sem(run, z0, y_sem, seed, partner=None, draws=8):
    """Does the gradient estimator use y_sem? Stage 2b's loss on scans with scaled latents z0 with each scan's
    own y_sem, the next scan's, zeros, and (partner: other_subject_partner) another subject's, and with the
    estimator off (eps_theta alone). Equal losses mean the estimator ignores y_sem, and then so did the gradient
    that trained the encoder. Per scan, own below other subject says y_sem carries that scan, not only what the
    cohort shares; own below estimator off says the estimator's correction helps on these scans at all (on
    held-out scans it need not: a long stage 2b fits the training scans, and another subject's code then hurts
    more than the own code helps)."""
    z0, y_sem = z0.to(run.device), y_sem.to(run.device)
    variants = {"own_y_sem": y_sem, "next_scan_y_sem": y_sem.roll(1, 0), "zero_y_sem": 0 * y_sem,
                "estimator_off": None}
    if partner:
        variants["other_subject_y_sem"] = y_sem[partner]
    per_scan = {name: stage2b_loss_per_scan(run, z0, y, seed, draws) for name, y in variants.items()}
    losses = {name: float(loss.mean()) for name, loss in per_scan.items()}
    if partner:
        gap = per_scan["other_subject_y_sem"] - per_scan["own_y_sem"]
        losses |= {"own_below_other_subject_fraction": float((gap > 0).double().mean()),
                   "mean_gap_other_minus_own": float(gap.mean())}
    return losses


# ---- unconditional samples of the latent DDPM (METHOD 3)


def task_sample(run, cfg):
    """Does the latent DDPM alone make brains? z_T ~ N(0, I) decoded by eps_theta only (no y_sem), then the AE.

    Each sample is scored by its SSIM to the nearest training scan (nearest by L2 among the scaled training
    latents, both sides decoded by the AE, so the autoencoder's own blur is on both). High SSIM says a sample
    looks like one of the cohort's brains; but a copy of a training scan would score highest, so the figure
    to match is that of the real held-out test scans, which are brains and no copies. "noise" decodes z0 ~ N(0, I)
    directly: the training latents' average plus noise, which the decoder smooths into an average brain, close
    to every training scan in SSIM (0.87 on the demo, above the test scans' 0.84) yet far in the latent space.
    So read the latent distances too: a sample much farther from every training latent than the test scans
    are is off the data's distribution, one much nearer is a copy."""
    test = run.indices("test")
    if not test:
        raise SystemExit(f"error: the test split of {run.path / 'ae.pt'} is empty")
    generator = torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.n_samples, *run.latents.shape[1:])
    z_T, noise = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    samples = torch.cat([ddim_latent(run, z, None, cfg.steps, cfg.clip_z0).cpu()
                         for z in tqdm(z_T.split(cfg.batch_size), desc="sample")])
    groups = {"samples": samples, "test_scans": run.latents[test[:cfg.n_samples]], "noise": noise}
    scores = {name: nearest_training_scan(run, z0, cfg.batch_size) for name, z0 in groups.items()}
    out_dir = run.path / "eval" / "sample"
    out_dir.mkdir(parents=True, exist_ok=True)
    volumes = [decode_latent(run, z0[None].to(run.device))[0, 0].cpu() for z0 in samples]
    meta, files = scan_meta(run, run.rows[test[0]]), [f"sample{k}.nii.gz" for k in range(len(volumes))]
    for volume, file in zip(volumes, files):  # in the first test scan's space: a viewer needs some scan's affine
        data.save_like(volume, meta, out_dir / file)
    montage(out_dir / "samples.png", [[(v, "image")] for v in volumes[:4]])
    mean = lambda values: sum(values) / len(values)
    return {"nearest_training_ssim": {name: mean(ssim) for name, (ssim, _) in scores.items()},
            "nearest_training_distance": {name: mean(distance) for name, (_, distance) in scores.items()},
            "per_sample": {name: {"ssim": ssim, "distance": distance} for name, (ssim, distance) in scores.items()},
            "steps": cfg.steps, "n_samples": cfg.n_samples, "clip_z0": cfg.clip_z0 or None, "files": files,
            "png": "samples.png",
            "files_in_space_of": {"subject": run.rows[test[0]]["subject"], "session": run.rows[test[0]]["session"]},
            "note": "SSIM of each decoded latent to the AE decoding of its nearest training latent (L2, scaled "
                    "latent space); test_scans: real held-out scans, noise: z0 ~ N(0, I) decoded directly (the average "
                    "brain plus noise)"}


@torch.no_grad()
def nearest_training_scan(run, z0, batch_size):
    """(SSIM, L2 distance) per scaled latent of z0 (N, *latent_shape) to its nearest training latent: the SSIM
    between the AE decodings of the two."""
    train = run.indices("train")
    distance, nearest = torch.cdist(z0.flatten(1).float(), run.latents[train].flatten(1).float()).min(1)
    ssim = []
    for chunk in batches(list(range(len(z0))), batch_size):
        x = decode_latent(run, z0[chunk].to(run.device))
        x_train = decode_latent(run, run.latents[[train[j] for j in nearest[chunk].tolist()]].to(run.device))
        ssim += ldae.ssim3d(x, x_train).tolist()
    return ssim, distance.tolist()


# ---- manipulation along the AD direction (METHOD 6)


def load_labels(row, shape):
    """The synthetic cohort's label map in the scan's own voxels, or None (no labels column, other shape)."""
    if not row.get("labels"):
        return None
    labels = np.asanyarray(nib.load(row["labels"]).dataobj).astype(np.int64)
    return labels if labels.shape == tuple(shape) else None


def concentration(diff, labels):
    """Where |difference| sits: for ventricles (4) and hippocampus (5), their share of the brain's total
    |difference| beside their share of brain volume; enrichment = the ratio (1: no concentration)."""
    brain = labels > 0
    total, volume = float(np.abs(diff[brain]).sum()), int(brain.sum())
    out = {"brain_share_of_abs_difference": total / max(float(np.abs(diff).sum()), 1e-12)}
    for name, label in (("ventricles", data.VENTRICLES), ("hippocampus", data.HIPPOCAMPUS)):
        inside = labels == label
        diff_share = float(np.abs(diff[inside]).sum()) / max(total, 1e-12)
        volume_share = int(inside.sum()) / max(volume, 1)
        out[name] = {"difference_share": diff_share, "volume_share": volume_share,
                     "enrichment": diff_share / volume_share if volume_share else None}
    return out


def atrophy_reference(run, subject, out_dir):
    """What an edit that follows the cohort's own atrophy would score: the subject's change from its first to its
    last labelled visit, both label maps rendered without noise (data.noiseless_t1), taken through the model's
    grid and back as a decoded image is, concentration() on the first visit's labels. None without two labelled
    visits that differ. Writes {subject}_reference_difference.nii.gz."""
    visits = sorted((r for r in run.rows if r["subject"] == subject and r.get("labels")), key=lambda r: r["months"])
    if len(visits) < 2:
        return None
    images = [nib.load(r["labels"]) for r in (visits[0], visits[-1])]
    labels = [np.asanyarray(image.dataobj).astype(np.int64) for image in images]
    if (labels[0] == labels[1]).all():
        return None
    grid = [data.to_grid(data.noiseless_t1(label_map), image.affine, run.preset.image_shape, run.preset.spacing,
                         run.ae_config["clip_percentile"] or None, row["labels"])
            for row, image, label_map in zip((visits[0], visits[-1]), images, labels)]
    path = out_dir / f"{subject}_reference_difference.nii.gz"
    difference = data.save_like(grid[1][0] - grid[0][0], grid[0][1], path)
    return concentration(difference, labels[0]) | {"from": visits[0]["session"], "to": visits[-1]["session"],
                                                   "file": path.name}


def task_manipulate(run, cfg):
    """Move y_sem along the AD probe's direction and decode with the scan's own z_T.

    In z-scored y space y_n' = y_n + a u w/|w| (w: the AD-vs-CN probe weights; a > 0 toward AD), so
    y' = y + a u std * w/|w| in the encoder's units. METHOD's unit u = sqrt(d) grows with y's size, not its spread:
    at the cpu preset (d = 128) a = 1 moved y 3.3 times the distance between the CN and AD means along w, p(AD)
    saturated at |a| = 1 and the edits at a = -2 overshot (docs/design.md). The default u is that distance.
    Differences (manipulated - reconstruction) are written in the scan's own space, where the synthetic label map
    lives: no label resampling is needed, the difference is the one that went through data.save_like (linear
    interpolation back to the scan).
    """
    alphas = [float(a) for a in cfg.alphas.split(",")]
    if cfg.alpha_unit not in ("groups", "sqrt_d"):
        raise SystemExit(f"error: --alpha-unit {cfg.alpha_unit!r}: choose groups or sqrt_d")
    train, _ = ad_scans(run)
    y_train = semantic(run, train, cfg.batch_size).double()
    std = y_train.std(0, correction=0).clamp_min(1e-8)  # as standardize() does
    y_train_n, = standardize(y_train)
    is_ad = torch.tensor([float(run.rows[i]["diagnosis"] == "AD") for i in train])
    probe = fit_probe("logistic", y_train_n, is_ad, [run.rows[i]["subject"] for i in train])
    direction = probe.w / probe.w.norm()
    along = y_train_n @ direction
    separation = float(along[is_ad == 1].mean() - along[is_ad == 0].mean())  # z-scored units
    units = {"groups": separation, "sqrt_d": math.sqrt(y_train.shape[1])}
    step = units[cfg.alpha_unit] * std * direction  # one unit of a, in y units
    p_ad = lambda y: float(predict_logistic(standardize(y_train, y.double().cpu())[1], probe.w, probe.b)[0])
    out_dir = run.path / "eval" / "manipulate"
    out_dir.mkdir(parents=True, exist_ok=True)
    scans, monotonic, references = [], [], {}
    for i in tqdm(run.indices("test")[:cfg.n_scans], desc="manipulate"):
        row, meta = run.rows[i], scan_meta(run, run.rows[i])
        name, labels = scan_name(row), load_labels(row, meta["shape"])
        if labels is not None and row["subject"] not in references:
            references[row["subject"]] = atrophy_reference(run, row["subject"], out_dir)
        x = run.x([i])
        y = semantic(run, [i], 1, None).to(run.device)
        z_T = ddim_encode(run, run.latents[[i]], y, cfg.steps)
        recon = ddim_decode(run, z_T, y, cfg.steps, cfg.clip_z0)
        data.save_like(recon[0, 0], meta, out_dir / f"{name}_reconstruction.nii.gz")
        columns = {0.0: [(recon[0, 0], "image")]}  # the unedited reconstruction is a = 0
        p_ad_recon = p_ad(semantic_of(run, recon))
        p_ad_by_alpha = {0.0: p_ad_recon}  # the unedited reconstruction is a = 0
        for a in alphas:
            y_edit = y + a * step.float().to(run.device)
            edited = ddim_decode(run, z_T, y_edit, cfg.steps, cfg.clip_z0)
            diff = edited - recon
            tag = f"{name}_a{a:+g}"
            data.save_like(edited[0, 0], meta, out_dir / f"{tag}.nii.gz")
            data.save_like(diff[0, 0], meta, out_dir / f"{tag}_difference.nii.gz")
            columns[a] = [(edited[0, 0], "image"), (diff[0, 0], "difference")]
            entry = {"subject": row["subject"], "session": row["session"], "diagnosis": row["diagnosis"], "alpha": a,
                     "mean_abs_difference": float(diff.abs().mean()), "p_ad_input": p_ad(y),
                     "p_ad_of_reconstruction": p_ad_recon, "p_ad_edited_y": p_ad(y_edit),
                     "p_ad_of_edited_image": p_ad(semantic_of(run, edited)),
                     "files": [f"{tag}.nii.gz", f"{tag}_difference.nii.gz"]}
            if labels is not None:
                native_diff = np.asanyarray(nib.load(str(out_dir / f"{tag}_difference.nii.gz")).dataobj)
                entry |= concentration(native_diff, labels) | {"subject_atrophy": references[row["subject"]]}
            scans.append(entry)
            p_ad_by_alpha[a] = entry["p_ad_of_edited_image"]
        scale = montage(out_dir / f"{name}.png", [[(x[0, 0], "image")]] + [columns[a] for a in sorted(columns)])
        for entry in scans[-len(alphas):]:
            entry["png"], entry["png_difference_scale"] = f"{name}.png", scale
        p_sorted = [p for _, p in sorted(p_ad_by_alpha.items())]
        monotonic.append(all(p < q for p, q in zip(p_sorted, p_sorted[1:])))
    summary = {"monotonic_fraction": sum(monotonic) / len(monotonic)}
    shares = [s["ventricles"]["difference_share"] + s["hippocampus"]["difference_share"] for s in scans
              if "ventricles" in s]
    if shares:
        summary["ventricles_plus_hippocampus_share"] = sum(shares) / len(shares)
    shares = [r["ventricles"]["difference_share"] + r["hippocampus"]["difference_share"]
              for r in references.values() if r is not None]
    if shares:  # per subject: the same measure of each edited subject's own atrophy between visits
        summary["subject_atrophy_ventricles_plus_hippocampus_share"] = sum(shares) / len(shares)
    for region in ("ventricles", "hippocampus"):
        values = [s[region]["enrichment"] for s in scans if region in s and s[region]["enrichment"] is not None]
        if values:
            summary[f"{region}_enrichment_mean"] = sum(values) / len(values)
    return {"direction": "a > 0 moves y_sem toward AD", "alphas": alphas, "alpha_unit": cfg.alpha_unit,
            "alpha_unit_z": units[cfg.alpha_unit], "group_separation_z": separation, "sqrt_d": units["sqrt_d"],
            "steps": cfg.steps, "probe_l2": probe.l2,
            "scans": scans, "summary": summary,
            "montage_rows": "columns: input, then a in increasing order with the reconstruction as a = 0; rows: axial, "
                            "coronal, sagittal mid-slices of each image, then of its difference from the "
                            "reconstruction (red +, blue -, full colour at png_difference_scale)"}


# ---- interpolation between visits (METHOD 6)


def task_interpolate(run, cfg):
    """For each test subject with >= 3 visits and every (i, j >= i + 2, i < k < j): decode LERP(y) and
    SLERP(z_T) at a = (m_k - m_i) / (m_j - m_i); score against the real middle scan, per gap m_k - m_i."""
    subjects = {s: sorted(v, key=lambda i: run.rows[i]["months"])
                for s, v in scans_by_subject(run, run.indices("test")).items() if len(v) >= 3}
    if not subjects:
        raise SystemExit(f"error: no test subject of {run.path / 'ae.pt'} has 3 or more visits; interpolation "
                         "needs them")
    # Against the real middle scan every LDAE output carries the autoencoder's own error, which real visits do
    # not; so the baselines are also scored where upstream scores LDAE, on the autoencoder's reconstructions.
    scores = {"ldae": {}, "nearest_visit": {}, "linear_blend": {}, "ldae_vs_autoencoder": {},
              "nearest_visit_vs_autoencoder": {}, "linear_blend_vs_autoencoder": {}}

    def add(method, gap, x_hat, x):
        for m in image_metrics(x_hat, x):
            scores[method].setdefault(gap, []).append(m)

    for subject, idx in tqdm(subjects.items(), desc="interpolate"):
        months = [run.rows[i]["months"] for i in idx]
        x = run.x(idx)
        y = semantic_of(run, x)
        z_T = ddim_encode(run, run.latents[idx], y, cfg.steps)
        x_ae = decode_latent(run, run.latents[idx].to(run.device))
        triples = [(i, j, k) for i in range(len(idx)) for j in range(i + 2, len(idx)) for k in range(i + 1, j)]
        for i, j, k in triples:
            a = (months[k] - months[i]) / (months[j] - months[i])
            gap = f"{months[k] - months[i]:g}"
            x_hat = ddim_decode(run, ldae.slerp(z_T[[i]], z_T[[j]], a), ldae.lerp(y[[i]], y[[j]], a), cfg.steps,
                                cfg.clip_z0)
            nearest = i if months[k] - months[i] <= months[j] - months[k] else j
            add("ldae", gap, x_hat, x[[k]])
            add("nearest_visit", gap, x[[nearest]], x[[k]])
            add("linear_blend", gap, ldae.lerp(x[[i]], x[[j]], a), x[[k]])
            add("ldae_vs_autoencoder", gap, x_hat, x_ae[[k]])
            add("nearest_visit_vs_autoencoder", gap, x_ae[[nearest]], x_ae[[k]])
            add("linear_blend_vs_autoencoder", gap, ldae.lerp(x_ae[[i]], x_ae[[j]], a), x_ae[[k]])
    result = {method: {gap: {k: v for k, v in mean_metrics(m).items() if k in ("ssim", "ssim_brain", "mse", "n")}
                       for gap, m in sorted(per_gap.items(), key=lambda g: float(g[0]))}
              for method, per_gap in scores.items()}
    return result | {"steps": cfg.steps, "subjects": len(subjects), "gap_unit": "months"}


# ---- stochastic variations (METHOD 5)


def task_variations(run, cfg):
    """One test scan's y_sem with several z_T ~ N(0, I): what the semantic code fixes and what it leaves free."""
    test = run.indices("test")
    if not test:
        raise SystemExit(f"error: the test split of {run.path / 'ae.pt'} is empty")
    i = test[cfg.scan % len(test)]
    row, out_dir = run.rows[i], run.path / "eval" / "variations"
    out_dir.mkdir(parents=True, exist_ok=True)
    meta, name = scan_meta(run, row), scan_name(row)
    x = run.x([i])
    y = semantic_of(run, x)
    recon = ddim_decode(run, ddim_encode(run, run.latents[[i]], y, cfg.steps), y, cfg.steps, cfg.clip_z0)
    generator = torch.Generator().manual_seed(cfg.seed)
    z_T = torch.randn((cfg.n, *run.latents.shape[1:]), generator=generator)
    samples = torch.cat([ddim_decode(run, z, y, cfg.steps, cfg.clip_z0)
                         for z in tqdm(z_T.split(cfg.batch_size), desc="variations")])
    files = [f"{name}_reconstruction.nii.gz"] + [f"{name}_variation{k}.nii.gz" for k in range(cfg.n)]
    for volume, file in zip([recon[0, 0], *samples[:, 0]], files):
        data.save_like(volume, meta, out_dir / file)
    montage(out_dir / f"{name}.png",
            [[(x[0, 0], "image")], [(recon[0, 0], "image")]] + [[(s[0], "image")] for s in samples])
    to_input = image_metrics(samples, x.expand_as(samples))
    pairs = [(a, b) for a in range(cfg.n) for b in range(a + 1, cfg.n)]
    between = [float(ldae.ssim3d(samples[[a]], samples[[b]])) for a, b in pairs]
    return {"subject": row["subject"], "session": row["session"], "steps": cfg.steps, "n": cfg.n, "files": files,
            "png": f"{name}.png", "ssim_to_input": [m["ssim"] for m in to_input],
            "ssim_between_variations_mean": sum(between) / len(between) if between else None,
            "voxel_std_mean": float(samples.std(0).mean()) if cfg.n > 1 else None}


# ---- throughput: LDAE against a diffusion autoencoder in voxel space (METHOD 5)


def voxel_dae(run, base):
    """A DAE UNet of the same design on the image itself (1 channel): mults (1, 2, 4, 8) cut to what the
    grid divides by, attention at the coarsest level. Untrained: it is only timed."""
    levels = 1
    while levels < 4 and all(s % 2 ** levels == 0 for s in run.preset.image_shape):
        levels += 1
    mults = (1, 2, 4, 8)[:levels]
    config = dict(channels=1, base=base, mults=mults, blocks=run.preset.unet_blocks, attention=(2 ** (levels - 1),),
                  heads=1, dropout=0.0, y_dim=run.preset.y_dim)
    return ldae.UNet(**config).to(run.device, memory_format=ldae.memory_format(run.device)).eval(), config


def flops_per_call(make_unet, shape, y_dim):
    """FLOPs of one UNet call, counted on the meta device (no compute, and every convolution is seen)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = make_unet()
        z, y, t = torch.zeros(1, *shape), torch.zeros(1, y_dim), torch.zeros(1, dtype=torch.long)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            unet(z, t, y)
    return counter.get_total_flops()


def timed(fn, repeats, device):
    """Mean seconds of fn() over repeats calls (the caller warms up first)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


# One 3x3x3 Conv3d per (channels, spatial size): the sizes where the presets' networks spend their time, at about
# the same work each. A GPU needs larger problems to reach its rate (H100 bfloat16: 66 TFLOP/s at 64 channels and
# 32x40x32, 211 at batch 8 and 64x80x64).
CONV_SHAPES = {"cpu": [(1, 32, (48, 64, 48)), (1, 64, (32, 40, 32)), (1, 128, (32, 40, 32)), (1, 256, (16, 20, 16)),
                       (4, 512, (8, 10, 8))],
               "cuda": [(8, 64, (64, 80, 64)), (8, 128, (32, 40, 32)), (8, 256, (16, 20, 16))]}


def conv_rates(device, dtype=torch.float32):
    """FLOP/s of one Conv3d per shape of CONV_SHAPES and layout: {"64 ch 32x40x32 x1, channels_last_3d": rate}."""
    rates = {}
    for batch, channels, size in CONV_SHAPES[device.type]:
        conv = ldae.conv3(channels, channels).to(device, dtype)
        x = torch.randn(batch, channels, *size, device=device, dtype=dtype)
        flops = 2 * channels * channels * 27 * x[:, 0].numel()
        for layout in (torch.contiguous_format, torch.channels_last_3d):
            conv, x = conv.to(memory_format=layout), x.contiguous(memory_format=layout)
            with torch.no_grad():
                conv(x)
                name = f"{channels} ch {'x'.join(map(str, size))} x{batch}, {str(layout).replace('torch.', '')}"
                rates[name] = flops / timed(lambda: conv(x), 3, device)
    return rates


def conv_peak(device, dtype=torch.float32):
    """The machine's Conv3d rate (FLOP/s): the best of conv_rates, so percentages of it mean the same on every
    machine."""
    return max(conv_rates(device, dtype).values())


def autoencoder_training_rate(preset, device, checkpointing=False):
    """FLOP/s achieved by one autoencoder forward + backward as stage 1 runs it (its default precision and
    layout). With checkpointing the recomputed forward is not counted: the rate of useful work."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        preset.autoencoder()(torch.zeros(1, 1, *preset.image_shape))[0].abs().mean().backward()
    ctx, dtype = ldae.autocast(device, "auto")
    layout = ldae.memory_format(device, dtype)
    ae = preset.autoencoder(checkpointing).to(device, memory_format=layout)
    x = torch.rand(1, 1, *preset.image_shape, device=device).contiguous(memory_format=layout)

    def step():
        with ctx:
            loss = ae(x)[0].float().abs().mean()
        loss.backward()
    step()
    return counter.get_total_flops() / timed(step, 2, device)


def precision_check(run, x):
    """The inference precision in use, and what it changes: SSIM of the autoencoder's reconstruction of x
    under it minus under float32 (issue: bfloat16 only where this stays below 0.001)."""
    dtype = str(run.precision).replace("torch.", "")
    if run.precision == torch.float32:  # nothing to compare against: no second reconstruction
        return {"dtype": dtype, "ssim_change": 0.0, "max_abs_difference": 0.0}
    with torch.no_grad():
        reference = run.ae.decode(run.ae.encode(x)[0]).float()
        with run.amp:
            reduced = run.ae.decode(run.ae.encode(x)[0]).float()
    change = abs(ldae.ssim3d(reduced, x).item() - ldae.ssim3d(reference, x).item())
    return {"dtype": dtype, "ssim_change": change, "max_abs_difference": (reduced - reference).abs().max().item()}


def task_throughput(run, cfg):
    """Seconds per volume of a full reconstruction, batch 1: LDAE (semantic encode, AE encode, DDIM inversion,
    DDIM decode, AE decode) against the voxel DAE (semantic encode, DDIM inversion and decode on the image)."""
    steps = steps_list(cfg, "10,50,100")
    dae, dae_config = voxel_dae(run, cfg.dae_base)
    x = run.x(run.indices("test")[:1] or [0])
    diffusion = run.diffusion

    @torch.no_grad()
    def ldae_reconstruct(s):
        with run.amp:
            y = run.encoder(x)
            z0 = ldae.scale_latent(run.ae.encode(x)[0], run.latent_mean, run.latent_scale)
            z0 = diffusion.ddim_sample(run.unet, diffusion.ddim_encode(run.unet, z0, y, s), y, s)
            return run.ae.decode(ldae.unscale_latent(z0, run.latent_mean, run.latent_scale))

    @torch.no_grad()
    def dae_reconstruct(s):
        with run.amp:
            y = run.encoder(x)
            return diffusion.ddim_sample(dae, diffusion.ddim_encode(dae, x, y, s), y, s)

    for warm_up in (ldae_reconstruct, dae_reconstruct):  # one untimed volume each: allocations, kernel choice
        warm_up(min(steps))
    per_steps = []
    for s in tqdm(steps, desc="throughput"):
        t_ldae = timed(lambda: ldae_reconstruct(s), cfg.repeats, run.device)
        t_dae = timed(lambda: dae_reconstruct(s), cfg.repeats, run.device)
        per_steps.append({"steps": s, "ldae_s_per_volume": t_ldae, "dae_s_per_volume": t_dae,
                          "speedup": t_dae / t_ldae})
    latent_shape = tuple(run.latents.shape[1:])
    flops = {"ldae_unet": flops_per_call(run.preset.unet, latent_shape, run.preset.y_dim),
             "dae_unet": flops_per_call(lambda: ldae.UNet(**dae_config), (1, *run.preset.image_shape),
                                        run.preset.y_dim)}
    flops["ratio"] = flops["dae_unet"] / flops["ldae_unet"]
    params = lambda m: sum(p.numel() for p in m.parameters())
    largest = max(per_steps, key=lambda p: p["steps"])
    achieved = autoencoder_training_rate(run.preset, run.device)
    machine = {"conv3d_peak_gflops": conv_peak(run.device) / 1e9, "ae_train_gflops": achieved / 1e9}
    if run.device.type == "cuda" or ldae.cpu_has_bf16():
        machine["conv3d_peak_bf16_gflops"] = conv_peak(run.device, torch.bfloat16) / 1e9
    machine["ae_train_of_peak"] = achieved / 1e9 / max(v for k, v in machine.items() if "peak" in k)
    return largest | {"shape": list(run.preset.image_shape), "latent_shape": list(latent_shape),
                      "per_steps": per_steps, "flops_per_call": flops, "dae_config": dae_config,
                      "parameters": {"ldae_unet": params(run.unet), "dae_unet": params(dae)},
                      "device": str(run.device), "threads": torch.get_num_threads(), "machine": machine,
                      "inference_precision": precision_check(run, x),
                      "note": "top-level times are for the largest steps; each DDIM step is one network call, "
                              "inversion and decode both count"}


# ---- printing and the command line


def task_summary(run, cfg):
    """The README's results table for this run, from the JSON the other tasks wrote (nothing is recomputed):
    one row per measure, in the README's order and units, so a run can be compared with ours line by line.
    A measure whose task has not run names the command that makes it."""
    found = {t: json.loads((run.path / "eval" / f"{t}.json").read_text())
             for t in ("ad", "age", "reconstruct", "sample", "manipulate", "interpolate", "throughput")
             if (run.path / "eval" / f"{t}.json").exists()}
    rows, missing = [], []

    def row(measure, task, cell):
        command = f"python evaluate.py --out {run.path} --task {task}"
        if task in found:
            rows.append([measure, cell(found[task])])
        elif command not in missing:
            missing.append(command)

    def probe(result, metric, names):  # the K-fold figures where the task ran them, else the test split; "-" for
        # a baseline the JSON lacks (written before the histogram baseline existed)
        table, digits = result.get("cross_validation", result), {"roc_auc": 3, "mae": 2}[metric]
        reference = table.get("reference_measured_atrophy")
        return " / ".join(f"{table[n][metric]:.{digits}f}" if n in table else "-" for n in names) + (
            "" if reference is None else f" ({reference[metric]:.{digits}f})")

    def shortest_gap(result, method):  # interpolate's figures per gap in months, keyed by the gap
        return result[method][min(result[method], key=float)]

    def share_cell(summary):  # manipulate's concentration, where the cohort has label maps
        if "ventricles_plus_hippocampus_share" not in summary:
            return "no labels"
        own = summary.get("subject_atrophy_ventricles_plus_hippocampus_share")
        return f"{summary['ventricles_plus_hippocampus_share']:.0%}" + ("" if own is None else f" ({own:.0%})")

    def sizes_cell(result):  # the age task's R^2 of each measured size, where the cohort has them
        table = result.get("cross_validation", result)
        measures = [m for m in MEASURES if f"r2_{m}" in table["ldae"]]
        if not measures:
            return "no measured sizes"
        baselines = [n for n in ("baseline_pca", "baseline_histogram") if n in table]
        return ", ".join(f"{m} {table['ldae']['r2_' + m]:.2f} ("
                         + ", ".join(f"{table[n]['r2_' + m]:.2f}" for n in baselines) + ")" for m in measures)

    def off_cell(losses):  # reconstruct.json files written before the estimator-off loss was added lack it
        return f"{losses['estimator_off']:.5f}" if "estimator_off" in losses else "-"

    def within_cell(losses):  # None where no training subject has two visits; absent in older reconstruct.json
        share = losses.get("within_subject_share")
        return "-" if share is None else f"{share:.1%}"

    def encoded_cell(result):  # the README's row is at 100 steps; a --steps-list without 100 gives its most
        steps = max(int(k.removeprefix("ldae_S")) for k in result if k.startswith("ldae_S"))
        return f"{result['autoencoder']['ssim']:.3f} / {result[f'ldae_S{steps}']['ssim']:.3f}" + (
            "" if steps == 100 else f" ({steps} steps)")

    rows.append(["stage-1 validation SSIM", f"{ldae.load_checkpoint(run.path / 'ae.pt')['val_ssim']:.3f}"])
    row("reconstruction SSIM: autoencoder / LDAE, DDIM-encoded z_T, 100 steps", "reconstruct", encoded_cell)
    row("LDAE from y_sem and a random z_T, SSIM", "reconstruct", lambda r: f"{r['ldae_random_zT']['ssim']:.3f}")
    row("same z_T, own y_sem closer to the scan than another subject's", "reconstruct",
        lambda r: f"{r['random_zT_own_vs_other_subject']['own_better_fraction']:.0%} of scans")
    row("stage-2b loss, own / another subject's y_sem; scans where own is lower; estimator off", "reconstruct",
        lambda r: "{own_y_sem:.5f} / {other_subject_y_sem:.5f}; {own_below_other_subject_fraction:.0%}; ".format(
            **r["stage2b_loss"]) + off_cell(r["stage2b_loss"]))
    row("that gap / what a perfect code could save", "reconstruct",
        lambda r: "{mean_gap_other_minus_own:.4f} / {perfect_code_bound:.4f} ({gap_over_bound:.0%})".format(
            **r["stage2b_loss"]))
    row("share of that bound between one subject's visits (room for the atrophy)", "reconstruct",
        lambda r: within_cell(r["stage2b_loss"]))
    row("y_sem spread / magnitude / effective rank (test scans)", "reconstruct",
        lambda r: "{spread:.2f} / {magnitude:.2f} / {effective_rank:.1f}".format(**r["y_sem_spread"]))
    row("AD vs CN ROC-AUC (5-fold): y_sem / untrained encoder / PCA / AE latent / histogram (measured atrophy)",
        "ad", lambda r: probe(r, "roc_auc", ("ldae", "baseline_untrained_encoder", "baseline_pca", "baseline_latent",
                                             "baseline_histogram")))
    row("age MAE, y (5-fold): y_sem / untrained encoder / PCA / histogram / mean age (measured atrophy)",
        "age", lambda r: probe(r, "mae", ("ldae", "baseline_untrained_encoder", "baseline_pca", "baseline_histogram",
                                          "baseline_mean_age")))
    row("measured atrophy from y_sem, R^2 (5-fold), each measure (from PCA, from the histogram)", "age",
        sizes_cell)
    row("DDPM samples: SSIM / latent distance to the nearest training scan (test scans)", "sample",
        lambda r: "{:.3f} / {:.0f} ({:.3f} / {:.0f})".format(
            r["nearest_training_ssim"]["samples"], r["nearest_training_distance"]["samples"],
            r["nearest_training_ssim"]["test_scans"], r["nearest_training_distance"]["test_scans"]))
    row("manipulation: p(AD) of the re-encoded edit monotonic in a; ventricles + hippocampus share of the change "
        "(of the subjects' own atrophy)", "manipulate", lambda r: "{:.0%}; {}".format(
            r["summary"]["monotonic_fraction"], share_cell(r["summary"])))
    row("interpolation, shortest gap, in the autoencoder's frame: LDAE / nearest visit, SSIM", "interpolate",
        lambda r: "{:.3f} / {:.3f} ({:g} months)".format(
            shortest_gap(r, "ldae_vs_autoencoder")["ssim"], shortest_gap(r, "nearest_visit_vs_autoencoder")["ssim"],
            min(map(float, r["ldae_vs_autoencoder"]))))
    row("throughput, the most DDIM steps timed: LDAE / voxel-space DAE, s per volume (speed-up)", "throughput",
        lambda r: "{ldae_s_per_volume:.2f} / {dae_s_per_volume:.2f} ({speedup:.1f}x, {steps} steps)".format(**r))
    return {"rows": rows, "missing": missing}


def print_table(task, result):
    """A readable summary: one line per method (dict of numbers), nested per gap where there is one."""
    print(f"\n{task}")
    for name, value in result.items():
        if isinstance(value, dict) and value and all(isinstance(v, (int, float)) or v is None for v in value.values()):
            cells = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items())
            print(f"  {name:<22} {cells}")
        elif isinstance(value, dict) and any(isinstance(v, dict) for v in value.values()):
            for sub, inner in value.items():
                if isinstance(inner, dict) and all(isinstance(v, (int, float)) for v in inner.values()):
                    cells = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in inner.items())
                    print(f"  {name:<22} {sub:<18} {cells}")
        elif isinstance(value, (int, float, str)):
            print(f"  {name:<22} {value:.4g}" if isinstance(value, float) else f"  {name:<22} {value}")


def main(cfg):
    if cfg.task not in TASKS:
        raise SystemExit(f"error: --task {cfg.task!r}: choose one of {', '.join(TASKS)}")
    print(json.dumps(asdict(cfg), indent=1))
    torch.manual_seed(cfg.seed)
    run = open_run(cfg)
    with ldae.heap_memory():
        result = globals()[f"task_{cfg.task}"](run, cfg)
    result["config"] = asdict(cfg)
    path = run.path / "eval" / f"{cfg.task}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, allow_nan=True))
    if cfg.task == "throughput":
        for p in result["per_steps"]:
            print(f"  T={p['steps']:<4} LDAE {p['ldae_s_per_volume']:.3f} s/volume   "
                  f"voxel DAE {p['dae_s_per_volume']:.3f} s/volume   speed-up {p['speedup']:.1f}x")
        f = result["flops_per_call"]
        print(f"  FLOPs per UNet call: LDAE {f['ldae_unet']:.3g}, voxel DAE {f['dae_unet']:.3g} ({f['ratio']:.1f}x)")
        m = result["machine"]
        peak = max(v for k, v in m.items() if "peak" in k)
        print(f"  Conv3d peak {peak:.0f} GFLOP/s (float32 or bfloat16, the faster); autoencoder training step "
              f"{m['ae_train_gflops']:.0f} GFLOP/s = {100 * m['ae_train_of_peak']:.0f}% of it")
    elif cfg.task == "summary":
        print("\n| measure | this run |\n| --- | --- |")
        for measure, value in result["rows"]:
            print(f"| {measure} | {value} |")
        for command in result["missing"]:
            print(f"not yet run: {command}")
        print(f"wrote {path}")
        return
    elif cfg.task == "manipulate":
        for s in result["scans"]:
            regions = "  ".join(f"{r} {s[r]['difference_share']:.3f} of |diff| vs {s[r]['volume_share']:.3f} of brain"
                                for r in ("ventricles", "hippocampus") if r in s)
            print(f"  {s['subject']} {s['session']} a={s['alpha']:+g}  mean|diff| {s['mean_abs_difference']:.4f}  "
                  f"p(AD) {s['p_ad_input']:.2f}->{s['p_ad_of_edited_image']:.2f}  {regions}")
    print_table(cfg.task, result)
    print(f"wrote {path}")


if __name__ == "__main__":
    try:
        main(ldae.parse_config(Config))
    except (data.DataError, ldae.CheckpointError) as e:
        raise SystemExit(f"error: {e}")
