"""
Data for LDAE (METHOD.md section 1): the cohort table, scan checks, preprocessing onto the
model's grid and back, the image cache, the subject-level split, and a built-in synthetic
longitudinal cohort so the whole pipeline runs without ADNI.

    python data.py --synth data/demo            # write the synthetic cohort
    python data.py --synth DIR --from T1.nii.gz # the same design on one real skull-stripped T1, warped
    python data.py --check DIR [--csv FILE]     # one line per bad scan, exit 1 if any
"""

import argparse
import csv as csvlib
import hashlib
import json
import multiprocessing
import os
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

DIAGNOSES = ("CN", "MCI", "AD")
REQUIRED_COLUMNS = ("subject", "session", "path", "diagnosis", "age")
# Spellings seen in ADNI / OASIS / BIDS exports, mapped to our three classes.
DIAGNOSIS_SPELLINGS = {
    "cn": "CN", "nc": "CN", "hc": "CN", "control": "CN", "normal": "CN",
    "mci": "MCI", "emci": "MCI", "lmci": "MCI",
    "ad": "AD", "dementia": "AD",
}


class DataError(Exception):
    """A problem with the data; str(e) is one `path: what is wrong and what to do` line per problem."""


# -----------------------------------------------------------------------------
# Cohort table: a CSV, or a BIDS folder

def read_table(data_dir, csv=None):
    """Rows of the cohort (see check_cohort for the checks); raises DataError if any row is bad."""
    rows, problems = _table_rows(data_dir, csv)
    if problems:
        raise DataError("\n".join(problems))
    return rows


def _table_rows(data_dir, csv=None):
    """(rows, problem lines) from the table alone; table-level problems raise DataError."""
    data_dir = Path(data_dir)
    if csv is not None:
        raw = _read_csv(Path(csv), data_dir)
    elif (data_dir / "participants.csv").exists():
        raw = _read_csv(data_dir / "participants.csv", data_dir)
    elif (data_dir / "participants.tsv").exists():
        raw = _read_bids(data_dir)
    else:
        raise DataError(f"{data_dir}: no participants.csv or participants.tsv found; "
                        "pass the table with --csv FILE or point to a BIDS folder")
    rows, problems = [], []
    for r in raw:
        row, problem = _clean_row(r, data_dir)
        if problem:
            problems.append(problem)
        else:
            rows.append(row)
    return rows, problems


def _read_delimited(path, delimiter):
    """(lower-case column names, rows as dicts of stripped strings); blank lines skipped."""
    with open(path, newline="") as f:
        reader = csvlib.reader(f, delimiter=delimiter)
        columns = [c.strip().lower() for c in next(reader, [])]
        rows = [dict(zip(columns, (v.strip() for v in values)))
                for values in reader if any(v.strip() for v in values)]
    return columns, rows


def _read_csv(path, data_dir):
    if not path.exists():
        raise DataError(f"{path}: table not found; check the --csv path")
    columns, rows = _read_delimited(path, ",")
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; the table needs columns "
                        f"{', '.join(REQUIRED_COLUMNS)} (months optional)")
    for r in rows:
        r["_table"] = str(path)
    return rows


def _read_bids(data_dir):
    """BIDS: participants.tsv + sub-*/[ses-*/]anat/*_T1w.nii[.gz]; sub-*_sessions.tsv wins per session."""
    table = data_dir / "participants.tsv"
    columns, participants = _read_delimited(table, "\t")
    if "participant_id" not in columns:
        raise DataError(f"{table}: missing column participant_id; BIDS participants.tsv needs it")
    by_subject = {p["participant_id"]: p for p in participants}
    seen_columns, sessions_of = set(columns), {}
    scans = sorted(list(data_dir.glob("sub-*/anat/*_T1w.nii*")) +
                   list(data_dir.glob("sub-*/ses-*/anat/*_T1w.nii*")))
    if not scans:
        raise DataError(f"{data_dir}: participants.tsv found but no sub-*/[ses-*/]anat/*_T1w.nii[.gz] scans")
    rows = []
    for scan in scans:
        subject = scan.relative_to(data_dir).parts[0]
        session = scan.parent.parent.name if scan.parent.parent.name.startswith("ses-") else ""
        if subject not in sessions_of:
            sessions_tsv = data_dir / subject / f"{subject}_sessions.tsv"
            session_columns, sessions = _read_delimited(sessions_tsv, "\t") if sessions_tsv.exists() else ([], [])
            seen_columns.update(session_columns)
            sessions_of[subject] = {s.get("session_id"): s for s in sessions}
        row = {k: v for k, v in by_subject.get(subject, {}).items() if k != "participant_id"}
        this_session = {k: v for k, v in sessions_of[subject].get(session, {}).items()
                        if k != "session_id" and v != ""}
        row.update(this_session)
        if not session:
            row.setdefault("months", "0")
        elif "age" not in this_session and _float(row.get("age")) is not None:
            months = _months(session, row.get("months", ""))
            if months is not None:
                # participants.tsv holds one age per subject: the age at baseline, plus the follow-up.
                row["age"] = str(_float(row["age"]) + months / 12)
        if subject not in by_subject:
            row["_missing_subject"] = "1"
        row.update(subject=subject, session=session, path=str(scan), _table=str(table))
        rows.append(row)
    for column in ("age", "diagnosis"):
        if column not in seen_columns:
            raise DataError(f"{table}: missing column {column}; add it to participants.tsv "
                            "or to each sub-*/sub-*_sessions.tsv")
    return rows


