"""Image-quality measures of stage 1, none of which needs downloaded weights.

- :func:`ssim` (differentiable: the autoencoder's loss) and :func:`psnr`, of a reconstruction
  against its original (the autoencoder's quality on the split's validation images);
- :func:`nearest_training_images` and :func:`calibrated_memorisation`: how near each sample is to
  a training image, against how near held-out real images (never trained on) are: a generator that
  copies its training images puts its samples nearer than almost every held-out image;
  :func:`closest_pairs_image` shows the closest sample/training pairs;
- :func:`c2st_accuracy`: a classifier two-sample test (Lopez-Paz & Oquab, ICLR 2017) of samples
  against the generator's training images, 0.5 when a small CNN cannot tell them apart;
- :func:`evaluate_vae`: PSNR and SSIM of the trained autoencoder on the split's validation images
  (train_ldm.py's vae_metrics.json).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------------------------
# reconstruction quality
# ----------------------------------------------------------------------------------------------

def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, window_size: int = 11,
         sigma: float = 1.5, reduction: str = "mean") -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) of two NxCxHxW batches, gaussian 11x11 window.

    Computed in float32 over the 'valid' part of the image (no padding). ``data_range`` is the
    span of the values: 2 for images in [-1, 1]. reduction "none" gives one value per image.
    """
    x, y = x.float(), y.float()
    channels = x.shape[1]
    size = min(window_size, x.shape[-1], x.shape[-2])
    window = _gaussian_window(size, sigma, channels, x.device, x.dtype)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def blur(t):
        return F.conv2d(t, window, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    per_image = ssim_map.flatten(1).mean(1)
    return per_image if reduction == "none" else per_image.mean()


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of each image of two NxCxHxW batches: 10 log10(range² / MSE).

    Identical images would give infinity; the MSE is floored at 1e-10 (100 dB for range 1)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(data_range ** 2 / mse)


# ----------------------------------------------------------------------------------------------
# memorisation: distance of each sample to its nearest training image
# ----------------------------------------------------------------------------------------------

def _standardised(images: np.ndarray) -> np.ndarray:
    flat = images.reshape(len(images), -1).astype(np.float64)
    flat -= flat.mean(1, keepdims=True)
    return flat / (flat.std(1, keepdims=True) + 1e-8)


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Normalised L2 between standardised rows: sqrt(mean((a - b)^2)) = sqrt(2 (1 - correlation)),
    0 for the same image up to brightness and contrast, about 1.4 for unrelated ones."""
    d2 = (a ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.maximum(d2, 0) / a.shape[1])


def nearest_training_images(samples: np.ndarray, training: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each sample (uint8 NxHxW, same size as ``training`` MxHxW): the distance to the nearest
    training image or its mirror image (training used horizontal flips) and that image's index."""
    references = _standardised(np.concatenate([training, training[:, :, ::-1]]))
    d = _distances(_standardised(samples), references)
    nearest = d.argmin(1)
    return d[np.arange(len(samples)), nearest], nearest % len(training)


def typical_training_distance(training: np.ndarray) -> float:
    """Median over training images of the distance to the nearest *other* training image (or its
    mirror): how far apart two real images typically are. NaN with fewer than two images."""
    m = len(training)
    if m < 2:
        return float("nan")
    std = _standardised(training)
    d = _distances(std, np.concatenate([std, _standardised(training[:, :, ::-1])]))
    d[np.arange(m), np.arange(m)] = np.inf
    d[np.arange(m), np.arange(m) + m] = np.inf
    return float(np.median(d.min(1)))


MEMORISATION_LEVELS = (0.01, 0.05)
QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def level_name(level: float) -> str:
    """'q01' for 0.01, 'q05' for 0.05."""
    return f"q{round(level * 100):02d}"


def calibrated_memorisation(samples: np.ndarray, training: np.ndarray, heldout: np.ndarray,
                            levels=MEMORISATION_LEVELS) -> tuple[dict, np.ndarray, np.ndarray]:
    """How many samples are nearer to a training image than held-out real images are.

    ``heldout``: real images of the data that the generator never trained on (the split's val
    images). For each level a (0.01, 0.05), the threshold is the k-th smallest of the n held-out
    images' nearest-training distances, k = max(1, round(a (n + 1))), and the figure is the fraction
    of samples nearer than that. A sample drawn like a held-out image (a generator that copies
    nothing and matches the data) is nearer with probability exactly k / (n + 1) (exchangeability:
    its rank among n + 1 such distances is uniform), reported as ``memorisation_expected_<q>``:
    a for n + 1 a multiple of 1 / a, else close to it (at least 1 / (n + 1)). Exact copies are at
    distance 0 and score 1.

    Returns (figures, each sample's distance, each sample's nearest training index). ``figures`` holds
    per level ``memorisation_<q>``, ``memorisation_expected_<q>``, ``memorisation_threshold_<q>``; the
    quantiles of both distance distributions; and the former figure under the name of what it
    measures, ``fraction_closer_than_median_train_nn`` (the fraction of samples nearer than the median
    leave-one-out nearest-neighbour distance among training images: about 0.5, not 0, for a
    generator that copies nothing).
    """
    if len(heldout) < 1 or len(samples) < 1:
        raise ValueError(f"calibrated_memorisation needs samples and held-out images, got {len(samples)} and "
                         f"{len(heldout)}")
    d_samples, nearest = nearest_training_images(samples, training)
    d_heldout, _ = nearest_training_images(heldout, training)
    n, ordered = len(d_heldout), np.sort(d_heldout)
    figures = {"memorisation_val_images": n, "memorisation_samples": len(d_samples)}
    for level in levels:
        k = max(1, round(level * (n + 1)))
        threshold = float(ordered[min(k, n) - 1])
        q = level_name(level)
        figures[f"memorisation_{q}"] = float(np.mean(d_samples < threshold))
        figures[f"memorisation_expected_{q}"] = min(k, n) / (n + 1)
        figures[f"memorisation_threshold_{q}"] = threshold
    figures["memorisation_quantiles"] = {
        "levels": list(QUANTILES), "samples": [float(x) for x in np.quantile(d_samples, QUANTILES)],
        "val": [float(x) for x in np.quantile(d_heldout, QUANTILES)]}
    typical = typical_training_distance(training)
    figures["median_train_nn_distance"] = typical
    figures["fraction_closer_than_median_train_nn"] = float(np.mean(d_samples < typical))
    return figures, d_samples, nearest


def describe_memorisation(figures: dict) -> str:
    """The figures of :func:`calibrated_memorisation` as a few printed lines."""
    lines = []
    for level in MEMORISATION_LEVELS:
        q = level_name(level)
        lines.append(f"memorisation: {figures[f'memorisation_{q}']:.3f} of the {figures['memorisation_samples']} "
                     f"samples are nearer to a training image than the closest {level:.0%} of the "
                     f"{figures['memorisation_val_images']} val images (never trained on) are to theirs "
                     f"(distance {figures[f'memorisation_threshold_{q}']:.3f}); "
                     f"{figures[f'memorisation_expected_{q}']:.3f} expected of a generator that copies nothing, "
                     "1 of one that copies")
    quantiles = figures["memorisation_quantiles"]
    lines.append("nearest-training-image distance quantiles " + " ".join(f"{q:g}" for q in quantiles["levels"]))
    for name in ("samples", "val"):
        lines.append(f"  {name:8s} " + " ".join(f"{x:.3f}" for x in quantiles[name]))
    return "\n".join(lines)


def closest_pairs_image(samples: np.ndarray, training: np.ndarray, distances: np.ndarray, nearest: np.ndarray,
                        count: int = 8) -> np.ndarray:
    """The ``count`` samples nearest to a training image (top row, nearest first) above their nearest
    training images (bottom row, mirrored where the mirror image was the nearer): uint8, one picture."""
    from utils.plots import image_grid

    order = np.argsort(distances, kind="stable")[:count]
    partners = []
    for k in order:
        match = training[nearest[k]]
        mirrored = match[:, ::-1]
        if _distances(_standardised(samples[k][None]), _standardised(mirrored[None]))[0, 0] < \
                _distances(_standardised(samples[k][None]), _standardised(match[None]))[0, 0]:
            match = mirrored
        partners.append(np.ascontiguousarray(match))
    return image_grid([samples[k] for k in order] + partners, columns=len(order))


# ----------------------------------------------------------------------------------------------
# classifier two-sample test
# ----------------------------------------------------------------------------------------------

class TwoSampleClassifier(nn.Module):
    """A small CNN (three strided convolutions, global average pooling, one logit) of the C2ST.

    Small on purpose: the test asks whether an ordinary classifier trained on a few hundred images
    tells the two sets apart, not whether a large one could memorise them."""

    def __init__(self, width: int = 16):
        super().__init__()
        layers, channels = [], 1
        for out in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.GroupNorm(4, out), nn.SiLU()]
            channels = out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))[:, 0]


