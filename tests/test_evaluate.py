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
from evaluate import (Config, atrophy_reference, cohort_measures, intensity_histogram,  # noqa: E402
                      latent_readout, main, open_run, other_subject_partner, stage2b_loss_by_y_sem,
                      untrained_encoder, within_subject_bound, write_png)

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


def test_ad_probe_scores_ldae_and_every_baseline(run):
    result = evaluate(run, "ad")
    assert result["n_train"] > 0 and result["n_test"] > 0 and result["positive_class"] == "AD"
    assert "cross_validation" not in result  # 8 subjects: too few for the default 5 folds, the test split only
    for name in ("ldae", "baseline_untrained_encoder", "baseline_pca", "baseline_latent", "baseline_histogram",
                 "reference_measured_atrophy"):
        m = result[name]  # the synthetic cohort's table has the measured atrophy: the reference row is there
        for key in ("accuracy", "precision", "recall", "f1", "roc_auc"):
            assert 0.0 <= m[key] <= 1.0, (name, key, m[key])
    spread = result["y_sem_spread"]
    assert spread["spread"] > 0 and spread["magnitude"] > 0 and spread["effective_rank"] >= 1


def test_untrained_encoder_is_the_random_start_of_stage_2b(run):
    """A few training steps move the encoder's weights by far less than another random start would."""
    loaded = open_run(Config(out=str(run)))
    weights = lambda encoder: dict(encoder.named_parameters())  # not the standardisation's running statistics
    start = weights(untrained_encoder(loaded))
    trained = weights(loaded.encoder)
    moved = max((trained[k].float() - v.float()).abs().max().item() for k, v in start.items())
    torch.manual_seed(loaded.init_seed + 1)
    loaded.preset.unet()
    other = weights(loaded.preset.encoder())
    other_start = max((other[k].float() - v.float()).abs().max().item() for k, v in start.items())
    assert moved < 0.02 < other_start, (moved, other_start)


def test_age_probe_reports_finite_errors_in_years(run):
    result = evaluate(run, "age")
    for name in ("ldae", "baseline_untrained_encoder", "baseline_pca", "baseline_latent", "baseline_histogram",
                 "baseline_mean_age", "reference_measured_atrophy"):
        m = result[name]
        assert math.isfinite(m["mae"]) and m["mae"] > 0 and m["rmse"] >= m["mae"]
    for name in ("ldae", "baseline_untrained_encoder", "baseline_pca", "baseline_latent",
                 "baseline_histogram"):  # the cohort has sizes
        for measure in ("ventricle_ml", "hippocampus_ml", "cortex_thickness_mm"):
            assert -math.inf < result[name][f"r2_{measure}"] <= 1.0, (name, measure)
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
    for name in ("ldae", "baseline_untrained_encoder", "baseline_pca", "baseline_latent", "baseline_mean_age"):
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


def test_probe_ceiling_uses_the_atrophy_columns_every_scan_has():
    rows = [{"cortical_thinning_mm": "0.41", "ventricle_expansion": "0.12", "ventricle_ml": "20.5"},
            {"cortical_thinning_mm": "0.00", "ventricle_expansion": "-0.03", "ventricle_ml": ""},
            {"cortical_thinning_mm": "nan", "ventricle_expansion": "0.30"}]
    run = SimpleNamespace(rows=rows)
    assert cohort_measures(run, [0, 1]) == ["cortical_thinning_mm", "ventricle_expansion"]  # one blank size
    assert cohort_measures(run, [0]) == ["ventricle_ml", "cortical_thinning_mm", "ventricle_expansion"]
    assert cohort_measures(run, [1, 2]) == ["ventricle_expansion"]  # NaN is no measure
    assert cohort_measures(SimpleNamespace(rows=[{"age": 70.0}]), [0]) == []  # a cohort of your own: no ceiling


