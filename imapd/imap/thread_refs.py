"""THREAD=REFERENCES (RFC 5256 section 4) over the stored keys, on flat
lists (issue #24: the first THREAD of 100,000 messages cost about a
second of CPU in imapd.imap.threads, most of it per-message objects).

The same algorithm and the same answer as
``encode_threads(references(...))`` of imapd.imap.threads, which stays the
reference (tests/unit/test_thread_refs.py compares the two on random
forests): containers are numbers into parallel lists (the message each
holds, its parent) instead of objects, the children lists are made once,
after step 1, from the log of links (in the order the reference's lists
would have them: each child where it was first linked to its final
parent), the dates are ranked once (step 5 sorts by rank), and the
thread-list is written as it is walked. The loop checks of steps 1.A and
1.B walk up the parents with the same budget
(:data:`imapd.imap.threads.WALK_BUDGET_PER_MESSAGE` steps per message),
so crafted References chains stay linear here too.
"""

from __future__ import annotations

import json
from collections import Counter, deque
from collections.abc import Sequence
from operator import itemgetter

from imapd.imap.threads import WALK_BUDGET_PER_MESSAGE
from storage.sortkeys import ThreadRow

_NONE = -1


def references_response(
    rows: Sequence[ThreadRow], numbers: Sequence[int], counter: list[int] | None = None
) -> bytes:
    """The THREAD=REFERENCES response data (RFC 5256 section 5) of
    ``rows`` (storage.sortkeys.ThreadRow, in UID order), each message
    named by its item of ``numbers`` (same order). ``counter`` (tests):
    its first item gets the number of loop-check steps taken."""
    n = len(rows)
    if n == 0:
        return b""
    dates = list(map(itemgetter(1), rows))
    subjects = [bytes(s) for s in map(itemgetter(2), rows)]
    replies = list(map(bool, map(itemgetter(3), rows)))
    stored_ids = list(map(itemgetter(4), rows))

    # Containers: cmsg[c] is the message index held (or _NONE: a dummy),
    # parent[c] its parent (or _NONE); numbered in creation order, the
    # order of the reference's ``nodes`` list.
    cmsg: list[int] = []
    parent: list[int] = []
    had_kids: list[bool] = []  # ever linked under (the reference's "children" non-empty)
    log_parent: list[int] = []  # every link made, in order
    log_child: list[int] = []
    table: dict[str, int] = {}
    left = WALK_BUDGET_PER_MESSAGE * n
    steps = 0

    def is_descendant(a: int, b: int) -> bool:
        # imapd.imap.threads._Walks.is_descendant, step for step.
        nonlocal left, steps
        if a == b:
            return True
        if not had_kids[b]:
            return False
        c = parent[a]
        while c != _NONE:
            if left <= 0:
                return True
            steps += 1
            left -= 1
            if c == b:
                return True
            c = parent[c]
        return False

    def link(p: int, c: int) -> None:
        parent[c] = p
        had_kids[p] = True
        log_parent.append(p)
        log_child.append(c)

    for i, stored in enumerate(stored_ids):
        # storage.sortkeys.decode_thread_ids, inline.
        if "\n" not in stored and stored[:1] != "[":
            own: str | None = stored or None
            refs: Sequence[str] = ()
        elif stored[:1] == "[":
            own, *ref_list = json.loads(stored)
            refs = ref_list
        else:
            first, *ref_list = stored.split("\n")
            own, refs = first or None, ref_list
        # Step 1: the message's own ID; missing, invalid or a duplicate
        # gets a container of its own.
        node = table.get(own) if own is not None else None
        if node is not None and cmsg[node] == _NONE:
            cmsg[node] = i
        else:
            fresh = len(cmsg)
            cmsg.append(i)
            parent.append(_NONE)
            had_kids.append(False)
            if own is not None and node is None:
                table[own] = fresh
            node = fresh
        if not refs:
            parent[node] = _NONE  # no references: no parent
            continue
        # Step 1.A: link each reference to the next.
        prev = _NONE
        for r in refs:
            cur = table.get(r)
            if cur is None:
                cur = table[r] = len(cmsg)
                cmsg.append(_NONE)
                parent.append(_NONE)
                had_kids.append(False)
            if (
                prev != _NONE
                and cur != prev
                and parent[cur] == _NONE
                and not is_descendant(prev, cur)
            ):
                link(prev, cur)
            prev = cur
        # Step 1.B: the last reference is the parent.
        if prev != node:
            if parent[node] != prev and not is_descendant(prev, node):
                link(prev, node)
        else:
            parent[node] = _NONE
    if counter is not None:
        counter[0] += steps

    # Children lists from the log, each child at its first link to its
    # final parent (the reference keeps stale entries and drops them and
    # repeats, first occurrence kept, in _live).
    size = len(cmsg)
    kids: list[list[int] | None] = [None] * size
    placed = [False] * size
    for p, c in zip(log_parent, log_child, strict=True):
        if parent[c] == p and not placed[c]:
            placed[c] = True
            _add_child(kids, p, c)

    # Steps 2 and 3: the parentless, in creation order, pruned.
    top: list[int] = []
    for r in [c for c in range(size) if parent[c] == _NONE]:  # before pruning moves any
        if kids[r] is None:
            if cmsg[r] != _NONE:
                top.append(r)
            continue
        top.extend(_prune(r, cmsg, parent, kids))

    # Step 4: gather top-level threads of one base subject.
    top = _merge_subjects(top, cmsg, parent, kids, subjects, replies)

    # Step 5: siblings by sent date, ties by mailbox (UID) order: a rank
    # per message (the rows are in UID order: a stable sort by date), a
    # tree by its first message's after its siblings are sorted.
    rank = [0] * (n + 1)  # rank[_NONE] (the last) is a dummy's until known
    deque(map(rank.__setitem__, sorted(range(n), key=dates.__getitem__), range(n)), maxlen=0)
    first_rank = list(map(rank.__getitem__, cmsg))
    for c in _post_order([t for t in top if kids[t]], kids):
        got = kids[c]
        if got:
            if len(got) > 1:
                got.sort(key=first_rank.__getitem__)
            if cmsg[c] == _NONE:
                first_rank[c] = first_rank[got[0]]
    top.sort(key=first_rank.__getitem__)
    return _encode(top, cmsg, kids, numbers)


