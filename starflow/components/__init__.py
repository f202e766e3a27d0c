"""Pretrained parts a pipeline is assembled from: the autoencoder (latent space), the text encoder, the
LM-initialised deep block, and the post-processing that cleans a noisy latent (Tweedie denoising)."""
