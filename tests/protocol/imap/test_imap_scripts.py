# ruff: noqa: E501, UP031  (protocol transcripts read best unwrapped)
"""Table-driven IMAP protocol tests: client lines and the responses RFC 3501
and its extensions require, run against a real server on loopback.

A script is a list of steps ``(client line, expected response lines)``.
An expected line is a regular expression that must match a whole line;
"=" at the start makes it an exact line; "..." skips any lines. Named
groups are remembered and ``<<name>>`` in later client lines is replaced
by what they matched. Without a tagged line in the expected list, exactly
that many lines are read (continuation requests).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field

import pytest

from tests.protocol.imap.conftest import PASSWORD, USER, ImapClient, ImapEnv
from tests.protocol.imap.messages import FORWARD, MULTIPART, PLAIN

LOGIN = (f"a0 LOGIN {USER} {PASSWORD}", ["a0 OK .*Logged in"])
PLAIN_B64 = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()


@dataclass
class Script:
    steps: list[tuple[str | bytes, list[str]]]
    messages: list[tuple[bytes, tuple[str, ...]]] = field(default_factory=list)
    login: bool = True


def _inbox(*msgs: bytes) -> list[tuple[bytes, tuple[str, ...]]]:
    return [(m, ()) for m in msgs]


SELECT_INBOX = ("s1 SELECT INBOX", ["...", "s1 OK \\[READ-WRITE\\] SELECT completed"])

SCRIPTS: dict[str, Script] = {
    # ---------------------------------------------------------- any state
    "capability_not_authenticated": Script(login=False, steps=[
        ("a CAPABILITY", [r"\* CAPABILITY IMAP4rev1 .*STARTTLS AUTH=PLAIN", "=a OK CAPABILITY completed"]),
        ("b NOOP", ["=b OK NOOP completed"]),
        ('c ID ("name" "pytest" "version" NIL)', [r'\* ID \("name" "shardmail".*\)', "c OK .*"]),
        ("d LOGOUT", [r"\* BYE .*", "=d OK LOGOUT completed"]),
    ]),
    "capability_authenticated": Script(steps=[
        ("a CAPABILITY", [r"\* CAPABILITY IMAP4rev1 .*IDLE.*UIDPLUS MOVE UNSELECT SPECIAL-USE "
                          r"CREATE-SPECIAL-USE CHILDREN LIST-EXTENDED LIST-STATUS LIST-METADATA "
                          r"APPENDLIMIT=1000000 CONDSTORE QRESYNC ESEARCH STATUS=SIZE "
                          r"SORT SORT=DISPLAY THREAD=ORDEREDSUBJECT THREAD=REFERENCES ESORT CONTEXT=SEARCH "
                          r"CONTEXT=SORT "
                          r"SEARCHRES QUOTA QUOTA=RES-STORAGE OBJECTID BINARY MULTIAPPEND CATENATE SAVEDATE PREVIEW METADATA METADATA-SERVER UTF8=ACCEPT NOTIFY "
                          r"ACL RIGHTS=texk "
                          r"COMPRESS=DEFLATE",
                          "a OK .*"]),
    ]),
    "login_errors": Script(login=False, steps=[
        ("a LOGIN alice@example.org wrong", ["=a NO [AUTHENTICATIONFAILED] Authentication failed"]),
        ("b LOGIN nobody@example.org x", ["b NO \\[AUTHENTICATIONFAILED\\] .*"]),
        ("c SELECT INBOX", ["=c BAD Log in first"]),
        ("d LOGIN", ["d BAD .*"]),
        (f'e LOGIN "{USER}" {{9}}', [r"\+ .*"]),
        (PASSWORD, ["e OK \\[CAPABILITY IMAP4rev1 .*\\] Logged in"]),
        ("f LOGIN x y", ["f BAD .*"]),
        ("g AUTHENTICATE PLAIN", ["g BAD .*"]),
    ]),
    "authenticate_sasl_ir": Script(login=False, steps=[
        (f"a AUTHENTICATE PLAIN {PLAIN_B64}", ["a OK .*Logged in"]),
    ]),
    "authenticate_continuation": Script(login=False, steps=[
        ("a AUTHENTICATE PLAIN", [r"\+ "]),
        (PLAIN_B64, ["a OK .*Logged in"]),
    ]),
    "authenticate_errors": Script(login=False, steps=[
        ("a AUTHENTICATE CRAM-MD5", ["a NO \\[CANNOT\\] .*"]),
        ("b AUTHENTICATE PLAIN", [r"\+ "]),
        ("*", ["=b BAD Authentication cancelled"]),
        ("c AUTHENTICATE PLAIN !!!", ["c BAD .*"]),
        ("d AUTHENTICATE PLAIN " + base64.b64encode(b"\0alice@example.org\0bad").decode(),
         ["d NO \\[AUTHENTICATIONFAILED\\] .*"]),
        ("e AUTHENTICATE PLAIN " + base64.b64encode(b"x").decode(), ["e BAD .*"]),
    ]),
    "errors_keep_connection_usable": Script(steps=[
        ("a FROBNICATE", ["=a BAD Unknown command FROBNICATE"]),
        ("b FETCH 1 FLAGS", ["=b BAD No mailbox selected"]),
        ("c SELECT", ["c BAD .*"]),
        ("d STATUS INBOX (BOGUS)", ["d BAD .*BOGUS.*"]),
        ("", [r"\* BAD .*"]),
        ("e NOOP", ["=e OK NOOP completed"]),
    ]),
    # ---------------------------------------------------------- mailboxes
    "select_and_examine": Script(messages=_inbox(PLAIN, MULTIPART), steps=[
        ("a SELECT INBOX", [
            r"\* FLAGS \(\\Seen \\Answered \\Flagged \\Deleted \\Draft\)",
            r"\* OK \[PERMANENTFLAGS \(\\Seen \\Answered \\Flagged \\Deleted \\Draft \\\*\)\] .*",
            "=* 2 EXISTS", "=* 2 RECENT", r"\* OK \[UNSEEN 1\] .*",
            r"\* OK \[UIDVALIDITY \d+\] .*", r"\* OK \[UIDNEXT 3\] .*",
            r"\* OK \[MAILBOXID \(F[0-9a-f]{16}\)\] .*",
            r"\* OK \[HIGHESTMODSEQ \d+\] .*", "=a OK [READ-WRITE] SELECT completed"]),
        ("b EXAMINE inbox", [
            r"\* OK \[CLOSED\] .*", "...", r"\* OK \[PERMANENTFLAGS \(\)\] .*", "=* 2 EXISTS",
            "=* 0 RECENT", "...", "=b OK [READ-ONLY] EXAMINE completed"]),
        ("c STORE 1 +FLAGS (\\Seen)", ["c NO \\[READ-ONLY\\] .*"]),
        ("d SELECT Nowhere", ["...", "d NO \\[NONEXISTENT\\] .*"]),
        ("e FETCH 1 FLAGS", ["=e BAD No mailbox selected"]),
    ]),
    "create_delete_rename": Script(steps=[
        ("a CREATE Work/Projects/", [r"a OK \[MAILBOXID \(F[0-9a-f]{16}\)\] CREATE completed"]),
        ('b LIST "" "Work*"', [r'=* LIST (\HasChildren) "/" "Work"',
                                r'=* LIST (\HasNoChildren) "/" "Work/Projects"', "b OK .*"]),
        ("c CREATE Work", ["c NO \\[ALREADYEXISTS\\] .*"]),
        ("d CREATE inbox", ["d NO \\[ALREADYEXISTS\\] .*"]),
        ("e RENAME Work Jobs", ["=e OK RENAME completed"]),
        ('f LIST "" "Jobs/%"', [r'=* LIST (\HasNoChildren) "/" "Jobs/Projects"', "f OK .*"]),
        ('g LIST "" Work', ["=g OK LIST completed"]),
        ("h DELETE Jobs/Projects", ["=h OK DELETE completed"]),
        ("i DELETE INBOX", ["i NO .*"]),
        ("j DELETE Nowhere", ["j NO \\[NONEXISTENT\\] .*"]),
        ("k CREATE Entw&APw-rfe", ["k OK .*"]),
        ('l LIST "" "Entw*"', [r'=* LIST (\HasNoChildren) "/" "Entw&APw-rfe"', "l OK .*"]),
        ("m CREATE &Jjo", ["m BAD .*"]),
        ("n RENAME Nowhere Else", ["n NO \\[NONEXISTENT\\] .*"]),
        ("o CREATE Lists (USE (\\Flagged))", ["o OK .*"]),
        ('p LIST "" Lists', [r'=* LIST (\HasNoChildren \Flagged) "/" "Lists"', "p OK .*"]),
    ]),
    "rename_inbox_moves_messages": Script(messages=_inbox(PLAIN, MULTIPART), steps=[
        ("a RENAME INBOX Old", ["=a OK RENAME completed"]),
        ("b STATUS Old (MESSAGES)", ['=* STATUS "Old" (MESSAGES 2)', "b OK .*"]),
        ("c STATUS INBOX (MESSAGES)", ['=* STATUS "INBOX" (MESSAGES 0)', "c OK .*"]),
    ]),
    "subscribe_lsub": Script(steps=[
        ("a CREATE Lists", ["a OK .*"]),
        ("b UNSUBSCRIBE Lists", ["=b OK UNSUBSCRIBE completed"]),
        ('c LSUB "" "L*"', ["=c OK LSUB completed"]),
        ("d SUBSCRIBE Lists", ["=d OK SUBSCRIBE completed"]),
        ('e LSUB "" "L*"', [r'\* LSUB \(.*\) "/" "Lists"', "e OK .*"]),
        ('f LIST (SUBSCRIBED) "" "Lists"', [r'\* LIST \(.*\\Subscribed\) "/" "Lists"', "f OK .*"]),
        ("g UNSUBSCRIBE Lists", ["g OK .*"]),
        ('h LIST (SUBSCRIBED) "" "Lists"', ["h OK .*"]),
    ]),
    "list_variants": Script(messages=_inbox(PLAIN), steps=[
        ('a LIST "" ""', [r'=* LIST (\Noselect) "/" ""', "a OK .*"]),
        ('b LIST "" %', ['=* LIST (\\HasNoChildren) "/" "INBOX"', "...", "b OK .*"]),
        ('c LIST "" "*" RETURN (STATUS (MESSAGES UNSEEN))', [
            '=* LIST (\\HasNoChildren) "/" "INBOX"', '=* STATUS "INBOX" (MESSAGES 1 UNSEEN 1)',
            "...", "c OK .*"]),
        ('d LIST (SPECIAL-USE) "" "*"', [
            r'=* LIST (\HasNoChildren \Archive) "/" "Archive"',
            r'=* LIST (\HasNoChildren \Drafts) "/" "Drafts"',
            r'=* LIST (\HasNoChildren \Junk) "/" "Junk"',
            r'=* LIST (\HasNoChildren \Sent) "/" "Sent"',
            r'=* LIST (\HasNoChildren \Trash) "/" "Trash"', "d OK .*"]),
        ('e LIST "" ("INBOX" "Sent")', [r'\* LIST .* "INBOX"', r'\* LIST .* "Sent"', "e OK .*"]),
        ("f LIST Tr %", [r'=* LIST (\HasNoChildren \Trash) "/" "Trash"', "f OK .*"]),
        ('g LIST "" inbox', ['=* LIST (\\HasNoChildren) "/" "INBOX"', "g OK .*"]),
    ]),
    "status": Script(messages=[(PLAIN, ("\\Seen",)), (MULTIPART, ())], steps=[
        ("a STATUS INBOX (MESSAGES UIDNEXT UNSEEN SIZE)", [
            r'\* STATUS "INBOX" \(MESSAGES 2 UIDNEXT 3 UNSEEN 1 SIZE \d+\)', "a OK .*"]),
        ("b STATUS INBOX (UIDVALIDITY HIGHESTMODSEQ RECENT APPENDLIMIT)", [
            r'\* STATUS "INBOX" \(UIDVALIDITY \d+ HIGHESTMODSEQ \d+ RECENT 2 '
            r'APPENDLIMIT 1000000\)', "b OK .*"]),
        ("c STATUS Nowhere (MESSAGES)", ["c NO \\[NONEXISTENT\\] .*"]),
        ("d STATUS INBOX ()", ["d BAD .*"]),
    ]),
    "namespace_enable_id": Script(steps=[
        ("a NAMESPACE", [r'=* NAMESPACE (("" "/")) (("Other Users/" "/")) NIL', "a OK .*"]),
        ("b ENABLE CONDSTORE X-UNKNOWN", ["=* ENABLED CONDSTORE", "b OK .*"]),
        ("c ENABLE QRESYNC", ["=* ENABLED QRESYNC", "c OK .*"]),
        ("d ID NIL", [r"\* ID .*", "d OK .*"]),
    ]),
    "enable_not_before_login": Script(login=False, steps=[
        ("a ENABLE CONDSTORE", ["=a BAD Log in first"]),
    ]),
    # ------------------------------------------------------------ APPEND
    "append": Script(steps=[
        ("a APPEND INBOX {20}", [r"\+ .*"]),
        (b"Subject: hi\r\n\r\nbody!", [r"a OK \[APPENDUID \d+ 1\] APPEND completed"]),
        ('b APPEND INBOX (\\Seen $Work) " 5-Mar-2021 10:11:12 +0100" {20+}\r\nSubject: hi\r\n\r\n'
         'body2', [r"b OK \[APPENDUID \d+ 2\] APPEND completed"]),
        SELECT_INBOX,
        ("c FETCH 2 (FLAGS INTERNALDATE RFC822.SIZE)", [
            r'=* 2 FETCH (FLAGS ($Work \Seen \Recent) INTERNALDATE "05-Mar-2021 10:11:12 +0100" '
            r"RFC822.SIZE 20)", "c OK .*"]),
        ("d APPEND Nowhere {5+}\r\nhello", ["d NO \\[TRYCREATE\\] .*"]),
        ("e APPEND INBOX {2000000}", ["e NO \\[TOOBIG\\] .*"]),
        (b"f APPEND INBOX {2000000+}\r\n" + b"x" * 2000000, ["f NO \\[TOOBIG\\] .*"]),
        ("g NOOP", ["g OK .*"]),
        ("h APPEND INBOX (\\Recent) {5+}\r\nhello", ["h BAD .*"]),
        ("i APPEND INBOX {21+}\r\nSubject: new\r\n\r\nbody3", [
            "=* 3 EXISTS", "=* 3 RECENT", r"i OK \[APPENDUID \d+ 3\] .*"]),
    ]),
    # ------------------------------------------------------------- FETCH
    "fetch_items": Script(messages=_inbox(PLAIN, MULTIPART, FORWARD), steps=[
        SELECT_INBOX,
        ("a FETCH 1 (UID FLAGS RFC822.SIZE ENVELOPE)", [
            r'=* 1 FETCH (UID 1 FLAGS (\Recent) RFC822.SIZE %d ENVELOPE ("Mon, 7 Feb 1994 '
            r'21:52:25 -0800" "Lunch plans" (("Carol" NIL "carol" "example.net")) (("Carol" NIL '
            r'"carol" "example.net")) (("Carol" NIL "carol" "example.net")) (("Alice" NIL "alice" '
            r'"example.org")) (("Dave" NIL "dave" "example.com")) NIL NIL "<lunch@example.net>"))'
            % len(PLAIN), "a OK .*"]),
        ("b FETCH 2 BODY", [
            r'=* 2 FETCH (BODY (("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "7BIT" 26 1)'
            r'("APPLICATION" "OCTET-STREAM" ("NAME" "data.bin") NIL NIL "BASE64" 16) "MIXED"))',
            "b OK .*"]),
        ("c FETCH 2 BODYSTRUCTURE", [
            r'=* 2 FETCH (BODYSTRUCTURE (("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "7BIT" 26 1 '
            r'NIL NIL NIL NIL)("APPLICATION" "OCTET-STREAM" ("NAME" "data.bin") NIL NIL "BASE64" '
            r'16 NIL ("attachment" ("FILENAME" "data.bin")) NIL NIL) "MIXED" ("BOUNDARY" "XX") '
            r"NIL NIL NIL))", "c OK .*"]),
        ("d FETCH 2 (BODY.PEEK[1] BODY.PEEK[2.MIME])", [
            r"=* 2 FETCH (BODY[1] {26}\r\nSee the quarterly numbers. BODY[2.MIME] {144}\r\n"
            r"Content-Type: application/octet-stream; name=data.bin\r\nContent-Transfer-Encoding: "
            r"base64\r\nContent-Disposition: attachment; filename=data.bin\r\n\r\n)".replace(
                "\\r\\n", "\r\n"), "d OK .*"]),
        ("e FETCH 1 (BODY.PEEK[HEADER.FIELDS (Subject X-MOOD)] BODY.PEEK[TEXT]<6.2>)", [
            "=* 1 FETCH (BODY[HEADER.FIELDS (Subject X-MOOD)] {40}\r\nSubject: Lunch plans\r\n"
            "X-Mood: hungry\r\n\r\n BODY[TEXT]<6> {2}\r\nwe)", "e OK .*"]),
        ("f FETCH 1 BODY.PEEK[HEADER.FIELDS.NOT (From To Cc Date Message-ID)]", [
            "=* 1 FETCH (BODY[HEADER.FIELDS.NOT (From To Cc Date Message-ID)] {40}\r\n"
            "Subject: Lunch plans\r\nX-Mood: hungry\r\n\r\n)", "f OK .*"]),
        ("g FETCH 1 FLAGS", [r"=* 1 FETCH (FLAGS (\Recent))", "g OK .*"]),
        ("h FETCH 1 BODY[TEXT]", [
            "=* 1 FETCH (BODY[TEXT] {24}\r\nShall we meet at noon?\r\n FLAGS (\\Seen \\Recent))",
            "h OK .*"]),
        ("i FETCH 1 RFC822.HEADER", [r"\* 1 FETCH \(RFC822.HEADER \{%d\}\r\nFrom: .*\r\n\r\n\)"
                                     % (len(PLAIN) - 24), "i OK .*"]),
        ("j FETCH 1 (RFC822.TEXT)", ["=* 1 FETCH (RFC822.TEXT {24}\r\nShall we meet at noon?\r\n)",
                                     "j OK .*"]),
        ("k FETCH 1 RFC822", ["=* 1 FETCH (RFC822 {%d}\r\n%s)" % (len(PLAIN), PLAIN.decode()),
                              "k OK .*"]),
        ("l FETCH 1 BODY[]<0.4>", ["=* 1 FETCH (BODY[]<0> {4}\r\nFrom)", "l OK .*"]),
        ("m FETCH 1 BODY[]<5000.10>", ["=* 1 FETCH (BODY[]<5000> {0}\r\n)", "m OK .*"]),
        ("n FETCH 3 (BODY.PEEK[2.HEADER] BODY.PEEK[2.1] BODY.PEEK[2.TEXT])", [
            "=* 3 FETCH (BODY[2.HEADER] {54}\r\nFrom: Grace <grace@example.org>\r\nSubject: "
            "old news\r\n\r\n BODY[2.1] {11}\r\nInner body. BODY[2.TEXT] {11}\r\n"
            "Inner body.)", "n OK .*"]),
        ("o FETCH 3 BODY.PEEK[9]", ['=* 3 FETCH (BODY[9] "")', "o OK .*"]),
        ("p FETCH 1 FAST", [r'\* 1 FETCH \(FLAGS \(\\Seen \\Recent\) INTERNALDATE "[^"]+" '
                            r"RFC822.SIZE \d+\)", "p OK .*"]),
        ("q FETCH 1 ALL", [r"\* 1 FETCH \(FLAGS .* INTERNALDATE .* RFC822.SIZE \d+ ENVELOPE \(.*\)\)",
                           "q OK .*"]),
        ("r FETCH 1 FULL", [r"\* 1 FETCH \(FLAGS .* ENVELOPE \(.*\) BODY \(.*\)\)", "r OK .*"]),
        ("s FETCH 4 FLAGS", ["=s BAD Invalid message sequence number"]),
        ("t UID FETCH 1:* FLAGS", [r"\* 1 FETCH \(UID 1 FLAGS .*", r"\* 2 FETCH \(UID 2 .*",
                                  r"\* 3 FETCH \(UID 3 .*", "t OK .*"]),
        ("u UID FETCH 99 FLAGS", ["=u OK UID FETCH completed"]),
        ("v UID FETCH 5:* UID", [r"=* 3 FETCH (UID 3)", "v OK .*"]),
        ("w FETCH 1,3 (UID)", ["=* 1 FETCH (UID 1)", "=* 3 FETCH (UID 3)", "w OK .*"]),
        ("x FETCH 1 BINARY[1.TEXT]", ["x BAD .*"]),  # RFC 3516 section 4.2: parts only
        ("y FETCH * (UID)", ["=* 3 FETCH (UID 3)", "y OK .*"]),
    ]),
    # ------------------------------------------------------------- STORE
    "store": Script(messages=_inbox(PLAIN, MULTIPART, FORWARD), steps=[
        SELECT_INBOX,
        # RFC 3501 section 7.2.6: the new keyword in FLAGS before the FETCH shows it.
        ("a STORE 1 +FLAGS (\\Flagged $Todo)", [
            r"=* FLAGS (\Seen \Answered \Flagged \Deleted \Draft $Todo)",
            r"=* OK [PERMANENTFLAGS (\Seen \Answered \Flagged \Deleted \Draft $Todo \*)] "
            "Flags permitted",
            r"=* 1 FETCH (FLAGS ($Todo \Flagged \Recent))", "=a OK STORE completed"]),
        ("b STORE 1:2 FLAGS \\Answered", [
            r"=* 1 FETCH (FLAGS (\Answered \Recent))", r"=* 2 FETCH (FLAGS (\Answered \Recent))",
            "b OK .*"]),
        ("c STORE 2 -FLAGS.SILENT (\\Answered)", ["=c OK STORE completed"]),
        ("d UID STORE 3 +FLAGS (\\Seen)", [r"=* 3 FETCH (UID 3 FLAGS (\Seen \Recent))", "d OK .*"]),
        ("e FETCH 1:3 FLAGS", [r"=* 1 FETCH (FLAGS (\Answered \Recent))",
                               r"=* 2 FETCH (FLAGS (\Recent))",
                               r"=* 3 FETCH (FLAGS (\Seen \Recent))", "e OK .*"]),
        ("f STORE 9 +FLAGS (\\Seen)", ["f BAD .*"]),
        ("g STORE 1 +FLAGS (\\Bogus)", ["g BAD .*"]),
        ("h UID STORE 99 +FLAGS (\\Seen)", ["=h OK STORE completed"]),
    ]),
    # ------------------------------------------------------------ SEARCH
    "search_every_key": Script(
        messages=[(PLAIN, ("\\Seen", "\\Answered")), (MULTIPART, ("\\Flagged", "$Work")),
                  (FORWARD, ("\\Deleted", "\\Draft"))],
        steps=[
            SELECT_INBOX,
            ("a SEARCH ALL", ["=* SEARCH 1 2 3", "a OK .*"]),
            ("b SEARCH SEEN", ["=* SEARCH 1", "b OK .*"]),
            ("c SEARCH UNSEEN", ["=* SEARCH 2 3", "c OK .*"]),
            ("d SEARCH ANSWERED", ["=* SEARCH 1", "d OK .*"]),
            ("e SEARCH UNANSWERED", ["=* SEARCH 2 3", "e OK .*"]),
            ("f SEARCH FLAGGED", ["=* SEARCH 2", "f OK .*"]),
            ("g SEARCH UNFLAGGED", ["=* SEARCH 1 3", "g OK .*"]),
            ("h SEARCH DELETED", ["=* SEARCH 3", "h OK .*"]),
            ("i SEARCH UNDELETED", ["=* SEARCH 1 2", "i OK .*"]),
            ("j SEARCH DRAFT", ["=* SEARCH 3", "j OK .*"]),
            ("k SEARCH UNDRAFT", ["=* SEARCH 1 2", "k OK .*"]),
            ("l SEARCH KEYWORD $Work", ["=* SEARCH 2", "l OK .*"]),
            ("m SEARCH UNKEYWORD $Work", ["=* SEARCH 1 3", "m OK .*"]),
            ("n SEARCH FROM carol", ["=* SEARCH 1", "n OK .*"]),
            ("o SEARCH TO alice", ["=* SEARCH 1 2 3", "o OK .*"]),
            ("p SEARCH CC dave", ["=* SEARCH 1", "p OK .*"]),
            ("q SEARCH BCC eve", ["=* SEARCH 2", "q OK .*"]),
            ('r SEARCH SUBJECT "lunch"', ["=* SEARCH 1", "r OK .*"]),
            ("s SEARCH HEADER X-Mood hungry", ["=* SEARCH 1", "s OK .*"]),
            ("t SEARCH BODY quarterly", ["=* SEARCH 2", "t OK .*"]),
            ("u SEARCH TEXT frank", ["=* SEARCH 3", "u OK .*"]),
            ("v SEARCH SINCE 1-Jan-2000", ["=* SEARCH 1 2 3", "v OK .*"]),
            ("w SEARCH BEFORE 1-Jan-2000", ["=* SEARCH", "w OK .*"]),
            ("x SEARCH SENTBEFORE 1-Jan-2000", ["=* SEARCH 1", "x OK .*"]),
            ("y SEARCH SENTON 1-Mar-2022", ["=* SEARCH 2", "y OK .*"]),
            ("z SEARCH SENTSINCE 2-Mar-2022", ["=* SEARCH 3", "z OK .*"]),
            ("A SEARCH LARGER 300", ["=* SEARCH 2 3", "A OK .*"]),
            ("B SEARCH SMALLER 300", ["=* SEARCH 1", "B OK .*"]),
            ("C SEARCH 2:*", ["=* SEARCH 2 3", "C OK .*"]),
            ("D UID SEARCH UID 1,3", ["=* SEARCH 1 3", "D OK .*"]),
            ("E SEARCH NOT SEEN", ["=* SEARCH 2 3", "E OK .*"]),
            ("F SEARCH OR SEEN FLAGGED", ["=* SEARCH 1 2", "F OK .*"]),
            ("G SEARCH (OR SEEN FLAGGED) UNDELETED", ["=* SEARCH 1 2", "G OK .*"]),
            ("H SEARCH RECENT", ["=* SEARCH 1 2 3", "H OK .*"]),
            ("I SEARCH NEW", ["=* SEARCH 2 3", "I OK .*"]),
            ("J SEARCH OLD", ["=* SEARCH", "J OK .*"]),
            ("K SEARCH CHARSET UTF-8 SUBJECT {5}", [r"\+ .*"]),
            ("lunch", ["=* SEARCH 1", "K OK .*"]),
            ("L SEARCH CHARSET US-ASCII ALL", ["=* SEARCH 1 2 3", "L OK .*"]),
            ("M SEARCH CHARSET KOI8-R ALL", ["=M NO [BADCHARSET (UTF-8 US-ASCII)] "
                                             "Charset KOI8-R not supported"]),
            ("N SEARCH RETURN (MIN MAX COUNT ALL) UNDELETED", [
                '=* ESEARCH (TAG "N") MIN 1 MAX 2 ALL 1:2 COUNT 2', "N OK .*"]),
            ("O UID SEARCH RETURN () FLAGGED", ['=* ESEARCH (TAG "O") UID ALL 2', "O OK .*"]),
            ("P UID SEARCH RETURN (COUNT) KEYWORD $None", ['=* ESEARCH (TAG "P") UID COUNT 0',
                                                           "P OK .*"]),
            ("Q SEARCH 9", ["=* SEARCH", "Q OK .*"]),
            ("R SEARCH ON 1-Jan-1990", ["=* SEARCH", "R OK .*"]),
            # RFC 7162 section 3.1.2.1: the first CONDSTORE use tells HIGHESTMODSEQ.
            ("S SEARCH MODSEQ 1", [r"\* OK \[HIGHESTMODSEQ \d+\] .*",
                                   r"\* SEARCH 1 2 3 \(MODSEQ \d+\)", "S OK .*"]),
            ("S2 SEARCH RETURN (COUNT) MODSEQ 1", [r'\* ESEARCH \(TAG "S2"\) COUNT 3 MODSEQ \d+',
                                                   "S2 OK .*"]),
            ("S3 ENABLE CONDSTORE", ["=S3 BAD ENABLE not allowed now"]),
            ("T SEARCH BOGUS", ["T BAD .*"]),
        ]),
    # ------------------------------------------------------- COPY / MOVE
    "copy_move_uidplus": Script(messages=_inbox(PLAIN, MULTIPART, FORWARD), steps=[
        SELECT_INBOX,
        ("a COPY 1:2 Trash", [r"a OK \[COPYUID \d+ 1:2 1:2\] COPY completed"]),
        ("b COPY 1 Nowhere", ["b NO \\[TRYCREATE\\] .*"]),
        ("c STATUS Trash (MESSAGES)", ['=* STATUS "Trash" (MESSAGES 2)', "c OK .*"]),
        ("d MOVE 2 Archive", [r"\* OK \[COPYUID \d+ 2 1\] .*", "=* 2 EXPUNGE", "d OK .*"]),
        ("e UID MOVE 3 Archive", [r"\* OK \[COPYUID \d+ 3 2\] .*", "=* 2 EXPUNGE", "e OK .*"]),
        ("f FETCH 1:* UID", ["=* 1 FETCH (UID 1)", "f OK .*"]),
        ("g COPY 1 INBOX", [r"=* 2 EXISTS", r"\* \d+ RECENT", r"g OK \[COPYUID \d+ 1 4\] .*"]),
        ("h UID COPY 50:60 Trash", ["h OK .*"]),
        ("i MOVE 5 Trash", ["i BAD .*"]),
    ]),
    # ------------------------------------------- EXPUNGE / CLOSE / UNSELECT
    "expunge_close_unselect": Script(messages=_inbox(PLAIN, MULTIPART, FORWARD, PLAIN), steps=[
        SELECT_INBOX,
        ("a STORE 1,3 +FLAGS.SILENT (\\Deleted)", ["a OK .*"]),
        ("b EXPUNGE", ["=* 3 EXPUNGE", "=* 1 EXPUNGE", "=b OK EXPUNGE completed"]),
        ("c STORE 1:2 +FLAGS.SILENT (\\Deleted)", ["c OK .*"]),
        ("d UID EXPUNGE 4", ["=* 2 EXPUNGE", "d OK .*"]),
        ("e UNSELECT", ["=e OK UNSELECT completed"]),
        ("f STATUS INBOX (MESSAGES)", ['=* STATUS "INBOX" (MESSAGES 1)', "f OK .*"]),
        ("g SELECT INBOX", ["...", "g OK .*"]),
        ("h CLOSE", ["=h OK CLOSE completed"]),
        ("i STATUS INBOX (MESSAGES)", ['=* STATUS "INBOX" (MESSAGES 0)', "i OK .*"]),
        ("j CLOSE", ["=j BAD No mailbox selected"]),
        ("k EXAMINE INBOX", ["...", "k OK .*"]),
        ("l EXPUNGE", ["l NO \\[READ-ONLY\\] .*"]),
        ("m CHECK", ["=m OK CHECK completed"]),
    ]),
    # -------------------------------------------------------- CONDSTORE
    "condstore": Script(messages=_inbox(PLAIN, MULTIPART), steps=[
        ("a SELECT INBOX (CONDSTORE)", ["...", r"\* OK \[HIGHESTMODSEQ (?P<hms>\d+)\] .*",
                                        "a OK .*"]),
        ("b FETCH 1:* (FLAGS) (CHANGEDSINCE 1)", [
            r"\* 1 FETCH \(FLAGS \(\\Recent\) MODSEQ \(\d+\)\)",
            r"\* 2 FETCH \(FLAGS \(\\Recent\) MODSEQ \(\d+\)\)", "b OK .*"]),
        ("c STORE 1 +FLAGS (\\Seen)", [r"\* 1 FETCH \(FLAGS \(\\Seen \\Recent\) "
                                       r"MODSEQ \((?P<m1>\d+)\)\)", "c OK .*"]),
        ("d FETCH 1:* (UID) (CHANGEDSINCE <<hms>>)", [
            r"\* 1 FETCH \(UID 1 MODSEQ \(<<m1>>\)\)", "d OK .*"]),
        ("e STORE 1 (UNCHANGEDSINCE 1) +FLAGS (\\Flagged)", [
            r"e OK \[MODIFIED 1\] .*"]),
        ("f UID STORE 2 (UNCHANGEDSINCE <<m1>>) +FLAGS.SILENT (\\Flagged)", [
            r"\* 2 FETCH \(UID 2 MODSEQ \(\d+\)\)", "f OK .*"]),
        ("g FETCH 2 MODSEQ", [r"\* 2 FETCH \(MODSEQ \(\d+\)\)", "g OK .*"]),
        ("h STATUS INBOX (HIGHESTMODSEQ)", [r'\* STATUS "INBOX" \(HIGHESTMODSEQ \d+\)',
                                            "h OK .*"]),
    ]),
    # ---------------------------------------------------------- QRESYNC
    "qresync": Script(messages=_inbox(PLAIN, MULTIPART, FORWARD), steps=[
        ("a SELECT INBOX (QRESYNC (1 1))", ["...", "=a BAD Enable QRESYNC first"]),
        ("b ENABLE QRESYNC", ["=* ENABLED QRESYNC CONDSTORE", "b OK .*"]),
        ("c SELECT INBOX", ["...", r"\* OK \[UIDVALIDITY (?P<uv>\d+)\] .*", "...",
                            r"\* OK \[HIGHESTMODSEQ (?P<hms>\d+)\] .*", "c OK .*"]),
        ("d STORE 2 +FLAGS.SILENT (\\Deleted)", [r"\* 2 FETCH \(UID 2 MODSEQ \(\d+\)\)",
                                                 "d OK .*"]),
        ("e EXPUNGE", ["=* VANISHED 2", "e OK .*"]),
        ("f UID FETCH 1:* (FLAGS) (CHANGEDSINCE <<hms>> VANISHED)", [
            "=* VANISHED (EARLIER) 2", "f OK .*"]),
        ("g UNSELECT", ["g OK .*"]),
        ("h SELECT INBOX (QRESYNC (<<uv>> <<hms>> 1:3))", [
            "...", "=* VANISHED (EARLIER) 2", "h OK .*"]),
        ("i SELECT INBOX (QRESYNC (<<uv>> <<hms>>))", [
            r"\* OK \[CLOSED\] .*", "...", "=* VANISHED (EARLIER) 2", "i OK .*"]),
    ]),
    # ----------------------------------------------- limits and pipelining
    "literal_plus_and_pipelining": Script(messages=_inbox(PLAIN), steps=[
        ("p1 NOOP\r\np2 SELECT INBOX\r\np3 FETCH 1 UID\r\np4 LOGIN {3+}\r\nabc {1+}\r\nd",
         ["=p1 OK NOOP completed", "...", "p2 OK .*", "=* 1 FETCH (UID 1)", "p3 OK .*",
          "=p4 BAD LOGIN not allowed now"]),
        ("q1 SEARCH SUBJECT {70000}", ["=q1 BAD Literal too large"]),
        ("q2 NOOP", ["q2 OK .*"]),
    ]),
}


def _pattern(expected: str, ctx: dict[str, str]) -> re.Pattern[str] | None:
    if expected == "...":
        return None
    expected = _fill(expected, ctx)
    if expected.startswith("="):
        return re.compile(re.escape(expected[1:]), re.S)
    return re.compile(expected, re.S)


def _fill(text: str, ctx: dict[str, str]) -> str:
    return re.sub(r"<<(\w+)>>", lambda m: ctx[m.group(1)], text)


def _match(lines: list[str], expected: list[str], ctx: dict[str, str]) -> bool:
    """Match with "..." as a wildcard for any run of lines (backtracking)."""
    if not expected:
        return not lines
    pat = _pattern(expected[0], ctx)
    if pat is None:
        return any(_match(lines[i:], expected[1:], ctx) for i in range(len(lines) + 1))
    if not lines:
        return False
    m = pat.fullmatch(lines[0])
    if not m:
        return False
    saved = dict(ctx)
    ctx.update({k: v for k, v in m.groupdict().items() if v is not None})
    if _match(lines[1:], expected[1:], ctx):
        return True
    ctx.clear()
    ctx.update(saved)
    return False


async def run_script(client: ImapClient, script: Script) -> None:
    ctx: dict[str, str] = {}
    for send, expected in script.steps:
        if isinstance(send, str):
            send = _fill(send, ctx).encode()
        await client.send(send + b"\r\n")
        tagged = [e for e in expected if re.match(r"=?[A-Za-z]\w* ", e) and not e.startswith("=*")]
        if tagged:
            tag = tagged[-1].lstrip("=").split(" ")[0]
            raw = await client.until(tag)
        else:
            raw = [await client.line() for _ in expected]
        lines = [x.decode("utf-8", "replace") for x in raw]
        assert _match(lines, expected, ctx), (
            f"\nsent: {send!r}\nexpected: {expected}\ngot: {lines}")


async def play(imap_env: ImapEnv, script: Script) -> None:
    """Deliver the script's messages, log in unless it says not, run it."""
    for raw, flags in script.messages:
        await imap_env.deliver(raw, flags=flags)
    client = await imap_env.client()
    try:
        if script.login:
            await run_script(client, Script([LOGIN]))
        await run_script(client, script)
    finally:
        await client.close()


@pytest.mark.parametrize("name", sorted(SCRIPTS))
async def test_script(imap_env: ImapEnv, name: str) -> None:
    await play(imap_env, SCRIPTS[name])
