"""Evaluate a trained LDAE run: probes, reconstruction, manipulation, interpolation, variations, throughput.

The first part holds the metrics and the linear probes (METHOD.md section 6) as plain
functions on torch tensors; the evaluation tasks that use them follow below it.
Probes run in float64: the inputs are cast there, whatever dtype the caller passes.
"""
import math

import torch
import torch.nn.functional as F

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


def fit_logistic(X, y, l2=1.0, max_rounds=20, grad_tol=1e-7):
    """Fit logistic regression with L-BFGS (strong Wolfe line search) to convergence. Returns (w, b)."""
    X, y = X.double(), y.double().flatten()
    params = torch.zeros(X.shape[1] + 1, dtype=torch.float64, requires_grad=True)  # (d + 1,) = [w, b]
    optimizer = torch.optim.LBFGS([params], lr=1.0, max_iter=500, history_size=20,
                                  tolerance_grad=grad_tol / 100, tolerance_change=1e-15,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = logistic_objective(X, y, params[:-1], params[-1], l2)
        loss.backward()
        return loss

    # One LBFGS step runs up to max_iter iterations; restart it until the gradient vanishes.
    for _ in range(max_rounds):
        optimizer.step(closure)
        closure()  # gradient at the final point (the line search may have evaluated elsewhere last)
        if params.grad.abs().max() <= grad_tol:
            break
    else:
        raise RuntimeError(f"fit_logistic did not converge: max |grad| = {params.grad.abs().max():.2e}; "
                           "raise l2 or standardize the features")
    params = params.detach()
    return params[:-1], params[-1]


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
    """PCA by SVD of the centred data. k is capped at min(n - 1, d).

    Returns (mean (d,), components (k, d) with orthonormal rows, explained_variance (k,) descending).
    The thin SVD costs O(n^2 d), fine for n in the hundreds even with d in the 100k voxels.
    """
    X = X.double()
    n, d = X.shape
    k = min(k, n - 1, d)
    mean = X.mean(0)
    _, singular_values, Vh = torch.linalg.svd(X - mean, full_matrices=False)
    return mean, Vh[:k], singular_values[:k].square() / (n - 1)


def pca_transform(X, mean, components):
    """Project onto the principal components: (n, d) -> (n, k)."""
    return (X.double() - mean) @ components.T


def regression_metrics(pred, target):
    error = pred.double().flatten() - target.double().flatten()
    return {"mae": float(error.abs().mean()), "rmse": float(error.square().mean().sqrt())}


def psnr(x, y, data_range=1.0):
    """Peak signal-to-noise ratio in dB over all elements: 10 log10(data_range^2 / MSE)."""
    mse = float((x.double() - y.double()).square().mean())
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


# -----------------------------------------------------------------------------
# Evaluation tasks (probes, reconstruction, manipulation, interpolation, variations, throughput)
