"""Several processes (torchrun, gloo on CPU): 2 ranks x --batch-size 2 prune like 1 process x 4,
resume under 2 processes is bit-identical, and diverged ranks are caught."""

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraprune.cli import main
from loraprune.errors import LoraPruneError
from loraprune.runtime import distributed

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # this process is no rank
    ENV.pop(name, None)
RUN = ["--seq-len", "16", "--prune-freq", "2", "--quiet", "--no-eval", "--distill", "0"]  # recipes below add theirs
# all-reduce averaging sums the two halves of the batch in another order than one process does
WEIGHT_ATOL, SCORE_ATOL = 1e-5, 1e-5


def command(processes: int, *argv) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return [*(launcher if processes > 1 else [sys.executable]), "-m", "loraprune", "prune", *map(str, argv)]


def run(processes: int, *argv, cwd) -> subprocess.CompletedProcess:
    done = subprocess.run(command(processes, *argv), cwd=cwd, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.parametrize(
    ("sharding", "criterion", "recipe"),
    [
        ("ddp", "lora", ()),  # --shrink progressive (the default): DDP is rebuilt after every shrink
        ("ddp", "lora", ("--shrink", "end")),
        ("fsdp", "lora", ()),  # --shrink end (FSDP's default)
        ("ddp", "sketch", ()),
        ("ddp", "gradient", ()),  # base weights in DDP while scoring; a new wrapper without them after
        ("ddp", "lora", ("--distill", 0.5, "--distill-top-k", 0, "--allocation", "global", "--skip-layers", "none")),
        ("ddp", "lora", ("--distill", 0.9, "--distill-top-k", 8)),  # the top-k up front: a sample of the global batch
        ("ddp", "lora", ("--layer-ratio", 0.5)),  # a removed layer's LoRA factors leave DDP
    ],
)
def test_two_processes_prune_like_one_at_the_same_global_batch(
    tmp_path, tiny_folder, text_file, sharding, criterion, recipe
):
    """DDP (whole model on each rank) or FSDP (weights and LoRA factors split, each rank scoring its
    rows); the sketch criterion averages its own statistics over the ranks; distillation's teacher
    and global allocation run on every rank alike."""
    started = time.monotonic()
    common = ["--model", tiny_folder, "--data", text_file, "--steps", 20, "--lora-dropout", 0, "--grad-accum", 2, *RUN]
    common += ["--criterion", criterion, *recipe]
    run(1, *common, "--batch-size", 4, "--output", tmp_path / "one", cwd=tmp_path)
    flags = ["--fsdp"] if sharding == "fsdp" else []
    two = run(2, *common, *flags, "--batch-size", 2, "--output", tmp_path / "two", cwd=tmp_path)
    a, b = tmp_path / "one", tmp_path / "two"

    scores_a, scores_b = (load_file(str(p / "loraprune_scores.safetensors")) for p in (a, b))
    for mask in ("head_alive", "channel_alive"):  # the same groups pruned
        assert scores_a[mask].equal(scores_b[mask]), mask
    assert 0 < (~scores_a["head_alive"]).sum() and 0 < (~scores_a["channel_alive"]).sum()
    for score in ("head_score", "channel_score"):
        torch.testing.assert_close(scores_a[score], scores_b[score], rtol=0, atol=SCORE_ATOL)
    weights_a, weights_b = (load_file(str(p / "model.safetensors")) for p in (a, b))
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        torch.testing.assert_close(weights_a[key], weights_b[key], rtol=0, atol=WEIGHT_ATOL, msg=key)
    report_a, report_b = (json.loads((p / "loraprune.json").read_text()) for p in (a, b))
    assert (report_a["processes"], report_b["processes"]) == (1, 2)
    assert (report_a["fsdp"], report_b["fsdp"]) == (False, sharding == "fsdp")
    assert report_a["layers"] == report_b["layers"]
    assert report_a["history"]["pruning_steps"] == report_b["history"]["pruning_steps"]
    # FSDP runs --shrink end, its 1-process reference progressive: the same model either way
    if report_a["config"]["shrink"] == report_b["config"]["shrink"]:
        assert report_a["history"]["parameters"] == report_b["history"]["parameters"]  # shrunk alike
    assert report_a["history"]["loss"] == pytest.approx(report_b["history"]["loss"], abs=1e-5)  # the global loss
    # rank 0 alone prints the summary and writes; nothing else was left beside the outputs
    assert two.stdout.count("greedy sample") == 1
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("corpus")) == ["one", "two"]
    print(f"1 process + 2 processes: {time.monotonic() - started:.1f} s")


