"""One handler per IMAP command, and the table saying which state allows which.

A handler is ``async def handle_<cmd>(session, command) -> Reply | None``:
it may write untagged responses and returns the tagged completion (None
when it answered itself, as LOGOUT, STARTTLS and IDLE do).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from imapd.imap.commands import (
    acl,
    append,
    auth,
    compress,
    fetch,
    mailbox,
    message,
    metadata,
    notify,
    quota,
    sort,
)
from imapd.imap.session import State

Handler = Callable[[Any, Any], Awaitable[Any]]

_ANY = frozenset(State) - {State.LOGOUT}
_NOT_AUTH = frozenset({State.NOT_AUTHENTICATED})
_AUTH = frozenset({State.AUTHENTICATED, State.SELECTED})
_SELECTED = frozenset({State.SELECTED})

# RFC 3501 section 6: command -> (handler, states that allow it).
COMMANDS: dict[str, tuple[Handler, frozenset[State]]] = {
    "CAPABILITY": (auth.handle_capability, _ANY),
    "NOOP": (auth.handle_noop, _ANY),
    "LOGOUT": (auth.handle_logout, _ANY),
    "ID": (auth.handle_id, _ANY),  # RFC 2971
    "STARTTLS": (auth.handle_starttls, _NOT_AUTH),
    "AUTHENTICATE": (auth.handle_authenticate, _NOT_AUTH),
    "LOGIN": (auth.handle_login, _NOT_AUTH),
    "ENABLE": (auth.handle_enable, frozenset({State.AUTHENTICATED})),  # RFC 5161 section 3.1
    "SELECT": (mailbox.handle_select, _AUTH),
    "EXAMINE": (mailbox.handle_select, _AUTH),
    "CREATE": (mailbox.handle_create, _AUTH),
    "DELETE": (mailbox.handle_delete, _AUTH),
    "RENAME": (mailbox.handle_rename, _AUTH),
    "SUBSCRIBE": (mailbox.handle_subscribe, _AUTH),
    "UNSUBSCRIBE": (mailbox.handle_subscribe, _AUTH),
    "LIST": (mailbox.handle_list, _AUTH),
    "LSUB": (mailbox.handle_list, _AUTH),
    "STATUS": (mailbox.handle_status, _AUTH),
    "APPEND": (append.handle_append, _AUTH),
    "NAMESPACE": (mailbox.handle_namespace, _AUTH),  # RFC 2342
    "GETQUOTAROOT": (quota.handle_getquotaroot, _AUTH),  # RFC 9208 section 4.1
    "GETQUOTA": (quota.handle_getquota, _AUTH),
    "SETQUOTA": (quota.handle_setquota, _AUTH),
    "COMPRESS": (compress.handle_compress, _AUTH),  # RFC 4978 section 3
    "GETMETADATA": (metadata.handle_getmetadata, _AUTH),  # RFC 5464 section 4.2
    "SETMETADATA": (metadata.handle_setmetadata, _AUTH),  # RFC 5464 section 4.3
    "NOTIFY": (notify.handle_notify, _AUTH),  # RFC 5465 section 3
    "SETACL": (acl.handle_setacl, _AUTH),  # RFC 4314 section 3.1
    "DELETEACL": (acl.handle_setacl, _AUTH),  # RFC 4314 section 3.2
    "GETACL": (acl.handle_getacl, _AUTH),  # RFC 4314 section 3.3
    "LISTRIGHTS": (acl.handle_listrights, _AUTH),  # RFC 4314 section 3.4
    "MYRIGHTS": (acl.handle_myrights, _AUTH),  # RFC 4314 section 3.5
    "IDLE": (message.handle_idle, _AUTH),  # RFC 2177
    "CHECK": (message.handle_check, _SELECTED),
    "CLOSE": (message.handle_close, _SELECTED),
    "UNSELECT": (message.handle_close, _SELECTED),  # RFC 3691
    "EXPUNGE": (message.handle_expunge, _SELECTED),
    "UID EXPUNGE": (message.handle_expunge, _SELECTED),  # RFC 4315
    "SEARCH": (message.handle_search, _SELECTED),
    "UID SEARCH": (message.handle_search, _SELECTED),
    "SORT": (sort.handle_sort, _SELECTED),  # RFC 5256 section 3
    "UID SORT": (sort.handle_sort, _SELECTED),
    "THREAD": (sort.handle_thread, _SELECTED),
    "UID THREAD": (sort.handle_thread, _SELECTED),
    "FETCH": (fetch.handle_fetch, _SELECTED),
    "UID FETCH": (fetch.handle_fetch, _SELECTED),
    "STORE": (message.handle_store, _SELECTED),
    "UID STORE": (message.handle_store, _SELECTED),
    "COPY": (message.handle_copy, _SELECTED),
    "UID COPY": (message.handle_copy, _SELECTED),
    "MOVE": (message.handle_copy, _SELECTED),  # RFC 6851
    "UID MOVE": (message.handle_copy, _SELECTED),
    "CANCELUPDATE": (message.handle_cancelupdate, _SELECTED),  # RFC 5267 section 4.3.5
}
