"""The encoder-free variant (DESIGN.md §3): start the deep block from a pretrained causal language model.

Reading an LM (any local transformers directory, or a GGUF file inside one via ``gguf_file=``):

    model = load_causal_lm(lm_dir)              # AutoModelForCausalLM, local files only, fp32
    tok = load_lm_tokenizer(lm_dir)
    emb = lm_token_embeddings(model)            # [vocab, hidden], the scale the LM applies folded in
    layers = lm_decoder_layers(model)           # per layer: {"q","k","v","o","input_norm",...} tensors

Starting the deep block from it:

    report = init_deep_block_from_lm(deep_block, lm_dir_or_model)
    prompts = lm_prompt_encoder(lm_dir)         # a TextEncoder whose states are the LM's token embeddings

``lm_prompt_encoder`` is how "feed the raw prompt tokens, no separate text encoder" plugs into the rest of
the project: it is a ``TextEncoder`` in ``"embeddings"`` mode (tokenise with the LM's tokenizer, look up
the LM's own embedding table, nothing else), so the pipeline, caching and saved specs work unchanged.
With ``cond_dim == width`` ``init_deep_block_from_lm`` sets the block's ``condition.text_proj`` to the
identity, so the deep block's prefix is exactly the LM's token embeddings.

What maps, for each copied layer (LM layer j -> block layer i, ``lm_layers`` picks j; default 0, 1, ...):

* attention input norm -> ``attention.norm``: the LM's RMSNorm gain (Llama: ``w``; Gemma: ``1 + w``,
  found by probing the module). Exact when the block uses RMSNorm (up to epsilon: ours is torch's default,
  the LM's is 1e-6/1e-5); with LayerNorm the gain is copied and the bias zeroed, an approximation
  (LayerNorm also subtracts the mean).
* q/k/v projections -> the fused ``attention.qkv`` as rows [q; k; v] (biases too where the LM has them,
  else zero). Grouped-query / multi-query attention (fewer k/v heads than q heads) is expanded by
  repeating each k/v head for the q heads that share it, which computes the same attention.
* output projection -> ``attention.proj`` (bias zero unless the LM has one).
* per-head q/k RMSNorm (Gemma 3, Qwen 3) -> ``attention.q_norm``/``k_norm`` when the block has
  ``qk_norm=True``; otherwise reported as not mapped.
* the LM's attention scale (Gemma: ``query_pre_attn_scalar ** -0.5``) is folded into the q gain (q-norm
  gain if both sides have q-norm, else the q rows) so that logits match our 1/sqrt(head_dim).

What does NOT map (left as the block initialised it, and listed in the returned report):

* the MLP. Llama/Gemma MLPs are gated, ``down(act(gate(x)) * up(x))`` with three matrices (SwiGLU /
  GeGLU); ours is ``main.2(GELU(main.0(x)))`` with two. No choice of our two matrices computes the gated
  function, so ``mlp.*`` (its norm included) is not touched. Only the attention sub-layers are copied.
* positions: the LM uses rotary embeddings inside attention; our block adds a learned ``pos_embed`` to
  its input and has no rotary. Copied attention therefore sees no relative-position signal that matches
  its training; the positional behaviour has to be re-learned.
* Gemma's extra "sandwich" norms (``post_attention_layernorm``, ``post_feedforward_layernorm``, applied
  to sub-layer outputs) have no counterpart in our pre-norm layer; logit soft-capping and sliding-window
  attention neither (the window, 512 in Gemma 3, exceeds our sequence lengths, so it would not bite).
* ``proj_in``, ``pos_embed``, ``proj_out`` and the LM head: our tokens are image latents, not text.
* epsilon of the norms (ours stays torch's default).

Shape requirements (else ``ValueError``): the LM's hidden size equals the block width, its head_dim
equals ours, and its q heads x head_dim equals its hidden size (our attention's inner width is the block
width). Gemma 3 270M, for example, has hidden 640 but 4 q heads x 256 = 1024, so its attention cannot be
copied into any block of ours; its token embeddings (640-d) can still be the prefix through ``text_proj``.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn as nn

from starflow.components.text_encoder import TextEncoder, _require_safetensors


def _kw(gguf_file):
    return {"gguf_file": gguf_file} if gguf_file else {}


def load_causal_lm(lm_dir: str, gguf_file: str | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A pretrained causal LM from a local directory (AutoModelForCausalLM; no network), frozen, eval."""
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(lm_dir):
        raise FileNotFoundError(f"language model directory {lm_dir!r} does not exist")
    if not gguf_file:  # weights from safetensors only: a pickled pytorch_model.bin is never unpickled

        _require_safetensors(lm_dir)
    safe = {} if gguf_file else {"use_safetensors": True}
    model = AutoModelForCausalLM.from_pretrained(lm_dir, local_files_only=True, dtype=dtype, **safe, **_kw(gguf_file))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_lm_tokenizer(lm_dir: str, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(lm_dir, local_files_only=True, **_kw(gguf_file))


def _as_model(lm, gguf_file=None) -> nn.Module:
    return load_causal_lm(lm, gguf_file) if isinstance(lm, (str, os.PathLike)) else lm


def lm_token_embeddings(lm, gguf_file: str | None = None) -> torch.Tensor:
    """[vocab, hidden] input embedding table, with the LM's own embedding scale (Gemma: sqrt(hidden)) applied."""
    embed = _as_model(lm, gguf_file).get_input_embeddings()
    weight = embed.weight.detach().float()
    scale = getattr(embed, "embed_scale", None)
    if scale is not None:
        weight = weight * float(scale)
    return weight.clone()


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", model)
    if isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return inner.layers
    for name, mod in model.named_modules():  # other layouts: the first ModuleList of attention layers
        if isinstance(mod, nn.ModuleList) and len(mod) and hasattr(mod[0], "self_attn"):
            return mod
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def _norm_gain(norm: nn.Module) -> torch.Tensor:
    """The per-channel gain an RMSNorm-like module applies (Llama: w, Gemma: 1 + w), found by probing it."""
    w = norm.weight.detach().float()
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", None) or 0.0
    with torch.no_grad():
        probe = norm(torch.ones(1, w.shape[0], dtype=norm.weight.dtype, device=w.device)).float()[0] * math.sqrt(1 + eps)
    for cand in (w, 1.0 + w):
        if torch.allclose(probe, cand, rtol=1e-3, atol=1e-4):
            return cand.clone()
    return probe


def lm_decoder_layers(lm, gguf_file: str | None = None) -> list[dict[str, torch.Tensor]]:
    """Per decoder layer, its weights under neutral names (fp32 copies).

    Keys: q, k, v, o (weights), q_bias, k_bias, v_bias, o_bias (if any), input_norm, pre_mlp_norm
    (effective gains), q_norm, k_norm (if any), gate, up, down (gated MLP), post_attn_norm,
    post_mlp_norm (Gemma's sandwich norms, if any); plus ints num_heads, num_kv_heads, head_dim and the
    float attn_scale.
    """
    model = _as_model(lm, gguf_file)
    out = []
    for layer in _decoder_layers(model):
        a = layer.self_attn
        d: dict = {}
        for key, lin in (("q", a.q_proj), ("k", a.k_proj), ("v", a.v_proj), ("o", a.o_proj)):
            d[key] = lin.weight.detach().float().clone()
            if lin.bias is not None:
                d[key + "_bias"] = lin.bias.detach().float().clone()
        head_dim = getattr(a, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
        d["head_dim"] = int(head_dim)
        d["num_heads"] = d["q"].shape[0] // head_dim
        d["num_kv_heads"] = d["k"].shape[0] // head_dim
        d["attn_scale"] = float(getattr(a, "scaling", head_dim ** -0.5))
        for key in ("q_norm", "k_norm"):
            if isinstance(getattr(a, key, None), nn.Module) and hasattr(getattr(a, key), "weight"):
                d[key] = _norm_gain(getattr(a, key))
        d["input_norm"] = _norm_gain(layer.input_layernorm)
        if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma 2/3: sandwich norms
            d["pre_mlp_norm"] = _norm_gain(layer.pre_feedforward_layernorm)
            d["post_attn_norm"] = _norm_gain(layer.post_attention_layernorm)
            if hasattr(layer, "post_feedforward_layernorm"):
                d["post_mlp_norm"] = _norm_gain(layer.post_feedforward_layernorm)
        else:
            d["pre_mlp_norm"] = _norm_gain(layer.post_attention_layernorm)
        mlp = layer.mlp
        for key in ("gate", "up", "down"):
            lin = getattr(mlp, key + "_proj", None)
            if lin is not None:
                d[key] = lin.weight.detach().float().clone()
        out.append(d)
    return out


def _expand_kv(w: torch.Tensor, num_heads: int, num_kv: int, head_dim: int) -> torch.Tensor:
    """k/v rows of num_kv heads -> rows of num_heads heads (q head h reads kv head h // group)."""
    if num_kv == num_heads:
        return w
    group = num_heads // num_kv
    shape = w.shape[1:]
    return w.reshape(num_kv, head_dim, *shape).repeat_interleave(group, dim=0).reshape(num_heads * head_dim, *shape)


@torch.no_grad()
def init_deep_block_from_lm(block: nn.Module, lm, lm_layers: list[int] | None = None,
                            prefix_identity: bool = True, gguf_file: str | None = None) -> dict:
    """Copy what maps cleanly from a causal LM into a FlowBlock (see the module docstring). Returns a report:

    {"layers": [(block_layer, lm_layer), ...], "copied": [parameter names], "not_mapped": [reasons]}
    """
    model = _as_model(lm, gguf_file)
    cfg = model.config
    layers = lm_decoder_layers(model)
    width = block.proj_in.out_features
    ours = block.layers[0].attention
    if cfg.hidden_size != width:
        raise ValueError(f"LM hidden size {cfg.hidden_size} != block width {width}")
    L0 = layers[0]
    if L0["head_dim"] != ours.head_dim:
        raise ValueError(f"LM head_dim {L0['head_dim']} != block head_dim {ours.head_dim}")
    if L0["num_heads"] * L0["head_dim"] != width:
        raise ValueError(f"LM attention inner width {L0['num_heads']}x{L0['head_dim']} = "
                         f"{L0['num_heads'] * L0['head_dim']} != hidden size {width}: our attention's inner width "
                         "is the block width, so its q/k/v/o cannot be copied")
    if lm_layers is None:
        lm_layers = list(range(min(len(block.layers), len(layers))))
    if len(lm_layers) > len(block.layers):
        raise ValueError(f"{len(lm_layers)} LM layers requested for a block of {len(block.layers)} layers")
    for j in lm_layers:
        if not 0 <= j < len(layers):
            raise ValueError(f"LM has {len(layers)} layers; no layer {j}")

    copied, not_mapped = [], set()
    head_scale = ours.head_dim ** -0.5
    for i, j in enumerate(lm_layers):
        d, att = layers[j], block.layers[i].attention
        H, Hkv, Dh = d["num_heads"], d["num_kv_heads"], d["head_dim"]
        r = d["attn_scale"] / head_scale
        q, qb = d["q"].clone(), d.get("q_bias")
        qb = torch.zeros(width) if qb is None else qb.clone()
        has_qk = isinstance(att.q_norm, nn.RMSNorm)
        if "q_norm" in d and not has_qk:
            not_mapped.add("q_norm/k_norm: the LM normalises q and k per head; this block has qk_norm=False")
        if has_qk and "q_norm" not in d:
            not_mapped.add("q_norm/k_norm of the block: the LM has none (left at their initial value)")
        fold_in_norm = has_qk and "q_norm" in d
        if r != 1.0 and not fold_in_norm:
            q, qb = q * r, qb * r
        k = _expand_kv(d["k"], H, Hkv, Dh)
        v = _expand_kv(d["v"], H, Hkv, Dh)
        kb = _expand_kv(d["k_bias"], H, Hkv, Dh) if "k_bias" in d else torch.zeros(width)
        vb = _expand_kv(d["v_bias"], H, Hkv, Dh) if "v_bias" in d else torch.zeros(width)
        dev, dt = att.qkv.weight.device, att.qkv.weight.dtype
        att.qkv.weight.copy_(torch.cat([q, k, v]).to(dev, dt))
        att.qkv.bias.copy_(torch.cat([qb, kb, vb]).to(dev, dt))
        att.proj.weight.copy_(d["o"].to(dev, dt))
        att.proj.bias.copy_(d.get("o_bias", torch.zeros(width)).to(dev, dt))
        pre = f"layers.{i}.attention."
        copied += [pre + "qkv.weight", pre + "qkv.bias", pre + "proj.weight", pre + "proj.bias"]
        att.norm.weight.copy_(d["input_norm"].to(dev, dt))
        copied.append(pre + "norm.weight")
        if isinstance(att.norm, nn.LayerNorm):
            att.norm.bias.zero_()
            not_mapped.add("attention.norm is LayerNorm: RMSNorm gain copied, bias zeroed (approximate, LayerNorm also centres)")
        if fold_in_norm:
            att.q_norm.weight.copy_((d["q_norm"] * r).to(dev, dt))
            att.k_norm.weight.copy_(d["k_norm"].to(dev, dt))
            copied += [pre + "q_norm.weight", pre + "k_norm.weight"]
        if "post_attn_norm" in d:
            not_mapped.add("post_attention_layernorm / post_feedforward_layernorm (sandwich norms): no counterpart")
    not_mapped.add("mlp.*: the LM's MLP is gated (gate/up/down); ours is a two-matrix GELU MLP")
    not_mapped.add("rotary position embeddings: our block uses a learned additive pos_embed")
    not_mapped.add("proj_in, pos_embed, proj_out, the LM head: image latent tokens, not text")

    cond = getattr(block, "condition", None)
    text_proj = getattr(cond, "text_proj", None) if cond is not None else None
    if prefix_identity and text_proj is not None:
        if text_proj.in_features == width:
            text_proj.weight.copy_(torch.eye(width, dtype=text_proj.weight.dtype, device=text_proj.weight.device))
            text_proj.bias.zero_()
            copied += ["condition.text_proj.weight", "condition.text_proj.bias"]
        else:
            not_mapped.add(f"condition.text_proj: cond_dim {text_proj.in_features} != width {width}, left as is")
    return {"layers": list(enumerate(lm_layers)), "copied": copied, "not_mapped": sorted(not_mapped)}


def lm_prompt_encoder(lm_dir: str, max_length: int = 32, gguf_file: str | None = None, **kwargs):
    """A TextEncoder that embeds prompt tokens with the LM's own table (the encoder-free prefix)."""

    return TextEncoder.from_pretrained(lm_dir, max_length=max_length, mode="embeddings", gguf_file=gguf_file, **kwargs)
