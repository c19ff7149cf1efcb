"""Pretraining: token shards, the trainer, FSDP2 parallelism, checkpoints, and planning at scale."""

from gptoss.train.checkpoints import (
    export_hf_model,
    latest_checkpoint,
    load_training_checkpoint,
    save_training_checkpoint,
)
from gptoss.train.data import Batches, TokenSplit, prepare_data, read_shard, write_dataset, write_shard
from gptoss.train.plan import GPUS, plan_training
from gptoss.train.plot import plot_runs, read_metrics
from gptoss.train.trainer import TrainConfig, Trainer, load_train_config, train

__all__ = [
    "GPUS",
    "Batches",
    "TokenSplit",
    "TrainConfig",
    "Trainer",
    "export_hf_model",
    "latest_checkpoint",
    "load_train_config",
    "load_training_checkpoint",
    "plan_training",
    "plot_runs",
    "prepare_data",
    "read_metrics",
    "read_shard",
    "save_training_checkpoint",
    "train",
    "write_dataset",
    "write_shard",
]
