"""roberta_fast.train: fine-tuning for sequence classification, token classification and extractive QA
(docs/finetune.md).

    from roberta_fast.train import TrainArgs, Trainer, train
    result = train(model_dir="ckpt", train="train.jsonl", eval="dev.jsonl", task="seq-cls", output="out",
                   precision="bf16", batch_tokens=8192, epochs=3)

The CLI is `roberta-fast finetune MODEL_DIR --train FILE --task seq-cls|token-cls|qa --output DIR` (cli.py
here); data-parallel runs are the same command under `torchrun --nproc-per-node N`.
"""

from . import builtin, checkpoint, data, optim  # noqa: F401
from .checkpoint import CheckpointError  # noqa: F401
from .data import TASKS, DataError, load_dataset, load_tokenizer, plan_batches  # noqa: F401
from .trainer import TrainArgs, Trainer, TrainResult, load_model, loss_sum, train  # noqa: F401
