"""What every model family provides, as ``typing.Protocol``s the rest of the package checks against.

Two levels:

- ``GenerativeModel``: trains on images in model space and draws samples (STARFlow, RectifiedFlow,
  FlowAR). It is a saved directory (``save_pretrained``/``from_pretrained``) named by ``model_type``.
- ``LikelihoodModel``: a generative model that is also an exact, invertible flow: ``forward`` maps data
  to noise with the log-determinant, ``inverse`` maps noise back, ``log_prob``/``nll`` are exact
  (STARFlow). Tools that need exact likelihoods or noise <-> data maps (``starflow nll``, encode/decode,
  Tweedie denoising) check ``isinstance(model, LikelihoodModel)``.
- ``TokenFlow``: a likelihood model over patch tokens whose sampling prior is per token
  (``patchify``/``unpatchify``/``prior_var``): what inpainting resamples token by token.

The checks are structural (``runtime_checkable``): a class conforms by having the members, no base
class needed. The peers define ``nll`` too, only to raise a clear "no exact likelihood" error, so the
likelihood protocol is told apart by ``log_prob`` and ``inverse``, which they do not have.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # annotations only: importing the protocols costs nothing at start-up
    import torch


@runtime_checkable
class GenerativeModel(Protocol):
    model_type: str  # the registry key, stored in config.json
    config_class: type  # the dataclass a saved config.json is read into
    config: Any  # an instance of config_class

    def loss(self, x: torch.Tensor, y: torch.Tensor | None = None, text=None, **kwargs) -> torch.Tensor:
        """Scalar training loss for a batch of model-space images with optional labels / text."""

    def sample(self, n: int, y: torch.Tensor | None = None, text=None, **kwargs) -> torch.Tensor:
        """n model-space samples (e.g. [-1, 1] pixels or normalised latents)."""

    def num_params(self) -> int: ...

    def save_pretrained(self, directory: str, dtype: torch.dtype | None = None) -> None: ...

    @classmethod
    def from_pretrained(cls, directory: str, map_location: str | torch.device = "cpu") -> Any: ...


@runtime_checkable
class LikelihoodModel(GenerativeModel, Protocol):
    def forward(self, x: torch.Tensor, y=None, text=None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Data x -> (noise z of the same shape, log|det dz/dx| per example)."""

    def inverse(self, z: torch.Tensor, y=None, text=None, **kwargs) -> torch.Tensor:
        """Noise z -> data, the inverse of ``forward``."""

    def log_prob(self, x: torch.Tensor, y=None, text=None, **kwargs) -> torch.Tensor:
        """Exact log-density in nats, per example."""

    def nll(self, x: torch.Tensor, y=None, text=None) -> torch.Tensor:
        """Negative log-likelihood in nats per dimension, per example."""

    def bits_per_dim(self, images: torch.Tensor, y=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Bits/dim of uint8 images under uniform dequantisation, per example (pixel-space models)."""


@runtime_checkable
class TokenFlow(LikelihoodModel, Protocol):
    prior_var: torch.Tensor  # [tokens, token_dim] sampling variance of the prior

    def patchify(self, x: torch.Tensor) -> torch.Tensor: ...

    def unpatchify(self, t: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor: ...


__all__ = ["GenerativeModel", "LikelihoodModel", "TokenFlow"]
