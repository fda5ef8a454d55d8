import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the scripts are flat files at the repo root

# ----------------------------------------------------------------------------------------------------
# Shared by test_train.py and test_faults.py: one small synthetic cohort and one finished tiny run of each
# stage per session, and two ways to run a script (a fresh interpreter, or the same CLI code in-process).

import os  # noqa: E402
import runpy  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The suite tests what CI runs, on the CPU, also on a GPU machine: exact resume is a CPU promise (bfloat16
# autocast and cuDNN make a resumed stage 1 differ on an H100), and two gloo ranks cannot share one GPU.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
# One thread: the tests share two cores with other work, where a second thread makes tiny convolutions ~20x
# slower; it also makes a subprocess run and an in-process run give bit-identical weights.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
AE_STEPS = 6  # every tiny stage-1 run in the tests: --steps 6 --save-every 1, so ae.prev.pt exists
AE_FLAGS = ("--preset", "tiny", "--steps", str(AE_STEPS), "--save-every", "1", "--adv-start", "0.2")
AE_KEYS = ("model", "discriminator", "optimizer", "optimizer_d", "scaler", "step", "split", "latent_scale")
LDAE_STEPS = 3
LDAE_FLAGS = ("--steps", str(LDAE_STEPS), "--val-steps", "2", "--save-every", "1")


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_identical(a, b, where="checkpoint"):
    """Every tensor bit-identical (torch.equal), every other value equal, through dicts and lists."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys differ"
        for k in a:
            assert_identical(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def run_script(*args, timeout=300, env=None):
    """python SCRIPT ARGS in a fresh interpreter at the repo root; CompletedProcess with text output."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **ONE_THREAD, **(env or {})})


def run_cli(script, *args):
    """The script's `__main__` in this process (no interpreter start-up): (exit code, message).
    exit code 0 on success; otherwise the SystemExit text the user would see. Signal handlers are restored."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    argv = sys.argv
    sys.argv = [str(REPO / script), *map(str, args)]
    try:
        runpy.run_path(str(REPO / script), run_name="__main__")
        return 0, ""
    except SystemExit as e:
        return (0, "") if e.code in (None, 0) else (1, str(e.code))
    finally:
        sys.argv = argv
        for s, h in handlers.items():
            signal.signal(s, h)


@pytest.fixture(scope="session")
def cohort(tmp_path_factory):
    """8 synthetic subjects (22 scans): CN, MCI and AD, split into train, val and test subjects."""
    import data

    folder = tmp_path_factory.mktemp("cohort")
    data.synthesize(folder, subjects=8, seed=0)
    rows = data.read_table(folder)
    assert {r["diagnosis"] for r in rows} == set(data.DIAGNOSES)
    assert set(data.make_split(rows).values()) == {"train", "val", "test"}
    return folder


@pytest.fixture(scope="session")
def ae_run(cohort, tmp_path_factory):
    """A finished tiny stage-1 run made by `python train_ae.py` (read-only: copy it before changing it)."""
    run = tmp_path_factory.mktemp("ae_run")
    shutil.rmtree(run)
    result = run_script("train_ae.py", "--data", cohort, "--out", run, *AE_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


@pytest.fixture(scope="session")
def ldae_run(ae_run, tmp_path_factory):
    """ae_run plus both stages of `python train_ldae.py` in one go (read-only: copy it before changing it)."""
    run = tmp_path_factory.mktemp("ldae_run")
    shutil.copytree(ae_run, run, dirs_exist_ok=True)
    result = run_script("train_ldae.py", "--out", run, *LDAE_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


@pytest.fixture
def copy_run(tmp_path):
    """copy_run(run) -> a private copy of a run folder in this test's tmp_path."""
    def copy(run, name="run"):
        return Path(shutil.copytree(run, tmp_path / name))
    return copy


@pytest.fixture(scope="module")
def one_thread():
    """In-process training with one thread, like the subprocesses (same bits, less contention)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
