"""Training: corpora, tokenizer, two-stage training with FIM, evaluation."""