def _float(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _months(session, months_text=""):
    """Months since baseline: the months column if given, else from names like M00, M06, ses-M12, bl."""
    if months_text != "":
        return _float(months_text)
    match = re.search(r"m(\d+)", session, re.IGNORECASE)
    if match:
        return float(match.group(1))
    if re.fullmatch(r"(ses-)?(bl|baseline)", session, re.IGNORECASE):
        return 0.0
    return None


def _clean_row(raw, data_dir):
    """(typed row, None) or (None, problem line)."""
    path = raw.get("path", "")
    if not path:
        return None, f"{raw['_table']}: a row of subject '{raw.get('subject', '')}' has no path; fill it in"
    path = Path(path) if Path(path).is_absolute() else data_dir / path
    path = str(path.resolve())
    if raw.get("_missing_subject"):
        return None, f"{path}: subject {raw['subject']} is not in participants.tsv; add a row for it"
    if not raw.get("subject") or (not raw.get("session") and raw.get("months", "") == ""):
        return None, f"{path}: empty subject or session in {raw['_table']}; fill it in"
    diagnosis = DIAGNOSIS_SPELLINGS.get(raw.get("diagnosis", "").lower())
    if diagnosis is None:
        return None, (f"{path}: unknown diagnosis '{raw.get('diagnosis', '')}'; use one of CN, MCI, AD "
                      "(also accepted: Dementia, EMCI, LMCI) or drop the row")
    age = _float(raw.get("age"))
    if age is None or not np.isfinite(age) or not 0 <= age <= 120:
        return None, f"{path}: impossible age '{raw.get('age', '')}'; give the age in years at this scan"
    months = _months(raw["session"], raw.get("months", ""))
    if months is None or not np.isfinite(months) or months < 0:
        return None, (f"{path}: cannot tell the months since baseline from session '{raw['session']}'; "
                      "add a months column or name sessions M00, M06, M12...")
    row = {k: v for k, v in raw.items() if not k.startswith("_")}
    row.update(subject=raw["subject"], session=raw["session"], path=path, diagnosis=diagnosis,
               age=age, months=months)
    if row.get("labels"):
        row["labels"] = str((data_dir / row["labels"]).resolve())
    return row, None


# -----------------------------------------------------------------------------
# Scan checks

def check_cohort(data_dir, csv=None):
    """(good rows, problem lines); reads each volume once."""
    try:
        rows, problems = _table_rows(data_dir, csv)
    except DataError as e:
        return [], str(e).splitlines()
    good, first_of = [], {}
    for row in tqdm(rows, desc="checking scans", disable=len(rows) < 50):
        key = (row["subject"], row["session"])
        if key in first_of:
            problems.append(f"{row['path']}: duplicate of subject {key[0]} session {key[1]} "
                            f"(also {first_of[key]}); keep one row per visit")
            continue
        first_of[key] = row["path"]
        problem = _scan_problem(row["path"])
        if problem:
            problems.append(f"{row['path']}: {problem}")
        else:
            good.append(row)
    return good, problems


def _scan_problem(path):
    if not os.path.exists(path):
        return "file not found; fix the path in the table or restore the file"
    try:
        data = np.asanyarray(nib.load(path).dataobj)
    except Exception as e:  # nibabel, gzip and zlib each raise their own types for a bad file
        return f"unreadable or truncated ({type(e).__name__}: {e}); re-export or re-download the scan"
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        return f"shape {data.shape} is not a 3D volume; give one 3D T1w volume per row"
    if data.dtype.kind in "fc" and not np.isfinite(data).all():
        return "has NaN or Inf voxels; fix the preprocessing that wrote it"
    if data.min() == data.max():
        return f"constant volume (every voxel is {data.flat[0]}); the scan is empty, re-export it"
    return None


# -----------------------------------------------------------------------------
# Preprocessing: scan -> model grid (METHOD.md section 1), and back

RAS = nib.orientations.axcodes2ornt("RAS")


def load_scan(path, shape, spacing, clip_percentile=None):
    """(float32 volume of exactly `shape` in [0, 1], meta to map grid outputs back to the scan)."""
    image = nib.load(str(path))
    data = np.asanyarray(image.dataobj).astype(np.float32)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: shape {data.shape} is not a 3D volume; give one 3D T1w volume")
    return to_grid(data, image.affine, shape, spacing, clip_percentile, path)


def to_grid(data, affine, shape, spacing, clip_percentile=None, path="volume"):
    """load_scan for a 3D array already in memory, with its voxel-to-world affine; path names it in errors."""
    to_ras = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine), RAS)
    ras = nib.orientations.apply_orientation(np.asarray(data, np.float32), to_ras)
    ras_affine = affine @ nib.orientations.inv_ornt_aff(to_ras, data.shape)
    zooms = np.sqrt((ras_affine[:3, :3] ** 2).sum(0))
    # Anti-aliasing: a grid voxel coarser than the scan's holds the mean of the tissue inside it (partial
    # volume), not the scan's value at its centre. A Gaussian with the variance of the grid voxel's box less the
    # scan voxel's own ((factor^2 - 1) / 12, in scan voxels) does that before sampling: thin structures keep
    # their partial volume wherever they fall on the grid, and voxel noise is averaged (docs/results.md).
    sigma = np.sqrt(np.maximum((spacing / zooms) ** 2 - 1, 0) / 12)
    smoothed = ndimage.gaussian_filter(ras, sigma, mode="nearest") if sigma.any() else ras
    # grid_mode: voxel edges (not centres) line up, so the field of view is kept exactly.
    resampled = ndimage.zoom(smoothed, zooms / spacing, order=1, mode="nearest", grid_mode=True)

    offsets = []  # grid index = resampled index + offset (positive: padding, negative: cropping)
    for axis, (n, t) in enumerate(zip(resampled.shape, shape)):
        if n - t > 0.15 * t:
            raise DataError(f"{path}: extent {n * spacing:.0f} mm along axis {'xyz'[axis]} does not fit "
                            f"the preset's grid of {t * spacing:.0f} mm; choose a larger preset or crop the scan")
        offsets.append((t - n) // 2)
    grid_part, scan_part = _overlap(resampled.shape, shape, offsets)
    kept = resampled[scan_part]

    if clip_percentile is None:
        low, high = float(kept.min()), float(kept.max())
    else:
        low, high = (float(v) for v in np.percentile(kept, [clip_percentile, 100 - clip_percentile]))
    if high <= low:
        raise DataError(f"{path}: constant volume; the scan is empty, re-export it")
    volume = np.zeros(shape, np.float32)  # padding stays 0 after scaling
    volume[grid_part] = (np.clip(kept, low, high) - low) / (high - low)

    meta = dict(path=str(path), affine=np.asarray(affine).tolist(), shape=list(data.shape),
                to_ras=to_ras.tolist(), ras_shape=list(ras.shape), zooms=zooms.tolist(),
                spacing=float(spacing), resampled_shape=list(resampled.shape), grid_shape=list(shape),
                offsets=offsets, intensity_range=[low, high])
    return volume, meta


def _overlap(scan_shape, grid_shape, offsets):
    """Slices (into the grid, into the scan) of the part of the scan that lies on the grid."""
    grid, scan = [], []
    for n, t, o in zip(scan_shape, grid_shape, offsets):
        start, stop = max(0, o), min(t, n + o)
        grid.append(slice(start, stop))
        scan.append(slice(start - o, stop - o))
    return tuple(grid), tuple(scan)


def save_like(volume, meta, path):
    """Write a grid-space volume back on the scan's own voxel grid with its affine (overlays in viewers); returns
    the written float32 array."""
    if torch.is_tensor(volume):
        volume = volume.detach().float().cpu().numpy()
    volume = np.asarray(volume, np.float32)
    grid_shape = tuple(meta["grid_shape"])
    if volume.shape[-3:] != grid_shape or volume.size != np.prod(grid_shape):
        raise ValueError(f"save_like: volume shape {volume.shape} is not the grid shape {grid_shape}")
    volume = volume.reshape(grid_shape)
    resampled = np.zeros(meta["resampled_shape"], np.float32)  # cropped-off parts come back as 0
    grid_part, scan_part = _overlap(meta["resampled_shape"], grid_shape, meta["offsets"])
    resampled[scan_part] = volume[grid_part]
    ras = ndimage.zoom(resampled, np.array(meta["ras_shape"]) / np.array(meta["resampled_shape"]),
                       order=1, mode="nearest", grid_mode=True)
    from_ras = nib.orientations.ornt_transform(RAS, nib.orientations.io_orientation(np.array(meta["affine"])))
    data = nib.orientations.apply_orientation(ras, from_ras)
    assert data.shape == tuple(meta["shape"]), (data.shape, meta["shape"])
    affine = np.array(meta["affine"])
    image = nib.Nifti1Image(data.astype(np.float32), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))
    return image.get_fdata(dtype=np.float32)


