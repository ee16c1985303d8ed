"""RAG, documents and embeddings routes of a real `mlsyskit serve` (SmolLM2, --docs a small corpus).

SmolLM2-135M's answers are not reliable, so the tests assert on what retrieval decides (the right
document first, in the prompt) and that an answer comes back, not on the answer's wording.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

FACTS = {
    "lighthouse.txt": "The Brannock Point lighthouse was built in 1867 from red granite. Its lamp can be seen 22 miles out to sea.",
    "cake.md": "# Grandma Ilse's plum cake\n\nGrandma Ilse's plum cake needs 600 grams of plums, cinnamon and a yeast dough that rests for one hour.",
    "rover.txt": "The Mars rover Tellus-4 drills rock samples with a diamond-tipped bit and sends its data home through an orbiting relay once a day.",
    "fees.txt": "In the town of Edgeford, bicycle owners pay a yearly road fee of 12 euros, due every March.",
    "jazz.txt": "The saxophonist Mina Kord recorded the album Blue Harbor in Lisbon in 1962 with her quartet.",
}
QUESTIONS = [
    ("When was the Brannock Point lighthouse built?", "lighthouse.txt"),
    ("How many grams of plums go into the plum cake?", "cake.md"),
    ("How does the Tellus-4 rover send its data home?", "rover.txt"),
    ("How much do bicycle owners in Edgeford pay each year?", "fees.txt"),
    ("Who recorded the album Blue Harbor?", "jazz.txt"),
]
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("facts")
    for name, text in FACTS.items():
        (folder / name).write_text(text, encoding="utf-8")
    return start_server(docs=folder)


@pytest.fixture(scope="module")
def http(server) -> httpx.Client:
    with httpx.Client(base_url=server, timeout=120) as c:
        yield c


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    assert body["error"]["message"] and "Traceback" not in body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize(("question", "doc_id"), QUESTIONS)
def test_rag_retrieves_the_document_with_the_answer(http, server, question: str, doc_id: str) -> None:
    r = http.post("/v1/rag", json={"query": question, "k": 3, "max_tokens": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "rag.completion" and body["model"] == server.model and body["id"].startswith("rag-")
    docs = body["documents"]
    assert len(docs) == 3 and docs[0]["id"] == doc_id
    assert docs[0]["text"] == FACTS[doc_id] and docs[0]["source"] == doc_id and all(d["in_context"] for d in docs)
    scores = [d["score"] for d in docs]
    assert scores == sorted(scores, reverse=True) and scores[0] > scores[1]
    assert isinstance(body["answer"], str) and body["answer"].strip()
    u = body["usage"]
    assert 1 <= u["completion_tokens"] <= 4 and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    # The prompt holds the three documents: it is longer than any one of them.
    assert u["prompt_tokens"] > 60
    if body["finish_reason"] == "length":
        assert u["completion_tokens"] == 4


def test_course_rag_body(http) -> None:
    r = http.post("/rag", json={"query": "Who recorded the album Blue Harbor?", "k": 1, "max_tokens": 12})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"] == "Who recorded the album Blue Harbor?"
    assert body["result"] == body["answer"] and body["result"].strip()
    assert [d["id"] for d in body["documents"]] == ["jazz.txt"]
    # The same question with the same k at temperature 0 gives the same text on /v1/rag.
    again = http.post("/v1/rag", json={"query": body["query"], "k": 1, "max_tokens": 12}).json()
    assert again["answer"] == body["result"]


def _sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_streaming_rag_matches_the_non_streamed_answer(http) -> None:
    q = {"query": "How does the Tellus-4 rover send its data home?", "k": 2, "max_tokens": 16}
    full = http.post("/v1/rag", json=q).json()
    with http.stream("POST", "/v1/rag", json={**q, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "rag.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert [d["id"] for d in chunks[0]["documents"]] == [d["id"] for d in full["documents"]]
    assert chunks[0]["documents"][0]["id"] == "rover.txt"
    assert "".join(c["delta"] for c in chunks) == full["answer"]
    assert len(chunks) > 3  # the answer came in pieces
    assert chunks[-1]["finish_reason"] == full["finish_reason"] and chunks[-1]["usage"] == full["usage"]


def test_documents_added_at_run_time_are_retrieved(http) -> None:
    listed = http.get("/v1/documents").json()
    assert listed["total"] >= 5 and set(FACTS) <= set(listed["ids"])
    owl = "Snowy owls of the Varn plateau nest on bare ground and lay up to eleven eggs in years with many lemmings."
    r = http.post("/v1/documents", json={"documents": [{"id": "owls", "text": owl, "title": "Owls", "source": "field notes"}]})
    assert r.status_code == 200, r.text
    assert r.json()["added"] == 1 and r.json()["ids"] == ["owls"] and r.json()["total"] == listed["total"] + 1
    rag = http.post("/v1/rag", json={"query": "Where do the snowy owls of the Varn plateau nest?", "k": 2, "max_tokens": 4}).json()
    top = rag["documents"][0]
    assert (top["id"], top["title"], top["source"], top["text"]) == ("owls", "Owls", "field notes", owl)
    assert http.get("/v1/documents/owls").json()["text"] == owl
    # Plain texts get generated ids; a long text is chunked into several documents.
    long_text = "\n\n".join(f"Paragraph {i} about the quiet harbour town of Mellis. " * 6 for i in range(10))
    r = http.post("/v1/documents", json={"texts": ["The glass bridge of Orrin is 300 meters long.", long_text]})
    assert r.status_code == 200, r.text
    ids = r.json()["ids"]
    assert len(ids) > 2 and len(set(ids)) == len(ids)
    bridge = http.post("/v1/rag", json={"query": "How long is the glass bridge of Orrin?", "k": 1, "max_tokens": 2}).json()
    assert bridge["documents"][0]["id"] == ids[0]
    # More context than the server's 512-token window: the best documents fill the prompt, the
    # rest are returned but marked as left out, and the request still succeeds.
    wide = http.post("/v1/rag", json={"query": "the harbour town of Mellis", "k": 12, "max_tokens": 4}).json()
    flags = [d["in_context"] for d in wide["documents"]]
    assert len(flags) == 12 and flags[0] and not flags[-1] and flags == sorted(flags, reverse=True)
    assert wide["usage"]["prompt_tokens"] <= 512 - 4 and wide["documents"][0]["id"] in ids
    page = http.get("/v1/documents", params={"offset": 1, "limit": 2}).json()
    assert page["ids"] == http.get("/v1/documents").json()["ids"][1:3] and page["total"] == r.json()["total"]
    # The same id again: a conflict, nothing added.
    err = _error(http.post("/v1/documents", json={"documents": [{"id": "owls", "text": "again"}]}), 409)
    assert "owls" in err["message"] and err["code"] == "duplicate_id"
    assert http.get("/v1/documents").json()["total"] == r.json()["total"]
    _error(http.get("/v1/documents/no-such-doc"), 404)


def test_embeddings_with_the_openai_client(server) -> None:
    from mlsyskit.vector import embed_texts

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)
    texts = ["The lighthouse is made of red granite.", "Plum cake with cinnamon", "x"]
    expected = embed_texts(texts)
    r = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts)  # the client asks for base64
    got = np.array([d.embedding for d in r.data], np.float32)
    assert [d.index for d in r.data] == [0, 1, 2] and got.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert r.model == "all-MiniLM-L6-v2" and r.usage.prompt_tokens == r.usage.total_tokens > len(texts)
    one = client.embeddings.create(model="sentence-transformers/all-MiniLM-L6-v2", input=texts[0], encoding_format="float")
    assert len(one.data) == 1
    np.testing.assert_allclose(one.data[0].embedding, expected[0], atol=1e-5)
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="text-embedding-3-small", input="hi")
    assert "all-MiniLM-L6-v2" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="all-MiniLM-L6-v2", input=[[1, 2, 3]])


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/v1/rag", {}, 400, "query"),
        ("/v1/rag", {"query": "x", "k": 0}, 400, "k"),
        ("/v1/rag", {"query": "x", "k": 21}, 400, "k"),
        ("/v1/rag", {"query": "x", "max_tokens": -1}, 400, "max_tokens"),
        ("/v1/rag", {"query": "x", "max_tokens": 100000}, 400, "max_tokens"),
        ("/v1/rag", {"query": "x", "temperature": -1}, 400, "temperature"),
        ("/v1/rag", {"query": "   "}, 400, "empty"),
        ("/v1/rag", {"query": "x", "model": "gpt-4"}, 404, "gpt-4"),
        ("/v1/rag", {"query": "word " * 2000}, 400, "too long"),
        ("/v1/rag", [1, 2], 400, "object"),
        ("/rag", {"k": 2}, 400, "query"),
        ("/v1/documents", {}, 400, "documents"),
        ("/v1/documents", {"texts": []}, 400, "empty"),
        ("/v1/documents", {"texts": ["ok"], "documents": [{"text": "ok"}]}, 400, "either"),
        ("/v1/documents", {"documents": [{"text": ""}]}, 400, "text"),
        ("/v1/documents", {"documents": [{"text": "a", "id": "p"}, {"text": "b"}]}, 400, "every document"),
        ("/v1/embeddings", {"input": []}, 400, "empty"),
        ("/v1/embeddings", {"input": [""]}, 400, "empty"),
        ("/v1/embeddings", {"input": "hi", "encoding_format": "int8"}, 400, "encoding_format"),
        ("/v1/embeddings", {"input": "hi", "dimensions": 64}, 400, "384"),
        ("/v1/embeddings", {"input": "hi", "model": "ada"}, 404, "ada"),
        ("/v1/embeddings", {"model": "all-MiniLM-L6-v2"}, 400, "input"),
        ("/v1/embeddings", {"input": ["word " * 300] * 200}, 400, "at most 32768 per request"),
        ("/v1/embeddings", {"input": ["ok", "bad \ud800"]}, 400, "input 1 contains an unpaired surrogate"),
        ("/v1/rag", {"query": "bad \ud800"}, 400, "surrogate|unicode"),
        ("/v1/documents", {"documents": [{"text": "fine", "title": "\udc00"}]}, 400, "surrogate|unicode"),
        ("/v1/documents", {"texts": ["word " * 20001]}, 400, "at most 20000 per request"),
    ],
)
def test_bad_bodies_get_openai_errors(http, path: str, body, status: int, needle: str) -> None:
    # json.dumps escapes non-ASCII (\ud800 stays an escape, as a client could send it).
    err = _error(http.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"}), status)
    assert re.search(needle, err["message"]), err


def test_bad_json_and_bad_paging(http) -> None:
    err = _error(http.post("/v1/rag", content=b'{"query": ', headers={"content-type": "application/json"}), 400)
    assert "JSON" in err["message"]
    _error(http.get("/v1/documents", params={"limit": 0}), 400)
    _error(http.get("/v1/documents", params={"offset": -1}), 400)


def test_bad_docs_path_is_a_one_line_user_error_before_serving(tmp_path: Path) -> None:
    from mlsyskit.errors import UserError
    from mlsyskit.serve.rag import build_rag_router

    # The corpus is loaded when the router is built, before the server accepts anything, so
    # `mlsyskit serve --docs` with a bad path stops at start with this line (exit 2).
    with pytest.raises(UserError) as e:
        build_rag_router(None, str(tmp_path / "nope"))
    assert "no such file or directory" in str(e.value) and "\n" not in str(e.value)


def test_models_lists_the_chat_and_the_embedding_model_and_the_client_calls_both(server) -> None:
    """GET /v1/models lists every model the server answers for, each with its purpose (`type`):
    the official client discovers both there and calls each with the id it found."""
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)
    models = client.models.list().data
    by_type = {m.type: m for m in models}
    assert len(models) == 2 and set(by_type) == {"chat", "embedding"}
    chat, emb = by_type["chat"], by_type["embedding"]
    assert models[0] is chat  # the chat model first: clients that take data[0] still chat with it
    assert (chat.id, emb.id) == (server.model, "all-MiniLM-L6-v2")
    assert all(m.object == "model" and m.owned_by == "mlsyskit" and m.created > 0 for m in models)
    assert chat.capabilities == ["chat", "completion", "rag"] and chat.max_model_len == 512
    assert emb.capabilities == ["embedding"] and emb.dimensions == 384 and emb.max_model_len == 256
    for m in models:  # GET /v1/models/{id} answers for each listed id, with the same card
        assert client.models.retrieve(m.id).model_dump() == m.model_dump()
    assert client.models.retrieve("sentence-transformers/all-MiniLM-L6-v2").id == emb.id  # an alias

    r = client.chat.completions.create(model=chat.id, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0)
    assert r.model == chat.id and r.choices[0].message.content and 1 <= r.usage.completion_tokens <= 3
    e = client.embeddings.create(model=emb.id, input=["red granite lighthouse", "plum cake"])
    assert e.model == emb.id
    vectors = np.array([d.embedding for d in e.data], np.float32)
    assert vectors.shape == (2, emb.dimensions)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    # Each id on the other kind of route: a 404 that says which model to use there.
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model=emb.id, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    assert "embedding model" in str(err.value) and chat.id in str(err.value)
    with pytest.raises(openai.NotFoundError) as err:
        client.embeddings.create(model=chat.id, input="hi")
    assert "chat model" in str(err.value) and emb.id in str(err.value)
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-4")
    assert chat.id in str(err.value) and emb.id in str(err.value)
