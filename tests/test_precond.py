import torch

from diffusionblocks.precond import Denoiser, get_scalings, loss_weight


class Affine(torch.nn.Module):
    """A stand-in raw network F(x, c_noise) = a x + c_noise."""

    def forward(self, x, c_noise, **cond):
        return 0.7 * x + c_noise[:, None, None, None]


def test_lambda_times_c_out_squared_is_one():
    sigma = torch.logspace(-3, 2, 101, dtype=torch.float64)
    _, c_out, _, _ = get_scalings(sigma, 0.5)
    assert torch.allclose(loss_weight(sigma, 0.5) * c_out ** 2, torch.ones_like(sigma), atol=1e-12)


def test_scalings_closed_forms_and_unit_variance_input():
    sigma = torch.tensor([0.002, 0.5, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = get_scalings(sigma, 0.5)
    assert torch.allclose(c_skip, 0.25 / (sigma ** 2 + 0.25))
    assert torch.allclose(c_noise, sigma.log() / 4)
    # With data of std sigma_data, the network input c_in * (y + sigma eps) has unit variance.
    assert torch.allclose(c_in ** 2 * (0.25 + sigma ** 2), torch.ones(3, dtype=torch.float64))
    # ... and so has the training target (y - c_skip z) / c_out.
    var_target = ((1 - c_skip) ** 2 * 0.25 + c_skip ** 2 * sigma ** 2) / c_out ** 2
    assert torch.allclose(var_target, torch.ones(3, dtype=torch.float64))


def test_denoiser_is_exact_as_sigma_goes_to_zero():
    D = Denoiser(Affine())
    z = torch.randn(4, 1, 8, 8)
    out = D(z, torch.full((4,), 1e-6))
    assert torch.allclose(out, z, atol=1e-5)


def test_loss_equals_weighted_l2_of_denoiser():
    D = Denoiser(Affine())
    g = torch.Generator().manual_seed(0)
    y = torch.randn(6, 1, 4, 4, generator=g)
    noise = torch.randn(6, 1, 4, 4, generator=g)
    sigma = torch.tensor([0.01, 0.1, 0.5, 1.0, 5.0, 50.0])
    direct = loss_weight(sigma, 0.5) * (D(y + sigma[:, None, None, None] * noise, sigma) - y).pow(2).flatten(1).mean(1)
    assert torch.allclose(D.loss(y, sigma, noise), direct, rtol=1e-4)