# -----------------------------------------------------------------------------
# Image cache: every scan preprocessed once, memory-mapped for training

def build_image_cache(rows, shape, spacing, path, clip_percentile=None):
    """(N, 1, *shape) float32 array at `path` (.npy), rebuilt only when the scans or settings change."""
    path = Path(path)
    sidecar = path.with_suffix(".json")
    key = dict(scans=[[r["path"], os.stat(r["path"]).st_mtime_ns, os.stat(r["path"]).st_size] for r in rows],
               shape=list(shape), spacing=float(spacing), clip_percentile=clip_percentile, anti_aliased=True)
    if path.exists() and sidecar.exists() and json.loads(sidecar.read_text()) == key:
        return np.load(path, mmap_mode="r")

    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".tmp")
    # open_memmap writes straight to disk, so paper-size cohorts need not fit in RAM.
    images = np.lib.format.open_memmap(temp, mode="w+", dtype=np.float32, shape=(len(rows), 1, *shape))
    try:
        for i, row in enumerate(tqdm(rows, desc=f"caching scans at {spacing} mm")):
            images[i, 0] = load_scan(row["path"], shape, spacing, clip_percentile)[0]
    except BaseException:
        del images
        temp.unlink(missing_ok=True)  # a scan that cannot be cached leaves no half-written cache behind
        raise
    images.flush()
    del images
    # The sidecar goes last: a crash in between leaves no sidecar, hence a rebuild, never a stale cache.
    sidecar.unlink(missing_ok=True)
    os.replace(temp, path)
    temp_sidecar = sidecar.with_name(sidecar.name + ".tmp")
    temp_sidecar.write_text(json.dumps(key))
    os.replace(temp_sidecar, sidecar)
    return np.load(path, mmap_mode="r")


