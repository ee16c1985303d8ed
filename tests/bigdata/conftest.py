"""One real Spark session (local[2]) for all of tests/bigdata: a JVM start costs ~4-10 s here."""

from __future__ import annotations

import os
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


# JVM flags for the test JVMs only (read by the JVM from JAVA_TOOL_OPTIONS; it notes them on
# stderr, which our sessions send to spark-stderr.log). On tiny data the JIT's optimizing
# compiler (C2) never pays off and takes a core from the tasks: C1 alone, and the parallel
# collector instead of G1's concurrent threads. Measured on 2 cores at load ~1.8:
# tests/bigdata 64.5 s -> 54.8 s. Results do not depend on them.
TEST_JAVA_OPTIONS = "-XX:TieredStopAtLevel=1 -XX:+UseParallelGC"


def java_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with the test JVM flags."""
    env = dict(os.environ if env is None else env)
    env["JAVA_TOOL_OPTIONS"] = (env.get("JAVA_TOOL_OPTIONS", "") + " " + TEST_JAVA_OPTIONS).strip()
    return env


@pytest.fixture(scope="session")
def spark(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from mlsyskit.bigdata.session import start_session

    saved = os.environ.get("JAVA_TOOL_OPTIONS")
    os.environ["JAVA_TOOL_OPTIONS"] = java_env()["JAVA_TOOL_OPTIONS"]  # read once, when the JVM starts
    try:
        session = start_session("local[2]", app_name="mlsyskit-tests", log_dir=tmp_path_factory.mktemp("spark-logs"))
    finally:
        if saved is None:
            os.environ.pop("JAVA_TOOL_OPTIONS", None)
        else:
            os.environ["JAVA_TOOL_OPTIONS"] = saved
    yield session
    session.stop()


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "english.txt").write_text(ENGLISH, encoding="utf-8")
    (folder / "persian.txt").write_text(PERSIAN, encoding="utf-8")
    return folder
