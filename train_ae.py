"""Stage 1: train the 3D KL autoencoder (METHOD 2), then measure the latent scale and cache every latent.

    python train_ae.py [--data DIR] [--preset tiny|cpu|paper] [--out runs]      # writes runs/ae.pt
    torchrun --nproc_per_node=N train_ae.py ...                                   # same script, N processes

Loss: L1 + kl_weight * KL + ssim_weight * (1 - 3D SSIM) + adv_weight * least-squares GAN after a warm-up.
The structural term is 3D SSIM because the paper's LPIPS needs pretrained weights we cannot ship.
"""
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # huge pages: large 3D activations without page-fault storms

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import ldae


@dataclass
class Config:
    """Train the LDAE autoencoder (stage 1)."""
    data: str = ""  # folder with participants.csv or a BIDS layout; empty: the built-in demo cohort
    csv: str = ""  # a table elsewhere than DATA/participants.csv
    preset: str = ""  # tiny | cpu | paper; empty: paper on a CUDA machine, cpu elsewhere
    out: str = "runs"
    # None: the preset's schedule (ldae.PRESETS; cpu: 2048 steps at lr 1e-3, paper: METHOD 2's 100 epochs at 5e-5)
    epochs: int = None  # the run's length in epochs, or
    steps: int = None  # in optimiser steps (either flag replaces the preset's length)
    batch_size: int = None
    accumulate: int = None  # micro-batches per optimiser step
    lr: float = None  # peak; METHOD 2 uses 5e-5 to fine-tune a pretrained model, from scratch needs more
    lr_d: float = None
    kl_weight: float = 1e-7
    ssim_weight: float = 1.0
    adv_weight: float = 0.025
    adv_start: float = None  # epochs before the adversarial term switches on; inf: never (the cpu preset)
    clip: float = 1.0
    amp: str = "auto"  # auto | bf16 | fp16 | off
    checkpointing: bool = False  # recompute activations in backward (paper preset in < 24 GB)
    clip_percentile: float = 0.0  # 0: min-max scaling as the paper; p: clip to [p, 100-p] percentiles first
    split_seed: int = 42
    seed: int = 0
    save_every: int = 200
    skip_bad: bool = False
    resume: bool = False


def evaluate_ae(ae, images, indices, device):
    """Validation SSIM and MSE of mean-latent reconstructions."""
    ae.eval()
    ssims, mses, layout = [], [], ldae.memory_format(device)
    with torch.no_grad():
        for i in indices:
            x = torch.tensor(images[i][None]).to(device, memory_format=layout)
            x_hat = ae.decode(ae.encode(x)[0]).float()
            ssims.append(ldae.ssim3d(x_hat, x).item())
            mses.append(F.mse_loss(x_hat, x).item())
    ae.train()
    return sum(ssims) / len(ssims), sum(mses) / len(mses)


