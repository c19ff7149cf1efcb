"""Training: token shards, the one Trainer (its objectives: pretraining and supervised fine-tuning,
full or LoRA), FSDP2 parallelism, checkpoints, planning at scale and LoRA adapters."""

from gptoss._lazy import lazy_attributes

_ORIGINS = {
    "gptoss.train.checkpoints": (
        "export_hf_model",
        "latest_checkpoint",
        "load_training_checkpoint",
        "save_training_checkpoint",
    ),
    "gptoss.train.data": (
        "Batches",
        "TokenSplit",
        "prepare_data",
        "read_shard",
        "write_dataset",
        "write_shard",
    ),
    "gptoss.train.lora": (
        "LoRAConfig",
        "apply_lora",
        "load_lora",
        "merge_adapter",
        "merge_lora",
        "save_lora",
    ),
    "gptoss.train.plan": (
        "GPUS",
        "plan_training",
    ),
    "gptoss.train.plot": (
        "plot_runs",
        "read_metrics",
    ),
    "gptoss.train.sft": (
        "SFTConfig",
        "finetune",
        "load_sft_config",
    ),
    "gptoss.train.trainer": (
        "Objective",
        "Pretraining",
        "StepBatch",
        "TrainConfig",
        "Trainer",
        "load_train_config",
        "train",
    ),
}
__all__ = [
    "GPUS",
    "Batches",
    "LoRAConfig",
    "Objective",
    "Pretraining",
    "SFTConfig",
    "StepBatch",
    "TokenSplit",
    "TrainConfig",
    "Trainer",
    "apply_lora",
    "export_hf_model",
    "finetune",
    "latest_checkpoint",
    "load_lora",
    "load_sft_config",
    "load_train_config",
    "load_training_checkpoint",
    "merge_adapter",
    "merge_lora",
    "plan_training",
    "plot_runs",
    "prepare_data",
    "read_metrics",
    "read_shard",
    "save_lora",
    "save_training_checkpoint",
    "train",
    "write_dataset",
    "write_shard",
]
__getattr__ = lazy_attributes(__name__, _ORIGINS)
