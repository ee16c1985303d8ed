"""Unicode-aware tokenization, the same in Python and in Spark SQL.

A token is either a word: letters, combining marks and digits of any script (``\\p{L}``,
``\\p{M}``, ``\\p{N}``), joined inside a word by an apostrophe, a hyphen or the zero-width
(non-)joiner that Persian writes inside words ("می‌خواهم" is one token, "don't" and
"well-beloved" too), or one character of punctuation or symbol ("،", "؟", "«", ",", "!").
Spaces, controls and format characters separate tokens. Persian and Arabic digits are digits;
tatweel (U+0640, a stretching stroke) is dropped.

The pattern uses only Unicode general categories, which Java's and Python's ``regex`` engines
read alike, so Spark's ``regexp_extract_all`` (on the JVM, no Python per row) and
:func:`tokenize` (the single-process baseline, evaluation, generation) give the same tokens:
a test checks this on English and Persian text. One line of text is one sentence.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

_WORD_CHARS = r"\p{L}\p{M}\p{N}"
_JOINERS = r"'\u2019\u200c\u200d\-"
TOKEN_PATTERN = (
    rf"[{_WORD_CHARS}]+(?:[{_JOINERS}][{_WORD_CHARS}]+)*"  # a word, joiners only inside it
    rf"|[^{_WORD_CHARS}\p{{Cf}}\p{{Z}}\p{{Cc}}]"  # or one punctuation mark / symbol
)
TATWEEL = "\u0640"

BOS, EOS, UNK = "<s>", "</s>", "<unk>"


@lru_cache(maxsize=1)
def _compiled() -> Any:
    import regex

    return regex.compile(TOKEN_PATTERN)


def tokenize(text: str, lowercase: bool = False) -> list[str]:
    """The tokens of ``text`` (see the module docstring)."""
    text = text.replace(TATWEEL, "")
    if lowercase:
        text = text.lower()
    return _compiled().findall(text)


def spark_tokens(column: Any, lowercase: bool = False) -> Any:
    """A Spark column: the array of tokens of the string ``column``, as :func:`tokenize`."""
    from pyspark.sql import functions as F

    col = F.translate(column, TATWEEL, "")
    if lowercase:
        col = F.lower(col)
    return F.regexp_extract_all(col, F.lit(TOKEN_PATTERN), F.lit(0))


def read_sentences(spark: Any, path: str, lowercase: bool = False) -> Any:
    """A DataFrame with one row per non-empty line of the text at ``path`` (any
    Spark-readable URI, a file or a folder): ``tokens`` (array<string>)."""
    from pyspark.sql import functions as F

    df = spark.read.text(path)
    return df.select(spark_tokens(F.col("value"), lowercase).alias("tokens")).where(F.size("tokens") > 0)