# -----------------------------------------------------------------------------
# Split by subject (METHOD.md section 1): one split for every stage

def make_split(rows, seed=42, test_fraction=0.1, val_fraction=0.05):
    """subject -> "train" | "val" | "test", stratified by each subject's first-visit diagnosis."""
    first_visit = {}
    for row in sorted(rows, key=lambda r: (r["subject"], r["months"])):
        first_visit.setdefault(row["subject"], row["diagnosis"])
    rng = np.random.default_rng(seed)
    split = {}
    for diagnosis in DIAGNOSES:
        subjects = sorted(s for s, d in first_visit.items() if d == diagnosis)
        n = len(subjects)
        n_test, n_val = round(n * test_fraction), round(n * val_fraction)
        # At least two of each diagnosis in test and val, so every class can be scored there...
        n_test = max(n_test, 2) if test_fraction > 0 else 0
        n_val = max(n_val, 2) if val_fraction > 0 else 0
        # ...but never at the cost of the training set: keep at least half of each diagnosis in train.
        while n_test + n_val > n // 2:
            if n_val >= n_test and n_val > 0:
                n_val -= 1
            else:
                n_test -= 1
        order = rng.permutation(n)
        for rank, i in enumerate(order):
            split[subjects[i]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return split


def save_split(path, split):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(split, indent=1, sort_keys=True))


def load_split(path):
    return json.loads(Path(path).read_text())


def load_cohort(folder, csv, preset, run, clip_percentile=0.0, skip_bad=False):
    """(good rows, image cache) for a training run. Every problem is fatal unless skip_bad, and all are
    found before anything is written into the run folder."""
    rows, problems = check_cohort(folder, csv or None)
    if problems and not skip_bad:
        raise DataError("\n".join(problems) + f"\n{len(problems)} problem(s): fix them, or pass --skip-bad "
                        "to train on the rest")
    for line in problems:
        print(f"left out: {line}")
    if not rows:
        raise DataError(f"{folder}: no usable scans")
    images = build_image_cache(rows, preset.image_shape, preset.spacing, Path(run) / "images.npy",
                               clip_percentile or None)
    return rows, images


# -----------------------------------------------------------------------------
# Latent cache: every scan's scaled latent, tied to the autoencoder weights that made it and to the image cache
# (images.npy, in the same run folder) it encoded

def weights_fingerprint(state_dict):
    digest = hashlib.sha1()
    for name, tensor in state_dict.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def images_fingerprint(run):
    """The image cache's key (its scans, their sizes and times, the preprocessing): it changes when the cache is
    rebuilt."""
    sidecar = Path(run) / "images.json"
    return hashlib.sha1(sidecar.read_bytes()).hexdigest() if sidecar.exists() else None


def save_latents(path, latents, ae_state_dict):
    path = Path(path)
    temp = path.with_name(path.name + ".tmp")
    torch.save({"latents": latents, "autoencoder": weights_fingerprint(ae_state_dict),
                "images": images_fingerprint(path.parent)}, temp)
    os.replace(temp, path)


