"""The dense model's top-k kept in a run's folder: read back by a resumed run, gone on with by a run
started again after a stop, never another model's or another text's."""

import errno
import json

import pytest
import torch

from loraprune.errors import LoraPruneError
from loraprune.pipeline import teacher_cache
from loraprune.pipeline.teacher_cache import top_k_targets
from loraprune.runtime.checkpoint import Checkpointer, Interrupted, partial_folder
from tiny import tiny_model


def windows(seed: int):
    return torch.randint(0, 64, (5, 9), generator=torch.Generator().manual_seed(seed))


def computation(store, model, seed: int = 0, k: int = 8, temperature: float = 1.0):
    """The folder in `store` of the top-k of `model` over windows(seed)."""
    return teacher_cache.computation_folder(store, teacher_cache.fingerprint(model, windows(seed), k, temperature))


def test_kept_targets_are_the_computed_ones_and_are_read_back_without_the_model(tmp_path, monkeypatch):
    model, store = tiny_model("llama-gqa"), tmp_path / "run.checkpoints" / "teacher"
    expected = top_k_targets(model, windows(0), k=8, temperature=2.0)
    kept = top_k_targets(model, windows(0), k=8, temperature=2.0, store=store)
    assert all(a.equal(b) for a, b in zip(kept, expected, strict=True))
    folder = computation(store, model, temperature=2.0)
    assert json.loads((folder / "COMPLETE").read_text())["k"] == 8
    assert [p.name for p in store.iterdir()] == [folder.name]  # the partial folder became it

    def no_forward(*args, **kwargs):
        raise AssertionError("the dense model ran again")

    monkeypatch.setattr(teacher_cache, "_fill", no_forward)
    again = top_k_targets(model, windows(0), k=8, temperature=2.0, store=store)
    assert all(a.equal(b) for a, b in zip(again, expected, strict=True))
    again[1][0, 0, 0] = 1.0  # copy-on-write: training may write to the tensors, the file stays
    assert top_k_targets(model, windows(0), k=8, temperature=2.0, store=store)[1].equal(expected[1])
    for other in ({"k": 4}, {"temperature": 1.0}):  # made from something else: computed, not read
        with pytest.raises(AssertionError, match="ran again"):
            top_k_targets(model, windows(0), **{"k": 8, "temperature": 2.0, **other}, store=store)
    with pytest.raises(AssertionError, match="ran again"):
        top_k_targets(model, windows(1), k=8, temperature=2.0, store=store)
    other_model = tiny_model("llama-gqa", seed=1)
    with pytest.raises(AssertionError, match="ran again"):
        top_k_targets(other_model, windows(0), k=8, temperature=2.0, store=store)
    assert (folder / "COMPLETE").is_file()  # a failed computation leaves what was complete


def stopped_after_two_windows(model, store, ctrl_c_at_window):
    """top_k_targets into `store`, stopped by Ctrl-C once two of the five windows are written."""
    ctrl_c_at_window(2)
    with pytest.raises(Interrupted, match="2 of 5 windows are kept in"):
        top_k_targets(model, windows(0), k=8, batch_size=2, store=store)
    ctrl_c_at_window(None)
    folder = computation(store, model)
    assert not folder.exists() and partial_folder(folder).is_dir()


def forwards_counted(monkeypatch) -> list[int]:
    """The size of each batch the dense model runs from now on."""
    sizes, forward = [], teacher_cache.last_hidden_states

    def counted(model, head, batch, **kwargs):
        sizes.append(len(batch))
        return forward(model, head, batch, **kwargs)

    monkeypatch.setattr(teacher_cache, "last_hidden_states", counted)
    return sizes


@pytest.mark.parametrize("same_model", [True, False])
def test_a_stopped_computation_goes_on_for_the_same_model_only(tmp_path, monkeypatch, ctrl_c_at_window, same_model):
    model, store = tiny_model("llama-gqa"), tmp_path / "teacher"
    stopped_after_two_windows(model, store, ctrl_c_at_window)
    if not same_model:
        model = tiny_model("llama-gqa", seed=1)
    expected = top_k_targets(model, windows(0), k=8, batch_size=2)
    sizes = forwards_counted(monkeypatch)
    kept = top_k_targets(model, windows(0), k=8, batch_size=2, store=store)
    assert sizes == ([2, 1] if same_model else [2, 2, 1])  # windows 2 to 4, or all five again
    assert all(a.equal(b) for a, b in zip(kept, expected, strict=True))
    folder = computation(store, model)
    assert (folder / "COMPLETE").is_file() and not partial_folder(folder).exists()


def test_the_targets_of_other_windows_and_models_are_kept_beside(tmp_path, monkeypatch):
    """A store such as --teacher-cache serves several runs: each reads back its own targets."""
    models, store = [tiny_model("llama-gqa"), tiny_model("llama-gqa", seed=1)], tmp_path / "cache"
    expected = {
        (m, s): top_k_targets(models[m], windows(s), k=8, store=store)[0].clone() for m in (0, 1) for s in (0, 1)
    }
    assert len(list(store.iterdir())) == 4
    sizes = forwards_counted(monkeypatch)
    for (m, s), ids in expected.items():
        assert top_k_targets(models[m], windows(s), k=8, store=store)[0].equal(ids)
    assert sizes == []  # all four read back


def test_a_failed_run_leaves_its_targets_only_beside_a_checkpoint(tmp_path):
    checkpointer = Checkpointer(tmp_path, {}, replace=True)
    folder = checkpointer.kept_folder("teacher")
    (folder / "top8-x").mkdir(parents=True)
    partial_folder(folder / "top8-y").mkdir()
    (tmp_path / "step-000004").mkdir()
    checkpointer.abandon()
    assert len(list(folder.iterdir())) == 2  # --resume will read them
    (tmp_path / "step-000004").rmdir()
    checkpointer.abandon()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kept", [False, True])
def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, kept):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(teacher_cache.np.lib.format, "open_memmap", full)
    monkeypatch.setattr(teacher_cache.tempfile, "TemporaryFile", full)
    store = tmp_path / "teacher" if kept else None
    with pytest.raises(LoraPruneError, match="the disk is full: writing the dense model's top-"):
        top_k_targets(tiny_model("llama-gqa"), windows(0), k=8, store=store)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kept", [False, True])
def test_the_top_k_pass_shows_progress_only_when_asked(tmp_path, capsys, kept):
    """A run logged to a file still shows how far the pass is (tqdm would hide it off a terminal);
    --quiet shows nothing."""
    model, store = tiny_model("llama-gqa"), (tmp_path / "teacher" if kept else None)
    top_k_targets(model, windows(0), k=8, batch_size=2, store=store)
    assert "top-8" not in capsys.readouterr().err
    top_k_targets(model, windows(1), k=8, batch_size=2, store=store, progress=True)
    err = capsys.readouterr().err
    assert "dense model's top-8" in err and "3/3" in err  # 5 windows, 2 a batch
