"""Smoke test of the benchmark scripts (bench/) at tiny size, so they cannot rot: the real code
paths (prune, perplexity, subprocess memory runs, timing, the pages built from the JSON) on a tiny llama."""

import json
import re
import sys
from pathlib import Path

import pytest

from loraprune.pipeline import teacher_cache

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ is a folder of scripts next to src/, not an installed package

from bench import common, masks, memory, overhead, progressive, publish, quality, speed  # noqa: E402

TRAIN = ["--steps", "4", "--batch-size", "2", "--seq-len", "16", "--prune-freq", "1"]
RUNS = {
    quality: [*TRAIN, "--ratios", "0.5", "--criteria", "lora,magnitude", "--eval-windows", "4", "--eval-seq", "16"]
    + ["--long-seq", "32"],
    memory: ["--batches", "2x16", "--steps", "1", "--distill", "0.5"],
    overhead: ["--batch", "2x16", "--rounds", "2", "--warmup", "1", "--distill", "0.5"],
    speed: ["--ratios", "0.5", "--shapes", "1x16", "--rounds", "2", "--new-tokens", "3", "--gen-rounds", "1"]
    + ["--prune-steps", "2"],
    masks: [*TRAIN, "--ratios", "0.5"],
    progressive: [*TRAIN, "--ratios", "0.5", "--eval-windows", "4", "--eval-seq", "16"],
}