def test_streamed_scores_are_averaged_over_the_ranks(tmp_path, tiny_folder, text_file):
    """The streamed criterion sums |dL/dW0 ⊙ W| per micro-batch and averages the ranks' sums. Two ranks
    with one window each see what one process sees in two micro-batches of one window (the sampler
    gives rank r row r of the global batch), and grad-accum halves each micro-batch's gradient as the
    average over two ranks does: the same scores, the same groups. Summing the ranks' sums would double them."""
    argv = ["--model", tiny_folder, "--data", text_file, "--steps", 12, "--criterion", "streamed", "--lora-dropout", 0]
    argv += [*RUN, "--batch-size", 1, "--no-normalize"]  # raw sums: a factor of 2 would show
    run(1, *argv, "--grad-accum", 2, "--output", tmp_path / "one", cwd=tmp_path)
    run(2, *argv, "--output", tmp_path / "two", cwd=tmp_path)
    one, two = (load_file(str(tmp_path / p / "loraprune_scores.safetensors")) for p in ("one", "two"))
    assert (~two["head_alive"]).sum() > 0 and two["head_score"].abs().sum() > 0
    for name in ("head_score", "channel_score"):
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=SCORE_ATOL, msg=name)
    for name in ("head_alive", "channel_alive"):
        assert two[name].equal(one[name]), name
    report = json.loads((tmp_path / "two" / "loraprune.json").read_text())
    assert report["processes"] == 2 and report["config"]["criterion"] == "streamed"


def test_accelerate_launch_with_the_example_fsdp_config(tmp_path, tiny_folder, text_file):
    """examples/fsdp.yaml as a user runs it (2 processes; gloo here, no CUDA): FSDP is on, the default
    criterion falls back to lora (streamed cannot serve FSDP), and the groups are one lora process's."""
    common = ["--model", tiny_folder, "--data", text_file, "--steps", 12, "--lora-dropout", 0, *RUN]
    run(1, *common, "--criterion", "lora", "--batch-size", 4, "--output", tmp_path / "one", cwd=tmp_path)
    config = Path(__file__).parents[1] / "examples" / "fsdp.yaml"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    argv = [*launcher, "-m", "loraprune", "prune", *map(str, common), "--batch-size", "2", "--output", "two"]
    done = subprocess.run(argv, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "two" / "loraprune.json").read_text())
    assert (report["processes"], report["fsdp"], report["config"]["criterion"]) == (2, True, "lora")
    masks_a, masks_b = (load_file(str(tmp_path / p / "loraprune_scores.safetensors")) for p in ("one", "two"))
    assert all(masks_a[m].equal(masks_b[m]) for m in ("head_alive", "channel_alive"))


def test_fsdp_needs_a_launcher(tmp_path, tiny_folder, text_file, capsys):
    argv = [*map(str, ["prune", "--model", tiny_folder, "--data", text_file, "--steps", 4, "--fsdp", *RUN])]
    assert main([*argv, "--output", str(tmp_path / "a")]) == 2
    assert "--fsdp needs a launcher: `torchrun --nproc_per_node N" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith("corpus")] == []  # nothing written


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_resume_under_two_processes_is_bit_identical(tmp_path, tiny_folder, text_file, capsys, sharding):
    """SIGTERM to torchrun after the first checkpoint (it stops both ranks), resume with 2 processes:
    the model of an uninterrupted 2-process run, LoRA dropout included (each rank's RNG is saved).
    FSDP: checkpoints hold whole tensors gathered from the shards, split again on resume."""
    started = time.monotonic()
    common = ["--model", tiny_folder, "--data", text_file, "--steps", 40, "--batch-size", 2, *RUN]
    common += ["--fsdp"] if sharding == "fsdp" else []
    reference = subprocess.Popen(
        command(2, *common, "--output", tmp_path / "reference"), cwd=tmp_path, env=ENV,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    reference.communicate(timeout=120)
    assert reference.returncode == 0

    out, checkpoints = tmp_path / "out", tmp_path / "out.checkpoints"
    process = subprocess.Popen(
        command(2, *common, "--output", out, "--checkpoint-every", 2), cwd=tmp_path, env=ENV,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not any(checkpoints.glob("step-*/COMPLETE")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)  # torchrun stops its workers
    process.communicate(timeout=60)
    assert not out.exists()
    state = json.loads((max(checkpoints.glob("step-*/COMPLETE")).parent / "state.json").read_text())
    assert state["world_size"] == 2

    assert main(["prune", "--resume", str(checkpoints)]) == 2  # this process: one, without WORLD_SIZE
    assert "checkpointed by 2 process(es), this one has 1" in capsys.readouterr().err

    run(2, "--resume", checkpoints, cwd=tmp_path)
    assert not checkpoints.exists()
    for name in ("model.safetensors", "loraprune_scores.safetensors"):
        x, y = load_file(str(out / name)), load_file(str(tmp_path / "reference" / name))
        assert x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x), name
    ha, hb = (json.loads((p / "loraprune.json").read_text())["history"] for p in (out, tmp_path / "reference"))
    ha.pop("step_seconds"), hb.pop("step_seconds")  # wall times differ between runs
    assert ha == hb
    print(f"2-process kill + resume: {time.monotonic() - started:.1f} s")


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "head_alive": torch.rand(3, 6, generator=g) > 0.3,
        "channel_alive": torch.rand(3, 40, generator=g) > 0.3,
        "head_score": torch.rand(3, 6, generator=g),
        "channel_score": torch.rand(3, 40, generator=g),
        "shapes": torch.tensor([[48, 16, 48, 40]] * 3),
    }


