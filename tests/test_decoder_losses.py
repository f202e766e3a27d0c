"""Decoder training losses: the adversarial term (adaptive weight against a hand-computed case, the
patch discriminator, an adversarial fine-tune that trains only the decoder) and the censored reconstruction."""
import torch

from starflow.train.discriminator import (PatchDiscriminator, adaptive_adversarial_weight,
                                          discriminator_hinge_loss, generator_hinge_loss)


def test_adaptive_weight_matches_the_gradient_norm_ratio():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    rec = (torch.tensor([3.0, 4.0]) * w).sum()  # d rec / d w = (3, 4): norm 5
    adv = (torch.tensor([0.6, 0.8]) * w).sum()  # d adv / d w = (0.6, 0.8): norm 1
    assert abs(adaptive_adversarial_weight(rec, adv, w).item() - 5 / (1 + 1e-4)) < 1e-5
    zero = (0.0 * w).sum()  # a discriminator that gives no gradient: clamped, not inf
    assert adaptive_adversarial_weight(rec, zero, w, max_weight=100.0).item() == 100.0


def test_hinge_losses_by_hand():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    # relu(1-real) = (0, 0.5) -> 0.25 ; relu(1+fake) = (0, 1) -> 0.5 ; halved sum -> 0.375
    assert abs(discriminator_hinge_loss(real, fake).item() - 0.375) < 1e-6
    assert generator_hinge_loss(fake).item() == 1.0


def test_patch_discriminator_gives_a_grid_of_logits():
    d = PatchDiscriminator(1)
    out = d(torch.randn(3, 1, 28, 28))
    assert out.shape[0] == 3 and out.shape[1] == 1 and out.shape[-1] > 1  # one logit per patch, not per image


def test_adversarial_finetune_changes_only_the_decoder():
    from starflow.components.autoencoder import Autoencoder
    from starflow.train.autoencoder_trainer import AutoencoderTrainConfig, FinetuneConfig, build_autoencoderkl, finetune_decoder

    torch.manual_seed(0)
    imgs = torch.randint(0, 256, (16, 1, 16, 16), dtype=torch.uint8)
    vae = build_autoencoderkl(1, 16, AutoencoderTrainConfig(block_out_channels=(8, 8), norm_num_groups=8))
    ae = Autoencoder(vae)
    before = {k: v.clone() for k, v in ae.vae.state_dict().items()}
    cfg = FinetuneConfig(sigma=0.3, steps=3, batch_size=8, lr=1e-2, adv_weight=0.5, adv_start=1, log_every=3)
    ft, hist = finetune_decoder(ae, imgs, cfg, log=lambda s: None)
    after = ft.vae.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)
    assert hist["adv"][0] != 0.0 and hist["disc"][0] > 0.0  # both terms ran and were logged


def test_censored_loss_ignores_errors_beyond_a_clipped_target():
    from starflow.train.autoencoder_trainer import _recon_loss

    target = torch.tensor([-1.0, -1.0, 1.0, 1.0, 0.0])
    pred = torch.tensor([-1.5, -0.5, 1.5, 0.5, -0.2])  # beyond black, above black, beyond white, below white, plain
    # only the three real errors count: 0.5, 0.5, 0.2 over 5 pixels
    assert abs(_recon_loss(pred, target, "censored-l1").item() - 1.2 / 5) < 1e-6
    assert abs(_recon_loss(pred, target, "l1").item() - 2.2 / 5) < 1e-6
    p = pred.clone().requires_grad_(True)
    _recon_loss(p, target, "censored-l1+l2").backward()
    assert p.grad[0] == 0 and p.grad[2] == 0 and p.grad[1] > 0 and p.grad[3] < 0
