"""Evaluation, one module per job (imported from their modules, so `llmkit --help` stays fast):

- `scoring`: log-likelihood of continuations (multiple choice, lm-eval's loglikelihood), rolling log-likelihood
- `perplexity`: sliding-window perplexity with token-level and bits-per-byte figures
- `metrics`: ROUGE (rouge-score), BLEU/chrF (sacrebleu), SQuAD exact match and token F1
- `tasks`, `runner`, `builtin`: JSONL task specs, few-shot prompts, the task runner, built-in tasks from real data
- `report`: Gauntlet-style aggregate report (JSON, Markdown, bar chart); the verb is `llmkit/commands/evaluate.py`
- `lm_eval_adapter`: llmkit as an lm-eval-harness model (`llmkit-lm-eval --model llmkit ...`)
"""
