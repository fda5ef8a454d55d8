import dataclasses
import math

import pytest
import torch

import ldae


@pytest.mark.parametrize("name", ["tiny", "cpu", "paper", "cpu with the slice encoder"])
def test_every_module_has_the_preset_shapes(name):
    p = ldae.PRESETS[name.split()[0]]
    if name.endswith("slice encoder"):
        p = dataclasses.replace(p, encoder_volume=())
    with torch.device("meta" if name == "paper" else "cpu"):  # paper-size tensors cost nothing on meta
        ae, disc, unet, enc = p.autoencoder(), p.discriminator(), p.unet(), p.encoder()
        x = torch.rand(2, 1, *p.image_shape)
        mean, logvar = ae.encode(x)
        assert tuple(mean.shape[1:]) == p.latent_shape and logvar.shape == mean.shape
        assert ae.decode(mean).shape == x.shape
        assert disc(x).shape[:2] == (2, 1)
        y_sem = enc(x)
        assert y_sem.shape == (2, p.y_dim)
        eps, g = unet(mean, torch.tensor([0, 999]), y_sem)
        assert eps.shape == mean.shape and g.shape == mean.shape


def test_paper_latent_is_3x16x20x16():
    assert ldae.PRESETS["paper"].latent_shape == (3, 16, 20, 16)


def test_schedule_constants_match_float64_formulas():
    d = ldae.Diffusion()
    abar_999 = math.prod(1 - (1e-4 + (0.02 - 1e-4) * i / 999) for i in range(1000))
    assert abar_999 == pytest.approx(4.04e-5, rel=0.01)
    assert d.abar[999].item() == pytest.approx(abar_999, rel=1e-9)
    for t in (0, 1, 475, 999):
        abar = math.prod(1 - (1e-4 + (0.02 - 1e-4) * i / 999) for i in range(t + 1))
        abar_prev = abar / (1 - (1e-4 + (0.02 - 1e-4) * t / 999))
        alpha = 1 - (1e-4 + (0.02 - 1e-4) * t / 999)
        snr = abar / (1 - abar)
        assert d.k[t].item() == pytest.approx(-math.sqrt(alpha) * (1 - abar_prev) / math.sqrt(1 - abar), abs=1e-12)
        assert d.w[t].item() == pytest.approx(snr**0.1 / (1 + snr), rel=1e-9)
    assert d.k[0].item() == 0.0  # abar_{-1} = 1
    assert 0.70 < d.w.max().item() < 0.74 and 440 < d.w.argmax().item() < 510  # METHOD 4: peak ~0.72 near 475


@pytest.mark.parametrize("cin", [8, 16])  # with a 1x1 shortcut, and with the identity one
def test_resblock_in_place_inference_matches_training_pass_and_keeps_its_input(cin):
    torch.manual_seed(0)
    block = ldae.ResBlock(cin, 16, cond_dims=(4,))
    torch.nn.init.normal_(block.conv2.weight, std=0.1)  # zero-initialised: the block would be its shortcut alone
    x, c = torch.randn(2, cin, 4, 5, 4), torch.randn(2, 4)
    kept = x.clone()
    with torch.no_grad():
        fast = block(x, (c,))  # SiLU and the residual add in place
    slow = block(x, (c,))  # autograd on: the out-of-place path
    assert torch.equal(x, kept)
    assert torch.allclose(fast, slow, atol=1e-6) and fast.abs().mean() > 0.1
    slow.sum().backward()  # the training path stays differentiable
    assert block.conv1.weight.grad.abs().sum() > 0


def test_ddim_timesteps_follow_the_linspace_rule():
    assert ldae.ddim_timesteps(10) == [0, 99, 199, 299, 399, 499, 599, 699, 799, 899, 999]
    assert len(ldae.ddim_timesteps(100)) == 101


def _trained_free_unet():
    torch.manual_seed(0)
    unet = ldae.PRESETS["tiny"].unet().eval()
    with torch.no_grad():  # zero-initialised layers would make eps = 0; give every weight a value
        for p in unet.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return unet


