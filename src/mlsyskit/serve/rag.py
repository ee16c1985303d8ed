"""RAG and embedding routes: ``build_rag_router(service, docs)`` gives a FastAPI router.

* ``POST /v1/rag``: ``{query, k=3, max_tokens=128, temperature=0, stream=false, model?}``:
  embed the query with MiniLM, retrieve the top-k documents by dot product (cosine), ask the
  engine to answer from them (numbered [1], [2]... for citations) and return
  ``{id, object: "rag.completion", model, answer, documents: [{id, title, source, score, text,
  in_context}], usage}``. ``stream: true``: server-sent events, the documents in the first
  chunk, text deltas after, ``data: [DONE]`` last.
* ``POST /rag``: the course's body ``{query, k=2}`` (``max_tokens`` optional); the same answer
  plus ``query`` and ``result`` (the generated text, as the course's reference service returns).
* ``POST /v1/documents``: ``{documents: [{text, id?, title?, source?}]}`` or ``{texts: [...]}``;
  long texts are chunked. ``GET /v1/documents?offset=&limit=``: the count and the ids, paged.
  ``GET /v1/documents/{id}``: one document.
* ``POST /v1/embeddings``: OpenAI's embeddings API with all-MiniLM-L6-v2 (384 dimensions, unit
  length; inputs longer than its 256-token window are truncated, as sentence-transformers does),
  ``encoding_format`` "float" or "base64" (little-endian float32, the ``openai`` client's
  default). The app lists this model in ``GET /v1/models`` (``type: "embedding"``) when these
  routes are served.

Embedding and retrieval run in worker threads (``asyncio.to_thread``) so the event loop keeps
serving other requests. With ``docs=None`` the default corpus (Python's documentation topics,
see :mod:`mlsyskit.serve.documents`) is loaded on first use; a ``docs`` path is loaded at once,
so a bad path fails at start with one clear line.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from mlsyskit.errors import UserError
from mlsyskit.serve.documents import (
    CHUNK_WORDS,
    EMBED_DIM,
    DocumentStore,
    DuplicateIdError,
    Retrieved,
    build_messages,
    check_text,
    embed,
    fit_context,
)
from mlsyskit.serve.protocol import ERROR_RESPONSES, model_not_found, openai_error
from mlsyskit.serve.service import QueueFullError, RequestError, ServiceUnavailableError

EMBEDDING_MODEL = "all-MiniLM-L6-v2"
EMBEDDING_MODEL_ALIASES = frozenset({"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"})
MAX_EMBED_INPUTS = 2048  # OpenAI's limit per request
MAX_K = 20
MAX_ADD = 1000  # documents per POST /v1/documents
MAX_QUERY_CHARS = 10_000
# CPU time per call is bounded: MiniLM reads ~1,500-3,000 tokens/s per core on this kind of CPU.
MAX_EMBED_TOKENS = 32_768  # tokens summed over the inputs of one /v1/embeddings call
MAX_ADD_WORDS = 20_000  # words in one POST /v1/documents call (larger corpora: --docs at start)


# -- request bodies -------------------------------------------------------------------------------
class RagRequest(BaseModel):
    """POST /v1/rag."""

    model_config = ConfigDict(extra="ignore")
    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS, description="the question")
    k: int = Field(3, ge=1, le=MAX_K, description="documents to retrieve")
    max_tokens: int = Field(128, ge=1, description="most tokens in the answer")
    temperature: float = Field(0.0, ge=0, le=2, description="0 is greedy")
    stream: bool = False
    model: str | None = Field(None, description="the served model's id (optional)")


class CourseRagRequest(BaseModel):
    """POST /rag: the course's reference body."""

    model_config = ConfigDict(extra="ignore")
    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS)
    k: int = Field(2, ge=1, le=MAX_K)
    max_tokens: int = Field(128, ge=1)


class DocumentIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    text: str = Field(min_length=1)
    id: str | None = Field(None, min_length=1, max_length=256)
    title: str | None = None
    source: str | None = None


