"""Serving: the engine, the OpenAI-compatible HTTP server and the load tester (`llmkit bench serve`)."""