C2ST_EPOCHS = 15


def c2st_accuracy(samples: np.ndarray, reference: np.ndarray, folds: int = 5, epochs: int = C2ST_EPOCHS,
                  batch_size: int = 32, lr: float = 2e-3, seed: int = 0) -> float:
    """Classifier two-sample test: the held-out accuracy of a CNN trained to tell ``samples`` from
    ``reference`` (uint8 NxHxW and MxHxW, the same HxW), pooled over ``folds`` stratified folds.

    Both sets are first cut to the size of the smaller one (a seeded random subset), so that
    chance is exactly 0.5: 0.5 means the classifier cannot tell them apart, 1.0 that it always can.
    Seeded (``seed``) and deterministic on the CPU; the global random state is left untouched.
    """
    from sklearn.model_selection import StratifiedKFold

    if samples.shape[1:] != reference.shape[1:] or samples.ndim != 3:
        raise ValueError(f"c2st_accuracy needs two uint8 NxHxW sets of one size, got {samples.shape} "
                         f"and {reference.shape}")
    count = min(len(samples), len(reference))
    if count < folds:
        raise ValueError(f"c2st_accuracy needs at least {folds} images in each set, got {count}")
    rng = np.random.default_rng(seed)
    chosen = [s[np.sort(rng.choice(len(s), count, replace=False))] for s in (samples, reference)]
    images = torch.from_numpy(np.concatenate(chosen)).float()[:, None] / 127.5 - 1
    labels = torch.cat([torch.ones(count), torch.zeros(count)])
    correct = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        splits = StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(2 * count), labels.numpy())
        for train_index, test_index in splits:
            classifier = TwoSampleClassifier()
            optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
            train_index = torch.from_numpy(train_index)
            for _ in range(epochs):
                order = train_index[torch.randperm(len(train_index))]
                for first in range(0, len(order), batch_size):
                    batch = order[first:first + batch_size]
                    loss = F.binary_cross_entropy_with_logits(classifier(images[batch]), labels[batch])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
            classifier.eval()
            with torch.no_grad():
                test_index = torch.from_numpy(test_index)
                predicted = classifier(images[test_index]) > 0
                correct += int((predicted == labels[test_index].bool()).sum())
    return correct / (2 * count)


