"""Text encoders (MiniLM default, any transformers directory, T5) and the LM-initialised deep block."""
import json
import os
import shutil
import subprocess
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from starflow.flow.block import FlowBlock  # noqa: E402
from starflow.components.lm_init import (init_deep_block_from_lm, lm_decoder_layers, lm_prompt_encoder,  # noqa: E402
                              lm_token_embeddings, load_causal_lm)
from starflow.components.text_encoder import TextEmbedding, TextEncoder, minilm_dir  # noqa: E402

SENTENCES = ["a red circle", "two blue squares to the left of a green triangle", "three yellow stars",
             "a big purple square above a small orange circle", "the cat sat on the mat"]


class CallCounter:
    """Counts forward calls and rows through a module (a hook, so a cache hit that runs the model shows)."""

    def __init__(self, module):
        self.calls = self.rows = 0
        module.register_forward_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs, out):
        self.calls += 1
        self.rows += (args[0] if args else kwargs["input_ids"]).shape[0]


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder.from_pretrained("minilm")


def _word_tokenizer(path):
    """A tiny word-level tokenizer trained offline on SENTENCES, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)
    return fast


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    from transformers import T5Config, T5ForConditionalGeneration

    path = str(tmp_path_factory.mktemp("tiny_t5"))
    tok = _word_tokenizer(path)
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    T5ForConditionalGeneration(cfg).save_pretrained(path)  # a full encoder-decoder checkpoint
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = str(tmp_path_factory.mktemp("tiny_llama"))
    tok = _word_tokenizer(path)
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=0, eos_token_id=1,
                      bos_token_id=1)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # make the norm gains non-trivial so copying them is visible
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return path


# ---- MiniLM (the default) ------------------------------------------------------------------------------
def test_minilm_states_mask_pooled(minilm):
    from transformers import AutoModel, AutoTokenizer

    assert minilm.dim == 384 and not minilm.training
    assert all(not p.requires_grad for p in minilm.parameters())
    prompts = ["a red circle", "two blue squares to the left of a green triangle"]
    emb = minilm.encode(prompts)
    assert isinstance(emb, TextEmbedding)
    B, L, D = emb.states.shape
    assert (B, D) == (2, 384) and emb.dim == 384
    assert emb.mask.dtype == torch.bool and emb.mask.shape == (2, L) and emb.pooled.shape == (2, 384)
    n = emb.mask.sum(1)
    assert n[0] < n[1] == L  # trimmed to the longest prompt; [CLS] ... [SEP]
    assert emb.states[0, n[0]:].abs().sum() == 0
    mean = (emb.states * emb.mask[..., None]).sum(1) / n[:, None]
    torch.testing.assert_close(emb.pooled, mean)
    # The same numbers as running the installed MiniLM directly (pretrained weights, not random ones).
    tok = AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)
    ref = AutoModel.from_pretrained(minilm_dir(), local_files_only=True).eval()
    with torch.no_grad():
        b = tok(prompts, padding=True, return_tensors="pt")
        out = ref(**b).last_hidden_state
    torch.testing.assert_close(emb.states[1], out[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(emb.states[0, :n[0]], out[0, :n[0]], atol=1e-4, rtol=1e-4)
    # Pretrained sentence semantics: paraphrase closer than an unrelated sentence.
    e = torch.nn.functional.normalize(minilm.encode(["a red circle", "a small red disc", "stock prices fell sharply"]).pooled, dim=-1)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2


def test_batched_equals_alone(minilm):
    prompts = ["a red circle", "two blue squares to the left of a green triangle", "xyzzy flarbnog"]
    minilm.clear_cache()
    batch = minilm.encode(prompts)
    for i, p in enumerate(prompts):
        minilm.clear_cache()
        one = minilm.encode([p])
        n = int(one.mask.sum())
        assert int(batch.mask[i].sum()) == n
        assert torch.equal(batch.states[i, :n], one.states[0, :n]), p
        assert torch.equal(batch.pooled[i], one.pooled[0]), p


def test_cache_hit_identical_and_counted(minilm):
    minilm.clear_cache()
    counter = CallCounter(minilm.model)
    a = minilm.encode(["a green triangle"])
    assert minilm.cache_info().misses == 1 and minilm.cache_info().hits == 0 and counter.rows == 1
    b = minilm.encode(["a green triangle", "a yellow star", "a green triangle"])
    info = minilm.cache_info()
    assert info.hits == 1 and info.misses == 2 and info.currsize == 2
    assert counter.rows == 2  # only the new caption went through the model
    n = int(a.mask.sum())
    assert torch.equal(b.states[0, :n], a.states[0, :n]) and torch.equal(b.states[2], b.states[0])
    assert torch.equal(b.pooled[0], a.pooled[0])


def test_lru_evicts_and_encode_dataset_once(t5_dir):
    enc = TextEncoder.from_pretrained(t5_dir, max_length=12, cache_size=2)
    counter = CallCounter(enc.model)
    caps = ["a red circle", "three yellow stars", "a red circle", "the cat sat on the mat", "three yellow stars"]
    ds = enc.encode_dataset(caps, batch_size=2)
    assert counter.rows == 3  # each unique caption once
    assert ds.states.shape == (5, 12, 32) and ds.mask.shape == (5, 12)
    assert torch.equal(ds.states[0], ds.states[2]) and torch.equal(ds.states[1], ds.states[4])
    alone = enc.encode(["the cat sat on the mat"])  # still cached (most recent)
    assert counter.rows == 3
    n = int(alone.mask.sum())
    assert torch.equal(alone.states[0, :n], ds.states[3, :n])
    assert enc.cache_info().currsize == 2
    enc.encode(["a red circle"])  # evicted by the LRU limit: encoded again, same numbers
    assert counter.rows == 4


def test_truncation_warns_with_count(minilm):
    enc = TextEncoder(minilm.model, minilm.tokenizer, max_length=8)
    long = "a red circle above a blue square to the left of a green triangle"
    total = len(enc.tokenizer(long)["input_ids"])
    with pytest.warns(UserWarning, match=f"{total - 8} tokens dropped"):
        emb = enc.encode([long, "a red circle"])
    assert emb.states.shape[1] == 8 and int(emb.mask[0].sum()) == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc.encode(["a red circle"])  # short prompt: no warning


def test_bad_prompts(minilm):
    for bad in ([""], ["   \n\t"], ["ok", ""]):
        with pytest.raises(ValueError, match="empty prompt"):
            minilm.encode(bad)
    with pytest.raises(ValueError):
        minilm.encode([])
    with pytest.raises(TypeError):
        minilm.encode([3])
    emb = minilm.encode(["qwzx blorptangle frobnicated"])  # unknown words: word pieces / [UNK], no error
    assert torch.isfinite(emb.states).all() and emb.mask.sum() > 3


def test_spec_minilm(minilm):
    spec = minilm.to_spec()
    assert json.loads(json.dumps(spec)) == {"name": "minilm", "max_length": 32}
    assert minilm.save_reference() == spec
    with pytest.raises(FileNotFoundError):
        TextEncoder.from_spec({"name": "/no/such/encoder"})
    with pytest.raises(ValueError):
        TextEncoder.from_spec({"max_length": 3})


# ---- any transformers directory: tiny T5 ----------------------------------------------------------------
def test_tiny_t5_by_path(t5_dir):
    from transformers import AutoTokenizer, T5EncoderModel

    enc = TextEncoder.from_pretrained(t5_dir, max_length=16)
    assert enc.dim == 32
    prompts = ["a red circle", "two blue squares to the left of a green triangle", "an unseen zebra word"]
    emb = enc.encode(prompts)
    assert emb.states.shape == (3, 11, 32) and emb.pooled.shape == (3, 32)
    assert emb.mask.sum(1).tolist() == [4, 11, 5]  # words + </s>; unknown words are <unk>
    # The stored encoder weights were loaded (not re-initialised): same states as T5EncoderModel.
    ref = T5EncoderModel.from_pretrained(t5_dir).eval()
    tok = AutoTokenizer.from_pretrained(t5_dir)
    with torch.no_grad():
        out = ref(**tok(prompts[1:2], return_tensors="pt")).last_hidden_state
    torch.testing.assert_close(emb.states[1], out[0], atol=1e-5, rtol=1e-5)
    # Spec round trip: JSON, then the same encoder.
    spec = json.loads(json.dumps(enc.to_spec()))
    assert spec == {"name": os.path.abspath(t5_dir), "max_length": 16}
    again = TextEncoder.from_spec(spec).encode(prompts)
    assert torch.equal(again.states, emb.states)
    # bf16: float32 outputs, close to the fp32 ones.
    bf = TextEncoder.from_pretrained(t5_dir, max_length=16, dtype=torch.bfloat16).encode(prompts)
    assert bf.states.dtype == torch.float32 and torch.isfinite(bf.states).all()
    assert (bf.states - emb.states).abs().max() < 0.1 * emb.states.abs().max()


# ---- encoder-free: deep block from a causal LM ----------------------------------------------------------
def _identity_rope(B, T, head_dim):
    return torch.ones(B, T, head_dim), torch.zeros(B, T, head_dim)


def _lm_attention_sublayer(layer, x, pre_norm):
    """The LM layer's attention with rotary turned off (cos 1, sin 0), causal: what our copy must compute."""
    B, T, _ = x.shape
    mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
    out = layer.self_attn(pre_norm(x), position_embeddings=_identity_rope(B, T, layer.self_attn.head_dim),
                          attention_mask=mask)[0]
    return out


