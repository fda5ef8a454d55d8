"""Speed and memory of ldae's networks at one preset on this machine. A benchmark, not a test: pytest does not
collect it, and it asserts nothing; it prints figures to compare across machines.

    python tests/bench_speed.py [--preset paper] [--memory] [--monai]

Prints the CPU model; the machine's own Conv3d rate over a few shapes and both layouts (float32, and bfloat16
where the hardware has it), whose best is the peak; autoencoder encode and decode and one latent UNet step at
batch 1 in float32 and, where the hardware has it, in bfloat16 autocast; one autoencoder forward + backward
(training precision) against the peak; stage 2's training steps (at the CPU presets, and at any preset on a GPU);
with --memory, the peak memory of one float32 training step of each stage, the autoencoder with and without
activation checkpointing (CUDA: max_memory_allocated; CPU: the peak resident size of a fresh process running just
that step).
"""
import argparse
import copy
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the scripts do

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate  # noqa: E402
import ldae  # noqa: E402

STAGES = ("stage1", "stage1_checkpointing", "stage2a", "stage2b")
PEAKS = {}  # dtype -> the machine's Conv3d FLOP/s, from machine_rate()


def seconds(fn, repeats=2):
    fn()  # warm-up: allocations and kernel choice
    return evaluate.timed(fn, repeats, DEVICE)


def machine_name():
    """The CPU model (and the GPU's, where there is one), for the first line of every report."""
    cpuinfo = Path("/proc/cpuinfo")  # Linux; elsewhere what the platform module knows
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
              if line.startswith("model name")] if cpuinfo.exists() else []
    cpu = models[0] if models else platform.processor()
    gpu = f", {torch.cuda.get_device_name(DEVICE)}" if DEVICE.type == "cuda" else ""
    return f"{cpu} ({os.cpu_count()} cores){gpu}"


