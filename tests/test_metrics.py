import math

import numpy as np
import pytest
import torch

from evaluate import (choose_l2, classification_metrics, fit_logistic, fit_ridge, logistic_objective,
                      pca_fit, pca_transform, predict_logistic, predict_ridge, psnr, regression_metrics,
                      roc_auc, standardize)


def t(values):
    return torch.tensor(values, dtype=torch.float64)


# ---- ROC-AUC and classification metrics


def test_roc_auc_matches_hand_counted_pairs():
    # positives {0.8, 0.4}, negatives {0.6, 0.1}: pairs won 0.8>0.6, 0.8>0.1, 0.4>0.1; lost 0.4<0.6 -> 3/4
    assert roc_auc(t([0.8, 0.6, 0.4, 0.1]), t([1, 0, 1, 0])) == pytest.approx(0.75)


def test_roc_auc_counts_ties_as_half():
    # positives {0.5, 0.9}, negatives {0.5, 0.2}: 0.5 vs 0.5 tie (1/2), 0.5>0.2, 0.9>0.5, 0.9>0.2 -> 3.5/4
    assert roc_auc(t([0.5, 0.5, 0.9, 0.2]), t([1, 0, 1, 0])) == pytest.approx(0.875)
    # all scores equal -> every pair ties -> 0.5
    assert roc_auc(t([0.3] * 5), t([1, 0, 1, 0, 0])) == pytest.approx(0.5)


def test_roc_auc_is_one_when_separable_and_zero_when_reversed():
    scores, labels = t([0.1, 0.2, 0.3, 0.7, 0.8, 0.9]), t([0, 0, 0, 1, 1, 1])
    assert roc_auc(scores, labels) == 1.0
    assert roc_auc(-scores, labels) == 0.0


def test_roc_auc_of_random_scores_is_about_half():
    g = torch.Generator().manual_seed(0)
    scores, labels = torch.rand(4000, generator=g), torch.randint(0, 2, (4000,), generator=g)
    assert abs(roc_auc(scores, labels) - 0.5) < 0.05


def test_roc_auc_raises_with_one_class():
    with pytest.raises(ValueError):
        roc_auc(t([0.1, 0.9]), t([1, 1]))


def test_classification_metrics_match_hand_confusion_matrix():
    # threshold 0.5 -> predicted [1, 1, 1, 0, 0, 1, 0, 0]; TP=2, FP=2, FN=1, TN=3
    scores = t([0.9, 0.6, 0.7, 0.2, 0.4, 0.55, 0.1, 0.3])
    labels = t([1, 1, 0, 1, 0, 0, 0, 0])
    m = classification_metrics(scores, labels)
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["precision"] == pytest.approx(2 / 4)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3))
    # positives {0.9, 0.6, 0.2} beat negatives {0.7, 0.4, 0.55, 0.1, 0.3} in 5 + 4 + 1 of 15 pairs
    assert m["roc_auc"] == pytest.approx(10 / 15)


# ---- standardize