def load_latents(path, ae_state_dict):
    """The cached latents, refused if a different autoencoder made them or the images they encode have changed."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no latent cache; finish stage 1 (python train_ae.py --resume)")
    cache = torch.load(path, map_location="cpu", weights_only=True)
    if cache["autoencoder"] != weights_fingerprint(ae_state_dict):
        raise DataError(f"{path}: made by another autoencoder than the run's ae.pt; re-run stage 1's end "
                        "(python train_ae.py --resume) to rebuild it")
    if cache.get("images", None) not in (None, images_fingerprint(path.parent)):  # caches before this check: None
        raise DataError(f"{path}: encodes other images than the run's image cache (a scan, where the scans lie "
                        "or the preprocessing has changed since stage 1); re-run stage 1's end (python train_ae.py "
                        "--resume) to rebuild it")
    return cache["latents"]


# -----------------------------------------------------------------------------
# Synthetic longitudinal cohort: procedural T1-like brains with known age and disease effects.
# World coordinates are RAS mm with the origin at the grid centre, like MNI space.

SYNTH_SHAPE = (72, 88, 72)
SYNTH_SPACING = 2.5  # mm; 180 x 220 x 180 mm: the brain fits every preset's field of view
BACKGROUND, CSF, GM, WM, VENTRICLES, HIPPOCAMPUS = range(6)
T1_INTENSITY = np.array([0.0, 0.2, 0.62, 1.0, 0.2, 0.58])  # per label: WM bright > GM > CSF dark
FOLLOW_UP_MONTHS = (6, 12, 24)
BRAIN_CENTRE = np.array([0.0, -5.0, 3.0])  # mm, roughly where MNI puts the middle of the brain
DIAGNOSIS_MIX = ("CN", "CN", "MCI", "AD", "CN", "MCI", "AD", "CN", "MCI", "AD")  # 40 / 30 / 30 %


def synth_affine():
    affine = np.diag([SYNTH_SPACING] * 3 + [1.0])
    affine[:3, 3] = -(np.array(SYNTH_SHAPE) - 1) / 2 * SYNTH_SPACING
    return affine


def _smooth_field(rng, smoothness_mm):
    """Unit-std random field over the synthetic grid, smooth over about `smoothness_mm`."""
    # Smoothed at half resolution then upsampled: the same field for an eighth of the filtering cost.
    noise = rng.standard_normal(tuple(n // 2 for n in SYNTH_SHAPE))
    noise = ndimage.gaussian_filter(noise, smoothness_mm / (2 * SYNTH_SPACING))
    field = ndimage.zoom(noise.astype(np.float32), 2, order=1, mode="nearest", grid_mode=True)
    return (field - field.mean()) / field.std()


def _gradient_norm(field):
    return np.sqrt(sum(g ** 2 for g in np.gradient(field, SYNTH_SPACING))) + 1e-6


def random_anatomy(rng, warp_mm=4.0):
    """What makes one subject's brain its own, fixed across visits: size, shape, folds, baselines."""
    size = rng.normal(1.0, 0.05)
    radii = size * np.array([68.0, 84.0, 58.0]) * rng.normal(1.0, 0.03, 3)
    # World coordinates (RAS mm) pushed around by a smooth random warp: every structure is displaced
    # and bent consistently, as real brains differ after an affine registration to a template.
    axes = [(np.arange(n, dtype=np.float32) - (n - 1) / 2) * SYNTH_SPACING for n in SYNTH_SHAPE]
    xyz = np.stack(np.meshgrid(*axes, indexing="ij"))
    xyz += np.stack([_smooth_field(rng, 30.0) for _ in range(3)]) * warp_mm
    x, y, z = xyz - BRAIN_CENTRE[:, None, None, None].astype(np.float32)
    # Brain: an ellipsoid, flatter below, with smooth bumps; depth = distance inward from its surface.
    rz = np.where(z < 0, 0.8 * radii[2], radii[2])
    radius = np.sqrt((x / radii[0]) ** 2 + (y / radii[1]) ** 2 + (z / rz) ** 2) + 0.03 * _smooth_field(rng, 40.0)
    depth = (1.0 - radius) / _gradient_norm(radius)  # first-order distance to the level set radius = 1
    # Sulci: sheets where a random field crosses zero, reaching 10-22 mm in from the surface.
    folds = _smooth_field(rng, 4.0)
    return dict(
        size=size,
        xyz=np.stack([x, y, z]),  # (3, D, H, W) warped world coordinates relative to the brain centre
        depth=depth,  # mm
        to_sulcus=np.abs(folds) / _gradient_norm(folds),  # mm to the nearest sulcal sheet, first order
        sulcus_depth=16.0 + 6.0 * np.tanh(_smooth_field(rng, 20.0)),  # mm
        thickness=rng.normal(2.8, 0.15),  # mm
        ventricle_z=rng.normal(),  # the subject's ventricle size, in standard deviations
        hippocampus_z=rng.normal(),
        contrast=rng.normal(1.0, 0.03, len(T1_INTENSITY)),
    )


def atrophy(anatomy, age, severity):
    """Structure sizes at one visit: age (decades from 70) and disease severity (0 = CN, ~1 = AD)."""
    decades = (age - 70.0) / 10.0
    return dict(
        ventricle_ml=22.0 * anatomy["size"] ** 3 *
        np.exp(0.35 * anatomy["ventricle_z"] + 0.25 * decades + 0.45 * severity),
        hippocampus_ml=2.7 * anatomy["size"] ** 3 *  # per side
        np.exp(0.1 * anatomy["hippocampus_z"] - 0.08 * decades - 0.25 * severity),
        temporal_horn=np.exp(0.2 * decades + 0.9 * severity),
        thickness=anatomy["thickness"] - 0.12 * decades - 0.35 * severity,
        outer_csf=max(0.3, 1.2 + 0.5 * decades + 0.8 * severity),  # mm between brain and skull
        sulcus_width=max(0.3, 0.8 + 0.3 * decades + 0.6 * severity),  # mm of CSF in each sulcus
    )


