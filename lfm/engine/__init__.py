"""Generation over the model: sampling and the offline LLM API."""
