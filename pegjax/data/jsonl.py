"""JSON Lines input, read line by line with errors that name file and line."""

from __future__ import annotations

import gzip
import json
from typing import Iterator

from pegjax.errors import UserError


class DataError(UserError, ValueError):
    """Input data that cannot be used; the message names the file and line and what to do."""


def lines(path: str) -> Iterator[tuple[str, bytes]]:
    """(``path:line``, raw bytes) of every non-blank line; ``.gz`` files are decompressed."""
    with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
        for number, raw in enumerate(f, 1):
            if raw.strip():
                yield f"{path}:{number}", raw.rstrip(b"\r\n")


def decode_object(raw: bytes, where: str) -> dict:
    """One line -> a JSON object; DataError (reason bad_utf8 / bad_json in parentheses) otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{where}: invalid UTF-8 (bad_utf8); re-encode the file as UTF-8") from None
    try:
        item = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON (bad_json): {err.msg}") from None
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected a JSON object (bad_json)")
    return item


def objects(path: str) -> Iterator[tuple[str, dict]]:
    for where, raw in lines(path):
        yield where, decode_object(raw, where)


def titled_text(item: dict, where: str, with_title: bool = True) -> str:
    """A row's text; for corpus rows its title (if any) first, as BEIR evaluations join them."""
    text = item.get("text")
    if not isinstance(text, str):
        raise DataError(f"{where}: field 'text' must be a string")
    title = (item.get("title") or "") if with_title else ""
    if not isinstance(title, str):
        raise DataError(f"{where}: field 'title' must be a string")
    return f"{title} {text}".strip() if title else text
