"""Stage 2: the latent DDPM (2a, METHOD 3), then the semantic encoder and gradient estimator (2b, METHOD 4).

    python train_ldae.py [--out runs] [--stage pretrain|repr|all]     # reads runs/ae.pt, writes runs/ldae.pt
    torchrun --nproc_per_node=N train_ldae.py ...

Stage 2b trains against the frozen EMA weights of stage 2a and stops if they are missing.
"""
import copy
import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # huge pages: large 3D activations without page-fault storms

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import ldae


@dataclass
class Config:
    """Train the latent DDPM and the LDAE representation (stage 2)."""
    out: str = "runs"
    stage: str = "all"  # pretrain | repr | all
    pretrain_epochs: int = 5  # the cpu demo's budget; the paper trains 500
    repr_epochs: int = 4
    steps: int = 0  # optimiser steps for each stage run; 0: from the epochs
    batch_size: int = 16  # stage 2a; stage 2b uses repr_batch_size
    repr_batch_size: int = 8
    accumulate: int = 1
    lr: float = 5e-4  # peak; METHOD 3-4 use 2.5e-5 over 500 epochs on a GPU, short CPU budgets need more
    ema: float = 0.99  # METHOD uses 0.999 over ~10^5 steps; a few hundred steps need a shorter memory
    clip: float = 1.0
    amp: str = "auto"  # auto | bf16 | fp16 | off
    val_steps: int = 10  # DDIM steps of the validation reconstruction
    seed: int = 0
    save_every: int = 200
    resume: bool = False


def open_run(cfg):
    """Everything stage 2 needs from stage 1: preset, rows, images, scaled latents, split, AE weights."""
    run = Path(cfg.out)
    if not (run / "ae.pt").exists():
        raise ldae.CheckpointError(f"{run / 'ae.pt'}: not found; train stage 1 first: `python train_ae.py --out "
                                   f"{cfg.out}` (add --resume if it was interrupted)")
    ae_state = ldae.load_checkpoint(run / "ae.pt")
    if "latent_scale" not in ae_state:
        raise ldae.CheckpointError(f"{run / 'ae.pt'}: stage 1 has not finished; run `python train_ae.py --out "
                                   f"{cfg.out} --resume` first")
    ae_cfg = ae_state["config"]
    preset = ldae.PRESETS[ae_cfg["preset"]]
    rows, images = data.load_cohort(ae_state["data_dir"], ae_cfg["csv"], preset, run, ae_cfg["clip_percentile"],
                                    ae_cfg["skip_bad"])
    latents = data.load_latents(run / "latents.pt", ae_state["model"])
    return ae_state, preset, rows, images, latents


