"""One S3-compatible bucket under a key prefix, through boto3: whole-object writes (one PUT, or a multipart
upload that becomes visible only when complete), reads, listings, complete deletion of a prefix (every
version and delete marker on a versioned bucket), presigned GETs. Every boto3 failure becomes a TwinError:
``StorageUnavailable`` (503 + Retry-After) when the bucket does not answer, throttles past the retries
(botocore's standard mode retries 503 SlowDown and 5xx with backoff) or refuses; ``NotFound`` for a
missing key; ``ConfigError`` naming the setting from ``check_access`` at start-up.

boto3 is imported when a Bucket is built: importing this module costs nothing.
"""
from __future__ import annotations

import io
import logging
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from utils.errors import ConfigError, NotFound, StorageUnavailable
from utils.storage.files import StoredFile

log = logging.getLogger("twin.storage")

URL_RE = re.compile(r"^s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(.*))?$")
MULTIPART_BYTES = 8 * 1024 * 1024        # larger objects go up as multipart uploads (parts of this size)
_MISSING = {"NoSuchKey", "404", "NotFound", "NoSuchVersion"}
_REFUSED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "InvalidToken",
            "ExpiredToken", "AccountProblem"}
_NO_VERSIONS_API = {"NotImplemented", "MethodNotAllowed", "XNotImplemented", "501"}
CREDENTIALS_HINT = ("the AWS credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or the "
                    "instance role)")