def render_labels(anatomy, sizes):
    """uint8 label map: 0 background, 1 CSF, 2 GM, 3 WM, 4 ventricles, 5 hippocampus / medial temporal."""
    x, y, z = anatomy["xyz"]
    depth, s = anatomy["depth"], anatomy["size"]
    brain = depth > 0

    # Cortex: a GM ribbon `thickness` thick under the brain surface and along both walls of every
    # sulcus (which holds CSF), so the GM/WM boundary is folded; WM underneath. The interhemispheric
    # fissure is one more sulcus, down the midline above the ventricles.
    thickness, csf = sizes["thickness"], sizes["sulcus_width"] / 2
    in_sulcus_zone = depth < anatomy["sulcus_depth"]
    fissure = (np.abs(x) < csf + 0.5) & (z > 28.0 * s)
    fissure_wall = (np.abs(x) < csf + 0.5 + thickness) & (z > 28.0 * s - thickness)
    labels = np.full(SYNTH_SHAPE, WM, np.uint8)
    labels[(depth < sizes["outer_csf"] + thickness) | fissure_wall |
           (anatomy["to_sulcus"] < csf + thickness) & (depth < anatomy["sulcus_depth"] + thickness)] = GM
    labels[(depth < sizes["outer_csf"]) | fissure | (anatomy["to_sulcus"] < csf) & in_sulcus_zone] = CSF

    # Lateral ventricles: two banana-shaped ellipsoids beside the midline; they grow mostly sideways.
    growth = sizes["ventricle_ml"] / (2 * 4 / 3 * np.pi * 7 * 26 * 9 * s ** 3 / 1000)
    ax, ay, az = 7 * s * growth ** 0.4, 26 * s * growth ** 0.2, 9 * s * growth ** 0.4
    for side in (-1, 1):
        u = (y + 3 * s) / ay  # along the ventricle, -1 posterior .. 1 anterior
        width = ax * (1 - 0.25 * u)  # wider at the back (atrium), further apart at the back
        across = (x - side * (3 * s + width + 4 * s * (1 - u))) / width
        up = (z - 11 * s + 10 * s * u ** 2) / az  # the ends bend down
        labels[across ** 2 + u ** 2 + up ** 2 < 1] = VENTRICLES

    # Medial temporal lobe: hippocampi (tilted, rising toward the back) with the temporal horn beside them.
    scale = (sizes["hippocampus_ml"] / (4 / 3 * np.pi * 5.5 * 18 * 6.5 * s ** 3 / 1000)) ** (1 / 3)
    horn = sizes["temporal_horn"] ** (1 / 2)
    for side in (-1, 1):
        along = y + 17 * s
        height = z + 17 * s + 0.35 * along
        horn_mask = (((x - side * (34 * s + 1.5 * horn)) / (1.5 * horn)) ** 2 + (along / (14 * s)) ** 2 +
                     ((height - 5 * s) / (2 * horn)) ** 2) < 1
        labels[horn_mask] = VENTRICLES
        hippocampus = (((x - side * 27 * s) / (5.5 * s * scale)) ** 2 + (along / (18 * s * scale)) ** 2 +
                       (height / (6.5 * s * scale)) ** 2) < 1
        labels[hippocampus] = HIPPOCAMPUS
    labels[~brain] = BACKGROUND
    return labels


def noiseless_t1(labels, contrast=1.0):
    """T1-like intensities of a label map with partial volume at tissue borders; no bias field, gain or noise."""
    return ndimage.gaussian_filter((T1_INTENSITY * contrast)[labels].astype(np.float32), 0.6)


def render_t1(labels, anatomy, rng):
    """T1-like intensities from a label map, with this visit's bias field, gain and Rician noise."""
    image = noiseless_t1(labels, anatomy["contrast"])
    image *= np.exp(0.12 * _smooth_field(rng, 30.0)) * rng.normal(1.0, 0.05)  # coil bias, gain
    sigma = 0.035
    real = image + sigma * rng.standard_normal(image.shape, np.float32)
    imaginary = sigma * rng.standard_normal(image.shape, np.float32)
    image = np.sqrt(real ** 2 + imaginary ** 2)  # magnitude images have Rician noise
    image[labels == BACKGROUND] = 0  # skull-stripped
    return np.clip(np.round(image * 160), 0, 255).astype(np.uint8)


def measure(labels):
    """Ground-truth atrophy measures of one label map."""
    voxel_ml = SYNTH_SPACING ** 3 / 1000
    # Thickness: from each GM voxel touching WM, the distance to the nearest CSF or background voxel.
    inside = np.nonzero(labels)
    labels = labels[tuple(slice(i.min() - 1, i.max() + 2) for i in inside)]  # brain box: faster EDT
    tissue = np.isin(labels, (GM, WM, VENTRICLES, HIPPOCAMPUS))
    to_csf = ndimage.distance_transform_edt(tissue, sampling=SYNTH_SPACING)
    inner_gm = (labels == GM) & ndimage.binary_dilation(labels == WM)
    return dict(ventricle_ml=float((labels == VENTRICLES).sum() * voxel_ml),
                hippocampus_ml=float((labels == HIPPOCAMPUS).sum() * voxel_ml),
                cortex_thickness_mm=float(to_csf[inner_gm].mean()))


def _visit_plan(rng, diagnosis):
    """One subject's visits as (months, age, disease severity): 2-4 visits, severity growing yearly with MCI and AD."""
    mean_age = dict(CN=73.0, MCI=72.0, AD=75.0)[diagnosis]
    age0 = float(np.clip(rng.normal(mean_age, 7.0), 55.0, 90.0))
    severity0, yearly = dict(CN=(0.0, 0.0), MCI=(rng.uniform(0.25, 0.6), rng.uniform(0.05, 0.25)),
                             AD=(rng.uniform(0.7, 1.2), rng.uniform(0.15, 0.35)))[diagnosis]
    visits = rng.integers(2, 5)
    months = [0] + sorted(rng.choice(FOLLOW_UP_MONTHS, visits - 1, replace=False).tolist())
    return [(m, age0 + m / 12, severity0 + yearly * m / 12) for m in months]