def _add_child(kids: list[list[int] | None], p: int, c: int) -> None:
    """Appends ``c`` to the children of ``p`` (a list made at the first)."""
    got = kids[p]
    if got is None:
        kids[p] = [c]
    else:
        got.append(c)


def _post_order(top: list[int], kids: list[list[int] | None]) -> list[int]:
    """Every container below and in ``top``, children before parents."""
    order: list[int] = []
    stack = list(top)
    while stack:
        c = stack.pop()
        order.append(c)
        got = kids[c]
        if got:
            stack.extend(got)
    order.reverse()
    return order


def _prune(
    root: int, cmsg: list[int], parent: list[int], kids: list[list[int] | None]
) -> list[int]:
    """Step 3 for the tree of ``root`` (imapd.imap.threads._prune): what
    takes its place under the root."""
    for c in _post_order([root], kids):
        got = kids[c]
        if not got:
            continue
        new: list[int] = []
        for k in got:
            if cmsg[k] == _NONE:
                grand = kids[k]
                if not grand:
                    continue  # a dummy with no children goes
                for g in grand:
                    parent[g] = c
                new.extend(grand)  # below the root a dummy always goes
            else:
                new.append(k)
        kids[c] = new
    if cmsg[root] != _NONE:
        return [root]
    got = kids[root]
    if not got:
        return []
    if len(got) > 1:
        return [root]  # a dummy with several children stays
    for g in got:
        parent[g] = _NONE
    return got


def _merge_subjects(
    top: list[int],
    cmsg: list[int],
    parent: list[int],
    kids: list[list[int] | None],
    subjects: list[bytes],
    replies: list[bool],
) -> list[int]:
    """Step 4 (A)-(C) (imapd.imap.threads._merge_subjects), on containers."""

    # 4.B.i: a thread's subject is its message's, or a dummy's first
    # child's; it stays so below (a merge appends children, and a message
    # moved to a new container keeps being the first child).
    shown = list(map(cmsg.__getitem__, top))
    for k, c in enumerate(top):
        if shown[k] == _NONE:
            got = kids[c]
            assert got
            shown[k] = cmsg[got[0]]
    subject_msg = dict(zip(top, shown, strict=True))

    def link(p: int, c: int) -> None:
        parent[c] = p
        _add_child(kids, p, c)

    # Only a subject shared by several threads can merge anything.
    counts = Counter(map(subjects.__getitem__, shown))
    shared = {subject for subject, k in counts.items() if k > 1 and subject}
    if not shared:
        return top
    table: dict[bytes, int] = {}
    for c, m in zip(top, shown, strict=True):
        subject = subjects[m]
        if subject not in shared:
            continue
        have = table.get(subject)
        if have is None:
            table[subject] = c
        elif cmsg[have] != _NONE and (
            cmsg[c] == _NONE or (replies[subject_msg[have]] and not replies[m])
        ):
            table[subject] = c
    out: list[int] = []
    for c, m in zip(top, shown, strict=True):
        subject = subjects[m]
        have = table.get(subject) if subject in shared else None
        if have is None or have == c:
            out.append(c)
            continue
        if cmsg[have] == _NONE and cmsg[c] == _NONE:
            for k in kids[c] or ():
                link(have, k)
            kids[c] = []
        elif cmsg[have] == _NONE:
            link(have, c)
        elif replies[m] and not replies[subject_msg[have]]:
            link(have, c)
        else:
            # A new dummy takes the place of the table's message: ``have``
            # becomes it, and holds that message (moved to a new
            # container) and this thread.
            old = len(cmsg)
            cmsg.append(cmsg[have])
            parent.append(have)
            moved = kids[have]
            kids.append(moved)
            for k in moved or ():
                parent[k] = old
            cmsg[have] = _NONE
            kids[have] = [old]
            link(have, c)
    return out


def _encode(
    top: list[int],
    cmsg: list[int],
    kids: list[list[int] | None],
    numbers: Sequence[int],
) -> bytes:
    """The thread-list (RFC 5256 section 5; imapd.imap.threads.encode_threads):
    a node with one child continues its parentheses, several children
    each get their own, a dummy shows only its children."""
    out: list[bytes] = []
    for t in top:
        got = kids[t]
        if not got:  # most threads: one message
            out.append(b"(%d)" % numbers[cmsg[t]])
            continue
        stack: list[int] = [t]
        while stack:
            c = stack.pop()
            if c == _NONE:
                out.append(b")")
                continue
            out.append(b"(")
            stack.append(_NONE)
            first = True
            while True:
                m = cmsg[c]
                if m != _NONE:
                    out.append((b"%d" if first else b" %d") % numbers[m])
                    first = False
                got = kids[c]
                if got and len(got) == 1:
                    c = got[0]
                    continue
                if got:
                    if not first:
                        out.append(b" ")
                    stack.extend(reversed(got))
                break
    return b"".join(out)
