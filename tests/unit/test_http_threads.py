"""JWZ threading over Message-ID / In-Reply-To / References, subject fallback."""

from __future__ import annotations

from httpapi.threads import ThreadInput, base_subject, thread_messages


def msg(key: int, subject: str, mid: str | None, irt: str | None = None,
        refs: tuple[str, ...] = ()) -> ThreadInput:
    return ThreadInput(key, mid, irt, refs, subject)


def groups(result: dict) -> list[set]:
    by_thread: dict[str, set] = {}
    for key, tid in result.items():
        by_thread.setdefault(tid, set()).add(key)
    return sorted(by_thread.values(), key=min)


def test_reply_chain_is_one_thread() -> None:
    result = thread_messages([
        msg(1, "Plan", "<a@x>"),
        msg(2, "Re: Plan", "<b@x>", "<a@x>", ("<a@x>",)),
        msg(3, "Re: Plan", "<c@x>", None, ("<a@x> <b@x>",)),
        msg(4, "Other", "<d@x>"),
    ])
    assert groups(result) == [{1, 2, 3}, {4}]


def test_missing_parent_still_links_siblings() -> None:
    # Both reply to a message we never received: the empty parent joins them.
    result = thread_messages([
        msg(1, "Re: Lost", "<b@x>", "<gone@x>"),
        msg(2, "Re: Lost", "<c@x>", "<gone@x>"),
    ])
    assert groups(result) == [{1, 2}]


def test_reply_arriving_before_its_parent() -> None:
    result = thread_messages([
        msg(1, "Re: Early", "<b@x>", "<a@x>", ("<a@x>",)),
        msg(2, "Early", "<a@x>"),
    ])
    assert groups(result) == [{1, 2}]


def test_subject_fallback_groups_replies_without_references() -> None:
    result = thread_messages([
        msg(1, "Dinner", "<a@x>"),
        msg(2, "RE: [club] Dinner", "<b@x>"),
        msg(3, "Fwd: Dinner", "<c@x>"),
        msg(4, "Dinner plans", "<d@x>"),
    ])
    assert groups(result) == [{1, 2, 3}, {4}]


def test_duplicate_message_ids_and_loops_do_not_break() -> None:
    result = thread_messages([
        msg(1, "Loop", "<a@x>", "<b@x>", ("<b@x>",)),
        msg(2, "Re: Loop", "<b@x>", "<a@x>", ("<a@x>",)),
        msg(3, "Loop", "<a@x>"),  # the Sent copy of message 1
        msg(4, "", None),
        msg(5, "", None),
    ])
    assert {result[1], result[2], result[3]} == {result[1]}
    assert result[4] != result[5]
    assert len(result) == 5


def test_thread_ids_are_stable_across_runs() -> None:
    items = [msg(1, "A", "<a@x>"), msg(2, "Re: A", "<b@x>", "<a@x>")]
    assert thread_messages(items) == thread_messages(list(items))


def test_base_subject() -> None:
    assert base_subject("Re: RE: [list] Fwd:  Hello   World (fwd)") == "hello world"
    assert base_subject("Re[2]: Status") == "status"
    assert base_subject(None) == ""
