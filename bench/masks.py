"""Mask agreement: IoU of the groups pruned by the `lora` and the `gradient` criterion, from the
same start (same model, seed, LoRA init and data order), at each ratio.

IoU = |pruned by both| / |pruned by either| over the prunable layers, for heads, MLP channels
and all groups together. Two independent random masks of the same ratio p have an expected IoU
of p / (2 - p): the chance level, given for reference.
"""

import torch

from loraprune import prune
from loraprune.pipeline.texts import load_text

from . import common, publish

NAME = "masks"


def arguments():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--ratios", type=common.floats, default=[0.1, 0.5])
    p.add_argument("--criteria", default="lora,gradient", help="exactly two criteria to compare")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--prune-freq", type=int, default=10)
    return p


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum().item()
    return (a & b).sum().item() / union if union else 1.0


def main(argv=None, model=None, tokenizer=None) -> dict:
    args = arguments().parse_args(argv)
    common.setup(args)
    base, tokenizer = common.load(args, model, tokenizer)
    train_text = load_text(args.data, "train")
    first, second = [c for c in args.criteria.split(",") if c]
    rows = []
    for ratio in args.ratios:
        pruned = {}
        for criterion in (first, second):
            config = common.budget(args, ratio, criterion)
            _, report = prune(common.fresh(base), tokenizer, train_text, config, progress=False)
            layers = [layer["index"] for layer in report["layers"] if layer["pruned"]]
            s = report["scores"]
            pruned[criterion] = (~s["head_alive"][layers], ~s["channel_alive"][layers])
        (ha, ca), (hb, cb) = pruned[first], pruned[second]
        row = {
            "ratio": ratio,
            "heads_iou": iou(ha, hb),
            "channels_iou": iou(ca, cb),
            "all_iou": iou(torch.cat([ha.flatten(), ca.flatten()]), torch.cat([hb.flatten(), cb.flatten()])),
            "heads_pruned": [int(ha.sum()), int(hb.sum())],
            "channels_pruned": [int(ca.sum()), int(cb.sum())],
            "chance_iou": ratio / (2 - ratio),
        }
        rows.append(row)
        print(f"[masks] {row}", flush=True)

    return publish.publish(args, argv, NAME, f"5. Mask agreement: {first} vs {second}", {"rows": rows})


def section(payload: dict, page, results) -> str:
    """The page's section of one run (its JSON)."""
    a = payload["args"]
    first, second = [c for c in a["criteria"].split(",") if c]
    return (
        f"`{first}` vs `{second}`, each {a['steps']} steps x batch {a['batch_size']} x {a['seq_len']} tokens, lr "
        f"{a['lr']:g}, prune every {a['prune_freq']}, seed {a['seed']}; IoU of the pruned groups over the prunable "
        f"layers; 'pruned': by `{first}`.\n\n"
        + common.table(
            [
                "ratio",
                "IoU heads",
                "IoU channels",
                "IoU all groups",
                "chance IoU p/(2-p)",
                "heads pruned",
                "channels pruned",
            ],
            [
                [
                    r["ratio"],
                    r["heads_iou"],
                    r["channels_iou"],
                    r["all_iou"],
                    r["chance_iou"],
                    r["heads_pruned"][0],
                    r["channels_pruned"][0],
                ]
                for r in payload["rows"]
            ],
        )  # fmt: skip
    )


if __name__ == "__main__":
    main()
