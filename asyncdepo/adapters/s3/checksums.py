"""S3's integrity headers: which digest goes in which header or botocore parameter, and what S3 reports back.

* ``Content-MD5`` — base64 of the body's md5 (sent only with ``--s3-md5``: md5 is the costliest digest,
  ~0.6 GB/s a core).
* ``x-amz-checksum-<algo>`` — an additional checksum, base64 of the CRC as big-endian bytes, with
  ``x-amz-sdk-checksum-algorithm`` naming the algorithm (S3 needs only the value header; some servers,
  moto among them, record the value only when the algorithm is named). S3 computes the checksum of what
  it received and refuses a mismatch with ``400 BadDigest``; it answers with the value it stored.
* Multipart: CreateMultipartUpload names the algorithm and ``x-amz-checksum-type: FULL_OBJECT``, each
  UploadPart carries its part's value, CompleteMultipartUpload the whole object's — composed from the
  parts' values (CRC combine), which S3 checks against its own composition and reports back.

The cheapest algorithms S3 offers are the CRCs; CRC-64/NVME is S3's default (and its only algorithm whose
multipart type is always FULL_OBJECT), so it is ours. ``crc32c`` and ``crc32`` are for S3-compatible
servers that lack CRC-64/NVME (``--s3-checksum``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from asyncdepo.digests import from_base64, to_base64

#: the additional checksums ``--s3-checksum`` offers (plus ``none``), cheapest first
ALGORITHMS = ("crc64nvme", "crc32c", "crc32")
_PARAM = {"crc64nvme": "ChecksumCRC64NVME", "crc32c": "ChecksumCRC32C", "crc32": "ChecksumCRC32"}


def header(algo: str) -> str:
    """The request/response header of an additional checksum, e.g. ``x-amz-checksum-crc64nvme``."""
    return f"x-amz-checksum-{algo}"


def request_headers(digests: Mapping[str, str]) -> dict[str, str]:
    """Headers for a body whose hex ``digests`` are given (``md5`` and at most one of :data:`ALGORITHMS`)."""
    out: dict[str, str] = {}
    if digests.get("md5"):
        out["content-md5"] = to_base64(digests["md5"])
    for algo in ALGORITHMS:
        if digests.get(algo):
            out[header(algo)] = to_base64(digests[algo])
            out["x-amz-sdk-checksum-algorithm"] = algo.upper()
    return out


def request_params(digests: Mapping[str, str]) -> dict[str, str]:
    """The same as botocore parameters of PutObject/UploadPart."""
    out: dict[str, str] = {}
    if digests.get("md5"):
        out["ContentMD5"] = to_base64(digests["md5"])
    for algo in ALGORITHMS:
        if digests.get(algo):
            out[_PARAM[algo]] = to_base64(digests[algo])
            out["ChecksumAlgorithm"] = algo.upper()
    return out


def param(algo: str) -> str:
    """The botocore parameter/response key of an additional checksum, e.g. ``ChecksumCRC64NVME``."""
    return _PARAM[algo]


def from_headers(headers: Mapping[str, str], algo: str | None) -> str | None:
    """The hex value of ``algo`` a response reported (lower-cased header names), or None."""
    if not algo:
        return None
    value = headers.get(header(algo))
    return _hex(value)


def from_response(response: Mapping[str, Any], algo: str | None) -> str | None:
    """The hex value of ``algo`` in a botocore response dict (``ChecksumCRC64NVME``...), or None."""
    if not algo:
        return None
    return _hex(response.get(_PARAM[algo]))


def _hex(value: Any) -> str | None:
    if not value:
        return None
    # a composite multipart checksum ends in "-N"; ours are full-object values
    text = str(value).split("-", 1)[0]
    return from_base64(text) or None
