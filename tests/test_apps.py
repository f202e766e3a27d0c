"""Applications: exact encoding (image <-> noise), per-image likelihood, training-free inpainting, and their
CLIs, on tiny stand-in models (pixel and latent)."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import perturbed, tiny_config
from starflow import FlowConfig, STARFlow
from starflow.tasks import encode as E
from starflow.components.autoencoder import Autoencoder
from starflow.tasks.inpaint import binarize_mask, cell_mask, inpaint, load_mask, token_mask
from starflow.pipeline import StarflowPipeline


def tiny_vae(in_ch=3, latent=4):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=in_ch, out_channels=in_ch, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                         latent_channels=latent, norm_num_groups=8, sample_size=16, mid_block_add_attention=False)


@pytest.fixture(scope="module")
def pixel_pipe():
    torch.manual_seed(0)
    model = perturbed(STARFlow(tiny_config(num_classes=10)), scale=0.05)
    return StarflowPipeline(model, noise_std=0.1)  # Tweedie cleaning on, like the MNIST recipe


@pytest.fixture(scope="module")
def latent_pipe():
    """3x16x16 images -> 4x8x8 latents (d = 2), flow patch 2: a token covers 4x4 pixels."""
    ae = Autoencoder(tiny_vae()).eval()
    torch.manual_seed(1)
    flow = perturbed(STARFlow(FlowConfig(in_channels=4, image_size=8, patch_size=2, width=32, head_dim=16,
                                         num_blocks=2, layers_per_block=1, num_classes=5)), scale=0.05)
    return StarflowPipeline(flow, ae, noise_std=0.3)


def _images(shape, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)


# ----------------------------------------------------------------------------------------------- encode

def test_pixel_round_trip_is_exact_and_depends_on_the_condition(pixel_pipe):
    imgs = _images((1, 8, 8), 4)
    y = torch.tensor([0, 3, 7, 9])
    x = E.to_model_space(pixel_pipe, imgs)
    z = E.encode(pixel_pipe, imgs, y=y)
    assert z.shape == (4, 1, 8, 8) and torch.isfinite(z).all()
    assert (E.decode_to_model_space(pixel_pipe, z, y=y) - x).abs().max().item() < 1e-4
    assert torch.equal(E.decode(pixel_pipe, z, y=y), imgs)  # the very same bytes
    err = E.round_trip_error(pixel_pipe, imgs, y=y)
    assert err["model_space"] < 1e-4 and err["pixels"] == 0
    # the deep block reads the class: another class gives other noise, and decoding with it another image
    z_other = E.encode(pixel_pipe, imgs, y=(y + 1) % 10)
    assert (z_other - z).abs().max() > 1e-2
    assert not torch.equal(E.decode(pixel_pipe, z, y=(y + 1) % 10), imgs)
    # the Jacobi sampler inverts to the same image
    assert torch.equal(E.decode(pixel_pipe, z, y=y, sampler="jacobi", jacobi_threshold=1e-6), imgs)


def test_latent_round_trip_flow_exact_image_within_reconstruction(latent_pipe):
    imgs = _images((3, 16, 16), 2)
    lat = E.to_model_space(latent_pipe, imgs)
    assert lat.shape == (2, 4, 8, 8)
    z = E.encode(latent_pipe, imgs)
    assert (E.decode_to_model_space(latent_pipe, z) - lat).abs().max().item() < 1e-4
    back = E.decode(latent_pipe, z).int()
    recon = E.float_to_pixels(latent_pipe, latent_pipe.autoencoder.decode(lat)).int()
    assert (back - recon).abs().max().item() <= 1  # the flow adds nothing beyond float error
    err = E.round_trip_error(latent_pipe, imgs)
    assert err["model_space"] < 1e-4 and err["pixels"] <= err["reconstruction"] + 1


def test_image_nll_units_and_values(pixel_pipe, latent_pipe):
    imgs = _images((1, 8, 8), 3)
    bpd, unit = E.image_nll(pixel_pipe, imgs, generator=torch.Generator().manual_seed(5))
    ref = pixel_pipe.model.bits_per_dim(imgs, generator=torch.Generator().manual_seed(5))
    assert unit == "bits/dim" and torch.allclose(bpd, ref, atol=1e-5)
    bpd_y, _ = E.image_nll(pixel_pipe, imgs, y=2, samples=3)
    assert bpd_y.shape == (3,) and torch.isfinite(bpd_y).all()
    limgs = _images((3, 16, 16), 2)
    nats, unit = E.image_nll(latent_pipe, limgs)
    ref = latent_pipe.model.nll(E.to_model_space(latent_pipe, limgs))
    assert unit == "nats/dim" and torch.allclose(nats, ref, atol=1e-5)


def test_encode_bad_input(pixel_pipe):
    with pytest.raises(ValueError, match=r"shape \(1, 8, 8\)"):
        E.encode(pixel_pipe, _images((1, 9, 9), 1))
    with pytest.raises(ValueError, match="uint8"):
        E.encode(pixel_pipe, torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="out of range"):
        E.encode(pixel_pipe, _images((1, 8, 8), 1), y=10)
    with pytest.raises(ValueError, match="not text-conditional"):
        E.encode(pixel_pipe, _images((1, 8, 8), 1), prompt="a circle")


def _save(arr, path, mode=None):
    Image.fromarray(arr, mode=mode).save(path)
    return str(path)


def test_load_image_conversions_and_errors(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128
    p = _save(rgba, tmp_path / "a.png", "RGBA")
    with pytest.warns(UserWarning, match="alpha channel"):
        out = E.load_image(p, 3, 8)
    assert out.shape == (3, 8, 8) and out[0, 0, 0] == 100 and out[1, 0, 0] == 0  # composited on black
    with pytest.warns(UserWarning, match="converted to grayscale"):
        assert E.load_image(_save(np.full((8, 8, 3), 90, np.uint8), tmp_path / "c.png"), 1, 8).shape == (1, 8, 8)
    with pytest.warns(UserWarning, match="converted to RGB"):
        g = E.load_image(_save(np.full((8, 8), 77, np.uint8), tmp_path / "g.png"), 3, 8)
    assert g.shape == (3, 8, 8) and (g == 77).all()
    with pytest.warns(UserWarning, match="resized"):
        assert E.load_image(_save(np.zeros((16, 16), np.uint8), tmp_path / "big.png"), 1, 8).shape == (1, 8, 8)
    with pytest.raises(ValueError, match="is 16x8"):
        E.load_image(_save(np.zeros((8, 16), np.uint8), tmp_path / "wide.png"), 1, 8)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read"):
        E.load_image(str(tmp_path / "junk.png"), 1, 8)
    with pytest.raises(FileNotFoundError):
        E.load_image(str(tmp_path / "none.png"), 1, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the right mode and size: no note
        E.load_image(_save(np.zeros((8, 8), np.uint8), tmp_path / "ok.png"), 1, 8)


def test_noise_file_round_trip_and_corruption(tmp_path):
    z = torch.randn(2, 1, 8, 8)
    path = str(tmp_path / "n.safetensors")
    E.save_noise(path, z, "/some/model", y=[3, 4], prompt=None)
    z2, meta = E.load_noise(path)
    assert torch.equal(z, z2) and meta["class"] == [3, 4] and meta["prompt"] is None and meta["model"] == "/some/model"
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="corrupt"):
        E.load_noise(str(tmp_path / "bad.safetensors"))
    from safetensors.torch import save_file

    save_file({"x": z}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="no 'noise' tensor"):
        E.load_noise(str(tmp_path / "other.safetensors"))


# ------------------------------------------------------------------------------------------- mask maps

def _reference_tokens(mask: np.ndarray, d: int, p: int, dilate: int = 0) -> np.ndarray:
    """Brute force: a latent cell is unknown if any pixel of its d x d block is masked (then dilated);
    a token is unknown if any of its p x p cells is."""
    H = mask.shape[0]
    h = H // d
    cells = np.array([[mask[i * d:(i + 1) * d, j * d:(j + 1) * d].any() for j in range(h)] for i in range(h)])
    if dilate:
        cells = np.array([[cells[max(i - dilate, 0):i + dilate + 1, max(j - dilate, 0):j + dilate + 1].any()
                           for j in range(h)] for i in range(h)])
    t = h // p
    return np.array([cells[i * p:(i + 1) * p, j * p:(j + 1) * p].any() for i in range(t) for j in range(t)]), cells


@pytest.mark.parametrize("d,p", [(1, 2), (2, 2), (4, 1), (2, 1)])
def test_mask_mapping_matches_brute_force_for_unaligned_masks(d, p):
    rng = np.random.default_rng(d * 10 + p)
    H = 16
    masks = [np.zeros((H, H), bool) for _ in range(4)]
    masks[0][5, 6] = True                              # one pixel, off every grid line
    masks[1][3:10, 1:7] = True                         # a rectangle with odd borders
    masks[2] = rng.random((H, H)) < 0.05               # scattered pixels
    yy, xx = np.mgrid[:H, :H]
    masks[3] = (yy - 7.3) ** 2 + (xx - 9.1) ** 2 < 9  # a disc
    for m in masks:
        for dil in (0, 1):
            ref_tok, ref_cells = _reference_tokens(m, d, p, dil)
            cells = cell_mask(torch.from_numpy(m)[None, None], d, dil)
            assert np.array_equal(cells[0, 0].numpy(), ref_cells)
            assert np.array_equal(token_mask(cells, p)[0].numpy(), ref_tok)
    # a single masked pixel marks exactly its own cell / token: pixel (5, 6) -> cell (5//d, 6//d)
    tok = token_mask(cell_mask(torch.from_numpy(masks[0])[None, None], d), p)[0]
    side = H // d // p
    assert tok.sum() == 1 and tok.nonzero().item() == (5 // d // p) * side + (6 // d // p)


def test_binarize_mask_thresholds_with_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert binarize_mask(torch.tensor([[0, 255]], dtype=torch.uint8)).tolist() == [[False, True]]
    with pytest.warns(UserWarning, match="not binary"):
        m = binarize_mask(torch.tensor([[0, 100, 128, 255]], dtype=torch.uint8))
    assert m.tolist() == [[False, False, True, True]]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        binarize_mask(torch.tensor([[0.0, 2.0]]))


# ------------------------------------------------------------------------------------------ inpainting

def test_pixel_inpainting_keeps_unmasked_pixels_exactly(pixel_pipe):
    imgs = _images((1, 8, 8), 3, seed=3)
    mask = torch.zeros(3, 8, 8, dtype=torch.bool)
    mask[0, 2:5, 3:7] = True        # not aligned to the 2x2 tokens
    mask[1, 5, 1] = True            # one pixel
    mask[2, :, 4:] = True           # right half
    res = inpaint(pixel_pipe, imgs, mask, y=torch.tensor([1, 2, 3]), steps=3, guidance=1.0,
                  generator=torch.Generator().manual_seed(0))
    keep = ~mask[:, None]
    assert torch.equal(res.images[keep], imgs[keep])
    assert (res.images[~keep] != imgs[~keep]).float().mean() > 0.5  # the hole was regenerated
    ref = [torch.from_numpy(_reference_tokens(m.numpy(), 1, 2)[0]) for m in mask]
    assert torch.equal(res.token_mask, torch.stack(ref))
    # different seeds give different completions, same known pixels
    res2 = inpaint(pixel_pipe, imgs, mask, y=torch.tensor([1, 2, 3]), steps=3, generator=torch.Generator().manual_seed(1),
                   noisy_known=True, temperature=0.8)
    assert torch.equal(res2.images[keep], imgs[keep]) and not torch.equal(res2.images, res.images)


def test_inpainting_noise_goes_exactly_to_the_unknown_tokens(pixel_pipe, monkeypatch):
    """One round: the noise handed to the inverse equals the encoding of the (filled) image at known
    tokens and is fresh at unknown tokens; after the inverse the known pixels are pasted back."""
    model = pixel_pipe.model
    imgs = _images((1, 8, 8), 1, seed=4)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[3, 2] = True
    mask[6:8, 5] = True
    seen = {}
    real_inverse = model.inverse

    def spy(z, *a, **k):
        seen["z"] = z.clone()
        return real_inverse(z, *a, **k)

    monkeypatch.setattr(model, "inverse", spy)
    inpaint(pixel_pipe, imgs, mask, y=4, steps=1, generator=torch.Generator().manual_seed(0), denoise=False)
    x = E.to_model_space(pixel_pipe, imgs)
    w = (~mask).float()
    fill = (x[0, 0] * w).sum() / w.sum()
    start = torch.where(mask, fill, x[0, 0])[None, None]
    z_known = model.patchify(model(start, torch.tensor([4]))[0])[0]
    z_seen = model.patchify(seen["z"])[0]
    unknown = torch.from_numpy(_reference_tokens(mask.numpy(), 1, 2)[0])
    assert unknown.sum() == 2
    assert torch.allclose(z_seen[~unknown], z_known[~unknown], atol=1e-5)
    assert (z_seen[unknown] - z_known[unknown]).abs().min() > 0  # fresh noise everywhere in those tokens


def test_latent_inpainting_paste_exact_and_known_latents_kept(latent_pipe):
    imgs = _images((3, 16, 16), 2, seed=5)
    mask = torch.zeros(2, 16, 16, dtype=torch.bool)
    mask[0, 5:9, 3:6] = True   # crosses latent-cell and token borders
    mask[1, 13, 14] = True
    res = inpaint(latent_pipe, imgs, mask, y=torch.tensor([0, 4]), steps=2, generator=torch.Generator().manual_seed(0))
    keep = ~mask[:, None].expand_as(imgs)
    assert torch.equal(res.images[keep], imgs[keep])
    known = E.to_model_space(latent_pipe, imgs)
    cells = res.cell_mask.expand_as(known)
    assert torch.equal(res.model_space[~cells], known[~cells])           # known latents untouched
    assert (res.model_space[cells] - known[cells]).abs().min() > 0         # unknown latents regenerated
    ref = [torch.from_numpy(_reference_tokens(m.numpy(), 2, 2)[0]) for m in mask]
    assert torch.equal(res.token_mask, torch.stack(ref))
    # blend="decoded": the decoder's image of the composite latents everywhere (no paste); the unmasked
    # pixels then differ from the input by the autoencoder's error (and the decoder's spill-over)
    dec = inpaint(latent_pipe, imgs, mask, y=torch.tensor([0, 4]), steps=2, generator=torch.Generator().manual_seed(0),
                  blend="decoded", denoise=False)
    want = E.float_to_pixels(latent_pipe, latent_pipe.autoencoder.decode(dec.model_space))
    assert (dec.images.int() - want.int()).abs().max() <= 1


def test_inpaint_bad_input(pixel_pipe, tmp_path):
    imgs = _images((1, 8, 8), 1)
    with pytest.raises(ValueError, match="mask is 9x9 but the image is 8x8"):
        inpaint(pixel_pipe, imgs, torch.zeros(9, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="steps"):
        inpaint(pixel_pipe, imgs, torch.ones(8, 8, dtype=torch.bool), steps=0)
    with pytest.warns(UserWarning, match="empty"):
        res = inpaint(pixel_pipe, imgs, torch.zeros(8, 8, dtype=torch.bool))
    assert torch.equal(res.images, imgs)
    img_p = _save(np.zeros((8, 8), np.uint8), tmp_path / "i.png")
    m_p = _save(np.zeros((10, 10), np.uint8), tmp_path / "m.png")
    with pytest.raises(ValueError, match=r"is 10x10 but image .* is 8x8"):
        load_mask(m_p, img_p, 8)
    grey = np.zeros((8, 8), np.uint8)
    grey[0, :4] = [60, 127, 128, 250]
    with pytest.warns(UserWarning, match="not binary"):
        m = load_mask(_save(grey, tmp_path / "g.png"), img_p, 8)
    assert m[0, :4].tolist() == [False, False, True, True]
    # a 16x16 image + mask resized to the model's 8x8: a resized pixel is masked if any pixel under it is
    big = np.zeros((16, 16), np.uint8)
    big[5, 6] = 255
    m = load_mask(_save(big, tmp_path / "b.png"), _save(np.zeros((16, 16), np.uint8), tmp_path / "bi.png"), 8)
    assert m.sum() == 1 and bool(m[2, 3])


# ------------------------------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def saved_pixel(tmp_path_factory, pixel_pipe):
    d = str(tmp_path_factory.mktemp("pix") / "model")
    pixel_pipe.save_pretrained(d)
    return d


def test_cli_encode_decode_nll(saved_pixel, tmp_path, capsys):
    from starflow.cli import main

    arr = np.asarray(_images((8, 8), 1, seed=9)[0])
    img = _save(arr, tmp_path / "d.png")
    noise = str(tmp_path / "n.safetensors")
    assert main(["encode", "--image", img, "--out", noise, "--model", saved_pixel, "--class", "3"]) == 0
    out = capsys.readouterr().out
    assert "round trip" in out and "0 pixel levels" in out and "bits/dim" in out
    back = str(tmp_path / "back.png")
    assert main(["decode", "--noise", noise, "--out", back]) == 0  # model and class from the file's metadata
    assert np.array_equal(np.asarray(Image.open(back)), arr)
    assert main(["nll", saved_pixel, "--image", img]) == 0
    assert "bits/dim" in capsys.readouterr().out
    bits_png = str(tmp_path / "bits.png")  # where the bits go: a map whose mean is the image's bits/dim
    assert main(["nll", saved_pixel, "--image", img, "--bits-map", bits_png]) == 0
    out = capsys.readouterr().out
    total = float(out.split(": ")[1].split()[0])
    assert float(out.rsplit("mean ", 1)[1]) == pytest.approx(total, abs=1e-3)
    assert Image.open(bits_png).size[0] > 8
    assert main(["nll", saved_pixel, "--bits-map", bits_png]) == 2
    assert "--image" in capsys.readouterr().err
    # bad input
    assert main(["decode", "--noise", str(tmp_path / "missing.safetensors"), "--out", back]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["encode", "--image", img, "--out", noise, "--model", saved_pixel, "--class", "12"]) == 2
    assert "out of range" in capsys.readouterr().err
    rgb = _save(np.zeros((8, 8, 3), np.uint8), tmp_path / "rgb.png")
    assert main(["encode", "--image", rgb, "--out", noise, "--model", saved_pixel]) == 0
    assert "note: " in capsys.readouterr().err


def test_cli_inpaint(saved_pixel, tmp_path, capsys):
    from starflow.cli import main

    arr = np.asarray(_images((8, 8), 1, seed=2)[0])
    img = _save(arr, tmp_path / "d.png")
    m = np.zeros((8, 8), np.uint8)
    m[2:6, 3:5] = 200  # grey: thresholded with a note
    mask = _save(m, tmp_path / "m.png")
    out = str(tmp_path / "o.png")
    assert main(["inpaint", "--image", img, "--mask", mask, "--class", "5", "--out", out, "--model", saved_pixel,
                 "--steps", "2"]) == 0
    cap = capsys.readouterr()
    assert "not binary" in cap.err and "tokens resampled" in cap.out
    res = np.asarray(Image.open(out))
    assert np.array_equal(res[m == 0], arr[m == 0]) and not np.array_equal(res[m > 0], arr[m > 0])
    bad = _save(np.zeros((9, 9), np.uint8), tmp_path / "m9.png")
    assert main(["inpaint", "--image", img, "--mask", bad, "--out", out, "--model", saved_pixel]) == 2
    assert "9x9" in capsys.readouterr().err
