"""One real Spark session (local[2]) for all of tests/bigdata: a JVM start costs ~10 s here."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ENGLISH = """\
The cat sat on the mat.
The dog sat on the log, and the cat saw the dog.
A cat and a dog met on the mat!
Don't let the well-beloved dog o'er the mat.
The end.
"""

# Persian: ZWNJ inside words (می‌خواهم), Persian punctuation (، ؟ « »), Persian digits, a
# tatweel (کشـــیده) and a diacritic (امّا).
PERSIAN = """\
من می‌خواهم به خانه بروم، امّا باران می‌بارد؟
«کتاب‌ها» روی میز هستند و من ۱۲۳ کتاب دارم.
باران می‌بارد و من به خانه می‌روم.
کشـــیده
"""


@pytest.fixture(scope="session")
def spark(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from mlsyskit.bigdata.session import start_session

    session = start_session("local[2]", app_name="mlsyskit-tests", log_dir=tmp_path_factory.mktemp("spark-logs"))
    yield session
    session.stop()


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "english.txt").write_text(ENGLISH, encoding="utf-8")
    (folder / "persian.txt").write_text(PERSIAN, encoding="utf-8")
    return folder