def _synth_subject(job):
    """Write one subject's visits; returns their table rows. Seeded by (seed, index): order-free."""
    out_dir, seed, index, diagnosis, warp_mm = job
    rng = np.random.default_rng([seed, index])
    subject = f"sub-{index:04d}"
    plan = _visit_plan(rng, diagnosis)
    anatomy = random_anatomy(rng, warp_mm)
    (Path(out_dir) / subject).mkdir(parents=True, exist_ok=True)
    rows = []
    for m, age, severity in plan:
        session = f"M{m:02d}"
        labels = render_labels(anatomy, atrophy(anatomy, age, severity))
        image = render_t1(labels, anatomy, rng)
        path, labels_path = (f"{subject}/{subject}_ses-{session}_{kind}.nii.gz" for kind in ("T1w", "labels"))
        for array, name in ((image, path), (labels, labels_path)):
            nifti = nib.Nifti1Image(array, synth_affine())
            nifti.header.set_xyzt_units("mm")
            nib.save(nifti, str(Path(out_dir) / name))
        rows.append(dict(subject=subject, session=session, path=path, diagnosis=diagnosis,
                         age=f"{age:.2f}", months=m, labels=labels_path,
                         **{k: f"{v:.3f}" for k, v in measure(labels).items()}))
    return rows


# -----------------------------------------------------------------------------
# The same cohort design on real anatomy (--synth DIR --from T1): every scan is one skull-stripped T1, warped per
# subject (a smooth random warp and a shift: its own shape) and per visit by age and disease: tissue drawn back
# from every CSF border (cortical thinning, wider sulci) and the lateral ventricles expanded.

WARP_SPACING = 1.75  # mm, the cohort's voxels (the T1's own where coarser)
_REAL = {}  # the warped brain's arrays, set once per process by _load_real_anatomy


def _load_real_anatomy(t1_path):
    """Resample the T1 to WARP_SPACING in RAS and find what the atrophy warp moves: tissue (GM + WM), the
    direction away from the nearest CSF, and the lateral ventricles (the two largest CSF pockets 18 mm or more
    inside the brain)."""
    img = nib.as_closest_canonical(nib.load(t1_path))
    zooms = np.array(img.header.get_zooms()[:3], dtype=float)
    spacing = max(WARP_SPACING, zooms.max())
    factor = zooms / spacing
    volume = np.asanyarray(img.dataobj).astype(np.float32)
    volume = ndimage.zoom(ndimage.gaussian_filter(volume, 0.85 * (1 / factor - 1)), factor, order=1)
    affine = img.affine.copy()
    affine[:3, :3] /= factor
    top = np.percentile(volume[volume > 0], 99) if (volume > 0).any() else 0.0
    brain = volume > 0.04 * top
    tissue = brain & (ndimage.gaussian_filter(volume, 0.7) > 0.47 * top)  # T1: CSF is darker than GM and WM
    depth = ndimage.distance_transform_edt(tissue, sampling=spacing)  # mm from tissue to CSF or outside
    normal = np.stack(np.gradient(ndimage.gaussian_filter(depth, 1.0), spacing))
    normal /= np.linalg.norm(normal, axis=0) + 1e-6  # away from the CSF, into the tissue
    deep = ndimage.distance_transform_edt(brain, sampling=spacing) > 18.0
    pockets, count = ndimage.label(brain & ~tissue & deep)
    if brain.mean() > 0.9 or count < 2:
        raise DataError(f"{t1_path}: found no brain with ventricles in it (CSF darker than tissue, background "
                        f"zero): --from needs a skull-stripped T1-weighted scan")
    ventricles = np.isin(pockets, 1 + np.argsort(np.bincount(pockets.ravel())[1:])[-2:])
    grid = np.indices(volume.shape, dtype=np.float32)
    radial = grid - np.argwhere(ventricles).mean(0)[:, None, None, None]  # voxels from the ventricles' centre
    reach = np.exp(-(np.linalg.norm(radial, axis=0) * spacing) ** 2 / (2 * 22.0 ** 2))
    # Per visit, the warp moves each point by thinning (mm) * thinning_field + growth (relative) * growth_field
    # (voxels): tissue within ~3 mm of CSF toward the CSF side of it, and space around the ventricles outward.
    thinning_field = -normal * np.exp(-depth / 3.0) * tissue / spacing
    growth_field = -radial * reach
    _REAL.update(volume=volume, affine=affine, spacing=spacing, grid=grid,
                 thinning_field=thinning_field.astype(np.float32), growth_field=growth_field.astype(np.float32))