def test_intensity_histogram_gives_each_bin_its_share_of_the_foreground():
    x = torch.zeros(2, 1, 4, 4, 4)
    x[0, 0, :2] = 0.3  # a quarter background, half 0.3, a quarter 1.0 (the top edge falls in the last bin)
    x[0, 0, 2, :2] = 1.0
    x[0, 0, 3, :2] = 1.0
    x[1, 0] = 0.5  # no background
    h = intensity_histogram(x, bins=4, floor=0.2)  # bins of width 0.2 over (0.2, 1]
    assert torch.allclose(h, torch.tensor([[2 / 3, 0.0, 0.0, 1 / 3], [0.0, 1.0, 0.0, 0.0]]))


def test_latent_readout_tells_a_code_that_generalises_from_one_that_memorises():
    # 60 subjects x 2 scans of a latent with 4 shared directions plus each subject's own pattern: the first 40
    # subjects train, the last 20 are new. A code that is a linear map of the latent carries a new scan nearly as
    # well as the 4 principal components do; a code that only names the training subjects carries none of it.
    g = torch.Generator().manual_seed(0)
    basis, subject_part = torch.randn(4, 300, generator=g), torch.randn(60, 300, generator=g)
    coeff = torch.randn(60, 4, generator=g).repeat_interleave(2, 0)
    latents = coeff @ basis + 0.3 * subject_part.repeat_interleave(2, 0) + 0.05 * torch.randn(120, 300, generator=g)
    rows = [{"subject": f"s{i // 2}"} for i in range(120)]
    run = SimpleNamespace(latents=latents.reshape(120, 3, 10, 10), rows=rows)
    train, test = list(range(80)), list(range(80, 120))
    code = latents @ torch.randn(300, 4, generator=g)
    linear = latent_readout(run, code[train], train, code[test], test)
    assert 0.8 < linear["y_sem"] <= linear["latent_pca"] + 0.02 and linear["latent_pca"] > 0.9
    names = torch.randn(60, 4, generator=g).repeat_interleave(2, 0)  # a random code per subject
    memorised = latent_readout(run, names[train], train, names[test], test)
    assert memorised["y_sem"] < 0.05 and memorised["latent_pca"] == linear["latent_pca"]


def test_reconstruct_scores_autoencoder_and_ldae_per_step_count(run):
    state = load(run / "ae.pt")
    n_test = sum(state["split"][r["subject"]] == "test" for r in data.read_table(state["data_dir"]))
    result = evaluate(run, "reconstruct", "--steps-list", "2,3")
    for name in ("autoencoder", "ldae_S2", "ldae_S3", "ldae_random_zT"):
        m = result[name]
        assert -1 < m["ssim"] <= 1 and -1 < m["ssim_brain"] <= 1, (name, m)
        assert m["mse"] >= 0 and m["n"] == n_test and not math.isnan(m["psnr"])
    losses = result["stage2b_loss"]
    for name in ("own_y_sem", "next_scan_y_sem", "zero_y_sem", "other_subject_y_sem", "estimator_off",
                 "perfect_code_bound"):
        assert 0 < losses[name] < float("inf"), (name, losses)
    assert 0 <= losses["own_below_other_subject_fraction"] <= 1
    assert losses["mean_gap_other_minus_own"] == pytest.approx(losses["other_subject_y_sem"] - losses["own_y_sem"],
                                                               abs=1e-6)
    readout = result["latent_readout"]
    assert readout["y_sem"] <= 1 and readout["latent_pca"] <= 1 and readout["l2"] > 0
    assert losses["gap_over_bound"] == pytest.approx(losses["mean_gap_other_minus_own"] / losses["perfect_code_bound"])
    assert losses["within_subject_share"] == pytest.approx(losses["within_subject_bound"]
                                                           / losses["perfect_code_bound"])
    versus = result["random_zT_own_vs_other_subject"]
    assert versus["ssim_own_mean"] == pytest.approx(result["ldae_random_zT"]["ssim"])
    assert 0 <= versus["own_better_fraction"] <= 1 and -1 < versus["ssim_other_mean"] <= 1
    assert set(result["y_sem_spread"]) == {"spread", "magnitude", "effective_rank"}


