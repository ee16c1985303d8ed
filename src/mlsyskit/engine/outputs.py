"""What the engine hands back: finished results and streaming deltas."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    """One request's state after a step (``finished`` once ``finish_reason`` is set).

    ``delta`` is the text that became final during this step (for streaming): stop strings are
    held back until they can no longer match, and an incomplete UTF-8 character is never split.
    """

    request_id: str
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    delta: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", "abort"
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    num_prefix_cached_tokens: int = 0
    num_preemptions: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def latency(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time
