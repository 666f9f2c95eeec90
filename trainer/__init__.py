"""`prefix-train` and `prefix-eval`: data -> a canonical prefix for the served model (PEFT +
transformers' Trainer) -> upload; evaluation through a running server; the demo model's
pretraining corpus and script."""
