"""A model's own parameterization (noise.parameterization): rectified flow's and DDPM's noise axes, their denoisers
and losses, the config, and digits runs trained, sampled and resumed with each."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import TINY

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler  # noqa: E402

from diffusionblocks import checkpoint, rundir  # noqa: E402
from diffusionblocks.blocks import BlockwiseDenoiser  # noqa: E402
from diffusionblocks.cli import main  # noqa: E402
from diffusionblocks.config import ConfigError  # noqa: E402
from diffusionblocks.convert import convert_run  # noqa: E402
from diffusionblocks.data import DataConfig, load_image_data  # noqa: E402
from diffusionblocks.generate import generate  # noqa: E402
from diffusionblocks.noise import FlowTime, LogNormalSigma, Partition, VPTimestep, sample_truncated  # noqa: E402
from diffusionblocks.precond import Denoiser, FlowDenoiser, VPEpsDenoiser  # noqa: E402
from diffusionblocks.pretrained import from_pretrained  # noqa: E402
from diffusionblocks.runs import train_run  # noqa: E402
from diffusionblocks.tasks import apply_overrides, config_from_dict, default_config, get_task  # noqa: E402
from diffusionblocks.train import train  # noqa: E402

f64 = torch.float64
AXES = {"flow": FlowTime(), "flow-uniform": FlowTime(density="uniform"), "flow-shift3": FlowTime(shift=3.0),
        "flow-m0.5-s0.8": FlowTime(m=0.5, s=0.8), "vp": VPTimestep()}


def t_cdf(axis: FlowTime, t: torch.Tensor) -> torch.Tensor:
    """The CDF of the flow's training time t, from its definition: t = shift u / (1 + (shift - 1) u), u uniform or
    logit-normal; P(t' <= t) = P(u <= t / (shift - (shift - 1) t))."""
    u = t / (axis.shift - (axis.shift - 1) * t)
    return torch.special.ndtr((torch.logit(u) - axis.m) / axis.s) if axis.density == "logit-normal" else u


# ---- the noise axes


@pytest.mark.parametrize("name", sorted(AXES))
def test_cdf_and_icdf_are_inverse(name):
    axis = AXES[name]
    q = torch.linspace(axis.cdf(torch.tensor(axis.lo)).item() + 1e-6, axis.cdf(torch.tensor(axis.hi)).item() - 1e-6,
                       101, dtype=f64)
    assert torch.allclose(axis.cdf(axis.icdf(q)), q, atol=1e-9, rtol=0)
    # sigma over the axis, but for tails of mass < 1e-6 (where the CDF's float64 resolution runs out)
    lo, hi = max(axis.lo, axis.icdf(torch.tensor(1e-6)).item()), min(axis.hi, axis.icdf(torch.tensor(1 - 1e-6)).item())
    sigma = torch.logspace(torch.tensor(lo).log10().item(), torch.tensor(hi).log10().item(), 101, dtype=f64)
    assert torch.allclose(axis.icdf(axis.cdf(sigma)), sigma, rtol=1e-7)
    assert torch.allclose(axis.unwarp(axis.warp(sigma)), sigma, rtol=1e-9)


@pytest.mark.parametrize("name", [n for n in sorted(AXES) if n.startswith("flow")])
def test_flow_axis_is_the_push_forward_of_the_time_density(name):
    """cdf(sigma(t)) is the training density's CDF of t, sigma = t / (1 - t) and z = x_t / (1 - t) = y + sigma eps."""
    axis = AXES[name]
    t = torch.linspace(0.01, 0.98, 50, dtype=f64)
    assert torch.allclose(axis.sigma(t), t / (1 - t), rtol=1e-12)
    assert torch.allclose(axis.cdf(t / (1 - t)), t_cdf(axis, t), atol=1e-12)
    assert torch.allclose(axis.warp(t / (1 - t)), t, atol=1e-12)  # boundaries read in the model's time
    y, eps = torch.randn(2, 1000, dtype=f64)
    x_t = (1 - t[:, None]) * y + t[:, None] * eps
    assert torch.allclose(x_t / (1 - t[:, None]), y + (t / (1 - t))[:, None] * eps)


def test_flow_draws_follow_the_logit_normal_density():
    axis = FlowTime(m=0.3, s=0.7)
    sigma = sample_truncated(axis, 20000, axis.lo, axis.hi, generator=torch.Generator().manual_seed(0))
    logit = torch.logit(axis.time(sigma))
    assert abs(logit.mean() - 0.3) < 0.02 and abs(logit.std() - 0.7) < 0.02


def test_shift_matches_sd3_and_diffusers_schedule():
    """SD3's shift t' = shift t / (1 + (shift - 1) t): the median of logit-normal(0, 1) t, 1/2, moves to 3/4 at
    shift 3, and the shifted times are diffusers' FlowMatchEulerDiscreteScheduler sigmas (timesteps = 1000 t')."""
    axis = FlowTime(shift=3.0)
    assert torch.allclose(axis.time(axis.icdf(torch.tensor(0.5, dtype=f64))), torch.tensor(0.75, dtype=f64))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    u = torch.linspace(1, 0.001, 1000, dtype=f64)
    assert torch.allclose(axis.shifted(u).float(), scheduler.sigmas[:1000], atol=1e-6)
    assert torch.allclose(axis.unshifted(axis.shifted(u)), u, atol=1e-12)
    # Shifting moves every inner boundary to higher noise.
    assert (Partition(axis, 3).boundaries[1:-1] > Partition(FlowTime(), 3).boundaries[1:-1]).all()


def test_vp_axis_is_ddpm_schedule_with_uniform_timesteps():
    """sigma_k = sqrt((1 - alpha_bar_k) / alpha_bar_k) with diffusers' DDPMScheduler alpha_bar, t(sigma_k) = k, the
    CDF k / (T - 1); between timesteps ln sigma is linear in t (k-diffusion's interpolation)."""
    axis = VPTimestep()
    ab = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear").alphas_cumprod
    assert torch.allclose(axis.alphas_cumprod().float(), ab, rtol=1e-5)
    ab = axis.alphas_cumprod()
    sigma_k = ((1 - ab) / ab).sqrt()
    k = torch.arange(1000, dtype=f64)
    assert axis.lo == pytest.approx(float(sigma_k[0])) and axis.hi == pytest.approx(float(sigma_k[-1]))
    assert torch.allclose(axis.time(sigma_k), k, atol=1e-9)
    assert torch.allclose(axis.cdf(sigma_k), k / 999, atol=1e-12)
    mid = (sigma_k[499] * sigma_k[500]).sqrt()  # halfway in ln sigma
    assert axis.time(mid).item() == pytest.approx(499.5)
    assert axis.sigma(torch.tensor(499.5, dtype=f64)).item() == pytest.approx(mid.item())


@pytest.mark.parametrize("name", sorted(AXES))
@pytest.mark.parametrize("B", [2, 3, 4])
def test_equiprobable_partition_has_equal_mass_of_the_models_time_density(name, B):
    axis = AXES[name]
    w = axis.warp(Partition(axis, B).boundaries)  # in the model's time
    F = w / 999 if isinstance(axis, VPTimestep) else t_cdf(axis, w)
    mass = F.diff() / (F[-1] - F[0])
    assert torch.allclose(mass, torch.full((B,), 1 / B, dtype=f64), atol=1e-9)


@pytest.mark.parametrize("name", sorted(AXES))
def test_overlapping_training_ranges_stay_on_the_axis(name):
    """The overlap widens each range by gamma of its width in the model's time, clipped to the axis."""
    axis = AXES[name]
    p = Partition(axis, 3, gamma=0.1)
    for b in range(3):
        lo, hi = p.training_range(b)
        b_lo, b_hi = p.block_range(b)
        assert axis.lo <= lo <= b_lo < b_hi <= hi <= axis.hi
        width = axis.warp(torch.tensor(b_hi)) - axis.warp(torch.tensor(b_lo))
        if lo > axis.lo:
            assert axis.warp(torch.tensor(lo)).item() == pytest.approx((axis.warp(torch.tensor(b_lo)) - 0.1 * width).item())


# ---- the denoisers and their losses


class Recorder(torch.nn.Module):
    """A known network out = a x + time / 1000 (doubled channels optional), that keeps its last time input."""

    def __init__(self, a: float = 0.7, channels_out: int = 1):
        super().__init__()
        self.a, self.channels_out, self.time = a, channels_out, None

    def forward(self, x, time, class_labels=None):
        self.time = time
        out = self.a * x + time[:, None, None, None] / 1000
        return torch.cat([out, torch.full_like(out, 1e6)], 1) if self.channels_out == 2 else out


class Oracle(torch.nn.Module):
    """The exact prediction for a known clean image y: flow's v = (x_t - y) / t, or DDPM's eps = (x_t - sqrt(ab) y) /
    sqrt(1 - ab)."""

    def __init__(self, y, kind):
        super().__init__()
        self.y, self.kind = y, kind

    def forward(self, x, time):
        if self.kind == "flow":
            t = (time / 1000)[:, None, None, None]
            return (x - self.y) / t
        sigma = VPTimestep().sigma(time).float()[:, None, None, None]
        sqrt_ab = 1 / (1 + sigma ** 2).sqrt()
        return (x - sqrt_ab * self.y) / (sigma * sqrt_ab)


SIGMA = torch.tensor([0.02, 0.3, 1.0, 4.0, 60.0])


def test_flow_denoiser_is_x_t_minus_t_v():
    net = Recorder()
    D = FlowDenoiser(net, timestep_scale=1000.0)
    z = torch.randn(5, 1, 4, 4)
    out = D(z, SIGMA)
    t = (SIGMA / (1 + SIGMA))[:, None, None, None]
    x_t = (1 - t) * z
    v = 0.7 * x_t + t  # the network's output at time 1000 t
    assert torch.allclose(net.time, 1000 * t.flatten())
    assert torch.allclose(out, x_t - t * v, atol=1e-6)
    # With the exact velocity of y, D returns y.
    g = torch.Generator().manual_seed(0)
    y, eps = torch.randn(2, 5, 1, 4, 4, generator=g)
    z = y + SIGMA[:, None, None, None] * eps
    assert torch.allclose(FlowDenoiser(Oracle(y, "flow"))(z, SIGMA), y, atol=1e-4)


@pytest.mark.parametrize("channels_out", [1, 2])
def test_vp_denoiser_is_z_minus_sigma_eps(channels_out):
    net = Recorder(channels_out=channels_out)
    schedule = VPTimestep()
    D = VPEpsDenoiser(net, schedule)
    ab = schedule.alphas_cumprod()
    k = torch.tensor([0, 10, 250, 999])
    sigma = ((1 - ab[k]) / ab[k]).sqrt().float()
    z = torch.randn(4, 1, 4, 4)
    out = D(z, sigma)
    assert torch.allclose(net.time, k.float(), atol=1e-3)  # the timesteps themselves
    x_t = ab[k].sqrt().float()[:, None, None, None] * z
    eps = 0.7 * x_t + k.float()[:, None, None, None] / 1000  # only the first C channels of 2C
    assert torch.allclose(out, z - sigma[:, None, None, None] * eps, atol=1e-3)
    g = torch.Generator().manual_seed(0)
    y, noise = torch.randn(2, 5, 1, 4, 4, generator=g)
    z = y + SIGMA[:, None, None, None] * noise
    assert torch.allclose(VPEpsDenoiser(Oracle(y, "vp"), schedule)(z, SIGMA), y, atol=1e-3)


def test_losses_are_the_models_own():
    """Flow: |v - (eps - y)|^2 at x_t = (1 - t) y + t eps; DDPM: |eps_hat - eps|^2 at x_t = sqrt(ab) y + sqrt(1 - ab)
    eps, at the timesteps' alpha_bar. A teacher's D equal to y makes the distillation target the true v / eps."""
    g = torch.Generator().manual_seed(1)
    y, eps = torch.randn(2, 5, 1, 4, 4, generator=g)
    t = SIGMA / (1 + SIGMA)
    x_t = (1 - t[:, None, None, None]) * y + t[:, None, None, None] * eps
    v = 0.7 * x_t + t[:, None, None, None]
    flow = FlowDenoiser(Recorder())
    expected = (v - (eps - y)).pow(2).flatten(1).mean(1)
    assert torch.allclose(flow.loss(y, SIGMA, eps), expected, rtol=1e-5)
    assert torch.allclose(flow.loss(y, SIGMA, eps, D_teacher=y, distill_weight=0.5), 1.5 * expected, rtol=1e-4)

    schedule = VPTimestep()
    ab = schedule.alphas_cumprod()
    k = torch.tensor([0, 3, 100, 500, 999])
    sigma = ((1 - ab[k]) / ab[k]).sqrt().float()
    x_t = ab[k].sqrt().float()[:, None, None, None] * y + (1 - ab[k]).sqrt().float()[:, None, None, None] * eps
    eps_hat = 0.7 * x_t + k.float()[:, None, None, None] / 1000
    vp = VPEpsDenoiser(Recorder(channels_out=2), schedule)
    expected = (eps_hat - eps).pow(2).flatten(1).mean(1)
    assert torch.allclose(vp.loss(y, sigma, eps), expected, rtol=1e-4)
    assert torch.allclose(vp.loss(y, sigma, eps, D_teacher=y, distill_weight=0.5), 1.5 * expected, rtol=1e-3)


def test_each_loss_is_the_mse_of_its_denoiser_scaled():
    """The losses in D's terms: flow's |v - v*|^2 = |D - y|^2 / t^2, DDPM's |eps - eps*|^2 = |D - y|^2 / sigma^2."""
    g = torch.Generator().manual_seed(2)
    y, eps = torch.randn(2, 5, 1, 4, 4, generator=g)
    z = y + SIGMA[:, None, None, None] * eps
    t = SIGMA / (1 + SIGMA)
    for D, scale in [(FlowDenoiser(Recorder()), t), (VPEpsDenoiser(Recorder(), VPTimestep()), SIGMA)]:
        mse = (D(z, SIGMA) - y).pow(2).flatten(1).mean(1)
        assert torch.allclose(D.loss(y, SIGMA, eps), mse / scale ** 2, rtol=1e-3)


# ---- the config and the task


def test_old_configs_are_edm_unchanged():
    cfg = default_config()
    assert cfg.noise.parameterization == "edm"
    task = get_task("generate")
    assert task.noise_axis(cfg) == LogNormalSigma()
    assert type(task.build_block(cfg, 0)) is Denoiser
    d = cfg.to_dict()
    d["noise"] = {k: d["noise"][k] for k in ("P_mean", "P_std", "sigma_min", "sigma_max", "sigma_data")}
    assert config_from_dict(d) == cfg


@pytest.mark.parametrize("overrides, message", [
    (["noise.parameterization=ddim"], "noise.parameterization='ddim' is not one of"),
    (["noise.shift=3"], "noise.shift=3.0 applies to noise.parameterization='flow' only"),
    (["noise.parameterization=flow", "noise.num_timesteps=500"], "noise.num_timesteps=500 applies to"),
    (["noise.parameterization=vp-eps", "noise.beta_end=1e-5"], "0 < beta_start <= beta_end < 1"),
    (["noise.parameterization=flow", "noise.time_density=normal"], "noise.time_density='normal'"),
    (["noise.parameterization=flow", "noise.logit_std=0"], "noise.logit_std must be positive"),
])
def test_bad_parameterization_fields_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        apply_overrides(default_config(), overrides)


def test_tasks_without_parameterizations_refuse_the_field():
    with pytest.raises(ConfigError, match="unknown field 'noise.parameterization'"):
        apply_overrides(default_config("classify"), ["noise.parameterization=flow"])


@pytest.fixture(scope="module")
def digits():
    return load_image_data(DataConfig()).train


PARAMS = {"flow": ["noise.parameterization=flow", "noise.shift=2"], "vp-eps": ["noise.parameterization=vp-eps"]}


@pytest.mark.parametrize("kind", sorted(PARAMS))
def test_a_short_training_learns_and_samples(kind, tiny_cfg, digits, one_thread):
    cfg = apply_overrides(tiny_cfg, [*PARAMS[kind], "train.steps_per_block=40", "train.lr=2e-3",
                                     "train.batch_size=32"])
    task = get_task(cfg.task)
    partition = task.partition(cfg)
    y, labels = digits.images[:64], digits.labels[:64]
    g = torch.Generator().manual_seed(5)
    inputs = [(partition.sample(b, 64, generator=g).float(), torch.randn(y.shape, generator=g)) for b in range(3)]

    def losses(blocks):
        with torch.no_grad():
            return [blocks[b].loss(y, *inputs[b], class_labels=labels).mean().item() for b in range(3)]

    before = losses([task.build_block(cfg, b, torch.Generator().manual_seed(b)) for b in range(3)])
    states = train(task, cfg, digits, None, progress=False)
    after = losses([states[b].denoiser for b in range(3)])
    assert all(a < 0.9 * b for a, b in zip(after, before)), (before, after)
    assert all(type(s.denoiser) is {"flow": FlowDenoiser, "vp-eps": VPEpsDenoiser}[kind] for s in states.values())
    model = BlockwiseDenoiser([s.denoiser.eval() for s in states.values()], partition)
    images = generate(model, torch.arange(10), image_shape=(1, 8, 8), num_classes=10, steps=6)
    assert images.shape == (10, 1, 8, 8) and images.isfinite().all()


@pytest.mark.parametrize("kind", sorted(PARAMS))
def test_resume_continues_exactly(kind, tiny_cfg, digits, tmp_path, one_thread):
    cfg = apply_overrides(tiny_cfg, PARAMS[kind])
    task = get_task(cfg.task)
    full = train(task, cfg, digits, None, progress=False)
    rundir.save_config(tmp_path, cfg)
    train(task, apply_overrides(cfg, ["train.steps_per_block=3"]), digits, tmp_path, progress=False)
    assert checkpoint.block_step(tmp_path, 0) == 3
    train(task, cfg, digits, tmp_path, progress=False)
    for b in range(3):
        saved = checkpoint.load_train_state(tmp_path, b)["model"]
        assert all(torch.equal(v, saved[k]) for k, v in full[b].denoiser.state_dict().items()), b


def test_a_flow_run_trains_samples_and_reports_from_its_config(tmp_path, capsys, one_thread):
    """The command line reads the run's parameterization from its config.json: train, status, sample."""
    run = tmp_path / "flow"
    assert main(["train", "--out", str(run), "--no-progress", *TINY, *PARAMS["flow"]]) == 0
    model, cfg = from_pretrained(run)
    assert cfg.noise.parameterization == "flow" and isinstance(model.partition.axis, FlowTime)
    assert all(type(b) is FlowDenoiser for b in model.blocks)
    assert main(["status", str(run)]) == 0
    shown = capsys.readouterr().out
    assert "3/3 trained" in shown
    t1 = float(FlowTime(shift=2.0).time(torch.tensor(model.partition.block_range(2)[1])))
    assert f"block 2 (sigma 0.002-{model.partition.block_range(2)[1]:.3g}, t 0.002-{t1:.3g})" in shown  # its own time
    assert main(["sample", str(run), "--out", str(tmp_path / "s.npz"), "--num", "10", "--steps", "4",
                 "--no-progress"]) == 0


@pytest.mark.parametrize("kind", sorted(PARAMS))
def test_convert_distill_and_compose_keep_the_parameterization(kind, tmp_path, capsys, one_thread):
    """A copy conversion of an end-to-end run samples what its source samples; its blocks distil from the source
    (a copy is its own teacher: the first step's loss is the plain one); compose refuses blocks of another
    parameterization."""
    e2e = tmp_path / "e2e"
    assert main(["train", "--out", str(e2e), "--no-progress", *TINY, "blocks.num_blocks=1", *PARAMS[kind]]) == 0
    conv = tmp_path / "conv"
    convert_run(e2e, 2, "copy", conv)
    drawn = []
    for run in (e2e, conv):
        out = tmp_path / f"{run.name}.npz"
        assert main(["sample", str(run), "--num", "10", "--seed", "3", "--out", str(out), "--no-progress"]) == 0
        drawn.append(np.load(out)["images"])
    assert np.array_equal(*drawn)
    runs = {w: train_run(from_=conv, out=tmp_path / f"w{w}", blocks=[1], progress=False,
                         overrides=[f"train.distill_weight={w}", "train.steps_per_block=1", "train.log_every=1"])
            for w in (0, 1)}
    loss = {w: json.loads((r / "metrics.jsonl").read_text().splitlines()[-1])["loss"] for w, r in runs.items()}
    assert loss[1] == pytest.approx(loss[0], rel=1e-5)
    edm = tmp_path / "edm"
    assert main(["train", "--out", str(edm), "--no-progress", *TINY, "model.depth=6", "blocks.num_blocks=2"]) == 0
    capsys.readouterr()
    assert main(["compose", "--block", f"0={conv}", "--block", f"1={edm}", "--out", str(tmp_path / "c")]) != 0
    assert "another noise axis: noise.parameterization" in capsys.readouterr().err
