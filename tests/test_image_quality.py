"""Image-quality measures of stage 1 (generation/image_quality.py) and the KL weighting of the
autoencoder's loss, against hand-computed cases and sets whose answer is known."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from conftest import ROOT
import train_ldm
from networks.ldm import AutoencoderPass, build_vae
from generation.losses import kl_per_pixel
from utils.config import parse_config
from generation.image_quality import c2st_accuracy, calibrated_memorisation, closest_pairs_image, describe_memorisation, psnr


def test_psnr_matches_hand_computed_values():
    x = torch.zeros(2, 1, 8, 8)
    y = torch.stack([torch.full((1, 8, 8), 0.2), torch.full((1, 8, 8), -0.02)])
    # range 2: 10 log10(4 / 0.04) = 20 dB and 10 log10(4 / 0.0004) = 40 dB
    assert psnr(x, y).tolist() == pytest.approx([20.0, 40.0], rel=1e-5)
    assert psnr(x, y, data_range=1.0)[0].item() == pytest.approx(10 * np.log10(1 / 0.04), rel=1e-5)


def test_kl_is_summed_over_the_latent_and_divided_by_the_image_pixels():
    # mean 1, log-variance 0 on a 4x2x2 latent: KL = 0.5 (1 + 1 - 1 - 0) = 0.5 per element, 8 in all
    moments = torch.cat([torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)], dim=1)
    kl = DiagonalGaussianDistribution(moments).kl().mean()
    assert kl.item() == pytest.approx(8.0)
    assert kl_per_pixel(kl, torch.zeros(1, 1, 8, 8)).item() == pytest.approx(8.0 / 64)

    # in the loss: L1 + (1 - SSIM) + kl_weight x KL / (C x H x W), the KL logged as the per-image sum
    cfg = parse_config(train_ldm.OPTIONS, "", ["--config", str(ROOT / "configs" / "ldm_tiny.yaml"),
                                               "--kl-weight", "0.5"])
    torch.manual_seed(0)
    images = torch.rand(2, 1, 64, 64) * 2 - 1
    noise = torch.randn(2, cfg.vae_latent_channels, 16, 16)
    loss, _, terms = train_ldm.vae_losses(AutoencoderPass(build_vae(cfg)), None, images, noise, cfg,
                                          torch.device("cpu"), None, False)
    kl_share = (loss - terms["l1"] - terms["one_minus_ssim"]).item()
    assert kl_share == pytest.approx(0.5 * terms["kl"].item() / (64 * 64), rel=1e-4)


def blobs(count: int, seed: int, lesion: float = 50.0, size: int = 32) -> np.ndarray:
    """Speckled tissue with one round lesion of gray level ``lesion``, at random places."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = np.empty((count, size, size), np.uint8)
    for k in range(count):
        image = 150 + 30 * rng.standard_normal((size, size))
        cy, cx, radius = rng.integers(size // 4, 3 * size // 4, 2).tolist() + [int(rng.integers(4, size // 4))]
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2] = lesion + 20 * rng.standard_normal()
        images[k] = image.clip(0, 255)
    return images


@pytest.mark.slow  # runs training steps for seconds to minutes: out of the fast tier
def test_c2st_is_chance_for_one_distribution_and_certain_for_two():
    same = c2st_accuracy(blobs(60, seed=1), blobs(60, seed=2), epochs=10)
    assert 0.3 <= same <= 0.7  # chance is 0.5 (120 held-out predictions: ±0.09 is two standard deviations)
    different = c2st_accuracy(blobs(60, seed=1), blobs(60, seed=3, lesion=230), epochs=10)
    assert different >= 0.9
    # seeded: the same figure again; the larger set is cut to the smaller one's size
    small = (blobs(12, seed=4), blobs(20, seed=5))
    assert c2st_accuracy(*small, folds=2, epochs=2) == c2st_accuracy(*small, folds=2, epochs=2)
    with pytest.raises(ValueError, match="at least 5 images"):
        c2st_accuracy(blobs(4, seed=1), blobs(9, seed=2))


def phantoms(count: int, seed: int) -> np.ndarray:
    from dataloaders.phantom import make_phantom
    rng = np.random.default_rng(seed)
    return np.stack([make_phantom(rng, (64, 64), malignant=bool(k % 2))[0] for k in range(count)])


@pytest.mark.slow  # runs training steps for seconds to minutes: out of the fast tier
def test_memorisation_is_calibrated_on_held_out_real_images_and_one_on_copies():
    """Real images the generator never saw, standing in for its samples, score the level itself; copies
    of training images score 1.

    400 training, 399 val, 800 'samples' (phantom images, all drawn alike). With n = 399 val images
    the thresholds are their 4th and 20th smallest distances: a sample drawn like them is nearer with
    probability exactly 4/400 = 0.01 and 20/400 = 0.05. The fraction of m samples is then
    beta-binomial, with standard deviation sqrt(a (1 - a) (n + 1 + m) / (m (n + 2))): 0.0061 at
    0.01, 0.0133 at 0.05. The bounds are three of them (a chance of about 0.3 % each to fail for a
    correct figure, by the normal approximation; the draws are seeded, so the test is deterministic)."""
    training, val, held_out = phantoms(400, seed=1), phantoms(399, seed=2), phantoms(800, seed=3)
    figures, distances, nearest = calibrated_memorisation(held_out, training, val)
    n, m = 399, 800
    for level, q in ((0.01, "q01"), (0.05, "q05")):
        assert figures[f"memorisation_expected_{q}"] == pytest.approx(level)
        sd = np.sqrt(level * (1 - level) * (n + 1 + m) / (m * (n + 2)))
        assert abs(figures[f"memorisation_{q}"] - level) <= 3 * sd, (q, figures[f"memorisation_{q}"], sd)
    # the former figure (median leave-one-out distance among training images as threshold) reads about
    # 0.5 on the same real images, which is why it is no measure of copying
    assert 0.3 < figures["fraction_closer_than_median_train_nn"] < 0.7
    quantiles = figures["memorisation_quantiles"]
    assert quantiles["levels"][0] == 0 and quantiles["val"] == sorted(quantiles["val"])
    assert "samples" in describe_memorisation(figures)

    copies = np.concatenate([training[:50], training[50:100, :, ::-1]])  # copies and mirror copies
    figures, distances, nearest = calibrated_memorisation(copies, training, val)
    assert figures["memorisation_q01"] == 1.0 and figures["memorisation_q05"] == 1.0
    pairs = closest_pairs_image(copies, training, distances, nearest, count=4)
    pairs = pairs.reshape(pairs.shape[:2])
    assert pairs.shape == (2 * 64 + 3 * 2, 4 * 64 + 5 * 2)  # two rows of four, padded: samples over their matches
    top, bottom = pairs[2:66, 2:66], pairs[68:132, 2:66]
    assert np.array_equal(top, bottom)  # a copy above the training image it copies (mirrored back if need be)


def test_memorisation_with_few_val_images_says_what_to_expect():
    # 48 val images: the 1 % level cannot be resolved, the threshold is the smallest distance: 1/49 expected
    training, val = phantoms(40, seed=4), phantoms(48, seed=5)
    figures, _, _ = calibrated_memorisation(phantoms(10, seed=6), training, val)
    assert figures["memorisation_expected_q01"] == pytest.approx(1 / 49)
    assert figures["memorisation_expected_q05"] == pytest.approx(2 / 49)  # round(0.05 x 49) = 2
