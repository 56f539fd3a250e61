import pytest
from textual.widgets import Input


@pytest.fixture(autouse=True)
def no_cursor_blink(monkeypatch):
    """A blinking cursor makes two renders of one state differ (harlequin does the same)."""
    monkeypatch.setattr(Input, "cursor_blink", False)
