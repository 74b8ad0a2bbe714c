"""Stage 1: the latent diffusion model that makes synthetic images.

``config`` (the options of train_ldm.py), ``sampling_config`` (the options and output names of
sample_ldm.py), ``data`` (train_ldm.py's training images), ``run`` (its run folder and the skeleton
both training stages share), ``losses`` (autoencoder and denoiser), ``sampling`` (the denoising loop),
``image_quality`` (FID-free quality, C2ST and memorisation measures).
The networks themselves are in ``networks/ldm.py``.
"""