@pytest.mark.parametrize("guided", [False, True])
def test_ddim_encode_then_decode_returns_input(guided):
    unet, d = _trained_free_unet(), ldae.Diffusion()
    z0 = torch.randn(2, *ldae.PRESETS["tiny"].latent_shape)
    y_sem = torch.randn(2, 16) if guided else None
    # 400 steps: DDIM is first order, and with v output a near-zero network is a near-identity flow, so what
    # the latent travels is small beside DDIM's own error (it shrinks N(0, I) by 2.5% over 100 steps)
    z_T = d.ddim_encode(unet, z0, y_sem, steps=400)
    moved = (z_T - z0).abs().mean()
    assert moved > 0.1  # the latent really travelled to t = 999
    back = d.ddim_sample(unet, z_T, y_sem, steps=400)
    assert (back - z0).abs().mean() < 0.05 * moved


@pytest.mark.parametrize("v_output", [True, False])
def test_v_output_keeps_ddim_samples_on_the_data_scale(v_output):
    """A network whose last layer is still zero: predicting eps (eps_theta = 0), DDIM's first step divides z_T by
    sqrt(abar) = 0.006, the failure short-trained eps networks show in smaller doses; predicting v, the zero
    network is the exact denoiser of N(0, I) latents (centred, unit variance), and the sample keeps z_T's scale."""
    torch.manual_seed(0)
    unet = ldae.UNet(3, 16, (1, 2), 1, (2,), 1, 0.0, 16, None, v_output).eval()
    z_T = torch.randn(2, *ldae.PRESETS["tiny"].latent_shape)
    sample = ldae.Diffusion().ddim_sample(unet, z_T, steps=20)
    ratio = (sample.norm() / z_T.norm()).item()
    assert 0.8 < ratio < 1.2 if v_output else ratio > 20


def test_estimator_starts_at_zero_so_eps_hat_equals_eps_theta():
    p = ldae.PRESETS["tiny"]
    unet = p.unet()
    zero_at_start = {unet.estimator.head[-1].weight, unet.estimator.head[-1].bias, unet.y_latent.weight,
                     unet.y_latent.bias}
    with torch.no_grad():
        for q in unet.parameters():  # any eps_theta, but the estimator's output layers keep their zero init
            if q not in zero_at_start:
                q.add_(torch.randn_like(q) * 0.05)
    z, t = torch.randn(2, *p.latent_shape), torch.tensor([3, 700])
    eps, g = unet(z, t, torch.randn(2, p.y_dim))
    assert eps.abs().max() > 0 and torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("volume", [(), (8, 16)])
def test_stage_2b_step_moves_only_the_estimator_and_encoder(volume):
    torch.manual_seed(0)
    p, d = dataclasses.replace(ldae.PRESETS["tiny"], encoder_volume=volume), ldae.Diffusion()
    unet, enc = p.unet(), p.encoder()
    unet.freeze_eps_theta()
    unet.train()
    assert not unet.down.training and unet.estimator.training
    frozen = {k: v.clone() for k, v in unet.state_dict().items() if not k.startswith(("estimator", "y_"))}
    trainable = [q for q in unet.parameters() if q.requires_grad] + list(enc.parameters())
    head_before = unet.estimator.head[-1].weight.clone()
    opt = torch.optim.Adam(trainable, lr=1e-3)
    x, z0 = torch.rand(2, 1, *p.image_shape), torch.randn(2, *p.latent_shape)
    d.repr_loss(unet, enc(x), z0).backward()
    opt.step()
    after = unet.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())
    assert not torch.equal(head_before, unet.estimator.head[-1].weight)


def test_estimator_learns_to_use_which_code_it_is_given():
    """Eight random latents, each with its own code: after a few stage-2b steps the loss with each latent's own
    code must be well below the loss with every code moved to the next latent. Fails if G ignores y_sem."""
    torch.manual_seed(0)
    p, d = ldae.PRESETS["tiny"], ldae.Diffusion()
    unet = p.unet()
    unet.freeze_eps_theta()
    unet.train()
    z0, codes = torch.randn(8, *p.latent_shape), torch.randn(8, p.y_dim)
    codes -= codes.mean(0)  # a code that cannot double as a constant bias
    opt = torch.optim.Adam([q for q in unet.parameters() if q.requires_grad], lr=3e-3)
    for _ in range(60):
        d.repr_loss(unet, codes, z0).backward()
        opt.step()
        opt.zero_grad()

    def loss(y):
        torch.manual_seed(1)
        with torch.no_grad():
            return sum(d.repr_loss(unet, y, z0).item() for _ in range(8))

    assert loss(codes) < 0.85 * loss(codes.roll(1, 0))


