"""The S3 error boundary's pure logic: botocore exceptions and S3 error answers mapped into the errors tree
(:mod:`asyncdepo.transport.s3errors`), ETags and checksum headers (:mod:`asyncdepo.adapters.s3`). The same
paths on the wire are in tests/adapters/test_s3_paths.py; the common codes in test_s3_adapter.py."""

from __future__ import annotations

import pytest
from botocore import exceptions as bx

from asyncdepo import errors
from asyncdepo.adapters.s3 import checksums
from asyncdepo.adapters.s3.botoclient import trim_per_request_work
from asyncdepo.adapters.s3.etags import etag_md5
from asyncdepo.transport.s3errors import map_error_response, map_s3_error, parse_s3_xml, s3_code

WHAT = "UploadPart s3://b/k part 2"


def client_error(code: str, status: object, message: str = "", headers: dict[str, str] | None = None) -> Exception:
    error: Exception = bx.ClientError({"Error": {"Code": code, "Message": message},
                                       "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": headers or {}}},
                                      "UploadPart")
    return error


def test_a_head_answer_without_body_takes_its_status_from_the_code() -> None:
    """botocore gives a HEAD error (no body) the status as its code, and may have no status at all."""
    exc = map_s3_error(client_error("404", None), "HeadObject s3://b/k")
    assert isinstance(exc, errors.DepoError) and not errors.is_transient(exc)
    assert str(exc) == "HeadObject s3://b/k failed with HTTP 404" and s3_code(exc) == "404"


def test_an_unreadable_status_is_ignored() -> None:
    exc = map_s3_error(client_error("SlowDown", "fast", "Reduce your request rate", {"Retry-After": "7"}), WHAT)
    assert isinstance(exc, errors.RateLimitedError) and exc.retry_after == 7.0
    assert str(exc) == f"{WHAT} failed: SlowDown: Reduce your request rate"


def test_an_unknown_code_without_status_is_transient() -> None:
    exc = map_error_response(None, "Weird", "the server had a bad day", {}, what=WHAT)
    assert type(exc) is errors.TransientError and str(exc) == f"{WHAT} failed: Weird: the server had a bad day"


def test_quota() -> None:
    exc = map_s3_error(client_error("QuotaExceeded", 403, "no room"), WHAT)
    assert isinstance(exc, errors.QuotaError) and not errors.is_transient(exc) and "no room" in str(exc)


@pytest.mark.parametrize(("raised", "kind", "text"), [
    (bx.NoRegionError(), errors.UsageError, "no region configured"),
    (bx.ParamValidationError(report="Key is missing"), errors.UsageError, "invalid request parameters"),
    (bx.ResponseStreamingError(error="reset"), errors.TransientError, "connection failed"),
    (bx.WaiterError(name="w", reason="r", last_response={}), errors.TransientError, "WaiterError"),
    (ConnectionResetError(104, "reset by peer"), errors.TransientError, ""),
    (KeyError("UploadId"), errors.TransferError, "unexpected KeyError"),
])
def test_botocore_and_other_failures(raised: Exception, kind: type[errors.DepoError], text: str) -> None:
    exc = map_s3_error(raised, WHAT)
    assert isinstance(exc, kind) and WHAT in str(exc) and text in str(exc)


def test_a_mapped_error_passes_through() -> None:
    mine = errors.SourceChangedError("k: file changed")
    assert map_s3_error(mine, WHAT) is mine


def test_only_code_and_message_of_the_xml_are_read() -> None:
    body = (b"<Error><Code>SignatureDoesNotMatch</Code><Message>no</Message>"
            b"<StringToSign>AWS4-HMAC-SHA256 secret</StringToSign></Error>")
    assert parse_s3_xml(body) == ("SignatureDoesNotMatch", "no")
    assert parse_s3_xml(b"<html>bad gateway</html>") == ("", "")


def test_etags_and_checksum_lookups() -> None:
    assert etag_md5(None) is None and etag_md5("") is None
    assert etag_md5('"D41D8CD98F00B204E9800998ECF8427E"') == "d41d8cd98f00b204e9800998ecf8427e"
    assert etag_md5('"d41d8cd98f00b204e9800998ecf8427e-2"') is None
    headers = {"x-amz-checksum-crc32c": "yZRlqg=="}
    assert checksums.from_headers(headers, None) is None and checksums.from_response({}, None) is None
    assert checksums.from_headers(headers, "crc32c") == "c99465aa"
    assert checksums.request_params({"md5": "d41d8cd98f00b204e9800998ecf8427e", "crc32c": "c99465aa"}) == {
        "ContentMD5": "1B2M2Y8AsgTpgAmY7PhCfg==", "ChecksumCRC32C": "yZRlqg==", "ChecksumAlgorithm": "CRC32C"}


def test_trimming_a_client_without_the_private_attributes_changes_nothing() -> None:
    """botocore may move its private attributes: the User-Agent is then built as botocore builds it."""
    class Bare:
        pass

    class NoHandler:
        def __init__(self) -> None:
            self._user_agent_creator = self.Creator()

        class Creator:
            def to_string(self) -> str:
                return "botocore/x"

    bare, plain = Bare(), NoHandler()
    trim_per_request_work(bare)
    trim_per_request_work(plain)
    assert vars(bare) == {} and plain._user_agent_creator.to_string() == "botocore/x"


@pytest.mark.parametrize("url", ["s3:///prefix", "s3://Bad_Bucket!/p", "s3://"])
def test_a_url_without_a_valid_bucket_is_a_usage_error(url: str) -> None:
    from asyncdepo.adapters.s3 import parse_s3_url

    with pytest.raises(errors.UsageError, match="no valid bucket") as info:
        parse_s3_url(url)
    assert info.value.hint == "use s3://BUCKET/PREFIX"


def test_an_unknown_checksum_is_a_usage_error_naming_the_choices() -> None:
    from asyncdepo.adapters.s3 import S3Adapter

    with pytest.raises(errors.UsageError, match="--s3-checksum 'sha1': choose from crc64nvme, crc32c, crc32, none"):
        S3Adapter("s3://b/p", None, checksum="sha1")


@pytest.mark.parametrize(("endpoint", "shown"), [
    (None, "s3://b/p"),
    ("https://key:secret@s3.lab.example.org/?token=x", "s3://b/p at https://s3.lab.example.org"),
    ("http://[::1]:9000/base/", "s3://b/p at http://[::1]:9000/base"),
])
def test_the_description_shows_the_endpoint_without_credentials(endpoint: str | None, shown: str) -> None:
    from asyncdepo.adapters.s3 import S3Adapter

    adapter = S3Adapter("s3://b/p/", None, endpoint_url=endpoint)
    assert adapter.describe() == shown and adapter.pool_size == 64
