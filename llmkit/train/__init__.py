"""The one training loop and its separable parts: objectives, optimizer and schedules, precision,
checkpoints, logging and distribution. Recipes (pretrain, finetune, ...) are thin functions over `loop.train`."""