def test_llama_init_maps_attention(llama_dir):
    from starflow.nn.attention import attention_mask

    lm = load_causal_lm(lm_dir=llama_dir)
    lm.config._attn_implementation = "eager"
    torch.manual_seed(2)
    block = FlowBlock(token_dim=4, num_tokens=8, width=32, num_layers=3, head_dim=8, mlp_ratio=4,
                      reverse_order=False, norm="rmsnorm", cond_dim=32)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    report = init_deep_block_from_lm(block, llama_dir)
    assert report["layers"] == [(0, 0), (1, 1)]
    assert any("mlp" in r and "gated" in r for r in report["not_mapped"])
    assert any("rotary" in r for r in report["not_mapped"])
    layers = lm_decoder_layers(lm)
    assert layers[0]["num_kv_heads"] == 2 and layers[0]["num_heads"] == 4
    for i, d in enumerate(layers):
        att, ref = block.layers[i].attention, lm.model.layers[i]
        q, k, v = att.qkv.weight.split(32)
        assert torch.equal(q, ref.self_attn.q_proj.weight)
        # grouped-query: q heads 0,1 share kv head 0; q heads 2,3 share kv head 1
        kw = ref.self_attn.k_proj.weight.view(2, 8, 32)
        assert torch.equal(k.view(4, 8, 32), kw[[0, 0, 1, 1]])
        assert torch.equal(v.view(4, 8, 32), ref.self_attn.v_proj.weight.view(2, 8, 32)[[0, 0, 1, 1]])
        assert torch.equal(att.qkv.bias, torch.zeros(96))
        assert torch.equal(att.proj.weight, ref.self_attn.o_proj.weight)
        assert torch.equal(att.norm.weight, ref.input_layernorm.weight)
        for name in ("mlp.norm.weight", "mlp.main.0.weight", "mlp.main.2.weight"):  # documented: not mapped
            assert torch.equal(block.state_dict()[f"layers.{i}.{name}"], before[f"layers.{i}.{name}"])
        # Functionally the same attention sub-layer (rotary off on the LM side; eps differs slightly).
        x = torch.randn(2, 6, 32)
        with torch.no_grad():
            ours = att(x, attention_mask(0, 6, None, x.device))
            theirs = _lm_attention_sublayer(ref, x, ref.input_layernorm)
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    for k in before:  # the block's third layer (the LM has two), proj_in/out, pos_embed: untouched
        if k.startswith(("layers.2.", "proj_", "pos_embed")):
            assert torch.equal(block.state_dict()[k], before[k]), k
    assert torch.equal(block.condition.text_proj.weight, torch.eye(32))

    # Encoder-free prefix: the prompt's tokens embedded by the LM's own table.
    emb_table = lm_token_embeddings(lm)
    assert torch.equal(emb_table, lm.get_input_embeddings().weight)
    enc = lm_prompt_encoder(llama_dir, max_length=8)
    assert enc.to_spec() == {"name": os.path.abspath(llama_dir), "max_length": 8, "mode": "embeddings"}
    ids = enc.tokenizer(["a red circle"])["input_ids"][0]
    e = enc.encode(["a red circle"])
    assert torch.equal(e.states[0], emb_table[ids])


