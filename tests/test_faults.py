"""Nothing lost, nothing trusted blindly: crafted and damaged checkpoints, kill -9 at random moments,
bad scans and tables through the training entry point, requests the run cannot serve, a full disk."""

import csv
import dataclasses
import errno
import gzip
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ldae  # noqa: E402
from conftest import AE_FLAGS, AE_KEYS, ONE_THREAD, REPO, assert_identical, load, run_cli, \
    run_script  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def files_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


# ----------------------------------------------------------------------------- crafted and damaged checkpoints

class RunsCodeWhenUnpickled:
    """A checkpoint entry whose unpickling would create `marker` (any code could stand there)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def write_crafted_checkpoint(path, marker):
    torch.save({"model": RunsCodeWhenUnpickled(marker), "step": 1}, path)


def test_crafted_checkpoint_is_refused_without_running_its_code(tmp_path):
    path, marker = tmp_path / "ae.pt", tmp_path / "marker"
    write_crafted_checkpoint(path, marker)
    torch.load(path, weights_only=False)  # the payload is live: a plain unpickler runs it
    assert marker.exists()
    marker.unlink()

    with pytest.raises(ldae.CheckpointError, match="not a loadable checkpoint") as error:
        ldae.load_checkpoint(path)
    assert str(path) in str(error.value) and not marker.exists()


@pytest.mark.parametrize("damage", ["crafted to run code", "truncated"])
def test_train_ldae_refuses_a_bad_ae_pt_with_one_line_naming_it(damage, ae_run, tmp_path):
    run, marker = tmp_path / "run", tmp_path / "marker"
    run.mkdir()
    if damage == "truncated":
        good = (ae_run / "ae.pt").read_bytes()
        (run / "ae.pt").write_bytes(good[:len(good) // 2])
    else:
        write_crafted_checkpoint(run / "ae.pt", marker)
    result = run_script("train_ldae.py", "--out", run)
    assert result.returncode != 0
    assert f"error: {run / 'ae.pt'}: not a loadable checkpoint" in result.stderr
    assert "Traceback" not in result.stderr and not marker.exists()


def test_resume_with_a_damaged_last_checkpoint_falls_back_to_prev_and_says_so(ae_run, copy_run, capsys):
    run = copy_run(ae_run)
    good = (run / "ae.pt").read_bytes()
    (run / "ae.pt").write_bytes(good[:len(good) // 3])
    assert run_cli("train_ae.py", "--out", run, "--resume") == (0, "")
    out = capsys.readouterr().out
    assert f"resuming from the previous checkpoint {run / 'ae.prev.pt'}" in out and f"{run / 'ae.pt'}" in out
    resumed, original = load(run / "ae.pt"), load(ae_run / "ae.pt")
    assert resumed["step"] == original["step"] and resumed["latent_scale"] == original["latent_scale"]
    assert all(torch.equal(resumed["model"][k], v) for k, v in original["model"].items())


# ----------------------------------------------------------------------------- kill -9

def mtime(path):
    return path.stat().st_mtime_ns if path.exists() else None


def test_kill_9_at_random_moments_then_resume_gives_the_uninterrupted_weights(cohort, tmp_path):
    # 40 steps, not the shared run's 6: on a fast CPU 6 tiny steps ended before the first kill landed.
    run, rng, stopped_at = tmp_path / "run", random.Random(0), []
    flags = ("--data", str(cohort), *AE_FLAGS, "--steps", "40")  # the later --steps wins
    command = [sys.executable, "train_ae.py", "--out", str(run), *flags]
    for kill in range(3):
        before = mtime(run / "ae.pt")
        process = subprocess.Popen(command + ["--resume"] * (kill > 0), cwd=REPO, env={**os.environ, **ONE_THREAD},
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120  # wait for a save (a training step has run), then kill at a random moment
        while process.poll() is None and mtime(run / "ae.pt") == before and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        process.kill()
        process.wait()
        state = ldae.load_checkpoint(run / "ae.pt", fallback=True)  # every kill leaves one to resume from
        stopped_at.append(state["step"] if "latent_scale" not in state else "finished")
    print("steps saved when killed:", stopped_at)
    assert stopped_at[0] != "finished", "the first kill came too late to interrupt training"

    assert run_cli("train_ae.py", "--out", run, "--resume") == (0, "")
    assert run_script("train_ae.py", "--out", tmp_path / "one_go", *flags).returncode == 0
    resumed, one_go = load(run / "ae.pt"), load(tmp_path / "one_go" / "ae.pt")
    for key in AE_KEYS:
        assert_identical(resumed[key], one_go[key], key)


# ----------------------------------------------------------------------------- bad scans and tables

COLUMNS = ["subject", "session", "path", "diagnosis", "age", "months"]


def write_table(folder, rows, columns=COLUMNS):
    with open(folder / "participants.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_volume(path, array, spacing=8.0):
    nib.save(nib.Nifti1Image(array, np.diag([spacing] * 3 + [1.0])), str(path))
    return path


def good_rows(cohort, subjects):
    with open(cohort / "participants.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["subject"] in subjects]
    return [{**r, "path": str((cohort / r["path"]).resolve())} for r in rows]


def add_fault(fault, folder, rows, subject="sub-0900"):
    """(table rows, columns, the file the message must name, what it must say) with one fault added."""
    folder = folder.resolve()
    smooth = np.random.default_rng(0).random((20, 24, 20)).astype(np.float32)
    extra = dict(subject=subject, session="M00", diagnosis="CN", age="70", months="0")
    if fault == "missing column":
        return rows, [c for c in COLUMNS if c != "diagnosis"], folder / "participants.csv", "missing column"
    if fault == "duplicate session":
        return rows + [dict(rows[0])], COLUMNS, rows[0]["path"], "duplicate of subject"
    if fault == "missing file":
        path, says = folder / "gone.nii.gz", "file not found"
    elif fault == "NaN voxels":
        smooth[3, 4, 5] = np.nan
        path, says = write_volume(folder / "nan.nii.gz", smooth), "NaN"
    elif fault == "constant volume":
        path, says = write_volume(folder / "constant.nii.gz", np.full((20, 24, 20), 7, np.uint8)), "constant volume"
    elif fault == "truncated scan":
        path = write_volume(folder / "cut.nii.gz", smooth)
        path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:5000]))
        says = "unreadable or truncated"
    elif fault == "unknown diagnosis":
        path = Path(shutil.copy(rows[0]["path"], folder / "ftd.nii.gz"))
        extra["diagnosis"], says = "FTD", "unknown diagnosis 'FTD'"
    return rows + [{**extra, "path": str(path)}], COLUMNS, path, says


FAULTS = ["missing file", "NaN voxels", "constant volume", "truncated scan", "unknown diagnosis",
          "duplicate session", "missing column"]


@pytest.fixture(scope="module")
def good_run(cohort, tmp_path_factory, one_thread):
    """(data folder, finished run folder, table rows) of a tiny 1-step run on 3 subjects."""
    folder, run = tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("good") / "run"
    rows = good_rows(cohort, {"sub-0000", "sub-0001", "sub-0002"})
    write_table(folder, rows)
    assert run_cli("train_ae.py", "--data", folder, "--out", run, "--preset", "tiny", "--steps", "1") == (0, "")
    return folder, run, rows


@pytest.mark.parametrize("fault", FAULTS)
def test_bad_scan_or_table_stops_training_naming_the_file_and_writes_nothing(fault, good_run, tmp_path):
    folder, run, rows = good_run
    before = files_bytes(run)
    table = (folder / "participants.csv").read_text()
    try:
        table_rows, columns, named, says = add_fault(fault, folder, rows)
        write_table(folder, table_rows, columns)
        new = tmp_path / "new"
        code, message = run_cli("train_ae.py", "--data", folder, "--out", new, "--preset", "tiny", "--steps", "1")
        assert code == 1 and f"error: {named}: " in message and says in message
        assert not new.exists()  # every problem is found before the run folder is made
        # The same data behind an existing run: --resume stops before touching it.
        code, message = run_cli("train_ae.py", "--data", folder, "--out", run, "--resume", "--steps", "2")
        assert code == 1 and str(named) in message and says in message
    finally:
        (folder / "participants.csv").write_text(table)
    assert files_bytes(run) == before


def test_skip_bad_trains_on_the_rest_and_says_what_it_left_out(cohort, tmp_path, capsys):
    folder, run = tmp_path / "data", tmp_path / "run"
    folder.mkdir()
    rows = good_rows(cohort, {"sub-0000", "sub-0001"})
    table, left_out = rows, []
    for i, fault in enumerate(FAULTS[:-1]):  # every fault but the table's own
        table, _, named, says = add_fault(fault, folder, table, subject=f"sub-09{i:02d}")
        left_out.append((named, says))
    write_table(folder, table)
    assert run_cli("train_ae.py", "--data", folder, "--out", run, "--preset", "tiny", "--steps", "1",
                   "--skip-bad") == (0, "")
    out = capsys.readouterr().out
    for named, says in left_out:
        assert any(line.startswith(f"left out: {named}: ") and says in line for line in out.splitlines()), named
    assert load(run / "ae.pt")["step"] == 1
    assert np.load(run / "images.npy", mmap_mode="r").shape[0] == len(rows)


# ----------------------------------------------------------------------------- requests the run cannot serve

def test_scan_wider_than_the_preset_grid_is_refused_with_its_extent(cohort, tmp_path):
    folder, run = tmp_path / "data", tmp_path / "run"
    folder.mkdir()
    wide = np.random.default_rng(0).random((100, 40, 40)).astype(np.float32)
    path = write_volume(folder / "wide.nii.gz", wide, spacing=4.0)  # 400 mm along x; tiny covers 192 mm
    rows = good_rows(cohort, {"sub-0000"})
    write_table(folder, rows + [dict(rows[0], subject="sub-0900", path=str(path.resolve()))])
    code, message = run_cli("train_ae.py", "--data", folder, "--out", run, "--preset", "tiny", "--steps", "1")
    assert code == 1 and re.search(rf"{re.escape(str(path.resolve()))}: extent \d+ mm along axis x does not fit",
                                   message)
    assert not (run / "ae.pt").exists() and not (run / "images.npy.tmp").exists()


def test_train_ldae_before_stage_1_says_to_run_it(ae_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    code, message = run_cli("train_ldae.py", "--out", run)
    assert code == 1 and str(run / "ae.pt") in message and "train_ae.py" in message
    shutil.copy(ae_run / "ae.prev.pt", run / "ae.pt")  # a stage 1 stopped before its end
    code, message = run_cli("train_ldae.py", "--out", run)
    assert code == 1 and "stage 1 has not finished" in message and "train_ae.py" in message


def test_latents_of_changed_images_are_refused_until_stage_1s_end_reruns(ae_run, cohort, copy_run, tmp_path):
    run = copy_run(ae_run)
    moved = Path(shutil.copytree(cohort, tmp_path / "moved"))  # the same scans elsewhere: the image cache is rebuilt
    torch.save({**load(run / "ae.pt"), "data_dir": str(moved)}, run / "ae.pt")
    code, message = run_cli("train_ldae.py", "--out", run, "--stage", "pretrain", "--steps", "1")
    assert code == 1 and str(run / "latents.pt") in message and "encodes other images" in message
    assert "train_ae.py --resume" in message
    assert run_cli("train_ae.py", "--data", moved, "--out", run, "--resume", *AE_FLAGS) == (0, "")
    assert torch.equal(load(run / "latents.pt")["latents"], load(ae_run / "latents.pt")["latents"])
    assert run_cli("train_ldae.py", "--out", run, "--stage", "pretrain", "--steps", "1") == (0, "")


def test_train_ldae_refuses_an_unknown_t_sampling_naming_the_choices(tmp_path):
    code, message = run_cli("train_ldae.py", "--out", tmp_path, "--t-sampling", "random")
    assert code == 1 and "--t-sampling 'random'" in message and "code or uniform" in message


def test_resume_refuses_an_ldae_pt_made_for_another_preset(ldae_run, copy_run):
    run = copy_run(ldae_run)
    state = load(run / "ldae.pt")
    torch.save({**state, "preset": "cpu"}, run / "ldae.pt")
    code, message = run_cli("train_ldae.py", "--out", run, "--resume")
    assert code == 1 and f"{run / 'ldae.pt'} is for preset 'cpu'" in message and "'tiny'" in message


# ----------------------------------------------------------------------------- a full disk

@pytest.mark.parametrize("where,code", [("torch.save", errno.ENOSPC), ("torch.save", errno.EROFS),
                                        ("os.replace", errno.ENOSPC)])
def test_failed_save_says_why_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where, code):
    path = tmp_path / "ae.pt"
    ldae.save_checkpoint({"step": 1}, path)
    ldae.save_checkpoint({"step": 2}, path)
    failure = OSError(code, os.strerror(code))
    if where == "torch.save":
        def torch_save(state, f):
            f.write(b"PK\x03\x04")
            raise failure
        monkeypatch.setattr(torch, "save", torch_save)
    else:
        real_replace = os.replace

        def replace(src, dst):  # the new checkpoint cannot take the old one's place
            if Path(dst) == path:
                raise failure
            real_replace(src, dst)
        monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(ldae.CheckpointError) as error:
        ldae.save_checkpoint({"step": 3}, path)
    monkeypatch.undo()
    assert str(path) in str(error.value) and os.strerror(code) in str(error.value)
    assert "previous one is unchanged" in str(error.value)
    assert ldae.load_checkpoint(path)["step"] == 2 and not (tmp_path / "ae.pt.tmp").exists()


def test_disk_full_during_training_stops_with_the_reason_and_keeps_the_last_save(cohort, tmp_path, monkeypatch):
    run, real_save, saves = tmp_path / "run", torch.save, []

    def torch_save(state, f, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(state, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", torch_save)
    code, message = run_cli("train_ae.py", "--data", cohort, "--out", run, *AE_FLAGS)
    assert code == 1 and "could not save" in message and "No space left on device" in message
    monkeypatch.undo()
    assert load(run / "ae.pt")["step"] == 1


def test_weights_of_another_encoder_are_refused_with_the_file_name(tmp_path):
    """A checkpoint of the slice encoder (encoder_volume=()) loaded into a preset's 3D CNN encoder."""
    tiny = ldae.PRESETS["tiny"]
    slices = dataclasses.replace(tiny, encoder_volume=())
    message = r"ldae.pt: its semantic encoder does not fit this preset's networks"
    with pytest.raises(ldae.CheckpointError, match=message):
        ldae.load_weights(tiny.encoder(), slices.encoder().state_dict(), tmp_path / "ldae.pt", "semantic encoder")
