"""LoRA / QLoRA fine-tuning through torch + transformers + PEFT (+ bitsandbytes), on CUDA when there is a
GPU and on the CPU otherwise; IO-heavy steps (quantizing the base, merging) go to the Rust core."""

from lorafast.train.loop import TrainConfig, TrainResult, train
from lorafast.train.multi import load, predict, verify

__all__ = ["TrainConfig", "TrainResult", "train", "load", "predict", "verify"]
