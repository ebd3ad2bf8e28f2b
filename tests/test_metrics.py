import numpy as np
import pytest
import scipy.linalg
import torch

from diffusionblocks.metrics import frechet_distance, kernel_distance


def fd_scipy(a, b):
    """The textbook computation: |mu_a - mu_b|^2 + tr(S_a + S_b - 2 sqrtm(S_a S_b))."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    S_a, S_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(S_a @ S_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(S_a + S_b - 2 * covmean))


def test_fd_is_zero_for_identical_sets():
    x = np.random.default_rng(0).normal(size=(500, 16))
    assert abs(frechet_distance(x, x)) < 1e-8


def test_fd_matches_scipy_on_random_gaussians():
    rng = np.random.default_rng(1)
    A = rng.normal(size=(8, 8))
    a = rng.normal(size=(2000, 8)) @ A + 0.5
    b = rng.normal(size=(1500, 8)) * 1.3 - 0.2
    assert frechet_distance(a, b) == pytest.approx(fd_scipy(a, b), rel=1e-6)
    # Closed form for two isotropic Gaussians, up to sampling error.
    c = rng.normal(size=(20000, 4))
    d = rng.normal(size=(20000, 4)) * 2 + 1
    assert frechet_distance(c, d) == pytest.approx(4 * 1 + 4 * (1 + 4 - 2 * 2), rel=0.05)


def blur(x):
    """3x3 box blur of N x 1 x 8 x 8 images."""
    return torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def test_fd_grows_as_samples_are_blurred_or_noised():
    from diffusionblocks.data import DataConfig, load_image_data

    d = load_image_data(DataConfig())
    real, ref = d.train.images[:800], d.train.images[800:1500]
    g = torch.Generator().manual_seed(0)
    fds = [frechet_distance(x.flatten(1), ref.flatten(1)) for x in (real, blur(real), blur(blur(real)))]
    assert fds[0] < fds[1] < fds[2]
    noisy = [frechet_distance((real + s * torch.randn(real.shape, generator=g)).flatten(1), ref.flatten(1))
             for s in (0.1, 0.3, 0.6)]
    assert fds[0] < noisy[0] < noisy[1] < noisy[2]


def test_kid_is_about_zero_for_one_distribution_and_positive_otherwise():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same, std = kernel_distance(a, b, num_subsets=20, subset_size=200)
    shifted, _ = kernel_distance(a, b + 0.5, num_subsets=20, subset_size=200)
    assert abs(same) < 3 * std + 1e-3
    assert shifted > 10 * max(abs(same), std)
