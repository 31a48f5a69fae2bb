from __future__ import annotations

import io
import logging
import sys

import pytest

from diode._progress import console_loggers, progress_bar


@pytest.fixture()
def chain():
    """A parent logger with a console handler on a fake stderr, its child, and that stderr.

    Each test swaps the fake in as ``sys.stderr`` itself: pytest's capture sets its own
    ``sys.stderr`` between a fixture's setup and the test's call.
    """
    err = io.StringIO()
    parent, child = logging.getLogger("progress_test"), logging.getLogger("progress_test.child")
    handler = logging.StreamHandler(err)
    parent.addHandler(handler)
    parent.setLevel(logging.INFO)
    try:
        yield parent, child, err
    finally:
        parent.removeHandler(handler)
        parent.setLevel(logging.NOTSET)


def test_console_loggers_are_the_ancestors_with_a_console_handler(chain, monkeypatch: pytest.MonkeyPatch) -> None:
    parent, child, err = chain
    monkeypatch.setattr(sys, "stderr", err)
    assert parent in console_loggers(child) and child not in console_loggers(child)
    child.propagate = False
    try:
        assert console_loggers(child) == []
    finally:
        child.propagate = True


def test_progress_bar_off_is_none_and_on_prints_records_once_above_it(chain, monkeypatch: pytest.MonkeyPatch) -> None:
    _, child, err = chain
    monkeypatch.setattr(sys, "stderr", err)
    with progress_bar(3, show=False, logger=child) as bar:
        assert bar is None
    assert err.getvalue() == ""
    with progress_bar(3, show=True, logger=child, desc="work") as bar:
        child.info("halfway")
        bar.update(3)
    text = err.getvalue()
    assert text.count("halfway") == 1 and "work" in text and "3/3" in text
    assert "halfway\n" in text  # a line of its own (tqdm.write), not glued into the bar
