"""THREAD=ORDEREDSUBJECT and THREAD=REFERENCES (RFC 5256 sections 3 and 4)
over :class:`~imapd.imap.sortkeys.SortFields` or the stored keys
(:class:`storage.sortkeys.ThreadInput`), and the thread-list wire form.

Hostile input stays linear: every loop check of the REFERENCES algorithm
(steps 1.A and 1.B: "A is not a descendant of B") walks up from A, and the
walks of one command share a budget of :data:`WALK_BUDGET_PER_MESSAGE`
steps per message; a check that would overrun it is answered "would loop"
and the link is not made. Real mail never comes near it (a walk is needed
only when the later message already has replies, and is as long as the
thread is deep), while References chains crafted so that every message
walks a 10,000-deep thread cost at most the budget, not n * depth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from imapd.imap.sortkeys import SortFields
from storage.sortkeys import thread_ids

WALK_BUDGET_PER_MESSAGE = 64


class Threadable(Protocol):
    """What threading reads of a message (RFC 5256 sections 3 and 4): its
    UID, sent date (section 2.2), i;ascii-casemap base subject (section
    2.1) and whether that extraction removed a reply or forward mark."""

    @property
    def uid(self) -> int: ...
    @property
    def date(self) -> float: ...
    @property
    def subject(self) -> bytes: ...
    @property
    def is_reply(self) -> bool: ...


@dataclass(eq=False, slots=True)
class Node:
    """A thread tree node; ``msg`` None is a dummy (RFC 5256 section 4)."""

    msg: Threadable | None
    parent: Node | None = None
    children: list[Node] = field(default_factory=list)


def _link(parent: Node, child: Node) -> None:
    child.parent = parent
    parent.children.append(child)


def _unlink(child: Node) -> None:
    """Cut ``child`` from its parent in O(1): the parent's list keeps a stale
    entry, dropped by :func:`_live` (removing it at once would cost the
    siblings, quadratic under a hub with 10,000 replies)."""
    child.parent = None


def _live(n: Node) -> list[Node]:
    """``n``'s children with stale entries (see _unlink) and repeats dropped;
    linear in the list, which only grows by links."""
    n.children = list(dict.fromkeys(c for c in n.children if c.parent is n))
    return n.children


# --------------------------------------------------------------------------
# ORDEREDSUBJECT (RFC 5256 section 3)


def ordered_subject(fields: Sequence[Threadable]) -> list[Node]:
    """Messages sorted by base subject then sent date (ties: mailbox order);
    each run of one base subject is a thread whose first message is the
    parent of the others; threads ordered by their first message's date."""
    ordered = sorted(fields, key=lambda f: (f.subject, f.date))  # stable: UID order in ties
    threads: list[Node] = []
    for f in ordered:
        if threads and threads[-1].msg is not None and threads[-1].msg.subject == f.subject:
            _link(threads[-1], Node(f))
        else:
            threads.append(Node(f))
    threads.sort(key=lambda n: _date_key(n))
    return threads


# --------------------------------------------------------------------------
# REFERENCES (RFC 5256 section 4)


class _Walks:
    """The loop-check budget shared by one threading run."""

    def __init__(self, messages: int) -> None:
        self.left = WALK_BUDGET_PER_MESSAGE * max(messages, 1)
        self.steps = 0  # total, for tests

    def is_descendant(self, a: Node, b: Node) -> bool:
        """Whether ``a`` is ``b`` or below it; True (refuse the link) also
        when the walk would overrun the budget."""
        if a is b:
            return True
        if not b.children:
            return False  # nothing is below b (a stale entry only costs a walk)
        n: Node | None = a.parent
        while n is not None:
            if self.left <= 0:
                return True
            self.steps += 1
            self.left -= 1
            if n is b:
                return True
            n = n.parent
        return False


def references(
    fields: Sequence[Threadable],
    counter: list[int] | None = None,
    ids: Sequence[tuple[str | None, tuple[str, ...]]] | None = None,
) -> list[Node]:
    """RFC 5256 section 4, steps 1-5; returns the sorted top-level threads.
    ``fields`` in mailbox (UID) order. ``ids``: each message's
    storage.sortkeys.thread_ids (its own ID and references, normalised),
    when stored ones were read; else computed here from ``fields``
    (then SortFields, which carry the headers).
    ``counter`` (tests): its first item gets the number of loop-check
    steps taken."""
    if ids is None:
        ids = [
            thread_ids(f.message_id, f.in_reply_to, f.references)
            for f in fields
            if isinstance(f, SortFields)
        ]
    table: dict[str, Node] = {}
    walks = _Walks(len(fields))
    nodes: list[Node] = []

    def container(msg_id: str) -> Node:
        node = table.get(msg_id)
        if node is None:
            node = table[msg_id] = Node(None)
            nodes.append(node)
        return node

    for f, (own, refs) in zip(fields, ids, strict=True):
        # Step 1: the message's own ID; missing, invalid or a duplicate of
        # an earlier message's gets a unique one (an unnamed container).
        if own is not None and own in table and table[own].msg is None:
            node = table[own]
            node.msg = f
        else:
            node = Node(f)
            nodes.append(node)
            if own is not None and own not in table:
                table[own] = node
        # The references (thread_ids): References, else the first msg-id
        # of In-Reply-To.
        # Step 1.A: link each reference to the next, unless that one has a
        # parent already or the link would make a loop.
        prev: Node | None = None
        for r in refs:
            cur = container(r)
            if (
                prev is not None
                and cur is not prev
                and cur.parent is None
                and not walks.is_descendant(prev, cur)
            ):
                _link(prev, cur)
            prev = cur
        # Step 1.B: the last reference is the parent (replacing any parent a
        # truncated References gave), unless that would make a loop.
        if prev is not None and prev is not node:
            if node.parent is not prev:
                if not walks.is_descendant(prev, node):
                    _unlink(node)
                    _link(prev, node)
        elif node.parent is not None:
            _unlink(node)  # no references: no parent
    if counter is not None:
        counter[0] += walks.steps
    # Step 2: the parentless are the root's children.
    roots = [n for n in nodes if n.parent is None]
    # Step 3: prune dummies (below the root, recursively).
    top: list[Node] = []
    for r in roots:
        top.extend(_prune(r, at_root=True))
    # Step 4: gather top-level threads of one base subject.
    top = _merge_subjects(top)
    # Step 5: sort siblings by date, deepest first (the order does not
    # matter for the result: each sibling set is sorted by its own keys).
    _sort_tree(top)
    return top


