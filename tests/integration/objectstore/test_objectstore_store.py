"""The test store itself: a session's tests each make their own buckets, and every one must take writes.

SeaweedFS makes each bucket a collection and grows 7 volumes for a collection's first write; with
`-volume.max=8` the third bucket's writes failed with S3 `InternalError` ("No writable volumes"),
so whichever tests ran third in a session errored at setup."""

from __future__ import annotations

import pytest

from kubetune.dev import objectstore

pytestmark = pytest.mark.integration


def test_every_bucket_a_session_makes_takes_writes(s3_store: objectstore.SeaweedS3) -> None:
    fs = s3_store.filesystem()
    buckets = [f"many-{index}" for index in range(8)]
    for bucket in buckets:
        s3_store.create_bucket(bucket)
        fs.pipe(f"{bucket}/data/file.bin", bytes(range(256)) * 64)
    assert [fs.cat(f"{bucket}/data/file.bin")[:4] for bucket in buckets] == [bytes(range(4))] * len(buckets)
