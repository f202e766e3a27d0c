"""starflow's own AutoencoderKL (``starflow.components.autoencoder_kl``) against diffusers' on the same
weights: same parameter names, same latents and images, same encoder fingerprint, files each side reads;
layouts it does not cover go to diffusers; loading it imports neither diffusers nor torch._dynamo."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from starflow.components import autoencoder_kl
from starflow.components.autoencoder import Autoencoder, default_autoencoder_dir

LAYOUTS = {
    # name: (AutoencoderKL kwargs, image channels, image size)
    "two-level, no attention": (dict(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=8,
                                     mid_block_add_attention=False), 1, 16),
    "three levels, widening, attention, 2 layers": (dict(block_out_channels=(8, 16, 24), layers_per_block=2,
                                                         norm_num_groups=4, mid_block_add_attention=True), 3, 16),
    "no quant convs, 8 latent channels": (dict(block_out_channels=(16, 16), norm_num_groups=8, latent_channels=8,
                                               use_quant_conv=False, use_post_quant_conv=False), 3, 8),
}


def _diffusers_dir(tmp_path, kwargs, channels):
    from diffusers import AutoencoderKL

    n = len(kwargs["block_out_channels"])
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=channels, out_channels=channels, down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n, scaling_factor=0.5, shift_factor=0.25, **kwargs)
    with torch.no_grad():  # random norms and biases too, so a misplaced affine or bias shows
        for p in vae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    vae.save_pretrained(str(tmp_path))
    return str(tmp_path)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_native_matches_diffusers(tmp_path, layout):
    kwargs, channels, size = LAYOUTS[layout]
    d = _diffusers_dir(tmp_path, kwargs, channels)
    native = Autoencoder.from_pretrained(d, backend="native")
    ref = Autoencoder.from_pretrained(d, backend="diffusers")
    assert type(native.vae) is autoencoder_kl.AutoencoderKL and type(ref.vae) is not autoencoder_kl.AutoencoderKL
    assert native.vae.state_dict().keys() == ref.vae.state_dict().keys()
    x = torch.rand(2, channels, size, size) * 2 - 1
    with torch.no_grad():
        z, z_ref = native.encode(x), ref.encode(x)
        g = torch.Generator().manual_seed(1)
        zs = native.encode(x, sample=True, generator=g)
        zs_ref = ref.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
        y, y_ref = native.decode(z, clamp=False), ref.decode(z, clamp=False)
    assert (z - z_ref).abs().max() <= 1e-5 and (zs - zs_ref).abs().max() <= 1e-5
    assert (y - y_ref).abs().max() <= 1e-5 and y.abs().max() > 0.01
    assert native.encoder_fingerprint() == ref.encoder_fingerprint()  # same latent caches, same pipelines


def test_native_save_is_read_by_diffusers(tmp_path):
    kwargs, channels, size = LAYOUTS["three levels, widening, attention, 2 layers"]
    native = Autoencoder.from_pretrained(_diffusers_dir(tmp_path / "a", kwargs, channels), backend="native")
    native.save_pretrained(str(tmp_path / "b"), dtype=torch.float16)
    back = Autoencoder.from_pretrained(str(tmp_path / "b"), backend="diffusers")
    again = Autoencoder.from_pretrained(str(tmp_path / "b"), backend="native")
    x = torch.rand(2, channels, size, size) * 2 - 1
    with torch.no_grad():
        assert (back.decode(back.encode(x)) - again.decode(again.encode(x))).abs().max() <= 1e-5
        assert (again.decode(again.encode(x)) - native.decode(native.encode(x))).abs().max() <= 0.05  # fp16 weights
    assert back.scaling_factor == native.scaling_factor and back.shift_factor == native.shift_factor
    assert back.encoder_fingerprint() == again.encoder_fingerprint()


def test_uncovered_layouts_go_to_diffusers(tmp_path):
    kwargs, channels, _ = LAYOUTS["two-level, no attention"]
    d = _diffusers_dir(tmp_path, dict(kwargs, act_fn="gelu"), channels)
    assert not autoencoder_kl.supports(json.load(open(os.path.join(d, "config.json"))))
    assert type(Autoencoder.from_pretrained(d).vae) is not autoencoder_kl.AutoencoderKL
    with pytest.raises(ValueError, match="needs diffusers"):
        Autoencoder.from_pretrained(d, backend="native")
    with pytest.raises(ValueError, match="unknown autoencoder backend"):
        Autoencoder.from_pretrained(d, backend="jax")


def test_native_refuses_weights_that_do_not_match_the_config(tmp_path):
    from safetensors.torch import load_file, save_file

    kwargs, channels, _ = LAYOUTS["two-level, no attention"]
    d = _diffusers_dir(tmp_path, kwargs, channels)
    path = os.path.join(d, "diffusion_pytorch_model.safetensors")
    state = load_file(path)
    state.pop("decoder.conv_out.bias")
    save_file(state, path)
    with pytest.raises(ValueError, match="do not match its config.json"):
        Autoencoder.from_pretrained(d, backend="native")


def test_shipped_autoencoders_load_without_diffusers():
    code = ("import sys; from starflow.components.autoencoder import Autoencoder, default_autoencoder_dir;"
            "ae = Autoencoder.from_pretrained(default_autoencoder_dir('shapes64_ft'));"
            "import torch; ae.decode(torch.zeros(1, 4, 8, 8));"
            "print(sorted(m for m in ('diffusers', 'torch._dynamo', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_shipped_autoencoder_outputs_equal_diffusers():
    d = default_autoencoder_dir("shapes64_ft")
    native, ref = Autoencoder.from_pretrained(d), Autoencoder.from_pretrained(d, backend="diffusers")
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert (native.encode(x) - ref.encode(x)).abs().max() <= 1e-5
        z = torch.randn(2, 4, 8, 8)
        assert (native.decode(z) - ref.decode(z)).abs().max() <= 1e-5