def _prune(node: Node, at_root: bool) -> list[Node]:
    """Step 3 for ``node`` and its subtree: what takes its place among its
    siblings. Iterative (a References chain can be 10,000 deep)."""
    # Post-order over the subtree without recursion.
    order: list[Node] = []
    stack = [node]
    while stack:
        n = stack.pop()
        order.append(n)
        stack.extend(_live(n))
    for n in reversed(order):  # children before parents
        kids: list[Node] = []
        for c in n.children:
            if c.msg is None:
                if not c.children:
                    continue  # a dummy with no children goes
                # A dummy with children goes, its children take its place
                # (below the root: always).
                for g in c.children:
                    g.parent = n
                kids.extend(c.children)
            else:
                kids.append(c)
        n.children = kids
    if node.msg is None:
        if not node.children:
            return []
        if at_root and len(node.children) > 1:
            return [node]  # not promoted to the root: more than one child
        for g in node.children:
            g.parent = None
        return node.children
    return [node]


def _thread_subject(n: Node) -> Threadable:
    """The message giving a top-level thread its subject: itself, or a
    dummy's first child (step 4.B.i)."""
    m = n.msg if n.msg is not None else n.children[0].msg
    assert m is not None
    return m


def _merge_subjects(top: list[Node]) -> list[Node]:
    """Step 4 (A)-(C): gather threads under the root with one base subject."""
    table: dict[bytes, Node] = {}
    for n in top:
        f = _thread_subject(n)
        if not f.subject:
            continue
        have = table.get(f.subject)
        if have is None:
            table[f.subject] = n
        elif have.msg is not None and (
            n.msg is None or (_thread_subject(have).is_reply and not f.is_reply)
        ):
            table[f.subject] = n
    out: list[Node] = []
    for n in top:
        f = _thread_subject(n)
        have = table.get(f.subject) if f.subject else None
        if have is None or have is n:
            out.append(n)
            continue
        if have.msg is None and n.msg is None:
            for c in n.children:
                _link(have, c)
            n.children = []
        elif have.msg is None:
            _link(have, n)
        elif f.is_reply and not _thread_subject(have).is_reply:
            _link(have, n)
        else:
            # A new dummy takes the table message's place (``have`` becomes
            # it, keeping its position); both messages are its children.
            old = Node(have.msg, children=have.children)
            for c in old.children:
                c.parent = old
            have.msg = None
            have.children = []
            _link(have, old)
            _link(have, n)
    return out


def _date_key(n: Node) -> tuple[float, int]:
    """Step 5: a node sorts by its sent date, a dummy by its first child's
    (after that child's siblings are sorted); ties by mailbox order."""
    while n.msg is None and n.children:
        n = n.children[0]
    return (n.msg.date, n.msg.uid) if n.msg is not None else (0.0, 0)


def _sort_tree(top: list[Node]) -> None:
    order: list[Node] = []
    stack = list(top)
    while stack:
        n = stack.pop()
        order.append(n)
        stack.extend(n.children)
    for n in reversed(order):  # children sorted before their parents use them
        if len(n.children) > 1:
            n.children.sort(key=_date_key)
    top.sort(key=_date_key)


# --------------------------------------------------------------------------
# Wire form (RFC 5256 section 5, thread-list)


def encode_threads(top: Sequence[Node], number: dict[int, int]) -> bytes:
    """``* THREAD`` payload: each thread "(a b (c)(d e))"; a node with one
    child continues the list, several children each get parentheses; a
    dummy shows only its children. ``number`` maps UID -> reported number.
    Iterative, linear in the nodes."""
    out: list[bytes] = []
    # Stack items: a node to open as "(" ... ")", or a literal close.
    for t in top:
        stack: list[Node | None] = [t]
        while stack:
            item = stack.pop()
            if item is None:
                out.append(b")")
                continue
            out.append(b"(")
            stack.append(None)
            n: Node = item
            first = True
            # Follow single-child links inside the same parentheses.
            while True:
                if n.msg is not None:
                    out.append((b"" if first else b" ") + b"%d" % number[n.msg.uid])
                    first = False
                if len(n.children) == 1:
                    n = n.children[0]
                    continue
                if n.children:
                    if not first:
                        out.append(b" ")
                    # Children each in parentheses, in order: pushed reversed.
                    stack.extend(reversed(n.children))
                break
    return b"".join(out)
