"""What an S3 ETag says about the bytes behind it: a plain md5 for a single PutObject, ``md5(concat part
md5s)-N`` for a completed multipart upload."""

from __future__ import annotations

import hashlib
import re

_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")


def etag_md5(etag: str | None) -> str | None:
    """The hex md5 in a plain (single-part) ETag, or None for multipart/other ETags."""
    if not etag:
        return None
    value = etag.strip().strip('"').lower()
    return value if _MD5_ETAG.match(value) else None


def multipart_etag(part_md5s: list[str]) -> str:
    """The ETag S3 gives a completed multipart upload: ``md5(concat(binary part md5s))-N``."""
    return hashlib.md5(b"".join(bytes.fromhex(m) for m in part_md5s)).hexdigest() + f"-{len(part_md5s)}"
