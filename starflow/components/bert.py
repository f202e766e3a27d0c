"""A BERT encoder in plain torch and the Rust WordPiece tokenizer of its ``tokenizer.json``, so that
prompting a text-to-image model does not import transformers (~2.5 s of CPU on this machine, more than
``import torch`` itself; the ``tokenizers`` package it would use underneath imports in 0.1 s).

It covers the classic post-LN BERT encoder (absolute positions, exact GELU): the default MiniLM and its
kin. ``supports(path)`` says whether a transformers directory is in that set; ``text_encoder`` falls back
to transformers for everything else (T5, causal LMs, GGUF). Parameter names are transformers', so the
directory's ``model.safetensors`` loads as it is; ``tests/test_text_encoder.py`` checks tokens and hidden
states against transformers on the same files.
"""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

# Stored tensors the encoder does not use: the pooler (a sentence-level head) and a constant index buffer.
IGNORED = ("pooler.", "embeddings.position_ids")


def supports(path: str) -> bool:
    """True for a directory holding a post-LN BERT encoder that this module builds exactly, with a
    ``tokenizer.json`` and safetensors weights."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    return (cfg.get("model_type") == "bert" and cfg.get("hidden_act") == "gelu"
            and cfg.get("position_embedding_type", "absolute") == "absolute"
            and not cfg.get("is_decoder", False) and not cfg.get("add_cross_attention", False)
            and all(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "model.safetensors")))


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))

    def forward(self, h, keep):
        b, n, d = h.shape
        q, k, v = (f(h).view(b, n, self.heads, d // self.heads).transpose(1, 2) for f in (self.query, self.key, self.value))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(b, n, d)


class Residual(nn.Module):
    """dense -> add the block's input -> LayerNorm (BERT's post-LN "output" modules)."""

    def __init__(self, cin: int, width: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(cin, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)

    def forward(self, x, skip):
        return self.LayerNorm(self.dense(x) + skip)


class Layer(nn.Module):
    def __init__(self, cfg: SimpleNamespace):
        super().__init__()
        self.attention = nn.Module()
        self.attention.self = SelfAttention(cfg.hidden_size, cfg.num_attention_heads)
        self.attention.output = Residual(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.output = Residual(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, h, keep):
        a = self.attention.output(self.attention.self(h, keep), h)
        return self.output(F.gelu(self.intermediate.dense(a)), a)


class BertEncoder(nn.Module):
    """input ids [B, L] and attention mask [B, L] -> last hidden states [B, L, D] (what transformers'
    ``BertModel(...).last_hidden_state`` holds, rows of padding included)."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = cfg = SimpleNamespace(**config)
        self.embeddings = nn.Module()
        # built to be overwritten by stored weights: an empty table, not nn.Embedding's normal_ draw (on the
        # meta device that draw imports torch._dynamo, ~1 s of CPU; see starflow.nn.init)
        for name, rows in (("word", cfg.vocab_size), ("position", cfg.max_position_embeddings),
                           ("token_type", cfg.type_vocab_size)):
            table = nn.Embedding(rows, cfg.hidden_size, _weight=torch.empty(rows, cfg.hidden_size))
            setattr(self.embeddings, f"{name}_embeddings", table)
        self.embeddings.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([Layer(cfg) for _ in range(cfg.num_hidden_layers)])

    def forward(self, input_ids, attention_mask=None):
        e = self.embeddings
        n = input_ids.shape[1]
        h = e.word_embeddings(input_ids) + e.position_embeddings.weight[:n] + e.token_type_embeddings.weight[0]
        h = e.LayerNorm(h)
        keep = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        for layer in self.encoder.layer:
            h = layer(h, keep)
        return h

    @classmethod
    def from_pretrained(cls, path: str) -> "BertEncoder":
        from safetensors.torch import load_file

        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        with torch.device("meta"):
            model = cls(config)
        state = {k: v for k, v in load_file(os.path.join(path, "model.safetensors")).items() if not k.startswith(IGNORED)}
        state = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in state.items()}
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise ValueError(f"{path}: model.safetensors does not match its config.json: {e}") from e
        return model.float().eval()


class WordPieceTokenizer:
    """The directory's ``tokenizer.json`` run by the ``tokenizers`` package, called the way
    ``TextEncoder`` calls a transformers tokenizer: ``tok(prompts)["input_ids"]`` (untruncated ids) and
    ``tok(prompts, padding="max_length", truncation=True, max_length=L, return_tensors="pt")``."""

    padding_side = "right"

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        with open(os.path.join(path, "tokenizer_config.json")) as f:
            self.pad_token = json.load(f).get("pad_token", "[PAD]")
        self._pad_id = self._tok.token_to_id(self.pad_token)

    def __call__(self, prompts, add_special_tokens=True, padding=False, truncation=False, max_length=None,
                 return_tensors=None):
        self._tok.no_padding()
        self._tok.no_truncation()
        if truncation:
            self._tok.enable_truncation(max_length)
        if padding == "max_length":
            self._tok.enable_padding(length=max_length, pad_id=self._pad_id, pad_token=self.pad_token)
        single = isinstance(prompts, str)  # one string: flat lists, as transformers returns
        enc = self._tok.encode_batch([prompts] if single else list(prompts), add_special_tokens=add_special_tokens)
        out = {"input_ids": [e.ids for e in enc], "attention_mask": [e.attention_mask for e in enc]}
        if single:
            out = {k: v[0] for k, v in out.items()}
        if return_tensors == "pt":
            out = {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
        return out

