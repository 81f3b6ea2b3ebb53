"""edgeserve: deadline-aware OpenAI-compatible LLM serving for small boards."""
