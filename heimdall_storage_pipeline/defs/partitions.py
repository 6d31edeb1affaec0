"""One partition per enabled bucket of the storage policy."""

from __future__ import annotations

import dagster as dg

from heimdall_storage_pipeline.core.policy import StoragePolicy


def bucket_partitions(policy: StoragePolicy) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition([bucket.name for bucket in policy.enabled_buckets()])