def machine_rate():
    """The Conv3d rate over evaluate.CONV_SHAPES in float32 and, where the hardware has it, bfloat16; the best is
    the peak every percentage here refers to."""
    dtypes = [torch.float32] + ([torch.bfloat16] if DEVICE.type == "cuda" or ldae.cpu_has_bf16() else [])
    for dtype in dtypes:
        rates = evaluate.conv_rates(DEVICE, dtype)
        name = str(dtype).replace("torch.", "")
        PEAKS[name] = max(rates.values())
        print(f"Conv3d 3x3x3, {name}: " + "; ".join(f"{k} {v / 1e9:.0f}" for k, v in rates.items()) + " GFLOP/s")
    print("peak: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in PEAKS.items()))


def speed(preset):
    ae = preset.autoencoder().to(DEVICE, memory_format=ldae.memory_format(DEVICE)).eval()  # as evaluate.py
    unet = preset.unet().to(DEVICE, memory_format=ldae.memory_format(DEVICE)).eval()
    x, z = torch.rand(1, 1, *preset.image_shape, device=DEVICE), torch.randn(1, *preset.latent_shape, device=DEVICE)
    t = torch.tensor([500], device=DEVICE)
    has_bf16 = DEVICE.type == "cuda" or ldae.cpu_has_bf16()
    for amp in ("off", "bf16") if has_bf16 else ("off",):
        ctx, dtype = ldae.autocast(DEVICE, amp)
        with torch.no_grad(), ctx, ldae.heap_memory():  # as evaluate.py
            times = {"AE encode": seconds(lambda: ae.encode(x)), "AE decode": seconds(lambda: ae.decode(z)),
                     "latent UNet step": seconds(lambda: unet(z, t))}
        print(f"{amp:>4} ({str(dtype).replace('torch.', '')}): "
              + "   ".join(f"{name} {s:.3f} s" for name, s in times.items()))
    checkpointing = estimate_gib(preset, "stage1") > 0.9 * device_gib()  # else the step would not fit
    rate = evaluate.autoencoder_training_rate(preset, DEVICE, checkpointing=checkpointing)
    print(f"AE forward + backward (training precision{', checkpointing' if checkpointing else ''}): "
          f"{rate / 1e9:.0f} GFLOP/s = {100 * rate / max(PEAKS.values()):.0f}% of the peak")


def monai_speed(preset):
    """The same three calls with MONAI's AutoencoderKL and DiffusionModelUNet at the preset's configuration, with
    MONAI's defaults (float32, contiguous) and, on a CPU with bfloat16, its best set-up: the references the
    issue compares against. Needs `pip install monai`, which ldae itself never imports."""
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

    levels = len(preset.ae_channels)
    ae = AutoencoderKL(spatial_dims=3, in_channels=1, out_channels=1, channels=preset.ae_channels,
                       latent_channels=preset.latent_channels, num_res_blocks=preset.ae_blocks,
                       attention_levels=(False,) * levels, with_encoder_nonlocal_attn=False,
                       with_decoder_nonlocal_attn=False, norm_num_groups=min(32, *preset.ae_channels))
    channels = tuple(preset.unet_base * m for m in preset.unet_mults)
    unet = DiffusionModelUNet(spatial_dims=3, in_channels=preset.latent_channels,
                              out_channels=preset.latent_channels, channels=channels,
                              attention_levels=tuple(2 ** i in preset.unet_attention for i in range(len(channels))),
                              num_res_blocks=preset.unet_blocks, num_head_channels=channels,
                              norm_num_groups=min(32, preset.unet_base))
    x, z = torch.rand(1, 1, *preset.image_shape, device=DEVICE), torch.randn(1, *preset.latent_shape, device=DEVICE)
    t = torch.tensor([500], device=DEVICE)
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    # Its defaults, then the best set-up: bfloat16 autocast and channels_last_3d (THP is on already).
    setups = [("float32 defaults", "off", torch.contiguous_format)]
    if ldae.cpu_has_bf16() and DEVICE.type == "cpu":
        setups.append(("bfloat16 + channels_last_3d", "bf16", torch.channels_last_3d))
    for setup, amp, layout in setups:
        ae, unet = ae.to(DEVICE, memory_format=layout).eval(), unet.to(DEVICE, memory_format=layout).eval()
        x = x.contiguous(memory_format=layout)
        with torch.no_grad(), ldae.autocast(DEVICE, amp)[0]:
            times = {"AE encode": seconds(lambda: ae.encode(x)),
                     "AE decode": seconds(lambda: ae.decode(z)), "latent UNet step": seconds(lambda: unet(z, t))}
        print(f"MONAI {setup}: " + "   ".join(f"{name} {s:.3f} s" for name, s in times.items())
              + f"   (UNet {params:.0f} M parameters)")


def stage2_steps(preset):
    """Stage 2's training steps as train_ldae.py runs them (train mode, its autocast, clipping, Adam, EMA) at the
    preset's batch sizes and twice them, in both layouts and on 1 thread and all of them; and the semantic encoder's
    forward + backward alone. Seconds per step, scans per second, and GFLOP/s against the machine's peak."""
    from torch.utils.flop_counter import FlopCounterMode

    diffusion, (ctx, dtype) = ldae.Diffusion(), ldae.autocast(DEVICE, "auto")
    batches = {"2a": preset.stage2["batch_size"], "2b": preset.stage2["repr_batch_size"]}
    peak = max(PEAKS.values())
    threads = torch.get_num_threads()
    print(f"stage 2 training steps ({str(dtype).replace('torch.', '')}; GFLOP/s and % of the "
          f"{peak / 1e9:.0f} GFLOP/s peak)")
    # Stage 2b only in PyTorch's default layout (train_ldae.py's): in channels_last_3d its backward through the
    # frozen eps_theta crashes the process (segmentation fault, torch 2.13 on the CPU, float32 and bfloat16 alike).
    for stage, encoder_only in (("2a", False), ("2b", False), ("2b", True)):
        for batch in (batches[stage], 2 * batches[stage]):
            layouts = (torch.contiguous_format, torch.channels_last_3d) if stage == "2a" else (torch.contiguous_format,)
            for layout in layouts:
                torch.manual_seed(0)
                unet, encoder = preset.unet().to(DEVICE).train(), preset.encoder().to(DEVICE).train()
                if stage == "2b":
                    unet.freeze_eps_theta()
                unet = unet.to(memory_format=layout)
                z0 = torch.randn(batch, *preset.latent_shape, device=DEVICE).contiguous(memory_format=layout)
                x = torch.rand(batch, 1, *preset.image_shape, device=DEVICE)
                if encoder_only:
                    params = list(encoder.parameters())
                    loss = lambda: encoder(x).float().square().mean()
                elif stage == "2a":
                    params = [p for p in unet.parameters() if p.requires_grad]
                    loss = lambda: diffusion.pretrain_loss(unet, z0)
                else:
                    params = [p for p in unet.parameters() if p.requires_grad] + list(encoder.parameters())
                    loss = lambda: diffusion.repr_loss(unet, encoder(x), z0)
                unet_ema, encoder_ema = copy.deepcopy(unet), copy.deepcopy(encoder)
                opt = torch.optim.Adam(params, lr=1e-6)

                def step():  # train_ldae.train_stage's step, less data loading and logging
                    with ctx:
                        value = loss()
                    value.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    ldae.update_ema(unet_ema, unet, 0.99, 100)
                    ldae.update_ema(encoder_ema, encoder, 0.99, 100)
                with FlopCounterMode(display=False) as counter:
                    step()
                flops = counter.get_total_flops()
                cells = []
                for n in sorted({1, threads}):
                    torch.set_num_threads(n)
                    s = seconds(step, 3)
                    cells.append(f"{n} thread{'s' * (n > 1)} {s:.3f} s/step, {batch / s:.0f} scans/s, "
                                 f"{flops / s / 1e9:.0f} GFLOP/s ({100 * flops / s / peak:.0f}%)")
                torch.set_num_threads(threads)
                name = "encoder f+b" if encoder_only else f"stage {stage}"
                print(f"  {name:<11} batch {batch:>2} {str(layout).replace('torch.', ''):<17} " + "; ".join(cells))


def stage_loss(preset, stage, device):
    """(loss, trainable parameters) of one training step of a stage, batch 1, random data."""
    diffusion = ldae.Diffusion()
    if stage.startswith("stage1"):
        ae = preset.autoencoder(checkpointing=stage.endswith("checkpointing")).to(device)
        disc = preset.discriminator().to(device)
        x = torch.rand(1, 1, *preset.image_shape, device=device)
        x_hat, mean, logvar = ae(x)
        loss = ((x_hat - x).abs().mean() + 1 - ldae.ssim3d(x_hat, x).mean() + ldae.kl_divergence(mean, logvar)
                + (disc(x_hat) - 1).pow(2).mean() + disc(x).pow(2).mean())
        return loss, list(ae.parameters()) + list(disc.parameters())
    unet = preset.unet().to(device)
    z0 = torch.randn(1, *preset.latent_shape, device=device)
    if stage == "stage2a":
        return diffusion.pretrain_loss(unet, z0), list(unet.parameters())
    unet.freeze_eps_theta()
    encoder = preset.encoder().to(device)
    z0 = torch.randn(2, *preset.latent_shape, device=device)  # y_sem is standardised over the batch: two scans
    loss = diffusion.repr_loss(unet, encoder(torch.rand(2, 1, *preset.image_shape, device=device)), z0)
    return loss, [p for p in unet.parameters() if p.requires_grad] + list(encoder.parameters())


def estimate_gib(preset, stage):
    """Bytes the step keeps for backward, counted on the meta device (an upper bound: a tensor saved by two
    operations counts twice), plus trainable weights, their gradients and Adam's two moments."""
    saved = []
    with torch.device("meta"), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
        _, params = stage_loss(preset, stage, torch.device("meta"))
    return (sum(saved) + 4 * sum(p.numel() * p.element_size() for p in params)) / 2 ** 30


def one_step(preset, stage):
    """Run one optimiser step; (peak memory in GiB, seconds)."""
    start = time.perf_counter()
    loss, params = stage_loss(preset, stage, DEVICE)
    opt = torch.optim.Adam(params)
    loss.backward()
    opt.step()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2 ** 30, time.perf_counter() - start
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, time.perf_counter() - start  # KiB


def device_gib():
    return (torch.cuda.get_device_properties(DEVICE).total_memory if DEVICE.type == "cuda"
            else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / 2 ** 30


def memory(preset_name):
    preset = ldae.PRESETS[preset_name]
    total = device_gib()
    how = "max_memory_allocated" if DEVICE.type == "cuda" else "peak resident size of the process"
    print(f"peak memory of one training step, batch 1 ({how}); this device has {total:.0f} GiB")
    for stage in STAGES:
        estimate = estimate_gib(preset, stage)
        if estimate > 0.9 * total:
            print(f"{stage:<22} estimate {estimate:.1f} GiB: not run, more than this device holds")
            continue
        done = subprocess.run([sys.executable, __file__, "--preset", preset_name, "--step", stage],
                              capture_output=True, text=True)
        measured = done.stdout.strip().splitlines()[-1:] or [f"failed, exit {done.returncode}"]
        print(f"{stage:<22} estimate {estimate:.1f} GiB, measured {measured[0]}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="paper", choices=list(ldae.PRESETS))
    parser.add_argument("--memory", action="store_true", help="also the peak memory of one step of each stage")
    parser.add_argument("--monai", action="store_true", help="also time MONAI's networks (pip install monai)")
    parser.add_argument("--step", choices=STAGES, help=argparse.SUPPRESS)  # internal: one stage, one process
    args = parser.parse_args()
    DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    if args.step:
        peak, took = one_step(ldae.PRESETS[args.preset], args.step)
        print(f"{peak:.2f} GiB ({took:.0f} s)")
    else:
        print(f"{machine_name()}; preset {args.preset}, device {DEVICE}, {torch.get_num_threads()} threads, torch "
              f"{torch.__version__}")
        machine_rate()
        speed(ldae.PRESETS[args.preset])
        if DEVICE.type == "cuda" or args.preset != "paper":  # paper-sized training batches take minutes on a CPU
            stage2_steps(ldae.PRESETS[args.preset])
        if args.monai:
            monai_speed(ldae.PRESETS[args.preset])
        if args.memory:
            memory(args.preset)
