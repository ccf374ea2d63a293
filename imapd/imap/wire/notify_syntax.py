"""NOTIFY command syntax (RFC 5465 section 8) and the rules of sections
3 and 5 that make a well-formed command BAD.

Contract: :func:`parse_notify` reads the arguments after ``NOTIFY`` from a
parser cursor and returns a :class:`~imapd.imap.wire.commands.Notify`, or
raises the parser's BAD error. Linear in the input, and bounded: at most
:data:`MAX_GROUPS` event groups, :data:`MAX_MAILBOXES` mailbox names and
:data:`MAX_EVENTS` events per group are read before the command is
refused, so a 64 KiB line of names costs no more than reading it. Event
names the server does not know are kept (``event-ext``): the handler
answers them NO [BADEVENT] (section 6), not BAD.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from imapd.imap.wire import commands as c

if TYPE_CHECKING:
    from imapd.imap.wire.parser import _Reader

MAX_GROUPS = 64  # event groups in one NOTIFY SET
MAX_MAILBOXES = 1000  # mailbox names over all SUBTREE / MAILBOXES filters
MAX_EVENTS = 32  # events in one group (there are 8 kinds; repeats are abuse)
MAX_FETCH_ATTS = 64  # MessageNew fetch attributes

MESSAGE_EVENTS = ("MessageNew", "MessageExpunge", "FlagChange", "AnnotationChange")
MAILBOX_EVENTS = ("MailboxName", "SubscriptionChange", "MailboxMetadataChange")
USER_EVENTS = ("ServerMetadataChange",)
KNOWN_EVENTS = {e.upper(): e for e in (*MESSAGE_EVENTS, *MAILBOX_EVENTS, *USER_EVENTS)}
SELECTED_FILTERS = ("SELECTED", "SELECTED-DELAYED")
_PLAIN_FILTERS = (*SELECTED_FILTERS, "INBOXES", "PERSONAL", "SUBSCRIBED")
_NAMED_FILTERS = ("SUBTREE", "MAILBOXES")


def parse_notify(r: _Reader, tag: str, name: str) -> c.Notify:
    """notify = "NOTIFY" SP (notify-set / notify-none) (section 8)."""
    from imapd.imap.wire.parser import _Bad

    r.sp()
    verb = r.atom("SET or NONE").upper()
    if verb == "NONE":
        r.expect_end()
        return c.Notify(tag=tag, name=name, status=False, groups=())
    if verb != "SET":
        raise _Bad("Expected NOTIFY SET or NOTIFY NONE")
    r.sp()
    status = False
    if r.peek() != 0x28:  # status-indicator = SP "STATUS" (section 3.1)
        if r.atom("STATUS or an event group").upper() != "STATUS":
            raise _Bad("Expected STATUS or an event group")
        status = True
        r.sp()
    budget = [MAX_MAILBOXES]
    groups: list[c.NotifyGroup] = []
    while True:
        if len(groups) == MAX_GROUPS:
            raise _Bad(f"At most {MAX_GROUPS} event groups")
        groups.append(_event_group(r, budget))
        if not r.try_sp():
            break
    r.expect_end()
    _check_rules(groups)
    return c.Notify(tag=tag, name=name, status=status, groups=tuple(groups))


def _event_group(r: _Reader, budget: list[int]) -> c.NotifyGroup:
    """event-group = "(" filter-mailboxes SP events ")"."""
    from imapd.imap.wire.parser import _Bad

    r.char(0x28, "( to open an event group")
    kind = r.atom("a mailbox filter").upper()
    names: tuple[str, ...] = ()
    if kind in _NAMED_FILTERS:
        r.sp()
        names = _mailboxes(r, budget)
    elif kind not in _PLAIN_FILTERS:
        raise _Bad(f"Unknown mailbox filter {kind[:40]}")
    r.sp()
    events: tuple[str, ...] | None
    fetch: tuple[c.FetchAttribute, ...] = ()
    if r.peek() != 0x28:
        if r.atom("NONE or an event list").upper() != "NONE":
            raise _Bad("Expected NONE or an event list")
        events = None
    else:
        events, fetch = _events(r)
    r.char(0x29, ") to close the event group")
    return c.NotifyGroup(kind, names, events, fetch)


def _mailboxes(r: _Reader, budget: list[int]) -> tuple[str, ...]:
    """one-or-more-mailbox = mailbox / "(" mailbox *(SP mailbox) ")"."""
    from imapd.imap.wire.parser import _Bad

    def one() -> str:
        budget[0] -= 1
        if budget[0] < 0:
            raise _Bad(f"At most {MAX_MAILBOXES} mailboxes in NOTIFY")
        return _canonical(r.mailbox())

    if r.peek() != 0x28:
        return (one(),)
    names = r.paren_list(one)
    if not names:
        raise _Bad("Empty mailbox list")
    return tuple(dict.fromkeys(str(n) for n in names))


def _canonical(name: str) -> str:
    """INBOX in any case is INBOX, also as a hierarchy's first level
    (RFC 3501 section 5.1); trailing delimiters say nothing here."""
    head, sep, rest = name.partition("/")
    if head.upper() == "INBOX":
        name = "INBOX" + sep + rest
    return name.rstrip("/") or name


def _events(r: _Reader) -> tuple[tuple[str, ...], tuple[c.FetchAttribute, ...]]:
    """ "(" event *(SP event) ")"; MessageNew may take "(" fetch-att ... ")"."""
    from imapd.imap.wire.parser import _Bad, _fetch_att

    r.char(0x28, "(")
    events: list[str] = []
    fetch: list[c.FetchAttribute] = []
    while True:
        if len(events) == MAX_EVENTS:
            raise _Bad(f"At most {MAX_EVENTS} events in a group")
        word = r.atom("an event")
        event = KNOWN_EVENTS.get(word.upper(), word[:64])
        events.append(event)
        if event == "MessageNew" and r.buf[r.pos : r.pos + 2] == b" (":
            r.pos += 1
            atts = r.paren_list(lambda: _fetch_att(r))
            if not atts or len(atts) > MAX_FETCH_ATTS:
                raise _Bad(f"MessageNew takes 1 to {MAX_FETCH_ATTS} fetch attributes")
            fetch.extend(_peeking(a) for a in atts)  # type: ignore[arg-type]
        if r.peek() == 0x29:
            r.pos += 1
            return tuple(dict.fromkeys(events)), tuple(fetch)
        r.sp()


def _peeking(att: c.FetchAttribute) -> c.FetchAttribute:
    """A notification is no read: BODY[...] and BINARY[...] are sent as
    their .PEEK forms, and RFC822 / RFC822.TEXT (which would set \\Seen,
    RFC 3501 section 6.4.5) are refused."""
    from imapd.imap.wire.parser import _Bad

    if att.name in ("RFC822", "RFC822.TEXT"):
        raise _Bad(f"{att.name} would set \\Seen; use BODY.PEEK[] in NOTIFY")
    if att.section is not None and not att.peek:
        return c.FetchAttribute(att.name, att.section, att.partial, True)
    return att


def _check_rules(groups: list[c.NotifyGroup]) -> None:
    """The rules that make a NOTIFY SET BAD (RFC 5465):

    * section 6.1: at most one of SELECTED / SELECTED-DELAYED, and it
      takes message events only;
    * section 5: MessageNew and MessageExpunge come together, and
      FlagChange or AnnotationChange only with both.
    """
    from imapd.imap.wire.parser import _Bad

    selected = [g for g in groups if g.filter in SELECTED_FILTERS]
    if len(selected) > 1:
        raise _Bad("Only one SELECTED or SELECTED-DELAYED event group")
    for g in groups:
        events = set(g.events or ())
        if g.filter in SELECTED_FILTERS:
            wrong = events & {*MAILBOX_EVENTS, *USER_EVENTS}
            if wrong:
                raise _Bad(f"{g.filter} takes message events only, not {sorted(wrong)[0]}")
        if ("MessageNew" in events) != ("MessageExpunge" in events):
            raise _Bad("MessageNew and MessageExpunge must be given together")
        if events & {"FlagChange", "AnnotationChange"} and "MessageNew" not in events:
            raise _Bad("FlagChange and AnnotationChange need MessageNew and MessageExpunge")