def main(cfg):
    rank, world, device = ldae.setup_process()
    run = Path(cfg.out)
    ckpt_path = run / "ae.pt"
    cfg = replace(cfg, preset=cfg.preset or ldae.default_preset())
    if cfg.preset not in ldae.PRESETS:
        raise SystemExit(f"--preset {cfg.preset!r}: choose one of {', '.join(ldae.PRESETS)}")
    state = None
    if cfg.resume and (ckpt_path.exists() or ckpt_path.with_suffix(".prev.pt").exists()):
        state = ldae.load_checkpoint(ckpt_path, fallback=True)
        # A resumed run keeps its own config (only --steps may extend it), so it continues the same schedule.
        cfg = Config(**{**state["config"], "resume": True, "steps": cfg.steps or state["config"]["steps"]})
    elif ckpt_path.exists() and not cfg.resume:
        raise SystemExit(f"{ckpt_path} exists: pass --resume to continue it, or --out NEW_FOLDER for a new run")
    else:
        cfg = ldae.with_schedule(cfg, ldae.PRESETS[cfg.preset].stage1)
    if rank == 0:
        length = f"{cfg.steps} steps" if cfg.steps else f"{cfg.epochs} epochs"
        adversarial = f"from epoch {cfg.adv_start:g}" if math.isfinite(cfg.adv_start) else "off"
        print(f"preset {cfg.preset} with its schedule: {length}, batch {cfg.batch_size} x {cfg.accumulate}, "
              f"lr {cfg.lr:g}, adversarial term {adversarial} (flags override each)")
        print(json.dumps(asdict(cfg), indent=1))
    preset = ldae.PRESETS[cfg.preset]

    folder = Path(cfg.data) if cfg.data else data.ensure_demo()
    if rank != 0:  # rank 0 builds the image cache first: two writers would race on one temp file
        dist.barrier()
    rows, images = data.load_cohort(folder, cfg.csv, preset, run, cfg.clip_percentile, cfg.skip_bad)
    if rank == 0 and world > 1:
        dist.barrier()
    split = state["split"] if state else data.make_split(rows, seed=cfg.split_seed)
    if rank == 0:
        data.save_split(run / "split.json", split)
    train_idx = [i for i, r in enumerate(rows) if split.get(r["subject"]) == "train"]
    val_idx = [i for i, r in enumerate(rows) if split.get(r["subject"]) == "val"][:16]
    per_step = cfg.batch_size * cfg.accumulate * world
    steps_per_epoch = max(1, len(train_idx) // per_step)
    total = cfg.steps or cfg.epochs * steps_per_epoch

    torch.manual_seed(cfg.seed)
    amp_ctx, amp_dtype = ldae.autocast(device, cfg.amp)
    layout = ldae.memory_format(device, amp_dtype)
    ae = preset.autoencoder(cfg.checkpointing).to(device, memory_format=layout)
    disc = preset.discriminator().to(device, memory_format=layout)
    opt = torch.optim.Adam(ae.parameters(), lr=cfg.lr)
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr_d)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    step = 0
    if state:
        ae.load_state_dict(state["model"])
        disc.load_state_dict(state["discriminator"])
        opt.load_state_dict(state["optimizer"])
        opt_d.load_state_dict(state["optimizer_d"])
        scaler.load_state_dict(state["scaler"])
        step = state["step"]
    model = torch.nn.parallel.DistributedDataParallel(ae) if world > 1 else ae
    adv_start = cfg.adv_start * steps_per_epoch  # the first step with the adversarial term (inf: none)
    adv_start = round(adv_start) if math.isfinite(adv_start) else adv_start

    def checkpoint(extra=None):
        if rank == 0:
            ldae.save_checkpoint({"model": ae.state_dict(), "discriminator": disc.state_dict(),
                                  "optimizer": opt.state_dict(), "optimizer_d": opt_d.state_dict(),
                                  "scaler": scaler.state_dict(), "step": step, "config": asdict(cfg),
                                  "data_dir": str(folder), "split": split, **(extra or {})}, ckpt_path)

    stop = []  # Ctrl-C or SIGTERM end the current step, then save and exit
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _: stop.append(signal.Signals(signum).name))
    bar = tqdm(total=total, initial=step, desc="stage 1 autoencoder", disable=rank != 0)
    log = ldae.TrainingLog(run / "log.csv", "autoencoder", step, steps_per_epoch, enabled=rank == 0)
    t0, first = time.time(), step
    while step < total and not stop:
        step_start = time.time()
        ldae.step_seed(cfg.seed, step, rank)
        epoch, k = divmod(step, steps_per_epoch)
        order = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        batch_ids = order[k * per_step:(k + 1) * per_step][rank::world].tolist()
        losses, total_loss, adversarial = {}, 0.0, step >= adv_start
        for micro in range(cfg.accumulate):
            ids = [train_idx[i] for i in batch_ids[micro * cfg.batch_size:(micro + 1) * cfg.batch_size]]
            x = torch.tensor(images[ids]).to(device, memory_format=layout)
            with amp_ctx:
                x_hat, mean, logvar = model(x)
                x_hat = x_hat.float()
                parts = {"l1": (x_hat - x).abs().mean(), "kl": ldae.kl_divergence(mean.float(), logvar.float()),
                         "ssim": 1 - ldae.ssim3d(x_hat, x).mean()}
                loss = parts["l1"] + cfg.kl_weight * parts["kl"] + cfg.ssim_weight * parts["ssim"]
                if adversarial:  # generator term; the discriminator is frozen for it (METHOD 2)
                    disc.requires_grad_(False)
                    parts["g_adv"] = (disc(x_hat).float() - 1).pow(2).mean()
                    disc.requires_grad_(True)
                    loss = loss + cfg.adv_weight * parts["g_adv"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}: the last good checkpoint "
                                         f"{ckpt_path} is kept; lower --lr or use --amp off")
            scaler.scale(loss / cfg.accumulate).backward()
            total_loss += loss.item() / cfg.accumulate
            if adversarial:
                with amp_ctx:
                    d_loss = 0.5 * (disc(x_hat.detach()).float().pow(2).mean()
                                    + (disc(x).float() - 1).pow(2).mean())
                (d_loss / cfg.accumulate).backward()
                parts["d"] = d_loss
            for name, v in parts.items():
                losses[name] = losses.get(name, 0.0) + v.item() / cfg.accumulate
        for group in opt.param_groups:
            group["lr"] = ldae.learning_rate(cfg.lr, step, total)
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(ae.parameters(), cfg.clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if adversarial:
            if world > 1:  # the discriminator is not wrapped in DDP: average its gradients by hand
                for p in disc.parameters():
                    dist.all_reduce(p.grad)
                    p.grad /= world
            torch.nn.utils.clip_grad_norm_(disc.parameters(), cfg.clip)
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)
        step += 1
        log.train_step(step, total_loss, opt.param_groups[0]["lr"], time.time() - step_start)
        bar.update(1)
        bar.set_postfix({k: f"{v:.4f}" for k, v in losses.items() if k != "kl"})
        if step % steps_per_epoch == 0 and rank == 0 and val_idx:
            ssim, mse = evaluate_ae(ae, images, val_idx, device)
            log.write(step, val_ssim=ssim, val_mse=mse)
            bar.write(f"epoch {step // steps_per_epoch}: validation SSIM {ssim:.4f}  MSE {mse:.5f}")
        if step % cfg.save_every == 0:
            checkpoint()
    bar.close()
    if stop:
        checkpoint()
        print(f"{stop[0]}: saved {ckpt_path} at step {step}; continue with --resume")
        return
    if rank == 0:
        print(f"trained {ldae.run_summary(step - first, time.time() - t0, device)}")
        ssim, mse = evaluate_ae(ae, images, val_idx, device) if val_idx else (float("nan"), float("nan"))
        latent_mean, latent_scale = finish(ae, images, rows, train_idx, run, device)
        checkpoint({"latent_mean": latent_mean, "latent_scale": latent_scale, "val_ssim": ssim, "val_mse": mse})
        print(f"wrote {ckpt_path}: validation SSIM {ssim:.4f}, MSE {mse:.5f}, latent scale {latent_scale:.4f}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


@torch.no_grad()
def finish(ae, images, rows, train_idx, run, device):
    """Encode every scan once (the posterior mean: the cleaner choice, METHOD 1), measure the training latents'
    mean (per element: the average brain) and the scale s = 1 / std around it, and cache every latent as
    s * (mean - latent_mean) for stage 2. METHOD 2 only scales; centring as well leaves the DDPM the variation
    between brains to learn, not the average brain (see ldae.scale_latent)."""
    ae.eval()
    layout = ldae.memory_format(device)
    means = torch.cat([ae.encode(torch.tensor(images[i][None]).to(device, memory_format=layout))[0].float().cpu()
                       .contiguous() for i in tqdm(range(len(rows)), desc="caching latents")])
    latent_mean = means[train_idx].mean(0)
    latent_scale = 1.0 / (means[train_idx] - latent_mean).std().item()
    data.save_latents(run / "latents.pt", ldae.scale_latent(means, latent_mean, latent_scale), ae.state_dict())
    return latent_mean, latent_scale

if __name__ == "__main__":
    try:
        main(ldae.parse_config(Config))
    except (data.DataError, ldae.CheckpointError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}")
