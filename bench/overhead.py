"""Overhead: median time of one LoRAPrune training step vs one plain peft LoRA step, same batch.

LoRAPrune step = forward + backward (mask hooks on), importance update (`Pruner.update_scores`),
AdamW step, zero_grad: the body of `loraprune.pipeline.train.train`. Plain step = the same without the
Pruner (no masks, no scoring). With `--distill ALPHA` each criterion is also timed with
self-distillation (its loss as `prune` builds it: one more forward of the dense teacher per step),
and with `--distill-top-k K` also from the dense model's top-K computed up front (no teacher forward).
With `--whole-logits` plain LoRA is also timed with transformers' own loss from the whole logits
(`labels=`) instead of the chunked loss of lm_loss.py. With `--cooldown` each criterion is also
timed as a step after the last pruning step runs (`Pruner.stop_scoring`: no scoring hooks, no
base-weight gradients; the masks stay).
The models are independent copies, stepped alternately (ABBA order) in one process on the same
batch; medians and their ratio are reported, and the scoring time of the LoRAPrune step is timed
on its own as well.
"""

import torch

from loraprune import PruneConfig
from loraprune.archs import arch_for
from loraprune.pipeline.lora import attach_lora
from loraprune.pipeline.pruner import Pruner
from loraprune.pipeline.teacher_cache import top_k_targets
from loraprune.pipeline.train import lora_optimizer
from loraprune.pruning import training_loss
from loraprune.tasks import TASKS

from . import common, publish

NAME = "overhead"


def arguments():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--criteria", default="lora", help="LoRAPrune criteria to time against plain LoRA")
    p.add_argument("--batch", type=common.shapes, default=[(4, 128)], help="BxS")
    p.add_argument("--rounds", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--distill", type=float, default=0.0, help="also time each criterion with --distill ALPHA (0: no)")
    p.add_argument("--distill-teachers", default="auto", help="--distill-teacher precisions timed with --distill")
    p.add_argument(
        "--distill-top-k",
        type=int,
        default=0,
        help="with --distill: also time it from the dense model's top-K computed up front (0: no)",
    )
    p.add_argument("--whole-logits", action="store_true", help="also time plain LoRA with transformers' loss")
    p.add_argument("--cooldown", action="store_true", help="also time each criterion after its last pruning step")
    return p


class Variant:
    def __init__(self, base, criterion: str | None, seed: int, distill: float = 0.0, teacher: str = "auto",
                 whole_logits: bool = False, cooldown: bool = False, top_k_batch: dict | None = None):  # fmt: skip
        config = PruneConfig(criterion=criterion or "lora", seed=seed, distill=distill, distill_teacher=teacher,
                             distill_top_k=top_k_batch["teacher_ids"].shape[-1] if top_k_batch else 0)  # fmt: skip
        self.top_k_batch = top_k_batch  # the batch with its dense top-k, as causal_lm.examples makes it
        arch = arch_for(base.config)
        self.model = attach_lora(common.fresh(base), arch, config)
        self.pruner = Pruner(self.model.get_base_model(), arch, config) if criterion else None
        if cooldown:  # a step after the last pruning step, as train() runs it
            self.pruner.stop_scoring()
        self.loss = training_loss(TASKS["causal-lm"], self.model, self.pruner, config)
        if whole_logits:
            self.loss = lambda model, batch: model(input_ids=batch, labels=batch).loss
        self.optimizer = lora_optimizer(self.model, lr=1e-4)
        self.model.train()

    def backward(self, batch):
        self.loss(self.model, batch if self.top_k_batch is None else self.top_k_batch).backward()

    def finish(self):
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def main(argv=None, model=None, tokenizer=None) -> dict:
    args = arguments().parse_args(argv)
    common.setup(args)
    base, tokenizer = common.load(args, model, tokenizer)
    criteria = [c for c in args.criteria.split(",") if c]
    results = []
    for b, s in args.batch:
        batch = common.token_windows(tokenizer, args.data, "train", s, b)
        torch.manual_seed(args.seed)
        variants = {"plain LoRA": Variant(base, None, args.seed)}
        if args.whole_logits:
            variants["plain LoRA (whole logits)"] = Variant(base, None, args.seed, whole_logits=True)
        variants.update({f"LoRAPrune ({c})": Variant(base, c, args.seed) for c in criteria})
        for c in criteria if args.cooldown else ():
            variants[f"LoRAPrune ({c}, cooldown)"] = Variant(base, c, args.seed, cooldown=True)
        for c in criteria if args.distill else ():
            for teacher in args.distill_teachers.split(","):
                suffix = f", teacher {teacher}" if teacher != "auto" else ""
                variants[f"LoRAPrune ({c}, distill {args.distill:g}{suffix})"] = Variant(
                    base, c, args.seed, args.distill, teacher
                )
        if args.distill and args.distill_top_k:
            ids, log_p = top_k_targets(base, batch, args.distill_top_k)
            top_k_batch = {"input_ids": batch, "teacher_ids": ids, "teacher_log_p": log_p}
            for c in criteria:
                variants[f"LoRAPrune ({c}, distill {args.distill:g}, top-{args.distill_top_k})"] = Variant(
                    base, c, args.seed, args.distill, top_k_batch=top_k_batch
                )
        timer = common.Timer()
        for r, name in common.alternated(list(variants), args.warmup + args.rounds):
            v, tag = variants[name], name if r >= args.warmup else "warmup"

            def step(v=v, tag=tag, batch=batch, timer=timer):
                v.backward(batch)
                if v.pruner is not None and v.pruner.scoring:
                    timer.time(f"{tag} / scoring", v.pruner.update_scores)
                v.finish()

            timer.time(tag, step)
        plain = timer.median("plain LoRA")
        for name in variants:
            row = {"batch": f"{b}x{s}", "variant": name, "median_s": timer.median(name), "samples": timer.samples[name]}
            row["ratio_vs_plain"] = row["median_s"] / plain
            if f"{name} / scoring" in timer.samples:
                row["scoring_median_s"] = timer.median(f"{name} / scoring")
            results.append(row)
            print(f"[overhead] {b}x{s} {name}: {row['median_s']:.3f} s, x{row['ratio_vs_plain']:.3f}", flush=True)
        del variants

    return publish.publish(args, argv, NAME, "3. Overhead: LoRAPrune step vs plain LoRA step", {"rows": results})


def section(payload: dict, page, results) -> str:
    """The page's section of one run (its JSON)."""
    args = payload["args"]
    rows = [
        [r["batch"], r["variant"], r["median_s"], r.get("scoring_median_s"), r["ratio_vs_plain"]]
        for r in payload["rows"]
    ]
    return (
        f"{args['rounds']} timed steps per variant after {args['warmup']} untimed ones, alternated (ABBA) in one "
        "process on the same batch; seconds are medians. Read the ratio: it is measured side by side, the absolute "
        "times move with the machine.\n\n"
        + common.table(["batch", "variant", "median step s", "of which scoring s", "step / plain LoRA step"], rows)
    )


if __name__ == "__main__":
    main()