def test_code_saving_matches_the_gaussian_saving_by_hand():
    d = ldae.Diffusion()
    assert d.code_saving(torch.ones(5, 3, 2, 2, 2)).abs().max() == 0  # identical latents: nothing to know
    z = torch.tensor([[-1.0], [1.0]])  # one element, variance 2 (n - 1 = 1)
    t = torch.arange(d.T)
    by_hand = d.w[t] * 2 * d.snr[t] / (2 * d.snr[t] + 1)
    assert torch.allclose(d.code_saving(z), by_hand, rtol=1e-9, atol=0)
    assert torch.allclose(d.code_saving(torch.cat([z, torch.zeros(2, 1)], 1)), by_hand / 2, rtol=1e-9, atol=0)
    latents = torch.randn(6, 3, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    assert 0 < d.code_saving(latents).mean() < d.code_saving(3 * latents).mean() < 1


def test_code_focused_t_keeps_the_expected_loss_and_draws_where_a_code_saves():
    """Stage 2b's t distribution: half uniform, half where code_saving is; each draw weighted by 1 / (T p_t).
    With eps_theta = G = 0 the loss at t is w_t |eps|^2, so any t distribution must average to mean(w)."""
    d = ldae.Diffusion()
    latents = torch.randn(12, 2, 3, 4, 3, generator=torch.Generator().manual_seed(0))
    probs = d.code_focused_t(latents)
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-5) and probs.min() >= 0.5 / d.T
    assert probs.argmax() == d.code_saving(latents).argmax() and probs.max() > 1.5 / d.T
    assert torch.allclose(d.code_focused_t(torch.ones(3, 2, 2)), torch.full((d.T,), 1 / d.T))  # nothing to know

    def zero_unet(z, t, y_sem):
        return torch.zeros_like(z), torch.zeros_like(z)

    low_t = torch.cat([torch.full((100,), 0.6 / 100), torch.full((d.T - 100,), 0.4 / (d.T - 100))])
    assert d.w[torch.multinomial(low_t, 100_000, replacement=True)].mean() < 0.6 * d.w.mean()  # unweighted: far off
    torch.manual_seed(0)
    z0 = torch.zeros(100_000, 1, 2, 2, 2)
    for t_probs in (None, probs, low_t):
        assert d.repr_loss(zero_unet, None, z0, t_probs).item() == pytest.approx(d.w.mean().item(), rel=0.03)


def test_semantic_encoder_drops_slice_tokens_while_training_only():
    """METHOD 4's dropout after the slice position encoding: in training two passes over the same batch differ
    (the batch standardisation is the same for both), at inference they agree."""
    torch.manual_seed(0)
    slices = dataclasses.replace(ldae.PRESETS["tiny"], encoder_volume=())
    encoder, x = slices.encoder(), torch.rand(4, 1, *slices.image_shape)
    assert not torch.allclose(encoder(x), encoder(x))
    encoder.eval()
    assert torch.equal(encoder(x), encoder(x))


def test_bfloat16_autocast_forward_is_finite():
    p = ldae.PRESETS["tiny"]
    ae, unet, enc = p.autoencoder(), p.unet(), p.encoder()
    x = torch.rand(2, 1, *p.image_shape)  # y_sem's standardisation over the batch needs two scans
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_hat, mean, _ = ae(x)
        eps, g = unet(mean, torch.tensor([10, 500]), enc(x))
    assert all(torch.isfinite(v.float()).all() for v in (x_hat, eps, g))


def test_decoder_output_layer_stays_float32_under_autocast():
    p = ldae.PRESETS["tiny"]
    torch.manual_seed(0)
    ae, z = p.autoencoder().eval(), torch.randn(1, *p.latent_shape)
    with torch.no_grad():
        reference = ae.decode(z)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reduced = ae.decode(z)
    assert reference.dtype == reduced.dtype == torch.float32  # the image itself is never rounded to bfloat16
    assert (reduced - reference).abs().max() < 0.05 * reference.abs().max()


