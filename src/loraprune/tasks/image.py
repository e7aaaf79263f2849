"""image-classification (ViT): cross-entropy on labels, evaluated by accuracy."""

import torch
from torch import Tensor, nn

from ..pipeline.counts import count_parameters
from .common import device_of, throughput, to_device


def forward(model: nn.Module, batch: dict):
    return model(**to_device(batch, device_of(model)))  # with labels: the model's own cross-entropy


def examples(model, processor, images: tuple[Tensor, Tensor], config, store=None, progress=False) -> dict:
    pixel_values, labels = images
    return {"pixel_values": pixel_values, "labels": labels}


def meta_inputs(model_config, batch_size: int, seq_len: int) -> dict:
    size, channels = model_config.image_size, model_config.num_channels
    pixel_values = torch.zeros(batch_size, channels, size, size, device="meta")
    return {"pixel_values": pixel_values, "labels": torch.zeros(batch_size, dtype=torch.long, device="meta")}


def eval_set(model, processor, images: tuple[Tensor, Tensor], seq_len: int, limit: int | None) -> dict:
    pixel_values, labels = images
    return {"pixel_values": pixel_values[:limit], "labels": labels[:limit]}


@torch.inference_mode()
def predict(model, pixel_values: Tensor, batch_size: int) -> Tensor:
    device = device_of(model)
    return torch.cat(
        [
            model(pixel_values=pixel_values[i : i + batch_size].to(device)).logits.argmax(-1).cpu()
            for i in range(0, len(pixel_values), batch_size)
        ]
    )


def timed_pass(model, eval_set: dict, batch_size: int = 64) -> Tensor:
    model.eval()
    return predict(model, eval_set["pixel_values"], batch_size)


def evaluate(model, eval_set: dict, batch_size: int = 64, progress: bool = False) -> dict:
    was_training = model.training
    model.eval()
    try:
        pixel_values, labels = eval_set["pixel_values"], eval_set["labels"]
        predictions = predict(model, pixel_values, batch_size)
        rate = throughput(lambda: predict(model, pixel_values, batch_size), len(labels))
    finally:
        model.train(was_training)
    return {
        "accuracy": (predictions == labels).float().mean().item(),
        "images": len(labels),
        "images_per_second": rate,
        "parameters": count_parameters(model),
    }