def test_checksum_tells_states_apart():
    base = _state()
    same = distributed.checksum({k: v.clone() for k, v in base.items()})
    assert distributed.differences(same, distributed.checksum(base)) == []
    flipped = {k: v.clone() for k, v in base.items()}
    flipped["channel_alive"][1, 7] ^= True
    nudged = {k: v.clone() for k, v in base.items()}
    nudged["head_score"][2, 1] = torch.nextafter(nudged["head_score"][2, 1], torch.tensor(2.0))  # one ulp
    swapped = {k: v.clone() for k, v in base.items()}
    swapped["channel_score"][0, [3, 4]] = swapped["channel_score"][0, [4, 3]]  # same sum, other order
    for other, name in ((flipped, "channel_alive"), (nudged, "head_score"), (swapped, "channel_score")):
        a, b = distributed.checksum(base), distributed.checksum(other)
        differ = distributed.differences(torch.minimum(a, b), torch.maximum(a, b))
        assert len(differ) == 1 and differ[0].startswith(name), differ


def _diverging_rank(rank: int, port: int, folder: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    assert distributed.init() and distributed.rank() == rank
    state = _state()
    distributed.check_identical(state, 3)  # identical: passes
    if rank == 1:
        state["head_alive"][2, 4] ^= True
    try:
        distributed.check_identical(state, 7)
        message = "no error"
    except LoraPruneError as error:
        message = str(error)
    with open(os.path.join(folder, f"rank{rank}.txt"), "w") as f:
        f.write(message)
    distributed.finish()


def test_diverged_ranks_fail_with_a_clear_error(tmp_path):
    """A real 2-process gloo group, rank 1's mask changed: both ranks raise the same error."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_diverging_rank, args=(port, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert message.startswith("ranks diverged at step 7: head_alive (checksums"), message
        assert "between the 2 processes" in message


def _uneven_rows_rank(rank: int, port: int, folder: str) -> None:
    """One rank of a 2-process FSDP2 group scoring a LoRA projection of 3 rows in blocks of 1 row:
    FSDP2 gives rank 0 two rows (two blocks) and rank 1 one. Writes 'ok' or what went wrong."""
    import copy

    from peft import LoraConfig, inject_adapter_in_model
    from torch.distributed.fsdp import fully_shard

    from loraprune.pipeline.importance import lora_guided
    from loraprune.pipeline.scoring import projection_scores
    from tiny import randomize_lora

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(5, 3)

        def forward(self, x):
            return self.proj(x)

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ.update(MASTER_PORT=str(port), LORAPRUNE_DIST_TIMEOUT="30")  # a mismatch times out, not hangs
    torch.set_num_threads(1)
    net = whole = None
    try:
        assert distributed.init()
        torch.manual_seed(0)
        net = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["proj"]), Net())
        randomize_lora(net)
        for name, p in net.named_parameters():
            p.requires_grad_("lora_" in name)
        whole = copy.deepcopy(net)
        x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
        (whole(x) ** 2).sum().backward()
        expected = [projection_scores(whole.proj, lora_guided, dim) for dim in (1, 0)]
        fully_shard(net)
        (net(x) ** 2).sum().backward()  # the same batch on both ranks: the averaged gradient is the same
        assert net.proj.base_layer.weight.to_local().shape[0] == 2 - rank
        for dim, reference in zip((1, 0), expected, strict=True):
            scores = projection_scores(net.proj, lora_guided, dim, block_rows=1)
            torch.testing.assert_close(scores, reference, rtol=1e-5, atol=1e-9)
        message = "ok"
    except Exception as error:  # reported to the test in the parent process
        message = f"{type(error).__name__}: {error}"
    with open(os.path.join(folder, f"rank{rank}.txt"), "w") as f:
        f.write(message)
    # the sharded module holds the process group through its device mesh: released before the group
    # is destroyed, not at the interpreter's exit (where gloo's threads once aborted the process)
    del net, whole
    gc.collect()
    distributed.finish()


def test_fsdp_scores_with_an_uneven_split_of_row_blocks(tmp_path):
    """A and dL/dA are gathered (collectives) once per module, not once per row block: ranks holding
    different numbers of blocks used to issue different numbers of collectives and hang. The sharded
    scores equal those of the whole module."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_uneven_rows_rank, args=(port, str(tmp_path)), nprocs=2)
    assert [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)] == ["ok", "ok"]
