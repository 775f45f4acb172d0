"""Translation of botocore / aiobotocore failures into the :mod:`asyncdepo.errors` tree (the S3 boundary).

Contract: :func:`map_s3_error` turns any exception raised by an S3 call into a :class:`DepoError` whose
message names the operation and the ``s3://`` object and quotes S3's own error code and message — never a
header, a signature, a presigned URL or a credential. S3's error XML for ``SignatureDoesNotMatch`` carries
``StringToSign``/``CanonicalRequest``/``AWSAccessKeyId``: only ``Code`` and ``Message`` are ever used.

Classification (the engine retries what :func:`asyncdepo.errors.is_transient` accepts):

* integrity (:class:`IntegrityError`, retried like a transient error, with a fresh read): BadDigest,
  XAmzContentSHA256Mismatch, XAmzContentChecksumMismatch — S3 computed a digest of what it received that
  differs from the one we declared (Content-MD5, ``x-amz-checksum-*``): the body was damaged on the way,
  or the file is not what was hashed;
* transient: SlowDown/throttling, 5xx, RequestTimeout, connection and read failures, timeouts,
  InvalidDigest/IncompleteBody (re-send it), NoSuchUpload (the upload vanished: the item is reopened and
  starts over);
* permanent: NoSuchBucket, AccessDenied/InvalidAccessKeyId/SignatureDoesNotMatch/ExpiredToken (AuthError
  with a hint), missing credentials, EntityTooSmall/EntityTooLarge/InvalidPart/InvalidPartOrder/
  MalformedXML/InvalidArgument (RemoteValidationError), QuotaExceeded (QuotaError), and every other 4xx.
"""

from __future__ import annotations

import re
from typing import Any

from asyncdepo import errors
from asyncdepo.transport.failures import (
    connection_error,
    is_transport_failure,
    parse_retry_after,
    status_error,
)

_XML_FIELD = {name: re.compile(rf"<{name}>(.*?)</{name}>".encode(), re.DOTALL) for name in ("Code", "Message")}

# S3 error codes -> how to treat them. Anything not listed falls back to the HTTP status (failures.status_error).
_THROTTLE_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "ProvisionedThroughputExceededException",
    }
)
_TRANSIENT_CODES = _THROTTLE_CODES | {
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "OperationAborted",
    "InvalidDigest",
    "IncompleteBody",
    "NoSuchUpload",
}
_INTEGRITY_CODES = frozenset({"BadDigest", "XAmzContentSHA256Mismatch", "XAmzContentChecksumMismatch"})
_AUTH_HINTS = {
    "AccessDenied": "check that the credentials may write to this bucket and prefix (IAM or bucket policy)",
    "AllAccessDisabled": "access to this bucket is disabled; contact its owner",
    "InvalidAccessKeyId": "the access key is unknown to this endpoint: check AWS_ACCESS_KEY_ID / --profile "
    "and --endpoint-url",
    "SignatureDoesNotMatch": "the secret key does not match the access key: check AWS_SECRET_ACCESS_KEY / "
    "the profile, and --region",
    "ExpiredToken": "the session token expired: refresh the credentials (aws sso login, new STS token)",
    "InvalidToken": "the session token is malformed: check AWS_SESSION_TOKEN",
    "TokenRefreshRequired": "refresh the session credentials",
    "InvalidSecurity": "the credentials are not valid for this endpoint",
}
_VALIDATION_HINTS = {
    "EntityTooSmall": "every part but the last must be at least 5 MiB: use --chunk-size 5M or more",
    "EntityTooLarge": "a part or object is over the target's limit: use a smaller --chunk-size",
    "InvalidPart": "a listed part is missing or its ETag differs; the upload starts over on the next run",
    "InvalidPartOrder": "parts must be listed in ascending order",
    "MalformedXML": "the request XML was refused",
    "InvalidBucketName": "the bucket name is not valid for S3",
    "KeyTooLongError": "the object key is too long (S3: 1024 bytes); use a shorter prefix or path",
    "InvalidArgument": "the request was refused as invalid",
    "InvalidRequest": "the request was refused as invalid",
    "NoSuchKey": "the object does not exist (any more)",
    "MissingContentMD5": "this endpoint demands Content-MD5 on every body: run the same command with --s3-md5",
}


def parse_s3_xml(body: bytes) -> tuple[str, str]:
    """(``<Code>``, ``<Message>``) of an S3 XML error body, empty strings when absent. Only these two fields
    are read: the rest of a SignatureDoesNotMatch answer (StringToSign, AWSAccessKeyId) never leaves here."""
    code, message = (m.group(1).decode("utf-8", "replace").strip() if (m := rx.search(body)) else ""
                     for rx in _XML_FIELD.values())
    return code, message