@pytest.mark.parametrize("stride", [1, 2])
def test_conv3d_on_onednn_matches_the_reference_convolution(stride):
    torch.manual_seed(0)
    conv = ldae.conv3(4, 6, stride=stride)
    x = torch.randn(1, 4, 6, 8, 6, requires_grad=True)
    y = conv(x)  # batch 1, 4 x 6 x 8 < 20480: PyTorch itself would pick its naive kernel
    reference = torch.nn.functional.conv3d(x, conv.weight, conv.bias, stride=stride, padding=1)
    assert y.shape == reference.shape and torch.allclose(y, reference, atol=1e-5)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, conv.weight, conv.bias], g)
    expected = torch.autograd.grad(reference, [x, conv.weight, conv.bias], g)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(grads, expected))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast the reference path casts as usual
        assert conv(x).dtype == torch.bfloat16


def test_float32_training_layout_changes_the_speed_not_the_step():
    cpu = torch.device("cpu")
    layout = ldae.memory_format(cpu, torch.float32)
    assert layout == torch.channels_last_3d and ldae.memory_format(cpu, torch.bfloat16) == torch.contiguous_format
    p = ldae.PRESETS["tiny"]
    torch.manual_seed(0)
    x = torch.rand(1, 1, *p.image_shape)
    reference = p.autoencoder()
    ae = p.autoencoder().to(memory_format=layout)
    ae.load_state_dict(reference.state_dict())
    grads = []
    for model, image in ((reference, x), (ae, x.contiguous(memory_format=layout))):
        mean, logvar = model.encode(image)
        x_hat = model.decode(mean + torch.exp(0.5 * logvar))  # a fixed "sample": randn_like follows the layout
        loss = (x_hat - image).abs().mean() + 1 - ldae.ssim3d(x_hat, image).mean()
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))]))
    assert ae.encoder[0].weight.is_contiguous(memory_format=layout)  # the layout was really taken
    assert (grads[1] - grads[0]).abs().max() < 1e-5 * grads[0].abs().max()


def test_explicit_precisions_and_a_bad_one():
    cpu = torch.device("cpu")
    assert ldae.autocast(cpu, "bf16")[1] == torch.bfloat16 and ldae.autocast(cpu, "off")[1] == torch.float32
    with pytest.raises(ValueError, match="--amp"):
        ldae.autocast(cpu, "fp8")


@pytest.mark.parametrize("inference", [False, True])
def test_auto_is_bfloat16_only_on_a_cpu_with_native_bfloat16(monkeypatch, inference):
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(ldae, "cpu_has_bf16", lambda: native)
        assert ldae.autocast(torch.device("cpu"), "auto", inference=inference)[1] == expected
    if inference:  # on CUDA inference stays float32; training's choice depends on the card
        assert ldae.autocast(torch.device("cuda"), "auto", inference=True)[1] == torch.float32


def test_ema_follows_the_weights_early_and_settles_at_its_decay():
    model, ema = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    torch.nn.init.ones_(model.weight)
    torch.nn.init.zeros_(ema.weight)
    ldae.update_ema(ema, model, 0.99, step=0)  # decay 1/10: a step-0 average is mostly the trained weights
    assert torch.allclose(ema.weight, torch.full((2, 2), 0.9))
    torch.nn.init.zeros_(ema.weight)
    ldae.update_ema(ema, model, 0.99, step=10_000)  # (1 + s) / (10 + s) > 0.99: the configured decay
    assert torch.allclose(ema.weight, torch.full((2, 2), 0.01))


def test_ssim_is_one_for_identical_and_drops_with_noise():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 16, 16, 16)
    assert torch.allclose(ldae.ssim3d(x, x), torch.ones(2))
    noisy = ldae.ssim3d(x, (x + 0.3 * torch.randn_like(x)).clamp(0, 1))
    assert (noisy < 0.9).all()
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[..., 4:12, 4:12, 4:12] = True
    assert torch.allclose(ldae.ssim3d(x, x, mask=mask), torch.ones(2))


def test_ssim_matches_the_formula_on_a_constant_shift():
    # Two constant volumes a, b: every window has zero variance, so SSIM = (2ab + c1) / (a^2 + b^2 + c1).
    a, b, c1 = 0.5, 0.3, 0.01**2
    x, y = torch.full((1, 1, 9, 9, 9), a), torch.full((1, 1, 9, 9, 9), b)
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    assert ldae.ssim3d(x, y).item() == pytest.approx(expected, rel=1e-4)  # float32 windows