def test_stage2b_loss_by_y_sem_tells_an_estimator_that_ignores_y_sem_from_one_that_uses_it():
    preset = ldae.PRESETS["tiny"]
    torch.manual_seed(0)
    with torch.no_grad():
        y_sem = preset.encoder().eval()(torch.rand(4, 1, *preset.image_shape))
    z0 = torch.randn(4, *preset.latent_shape)
    unet = preset.unet().eval()
    fresh = stage2b_loss_by_y_sem(SimpleNamespace(device=torch.device("cpu"), unet=unet, diffusion=ldae.Diffusion()),
                                  z0, y_sem, seed=0)
    assert fresh["own_y_sem"] == fresh["estimator_off"]  # zero-initialised head and route: G = 0 at the start
    for p in unet.parameters():  # give every zero-initialised layer weights, so G depends on y_sem
        if p.dim() > 1 and not p.any():
            torch.nn.init.normal_(p, std=0.1)
    partner = other_subject_partner(["a", "a", "b", "c"])
    zeros = lambda y: None if y is None else torch.zeros_like(y)  # None: the estimator off
    ignoring = SimpleNamespace(device=torch.device("cpu"), unet=lambda z, t, y: unet(z, t, zeros(y)),
                               diffusion=ldae.Diffusion())
    ignored = stage2b_loss_by_y_sem(ignoring, z0, y_sem, seed=0, partner=partner)
    assert ignored["own_y_sem"] == ignored["next_scan_y_sem"] == ignored["zero_y_sem"] == ignored[
        "other_subject_y_sem"]
    assert ignored["mean_gap_other_minus_own"] == 0 and ignored["own_below_other_subject_fraction"] == 0
    using = SimpleNamespace(device=torch.device("cpu"), unet=unet, diffusion=ldae.Diffusion())
    used = stage2b_loss_by_y_sem(using, z0, y_sem, seed=0, partner=partner)
    names = ("own_y_sem", "next_scan_y_sem", "zero_y_sem", "other_subject_y_sem", "estimator_off")
    assert len({used[name] for name in names}) == 5, used
    assert used["mean_gap_other_minus_own"] == pytest.approx(used["other_subject_y_sem"] - used["own_y_sem"])
    assert "other_subject_y_sem" not in stage2b_loss_by_y_sem(using, z0, y_sem, seed=0)


def test_within_subject_bound_counts_only_what_changes_between_a_subjects_visits():
    g = torch.Generator().manual_seed(0)
    subjects = ["a", "a", "b", "b", "b", "c"]
    anatomy = 3 * torch.randn(3, 2, 4, 4, 4, generator=g)[[0, 0, 1, 1, 1, 2]]  # one latent per subject
    visits = 0.3 * torch.randn(6, 2, 4, 4, 4, generator=g)
    fake = lambda latents: SimpleNamespace(rows=[{"subject": s} for s in subjects], latents=latents,
                                           diffusion=ldae.Diffusion())
    # every visit of a subject the same: nothing to know per visit
    assert within_subject_bound(fake(anatomy), range(6)) == pytest.approx(0, abs=1e-9)
    by_hand = torch.cat([(visits[:2] - visits[:2].mean(0)) * 2 ** 0.5,
                         (visits[2:5] - visits[2:5].mean(0)) * 1.5 ** 0.5])
    within = within_subject_bound(fake(anatomy + visits), range(6))
    assert within == pytest.approx(float(ldae.Diffusion().code_saving(by_hand).mean()))
    assert 0 < within < float(ldae.Diffusion().code_saving(anatomy + visits).mean())
    assert within_subject_bound(fake(anatomy + visits), [0, 2, 5]) is None  # no subject seen twice


def test_other_subject_partner_never_pairs_two_scans_of_one_subject():
    subjects = ["a", "a", "a", "b", "c", "c", "d", "a", "b"]
    partner = other_subject_partner(subjects)
    assert len(partner) == len(subjects)
    assert all(subjects[q] != s for q, s in zip(partner, subjects))
    assert partner == other_subject_partner(subjects)  # deterministic
    pairs = {(s, subjects[q]) for s, q in zip(subjects, partner)}
    assert sorted(t for _, t in pairs) == sorted(set(subjects))  # one partner subject each: a derangement
    assert other_subject_partner(["a", "a", "a"]) is None


