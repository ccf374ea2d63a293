"""Fuzzing the content parsers from a small corpus: HTML to text and the
webmail sanitizer never raise whatever the markup, and the sanitizer's
output is only ever allow-listed, well-nested HTML; the MIME parser never
raises (it has no error type of its own: broken MIME is stored as is)."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from httpapi.sanitize import ALLOWED_TAGS, sanitize_html
from storage.markup import EndTag, StartTag, tokenize
from storage.mime import html_to_text, parse_message, parsed_from_json, parsed_to_json

CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "fuzz"
HTML_SEEDS = [p.read_text() for p in sorted((CORPUS / "html").glob("*.html"))]
MIME_SEEDS = [p.read_bytes() for p in sorted((CORPUS / "mime").glob("*.eml"))]

# Pieces that switch tokenizer states, spliced at random into the seeds.
HTML_PIECES = [
    "<", "</", "<!--", "-->", "--!>", "<!", "<?", ">", "/>", '"', "'", "=", " ", "\t", "&",
    "&amp;", "&#x3c;", "<script>", "</script>", "<style>", "<title>", "<textarea>",
    "<plaintext>", "<svg>", "<a href=", "javascript:", "<b>", "</b>", "<img src=x ", "\x00",
]
MIME_PIECES = [
    b"\r\n", b"\n", b"--b", b"--b--", b": ", b";", b'"', b"=?utf-8?b?", b"?=", b"*0*=",
    b"Content-Type: multipart/mixed; boundary=b\r\n", b"Content-Type: text/html\r\n",
    b"Content-Transfer-Encoding: base64\r\n", b"<", b"(", b"\xff",
]


def _spliced(seeds: list, pieces: list, empty: str | bytes) -> st.SearchStrategy:
    """A seed with random pieces inserted at random places."""

    @st.composite
    def build(draw: st.DrawFn) -> str | bytes:
        doc = draw(st.sampled_from(seeds))
        for _ in range(draw(st.integers(0, 12))):
            at = draw(st.integers(0, len(doc)))
            piece = draw(st.one_of(st.sampled_from(pieces), st.just(empty)))
            doc = doc[:at] + piece + doc[at:]
        return doc

    return build()


html_docs = st.one_of(_spliced(HTML_SEEDS, HTML_PIECES, ""), st.text(max_size=200))
mime_docs = st.one_of(_spliced(MIME_SEEDS, MIME_PIECES, b""), st.binary(max_size=200))
fuzz = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fuzz
@given(html_docs)
def test_html_to_text_never_raises(markup: str) -> None:
    text = html_to_text(markup)
    # Lines as indexed: white space collapsed, no empty line.
    assert all(line and line == " ".join(line.split()) for line in text.split("\n")) or not text


@fuzz
@given(html_docs)
def test_sanitized_html_is_allow_listed_and_well_nested(markup: str) -> None:
    out = sanitize_html(markup)
    open_tags: list[str] = []
    for token in tokenize(out):
        if isinstance(token, StartTag):
            assert token.name in ALLOWED_TAGS
            assert not any(name.startswith("on") or name == "style" for name, _ in token.attrs)
            if token.name not in {"br", "col", "hr", "img"}:
                open_tags.append(token.name)
        elif isinstance(token, EndTag):
            assert open_tags.pop() == token.name
    assert open_tags == []
    assert sanitize_html(out) == out  # nothing left to remove: a fixed point


@fuzz
@given(mime_docs)
def test_parse_message_never_raises(raw: bytes) -> None:
    parsed = parse_message(raw)
    assert parsed.size == len(raw)
    parsed_from_json(parsed_to_json(parsed))
