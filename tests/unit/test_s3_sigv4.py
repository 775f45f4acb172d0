"""The S3 fast path's request signing (``asyncdepo.adapters.s3.fast.SigV4``, botocore's ``S3SigV4Auth``),
offline: what it signs. Servers that verify every signature (rclone serve s3) accept the fast path's
requests in tests/adapters/test_s3_adapter.py.
"""

from __future__ import annotations


def test_signs_the_integrity_headers_and_never_the_payload() -> None:
    from asyncdepo.adapters.s3.fast import SigV4

    url = "http://127.0.0.1:9000/bucket/dir%20x/f%2Bg%3D.bin?partNumber=3&uploadId=a%2Fb%3D%3D"
    secret = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
    headers = SigV4("eu-west-3").sign(
        "PUT",
        url,
        {"host": "127.0.0.1:9000", "content-md5": "1B2M2Y8AsgTpgAmY7PhCfg==",
         "x-amz-checksum-crc64nvme": "AAAAAAAAAAA=", "x-amz-sdk-checksum-algorithm": "CRC64NVME"},
        "AKIDEXAMPLE",
        secret,
        "token/xyz=",
    )
    auth = headers["Authorization"]
    assert auth.startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
    assert "/eu-west-3/s3/aws4_request" in auth
    signed = auth.split("SignedHeaders=")[1].split(",")[0].split(";")
    assert {"content-md5", "host", "x-amz-checksum-crc64nvme", "x-amz-sdk-checksum-algorithm",
            "x-amz-content-sha256", "x-amz-date", "x-amz-security-token"} <= set(signed)
    assert headers["X-Amz-Content-SHA256"] == "UNSIGNED-PAYLOAD"
    assert headers["X-Amz-Security-Token"] == "token/xyz="
    assert all(secret not in v for v in headers.values())
