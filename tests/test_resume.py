"""Checkpoints and --resume with real processes: SIGKILL or Ctrl-C mid-run, then resume, must give
bit-for-bit the model of an uninterrupted run (CPU, float32, one thread in every process)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from loraprune.cli import main
from loraprune.pipeline import teacher_cache

# 60 steps of ~25 ms (over a second), so a kill at the first checkpoint (step 2) lands mid-run
RUN = ["--steps", "60", "--prune-freq", "2", "--seq-len", "16", "--batch-size", "2", "--quiet", "--no-eval"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # same thread count as the tests


def start(*argv, cwd):
    return subprocess.Popen(
        [sys.executable, "-m", "loraprune", "prune", *map(str, argv)],
        cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_for_checkpoint(folder, process, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not any(folder.glob("step-*/COMPLETE")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)


def same_result(a, b):
    for name in ("model.safetensors", "loraprune_scores.safetensors"):  # merged weights; masks and scores
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x), name
    ha, hb = (json.loads((p / "loraprune.json").read_text())["history"] for p in (a, b))
    ha.pop("step_seconds"), hb.pop("step_seconds")  # wall times differ between runs
    assert ha == hb


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_folder):
    """Start the uninterrupted run in the background; the test collects it once it needs it."""
    folder = tmp_path_factory.mktemp("reference")
    corpus = folder / "corpus.txt"
    import torch

    from conftest import WORDS  # the text_file fixture's corpus, rebuilt here at module scope

    g = torch.Generator().manual_seed(0)
    words = [WORDS[i] for i in torch.randint(0, len(WORDS), (3000,), generator=g)]
    corpus.write_text("\n".join(" ".join(words[i : i + 12]) for i in range(0, len(words), 12)))
    process = start("--model", tiny_folder, "--data", corpus, "--output", folder / "out", *RUN,
                    "--checkpoint-every", 7, cwd=folder)  # fmt: skip
    return {"process": process, "out": folder / "out", "corpus": corpus}


def finished(run):
    out, err = run["process"].communicate(timeout=120)
    assert run["process"].returncode == 0, err
    return run["out"]


def test_sigkill_then_resume_is_bit_identical(tmp_path, tiny_folder, reference):
    started = time.monotonic()
    out = tmp_path / "out"
    process = start("--model", tiny_folder, "--data", reference["corpus"], "--output", out, *RUN,
                    "--checkpoint-every", 2, cwd=tmp_path)  # fmt: skip
    checkpoints = tmp_path / "out.checkpoints"
    wait_for_checkpoint(checkpoints, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists()
    newest = max(checkpoints.glob("step-*/COMPLETE")).parent

    # damage the way a crash mid-write would: newer folders that must be ignored in its favour
    (checkpoints / ".step-000900.partial-x1").mkdir()  # a temporary folder never renamed
    shutil.copytree(newest, checkpoints / "step-000901")
    (checkpoints / "step-000901" / "COMPLETE").unlink()  # complete-looking, no marker
    shutil.copytree(newest, checkpoints / "step-000902")
    state = checkpoints / "step-000902" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:100])  # marker present, file truncated

    resumed = subprocess.run(
        [sys.executable, "-m", "loraprune", "prune", "--resume", checkpoints],
        cwd=tmp_path, env=ENV, capture_output=True, text=True,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "skipping checkpoint" in resumed.stderr and "step-000902" in resumed.stderr
    assert json.loads((out / "loraprune.json").read_text())["resumed_from_step"] == int(newest.name[5:])
    assert not checkpoints.exists()  # removed once the output is saved
    same_result(finished(reference), out)
    print(f"kill + resume: {time.monotonic() - started:.1f} s")


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path, tiny_folder, reference, capsys, monkeypatch):
    started = time.monotonic()
    out = tmp_path / "out"
    process = start("--model", tiny_folder, "--data", reference["corpus"], "--output", out, *RUN,
                    "--checkpoint-every", 2, cwd=tmp_path)  # fmt: skip
    wait_for_checkpoint(tmp_path / "out.checkpoints", process)  # training is under way
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "loraprune prune --resume" in err
    assert err.strip().splitlines()[-1].startswith("loraprune: interrupted at step")
    assert not out.exists() and any((tmp_path / "out.checkpoints").glob("step-*/COMPLETE"))

    capsys.readouterr()
    assert main(["prune", "--resume", str(tmp_path / "out"), "--lr", "0.5", "--steps", "60"]) == 2
    err = capsys.readouterr().err
    assert "other settings: --lr 0.5 (checkpoint: 0.0005); drop these flags" in err and "--steps" not in err

    # resume in this process (same thread count): the result is still the uninterrupted one, and the
    # dense model's top-k for distillation (the default) are read back, not computed again
    assert any((tmp_path / "out.checkpoints" / "teacher").glob("*/COMPLETE"))
    monkeypatch.setattr(teacher_cache, "_fill", lambda *a, **k: pytest.fail("the dense model's top-k ran again"))
    assert main(["prune", "--resume", str(tmp_path / "out"), "--quiet"]) == 0
    same_result(finished(reference), out)
    print(f"Ctrl-C + resume: {time.monotonic() - started:.1f} s")


def test_ctrl_c_while_the_dense_top_k_is_computed_keeps_it(tmp_path, tiny_folder, reference, capsys, monkeypatch,
                                                           ctrl_c_at_window):  # fmt: skip
    out = tmp_path / "out"
    command = ["prune", "--model", str(tiny_folder), "--data", str(reference["corpus"]), "--output", str(out), *RUN]
    ctrl_c_at_window(16)
    assert main(command) == 130
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("loraprune: stopped while computing the dense model's top-k: 16 of 120 windows")
    assert not out.exists()

    ctrl_c_at_window(None)
    sizes, forward = [], teacher_cache.last_hidden_states
    monkeypatch.setattr(teacher_cache, "last_hidden_states", lambda m, h, batch, **k: sizes.append(len(batch))
                        or forward(m, h, batch, **k))  # fmt: skip
    assert main(command) == 0  # the same command again: the other 104 windows, and the same model
    assert sum(sizes) == 120 - 16
    same_result(finished(reference), out)


def test_a_teacher_cache_serves_later_runs(tmp_path, tiny_folder, reference, capsys, monkeypatch):
    """--teacher-cache: the first run computes the dense model's top-k into it and leaves it there, a run
    at another ratio (the same windows) reads it back, and the result is that of a run without it."""
    cache = tmp_path / "cache"
    command = ["prune", "--model", str(tiny_folder), "--data", str(reference["corpus"]), *RUN, "--teacher-cache",
               str(cache)]  # fmt: skip
    assert main([*command, "--output", str(tmp_path / "a")]) == 0
    same_result(finished(reference), tmp_path / "a")
    assert len(list(cache.glob("*/COMPLETE"))) == 1 and not (tmp_path / "a.checkpoints").exists()
    monkeypatch.setattr(teacher_cache, "_fill", lambda *a, **k: pytest.fail("the dense model's top-k ran again"))
    assert main([*command, "--output", str(tmp_path / "b"), "--ratio", "0.4"]) == 0

    capsys.readouterr()
    assert main([*command, "--output", str(tmp_path / "c"), "--distill", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--teacher-cache keeps the dense model's top-k" in err[0]
    assert not (tmp_path / "c").exists()


def test_resume_refuses_other_settings_and_non_runs(tmp_path, tiny_folder, capsys):
    code = main(["prune", "--resume", str(tiny_folder)])
    assert code == 2 and "is not a loraprune run" in capsys.readouterr().err
    code = main(["prune", "--resume", str(tmp_path / "nope")])
    assert code == 2 and "no such folder" in capsys.readouterr().err
    (tmp_path / "run" / ".step-000002.partial-x").mkdir(parents=True)
    code = main(["prune", "--resume", str(tmp_path / "run")])
    assert code == 2 and "stopped before its first checkpoint was complete" in capsys.readouterr().err
