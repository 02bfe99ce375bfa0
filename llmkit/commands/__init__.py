"""Every `llmkit` verb: a typed function whose docstring is its `--help`. Recipes that join several packages
(pretrain, fine-tune then evaluate, the PEFT shoot-out) live here too; nothing in llmkit imports this package
except `llmkit.cli`."""
