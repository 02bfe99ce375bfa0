"""Parameter-efficient fine-tuning: each method is a function that takes a model and returns it with a small
set of new trainable parameters (the base frozen), with a save / load (and, where it exists, merge) story."""
