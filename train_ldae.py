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
import torch.nn.functional as F
from tqdm import tqdm

import data
import ldae


@dataclass
class Config:
    """Train the latent DDPM and the LDAE representation (stage 2)."""
    out: str = "runs"
    stage: str = "all"  # pretrain | repr | all
    # None: the preset's schedule (ldae.PRESETS), from the preset in ae.pt
    pretrain_epochs: int = None  # stage 2a's length in epochs (the paper trains 500), or
    pretrain_steps: int = None  # in optimiser steps (either flag replaces the preset's length)
    repr_epochs: int = None  # stage 2b's, the same two ways
    repr_steps: int = None
    steps: int = 0  # optimiser steps for each stage this run trains; 0: each stage's own length
    batch_size: int = None  # stage 2a
    accumulate: int = None  # stage 2a micro-batches per optimiser step
    repr_batch_size: int = None
    repr_accumulate: int = None
    lr: float = None  # stage 2a peak; METHOD 3-4 use 2.5e-5 over 500 epochs on a GPU, short CPU budgets need more
    repr_lr: float = None  # stage 2b peak
    ema: float = None  # METHOD uses 0.999 over ~10^5 steps; a few thousand steps need a shorter memory
    clip: float = 1.0
    amp: str = "auto"  # auto | bf16 | fp16 | off
    val_steps: int = 10  # DDIM steps of the validation reconstruction
    val_every: int = 4  # epochs between validations (the log's validation lines), at most 12 a stage, and its last step
    seed: int = 0
    save_every: int = 200
    resume: bool = False
    oracle: bool = False  # diagnostic: stage 2b trains the estimator on an oracle code instead of the encoder
    oracle_columns: str = ""  # with --oracle: the code is these participants-table columns (comma-separated)
    t_sampling: str = "uniform"  # stage 2b's t: uniform (METHOD 4) | code (more where y_sem can save; same loss)


def open_run(cfg):
    """Everything stage 2 needs from stage 1: preset, rows, images, scaled latents, split, AE weights."""
    run = Path(cfg.out)
    if not (run / "ae.pt").exists():
        raise ldae.CheckpointError(f"{run / 'ae.pt'}: not found; train stage 1 first: `python train_ae.py --out "
                                   f"{cfg.out}` (add --resume if it was interrupted)")
    ae_state = ldae.load_checkpoint(run / "ae.pt")
    if "latent_mean" not in ae_state:  # unfinished, or finished before latents were centred: --resume finishes
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
    if cfg.stage not in ("pretrain", "repr", "all"):
        raise SystemExit(f"--stage {cfg.stage!r}: choose pretrain, repr or all")
    if cfg.t_sampling not in ("code", "uniform"):
        raise SystemExit(f"--t-sampling {cfg.t_sampling!r}: choose code or uniform")
    if cfg.oracle_columns and not cfg.oracle:
        raise SystemExit("--oracle-columns names the columns of an oracle code: pass --oracle with it")
    if cfg.repr_batch_size is not None and cfg.repr_batch_size < 2:
        raise SystemExit(f"--repr-batch-size {cfg.repr_batch_size}: y_sem is standardised over the batch, which "
                         f"needs 2 scans or more per process; use --repr-accumulate for a larger batch instead")
    if rank != 0:  # rank 0 (re)builds the image cache first: two writers would race on one temp file
        dist.barrier()
    ae_state, preset, rows, images, latents = open_run(cfg)
    if rank == 0 and world > 1:
        dist.barrier()
    cfg = ldae.with_schedule(cfg, preset.stage2)
    if rank == 0:
        length = lambda steps, epochs: f"{steps} steps" if steps else f"{epochs} epochs"
        print(f"preset {ae_state['config']['preset']} (from {run / 'ae.pt'}) with its schedule: stage 2a "
              f"{length(cfg.pretrain_steps, cfg.pretrain_epochs)}, batch {cfg.batch_size} x {cfg.accumulate}, "
              f"lr {cfg.lr:g}; stage 2b {length(cfg.repr_steps, cfg.repr_epochs)}, batch {cfg.repr_batch_size} x "
              f"{cfg.repr_accumulate}, lr {cfg.repr_lr:g}; EMA {cfg.ema} (flags override each)")
        print(json.dumps(asdict(cfg), indent=1))
    split = ae_state["split"]
    train_idx = [i for i, r in enumerate(rows) if split.get(r["subject"]) == "train"]
    first_visits = {r["subject"]: i for i, r in reversed(list(enumerate(rows)))}
    val_idx = sorted(i for s, i in first_visits.items() if split.get(s) == "val")[:8]  # one scan per subject

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
    init_seed = cfg.seed  # the seed of the networks' random start: Preset.untrained_encoder draws it again
    todo = ["pretrain", "repr"] if cfg.stage == "all" else [cfg.stage]
    if state:
        ldae.load_weights(unet, state["unet"], ckpt_path, "latent UNet")
        init_seed = state.get("init_seed", state["config"]["seed"])
        if state["stage"] == "pretrain":  # stage 2a leaves the encoder untrained: drawn again, so that a preset's
            encoder = preset.untrained_encoder(init_seed).to(device)  # new encoder can start from an old stage 2a
        else:
            ldae.load_weights(encoder, state["encoder"], ckpt_path, "semantic encoder")
        done = {("pretrain", True): ["pretrain"], ("repr", False): ["pretrain"], ("repr", True): ["pretrain", "repr"]}
        todo = [s for s in todo if s not in done.get((state["stage"], state["finished"]), [])]
    if todo[:1] == ["repr"] and (not state or state["stage"] == "pretrain" and not state["finished"]):
        raise SystemExit(f"{ckpt_path}: no finished stage 2a (EMA UNet) to train the representation against; "
                         f"run `python train_ldae.py --out {cfg.out} --stage pretrain` first")
    if not todo and rank == 0:
        print(f"{ckpt_path}: every stage asked for has finished")
    for stage in todo:
        state = train_stage(cfg, stage, state, unet, encoder, preset, ae_state, rows, images, latents, train_idx,
                            val_idx, rank, world, device, init_seed)
        if state is None:  # interrupted
            break
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def train_stage(cfg, stage, state, unet, encoder, preset, ae_state, rows, images, latents, train_idx, val_idx,
                rank, world, device, init_seed):
    """One stage, resumable. Returns the finished state, or None when stopped by a signal."""
    ckpt_path = Path(cfg.out) / "ldae.pt"
    diffusion = ldae.Diffusion()
    resuming = state is not None and state["stage"] == stage and not state["finished"]
    if stage == "repr":
        if not resuming:  # start from the EMA weights of stage 2a (METHOD 3)
            unet.load_state_dict(state["unet_ema"])
        unet.freeze_eps_theta()
        for module in unet.estimator_modules():  # stage 2a froze them when it ran in this process
            module.requires_grad_(True)
        trainable = [p for p in unet.parameters() if p.requires_grad] + list(encoder.parameters())
        batch_size, accumulate, lr = cfg.repr_batch_size, cfg.repr_accumulate, cfg.repr_lr
        epochs, steps = cfg.repr_epochs, cfg.repr_steps
    else:
        for module in unet.estimator_modules():  # unused in 2a; DDP must not wait for their gradients
            module.requires_grad_(False)
        trainable = [p for p in unet.parameters() if p.requires_grad]
        batch_size, accumulate, lr = cfg.batch_size, cfg.accumulate, cfg.lr
        epochs, steps = cfg.pretrain_epochs, cfg.pretrain_steps
    amp_ctx, amp_dtype = ldae.autocast(device, cfg.amp)
    # Stage 2b's backward through the frozen eps_theta crashes in channels_last_3d: it keeps the default layout.
    layout = ldae.memory_format(device, amp_dtype) if stage == "pretrain" else torch.contiguous_format
    unet.to(memory_format=layout)
    unet_ema, encoder_ema = copy.deepcopy(unet).eval(), copy.deepcopy(encoder).eval()
    decoder = preset.autoencoder().to(device).eval()  # for the validation reconstructions
    decoder.load_state_dict(ae_state["model"])
    opt = torch.optim.Adam(trainable, lr=lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    step, validation = 0, None  # the latest validation figures
    best = None  # stage 2a: the EMA weights of the lowest validation loss so far, with their step and loss
    if resuming:
        unet_ema.load_state_dict(state["unet_ema"])
        encoder_ema.load_state_dict(state["encoder_ema"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step, validation, best = state["step"], state.get("validation"), state.get("best")
    wrap = lambda m: torch.nn.parallel.DistributedDataParallel(m) if world > 1 else m
    unet_run = wrap(unet)
    encoder_run = wrap(encoder) if stage == "repr" else encoder
    per_step = batch_size * accumulate * world
    steps_per_epoch = max(1, len(train_idx) // per_step)
    total = cfg.steps or steps or epochs * steps_per_epoch
    val_every = max(steps_per_epoch * cfg.val_every, total // 12)  # on a small cohort, epochs are a few steps
    latent_mean, latent_scale = ae_state["latent_mean"], ae_state["latent_scale"]
    # --t-sampling code: stage 2b draws half its timesteps where a perfect code would save the most and weights each
    # by 1 / (T p_t): METHOD 4's objective, with more of each step's draws where y_sem matters (docs/design.md).
    t_probs = None
    if stage == "repr" and cfg.t_sampling == "code":
        t_probs = diffusion.code_focused_t(latents[train_idx]).to(device)
    if cfg.oracle and cfg.oracle_columns:
        measured = measured_code(rows, cfg.oracle_columns.split(","), train_idx, preset.y_dim)
        code = lambda ids, enc: measured[ids].to(device)
    elif cfg.oracle:
        oracle = oracle_code(latents, train_idx, preset.y_dim)
        code = lambda ids, enc: oracle(latents[ids]).to(device)
    else:
        code = lambda ids, enc: enc(torch.tensor(images[ids]).to(device))

    def checkpoint(finished=False):
        if rank == 0:
            ldae.save_checkpoint({
                "stage": stage, "finished": finished,
                "unet": unet.state_dict(), "unet_ema": unet_ema.state_dict(), "encoder": encoder.state_dict(),
                "encoder_ema": encoder_ema.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                "step": step, "validation": validation, "best": best, "config": asdict(cfg), "init_seed": init_seed,
                "preset": ae_state["config"]["preset"],
                "latent_scale": latent_scale}, ckpt_path)

    stop = []  # Ctrl-C or SIGTERM end the current step, then save and exit
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _: stop.append(signal.Signals(signum).name))
    name = "stage 2a latent DDPM" if stage == "pretrain" else "stage 2b representation"
    bar = tqdm(total=total, initial=step, desc=name, disable=rank != 0)
    log = ldae.TrainingLog(Path(cfg.out) / "log.csv", stage, step, steps_per_epoch, enabled=rank == 0)
    t0, first, running = time.time(), step, None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    while step < total and not stop:
        step_start = time.time()
        ldae.step_seed(cfg.seed, step, rank)
        epoch, k = divmod(step, steps_per_epoch)
        order = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        batch_ids = order[k * per_step:(k + 1) * per_step][rank::world].tolist()
        total_loss = 0.0
        for micro in range(accumulate):
            ids = [train_idx[i] for i in batch_ids[micro * batch_size:(micro + 1) * batch_size]]
            z0 = latents[ids].to(device, memory_format=layout)
            with amp_ctx:
                if stage == "pretrain":
                    loss = diffusion.pretrain_loss(unet_run, z0)
                else:
                    loss = diffusion.repr_loss(unet_run, code(ids, encoder_run), z0, t_probs)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {step} of {name}: the last good "
                                         f"checkpoint {ckpt_path} is kept; lower --lr or use --amp off")
            scaler.scale(loss / accumulate).backward()
            total_loss += loss.item() / accumulate
        for group in opt.param_groups:
            group["lr"] = ldae.learning_rate(lr, step, total)
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(trainable, cfg.clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        ldae.update_ema(unet_ema, unet, cfg.ema, step)
        ldae.update_ema(encoder_ema, encoder, cfg.ema, step)
        step += 1
        log.train_step(step, total_loss, opt.param_groups[0]["lr"], time.time() - step_start)
        running = total_loss if running is None else 0.95 * running + 0.05 * total_loss
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}")
        validating = rank == 0 and val_idx and (step == total or step % val_every == 0)
        if stage == "pretrain" and validating:
            torch.manual_seed(0)
            with torch.no_grad():
                z0 = latents[val_idx].to(device, memory_format=layout)
                loss = sum(diffusion.pretrain_loss(unet_ema, z0).item() for _ in range(16)) / 16
            log.write(step, val_loss=loss)
            bar.write(f"epoch {step / steps_per_epoch:.4g}: validation loss {loss:.5f}")
            validation = {"step": step, "loss": loss}
            if best is None or loss < best["loss"]:
                best = {"step": step, "loss": loss, "unet_ema": copy.deepcopy(unet_ema.state_dict())}
        if stage == "repr" and validating:
            if not cfg.oracle:
                refresh_standardisation(encoder_ema, images, train_idx, batch_size, device)
            with torch.no_grad():
                y_sem = code(val_idx, encoder_ema)
            loss, other, off, ssim = validate(diffusion, unet_ema, y_sem, decoder, (latent_mean, latent_scale),
                                              images, latents, val_idx, cfg, device)
            validation = {"step": step, "loss": loss, "other_subject_loss": other, "estimator_off_loss": off,
                          "ssim": ssim}
            spread = ldae.spread_of(y_sem)
            log.write(step, val_loss=loss, val_other_subject_loss=other, val_ssim=ssim,
                      **{f"y_sem_{k}": v for k, v in (spread or {}).items()})
            spread = "" if spread is None else ("y_sem spread {spread:.4f} of magnitude {magnitude:.4f}, effective "
                                                "rank {effective_rank:.2f}; ".format(**spread))
            bar.write(f"epoch {step / steps_per_epoch:.4g}: validation loss {loss:.5f} (another subject's y_sem: "
                      f"{other:.5f}, {1 - loss / other:+.1%}; estimator off: {off:.5f}), {spread}reconstruction SSIM "
                      f"({cfg.val_steps} DDIM steps) {ssim:.4f}")
        if step % cfg.save_every == 0:
            checkpoint()
    bar.close()
    if stop:
        checkpoint()
        print(f"{stop[0]}: saved {ckpt_path} at step {step} of {name}; continue with --resume")
        return None
    refitted = validation is not None and validation["step"] == step  # the last validation did it already
    if stage == "repr" and not cfg.oracle and not refitted:  # the last EMA weights are kept, with fitting statistics
        refresh_standardisation(encoder_ema, images, train_idx, batch_size, device)
    if stage == "pretrain" and best is not None and best["loss"] < 0.99 * validation["loss"]:  # fitted its scans
        unet_ema.load_state_dict(best["unet_ema"])
        print(f"stage 2a keeps its EMA weights of step {best['step']}, the lowest validation loss ({best['loss']:.5f}, "
              f"against {validation['loss']:.5f} at its last step)")
    if stage == "pretrain" and world > 1:  # only rank 0 validates: every process takes the weights it kept
        for tensor in unet_ema.state_dict().values():
            dist.broadcast(tensor, 0)
    checkpoint(finished=True)
    if rank == 0:
        print(f"{name}: {ldae.run_summary(step - first, time.time() - t0, device)}; wrote {ckpt_path}")
    return {"stage": stage, "finished": True, "unet_ema": unet_ema.state_dict()}


@torch.no_grad()
def refresh_standardisation(encoder, images, indices, batch_size, device, scans=128):
    """Recompute the running mean and variance of the encoder's output standardisation for these (EMA) weights
    over `scans` training scans. update_ema copies the live model's statistics, which do not fit the averaged
    weights: y_sem came out 1.1-1.6 in magnitude instead of ~0.8 and the validation loss rose."""
    norm = encoder.standardise
    norm.reset_running_stats()
    norm.momentum, norm.training = None, True  # a plain average over the batches below
    for start in range(0, min(scans, len(indices)), batch_size):
        encoder(torch.tensor(images[indices[start:start + batch_size]]).to(device))
    norm.momentum, norm.training = 0.1, False


def oracle_code(latents, train_idx, dim):
    """The diagnostic code of --oracle: latent -> its first `dim` principal components over the training latents,
    z-scored. It knows the scan as well as a linear code of that size can: an estimator that does not use it
    cannot use an encoder's y_sem either."""
    flat = latents[train_idx].flatten(1).double()
    mean = flat.mean(0)
    _, _, v = torch.linalg.svd(flat - mean, full_matrices=False)
    components = v[:min(dim, len(train_idx) - 1)]  # (k, latent elements); N scans span N - 1 directions
    std = ((flat - mean) @ components.T).std(0)
    pad = dim - len(components)  # code dimensions with nothing to say, when there are too few scans
    return lambda z0: F.pad(((z0.flatten(1).double() - mean) @ components.T) / std, (0, pad)).float()


def measured_code(rows, columns, train_idx, dim):
    """The code of --oracle-columns: each scan's values in the named participants-table columns, z-scored over
    the training scans, zero-padded to `dim` (N, dim). With a cohort's measured sizes, stage 2b's validation gap
    says how much the loss pays for knowing them (docs/results.md)."""
    if len(columns) > dim:
        raise SystemExit(f"--oracle-columns: {len(columns)} columns, but y_sem has only {dim} dimensions")
    values = torch.empty(len(rows), len(columns), dtype=torch.float64)
    for i, row in enumerate(rows):
        for j, column in enumerate(columns):
            try:
                values[i, j] = float(row[column])
            except (KeyError, TypeError, ValueError):
                raise SystemExit(f"--oracle-columns: {row['path']}: no number in column {column!r} (it holds "
                                 f"{row.get(column)!r})") from None
    train = values[train_idx]
    std = train.std(0)
    if not (std > 0).all():
        flat = [c for c, s in zip(columns, std) if not s > 0]
        raise SystemExit(f"--oracle-columns: {', '.join(flat)} does not vary over the training scans")
    return F.pad((values - train.mean(0)) / std, (0, dim - len(columns))).float()


@torch.no_grad()
def validate(diffusion, unet, y_sem, ae, latent_stats, images, latents, indices, cfg, device):
    """(loss, loss with another subject's y_sem, loss with the estimator off, SSIM) on the validation scans, one
    per subject. The loss is stage 2b's own objective with the same timesteps and noise at every call (4 draws per
    scan), so calls compare like for like. The second loss rolls y_sem by one scan: the gap between the two is what
    the estimator takes from y_sem. The third is eps_theta's alone (the same at every call, eps_theta being frozen;
    four network calls, not worth keeping aside): below it, the estimator's correction helps on scans it never
    trained on. Nothing is picked by these figures: the run keeps its last EMA weights. Picking the
    lowest loss kept the second of 8 epochs on the demo (own loss flat within noise while the gap grew from 1% to
    4%), and METHOD 4's best SSIM measures the autoencoder and the inversion more than y_sem.
    METHOD 4 picks by reconstruction SSIM, but with DDIM-encoded z_T that is bounded by the autoencoder and
    hardly moves with y_sem (0.825 vs 0.827 with the estimator off, 50 steps), while a few steps mostly measure
    inversion error, which grows as the estimator learns (0.614 vs 0.639 at 10 steps). The SSIM (x against
    its reconstruction from y_sem and the DDIM-encoded z_T, cfg.val_steps steps) is printed as the figure."""
    x, z0 = torch.tensor(images[indices]).to(device), latents[indices].to(device)
    losses = []
    for y in (y_sem, y_sem.roll(1, 0), None):
        torch.manual_seed(0)  # training reseeds every step (step_seed)
        losses.append(sum(diffusion.repr_loss(unet, y, z0).item() for _ in range(4)) / 4)
    z_T = diffusion.ddim_encode(unet, z0, y_sem, cfg.val_steps)
    x_hat = ae.decode(ldae.unscale_latent(diffusion.ddim_sample(unet, z_T, y_sem, cfg.val_steps), *latent_stats))
    return *losses, ldae.ssim3d(x_hat, x).mean().item()


if __name__ == "__main__":
    try:
        main(ldae.parse_config(Config))
    except (data.DataError, ldae.CheckpointError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}")