@pytest.fixture(scope="module")
def outputs(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    corpus = out / "corpus.txt"
    words = "the cat sat on a mat dog ran to park and it was big small red blue".split()
    corpus.write_text("\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(300)))
    base = ["--model", str(tiny_folder), "--data", str(corpus), "--label", "smoke", "--threads", "1"]
    base += ["--results", str(out / "results"), "--markdown", str(out / "BENCH.md")]
    payloads = {module.NAME: module.main([*base, *args]) for module, args in RUNS.items()}
    return out, payloads, base


def test_every_benchmark_writes_json_and_its_markdown_section(outputs):
    out, payloads, _ = outputs
    text = (out / "BENCH.md").read_text()
    for name in ("quality", "memory", "overhead", "speed", "masks", "progressive"):
        data = json.loads((out / "results" / f"{name}-smoke.json").read_text())
        assert data["machine"]["cores"] >= 1 and data["command"].startswith(".venv/bin/python -m bench.")
        assert text.count(f"<!-- bench:{name} -->") == 1 and text.count(f"<!-- /bench:{name} -->") == 1
    quality_rows = {r["name"]: r for r in payloads["quality"]["rows"]}
    assert set(quality_rows) == {"dense, as shipped", "dense+lora", "lora 0.5", "magnitude 0.5"}
    assert quality_rows["lora 0.5"]["parameters"]["total"] < quality_rows["dense+lora"]["parameters"]["total"]
    assert "test@32" in quality_rows["lora 0.5"]["perplexity"]
    runs = payloads["memory"]["runs"]
    assert {(r["criterion"], r["distill"]) for r in runs} == {
        ("lora", 0),
        ("gradient", 0),
        ("sketch", 0),
        ("lora", 0.5),
    }
    assert all(r["estimated_peak_MiB"] > r["breakdown_MiB"]["base weights"] for r in runs)
    grads = {r["criterion"]: r["breakdown_MiB"]["base-weight gradients (dL/dW0)"] for r in payloads["memory"]["runs"]}
    assert grads["lora"] == grads["sketch"] == 0 < grads["gradient"]
    variants = {r["variant"] for r in payloads["overhead"]["rows"]}
    assert variants == {"plain LoRA", "LoRAPrune (lora)", "LoRAPrune (lora, distill 0.5)"}
    limits = [r["mac_limit"] for r in payloads["speed"]["rows"] if r["variant"] != "dense" and "mac_limit" in r]
    assert limits and all(limit > 1 for limit in limits)
    (row,) = payloads["masks"]["rows"]
    assert 0 <= row["all_iou"] <= 1
    runs = {run["mode"]: run for run in payloads["progressive"]["runs"]}
    assert runs["end"]["parameters"][-1] == runs["end"]["parameters"][0] > runs["progressive"]["parameters"][-1]
    assert runs["progressive"]["parameters"][-1] == runs["progressive"]["parameters_after"]
    assert set(runs["end"]["peak_rss_MiB"]) == {"load", "set-up", "pruning loop", "shrink + merge", "evaluation"}


def test_a_rerun_replaces_only_its_own_section(outputs):
    out, _, base = outputs
    before = (out / "BENCH.md").read_text()
    masks.main([*base, *RUNS[masks]])
    after = (out / "BENCH.md").read_text()
    assert after.count("<!-- bench:masks -->") == 1
    assert after.split("<!-- bench:masks -->")[0] == before.split("<!-- bench:masks -->")[0]


def test_table_and_markers(tmp_path):
    path = tmp_path / "B.md"
    publish.update_markdown(path, "x", "X", "first body")
    publish.update_markdown(path, "y", "Y", "second body")
    publish.update_markdown(path, "x", "X", common.table(["a", "b"], [[1, 0.5]]))
    text = path.read_text()
    assert (
        "first body" not in text
        and "second body" in text
        and "| 1 | 0.5 |" in text
        and text.index("bench:x") < text.index("bench:y")
    )


def test_a_recorded_command_runs_from_the_checkout(tmp_path, monkeypatch):
    """The command in a JSON names paths relative to where it ran, and leaves out a checkout's own
    bench/results, so it reruns from any clone."""
    monkeypatch.chdir(tmp_path)
    argv = ["--results", str(tmp_path / "other" / "bench" / "results"), "--save", str(tmp_path / "runs" / "x"),
            "--data", "/elsewhere/t.txt", "a=streamed:0.2"]  # fmt: skip
    assert common.command(argv, "bench.recipes") == (
        ".venv/bin/python -m bench.recipes --save runs/x --data /elsewhere/t.txt a=streamed:0.2"
    )


def test_a_page_is_built_from_the_json_alone_and_carries_no_provenance(outputs, tmp_path, monkeypatch):
    from bench import pages

    out, payloads, base = outputs
    monkeypatch.setattr(common, "PAGES", tmp_path / "pages")
    args = quality.arguments().parse_args(base[:-2])  # without --markdown
    assert args.markdown is None  # the default: docs/benchmarks/<page>.md, here under tmp_path
    publish.write_page(args, "quality", "quality", "unused")
    text = (tmp_path / "pages" / "quality.md").read_text()
    assert text.startswith(f"# {pages.PAGES['quality'].title}\n") and "\n## smoke\n" in text
    assert "| lora 0.5 |" in text and "quality-smoke.json" in text
    machine = payloads["quality"]["machine"]
    assert machine["commit"] and machine["date"] not in text and machine["cpu"] not in text
    # rebuilt from the JSON, without the run: the same page
    assert pages.page("quality", out / "results", tmp_path / "pages" / "quality.md") == text


def test_a_stale_result_is_left_out_until_it_is_measured_again(outputs, tmp_path, monkeypatch):
    from bench import pages

    out, _, _ = outputs
    results = out / "results"
    path = results / "masks-smoke.json"
    monkeypatch.setitem(pages.STALE, "masks-smoke.json", (pages.fingerprint(path), "code changed"))
    assert pages.results_of("masks", results) == []
    assert "No current measurement" in pages.body("masks", results, tmp_path / "masks.md")
    assert [r.label for r in pages.results_of("masks", results, stale_too=True)] == ["smoke"]
    monkeypatch.setitem(pages.STALE, "masks-smoke.json", ("0" * 12, "another file"))  # a rerun: shown again
    assert [r.label for r in pages.results_of("masks", results)] == ["smoke"]


def test_bench_pages_checks_and_writes_every_page(outputs, tmp_path):
    from bench import pages

    out, _, _ = outputs
    argv = ["--results", str(out / "results"), "--pages", str(tmp_path), "--claims", str(tmp_path / "CLAIMS.md")]
    assert pages.main([*argv, "--check"]) == 1 and not (tmp_path / "quality.md").exists()
    assert pages.main(argv) == 0 and pages.main([*argv, "--check"]) == 0
    assert {p.stem for p in tmp_path.glob("*.md")} == {*pages.PAGES, "CLAIMS"}


def test_the_gpu_scale_script_runs_at_tiny_size_on_cpu(tmp_path):
    """bench/gpu_scale.py waits for a lent GPU; its code paths run here on a toy of the same family."""
    from bench import gpu_scale

    argv = ["--shape", "tiny", "--device", "cpu", "--batch", "1x32", "--latency-batch", "1x32", "--steps", "1"]
    argv += ["--rounds", "2", "--checkpointing", "off", "--label", "smoke", "--threads", "1"]
    payload = gpu_scale.main([*argv, "--results", str(tmp_path), "--markdown", str(tmp_path / "B.md")])
    assert [r["criterion"] for r in payload["steps"]] == ["lora", "gradient", "sketch"]
    assert all(r["peak_GB"] > r["weights_GB"] > 0 for r in payload["steps"])
    forwards = {r["model"]: r for r in payload["forwards"]}
    assert forwards["50% pruned"]["parameters"] < forwards["dense"]["parameters"]
    assert "<!-- bench:gpu_scale-smoke -->" in (tmp_path / "B.md").read_text()


def test_recipes_write_one_json_per_run_skip_done_runs_and_rebuild_the_table(outputs, capsys):
    from bench import recipes

    out, _, base = outputs
    budget = ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--prune-freq", "1"]
    budget += ["--eval-windows", "2", "--eval-seq", "16"]
    recipes.main([*base, *budget, "kd=lora:0.5:distill=0.5,distill_top_k=0", "shipped=none"])
    folder = out / "results" / "recipes-smoke"
    kd = json.loads((folder / "kd.json").read_text())
    assert kd["config"]["distill"] == 0.5 and kd["config"]["shrink"] == "end"  # distillation needs the dense layers
    assert set(kd["perplexity"]) == {"ptb test", "ptb valid", "pydoc test"}
    assert json.loads((folder / "shipped.json").read_text())["config"] is None
    recipes.main([*base, *budget, "kd=lora:0.5"])  # a name already measured is not run again
    assert "kd: done before" in capsys.readouterr().out
    recipes.main([*base, *budget])  # no runs: the table is rebuilt from the JSON present
    section = (out / "BENCH.md").read_text().split("<!-- bench:recipes-smoke -->")[1]
    assert re.search(r"\| kd \| lora:0.5:distill=0.5,distill_top_k=0 \| \d+ \| end \|", section)
    assert "| shipped | none |  |  |" in section


def test_a_recipe_run_stopped_part_way_continues_from_its_checkpoint(outputs, tmp_path, monkeypatch):
    """--checkpoints: a run killed after a checkpoint ends, when run again, as the run never stopped."""
    from bench import recipes

    _, _, base = outputs
    argv = [*base, "--results", str(tmp_path / "results"), "--checkpoints", str(tmp_path / "ck")]
    argv += ["--steps", "4", "--batch-size", "2", "--seq-len", "16", "--prune-freq", "1"]
    argv += ["--eval-windows", "2", "--eval-seq", "16"]
    run = "streamed:0.5:distill=0.9,distill_top_k=8"  # progressive shrinking, top-k kept beside the checkpoints
    monkeypatch.setattr(recipes, "CHECKPOINT_EVERY", 1)
    recipes.main([*argv, f"whole={run}"])
    assert len(list((tmp_path / "ck" / "teacher-cache").glob("*/COMPLETE"))) == 1
    # later runs on the same windows read it back
    monkeypatch.setattr(teacher_cache, "_fill", lambda *a, **k: pytest.fail("the dense model's top-k ran again"))

    class Killed(Exception):
        pass

    save = recipes.Checkpointer.save

    def save_then_die(self, step, *rest, **kw):
        folder = save(self, step, *rest, **kw)
        if step == 2:
            raise Killed
        return folder

    monkeypatch.setattr(recipes.Checkpointer, "save", save_then_die)
    with pytest.raises(Killed):
        recipes.main([*argv, f"parted={run}"])
    assert (tmp_path / "ck" / "parted" / "step-000002").is_dir()
    monkeypatch.setattr(recipes.Checkpointer, "save", save)
    with pytest.raises(SystemExit, match="unfinished run"):
        recipes.main([*argv, "parted=streamed:0.3"])
    recipes.main([*argv, f"parted={run}"])
    folder = tmp_path / "results" / "recipes-smoke"
    whole, parted = (json.loads((folder / f"{name}.json").read_text()) for name in ("whole", "parted"))
    assert parted["resumed_from_step"] == 2 and whole["resumed_from_step"] is None
    assert parted["perplexity"] == whole["perplexity"] and parted["masks"] == whole["masks"]
    assert not (tmp_path / "ck" / "parted").exists() and not (tmp_path / "ck" / "whole").exists()

    def evaluation_dies(*_):
        raise Killed

    monkeypatch.setattr(recipes.common, "perplexities", evaluation_dies)  # killed after the last step
    with pytest.raises(Killed):
        recipes.main([*argv, f"late={run}"])
    assert recipes.has_checkpoints(tmp_path / "ck" / "late")
