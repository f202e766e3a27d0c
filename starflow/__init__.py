"""starflow: latent normalizing flows (STARFlow / TARFlow) and peer systems on one harness."""
__version__ = "0.1.0"
