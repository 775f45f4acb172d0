"""S3 and S3-compatible servers (``s3://BUCKET/PREFIX``): the adapter, its item writer and the signed-PUT
fast path."""

from asyncdepo.adapters.s3.adapter import S3Adapter, parse_s3_url
from asyncdepo.adapters.s3.etags import etag_md5, multipart_etag

__all__ = ("S3Adapter", "etag_md5", "multipart_etag", "parse_s3_url")
