"""Serving: an OpenAI-compatible HTTP server on the engine, RAG, a router over replicas,
autoscaling and a load generator."""