def test_gemma_style_init_qk_norm_and_scale(tmp_path):
    """Gemma 3 layout: (1 + w) norm gains, per-head q/k norms, sandwich norms, a non-default attention scale."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from starflow.nn.attention import attention_mask

    torch.manual_seed(3)
    cfg = Gemma3TextConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=32,
                           sliding_window=64)
    lm = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "norm" in n:
                p.uniform_(-0.5, 0.5)
    lm.config._attn_implementation = "eager"
    block = FlowBlock(token_dim=4, num_tokens=8, width=32, num_layers=2, head_dim=8, mlp_ratio=4,
                      reverse_order=False, norm="rmsnorm", qk_norm=True)
    report = init_deep_block_from_lm(block, lm)
    assert any("sandwich" in r for r in report["not_mapped"])
    ref, att = lm.model.layers[0], block.layers[0].attention
    torch.testing.assert_close(att.norm.weight, 1 + ref.input_layernorm.weight)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        ours = att(x, attention_mask(0, 5, None, x.device))
        theirs = _lm_attention_sublayer(ref, x, ref.input_layernorm)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    # A shape that cannot map is refused with the reason.
    wide = FlowBlock(token_dim=4, num_tokens=8, width=64, num_layers=1, head_dim=8, mlp_ratio=4, reverse_order=False)
    with pytest.raises(ValueError, match="width"):
        init_deep_block_from_lm(wide, lm)


def test_precomputed_table_matches_live_encoder(tmp_path):
    from starflow.components.text_encoder import TextEncoder, save_text_table

    enc = TextEncoder.from_pretrained("minilm")
    caps = ["a red circle", "two blue squares above a green triangle"]
    save_text_table(enc, caps + caps[:1], str(tmp_path / "t.safetensors"))
    table = TextEncoder.from_pretrained("table:" + str(tmp_path / "t.safetensors"))
    live, stored = enc.encode(caps), table.encode(caps)
    assert table.dim == enc.dim == 384
    assert torch.equal(live.mask, stored.mask)
    assert (live.states - stored.states).abs().max().item() < 1e-2  # stored as fp16
    with pytest.raises(KeyError, match="not in the precomputed text table"):
        table.encode(["a yellow square"])


# ---- starflow's own BERT (starflow.components.bert) against transformers on the MiniLM files ----------
AWKWARD = SENTENCES + ["Ünïcödé CAFÉ naïve résumé!!", "x", "hello, world. it's 3:45pm -- ok?",
                       "中文 字符 and an emoji 😀", "a " * 40, "  padded   with\tspaces\n"]


def test_native_minilm_matches_transformers(minilm):
    ref = TextEncoder.from_pretrained("minilm", backend="transformers")
    assert type(minilm.model).__module__ == "starflow.components.bert"
    assert type(ref.model).__module__.startswith("transformers.")
    for prompt in AWKWARD[:3]:  # one string: flat ids, as transformers gives
        assert minilm.tokenizer(prompt)["input_ids"] == ref.tokenizer(prompt)["input_ids"]
    assert minilm.tokenizer(AWKWARD)["input_ids"] == ref.tokenizer(AWKWARD)["input_ids"]
    for max_length in (8, 32):
        a = minilm.tokenizer(AWKWARD, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        b = ref.tokenizer(AWKWARD, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 40-word prompt is truncated on both sides
        ours, theirs = minilm.encode(AWKWARD), ref.encode(AWKWARD)
    assert torch.equal(ours.mask, theirs.mask)
    assert (ours.states - theirs.states).abs().max() <= 1e-4 and theirs.states.abs().max() > 1
    assert minilm.dim == ref.dim == 384


def test_native_text_encoder_backends_and_refusals(tmp_path, t5_dir):
    with pytest.raises(ValueError, match="unknown text encoder backend"):
        TextEncoder.from_pretrained("minilm", backend="onnx")
    with pytest.raises(ValueError, match="only a BERT encoder"):
        TextEncoder.from_pretrained(t5_dir, backend="native")
    assert type(TextEncoder.from_pretrained(t5_dir).model).__module__.startswith("transformers.")  # auto falls back
    # a BERT directory whose weights do not fit its config is refused, not half-loaded
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bert"
    shutil.copytree(minilm_dir(), bad)
    state = load_file(str(bad / "model.safetensors"))
    state.pop("encoder.layer.5.output.dense.bias")
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match="does not match its config.json"):
        TextEncoder.from_pretrained(str(bad))


def test_minilm_loads_without_transformers():
    code = ("import sys; from starflow.components.text_encoder import TextEncoder;"
            "TextEncoder.from_pretrained('minilm').encode(['a red circle']);"
            "print(sorted(m for m in ('transformers', 'torch._dynamo', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