def test_standardize_gives_zero_mean_unit_std_on_train_and_keeps_constant_features_finite():
    g = torch.Generator().manual_seed(1)
    train = torch.randn(50, 4, generator=g, dtype=torch.float64) * 3 + 7
    train[:, 3] = 2.0  # constant feature
    test = torch.randn(10, 4, generator=g, dtype=torch.float64)
    train_z, test_z = standardize(train, test)
    assert torch.allclose(train_z.mean(0), torch.zeros(4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(train_z[:, :3].std(0, correction=0), torch.ones(3, dtype=torch.float64))
    assert torch.isfinite(test_z).all() and (train_z[:, 3] == 0).all()
    assert torch.allclose(test_z[:, 0], (test[:, 0] - train[:, 0].mean()) / train[:, 0].std(correction=0))


# ---- logistic regression


def two_blobs(n=100, gap=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    X = torch.randn(n, 2, generator=g, dtype=torch.float64) * 0.5
    X[:, 0] += gap * (y - 0.5)  # classes separated along the first axis
    return X, y.double()


def test_logistic_separates_two_blobs():
    X, y = two_blobs()
    w, b = fit_logistic(X, y, l2=0.1)
    m = classification_metrics(predict_logistic(X, w, b), y)
    assert m["accuracy"] == 1.0 and m["roc_auc"] == 1.0


def test_logistic_objective_gradient_vanishes_at_solution():
    X, y = two_blobs(gap=1.0)  # overlapping classes: a well-posed interior optimum
    w, b = fit_logistic(X, y, l2=1.0)
    w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
    logistic_objective(X, y, w, b, 1.0).backward()
    assert w.grad.abs().max() < 1e-6 and b.grad.abs() < 1e-6
    assert w.abs().max() > 0.1  # not the trivial zero start


def test_stronger_l2_shrinks_logistic_weights():
    X, y = two_blobs(gap=1.0)
    norms = [fit_logistic(X, y, l2=l2)[0].norm() for l2 in (0.01, 10.0, 1000.0)]
    assert norms[0] > norms[1] > norms[2]


# ---- ridge regression


def test_ridge_matches_lstsq_as_l2_goes_to_zero():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = X @ t([1.0, -2.0, 0.5, 0.0, 3.0]) + 4.0 + 0.1 * torch.randn(40, generator=g, dtype=torch.float64)
    w, b = fit_ridge(X, y, l2=1e-10)
    design = np.hstack([X.numpy(), np.ones((40, 1))])
    solution = np.linalg.lstsq(design, y.numpy(), rcond=None)[0]
    np.testing.assert_allclose(w.numpy(), solution[:5], atol=1e-8)
    assert float(b) == pytest.approx(solution[5], abs=1e-8)


def ridge_normal_equation(X, y, l2):
    """[w; b] = (A^T A + P)^-1 A^T y with A = [X, 1] and P = diag(l2, ..., l2, 0): intercept unpenalised."""
    A = np.hstack([X, np.ones((len(X), 1))])
    P = l2 * np.eye(A.shape[1])
    P[-1, -1] = 0.0
    return np.linalg.solve(A.T @ A + P, A.T @ y)


@pytest.mark.parametrize("n, d", [(40, 5), (10, 30)])  # primal (n >= d) and dual (n < d) paths
def test_ridge_matches_normal_equation_with_unpenalised_intercept(n, d):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) + 1.0
    y = torch.randn(n, 2, generator=g, dtype=torch.float64)  # two targets at once
    w, b = fit_ridge(X, y, l2=2.5)
    solution = ridge_normal_equation(X.numpy(), y.numpy(), 2.5)
    np.testing.assert_allclose(w.numpy(), solution[:d], atol=1e-10)
    np.testing.assert_allclose(b.numpy(), solution[d], atol=1e-10)


def test_ridge_with_more_features_than_samples_fits_training_targets():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(20, 5000, generator=g, dtype=torch.float64)
    y = torch.randn(20, generator=g, dtype=torch.float64) * 10 + 70
    w, b = fit_ridge(X, y, l2=1e-6)
    assert torch.isfinite(w).all()
    assert regression_metrics(predict_ridge(X, w, b), y)["mae"] < 1e-4


def test_choose_l2_prefers_small_l2_on_clean_data_and_splits_by_subject():
    g = torch.Generator().manual_seed(5)
    X = torch.randn(60, 3, generator=g, dtype=torch.float64)
    y = X @ t([5.0, -5.0, 5.0])  # noiseless: heavy shrinkage can only hurt
    subjects = [f"S{i // 3}" for i in range(60)]  # 3 scans per subject
    seen = []

    def fit(X_train, y_train, l2):
        seen.append(len(X_train))
        return fit_ridge(X_train, y_train, l2)

    def score(X_val, y_val, w, b):
        return -regression_metrics(predict_ridge(X_val, w, b), y_val)["mae"]

    assert choose_l2(fit, score, X, y, subjects, [1e3, 1e-3, 1e1]) == 1e-3
    assert seen[0] == 42  # 14 of 20 subjects, 3 scans each, in the fitting part


# ---- PCA


def test_pca_components_are_orthonormal_and_variance_sorted():
    g = torch.Generator().manual_seed(6)
    X = torch.randn(30, 8, generator=g, dtype=torch.float64) * torch.arange(1, 9, dtype=torch.float64)
    mean, components, variance = pca_fit(X, 5)
    assert components.shape == (5, 8)
    assert torch.allclose(components @ components.T, torch.eye(5, dtype=torch.float64), atol=1e-10)
    assert (variance[:-1] >= variance[1:]).all()
    # the variance along each component equals the explained variance reported
    assert torch.allclose(pca_transform(X, mean, components).var(0), variance)


def test_pca_reconstructs_rank_k_data_exactly_and_caps_k():
    g = torch.Generator().manual_seed(7)
    X = (torch.randn(25, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 40, generator=g, dtype=torch.float64)
         + torch.randn(40, generator=g, dtype=torch.float64))  # rank 3 around an offset
    mean, components, _ = pca_fit(X, 3)
    reconstruction = pca_transform(X, mean, components) @ components + mean
    assert torch.allclose(reconstruction, X, atol=1e-10)
    assert pca_fit(X[:4], 10)[1].shape == (3, 40)  # k capped at n - 1


# ---- regression metrics and PSNR


def test_regression_metrics_by_hand():
    m = regression_metrics(t([1.0, 2.0, 5.0]), t([2.0, 2.0, 2.0]))  # errors -1, 0, 3
    assert m["mae"] == pytest.approx(4 / 3)
    assert m["rmse"] == pytest.approx(math.sqrt(10 / 3))


def test_r2_is_one_for_a_perfect_fit_zero_for_the_mean_and_by_hand_otherwise():
    target = t([1.0, 2.0, 3.0, 6.0])  # mean 3, variance (4 + 1 + 0 + 9) / 4 = 3.5
    assert regression_metrics(target, target)["r2"] == pytest.approx(1.0)
    assert regression_metrics(torch.full_like(target, 3.0), target)["r2"] == pytest.approx(0.0)
    assert regression_metrics(t([1.0, 2.0, 4.0, 4.0]), target)["r2"] == pytest.approx(1 - (1 + 4) / 4 / 3.5)


def test_psnr_by_hand():
    x = torch.zeros(2, 4)
    y = torch.full((2, 4), 0.1)  # MSE 0.01 -> 10 log10(1 / 0.01) = 20 dB
    assert psnr(x, y) == pytest.approx(20.0)
    assert psnr(x, y, data_range=2.0) == pytest.approx(20.0 + 10 * math.log10(4))
    assert psnr(x, x) == math.inf
