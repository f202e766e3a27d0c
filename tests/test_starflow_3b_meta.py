"""The released 3B text-to-image STARFlow, built from its training YAML's arguments on the meta device:
shapes and parameter count without allocating a byte of weights."""
import pytest
import torch

from starflow.convert.starflow import inference_memory, parameter_count, resolve_config
from starflow.flow.model import STARFlow

# The arguments of starflow_3B_t2i_256x256.yaml that shape the model (a YAML list of one-key maps);
# txt_dim is flan-T5-XL's width, which the YAML leaves to the text encoder.
YAML_ARGUMENTS = [{"img_size": 256}, {"txt_size": 128}, {"channel_size": 4}, {"patch_size": 1},
                  {"channels": 3072}, {"blocks": 6}, {"layers_per_block": "2 2 2 2 2 24"}, {"noise_std": 0.3},
                  {"nvp": 1}, {"rope": 1}, {"adaln": 0}, {"sos": 1}, {"seq_order": "L2R"}, {"use_softplus": 1},
                  {"cond_top_only": 1}, {"use_final_norm": 1}, {"vae": "stabilityai/sd-vae-ft-ema"},
                  {"text": "google/flan-t5-xl"}, {"soft_clip": 4}]
T5_XL_WIDTH = 2048


@pytest.fixture(scope="module")
def config():
    return resolve_config({"arguments": YAML_ARGUMENTS + [{"txt_dim": T5_XL_WIDTH}]}, {}, "")


def test_config_of_the_released_model(config):
    assert (config.image_size, config.in_channels, config.patch_size) == (32, 4, 1)  # SD-VAE latents of 256 px
    assert config.block_layers() == [2, 2, 2, 2, 2, 24] and config.width == 3072 and config.head_dim == 64
    assert config.cond_dim == T5_XL_WIDTH and config.max_text_tokens == 128
    assert (config.positions, config.start_token, config.scale, config.soft_clip, config.final_norm,
            config.seq_order, config.learned_null) == ("rope", True, "softplus", 4.0, True, "L2R", False)


def test_built_on_meta_device(config):
    with torch.device("meta"):
        model = STARFlow(config)
    assert all(p.is_meta for p in model.parameters())
    deep = model.blocks[-1]
    assert len(deep.layers) == 24 and deep.condition.text_proj.weight.shape == (3072, T5_XL_WIDTH)
    assert deep.layers[0].attention.qkv.weight.shape == (3 * 3072, 3072)
    assert deep.proj_out.weight.shape == (8, 3072) and deep.sos_embed.shape == (1, 1, 4)
    assert all(b.pos_embed is None for b in model.blocks) and all(b.condition is None for b in model.blocks[:-1])
    # 34 transformer layers of 12 W^2 + 13 W weights, plus per block proj_in/out, sos, final norm, and proj_txt.
    W, D = 3072, 4
    layer = 12 * W * W + 13 * W
    block = (W * D + W) + (2 * D * W + 2 * D) + D + W
    expected = 34 * layer + 6 * block + (T5_XL_WIDTH * W + W)
    assert model.num_params() == expected == parameter_count(config)
    assert 3.8e9 < expected < 3.9e9  # "3B" in the release's name; 3.86B weights in all


def test_memory_estimate(config):
    mem = inference_memory(config, torch.bfloat16, batch=1, guided=True)
    assert mem["weights"] == 2 * parameter_count(config)
    # deep block: 24 layers x K and V x 2 rows (guidance) x 48 heads x (128 text + 1024 image + 1) slots x 64
    assert mem["kv_cache"] == 2 * 24 * 2 * 48 * (128 + 1024 + 1) * 64 * 2
    assert 7 * 2**30 < mem["total"] < 8.5 * 2**30
