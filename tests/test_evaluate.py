"""evaluate.py end to end on the shared tiny run (conftest.py): every task through the command line."""
import json
import math
import shutil
import struct
import sys
import zlib
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import ldae  # noqa: E402
from conftest import load, run_script  # noqa: E402
from evaluate import Config, main, stage2b_loss_by_y_sem, write_png  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # the in-process calls: one thread, like the subprocesses

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(ldae_run, tmp_path_factory):
    """A private copy of the session's tiny finished run (conftest.py: 8 synthetic subjects, a few training
    steps). The networks are barely trained, so only the plumbing and the ranges of the numbers are checked."""
    run = tmp_path_factory.mktemp("evaluate") / "run"
    shutil.copytree(ldae_run, run)
    state = load(run / "ae.pt")
    test_rows = [r for r in data.read_table(state["data_dir"]) if state["split"][r["subject"]] == "test"]
    assert {"AD", "CN"} <= {r["diagnosis"] for r in test_rows}, "the shared cohort must have AD and CN in test"
    assert max(Counter(r["subject"] for r in test_rows).values()) >= 3, "a test subject needs 3 visits"
    return run


def evaluate(run, task, *args):
    result = run_script("evaluate.py", "--task", task, "--out", run, *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((run / "eval" / f"{task}.json").read_text())


def input_scan(run, subject, session):
    rows = data.read_table(load(run / "ae.pt")["data_dir"])
    return nib.load(next(r["path"] for r in rows if r["subject"] == subject and r["session"] == session))


def assert_nifti_like(path, scan):
    image = nib.load(str(path))
    assert image.shape == scan.shape
    np.testing.assert_allclose(image.affine, scan.affine, atol=1e-5)
    assert np.isfinite(image.get_fdata()).all()


def test_write_png_round_trips_pixels(tmp_path):
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 7
    write_png(tmp_path / "a.png", rgb)
    raw = (tmp_path / "a.png").read_bytes()
    assert raw.startswith(PNG_SIGNATURE)
    width, height = struct.unpack(">II", raw[16:24])
    assert (width, height) == (3, 2)
    idat_length = struct.unpack(">I", raw[33:37])[0]
    pixels = zlib.decompress(raw[41:41 + idat_length])
    assert pixels == b"".join(b"\x00" + rgb[r].tobytes() for r in range(2))


def test_evaluate_before_training_says_which_command_to_run(tmp_path):
    result = run_script("evaluate.py", "--task", "ad", "--out", tmp_path / "empty")
    assert result.returncode != 0
    assert "train_ae.py" in result.stderr and "Traceback" not in result.stderr


def test_evaluate_without_stage_2_says_to_train_it(run, tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "ae.pt").write_bytes((run / "ae.pt").read_bytes())
    with pytest.raises(SystemExit, match="train_ldae.py"):
        main(Config(task="age", out=str(tmp_path / "half")))


def test_ad_probe_refuses_a_test_split_without_ad(run, tmp_path):
    moved = tmp_path / "no_ad"
    moved.mkdir()
    for name in ("ldae.pt", "latents.pt", "images.npy", "images.json"):
        (moved / name).write_bytes((run / name).read_bytes())
    state = load(run / "ae.pt")
    rows = data.read_table(state["data_dir"])
    for r in rows:
        if r["diagnosis"] == "AD" and state["split"][r["subject"]] == "test":
            state["split"][r["subject"]] = "train"
    torch.save(state, moved / "ae.pt")
    with pytest.raises(SystemExit, match="no AD scan"):
        main(Config(task="ad", out=str(moved)))


def test_ad_probe_scores_ldae_and_both_baselines(run):
    result = evaluate(run, "ad")
    assert result["n_train"] > 0 and result["n_test"] > 0 and result["positive_class"] == "AD"
    for name in ("ldae", "baseline_pca", "baseline_latent"):
        m = result[name]
        for key in ("accuracy", "precision", "recall", "f1", "roc_auc"):
            assert 0.0 <= m[key] <= 1.0, (name, key, m[key])


def test_age_probe_reports_finite_errors_in_years(run):
    result = evaluate(run, "age")
    for name in ("ldae", "baseline_pca", "baseline_latent", "baseline_mean_age"):
        m = result[name]
        assert math.isfinite(m["mae"]) and m["mae"] > 0 and m["rmse"] >= m["mae"]
    state = load(run / "ae.pt")
    rows = [r for r in data.read_table(state["data_dir"]) if state["split"][r["subject"]] != "test"]
    mean_age = sum(r["age"] for r in rows) / len(rows)
    test_ages = [r["age"] for r in data.read_table(state["data_dir"]) if state["split"][r["subject"]] == "test"]
    expected = sum(abs(a - mean_age) for a in test_ages) / len(test_ages)
    assert result["baseline_mean_age"]["mae"] == pytest.approx(expected)


def test_age_probe_cross_validates_every_method_by_subject(run):
    result = evaluate(run, "age", "--folds", "2")
    cv = result["cross_validation"]
    assert cv["folds"] == 2
    for name in ("ldae", "baseline_pca", "baseline_latent", "baseline_mean_age"):
        per_fold = cv["per_fold_mae"][name]
        assert len(per_fold) == 2 and all(math.isfinite(m) and m > 0 for m in per_fold)
        assert cv[name]["mae"] == pytest.approx(sum(per_fold) / 2)
        assert cv[name]["rmse"] >= cv[name]["mae"]


def test_subject_folds_keep_subjects_whole_and_spread_each_diagnosis():
    from evaluate import subject_folds
    rows = [{"subject": f"s{n}", "diagnosis": "AD" if n < 6 else "CN"} for n in range(18) for _ in range(n % 3 + 1)]
    folds = subject_folds(SimpleNamespace(rows=rows, path=Path("run")), list(range(len(rows))), 3, seed=0)
    assert sorted(i for f in folds for i in f) == list(range(len(rows)))
    subjects = [{rows[i]["subject"] for i in f} for f in folds]
    assert not (subjects[0] & subjects[1] or subjects[0] & subjects[2] or subjects[1] & subjects[2])
    for f in subjects:  # 6 AD and 12 CN subjects over 3 folds: 2 and 4 in each
        assert sum(s in {f"s{n}" for n in range(6)} for s in f) == 2 and len(f) == 6
    with pytest.raises(SystemExit, match="--folds 10 needs at least 20 subjects"):
        subject_folds(SimpleNamespace(rows=rows, path=Path("run")), list(range(len(rows))), 10, seed=0)


def test_reconstruct_scores_autoencoder_and_ldae_per_step_count(run):
    result = evaluate(run, "reconstruct", "--steps-list", "2,3", "--max-scans", 2)
    for name in ("autoencoder", "ldae_S2", "ldae_S3", "ldae_random_zT"):
        m = result[name]
        assert -1 < m["ssim"] <= 1 and -1 < m["ssim_brain"] <= 1, (name, m)
        assert m["mse"] >= 0 and m["n"] == 2 and not math.isnan(m["psnr"])
    losses = result["stage2b_loss"]
    assert set(losses) == {"own_y_sem", "next_scan_y_sem", "zero_y_sem"}
    assert all(0 < v < float("inf") for v in losses.values()), losses


def test_stage2b_loss_by_y_sem_tells_an_estimator_that_ignores_y_sem_from_one_that_uses_it():
    preset = ldae.PRESETS["tiny"]
    torch.manual_seed(0)
    with torch.no_grad():
        y_sem = preset.encoder().eval()(torch.rand(4, 1, *preset.image_shape))
    z0 = torch.randn(4, *preset.latent_shape)
    run = SimpleNamespace(device=torch.device("cpu"), unet=preset.unet().eval(), diffusion=ldae.Diffusion())
    ignored = stage2b_loss_by_y_sem(run, z0, y_sem, seed=0)  # fresh estimator: zero head, G = 0
    assert ignored["own_y_sem"] == ignored["next_scan_y_sem"] == ignored["zero_y_sem"]
    for p in run.unet.estimator.parameters():  # give every zero-initialised layer weights
        if p.dim() > 1 and not p.any():
            torch.nn.init.normal_(p, std=0.1)
    used = stage2b_loss_by_y_sem(run, z0, y_sem, seed=0)
    assert len({used["own_y_sem"], used["next_scan_y_sem"], used["zero_y_sem"]}) == 3, used


def test_manipulate_writes_volumes_in_scan_space_and_a_montage(run):
    result = evaluate(run, "manipulate", "--steps", 2, "--n-scans", 1, "--alphas=-2,2")
    assert len(result["scans"]) == 2
    folder = run / "eval" / "manipulate"
    for entry in result["scans"]:
        scan = input_scan(run, entry["subject"], entry["session"])
        for file in entry["files"]:
            assert_nifti_like(folder / file, scan)
        assert 0 <= entry["ventricles"]["volume_share"] < 1 and 0 <= entry["hippocampus"]["difference_share"] <= 1
        assert (folder / f"{entry['subject']}_{entry['session']}.png").read_bytes().startswith(PNG_SIGNATURE)


def test_interpolate_compares_ldae_with_both_baselines_per_gap(run):
    result = evaluate(run, "interpolate", "--steps", 2)
    assert result["subjects"] >= 1
    for method in ("ldae", "nearest_visit", "linear_blend"):
        assert result[method], method
        for gap, m in result[method].items():
            assert float(gap) > 0 and m["n"] >= 1 and -1 < m["ssim"] <= 1 and m["mse"] >= 0


def test_variations_writes_each_sample_and_a_montage(run):
    result = evaluate(run, "variations", "--steps", 2, "--n", 2)
    folder = run / "eval" / "variations"
    scan = input_scan(run, result["subject"], result["session"])
    assert len(result["files"]) == 3  # the reconstruction and two variations
    for file in result["files"]:
        assert_nifti_like(folder / file, scan)
    assert (folder / result["png"]).read_bytes().startswith(PNG_SIGNATURE)


def test_throughput_times_ldae_against_a_voxel_dae(run):
    result = evaluate(run, "throughput", "--steps-list", "1", "--dae-base", 8)
    assert result["steps"] == 1 and [p["steps"] for p in result["per_steps"]] == [1]
    assert result["ldae_s_per_volume"] > 0 and result["dae_s_per_volume"] > 0 and result["speedup"] > 0
    assert result["flops_per_call"]["dae_unet"] > result["flops_per_call"]["ldae_unet"] > 0
    assert result["shape"] == list(ldae.PRESETS["tiny"].image_shape)
    precision = result["inference_precision"]
    assert precision["dtype"] in ("float32", "bfloat16") and 0 <= precision["ssim_change"] < 0.01
    assert result["machine"]["conv3d_peak_gflops"] > 0 and 0 < result["machine"]["ae_train_of_peak"] < 1.5
