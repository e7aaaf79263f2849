"""A small ViT trained on scikit-learn's digits: the image-classification model to prune.

No pretrained ViT ships offline, so we make one: ViTForImageClassification on 8×8 gray images,
patch size 2 (16 patches + CLS), hidden 64, 4 layers, 4 heads, MLP 256, trained from a fixed
seed on the fixed 80% train split (`data.load_images('digits', 'train')`) for 40 epochs of
AdamW (one-cycle, peak lr 1e-3; ~30 s on 2 CPU cores). Test accuracy is measured on the 20% split and written to
`train_info.json`. The folder is a normal Hugging Face folder: config, safetensors weights and
a ViTImageProcessor (no resize; rescale 1/16; normalise mean 0.5, std 0.5) that turns raw
0..16 digit images into the same pixel_values as `load_images`.

    python -m loraprune.pipeline.vit_digits --output DIR    # or scripts/train_vit_digits.py
    loraprune prune --model vit-digits ...          # builds it into the cache on first use
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch

from .data import load_images

EMBEDDED = "vit-digits"
CACHE = Path(os.environ.get("LORAPRUNE_CACHE", Path.home() / ".cache" / "loraprune")) / EMBEDDED


def vit_config():
    from transformers import ViTConfig

    return ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=10,
        id2label={i: str(i) for i in range(10)},
        label2id={str(i): i for i in range(10)},
    )


def image_processor():
    from transformers import ViTImageProcessor

    return ViTImageProcessor(
        do_resize=False,
        do_rescale=True,
        rescale_factor=1 / 16,
        do_normalize=True,
        image_mean=[0.5],
        image_std=[0.5],
        size={"height": 8, "width": 8},
    )


@torch.no_grad()
def accuracy(model, pixel_values: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    model.eval()
    correct = sum(
        (model(pixel_values=pixel_values[i : i + batch_size]).logits.argmax(-1) == labels[i : i + batch_size]).sum()
        for i in range(0, len(labels), batch_size)
    )
    return int(correct) / len(labels)


def train_vit_digits(output: str | Path = CACHE, epochs: int = 40, seed: int = 0, batch_size: int = 64) -> dict:
    """Train the digits ViT from `seed` and save it to `output`; returns what train_info.json holds."""
    from transformers import ViTForImageClassification

    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    try:
        torch.manual_seed(seed)
        model = ViTForImageClassification(vit_config())
        x, y = load_images("digits", "train")
        x_test, y_test = load_images("digits", "test")
        steps = epochs * -(-len(y) // batch_size)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.1)
        g = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            model.train()
            order = torch.randperm(len(y), generator=g)
            for i in range(0, len(y), batch_size):
                index = order[i : i + batch_size]
                loss = model(pixel_values=x[index], labels=y[index]).loss
                loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        info = {
            "test_accuracy": accuracy(model, x_test, y_test),
            "train_accuracy": accuracy(model, x, y),
            "epochs": epochs,
            "seed": seed,
            "train_images": len(y),
            "test_images": len(y_test),
            "seconds": round(time.perf_counter() - started, 1),
        }
    finally:
        torch.set_num_threads(threads)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    image_processor().save_pretrained(output)
    (output / "train_info.json").write_text(json.dumps(info, indent=2))
    return info


def ensure_vit_digits(folder: str | Path = CACHE) -> Path:
    """The digits ViT folder, trained into `folder` first if it is not there yet."""
    folder = Path(folder)
    if not (folder / "model.safetensors").is_file():
        staging = folder.with_name(folder.name + f".partial-{os.getpid()}")
        train_vit_digits(staging)
        if not (folder / "model.safetensors").is_file():  # another process may have made it meanwhile
            if folder.exists():
                import shutil

                shutil.rmtree(folder)
            staging.rename(folder)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="train the digits ViT fixture")
    parser.add_argument("--output", default=str(CACHE))
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(train_vit_digits(args.output, args.epochs, args.seed), indent=2))


if __name__ == "__main__":
    main()