def main(cfg):
    rank, world, device = ldae.setup_process()
    run = Path(cfg.out)
    ckpt_path = run / "ldae.pt"
    if rank == 0:
        print(json.dumps(asdict(cfg), indent=1))
    if cfg.stage not in ("pretrain", "repr", "all"):
        raise SystemExit(f"--stage {cfg.stage!r}: choose pretrain, repr or all")
    if rank != 0:  # rank 0 (re)builds the image cache first: two writers would race on one temp file
        dist.barrier()
    ae_state, preset, rows, images, latents = open_run(cfg)
    if rank == 0 and world > 1:
        dist.barrier()
    split = ae_state["split"]
    train_idx = [i for i, r in enumerate(rows) if split.get(r["subject"]) == "train"]
    val_idx = [i for i, r in enumerate(rows) if split.get(r["subject"]) == "val"][:8]

    state = None
    if cfg.resume and (ckpt_path.exists() or ckpt_path.with_suffix(".prev.pt").exists()):
        state = ldae.load_checkpoint(ckpt_path, fallback=True)
        if state["preset"] != ae_state["config"]["preset"]:
            raise SystemExit(f"{ckpt_path} is for preset {state['preset']!r} but {run / 'ae.pt'} for "
                             f"{ae_state['config']['preset']!r}: use a fresh --out")
    elif cfg.stage == "repr" and ckpt_path.exists():
        state = ldae.load_checkpoint(ckpt_path)  # stage 2b starts from a finished stage 2a
    elif ckpt_path.exists() and cfg.stage != "repr":
        raise SystemExit(f"{ckpt_path} exists: pass --resume to continue it, or --out NEW_FOLDER for a new run")

    torch.manual_seed(cfg.seed)
    unet, encoder = preset.unet().to(device), preset.encoder().to(device)
    todo = ["pretrain", "repr"] if cfg.stage == "all" else [cfg.stage]
    if state:
        unet.load_state_dict(state["unet"])
        encoder.load_state_dict(state["encoder"])
        done = {("pretrain", True): ["pretrain"], ("repr", False): ["pretrain"], ("repr", True): ["pretrain", "repr"]}
        todo = [s for s in todo if s not in done.get((state["stage"], state["finished"]), [])]
    if todo[:1] == ["repr"] and (not state or state["stage"] == "pretrain" and not state["finished"]):
        raise SystemExit(f"{ckpt_path}: no finished stage 2a (EMA UNet) to train the representation against; "
                         f"run `python train_ldae.py --out {cfg.out} --stage pretrain` first")
    if not todo and rank == 0:
        print(f"{ckpt_path}: every stage asked for has finished")
    for stage in todo:
        state = train_stage(cfg, stage, state, unet, encoder, preset, ae_state, images, latents, train_idx, val_idx,
                            rank, world, device)
        if state is None:  # interrupted
            break
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def train_stage(cfg, stage, state, unet, encoder, preset, ae_state, images, latents, train_idx, val_idx,
                rank, world, device):
    """One stage, resumable. Returns the finished state, or None when stopped by a signal."""
    ckpt_path = Path(cfg.out) / "ldae.pt"
    diffusion = ldae.Diffusion()
    resuming = state is not None and state["stage"] == stage and not state["finished"]
    if stage == "repr":
        if not resuming:  # start from the EMA weights of stage 2a (METHOD 3)
            unet.load_state_dict(state["unet_ema"])
        unet.freeze_eps_theta()
        for module in (unet.y_embed, unet.estimator):  # stage 2a froze them when it ran in this process
            module.requires_grad_(True)
        trainable = [p for p in unet.parameters() if p.requires_grad] + list(encoder.parameters())
        batch_size, epochs = cfg.repr_batch_size, cfg.repr_epochs
    else:
        for module in (unet.y_embed, unet.estimator):  # unused in 2a; DDP must not wait for their gradients
            module.requires_grad_(False)
        trainable = [p for p in unet.parameters() if p.requires_grad]
        batch_size, epochs = cfg.batch_size, cfg.pretrain_epochs
    unet_ema, encoder_ema = copy.deepcopy(unet).eval(), copy.deepcopy(encoder).eval()
    decoder = preset.autoencoder().to(device).eval()  # for the validation reconstructions
    decoder.load_state_dict(ae_state["model"])
    opt = torch.optim.Adam(trainable, lr=cfg.lr)
    amp_ctx, amp_dtype = ldae.autocast(device, cfg.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    step, best = 0, None  # best: step, SSIM and EMA weights of the best validation so far (stage 2b)
    if resuming:
        unet_ema.load_state_dict(state["unet_ema"])
        encoder_ema.load_state_dict(state["encoder_ema"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step, best = state["step"], state.get("best")
    wrap = lambda m: torch.nn.parallel.DistributedDataParallel(m) if world > 1 else m
    unet_run = wrap(unet)
    encoder_run = wrap(encoder) if stage == "repr" else encoder
    per_step = batch_size * cfg.accumulate * world
    steps_per_epoch = max(1, len(train_idx) // per_step)
    total = cfg.steps or epochs * steps_per_epoch
    latent_scale = ae_state["latent_scale"]

    def checkpoint(finished=False):
        if rank == 0:
            ldae.save_checkpoint({
                "stage": stage, "finished": finished,
                "unet": unet.state_dict(), "unet_ema": unet_ema.state_dict(), "encoder": encoder.state_dict(),
                "encoder_ema": encoder_ema.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                "step": step, "best_ssim": best["ssim"] if best else -1.0, "best": best, "config": asdict(cfg),
                "preset": ae_state["config"]["preset"],
                "latent_scale": latent_scale}, ckpt_path)

    stop = []  # Ctrl-C or SIGTERM end the current step, then save and exit
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _: stop.append(signal.Signals(signum).name))
    name = "stage 2a latent DDPM" if stage == "pretrain" else "stage 2b representation"
    bar = tqdm(total=total, initial=step, desc=name, disable=rank != 0)
    t0, first, running = time.time(), step, None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    while step < total and not stop:
        ldae.step_seed(cfg.seed, step, rank)
        epoch, k = divmod(step, steps_per_epoch)
        order = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        batch_ids = order[k * per_step:(k + 1) * per_step][rank::world].tolist()
        total_loss = 0.0
        for micro in range(cfg.accumulate):
            ids = [train_idx[i] for i in batch_ids[micro * batch_size:(micro + 1) * batch_size]]
            z0 = latents[ids].to(device)
            with amp_ctx:
                if stage == "pretrain":
                    loss = diffusion.pretrain_loss(unet_run, z0)
                else:
                    loss = diffusion.repr_loss(unet_run, encoder_run(torch.tensor(images[ids]).to(device)), z0)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {step} of {name}: the last good "
                                         f"checkpoint {ckpt_path} is kept; lower --lr or use --amp off")
            scaler.scale(loss / cfg.accumulate).backward()
            total_loss += loss.item() / cfg.accumulate
        for group in opt.param_groups:
            group["lr"] = ldae.learning_rate(cfg.lr, step, total)
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(trainable, cfg.clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        ldae.update_ema(unet_ema, unet, cfg.ema, step)
        ldae.update_ema(encoder_ema, encoder, cfg.ema, step)
        step += 1
        running = total_loss if running is None else 0.95 * running + 0.05 * total_loss
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}")
        if stage == "repr" and step % steps_per_epoch == 0 and rank == 0 and val_idx:
            loss, ssim = validate(diffusion, unet_ema, encoder_ema, decoder, latent_scale, images, latents,
                                  val_idx, cfg, device)
            if best is None or loss < best["loss"]:
                copy_of = lambda m: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
                best = {"step": step, "loss": loss, "ssim": ssim, "unet_ema": copy_of(unet_ema),
                        "encoder_ema": copy_of(encoder_ema)}
            bar.write(f"epoch {step // steps_per_epoch}: validation loss {loss:.5f}, reconstruction SSIM "
                      f"({cfg.val_steps} DDIM steps) {ssim:.4f}")
        if step % cfg.save_every == 0:
            checkpoint()
    bar.close()
    if stop:
        checkpoint()
        print(f"{stop[0]}: saved {ckpt_path} at step {step} of {name}; continue with --resume")
        return None
    if best is not None and best["step"] != step:  # keep the best validation checkpoint (METHOD 4, see validate)
        unet_ema.load_state_dict(best["unet_ema"])
        encoder_ema.load_state_dict(best["encoder_ema"])
        if rank == 0:
            print(f"{name}: keeping the EMA weights of step {best['step']} (validation loss {best['loss']:.5f}, "
                  f"SSIM {best['ssim']:.4f}), the best of the run")
    checkpoint(finished=True)
    if rank == 0:
        print(f"{name}: {ldae.run_summary(step - first, time.time() - t0, device)}; wrote {ckpt_path}")
    return {"stage": stage, "finished": True, "unet_ema": unet_ema.state_dict()}


@torch.no_grad()
def validate(diffusion, unet, encoder, ae, latent_scale, images, latents, indices, cfg, device):
    """(loss, SSIM) on the validation scans. The loss is stage 2b's own objective with the same timesteps and
    noise at every call (4 draws per scan), so calls compare like for like; it picks the checkpoint to keep.
    METHOD 4 picks by reconstruction SSIM, but with DDIM-encoded z_T that is bounded by the autoencoder and
    hardly moves with y_sem (0.825 vs 0.827 with the estimator off, 50 steps), while a few steps mostly measure
    inversion error, which grows as the estimator learns (0.614 vs 0.639 at 10 steps). The SSIM (x against
    its reconstruction from y_sem and the DDIM-encoded z_T, cfg.val_steps steps) is printed as the figure."""
    x, z0 = torch.tensor(images[indices]).to(device), latents[indices].to(device)
    y_sem = encoder(x)
    torch.manual_seed(0)  # training reseeds every step (step_seed)
    loss = sum(diffusion.repr_loss(unet, y_sem, z0).item() for _ in range(4)) / 4
    z_T = diffusion.ddim_encode(unet, z0, y_sem, cfg.val_steps)
    x_hat = ae.decode(diffusion.ddim_sample(unet, z_T, y_sem, cfg.val_steps) / latent_scale)
    return loss, ldae.ssim3d(x_hat, x).mean().item()


if __name__ == "__main__":
    try:
        main(ldae.parse_config(Config))
    except (data.DataError, ldae.CheckpointError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}")