def _warped_subject(job):
    """Write one subject's visits of the real-anatomy cohort; returns their table rows."""
    out_dir, seed, index, diagnosis, warp_mm = job
    rng = np.random.default_rng([seed, index])
    subject = f"sub-{index:04d}"
    plan = _visit_plan(rng, diagnosis)
    volume, spacing, grid = _REAL["volume"], _REAL["spacing"], _REAL["grid"]

    def smooth_field(smoothness_mm, amplitude_mm):
        coarse = [max(2, int(n * spacing / smoothness_mm)) + 2 for n in volume.shape]
        field = ndimage.zoom(rng.standard_normal(coarse), [n / c for n, c in zip(volume.shape, coarse)], order=3)
        return (field / field.std() * amplitude_mm / spacing).astype(np.float32)

    own = grid + np.stack([smooth_field(30.0, warp_mm) for _ in range(3)]) + \
        (rng.uniform(-0.75, 0.75, 3) * warp_mm / spacing)[:, None, None, None].astype(np.float32)
    gain, thinning0, growth0 = rng.uniform(0.9, 1.1), rng.normal(0.0, 0.15), rng.normal(0.0, 0.1)
    (Path(out_dir) / subject).mkdir(parents=True, exist_ok=True)
    rows = []
    for m, age, severity in plan:
        decades = (age - 70.0) / 10.0
        thinning = max(0.0, 0.2 * decades + 0.5 * severity + thinning0)  # mm drawn back at every CSF border
        growth = 0.05 * decades + 0.15 * severity + growth0  # relative ventricle expansion
        move = thinning * _REAL["thinning_field"] + growth * _REAL["growth_field"]
        at = own + np.stack([ndimage.map_coordinates(move[k], own, order=1) for k in range(3)])
        image = ndimage.map_coordinates(volume, at, order=1) * (gain * rng.uniform(0.97, 1.03) * 250 / volume.max())
        image = np.where(image > 3.0, image + rng.normal(0.0, 3.0, image.shape), 0)  # noise inside the brain
        path = f"{subject}/{subject}_ses-M{m:02d}_T1w.nii.gz"
        nib.save(nib.Nifti1Image(np.clip(np.round(image), 0, 255).astype(np.uint8), _REAL["affine"]),
                 str(Path(out_dir) / path))
        rows.append(dict(subject=subject, session=f"M{m:02d}", path=path, diagnosis=diagnosis, age=f"{age:.2f}",
                         months=m, cortical_thinning_mm=f"{thinning:.3f}", ventricle_expansion=f"{growth:.3f}"))
    return rows


def synthesize(out_dir, subjects=200, seed=0, t1=None, warp_mm=4.0):
    """Write the synthetic cohort to out_dir, procedural brains or (t1: a skull-stripped T1's path) that real
    brain warped; returns its participants.csv (written last). warp_mm: the size of each subject's own smooth warp
    (and of a t1 cohort's shift, 0.75 of it): how far apart the subjects' anatomy lies, as after an affine registration
    (4) or a good nonlinear one (1 or less)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    diagnoses = np.random.default_rng(seed).permutation(np.resize(DIAGNOSIS_MIX, subjects))
    jobs = [(str(out_dir), seed, i, str(d), warp_mm) for i, d in enumerate(diagnoses)]
    workers = min(os.cpu_count() or 1, max(1, subjects // 8))
    desc = f"synthesizing {subjects} subjects" + (f" from {t1}" if t1 else "")
    make, setup, args = _synth_subject, None, ()
    if t1:  # loaded here first, so a scan it cannot use fails before any worker starts; each worker loads it too
        _load_real_anatomy(str(t1))
        make, setup, args = _warped_subject, _load_real_anatomy, (str(t1),)
    if workers > 1:
        with multiprocessing.Pool(workers, setup, args) as pool:
            per_subject = list(tqdm(pool.imap(make, jobs), total=subjects, desc=desc))
    else:
        per_subject = [make(job) for job in tqdm(jobs, desc=desc)]
    rows = [row for subject_rows in per_subject for row in subject_rows]
    table = out_dir / "participants.csv"
    temp = table.with_name(table.name + ".tmp")
    with open(temp, "w", newline="") as f:
        writer = csvlib.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temp, table)
    return table


def demo_dir():
    return Path("data/demo")


def ensure_demo(path=None, subjects=200, seed=0):
    """The demo cohort's folder, generated on first use."""
    path = Path(path) if path is not None else demo_dir()
    if not (path / "participants.csv").exists():
        print(f"generating the synthetic demo cohort in {path} (once)")
        synthesize(path, subjects, seed)
    return path


# -----------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--synth", metavar="DIR", help="write the synthetic cohort to DIR")
    action.add_argument("--check", metavar="DIR", help="check every scan of the cohort in DIR")
    parser.add_argument("--from", dest="t1", metavar="T1", help="with --synth: warp this skull-stripped T1 "
                        "(NIfTI) into every scan instead of drawing procedural brains")
    parser.add_argument("--csv", help="cohort table, if not DIR/participants.csv or a BIDS participants.tsv")
    parser.add_argument("--subjects", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warp-mm", type=float, default=4.0, help="with --synth: the size of each subject's own "
                        "smooth warp, mm (4: brains registered by an affine map; 1: by a good nonlinear one)")
    args = parser.parse_args()
    if args.t1 and not args.synth:
        parser.error("--from goes with --synth DIR")
    if args.synth:
        print(f"wrote {synthesize(args.synth, args.subjects, args.seed, args.t1, args.warp_mm)}")
        return 0
    good, problems = check_cohort(args.check, args.csv)
    for line in problems:
        print(line)
    if problems:
        return 1
    print(f"{len(good)} scans OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
