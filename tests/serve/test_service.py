"""EngineService in-process, on the real SmolLM2 engine: batching modes, aborts, backpressure,
validation and graceful stop."""

from __future__ import annotations

import asyncio

import pytest

from mlsyskit.engine import LLM, LLMEngine, SamplingParams
from mlsyskit.serve.service import (
    EngineService,
    QueueFullError,
    RequestError,
    ServiceUnavailableError,
)

PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "def fibonacci(n):", "Roses are red,", "The sun rises in the", "My name is"]
GREEDY = SamplingParams(max_tokens=8, temperature=0)
LONG = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)  # runs until aborted


@pytest.fixture(scope="module")
def engine(smollm2_checkpoint) -> LLMEngine:
    return LLMEngine(smollm2_checkpoint, max_model_len=128, num_kv_blocks=96, max_num_seqs=16)


@pytest.fixture(scope="module")
def reference(smollm2_checkpoint) -> list[str]:
    """The offline engine's greedy text for PROMPTS, all in one batch."""
    llm = LLM(smollm2_checkpoint, max_model_len=128, num_kv_blocks=96)
    return [o.text for o in llm.generate(PROMPTS, GREEDY)]


def make(engine: LLMEngine, **kw) -> EngineService:
    return EngineService(engine, model_name="smollm2", **kw)


async def wait_idle(service: EngineService, timeout: float = 10.0) -> dict:
    for _ in range(int(timeout / 0.02)):
        s = service.stats()
        if s["in_flight"] == 0 and s["kv_blocks_used"] == 0:
            return s
        await asyncio.sleep(0.02)
    raise AssertionError(f"service never went idle: {service.stats()}")


@pytest.mark.parametrize("batching", ["continuous", "window", "none"])
def test_batching_modes_same_greedy_text(engine, reference, batching):
    service = make(engine, batching=batching, max_batch_size=4, max_wait_ms=30)

    async def main() -> tuple[list, dict]:
        await service.start()
        try:
            outs = await asyncio.gather(*(service.generate(p, GREEDY) for p in PROMPTS))
            return outs, await wait_idle(service)
        finally:
            await service.stop()

    outs, stats = asyncio.run(main())
    assert [o.text for o in outs] == reference
    assert all(o.finished and o.ttft is not None and o.latency >= o.ttft for o in outs)
    assert stats["tokens_generated"] == sum(len(o.token_ids) for o in outs)
    assert stats["requests_finished"] == len(PROMPTS)
    # How many requests shared the engine at once is what tells the modes apart.
    peak = stats["peak_running"]
    if batching == "none":
        assert peak == 1
    elif batching == "window":
        assert 2 <= peak <= 4
    else:
        assert peak >= 2


def test_window_waits_for_max_wait(engine):
    """A lone request in window mode waits about max_wait_ms for company, then runs alone."""
    service = make(engine, batching="window", max_batch_size=8, max_wait_ms=300)

    async def main():
        await service.start()
        try:
            return await service.generate("Hello", SamplingParams(max_tokens=1, temperature=0))
        finally:
            await service.stop()

    out = asyncio.run(main())
    assert out.ttft >= 0.29  # queueing time is part of TTFT


def test_stream_deltas_and_abort_frees_blocks(engine):
    service = make(engine)

    async def main() -> tuple[list, dict, dict]:
        await service.start()
        try:
            s = service.stream("Once upon a time", LONG)
            seen = []
            async for out in s:
                seen.append(out)
                if len(seen) == 3:
                    break
            during = service.stats()
            await s.aclose()  # the consumer leaves: the request is aborted
            after = await wait_idle(service)
            return seen, during, after
        finally:
            await service.stop()

    seen, during, after = asyncio.run(main())
    assert during["kv_blocks_used"] > 0
    assert all(not o.finished for o in seen)
    assert "".join(o.delta for o in seen) == seen[-1].text
    assert after["requests_aborted"] >= 1 and after["kv_blocks_used"] == 0


def test_cancelled_generate_aborts(engine):
    service = make(engine)

    async def main() -> dict:
        await service.start()
        try:
            task = asyncio.create_task(service.generate("Tell me a story.", LONG))
            for _ in range(500):  # until it is running in the engine
                await asyncio.sleep(0.01)
                if service.stats()["running"]:
                    break
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return await wait_idle(service)
        finally:
            await service.stop()

    stats = asyncio.run(main())
    assert stats["requests_aborted"] == 1 and stats["tokens_generated"] < 100


def test_queue_full(engine):
    service = make(engine, batching="none", max_queue=1)

    async def main():
        await service.start()
        accepted, error = [], None
        try:
            for _ in range(3):  # one may start running before the next arrives; the third cannot fit
                try:
                    accepted.append(service.stream("Hi", SamplingParams(max_tokens=4, temperature=0)))
                except QueueFullError as e:
                    error = e
                    break
            outs = [await _last(s) for s in accepted]
            return accepted, error, outs
        finally:
            await service.stop()

    accepted, error, outs = asyncio.run(main())
    assert error is not None and error.retry_after >= 1 and "queue is full" in str(error)
    assert 1 <= len(accepted) <= 2 and all(o.finished for o in outs)


async def _last(stream):
    out = None
    async for out in stream:  # noqa: B007
        pass
    return out


def test_validation_before_queueing(engine):
    service = make(engine)

    async def main() -> list[RequestError]:
        await service.start()
        errors = []
        try:
            for prompt, params in [
                ("word " * 200, SamplingParams(max_tokens=1)),  # prompt longer than the context
                ("Hi", SamplingParams(max_tokens=128)),  # prompt + max_tokens > context
                ("", SamplingParams(max_tokens=1)),
                ([10**9], SamplingParams(max_tokens=1)),
            ]:
                with pytest.raises(RequestError) as e:
                    service.stream(prompt, params)
                errors.append(e.value)
            with pytest.raises(RequestError) as e:
                service.chat_prompt([{"role": "user"}])
            errors.append(e.value)
            assert service.stats()["in_flight"] == 0
        finally:
            await service.stop()
        return errors

    errors = asyncio.run(main())
    assert [e.param for e in errors] == ["prompt", "max_tokens", "prompt", "prompt", "messages"]
    assert "context holds 128" in str(errors[0]) and "at most" in str(errors[1])


def test_stop_drains_then_refuses(engine):
    service = make(engine)

    async def main():
        await service.start()
        task = asyncio.create_task(service.generate("The capital of France is", SamplingParams(max_tokens=12, temperature=0)))
        await asyncio.sleep(0.05)
        await service.stop(drain_timeout=60)
        out = await task
        with pytest.raises(ServiceUnavailableError):
            service.stream("Hi", GREEDY)
        return out

    out = asyncio.run(main())
    assert out.finish_reason in ("length", "stop") and out.finish_reason != "abort"


def test_stop_timeout_aborts_in_flight(engine):
    service = make(engine)

    async def main():
        await service.start()
        task = asyncio.create_task(service.generate("Tell me a story.", LONG))
        await asyncio.sleep(0.1)
        await service.stop(drain_timeout=0)
        return await task, service.stats()

    out, stats = asyncio.run(main())
    assert out.finish_reason == "abort" and len(out.token_ids) < 100
    assert stats["kv_blocks_used"] == 0 and stats["in_flight"] == 0
    assert not engine.has_unfinished()