def parse_storage_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ("bucket", "some/prefix") (no slash at either end of the prefix)."""
    m = URL_RE.fullmatch(url.strip())
    if m is None:
        raise ConfigError(f"TWIN_STORAGE_URL={url!r} is not s3://BUCKET or s3://BUCKET/PREFIX")
    prefix = (m.group(2) or "").strip("/")
    if any(p in (".", "..") for p in prefix.split("/")) or "//" in prefix:
        raise ConfigError(f"TWIN_STORAGE_URL={url!r}: the prefix must be plain folder names")
    return m.group(1), prefix


def sse_args(sse: str) -> dict[str, str]:
    """TWIN_S3_SSE -> put/copy arguments: "" none, AES256 (SSE-S3), aws:kms (the account's key), else a
    KMS key id or ARN."""
    if not sse:
        return {}
    if sse == "AES256":
        return {"ServerSideEncryption": "AES256"}
    if sse == "aws:kms":
        return {"ServerSideEncryption": "aws:kms"}
    return {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": sse}


def make_client(endpoint_url: str, addressing_style: str, max_attempts: int):
    import boto3
    from botocore.config import Config
    config = Config(retries={"max_attempts": max_attempts, "mode": "standard"}, signature_version="s3v4",
                    s3={"addressing_style": addressing_style}, connect_timeout=5, read_timeout=30,
                    max_pool_connections=32,
                    # S3-compatible servers (MinIO, R2, B2) do not all take the newer default checksums.
                    request_checksum_calculation="when_required", response_checksum_validation="when_required")
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url or None, config=config)


def _code(e) -> str:
    return str(e.response.get("Error", {}).get("Code") or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


class Bucket:
    def __init__(self, url: str, *, endpoint_url: str = "", addressing_style: str = "auto", sse: str = "",
                 max_attempts: int = 3, client=None) -> None:
        self.url = url
        self.name, self.prefix = parse_storage_url(url)
        self.endpoint_url = endpoint_url
        self.client = client or make_client(endpoint_url, addressing_style, max_attempts)
        self.extra = sse_args(sse)
        self._versions_api = True      # False on servers without ListObjectVersions (R2)

    # --- keys --------------------------------------------------------------------------------
    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def rel(self, key: str) -> str:
        return key[len(self.prefix) + 1:] if self.prefix else key

    @contextmanager
    def errors(self, what: str):
        """boto3's failures as TwinErrors that say what was being done."""
        import boto3.exceptions
        from botocore.exceptions import BotoCoreError, ClientError
        try:
            yield
        except ClientError as e:
            code = _code(e)
            if code in _MISSING:
                raise NotFound(f"not found: {what}") from None
            hint = f"; check {CREDENTIALS_HINT}" if code in _REFUSED else "; retry shortly"
            raise StorageUnavailable(f"the bucket {self.name!r} failed to {what} ({code}){hint}") from None
        except (BotoCoreError, boto3.exceptions.Boto3Error) as e:
            raise StorageUnavailable(f"the bucket {self.name!r} is unreachable: could not {what} "
                                     f"({type(e).__name__}); retry shortly") from None

    # --- start-up and health -----------------------------------------------------------------
    def check_access(self) -> bool:
        """At start-up: wrong credentials or a missing bucket stop it (ConfigError naming the setting); an
        unreachable bucket does not (the API answers 503 storage_unavailable until it is back).
        Returns whether the bucket answered."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
        try:
            self.client.head_bucket(Bucket=self.name)
            return True
        except NoCredentialsError:
            raise ConfigError(f"TWIN_STORAGE_URL={self.url}: no AWS credentials found; set {CREDENTIALS_HINT}") from None
        except ClientError as e:
            code = _code(e)
            if code in _REFUSED:
                raise ConfigError(f"TWIN_STORAGE_URL={self.url}: the bucket refused the credentials ({code}); "
                                  f"check {CREDENTIALS_HINT}") from None
            if code in ("301", "PermanentRedirect", "AuthorizationHeaderMalformed"):
                raise ConfigError(f"TWIN_STORAGE_URL={self.url}: bucket {self.name!r} is in another region than "
                                  f"the client's ({code}); set AWS_REGION to the bucket's region") from None
            if code in _MISSING or code == "NoSuchBucket":
                raise ConfigError(f"TWIN_STORAGE_URL={self.url}: bucket {self.name!r} does not exist at "
                                  f"{self.endpoint_url or 'AWS'} (TWIN_S3_ENDPOINT_URL)") from None
            log.warning("bucket not reachable at start-up", extra={"code": code})
            return False
        except BotoCoreError as e:
            log.warning("bucket not reachable at start-up", extra={"error": type(e).__name__})
            return False

    def ping(self) -> bool:
        with self.errors("answer HEAD bucket"):
            self.client.head_bucket(Bucket=self.name)
        return True

    # --- objects -----------------------------------------------------------------------------
    def put(self, rel: str, data: bytes, content_type: str | None = None) -> None:
        """One whole object: a PUT, or (beyond MULTIPART_BYTES) a multipart upload that S3 shows only once
        it is complete. A failed upload leaves no object behind."""
        extra = dict(self.extra, **({"ContentType": content_type} if content_type else {}))
        with self.errors(f"write {rel}"):
            if len(data) <= MULTIPART_BYTES:
                self.client.put_object(Bucket=self.name, Key=self.key(rel), Body=data, **extra)
            else:
                self.client.upload_fileobj(io.BytesIO(data), self.name, self.key(rel), ExtraArgs=extra,
                                           Config=_transfer_config())

    def put_file(self, rel: str, path: Path) -> None:
        with self.errors(f"write {rel}"):
            self.client.upload_file(str(path), self.name, self.key(rel), ExtraArgs=dict(self.extra),
                                    Config=_transfer_config())

    def get_into(self, rel: str, fh: BinaryIO) -> None:
        """Copy the object into ``fh`` (one GET, streamed)."""
        import shutil
        with self.errors(f"read {rel}"):
            body = self.client.get_object(Bucket=self.name, Key=self.key(rel))["Body"]
            try:
                shutil.copyfileobj(body, fh, 1024 * 1024)
            finally:
                body.close()

    def get(self, rel: str) -> bytes:
        with self.errors(f"read {rel}"):
            body = self.client.get_object(Bucket=self.name, Key=self.key(rel))["Body"]
            try:
                return body.read()
            finally:
                body.close()

    def open(self, rel: str) -> StoredFile:
        """The object's body for streaming (the request is made now: a missing key is NotFound here)."""
        with self.errors(f"read {rel}"):
            got = self.client.get_object(Bucket=self.name, Key=self.key(rel))
        modified = got.get("LastModified")
        return StoredFile(stream=_Body(got["Body"]), size=int(got["ContentLength"]),
                          etag=(got.get("ETag") or "").strip('"') or None,
                          modified=modified.timestamp() if modified is not None else None)

    def exists(self, rel: str) -> bool:
        try:
            with self.errors(f"look up {rel}"):
                self.client.head_object(Bucket=self.name, Key=self.key(rel))
            return True
        except NotFound:
            return False

    def presign(self, rel: str, *, disposition: str, content_type: str, expires: int) -> str:
        """A GET URL valid for ``expires`` seconds that answers with these headers (no request is made)."""
        with self.errors(f"sign a URL for {rel}"):
            return self.client.generate_presigned_url(
                "get_object", ExpiresIn=int(expires),
                Params={"Bucket": self.name, "Key": self.key(rel), "ResponseContentDisposition": disposition,
                        "ResponseContentType": content_type})

    # --- listings ----------------------------------------------------------------------------
    def list(self, rel_prefix: str) -> Iterator[dict[str, Any]]:
        """Objects under ``rel_prefix`` (current versions): {"rel", "size", "modified"}, every page."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=self.key(rel_prefix))
        with self.errors(f"list {rel_prefix or '/'}"):
            for page in pages:
                for o in page.get("Contents", []):
                    yield {"rel": self.rel(o["Key"]), "size": o["Size"], "modified": o["LastModified"].timestamp()}

    def children(self) -> Iterator[str]:
        """The first-level folder names under the prefix."""
        base = self.key("")
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=base, Delimiter="/")
        with self.errors("list the sessions"):
            for page in pages:
                for p in page.get("CommonPrefixes", []):
                    yield p["Prefix"][len(base):].rstrip("/")

    # --- deletion ----------------------------------------------------------------------------
    def delete(self, rels: list[str]) -> None:
        for i in range(0, len(rels), 1000):
            self._delete_batch([{"Key": self.key(r)} for r in rels[i:i + 1000]])

    def delete_prefix(self, rel_prefix: str, *, rounds: int = 5) -> int:
        """Delete everything under ``rel_prefix`` (which ends with "/"): on a versioned bucket every version
        and delete marker, in batches of 1,000, listing page after page; then list again until the listing is
        empty, which is when this returns (the bucket has confirmed). Returns the entries deleted."""
        deleted = 0
        for _ in range(rounds):
            found = 0
            for batch in _batches(self._entries(rel_prefix), 1000):
                self._delete_batch(batch)
                found += len(batch)
            if not found:
                return deleted
            deleted += found
        raise StorageUnavailable(f"objects keep appearing under {rel_prefix!r} while it is deleted; retry")

    def _entries(self, rel_prefix: str) -> Iterator[dict[str, str]]:
        """{"Key"[, "VersionId"]} of everything under the prefix: versions and markers where the server
        lists versions, else the current objects."""
        if self._versions_api:
            try:
                yield from self._versions(rel_prefix)
                return
            except _NoVersionsApi:
                self._versions_api = False     # e.g. Cloudflare R2: there are no versions to delete
        for o in self.list(rel_prefix):
            yield {"Key": self.key(o["rel"])}

    def _versions(self, rel_prefix: str) -> Iterator[dict[str, str]]:
        from botocore.exceptions import ClientError
        pages = self.client.get_paginator("list_object_versions").paginate(Bucket=self.name,
                                                                           Prefix=self.key(rel_prefix))
        with self.errors(f"list the versions under {rel_prefix}"):
            try:
                for page in pages:
                    for v in page.get("Versions", []) + page.get("DeleteMarkers", []):
                        yield {"Key": v["Key"], "VersionId": v["VersionId"]}
            except ClientError as e:
                if _code(e) in _NO_VERSIONS_API:
                    raise _NoVersionsApi() from None
                raise

    def _delete_batch(self, objects: list[dict[str, str]]) -> None:
        with self.errors(f"delete {len(objects)} objects"):
            resp = self.client.delete_objects(Bucket=self.name, Delete={"Objects": objects, "Quiet": True})
        failed = resp.get("Errors") or []
        if failed:
            first = failed[0]
            raise StorageUnavailable(f"the bucket {self.name!r} did not delete {len(failed)} of {len(objects)} "
                                     f"objects ({first.get('Code')}: {first.get('Message')}); retry")


class _NoVersionsApi(Exception):
    """The server has no ListObjectVersions."""


class _Body:
    """A streamed object body with only read/close (gunicorn and werkzeug stream it in chunks)."""

    def __init__(self, body) -> None:
        self._body = body

    def read(self, n: int = -1) -> bytes:
        return self._body.read(None if n is None or n < 0 else n)

    def close(self) -> None:
        self._body.close()


def _transfer_config():
    from boto3.s3.transfer import TransferConfig
    return TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES)


def _batches(items, n: int):
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch
