"""Training stages end to end on the tiny preset: full runs, exact resume, frozen eps_theta in stage 2b,
two processes, safe checkpoints, and a NaN loss that stops the run."""

import csv
import dataclasses
import json
import os
import re
import signal
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ldae  # noqa: E402
from conftest import AE_FLAGS, AE_KEYS, AE_STEPS, LDAE_FLAGS, LDAE_STEPS, assert_identical, load, run_cli, \
    run_script  # noqa: E402
from train_ldae import measured_code  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def interrupt_on_step_call(monkeypatch, n):
    """SIGTERM this process as the n-th training step begins (counted over ldae.step_seed calls): the
    scripts finish that step, save and return, exactly as for Ctrl-C or a cluster's preemption notice."""
    calls = []
    real = ldae.step_seed

    def step_seed(seed, step, rank):
        calls.append(step)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGTERM)
        real(seed, step, rank)

    monkeypatch.setattr(ldae, "step_seed", step_seed)
    return calls


LDAE_KEYS = ("stage", "finished", "unet", "unet_ema", "encoder", "encoder_ema", "optimizer", "scaler", "step",
             "validation", "latent_scale")


# ----------------------------------------------------------------------------- full runs

def test_tiny_runs_of_both_stages_write_checkpoints_that_load_with_weights_only(ae_run, ldae_run):
    ae = load(ae_run / "ae.pt")
    assert ae["step"] == AE_STEPS and ae["config"]["preset"] == "tiny"
    assert 0 < ae["latent_scale"] < float("inf")
    assert load(ae_run / "ae.prev.pt")["step"] == AE_STEPS  # the periodic save before the final one
    assert set(json.loads((ae_run / "split.json").read_text()).values()) == {"train", "val", "test"}
    assert (ae_run / "images.npy").exists() and (ae_run / "latents.pt").exists()
    # --adv-start 0.2 epochs: a warm-up without the discriminator, then a few adversarial steps.
    assert 0 < ae["optimizer_d"]["state"][0]["step"] < AE_STEPS

    state = load(ldae_run / "ldae.pt")
    assert state["stage"] == "repr" and state["finished"] and state["step"] == LDAE_STEPS
    assert state["preset"] == "tiny" and state["latent_scale"] == ae["latent_scale"]
    assert all(torch.isfinite(t).all() for t in state["unet_ema"].values())
    # Stage 2b ran in the same process as 2a and still trained the estimator, whose head starts at zero.
    assert state["unet"]["estimator.head.2.weight"].abs().max() > 0


# ----------------------------------------------------------------------------- exact resume

def test_stage_1_interrupted_then_resumed_equals_the_uninterrupted_run(ae_run, cohort, tmp_path, monkeypatch):
    run, real_step_seed = tmp_path / "run", ldae.step_seed
    calls = interrupt_on_step_call(monkeypatch, 3)
    assert run_cli("train_ae.py", "--data", cohort, "--out", run, *AE_FLAGS) == (0, "")
    stopped = load(run / "ae.pt")
    assert calls == [0, 1, 2] and stopped["step"] == 3 and "latent_scale" not in stopped

    monkeypatch.setattr(ldae, "step_seed", real_step_seed)
    assert run_cli("train_ae.py", "--data", cohort, "--out", run, *AE_FLAGS, "--resume") == (0, "")
    resumed, one_go = load(run / "ae.pt"), load(ae_run / "ae.pt")
    for key in AE_KEYS:
        assert_identical(resumed[key], one_go[key], key)


def test_stage_2_interrupted_in_each_stage_then_resumed_equals_the_uninterrupted_run(ldae_run, ae_run, copy_run,
                                                                                    monkeypatch):
    run = copy_run(ae_run)
    real_step_seed = ldae.step_seed
    interrupt_on_step_call(monkeypatch, 2)  # during stage 2a step 1
    assert run_cli("train_ldae.py", "--out", run, *LDAE_FLAGS) == (0, "")
    state = load(run / "ldae.pt")
    assert (state["stage"], state["finished"], state["step"]) == ("pretrain", False, 2)

    monkeypatch.setattr(ldae, "step_seed", real_step_seed)
    interrupt_on_step_call(monkeypatch, 3)  # 2a step 2, 2b step 0, then during 2b step 1
    assert run_cli("train_ldae.py", "--out", run, *LDAE_FLAGS, "--resume") == (0, "")
    state = load(run / "ldae.pt")
    assert (state["stage"], state["finished"], state["step"]) == ("repr", False, 2)

    monkeypatch.setattr(ldae, "step_seed", real_step_seed)
    assert run_cli("train_ldae.py", "--out", run, *LDAE_FLAGS, "--resume") == (0, "")
    resumed, one_go = load(run / "ldae.pt"), load(ldae_run / "ldae.pt")
    for key in LDAE_KEYS:
        assert_identical(resumed[key], one_go[key], key)


@pytest.mark.parametrize("t_sampling", ["uniform", "code"])
def test_stage_2b_leaves_eps_theta_at_the_stage_2a_ema_weights(ae_run, copy_run, t_sampling):
    run = copy_run(ae_run)
    assert run_cli("train_ldae.py", "--out", run, "--stage", "pretrain", *LDAE_FLAGS) == (0, "")
    pretrained = load(run / "ldae.pt")
    assert pretrained["stage"] == "pretrain" and pretrained["finished"]
    assert run_cli("train_ldae.py", "--out", run, "--stage", "repr", "--t-sampling", t_sampling, *LDAE_FLAGS) == (0, "")
    trained = load(run / "ldae.pt")
    assert trained["stage"] == "repr" and trained["finished"] and trained["config"]["t_sampling"] == t_sampling

    ema = pretrained["unet_ema"]
    eps_theta = [k for k in ema if not k.startswith(("estimator.", "y_"))]
    estimator = [k for k in ema if k.startswith("estimator.")]
    assert eps_theta and estimator
    for key in eps_theta:
        assert torch.equal(trained["unet"][key], ema[key]), key
        assert torch.equal(trained["unet_ema"][key], ema[key]), key
    assert any(not torch.equal(trained["unet"][k], ema[k]) for k in estimator), "stage 2b trained nothing"


def test_oracle_diagnostic_trains_the_estimator_on_the_latent_code_and_leaves_the_encoder(ae_run, copy_run):
    run = copy_run(ae_run)
    assert run_cli("train_ldae.py", "--out", run, "--stage", "pretrain", *LDAE_FLAGS) == (0, "")
    pretrained = load(run / "ldae.pt")
    assert run_cli("train_ldae.py", "--out", run, "--stage", "repr", "--oracle", *LDAE_FLAGS) == (0, "")
    state = load(run / "ldae.pt")
    assert state["config"]["oracle"] and state["finished"]
    assert all(torch.equal(v, pretrained["encoder"][k]) for k, v in state["encoder"].items())
    assert not torch.equal(state["unet"]["y_latent.weight"], pretrained["unet"]["y_latent.weight"])


def test_oracle_columns_train_the_estimator_on_the_cohorts_measured_sizes(ae_run, copy_run):
    run = copy_run(ae_run)
    assert run_cli("train_ldae.py", "--out", run, "--stage", "pretrain", *LDAE_FLAGS) == (0, "")
    pretrained = load(run / "ldae.pt")
    code, message = run_cli("train_ldae.py", "--out", run, "--stage", "repr", "--oracle-columns", "ventricle_ml",
                            *LDAE_FLAGS)
    assert code == 1 and "pass --oracle with it" in message
    code, message = run_cli("train_ldae.py", "--out", run, "--stage", "repr", "--oracle", "--oracle-columns",
                            "ventricle_ml,no_such_column", *LDAE_FLAGS)
    assert code == 1 and "no number in column 'no_such_column'" in message and "T1w.nii.gz" in message
    assert run_cli("train_ldae.py", "--out", run, "--stage", "repr", "--oracle", "--oracle-columns",
                   "ventricle_ml,cortex_thickness_mm", *LDAE_FLAGS) == (0, "")
    state = load(run / "ldae.pt")
    assert state["config"]["oracle_columns"] == "ventricle_ml,cortex_thickness_mm" and state["finished"]
    assert all(torch.equal(v, pretrained["encoder"][k]) for k, v in state["encoder"].items())
    assert not torch.equal(state["unet"]["y_latent.weight"], pretrained["unet"]["y_latent.weight"])


def test_measured_code_is_z_scored_over_the_training_scans_and_padded():
    rows = [dict(path=f"s{i}.nii.gz", size=str(2.0 * i), other=str(i * i)) for i in range(5)]
    code = measured_code(rows, ["size", "other"], [0, 1, 2], dim=4)
    assert code.shape == (5, 4) and torch.equal(code[:, 2:], torch.zeros(5, 2))
    assert torch.allclose(code[[0, 1, 2], :2].mean(0), torch.zeros(2), atol=1e-6)
    assert torch.allclose(code[[0, 1, 2], :2].std(0), torch.ones(2))
    assert code[4, 0].item() == pytest.approx(3.0)  # (8 - 2) / 2: scans outside the training split use its mean and std
    rows[3]["size"] = "n/a"
    with pytest.raises(SystemExit, match=r"s3.nii.gz: no number in column 'size'"):
        measured_code(rows, ["size"], [0, 1, 2], dim=4)
    with pytest.raises(SystemExit, match="other does not vary"):
        measured_code([dict(path="a", other="1"), dict(path="b", other="1")], ["other"], [0, 1], dim=4)


def test_stage_2b_keeps_its_last_ema_weights_with_standardisation_fitted_to_them(ae_run, copy_run):
    run = copy_run(ae_run)
    assert run_cli("train_ldae.py", "--out", run, "--stage", "pretrain", *LDAE_FLAGS) == (0, "")
    assert run_cli("train_ldae.py", "--out", run, "--stage", "repr", *LDAE_FLAGS) == (0, "")
    state = load(run / "ldae.pt")
    assert state["finished"] and state["step"] == LDAE_STEPS
    assert state["validation"]["step"] == LDAE_STEPS and 0 < state["validation"]["ssim"] <= 1
    assert state["validation"]["loss"] > 0 and state["validation"]["other_subject_loss"] > 0
    last = load(run / "ldae.prev.pt")  # the periodic save after the last step: the final weights are the last ones
    assert last["step"] == LDAE_STEPS
    for key in ("unet_ema", "encoder_ema"):
        assert all(torch.equal(v, last[key][k]) for k, v in state[key].items()), key
    mean = "standardise.running_mean"  # update_ema copies the live encoder's statistics; the EMA's own replace them
    assert not torch.equal(state["encoder_ema"][mean], state["encoder"][mean])


# ----------------------------------------------------------------------------- processes and checkpoints

def test_stage_2b_validates_every_val_every_epochs_and_at_its_last_step(ae_run, copy_run):
    run = copy_run(ae_run)
    assert run_cli("train_ldae.py", "--out", run, "--stage", "pretrain", *LDAE_FLAGS) == (0, "")
    assert run_cli("train_ldae.py", "--out", run, "--stage", "repr", "--steps", "9", "--val-every", "2",
                   "--val-steps", "2") == (0, "")
    with open(run / "log.csv") as f:
        validations = [r for r in csv.DictReader(f) if r["stage"] == "repr" and r["val_loss"]]
    per_epoch = round(int(validations[0]["step"]) / float(validations[0]["epoch"]))
    assert 2 * per_epoch < 9, "the cohort must give two validations before the last step"
    assert [int(r["step"]) for r in validations] == [s for s in range(1, 10) if s % (2 * per_epoch) == 0 or s == 9]


def test_stage_2a_keeps_the_ema_weights_of_its_lowest_validation_loss(ae_run, copy_run, monkeypatch):
    """Validation losses scripted per validation (steps 1, 2, 3): with the lowest at step 2, the finished stage 2a
    holds exactly the EMA weights of a run stopped at step 2; with the lowest last, or less than 1% below the
    last, its last ones."""
    real = ldae.Diffusion.pretrain_loss

    def run_with(val_losses, steps):
        calls = []

        def pretrain_loss(self, unet, z0):
            if torch.is_grad_enabled():  # a training step
                return real(self, unet, z0)
            calls.append(1)  # validation averages 16 draws
            return torch.tensor(val_losses[(len(calls) - 1) // 16])

        monkeypatch.setattr(ldae.Diffusion, "pretrain_loss", pretrain_loss)
        run = copy_run(ae_run, f"run{len(val_losses)}{val_losses[1]}{steps}")
        assert run_cli("train_ldae.py", "--out", run, "--stage", "pretrain", "--steps", steps, "--val-every",
                       "1") == (0, "")
        return load(run / "ldae.pt")

    falling, dipping, stopped = run_with([3.0, 2.0, 1.0], 3), run_with([3.0, 1.0, 2.0], 3), run_with([3.0, 2.0], 2)
    flat = run_with([3.0, 1.995, 2.0], 3)
    assert falling["best"]["step"] == 3 and dipping["best"]["step"] == 2 and flat["best"]["step"] == 2
    assert_identical(flat["unet_ema"], falling["unet_ema"])
    assert_identical(dipping["unet_ema"], stopped["unet_ema"])
    assert_identical(falling["unet_ema"], falling["best"]["unet_ema"])
    assert not all(torch.equal(v, dipping["unet_ema"][k]) for k, v in falling["unet_ema"].items())
    assert_identical(dipping["unet"], falling["unet"])  # training itself is the same; only the kept EMA differs


def test_stage_2b_run_with_another_seed_keeps_the_seed_of_its_random_start(ae_run, copy_run):
    """Stage 2b starts from stage 2a's networks, so the untrained-encoder baseline is drawn with 2a's seed."""
    from evaluate import Config, open_run, untrained_encoder

    run = copy_run(ae_run)
    assert run_cli("train_ldae.py", "--out", run, "--stage", "pretrain", *LDAE_FLAGS) == (0, "")
    start = load(run / "ldae.pt")["encoder"]
    assert run_cli("train_ldae.py", "--out", run, "--stage", "repr", "--seed", "1", *LDAE_FLAGS) == (0, "")
    assert load(run / "ldae.pt")["init_seed"] == 0
    rebuilt = untrained_encoder(open_run(Config(out=str(run)))).state_dict()
    assert all(torch.equal(v, start[k]) for k, v in rebuilt.items())


def test_stage_2b_draws_the_presets_encoder_when_stage_2a_ran_with_another(ae_run, copy_run, monkeypatch):
    """Stage 2a trained under the slice encoder, then the preset switched to its 3D CNN: stage 2b starts that
    encoder from the run's seed instead of refusing stage 2a's stored, untrained one."""
    run, tiny = copy_run(ae_run), ldae.PRESETS["tiny"]
    monkeypatch.setitem(ldae.PRESETS, "tiny", dataclasses.replace(tiny, encoder_volume=()))
    assert run_cli("train_ldae.py", "--out", run, "--stage", "pretrain", *LDAE_FLAGS) == (0, "")
    slices = load(run / "ldae.pt")["encoder"]
    monkeypatch.setitem(ldae.PRESETS, "tiny", tiny)
    with pytest.raises(ldae.CheckpointError):
        ldae.load_weights(tiny.encoder(), slices, run / "ldae.pt", "semantic encoder")
    assert run_cli("train_ldae.py", "--out", run, "--stage", "repr", *LDAE_FLAGS) == (0, "")
    state = load(run / "ldae.pt")
    assert state["stage"] == "repr" and state["finished"]
    ldae.load_weights(tiny.encoder(), state["encoder"], run / "ldae.pt", "semantic encoder")


def test_two_process_gloo_run_writes_a_loadable_checkpoint(cohort, tmp_path):
    run = tmp_path / "run"
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_ae.py",
                        "--data", cohort, "--out", run, "--preset", "tiny", "--steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    state = load(run / "ae.pt")
    assert state["step"] == 2 and state["latent_scale"] > 0
    assert all(torch.isfinite(t).all() for t in state["model"].values())


class Killed(BaseException):
    """Stands for SIGKILL: nothing in save_checkpoint gets to clean up after it."""


def test_second_save_keeps_the_first_as_prev(tmp_path):
    path = tmp_path / "ae.pt"
    ldae.save_checkpoint({"step": 1}, path)
    ldae.save_checkpoint({"step": 2}, path)
    assert load(path)["step"] == 2 and load(tmp_path / "ae.prev.pt")["step"] == 1
    assert not (tmp_path / "ae.pt.tmp").exists()


@pytest.mark.parametrize("moment", ["half way through writing", "before keeping the old one as prev",
                                    "before the new one takes its place"])
def test_a_kill_inside_save_leaves_a_loadable_checkpoint(tmp_path, monkeypatch, moment):
    path = tmp_path / "ae.pt"
    ldae.save_checkpoint({"step": 1, "w": torch.arange(1000.0)}, path)
    if moment == "half way through writing":
        def torch_save(state, f):
            f.write(b"PK\x03\x04 half a zip")
            raise Killed
        monkeypatch.setattr(torch, "save", torch_save)
    else:
        def killed(*args):
            raise Killed
        monkeypatch.setattr(os, "link" if moment == "before keeping the old one as prev" else "replace", killed)
    with pytest.raises(Killed):
        ldae.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()

    assert torch.equal(ldae.load_checkpoint(path, fallback=True)["w"], torch.arange(1000.0))
    ldae.save_checkpoint({"step": 3}, path)  # a leftover temp file does not get in the way
    assert ldae.load_checkpoint(path)["step"] == 3


# ----------------------------------------------------------------------------- a NaN loss

def test_nan_loss_from_a_huge_learning_rate_stops_with_the_step(cohort, tmp_path):
    run = tmp_path / "run"
    code, message = run_cli("train_ae.py", "--data", cohort, "--out", run, "--preset", "tiny", "--steps", "4",
                            "--save-every", "1", "--lr", "1e30", "--amp", "off")
    step = re.search(r"loss is nan at step (\d+)", message)
    assert code == 1 and step and f"last good checkpoint {run / 'ae.pt'} is kept" in message
    assert load(run / "ae.pt")["step"] == int(step[1])  # saved after every step: the one before the NaN


def test_nan_loss_stops_stage_1_and_keeps_the_last_good_checkpoint(cohort, tmp_path, monkeypatch):
    run, real_ssim = tmp_path / "run", ldae.ssim3d
    steps = interrupt_on_step_call(monkeypatch, 0)  # only records the step
    monkeypatch.setattr(ldae, "ssim3d", lambda *a, **k: real_ssim(*a, **k) * (float("nan") if steps[-1] == 2 else 1))
    code, message = run_cli("train_ae.py", "--data", cohort, "--out", run, *AE_FLAGS)
    assert code == 1 and "loss is nan at step 2" in message and "last good checkpoint" in message
    state = load(run / "ae.pt")
    assert state["step"] == 2 and all(torch.isfinite(t).all() for t in state["model"].values())


def test_nan_loss_stops_stage_2a_and_names_the_step(ae_run, copy_run, monkeypatch):
    run, real_loss = copy_run(ae_run), ldae.Diffusion.pretrain_loss
    steps = interrupt_on_step_call(monkeypatch, 0)
    monkeypatch.setattr(ldae.Diffusion, "pretrain_loss",
                        lambda self, *a: real_loss(self, *a) * (float("nan") if steps[-1] == 1 else 1))
    code, message = run_cli("train_ldae.py", "--out", run, *LDAE_FLAGS)
    assert code == 1 and "loss is nan at step 1 of stage 2a" in message
    assert load(run / "ldae.pt")["step"] == 1
