"""Smoke tests of the benchmarks of the paper's open questions (bench/ema.py, schedules.py,
recovery.py) at tiny size, and of the pieces they add: the removal sets of ema.py, recovery on a
reloaded per-layer model."""

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from loraprune import PruneConfig, load_model, prune, save_pruned
from loraprune.pipeline.groups import LayerGroups
from loraprune.pipeline.texts import load_text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ is a folder of scripts next to src/, not an installed package

from bench import common, ema, recovery, schedules  # noqa: E402

TRAIN = ["--steps", "4", "--batch-size", "2", "--seq-len", "16", "--prune-freq", "1"]
TRAIN += ["--eval-windows", "4", "--eval-seq", "16"]


@pytest.fixture(scope="module")
def base(tiny_folder, tmp_path_factory):
    """The flags every run shares: tiny model, a corpus file, outputs in a temporary folder."""
    out = tmp_path_factory.mktemp("questions")
    corpus = out / "corpus.txt"
    g = torch.Generator().manual_seed(1)
    words = "the cat sat on a mat dog ran to park and it was big small red blue".split()
    corpus.write_text("\n".join(" ".join(words[i] for i in torch.randint(17, (12,), generator=g)) for _ in range(300)))
    args = ["--model", str(tiny_folder), "--data", str(corpus), "--label", "smoke", "--threads", "1"]
    args += ["--results", str(out / "results"), "--markdown", str(out / "BENCH.md")]
    return SimpleNamespace(out=out, model=str(tiny_folder), corpus=str(corpus), args=args)


def written(out: Path, name: str, title: str) -> dict:
    """The JSON of a run, after checking its markdown section."""
    text = (out / "BENCH.md").read_text()
    assert text.count(f"<!-- bench:{name} -->") == 1 and f"## {title}" in text
    return json.loads((out / "results" / f"{name}-smoke.json").read_text())


def test_removal_set_ranks_live_and_dead_groups_at_the_final_ratio():
    pruner = SimpleNamespace(
        groups=LayerGroups(heads=4, kv_heads=2, head_dim=2, channels=5),
        config=PruneConfig(uniform=False),
        prunable=[1],
        head_score=torch.tensor([[9.0, 9, 9, 9], [0.3, 0.1, 0.4, 0.2]]),
        channel_score=torch.tensor([[9.0] * 5, [5.0, 1, 4, 2, 3]]),
    )
    heads, channels = ema.removal_set(pruner, 0.5)  # 2 of 4 heads, 3 of 5 channels (2.5 rounds up)
    assert heads.tolist() == [[False, True, False, True]] and channels.tolist() == [[False, True, False, True, True]]
    assert ema.moved((heads, channels), (~heads, channels)) == pytest.approx(4 / 9)


def test_ema_reports_perplexity_and_flip_rates_per_lambda(base):
    payload = ema.main([*base.args, *TRAIN, "--emas", "0,0.9"])
    rows = written(base.out, "ema", "6.2 Moving-average sensitivity (λ)")["rows"]
    assert [r["ema"] for r in rows] == [0, 0.9] == [r["ema"] for r in payload["rows"]]
    for r in rows:
        assert len(r["pruning_steps"]) == 4 and len(r["flip_rates"]) == 3 == len(r["head_flip_rates"])
        assert all(0 <= rate <= 1 for rate in [*r["flip_rates"], *r["head_flip_rates"], r["final_vs_first"]])
        assert math.isfinite(r["perplexity"]["test@16"]) and math.isfinite(r["final_loss"])


def test_schedules_report_each_schedule_and_plot_sparsity(base):
    schedules.main([*base.args, *TRAIN, "--schedules", "cubic,oneshot"])
    data = written(base.out, "schedules", "6.3 Schedules")
    rows = {r["schedule"]: r for r in data["rows"]}
    assert set(rows) == {"cubic", "oneshot"}
    assert len(rows["oneshot"]["pruning_steps"]) == 1 < len(rows["cubic"]["pruning_steps"])
    for kind in ("heads", "channels"):  # the same target, however it was reached
        assert rows["oneshot"]["removed"][kind] == rows["cubic"]["removed"][kind] == 0.5
    assert set(rows["cubic"]["perplexity"]) == {"test@16", "valid@16"}
    assert Path(data["figure"]).stat().st_size > 1000
    assert "](results/schedules-smoke.png)" in (base.out / "BENCH.md").read_text()  # relative to the markdown


def test_recovery_reports_both_perplexities_with_fewer_parameters_per_ratio(base):
    recovery.main([*base.args, *TRAIN, "--ratios", "0.2,0.5", "--recovery-steps", "2"])
    data = written(base.out, "recovery", "6.4 Recovery after pruning")
    rows = data["rows"]
    assert [r["ratio"] for r in rows] == [0, 0.2, 0.5]
    assert rows[0]["parameters"] == data["dense_as_shipped"]["parameters"]
    assert rows[0]["parameters"] > rows[1]["parameters"] > rows[2]["parameters"]
    assert all(math.isfinite(v) for r in rows for v in r["perplexity"].values())
    assert Path(data["figure"]).stat().st_size > 1000


def test_recovery_fine_tunes_a_reloaded_per_layer_model(base, tmp_path):
    model, tokenizer = load_model(base.model)
    config = PruneConfig(ratio=0.5, steps=4, batch_size=2, seq_len=16, prune_freq=1)
    pruned, report = prune(model, tokenizer, load_text(base.corpus, "train"), config, progress=False)
    save_pruned(pruned, tokenizer, tmp_path / "pruned", report)
    reloaded, _ = load_model(str(tmp_path / "pruned"))
    assert type(reloaded).__name__.startswith("Pruned")
    options = recovery.arguments().parse_args([*base.args, *TRAIN, "--recovery-steps", "2"])
    windows = common.token_windows(tokenizer, base.corpus, "train", 16)
    before = {name: p.clone() for name, p in reloaded.state_dict().items()}
    recovered, losses = recovery.recover(reloaded, windows, options)
    assert len(losses) == 2 and all(map(math.isfinite, losses))
    after = recovered.state_dict()
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