class AddDocumentsRequest(BaseModel):
    """POST /v1/documents: ``documents`` (with optional ids, titles, sources) or plain ``texts``."""

    model_config = ConfigDict(extra="ignore")
    documents: list[DocumentIn] | None = Field(None, max_length=MAX_ADD)
    texts: list[str] | None = Field(None, max_length=MAX_ADD)


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings (OpenAI's shape)."""

    model_config = ConfigDict(extra="ignore")
    input: str | list[str] | list[int] | list[list[int]] = Field(description="a text or a list of texts")
    model: str = Field(EMBEDDING_MODEL, description=f"'{EMBEDDING_MODEL}'")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, description=f"must be {EMBED_DIM} if given")
    user: str | None = None


# -- helpers --------------------------------------------------------------------------------------
def is_embedding_model(model: str | None) -> bool:
    """Whether ``model`` names the embedding model (any of the ids /v1/embeddings accepts)."""
    return model is not None and model.lower() in EMBEDDING_MODEL_ALIASES


def embedding_model_card(created: int) -> dict[str, Any]:
    """The embedding model's entry in GET /v1/models (see :class:`~mlsyskit.serve.protocol.ModelCard`)."""
    from mlsyskit.vector.embed import MAX_TOKENS

    return {
        "id": EMBEDDING_MODEL, "object": "model", "created": created, "owned_by": "mlsyskit",
        "type": "embedding", "capabilities": ["embedding"], "max_model_len": MAX_TOKENS, "dimensions": EMBED_DIM,
    }


def not_a_chat_model(model: str, served: str) -> JSONResponse:
    """404 for the embedding model named on a route that generates text (as OpenAI answers)."""
    return openai_error(
        404, f"'{model}' is an embedding model: use it with POST /v1/embeddings; this route needs "
        f"the chat model '{served}'", param="model", code="model_not_found")


def _error_for(exc: Exception, param: str | None = None) -> JSONResponse:
    """The HTTP answer for an exception from the service or the store."""
    if isinstance(exc, QueueFullError):
        retry = str(max(1, int(np.ceil(exc.retry_after))))
        return openai_error(429, str(exc), "rate_limit_error", code="queue_full", headers={"Retry-After": retry})
    if isinstance(exc, RequestError):
        return openai_error(400, str(exc), param=exc.param or param)
    if isinstance(exc, DuplicateIdError):
        return openai_error(409, str(exc), param=param, code="duplicate_id")
    if isinstance(exc, UserError):
        return openai_error(400, str(exc), param=param)
    if isinstance(exc, ServiceUnavailableError):
        return openai_error(503, str(exc), "server_error", code="unavailable", headers={"Retry-After": "1"})
    raise exc


def _doc_json(r: Retrieved, in_context: bool) -> dict[str, Any]:
    d = r.document
    return {"id": d.id, "title": d.title, "source": d.source, "score": round(r.score, 6), "text": d.text, "in_context": in_context}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _embed_checked(texts: list[str]) -> tuple[np.ndarray, list[int]]:
    """MiniLM embeddings and the tokens each input used (after truncation); RequestError when
    the inputs hold more than MAX_EMBED_TOKENS tokens in all (CPU time is bounded per call)."""
    from mlsyskit.serve.documents import count_embedding_tokens

    counts = count_embedding_tokens(texts)
    if sum(counts) > MAX_EMBED_TOKENS:
        raise RequestError(
            f"the inputs hold {sum(counts)} tokens; at most {MAX_EMBED_TOKENS} per request: split them "
            "into several requests", "input")
    return embed(texts), counts


