"""LLM inference engine: paged KV cache, continuous batching, chunked prefill, preemption."""