def _status_and_body(exc: Any) -> tuple[int | None, str, str, dict[str, str]]:
    """(HTTP status, S3 error code, S3 message, response headers) of a botocore ClientError."""
    response = getattr(exc, "response", None) or {}
    err = response.get("Error") or {}
    meta = response.get("ResponseMetadata") or {}
    status = meta.get("HTTPStatusCode")
    code = str(err.get("Code") or "")
    message = str(err.get("Message") or "")
    headers = meta.get("HTTPHeaders") or {}
    try:
        status = int(status) if status is not None else None
    except (TypeError, ValueError):
        status = None
    if status is None and code.isdigit():  # HEAD responses have no body: botocore uses the status as code
        status = int(code)
    return status, code, message, {str(k).lower(): str(v) for k, v in headers.items()}


def s3_code(exc: BaseException) -> str:
    """The S3 error code (``"NoSuchUpload"``, ``"BadDigest"``...) behind a mapped error, or ``""``."""
    return str(getattr(exc, "s3_code", "") or "")


def map_client_error(exc: Exception, what: str) -> errors.DepoError:
    """Map a botocore ``ClientError`` raised by ``what`` (e.g. ``"UploadPart s3://b/k part 3"``).

    The returned error carries the S3 code as ``s3_code`` (read it with :func:`s3_code`).
    """
    return map_error_response(*_status_and_body(exc), what=what)


def map_error_response(
    status: int | None, code: str, message: str, headers: dict[str, str], *, what: str
) -> errors.DepoError:
    """Map an S3 error answer (HTTP status, ``<Code>``, ``<Message>``, lower-cased response headers)."""
    mapped = _classify(status, code, message, headers, what)
    mapped.s3_code = code  # type: ignore[attr-defined]
    return mapped


def _classify(
    status: int | None, code: str, message: str, headers: dict[str, str], what: str
) -> errors.DepoError:
    detail = f"{code}: {message}".strip(": ") if code and not code.isdigit() else message
    text = f"{what} failed" + (f" with HTTP {status}" if status else "") + (f": {detail}" if detail else "")
    if code in _AUTH_HINTS:
        return errors.AuthError(text, status=status, hint=_AUTH_HINTS[code])
    if code == "NoSuchBucket":
        return errors.RemoteValidationError(
            text, status=status, hint="create the bucket first, or check the bucket name and --endpoint-url"
        )
    if code in ("QuotaExceeded", "ServiceQuotaExceeded"):
        return errors.QuotaError(text, status=status)
    if code in _INTEGRITY_CODES:
        return errors.IntegrityError(text)
    if code in _TRANSIENT_CODES:
        retry_after = parse_retry_after(headers.get("retry-after"))
        if code in _THROTTLE_CODES:
            return errors.RateLimitedError(text, retry_after=retry_after, status=status)
        return errors.TransientError(text, status=status)
    if code in _VALIDATION_HINTS:
        return errors.RemoteValidationError(text, status=status, hint=_VALIDATION_HINTS[code])
    if status is None:
        return errors.TransientError(text)
    return status_error(status, detail, what=what, retry_after=headers.get("retry-after"), hints={
        errors.AuthError: "check the credentials (AWS_* environment variables or --profile) and the bucket policy"})


def map_s3_error(exc: BaseException, what: str) -> errors.DepoError:
    """Map any exception from an aiobotocore call into the errors tree (DepoErrors pass through).

    :param exc: what the call raised.
    :param what: the operation and object, e.g. ``"PutObject s3://bucket/key"`` (no secrets).
    """
    if isinstance(exc, errors.DepoError):
        return exc
    from botocore import exceptions as bx  # imported here: the module must load without aiobotocore

    if isinstance(exc, bx.ClientError):
        return map_client_error(exc, what)
    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return errors.AuthError(
            f"{what}: no usable AWS credentials",
            hint="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or pass --profile NAME",
        )
    if isinstance(exc, bx.ProfileNotFound):
        return errors.UsageError(
            f"{what}: the AWS profile was not found", hint="check --profile / AWS_PROFILE"
        )
    if isinstance(exc, bx.NoRegionError):
        return errors.UsageError(f"{what}: no region configured", hint="pass --region or set AWS_REGION")
    if isinstance(exc, bx.ParamValidationError):
        return errors.UsageError(f"{what}: invalid request parameters")
    # Connection refused/reset, read timeouts, closed connections: botocore wraps them in HTTPClientError
    # subclasses whose str() carries only the endpoint URL and the underlying error (no query strings:
    # presigned URLs are never used here).
    if isinstance(exc, (bx.HTTPClientError, bx.ConnectionError)):
        return errors.TransientError(f"{what}: connection failed ({type(exc).__name__})")
    if is_transport_failure(exc):
        return connection_error(exc, what)
    if isinstance(exc, bx.BotoCoreError):
        return errors.TransientError(f"{what}: {type(exc).__name__}")
    return errors.TransferError(f"{what}: unexpected {type(exc).__name__}")