def test_manipulate_writes_volumes_in_scan_space_and_a_montage(run):
    result = evaluate(run, "manipulate", "--steps", 2, "--n-scans", 1, "--alphas=-2,2")
    assert len(result["scans"]) == 2
    folder = run / "eval" / "manipulate"
    for entry in result["scans"]:
        scan = input_scan(run, entry["subject"], entry["session"])
        for file in entry["files"]:
            assert_nifti_like(folder / file, scan)
        assert 0 <= entry["ventricles"]["volume_share"] < 1 and 0 <= entry["hippocampus"]["difference_share"] <= 1
        png = (folder / entry["png"]).read_bytes()
        assert png.startswith(PNG_SIGNATURE) and entry["png_difference_scale"] > 0
    width, height = (int.from_bytes(png[i:i + 4], "big") for i in (16, 20))  # IHDR
    assert width / 4 == height / 6  # columns: input, a = -2, 0 (reconstruction), +2; rows: 3 slices x (image, diff)
    summary = result["summary"]
    p_ad = [result["scans"][0]["p_ad_of_edited_image"], result["scans"][0]["p_ad_of_reconstruction"],
            result["scans"][1]["p_ad_of_edited_image"]]  # a = -2, 0, +2
    assert summary["monotonic_fraction"] == float(p_ad[0] < p_ad[1] < p_ad[2])
    shares = [e["ventricles"]["difference_share"] + e["hippocampus"]["difference_share"] for e in result["scans"]]
    assert summary["ventricles_plus_hippocampus_share"] == pytest.approx(sum(shares) / 2)
    assert result["alpha_unit"] == "groups" and result["alpha_unit_z"] == result["group_separation_z"]
    atrophy = result["scans"][0]["subject_atrophy"]  # the tiny cohort's test subjects have 3 or 4 visits
    assert atrophy["from"] == "M00" and atrophy["to"] != "M00"
    assert_nifti_like(folder / atrophy["file"], input_scan(run, result["scans"][0]["subject"], "M00"))
    share = atrophy["ventricles"]["difference_share"] + atrophy["hippocampus"]["difference_share"]
    assert summary["subject_atrophy_ventricles_plus_hippocampus_share"] == pytest.approx(share)


def test_manipulate_refuses_an_unknown_step_unit(run):
    with pytest.raises(SystemExit, match="--alpha-unit 'steps'"):
        main(Config(task="manipulate", out=str(run), alpha_unit="steps"))


def test_atrophy_reference_finds_where_the_labels_changed(tmp_path):
    """Two visits whose label maps differ only inside the first visit's ventricles (they shrink), or only in the
    cortex: the reference puts most of the change in the ventricles in the first case and little in the second."""
    shape, affine = (24, 24, 24), np.diag([2.0, 2.0, 2.0, 1.0])
    first = np.zeros(shape, np.uint8)
    first[2:-2, 2:-2, 2:-2] = data.GM
    first[4:-4, 4:-4, 4:-4] = data.WM
    first[8:16, 8:16, 8:16] = data.VENTRICLES
    shrunk, thinner = first.copy(), first.copy()
    shrunk[8:16, 8:16, 8:12] = data.WM
    thinner[2:4, 2:-2, 2:-2] = data.CSF
    shares = []
    for last in (shrunk, thinner):
        rows = []
        for session, months, labels in (("M00", 0.0, first), ("M12", 12.0, last)):
            path = tmp_path / f"labels_{session}.nii.gz"
            nib.save(nib.Nifti1Image(labels, affine), str(path))
            rows.append({"subject": "s", "session": session, "months": months, "labels": str(path)})
        fake_run = SimpleNamespace(rows=rows[::-1], preset=SimpleNamespace(image_shape=shape, spacing=2.0),
                                   ae_config={"clip_percentile": 0.0})
        result = atrophy_reference(fake_run, "s", tmp_path)
        assert (result["from"], result["to"]) == ("M00", "M12") and (tmp_path / result["file"]).exists()
        shares.append(result["ventricles"]["difference_share"])
    assert shares[0] > 0.6 and shares[1] < 0.05
    rows[1]["labels"] = rows[0]["labels"]  # two identical label maps: no atrophy to refer to
    assert atrophy_reference(fake_run, "s", tmp_path) is None