def test_ssim_under_bfloat16_autocast_is_the_float32_value():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 16, 16, 16)
    y = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    with torch.autocast("cpu", torch.bfloat16):  # training's default on a CPU with native bfloat16
        under_amp = ldae.ssim3d(x, y)
    assert under_amp.dtype == torch.float32 and torch.allclose(under_amp, ldae.ssim3d(x, y), atol=1e-6)


def test_slerp_keeps_the_norm_of_orthogonal_unit_vectors_and_hits_the_ends():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    mid = ldae.slerp(a, b, 0.5)
    assert torch.allclose(mid, torch.tensor([[0.5**0.5, 0.5**0.5]]), atol=1e-6)
    assert torch.allclose(ldae.slerp(a, b, 0.0), a) and torch.allclose(ldae.slerp(a, b, 1.0), b, atol=1e-6)
    assert torch.allclose(ldae.lerp(a, b, 0.25), torch.tensor([[0.75, 0.25]]))


def test_preset_schedule_fills_only_the_flags_left_out():
    import train_ae
    import train_ldae

    flags = ldae.parse_config(train_ldae.Config, ["--repr-epochs", "3"])
    cfg = ldae.with_schedule(flags, ldae.PRESETS["paper"].stage2)
    assert cfg.repr_epochs == 3 and cfg.pretrain_epochs == 500 and cfg.lr == 2.5e-5 and cfg.accumulate == 8
    assert cfg.repr_steps == 0 and cfg.pretrain_steps == 0
    cfg = ldae.with_schedule(ldae.parse_config(train_ae.Config, []), ldae.PRESETS["cpu"].stage1)
    assert cfg.steps == ldae.PRESETS["cpu"].stage1["steps"] and cfg.epochs == 0
    assert cfg.preset == ""  # train_ae picks it at start
    assert ldae.default_preset() == "cpu"  # the tests hide any GPU (conftest)


def test_a_length_flag_in_either_form_replaces_the_presets_length():
    """The cpu schedule counts steps, so its length does not shrink with the cohort; --epochs still sets one."""
    import train_ae
    import train_ldae

    cpu = ldae.PRESETS["cpu"]
    cfg = ldae.with_schedule(ldae.parse_config(train_ae.Config, ["--epochs", "8"]), cpu.stage1)
    assert (cfg.epochs, cfg.steps) == (8, 0) and cfg.lr == cpu.stage1["lr"]
    cfg = ldae.with_schedule(ldae.parse_config(train_ldae.Config, ["--repr-epochs", "5"]), cpu.stage2)
    assert (cfg.repr_epochs, cfg.repr_steps) == (5, 0)
    assert (cfg.pretrain_epochs, cfg.pretrain_steps) == (0, cpu.stage2["pretrain_steps"])
    flags = ldae.parse_config(train_ldae.Config, ["--pretrain-steps", "7"])
    cfg = ldae.with_schedule(flags, ldae.PRESETS["paper"].stage2)
    assert (cfg.pretrain_epochs, cfg.pretrain_steps) == (0, 7) and cfg.repr_epochs == 100


def test_training_log_continues_after_the_checkpoint_step(tmp_path):
    path = tmp_path / "log.csv"
    log = ldae.TrainingLog(path, "autoencoder", 0, steps_per_epoch=10, every=2)
    for step in range(1, 5):
        log.train_step(step, loss=float(step), lr=1e-3, seconds=0.5)
    log.write(4, val_ssim=0.9)
    log = ldae.TrainingLog(path, "pretrain", 0, steps_per_epoch=10, every=2)
    for step in range(1, 7):
        log.train_step(step, loss=1.0, lr=1e-3, seconds=0.25)
    ldae.TrainingLog(path, "pretrain", 2, steps_per_epoch=10, every=2)  # resumed from a checkpoint at step 2
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(ldae.TrainingLog.COLUMNS)
    rows = [dict(zip(ldae.TrainingLog.COLUMNS, line.split(","))) for line in lines[1:]]
    assert [(r["stage"], r["step"]) for r in rows] == [("autoencoder", "2"), ("autoencoder", "4"),
                                                        ("autoencoder", "4"), ("pretrain", "2")]
    assert float(rows[1]["loss"]) == 3.5 and float(rows[1]["seconds_per_step"]) == 0.5
    assert float(rows[2]["val_ssim"]) == 0.9 and rows[2]["loss"] == "" and float(rows[3]["epoch"]) == 0.2
