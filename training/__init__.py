"""adapterserve.training: SFT and PEFT methods -> adapter directories the server serves as is.

from adapterserve.training import TrainSettings, train
result = train(TrainSettings(method="lora"), "train.jsonl", "adapters/my-task", eval_file="eval.jsonl")
"""

from adapterserve.training.errors import DataFormatError, SettingsError, TrainingError
from adapterserve.training.settings import METHODS, Method, TrainSettings
from adapterserve.training.train import TrainResult, train

__all__ = [
    "METHODS",
    "DataFormatError",
    "Method",
    "SettingsError",
    "TrainResult",
    "TrainSettings",
    "TrainingError",
    "train",
]