# ----------------------------------------------------------------------------------------------
# the trained autoencoder on the split's validation images
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def reconstruct(vae, images: torch.Tensor) -> torch.Tensor:
    """The autoencoder's reconstruction of ``images`` from the posterior mean, in fp32."""
    from generation.sampling import decode

    return decode(vae, vae.encode(images.float()).latent_dist.mode())


def evaluate_vae(vae, data, cfg, run_dir, device, batch_size: int = 16) -> dict | None:
    """PSNR and SSIM of the autoencoder's reconstructions of the split's validation images (never
    trained on: this measures what it does on images it has not seen), means over the images,
    written to <run>/vae_metrics.json and printed. None when the split has no validation images."""
    from pathlib import Path

    from tqdm import tqdm

    from generation.data import TrainingImages
    from generation.run import VAE_METRICS, write_json

    if not data.val_paths:
        print(f"autoencoder: no validation images (no {data.val_file or 'validation list'}): "
              f"{VAE_METRICS} not written")
        return None
    images = TrainingImages(data.val_paths, None, cfg.image_size)
    psnrs, ssims = [], []
    for first in tqdm(range(0, len(images), batch_size), desc="autoencoder on the validation images", leave=False,
                      disable=not cfg.progress):
        batch = torch.stack([images[(i, False)][0]
                             for i in range(first, min(first + batch_size, len(images)))]).to(device)
        reconstruction = reconstruct(vae, batch).clamp(-1, 1)
        psnrs.append(psnr(reconstruction, batch))
        ssims.append(ssim(reconstruction, batch, reduction="none"))
    metrics = {"psnr": float(torch.cat(psnrs).mean()), "ssim": float(torch.cat(ssims).mean()),
               "images": len(images), "image_size": cfg.image_size, "val_file": str(data.val_file),
               "vae_step": cfg.vae_steps, "data_range": "images in [-1, 1] (range 2), reconstruction clamped; "
               "posterior mean decoded in fp32; SSIM with an 11x11 gaussian window (sigma 1.5)"}
    write_json(Path(run_dir) / VAE_METRICS, metrics)
    print(f"autoencoder on the {len(images)} validation images of {Path(data.val_file).name} (never trained on): "
          f"PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f} ({Path(run_dir) / VAE_METRICS})")
    return metrics
