"""Video ids: validation and the hash every storage key is derived from.

Ids are user strings (file stems, URLs, database keys). They are stored verbatim in Milvus
(VARCHAR primary key) but never spliced into paths or filter expressions: object keys use
``id_digest`` and filters pass ids as template parameters.
"""

from __future__ import annotations

import hashlib
import unicodedata

from dns_milvus.errors import InvalidInputError

#: Longest id accepted, in UTF-8 bytes (the Milvus VARCHAR primary key is sized to it).
MAX_ID_BYTES = 512


def validate_video_id(video_id: object) -> str:
    """Return ``video_id`` if it is a usable id, else raise ``InvalidInputError`` saying why."""
    if not isinstance(video_id, str):
        raise InvalidInputError(f"video id must be a string, got {type(video_id).__name__}")
    if not video_id or not video_id.strip():
        raise InvalidInputError("video id must be a non-empty string")
    size = len(video_id.encode("utf-8", errors="surrogatepass"))
    if size > MAX_ID_BYTES:
        raise InvalidInputError(f"video id is {size} bytes long; the limit is {MAX_ID_BYTES} bytes")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in video_id):
        shown = video_id[:40].encode("unicode_escape").decode("ascii")
        raise InvalidInputError(f"video id {shown!r} contains control characters or lone surrogates")
    return video_id


def id_digest(video_id: str) -> str:
    """Hex SHA-256 of the id's UTF-8 bytes: the only form of an id used in storage keys."""
    return hashlib.sha256(validate_video_id(video_id).encode("utf-8")).hexdigest()
