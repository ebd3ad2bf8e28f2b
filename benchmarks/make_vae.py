"""Trains a tiny diffusers AutoencoderKL on the 8x8 digits (training split only) and saves it for latent diffusion.

    python benchmarks/make_vae.py --out runs/vae-digits          # 1,500 steps, about 5.5 minutes of CPU time
    diffusionblocks train --config presets/digits-latent-dit.json  # reads data.vae=runs/vae-digits

The VAE: two down blocks (8x8 -> 4x4), 4 latent channels, widths 32/64, one ResNet layer per block; trained on
MSE reconstruction plus a small KL term (beta) with AdamW. Its config's scaling_factor is set to 1 / std of the
posterior means of the training images and its shift_factor to their mean, so the latents the blocks see have zero
mean and unit variance (noise.sigma_data=1 in the
preset). Deterministic given --seed (weights from a seeded generator, batches from the library's BatchSampler).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from diffusionblocks.data import BatchSampler, DataConfig, load_image_data
from diffusionblocks.seeding import make_generator


def tiny_vae(latent_channels: int = 4, widths: tuple[int, ...] = (32, 64), seed: int = 0) -> AutoencoderKL:
    """A 1-channel AutoencoderKL of len(widths) down blocks (downsampling 2^(len - 1)), weights drawn from seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # diffusers' layers draw their init from the global RNG; fork it, leave it as it was
        return AutoencoderKL(in_channels=1, out_channels=1, latent_channels=latent_channels,
                             down_block_types=("DownEncoderBlock2D",) * len(widths),
                             up_block_types=("UpDecoderBlock2D",) * len(widths), block_out_channels=widths,
                             layers_per_block=1, norm_num_groups=8, sample_size=8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory to save the VAE into (must not exist)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--beta", type=float, default=1e-4, help="weight of the KL term per latent element")
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    out = Path(a.out)
    if out.exists():
        raise SystemExit(f"{out} exists; give a new directory")
    torch.set_num_threads(a.threads)
    data = load_image_data(DataConfig(dataset="digits")).train
    vae = tiny_vae(a.latent_channels, seed=a.seed)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=a.lr, weight_decay=0.0)
    batches = BatchSampler(data, a.batch, seed=a.seed, stream=0)
    t0 = time.perf_counter()
    for step in range(a.steps):
        for group in opt.param_groups:  # cosine decay
            group["lr"] = a.lr * 0.5 * (1 + math.cos(math.pi * step / a.steps))
        x, _ = batches.batch(step)
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=make_generator(a.seed, "vae", step))
        recon = vae.decode(z).sample
        mse = (recon - x).pow(2).mean()
        kl = posterior.kl().mean() / z[0].numel()
        loss = mse + a.beta * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == a.steps - 1:
            print(f"step {step:5d}  mse {mse.item():.5f}  kl/elem {kl.item():.3f}  "
                  f"{(step + 1) / (time.perf_counter() - t0):.1f} steps/s", flush=True)
    vae.eval()
    with torch.no_grad():
        mu = torch.cat([vae.encode(data.images[i:i + 500]).latent_dist.mean for i in range(0, len(data), 500)])
    shift, scaling = float(mu.mean()), 1.0 / float(mu.std())
    vae.register_to_config(scaling_factor=scaling, shift_factor=shift)
    vae.save_pretrained(out)
    print(f"saved {out}: latents {a.latent_channels}x4x4, scaling_factor {scaling:.4f} (1 / std of the means), "
          f"shift_factor {shift:.4f} (their mean), "
          f"{a.steps} steps in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
