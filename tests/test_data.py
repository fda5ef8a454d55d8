"""Tests for data.py: tables, checks, preprocessing round trips, cache, split, synthetic cohort."""

import csv
import gzip
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def smooth_volume(shape=(40, 48, 36), seed=0):
    """A smooth, asymmetric positive volume (so flips and shifts would show)."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    volume = np.exp(-sum((g - c) ** 2 / w for g, c, w in zip(grids, rng.uniform(-0.3, 0.3, 3), (0.3, 0.5, 0.4))))
    return (volume + 0.3 * (grids[0] + 1)).astype(np.float32)


def write_nifti(path, array, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine), str(path))
    return path


def write_procedural_t1(path, seed=2):
    """A skull-stripped T1 of one procedural brain, for --from; returns (path, its label map)."""
    rng = np.random.default_rng(seed)
    anatomy = data.random_anatomy(rng)
    labels = data.render_labels(anatomy, data.atrophy(anatomy, 70, 0.0))
    return write_nifti(path, data.render_t1(labels, anatomy, rng), data.synth_affine()), labels


def write_csv(path, rows, columns=("subject", "session", "path", "diagnosis", "age")):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def run_check(folder):
    return subprocess.run([sys.executable, str(REPO / "data.py"), "--check", str(folder)],
                          capture_output=True, text=True, timeout=120)


# ----------------------------------------------------------------------------- tables

def test_csv_table_is_read_with_months_from_session_names(tmp_path):
    for name in ("a.nii.gz", "b.nii.gz"):
        write_nifti(tmp_path / name, smooth_volume())
    write_csv(tmp_path / "participants.csv", [
        dict(subject="s1", session="M00", path="a.nii.gz", diagnosis="Dementia", age="71.5", site="x"),
        dict(subject="s1", session="ses-M06", path="b.nii.gz", diagnosis="lmci", age="72"),
    ], columns=("subject", "session", "path", "diagnosis", "age", "site"))
    rows = data.read_table(tmp_path)
    assert [(r["session"], r["months"], r["diagnosis"]) for r in rows] == [("M00", 0.0, "AD"), ("ses-M06", 6.0, "MCI")]
    assert rows[0]["path"] == str((tmp_path / "a.nii.gz").resolve()) and rows[0]["age"] == 71.5
    assert rows[0]["site"] == "x"


def test_bids_table_takes_participants_then_sessions_tsv(tmp_path):
    for subject, session in (("sub-01", "ses-M00"), ("sub-01", "ses-M12"), ("sub-02", "ses-M00")):
        write_nifti(tmp_path / subject / session / "anat" / f"{subject}_{session}_T1w.nii.gz", smooth_volume())
    (tmp_path / "participants.tsv").write_text("participant_id\tage\tdiagnosis\nsub-01\t70\tCN\nsub-02\t80\tAD\n")
    (tmp_path / "sub-01" / "sub-01_sessions.tsv").write_text("session_id\tage\tdiagnosis\nses-M12\t71.2\tMCI\n")
    rows = {(r["subject"], r["session"]): r for r in data.read_table(tmp_path)}
    assert rows["sub-01", "ses-M00"]["age"] == 70.0 and rows["sub-01", "ses-M00"]["diagnosis"] == "CN"
    assert rows["sub-01", "ses-M12"]["age"] == 71.2 and rows["sub-01", "ses-M12"]["diagnosis"] == "MCI"
    assert rows["sub-01", "ses-M12"]["months"] == 12.0
    assert rows["sub-02", "ses-M00"]["diagnosis"] == "AD"


def test_bids_without_sessions_tsv_adds_follow_up_to_baseline_age(tmp_path):
    for session in ("ses-M00", "ses-M24"):
        write_nifti(tmp_path / "sub-01" / session / "anat" / f"sub-01_{session}_T1w.nii", smooth_volume())
    (tmp_path / "participants.tsv").write_text("participant_id\tage\tdiagnosis\nsub-01\t70\tcn\n")
    rows = data.read_table(tmp_path)
    assert [(r["months"], r["age"]) for r in rows] == [(0.0, 70.0), (24.0, 72.0)]


def test_missing_table_or_column_raises_with_the_file(tmp_path):
    with pytest.raises(data.DataError, match="participants"):
        data.read_table(tmp_path)
    write_csv(tmp_path / "participants.csv", [dict(subject="s", session="M00", path="a.nii")],
              columns=("subject", "session", "path"))
    with pytest.raises(data.DataError, match=r"participants\.csv: missing column\(s\) diagnosis, age"):
        data.read_table(tmp_path)
    assert run_check(tmp_path).returncode == 1


# ----------------------------------------------------------------------------- checks

def test_every_bad_scan_gets_one_line_naming_it(tmp_path):
    volume = smooth_volume()
    good = write_nifti(tmp_path / "good.nii.gz", volume)
    write_nifti(tmp_path / "dup.nii.gz", volume)
    write_nifti(tmp_path / "four_d.nii.gz", np.stack([volume, volume], -1))
    write_nifti(tmp_path / "single_4d.nii.gz", volume[..., None])  # fine: squeezed
    nan = volume.copy()
    nan[3, 4, 5] = np.nan
    write_nifti(tmp_path / "nan.nii.gz", nan)
    write_nifti(tmp_path / "constant.nii.gz", np.full((8, 8, 8), 7, np.int16))
    (tmp_path / "garbage.nii.gz").write_bytes(b"not a nifti at all")
    full = gzip.decompress(good.read_bytes())
    (tmp_path / "truncated.nii.gz").write_bytes(gzip.compress(full[: len(full) // 2]))
    rows = [dict(subject=f"s{i}", session="M00", path=name, diagnosis="CN", age="70") for i, name in enumerate(
        ["good.nii.gz", "four_d.nii.gz", "single_4d.nii.gz", "nan.nii.gz", "constant.nii.gz", "garbage.nii.gz",
         "truncated.nii.gz", "missing.nii.gz"])]
    rows += [dict(subject="s0", session="M00", path="dup.nii.gz", diagnosis="CN", age="70"),
             dict(subject="u", session="M00", path="good.nii.gz", diagnosis="FTD", age="70"),
             dict(subject="a", session="M00", path="good.nii.gz", diagnosis="CN", age="-3"),
             dict(subject="b", session="M00", path="good.nii.gz", diagnosis="CN", age="nan"),
             dict(subject="c", session="M00", path="good.nii.gz", diagnosis="CN", age="130")]
    write_csv(tmp_path / "participants.csv", rows)

    good_rows, problems = data.check_cohort(tmp_path)
    assert sorted(Path(r["path"]).name for r in good_rows) == ["good.nii.gz", "single_4d.nii.gz"]
    expected = {"four_d": "3D", "nan": "NaN", "constant": "constant", "garbage": "unreadable",
                "truncated": "truncated", "missing": "not found", "dup": "duplicate"}
    for name, words in expected.items():
        lines = [p for p in problems if p.startswith(str(tmp_path / f"{name}.nii.gz") + ": ")]
        assert len(lines) == 1 and words in lines[0], (name, problems)
    assert sum("unknown diagnosis 'FTD'" in p for p in problems) == 1
    assert sum("impossible age" in p for p in problems) == 3
    assert len(problems) == 11

    result = run_check(tmp_path)
    assert result.returncode == 1
    assert str(tmp_path / "nan.nii.gz") in result.stdout


def test_check_passes_a_good_cohort(tmp_path):
    write_nifti(tmp_path / "a.nii.gz", smooth_volume())
    write_csv(tmp_path / "participants.csv", [dict(subject="s", session="M00", path="a.nii.gz", diagnosis="CN",
                                                   age="70")])
    result = run_check(tmp_path)
    assert result.returncode == 0 and "1 scans OK" in result.stdout


# ----------------------------------------------------------------------------- preprocessing

def test_flipped_affine_loads_to_the_same_array(tmp_path):
    volume = smooth_volume()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    ras = write_nifti(tmp_path / "ras.nii.gz", volume, affine)
    # Same image stored left-right and superior-inferior flipped (LAI), with axes 1 and 2 swapped.
    flipped = np.transpose(volume[::-1, :, ::-1], (0, 2, 1))
    lai = np.array([[-2.0, 0, 0, 2.0 * (volume.shape[0] - 1)], [0, 0, 2.0, 0],
                    [0, -2.0, 0, 2.0 * (volume.shape[2] - 1)], [0, 0, 0, 1]])
    other = write_nifti(tmp_path / "lai.nii.gz", np.ascontiguousarray(flipped), lai)
    a, _ = data.load_scan(ras, (32, 40, 32), 3.0)
    b, _ = data.load_scan(other, (32, 40, 32), 3.0)
    assert a.shape == (32, 40, 32) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_load_scan_range_padding_and_clipping(tmp_path):
    path = write_nifti(tmp_path / "a.nii.gz", smooth_volume() * 100)
    volume, meta = data.load_scan(path, (32, 40, 32), 3.0)
    assert volume.min() == 0.0 and volume.max() == 1.0 and volume[0, 0, 0] == 0.0
    assert meta["resampled_shape"] == [27, 32, 24]
    clipped, _ = data.load_scan(path, (32, 40, 32), 3.0, clip_percentile=5)
    assert (clipped == 1.0).mean() > 0.01
    with pytest.raises(data.DataError, match="does not fit the preset's grid"):
        data.load_scan(path, (8, 8, 8), 3.0)
    cropped, meta = data.load_scan(path, (26, 30, 24), 3.0)  # small excess: centre-cropped
    assert cropped.shape == (26, 30, 24) and min(meta["offsets"]) < 0


def test_a_grid_voxel_averages_the_scan_over_its_extent():
    """A 1 mm scan on a 4 mm grid: a 3 mm sheet (a cortex) keeps its partial volume wherever it lies within a
    grid voxel (point sampling doubles it at one offset and halves it at another), and voxel noise is averaged."""
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    masses = []
    for offset in range(4):
        scan = np.zeros((64, 64, 64), np.float32)
        scan[:12, :12, :12] = 1.0  # a large block fixes the intensity scaling
        scan[30 + offset:33 + offset, 20:44, 20:44] = 1.0
        grid, _ = data.to_grid(scan, affine, (16, 16, 16), 4.0)
        masses.append(4.0 * grid[4:14, 7:9, 7:9].sum(0).mean())  # the sheet's intensity summed across it, in mm
    assert max(masses) / min(masses) < 1.25, masses
    assert 2.7 < np.mean(masses) < 3.3, masses
    noise = np.random.default_rng(0).normal(0.5, 0.1, (64, 64, 64)).astype(np.float32)
    noise[:12, :12, :12], noise[-12:, -12:, -12:] = 0.0, 1.0  # the same scaling as the scan's
    grid, _ = data.to_grid(noise, affine, (16, 16, 16), 4.0)
    assert grid[6:10, 6:10, 6:10].std() < 0.25 * 0.1


def test_save_like_round_trip_keeps_affine_shape_and_values(tmp_path):
    volume = smooth_volume((60, 70, 50)) * 50
    affine = np.array([[0, 0, -1.5, 40], [1.5, 0, 0, -50], [0, 1.5, 0, -30], [0, 0, 0, 1.0]])  # not RAS
    path = write_nifti(tmp_path / "in.nii.gz", volume, affine)
    grid, meta = data.load_scan(path, (40, 48, 48), 2.5)
    data.save_like(torch.from_numpy(grid), meta, tmp_path / "out.nii.gz")
    out = nib.load(str(tmp_path / "out.nii.gz"))
    assert out.shape == volume.shape and np.allclose(out.affine, affine) and out.get_data_dtype() == np.float32
    low, high = meta["intensity_range"]  # of the resampled scan, which smooths the extremes slightly
    expected = (volume - low) / (high - low)
    assert np.abs(out.get_fdata() - expected).mean() < 0.01
    assert np.abs(out.get_fdata() - expected).max() < 0.1


# ----------------------------------------------------------------------------- cache, split, dataset

def test_image_cache_is_reused_until_a_scan_changes(tmp_path):
    paths = [write_nifti(tmp_path / f"{i}.nii.gz", smooth_volume(seed=i)) for i in range(3)]
    rows = [dict(path=str(p)) for p in paths]
    cache = tmp_path / "cache" / "images.npy"
    images = data.build_image_cache(rows, (16, 20, 16), 6.0, cache)
    assert images.shape == (3, 1, 16, 20, 16) and images.dtype == np.float32 and not images.flags.writeable
    stamp = os.stat(cache).st_mtime_ns
    data.build_image_cache(rows, (16, 20, 16), 6.0, cache)
    assert os.stat(cache).st_mtime_ns == stamp  # reused
    write_nifti(paths[1], smooth_volume(seed=7))
    os.utime(paths[1], ns=(stamp + 10**9, stamp + 10**9))
    rebuilt = data.build_image_cache(rows, (16, 20, 16), 6.0, cache)
    assert os.stat(cache).st_mtime_ns != stamp
    np.testing.assert_allclose(rebuilt[1, 0], data.load_scan(paths[1], (16, 20, 16), 6.0)[0])


def cohort_rows(counts):
    rows = []
    for diagnosis, n in counts.items():
        for i in range(n):
            for months in (0, 12):
                rows.append(dict(subject=f"{diagnosis}{i}", diagnosis=diagnosis, months=months))
    return rows


def test_split_is_by_subject_deterministic_and_stratified():
    rows = cohort_rows(dict(CN=40, MCI=30, AD=30))
    split = data.make_split(rows)
    assert split == data.make_split(rows) and split != data.make_split(rows, seed=1)
    assert set(split) == {r["subject"] for r in rows}  # one split per subject: no overlap possible
    for part in ("test", "val"):
        assert {s.rstrip("0123456789") for s, p in split.items() if p == part} == {"CN", "MCI", "AD"}
    assert sum(p == "test" for p in split.values()) == 10
    small = data.make_split(cohort_rows(dict(CN=8, MCI=4, AD=3)))
    for diagnosis, n in (("CN", 8), ("MCI", 4), ("AD", 3)):
        parts = [p for s, p in small.items() if s.startswith(diagnosis)]
        assert parts.count("train") >= n / 2
    assert [p for s, p in small.items() if s.startswith("CN")].count("val") == 2


def test_split_round_trips_through_json(tmp_path):
    split = data.make_split(cohort_rows(dict(CN=5, MCI=5, AD=5)))
    data.save_split(tmp_path / "split.json", split)
    assert data.load_split(tmp_path / "split.json") == split


# ----------------------------------------------------------------------------- synthetic cohort

def test_synthetic_cohort_is_deterministic_and_readable(tmp_path):
    table = data.synthesize(tmp_path / "a", subjects=6, seed=3)
    again = data.synthesize(tmp_path / "b", subjects=6, seed=3)
    rows, problems = data.check_cohort(table.parent)
    assert not problems and {r["diagnosis"] for r in rows} == {"CN", "MCI", "AD"}
    assert (table.parent / "participants.csv").read_text() == (again.parent / "participants.csv").read_text()
    for row in rows[:4]:
        twin = again.parent / Path(row["path"]).relative_to(table.parent)
        assert np.array_equal(nib.load(row["path"]).get_fdata(), nib.load(str(twin)).get_fdata())
        labels = nib.load(row["labels"]).get_fdata()
        assert set(np.unique(labels)) == {0, 1, 2, 3, 4, 5}
    for subject in {r["subject"] for r in rows}:
        visits = sorted((r["months"], float(r["ventricle_ml"])) for r in rows if r["subject"] == subject)
        assert visits[0][0] == 0 and 2 <= len(visits) <= 4
        assert visits[-1][1] > visits[0][1]  # ventricles grow over the visits
    volume, _ = data.load_scan(rows[0]["path"], (64, 80, 64), 3.0)  # fits the cpu preset's grid
    assert volume.max() == 1.0


def test_synthetic_disease_and_age_effects_have_the_right_sign():
    anatomy = data.random_anatomy(np.random.default_rng(0))

    def measures(age, severity):
        return data.measure(data.render_labels(anatomy, data.atrophy(anatomy, age, severity)))

    cn, ad, older = measures(72, 0.0), measures(72, 1.0), measures(82, 0.0)
    assert ad["ventricle_ml"] > cn["ventricle_ml"] and ad["hippocampus_ml"] < cn["hippocampus_ml"]
    assert ad["cortex_thickness_mm"] < cn["cortex_thickness_mm"]
    assert older["ventricle_ml"] > cn["ventricle_ml"] and older["cortex_thickness_mm"] < cn["cortex_thickness_mm"]
    # The disease shrinks the hippocampus faster than ageing does (per unit of severity vs decade).
    assert cn["hippocampus_ml"] - ad["hippocampus_ml"] > cn["hippocampus_ml"] - older["hippocampus_ml"]


def test_a_cohort_warped_from_one_t1_gains_csf_with_disease_and_refuses_a_scan_it_cannot_use(tmp_path, monkeypatch):
    t1, labels = write_procedural_t1(tmp_path / "t1.nii.gz")
    # Two visits a year apart, the second with severe disease: tissue gives way to CSF, most of all around the
    # ventricles (found from the T1's intensities alone).
    monkeypatch.setattr(data, "_visit_plan", lambda rng, diagnosis: [(0, 70.0, 0.0), (12, 71.0, 1.5)])
    table = data.synthesize(tmp_path / "cohort", subjects=2, seed=0, t1=t1)
    rows, problems = data.check_cohort(table.parent)
    assert not problems and [r["session"] for r in rows] == ["M00", "M12"] * 2
    near_ventricles = ndimage.binary_dilation(labels == data.VENTRICLES, iterations=3)
    for first, last in (rows[:2], rows[2:]):
        # The table gives the atrophy each visit was warped by: severity 1.5 adds 0.75 mm of thinning (less where
        # the first visit's was clipped at 0) and 22% of expansion.
        assert float(last["cortical_thinning_mm"]) > float(first["cortical_thinning_mm"]) + 0.3
        assert float(last["ventricle_expansion"]) > float(first["ventricle_expansion"]) + 0.2
        before, after = (nib.load(r["path"]).get_fdata() for r in (first, last))
        dark = lambda v: (v > 0) & (v < 0.47 * np.percentile(v[v > 0], 99))  # CSF inside the brain
        assert dark(after).sum() > 1.02 * dark(before).sum()
        assert (dark(after) & near_ventricles).sum() > 1.1 * (dark(before) & near_ventricles).sum()
    with pytest.raises(data.DataError, match="bright.nii.gz.*skull-stripped"):  # no background, no ventricles
        data.synthesize(tmp_path / "bad", subjects=1, t1=write_nifti(tmp_path / "bright.nii.gz", smooth_volume()))


def test_warp_mm_sets_how_far_apart_the_subjects_brains_lie(tmp_path):
    t1, _ = write_procedural_t1(tmp_path / "t1.nii.gz")
    apart = {}
    for warp_mm in (0.0, 4.0):
        rows, _ = data.check_cohort(data.synthesize(tmp_path / str(warp_mm), 2, 0, t1, warp_mm).parent)
        first, second = (nib.load(next(r["path"] for r in rows if r["subject"] == s)).get_fdata()
                         for s in ("sub-0000", "sub-0001"))
        apart[warp_mm] = np.abs(first - second).mean()
    assert apart[0.0] < 0.5 * apart[4.0], apart  # unwarped, two subjects differ by their atrophy, gain and noise


def test_t1_contrast_orders_tissues():
    rng = np.random.default_rng(1)
    anatomy = data.random_anatomy(rng)
    labels = data.render_labels(anatomy, data.atrophy(anatomy, 70, 0.0))
    image = data.render_t1(labels, anatomy, rng).astype(float)
    means = [image[labels == k].mean() for k in (data.BACKGROUND, data.CSF, data.GM, data.WM)]
    assert means == sorted(means) and means[0] == 0
