"""An object store in an S3 bucket (AWS S3, MinIO, SeaweedFS, any S3-compatible server).

Built on boto3, AWS's own client: it signs requests (SigV4), retries transient failures
(throttling, 5xx, dropped connections) with backoff in its 'standard' and 'adaptive' retry
modes, pools connections, sends a CRC checksum with every upload, and speaks to any
S3-compatible endpoint through ``endpoint_url``. One client is shared by all threads (boto3
clients are thread-safe); ``max_pool_connections`` bounds the connections it opens.

Credentials come from the ``access_key``/``secret_key`` arguments, else from the
``DNS_S3_ACCESS_KEY``/``DNS_S3_SECRET_KEY`` environment variables (so this project can use a
store other than the one the rest of the environment's AWS tools use), else from
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (with ``AWS_SESSION_TOKEN``), else from boto3's
own chain (shared config files, instance and container roles). They are handed to the client
and never kept on the store, shown in its repr or put in an error message.

All stores of a process share one boto3 session, which parses the S3 service model once
(about 0.2 s); each store still gets its own client, credentials, timeouts and connection pool.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from dns_milvus.errors import BackendUnavailableError, DnSError, InvalidInputError, NotFoundError
from dns_milvus.store.base import (
    ObjectInfo,
    ObjectStore,
    StoreAccessError,
    is_valid_key,
    validate_data,
    validate_key,
    validate_prefix,
)

ACCESS_KEY_ENV = "DNS_S3_ACCESS_KEY"
SECRET_KEY_ENV = "DNS_S3_SECRET_KEY"

_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_RETRY_MODES = ("standard", "adaptive", "legacy")
_ADDRESSING_STYLES = ("path", "virtual", "auto")
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_AUTH_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "AuthorizationHeaderMalformed",
        "AccountProblem",
        "AllAccessDisabled",
        "401",
        "403",
    }
)
_UNAVAILABLE_CODES = frozenset(
    {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling", "503", "500"}
)


class S3Store(ObjectStore):
    """Objects under ``prefix`` in an S3 bucket.

    ``endpoint_url`` selects an S3-compatible server (e.g. ``http://127.0.0.1:8333``); without
    it AWS S3 is used. Timeouts are in seconds; ``max_attempts`` counts the first try, so 1
    disables retries. ``create_bucket=True`` creates the bucket if it does not exist.
    """

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        max_pool_connections: int = 32,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_attempts: int = 5,
        retry_mode: str = "standard",
        addressing_style: str | None = None,
        create_bucket: bool = False,
    ) -> None:
        self.bucket = _validate_bucket(bucket)
        self.prefix = _normalise_store_prefix(prefix)
        self.endpoint_url = _validate_endpoint(endpoint_url)
        _require_positive_int("max_pool_connections", max_pool_connections)
        _require_positive_int("max_attempts", max_attempts)
        for name, value in (("connect_timeout", connect_timeout), ("read_timeout", read_timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise InvalidInputError(f"{name} must be a number of seconds > 0, got {value!r}")
        if retry_mode not in _RETRY_MODES:
            raise InvalidInputError(f"retry_mode must be one of {_RETRY_MODES}, got {retry_mode!r}")
        if addressing_style is None:
            # Self-hosted servers rarely have wildcard DNS for bucket sub-domains.
            addressing_style = "path" if self.endpoint_url else "auto"
        if addressing_style not in _ADDRESSING_STYLES:
            raise InvalidInputError(
                f"addressing_style must be one of {_ADDRESSING_STYLES}, got {addressing_style!r}"
            )
        # Each request waits mostly on the network, so get_many keeps every pooled connection busy.
        self.default_max_workers = max_pool_connections

        key_id, secret, token = _resolve_credentials(access_key, secret_key)
        session = _shared_session()
        # SigV4 needs a region; S3-compatible servers accept any, AWS's default is us-east-1.
        self.region = (
            region
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or session.region_name
            or "us-east-1"
        )
        config = Config(
            region_name=self.region,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"total_max_attempts": max_attempts, "mode": retry_mode},
            max_pool_connections=max_pool_connections,
            s3={"addressing_style": addressing_style},
        )
        with _SESSION_LOCK:  # creating clients from one session is not thread-safe
            self._client = session.client(
                "s3",
                endpoint_url=self.endpoint_url,
                config=config,
                aws_access_key_id=key_id,
                aws_secret_access_key=secret,
                aws_session_token=token,
            )
        self._bucket_confirmed = False
        self._bucket_lock = threading.Lock()
        if create_bucket:
            self._create_bucket()

    def __repr__(self) -> str:
        return (
            f"S3Store(bucket={self.bucket!r}, prefix={self.prefix!r}, "
            f"endpoint_url={self._endpoint_name!r}, region={self.region!r})"
        )

    @property
    def _endpoint_name(self) -> str:
        return self.endpoint_url or "AWS S3"

    def put(self, key: str, data: bytes) -> None:
        full_key = self._full_key(key)
        payload = validate_data(data)
        try:
            # A PUT is atomic in S3: the object appears only once it has been received whole.
            self._client.put_object(Bucket=self.bucket, Key=full_key, Body=payload)
        except (BotoCoreError, ClientError) as exc:
            raise self._translate(exc, f"write key {key!r}", key) from exc

    def get(self, key: str) -> bytes:
        full_key = self._full_key(key)
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=full_key)
            with response["Body"] as body:
                return body.read()
        except (BotoCoreError, ClientError) as exc:
            raise self._translate(exc, f"read key {key!r}", key) from exc

    def exists(self, key: str) -> bool:
        return self.stat(key) is not None

    def stat(self, key: str) -> ObjectInfo | None:
        full_key = self._full_key(key)
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=full_key)
            return ObjectInfo(key, int(head["ContentLength"]), head["LastModified"].timestamp())
        except (BotoCoreError, ClientError) as exc:
            error = self._translate(exc, f"look up key {key!r}", key)
            if not isinstance(error, NotFoundError):
                raise error from exc
        # HEAD answers a bare 404 for a missing bucket too: confirm the bucket once.
        self._confirm_bucket()
        return None

    def delete(self, key: str) -> None:
        full_key = self._full_key(key)
        try:
            self._client.delete_object(Bucket=self.bucket, Key=full_key)
        except (BotoCoreError, ClientError) as exc:
            error = self._translate(exc, f"delete key {key!r}", key)
            if not isinstance(error, NotFoundError):
                raise error from exc

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        return (info.key for info in self.iter_objects(prefix))

    def iter_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        return self._list_objects(prefix)

    def _list_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        paginator = self._client.get_paginator("list_objects_v2")
        strip = len(self.prefix)
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for entry in page.get("Contents", ()):
                    key = entry["Key"][strip:]
                    # Objects written by other tools may not follow our key rules; they are not ours.
                    if is_valid_key(key):
                        yield ObjectInfo(key, int(entry["Size"]), entry["LastModified"].timestamp())
        except (BotoCoreError, ClientError) as exc:
            raise self._translate(exc, f"list keys under {prefix!r}") from exc

    def close(self) -> None:
        self._client.close()

    def _full_key(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def _create_bucket(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
            self._bucket_confirmed = True
            return
        except ClientError as exc:
            if _error_code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                raise self._translate(exc, "look up the bucket") from exc
        except BotoCoreError as exc:
            raise self._translate(exc, "look up the bucket") from exc
        options: dict[str, object] = {}
        if self.region != "us-east-1":
            options["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self._client.create_bucket(Bucket=self.bucket, **options)
        except ClientError as exc:
            if _error_code(exc) != "BucketAlreadyOwnedByYou":  # created concurrently by us
                raise self._translate(exc, "create the bucket") from exc
        except BotoCoreError as exc:
            raise self._translate(exc, "create the bucket") from exc
        self._bucket_confirmed = True

    def _confirm_bucket(self) -> None:
        if self._bucket_confirmed:
            return
        with self._bucket_lock:
            if self._bucket_confirmed:
                return
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                # 403: a key allowed to read objects but not the bucket; the bucket exists.
                if _error_code(exc) not in ("403", "AccessDenied"):
                    raise self._translate(exc, "look up the bucket") from exc
            except BotoCoreError as exc:
                raise self._translate(exc, "look up the bucket") from exc
            self._bucket_confirmed = True

    def _translate(self, exc: BaseException, target: str, key: str | None = None) -> DnSError:
        """Map a boto error to the project's errors; messages name the endpoint, never credentials.

        ``target`` says what was being done ("read key 'x'"); ``key`` is given for object
        requests, where a 404 means a missing object rather than a missing bucket.
        """
        where = f"bucket {self.bucket!r} at {self._endpoint_name}"
        if isinstance(exc, ClientError):
            code = _error_code(exc)
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket" or (code in _NOT_FOUND_CODES and key is None):
                return StoreAccessError(
                    f"{where} does not exist (while trying to {target}); create it, or open the "
                    "store with create_bucket=True"
                )
            if code in _NOT_FOUND_CODES:
                return NotFoundError(f"no object under key {key!r} in {where}")
            if code in _AUTH_CODES:
                return StoreAccessError(
                    f"{where} refused the request to {target} ({code}): check the access key, the "
                    f"secret key ({ACCESS_KEY_ENV}/{SECRET_KEY_ENV} or the AWS variables) and the "
                    "bucket's permissions"
                )
            if code in _UNAVAILABLE_CODES or (isinstance(status, int) and status >= 500):
                return BackendUnavailableError(
                    f"{where} failed to {target} after retries ({code}, HTTP {status})"
                )
            return StoreAccessError(f"{where} rejected the request to {target} ({code}, HTTP {status})")
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return StoreAccessError(
                f"no S3 credentials for {where}: pass access_key and secret_key, or set "
                f"{ACCESS_KEY_ENV} and {SECRET_KEY_ENV} (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
            )
        if isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError)):
            return BackendUnavailableError(
                f"S3 endpoint {self._endpoint_name} is unreachable or dropped the connection while "
                f"trying to {target} in bucket {self.bucket!r} ({type(exc).__name__})"
            )
        return BackendUnavailableError(f"S3 request to {target} in {where} failed ({type(exc).__name__})")


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


_SESSION: boto3.session.Session | None = None
_SESSION_LOCK = threading.Lock()


def _shared_session() -> boto3.session.Session:
    global _SESSION
    with _SESSION_LOCK:
        if _SESSION is None:
            _SESSION = boto3.session.Session()
        return _SESSION


def _resolve_credentials(
    access_key: str | None, secret_key: str | None
) -> tuple[str | None, str | None, str | None]:
    """(key id, secret, session token): arguments, then the environment, read afresh for each
    store (the shared session would cache it); all None leaves it to boto3's default chain."""
    if access_key is not None or secret_key is not None:
        if not access_key or not secret_key:
            raise InvalidInputError("pass both access_key and secret_key, or neither")
        return access_key, secret_key, None
    for key_var, secret_var, token_var in (
        (ACCESS_KEY_ENV, SECRET_KEY_ENV, None),
        ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"),
    ):
        env_key, env_secret = os.environ.get(key_var), os.environ.get(secret_var)
        if env_key or env_secret:
            if not env_key or not env_secret:
                raise InvalidInputError(f"set both {key_var} and {secret_var}, or neither")
            return env_key, env_secret, os.environ.get(token_var) if token_var else None
    return None, None, None


def _validate_bucket(bucket: object) -> str:
    if not isinstance(bucket, str) or not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise InvalidInputError(
            f"S3 bucket name {bucket!r} is not valid: expected 3-63 lowercase letters, digits, '.' or "
            "'-', starting and ending with a letter or digit"
        )
    return bucket


def _normalise_store_prefix(prefix: object) -> str:
    """'' or 'a/b' or 'a/b/' -> '' or 'a/b/': the prefix always ends at a segment boundary."""
    if not isinstance(prefix, str):
        raise InvalidInputError(f"S3 key prefix must be a string, got {type(prefix).__name__}")
    stripped = prefix.strip("/")
    if not stripped:
        return ""
    try:
        validate_key(stripped)
    except InvalidInputError:
        raise InvalidInputError(
            f"S3 key prefix {prefix!r} is not valid: expected '/'-separated segments of letters, "
            "digits, '_', '-', '.', none starting with '.'"
        ) from None
    return stripped + "/"


def _validate_endpoint(endpoint_url: object) -> str | None:
    if endpoint_url is None:
        return None
    if not isinstance(endpoint_url, str):
        raise InvalidInputError(f"endpoint_url must be a string, got {type(endpoint_url).__name__}")
    parts = urlsplit(endpoint_url)
    if "@" in parts.netloc:
        # Do not echo it: the part before '@' may be a password.
        raise InvalidInputError(
            "endpoint_url must not contain user information ('user:password@'); pass credentials as "
            f"access_key/secret_key or through {ACCESS_KEY_ENV}/{SECRET_KEY_ENV}"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise InvalidInputError(
            f"endpoint_url {endpoint_url!r} is not valid: expected http(s)://host[:port], "
            "e.g. http://127.0.0.1:8333"
        )
    try:
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        raise InvalidInputError(f"endpoint_url {endpoint_url!r} has an invalid port") from None
    return endpoint_url.rstrip("/")


def _require_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{name} must be an integer >= 1, got {value!r}")
