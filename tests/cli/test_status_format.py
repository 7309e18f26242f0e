"""`stagemesh status`'s table: the frontends attached to the gateway under the workers."""

from __future__ import annotations

from stagemesh.cli.remote import format_status


def _doc(frontends: list[dict] | None) -> dict:
    gateway = {"pid": 1} if frontends is None else {"pid": 1, "frontends": frontends}
    return {"model": "m", "version": "v", "chains": [], "workers": [], "gateway": gateway}


def test_a_spare_frontend_is_named_as_one():
    text = format_status(_doc([{"name": "frontend-0", "pid": 41, "requests": 3, "taken": 120, "spare": False},
                               {"name": "frontend-1", "pid": 42, "requests": 0, "taken": 0, "spare": True}]))
    assert text.splitlines()[-1] == "frontends: frontend-0 (pid 41, 3 open, 120 taken), frontend-1 (pid 42, spare)"


def test_the_attached_frontends_are_named_with_pid_open_and_taken_requests():
    text = format_status(_doc([{"name": "frontend-0", "pid": 41, "requests": 3, "taken": 120},
                               {"name": "frontend-1", "pid": None, "requests": 0, "taken": 0}]))
    assert text.splitlines()[-1] == ("frontends: frontend-0 (pid 41, 3 open, 120 taken), "
                                     "frontend-1 (pid ?, 0 open, 0 taken)")


def test_a_gateway_that_counts_no_taken_requests_shows_the_rest():
    text = format_status(_doc([{"name": "frontend-0", "pid": 41, "requests": 3}]))
    assert text.splitlines()[-1] == "frontends: frontend-0 (pid 41, 3 open)"


def test_none_attached_says_so_and_an_older_gateway_shows_no_line():
    assert format_status(_doc([])).splitlines()[-1] == "frontends: none attached"
    assert "frontends" not in format_status(_doc(None))