def build_rag_router(service: Any, docs: str | None, *, store: DocumentStore | None = None) -> APIRouter:
    """The RAG, documents and embeddings routes over ``service`` (an ``EngineService``).

    ``docs``: the corpus (a directory, a .txt/.md file or a .jsonl file), loaded now (UserError
    on a bad path); None: the default corpus, loaded on the first request that needs it.
    ``store``: an already loaded :class:`DocumentStore` instead (``docs`` is then ignored).
    """
    router = APIRouter()
    holder: dict[str, DocumentStore] = {}
    if store is not None:
        holder["store"] = store
    elif docs is not None:
        holder["store"] = DocumentStore.from_path(docs)
    load_lock = asyncio.Lock()

    async def get_store() -> DocumentStore:
        if "store" not in holder:
            async with load_lock:
                if "store" not in holder:  # the first caller loads; the others wait for it
                    holder["store"] = await asyncio.to_thread(DocumentStore.from_path, None)
        return holder["store"]

    def check_model(model: str | None) -> JSONResponse | None:
        if is_embedding_model(model):
            return not_a_chat_model(str(model), service.model_name)
        return model_not_found(model, service.model_name)

    def count_tokens(messages: list[dict]) -> int:
        try:
            return len(service.chat_prompt(messages))
        except RequestError:  # longer than the context: "too many" is all fit_context needs
            return service.max_model_len + 1

    def prepare(query: str, hits: list[Retrieved], max_tokens: int) -> tuple[list[int], int]:
        """Prompt token ids for the question and as many of ``hits`` as fit, and that count."""
        budget = service.max_model_len - max_tokens
        kept, texts = fit_context(query, hits, max_context_tokens=budget, count_tokens=count_tokens)
        try:
            ids = service.chat_prompt(build_messages(query, kept, texts))
        except RequestError as e:
            raise RequestError(f"the query is too long: {e}", "query") from None
        return ids, len(kept)

    def observe(request: Request, out: Any) -> None:
        metrics = getattr(request.app.state, "metrics", None)
        if metrics is not None:
            metrics.observe_output(out)

    async def answer(request: Request, query: str, k: int, max_tokens: int, temperature: float, stream: bool, course: bool) -> Any:
        from mlsyskit.engine import SamplingParams

        try:
            params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
            if max_tokens >= service.max_model_len:
                raise RequestError(
                    f"max_tokens is {max_tokens} but the model's context holds {service.max_model_len} "
                    "tokens, which must also hold the question", "max_tokens")
            st = await get_store()
            hits = await asyncio.to_thread(st.search, query, k)
            prompt_ids, n_ctx = await asyncio.to_thread(prepare, query, hits, max_tokens)
            if not stream:
                out = await service.generate(prompt_ids, params)
            else:
                chunks = service.stream(prompt_ids, params)
        except Exception as e:
            return _error_for(e, "query")
        rid, created, name = f"rag-{uuid.uuid4().hex[:24]}", int(time.time()), service.model_name
        documents = [_doc_json(r, i < n_ctx) for i, r in enumerate(hits)]

        def usage(completion: int) -> dict[str, int]:
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": completion, "total_tokens": len(prompt_ids) + completion}

        if not stream:
            observe(request, out)
            if out.finish_reason == "abort":
                return openai_error(503, "the server shut down before the request finished; retry", "server_error", code="aborted")
            body: dict[str, Any] = {
                "id": rid, "object": "rag.completion", "created": created, "model": name,
                "answer": out.text, "finish_reason": "length" if out.finish_reason == "length" else "stop",
                "documents": documents, "usage": usage(len(out.token_ids)),
            }
            if course:
                body = {"query": query, "result": out.text, **body}
            return body

        async def events() -> AsyncIterator[str]:
            base = {"id": rid, "object": "rag.completion.chunk", "created": created, "model": name}
            yield _sse({**base, "documents": documents, "delta": ""})
            try:
                async for snap in chunks:
                    if snap.finished:
                        observe(request, snap)
                        if snap.finish_reason == "abort":
                            yield _sse({"error": {"message": "the server shut down before the request finished", "type": "server_error", "param": None, "code": "aborted"}})
                            break
                        reason = "length" if snap.finish_reason == "length" else "stop"
                        yield _sse({**base, "delta": snap.delta, "finish_reason": reason, "usage": usage(len(snap.token_ids))})
                    elif snap.delta:
                        yield _sse({**base, "delta": snap.delta})
            finally:
                await chunks.aclose()  # a client gone mid-stream: abort, free the KV blocks now
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # -- routes ----------------------------------------------------------------------------------
    @router.post("/v1/rag", responses=ERROR_RESPONSES, summary="answer a question from retrieved documents")
    async def rag(req: RagRequest, request: Request) -> Any:
        bad = check_model(req.model)
        if bad is not None:
            return bad
        return await answer(request, req.query, req.k, req.max_tokens, req.temperature, req.stream, course=False)

    @router.post("/rag", responses=ERROR_RESPONSES, summary="the course's RAG endpoint: {query, k}")
    async def course_rag(req: CourseRagRequest, request: Request) -> Any:
        return await answer(request, req.query, req.k, req.max_tokens, 0.0, False, course=True)

    @router.post("/v1/documents", responses=ERROR_RESPONSES, summary="add documents to the RAG corpus")
    async def add_documents(req: AddDocumentsRequest) -> Any:
        if (req.documents is None) == (req.texts is None):
            return openai_error(400, "give either 'documents' (a list of {text, id?, title?, source?}) or 'texts' (a list of strings)")
        if req.documents is not None:
            param = "documents"
            texts = [d.text for d in req.documents]
            given = [d.id for d in req.documents]
            if any(i is not None for i in given) and not all(i is not None for i in given):
                return openai_error(400, "give an 'id' for every document or for none", param=param)
            ids = None if given[:1] == [None] else [str(i) for i in given]
            sources = [d.source or "api" for d in req.documents]
            titles = [d.title or "" for d in req.documents]
        else:
            param = "texts"
            texts = list(req.texts or [])
            ids, sources, titles = None, ["api"] * len(texts), [""] * len(texts)
        if not texts:
            return openai_error(400, f"'{param}' is empty: give at least one document", param=param)
        words = sum(len(t.split()) for t in texts)
        if words > MAX_ADD_WORDS:
            return openai_error(
                400, f"the documents hold {words} words; at most {MAX_ADD_WORDS} per request: add them in "
                "several requests, or load a large corpus at start with --docs", param=param)
        try:
            st = await get_store()
            new_ids = await asyncio.to_thread(
                st.add, texts, ids=ids, sources=sources, titles=titles, chunk_words=CHUNK_WORDS)
        except Exception as e:
            return _error_for(e, param)
        return {"object": "list", "added": len(new_ids), "ids": new_ids, "total": len(st)}

    @router.get("/v1/documents", responses=ERROR_RESPONSES, summary="the RAG corpus: count and ids, paged")
    async def list_documents(offset: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=1000)) -> Any:
        try:
            st = await get_store()
        except Exception as e:
            return _error_for(e)
        page = st.documents(offset, limit)
        return {
            "object": "list", "total": len(st), "offset": offset, "limit": limit,
            "ids": [d.id for d in page],
            "data": [{"id": d.id, "title": d.title, "source": d.source} for d in page],
        }

    @router.get("/v1/documents/{doc_id:path}", responses=ERROR_RESPONSES, summary="one document")
    async def get_document(doc_id: str) -> Any:
        try:
            st = await get_store()
        except Exception as e:
            return _error_for(e)
        d = st.get(doc_id)
        if d is None:
            return openai_error(404, f"no document with id '{doc_id}'", "not_found_error", param="doc_id", code="document_not_found")
        return {"id": d.id, "title": d.title, "source": d.source, "text": d.text}

    @router.post("/v1/embeddings", responses=ERROR_RESPONSES, summary="MiniLM sentence embeddings (OpenAI's shape)")
    async def embeddings(req: EmbeddingRequest) -> Any:
        if not is_embedding_model(req.model):
            what = f"'{req.model}' is a chat model" if req.model == service.model_name else f"the embedding model '{req.model}' does not exist"
            return openai_error(
                404, f"{what}; this server embeds with '{EMBEDDING_MODEL}'", param="model", code="model_not_found")
        if req.dimensions is not None and req.dimensions != EMBED_DIM:
            return openai_error(400, f"{EMBEDDING_MODEL} embeddings have {EMBED_DIM} dimensions; 'dimensions' cannot be {req.dimensions}", param="dimensions")
        inputs = req.input
        if isinstance(inputs, str):
            inputs = [inputs]
        if not inputs:
            return openai_error(400, "'input' is empty: give a text or a list of texts", param="input")
        if not all(isinstance(x, str) for x in inputs):
            return openai_error(400, "token-id input is not supported by this server; send the texts as strings", param="input")
        if len(inputs) > MAX_EMBED_INPUTS:
            return openai_error(400, f"at most {MAX_EMBED_INPUTS} inputs per request, got {len(inputs)}", param="input")
        empty = next((i for i, x in enumerate(inputs) if not x), None)
        if empty is not None:
            return openai_error(400, f"input {empty} is an empty string", param="input")
        try:
            for i, x in enumerate(inputs):
                check_text(x, f"input {i}")
            vectors, counts = await asyncio.to_thread(_embed_checked, list(inputs))
        except (RequestError, UserError) as e:
            return _error_for(e, "input")
        data = []
        for i, v in enumerate(vectors):
            if req.encoding_format == "base64":
                emb: Any = base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
            else:
                emb = v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        tokens = sum(counts)
        return {"object": "list", "data": data, "model": EMBEDDING_MODEL, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    return router
