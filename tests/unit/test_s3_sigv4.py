"""The S3 fast path's request signing (``asyncdepo.adapters.s3.fast.SigV4``) against botocore's, offline.

(The fast path against real S3 servers is tested in tests/adapters/test_s3_adapter.py.)
"""

from __future__ import annotations

import pytest


def test_sigv4_matches_botocore(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our SigV4 (unsigned payload) signs exactly as botocore's S3SigV4Auth does."""
    import datetime as dt

    import botocore.auth
    from botocore.awsrequest import AWSRequest
    from botocore.config import Config
    from botocore.credentials import Credentials

    from asyncdepo.adapters.s3.fast import SigV4

    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: when.replace(tzinfo=None))
    url = "http://127.0.0.1:9000/bucket/dir%20x/f%2Bg%3D.bin?partNumber=3&uploadId=a%2Fb%3D%3D"
    creds = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "token/xyz=")
    request = AWSRequest(method="PUT", url=url, headers={"Content-MD5": "1B2M2Y8AsgTpgAmY7PhCfg=="}, data=b"")
    request.context = {"client_config": Config(s3={"payload_signing_enabled": False})}
    botocore.auth.S3SigV4Auth(creds, "s3", "eu-west-3").add_auth(request)
    ours = SigV4("eu-west-3").sign(
        "PUT",
        url,
        {"host": "127.0.0.1:9000", "content-md5": "1B2M2Y8AsgTpgAmY7PhCfg=="},
        creds.access_key,
        creds.secret_key,
        creds.token,
        now=when,
    )
    assert ours["Authorization"] == request.headers["Authorization"]
    assert ours["x-amz-content-sha256"] == request.headers["X-Amz-Content-SHA256"] == "UNSIGNED-PAYLOAD"