def test_sample_scores_samples_test_scans_and_noise_against_the_nearest_training_scan(run):
    result = evaluate(run, "sample", "--steps", 2, "--n-samples", 3)
    state = load(run / "ae.pt")
    n_test = sum(state["split"][r["subject"]] == "test" for r in data.read_table(state["data_dir"]))
    for group, n in (("samples", 3), ("test_scans", min(3, n_test)), ("noise", 3)):
        per_sample = result["per_sample"][group]
        assert len(per_sample["ssim"]) == len(per_sample["distance"]) == n
        assert all(-1 < v <= 1 for v in per_sample["ssim"]) and all(d > 0 for d in per_sample["distance"])
        assert result["nearest_training_ssim"][group] == pytest.approx(sum(per_sample["ssim"]) / n)
        assert result["nearest_training_distance"][group] == pytest.approx(sum(per_sample["distance"]) / n)
    folder = run / "eval" / "sample"
    scan = input_scan(run, result["files_in_space_of"]["subject"], result["files_in_space_of"]["session"])
    assert len(result["files"]) == 3
    for file in result["files"]:
        assert_nifti_like(folder / file, scan)
    assert (folder / result["png"]).read_bytes().startswith(PNG_SIGNATURE)


def test_evaluate_refuses_an_oracle_diagnostic_run(run, tmp_path):
    oracle = tmp_path / "oracle"
    shutil.copytree(run, oracle)
    state = load(oracle / "ldae.pt")
    state["config"]["oracle"] = True
    torch.save(state, oracle / "ldae.pt")
    with pytest.raises(SystemExit, match="--oracle diagnostic run"):
        main(Config(task="age", out=str(oracle)))


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


def test_summary_collects_the_readme_rows_from_the_tasks_json(run):
    for path in (run / "eval").glob("*.json") if (run / "eval").exists() else []:
        path.unlink()
    result = evaluate(run, "summary")
    assert [measure for measure, _ in result["rows"]] == ["stage-1 validation SSIM"]
    assert any(c.endswith("--task sample") for c in result["missing"]) and len(result["missing"]) == 7
    sample = evaluate(run, "sample", "--steps", 2, "--n-samples", 2)
    result = evaluate(run, "summary")
    cell = dict(result["rows"])["DDPM samples: SSIM / latent distance to the nearest training scan (test scans)"]
    assert cell.startswith(f"{sample['nearest_training_ssim']['samples']:.3f} / ")
    assert len(result["missing"]) == 6
    reconstruct = evaluate(run, "reconstruct", "--steps-list", "2,3")  # not the README's 100: the row says so
    rows = dict(evaluate(run, "summary")["rows"])
    cell = rows["reconstruction SSIM: autoencoder / LDAE, DDIM-encoded z_T, 100 steps"]
    assert cell == f"{reconstruct['autoencoder']['ssim']:.3f} / {reconstruct['ldae_S3']['ssim']:.3f} (3 steps)"
    share = reconstruct["stage2b_loss"]["within_subject_share"]  # every synthetic subject has 2-4 visits
    assert rows["share of that bound between one subject's visits (room for the atrophy)"] == f"{share:.1%}"
    ad = evaluate(run, "ad")  # 8 subjects: the test split's figures, each baseline in the row's order
    rows = dict(evaluate(run, "summary")["rows"])
    cell = rows["AD vs CN ROC-AUC (5-fold): y_sem / untrained encoder / PCA / AE latent / histogram (measured atrophy)"]
    names = ("ldae", "baseline_untrained_encoder", "baseline_pca", "baseline_latent", "baseline_histogram")
    assert cell == " / ".join(f"{ad[n]['roc_auc']:.3f}" for n in names) + \
        f" ({ad['reference_measured_atrophy']['roc_auc']:.3f})"
