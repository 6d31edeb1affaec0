"""Heimdall's schema (the tables the shipped policy reads) and a seeded demo world.

The DDL follows Heimdall's own tables (the columns the cleanup reads, with their real names and
types); tests and the demo use it so that the shipped policy's queries run against them.
"""

from __future__ import annotations

import io
import json
import uuid
from dataclasses import dataclass, field

import sqlalchemy as sa
from minio import Minio
from sqlalchemy.engine import Engine

HEIMDALL_SCHEMA_SQL = """
CREATE SCHEMA IF NOT EXISTS heimdall;
CREATE TABLE IF NOT EXISTS heimdall.synthetic_datasets (
    id uuid PRIMARY KEY,
    name text NOT NULL,
    dataset_type text NOT NULL CHECK (dataset_type IN ('feature_based', 'iq_raw')),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS heimdall.synthetic_iq_samples (
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    timestamp timestamptz NOT NULL DEFAULT now(),
    dataset_id uuid NOT NULL REFERENCES heimdall.synthetic_datasets(id) ON DELETE CASCADE,
    sample_idx int NOT NULL,
    iq_storage_paths jsonb NOT NULL,
    UNIQUE (dataset_id, sample_idx)
);
CREATE TABLE IF NOT EXISTS heimdall.audio_library (
    id uuid PRIMARY KEY,
    filename text NOT NULL,
    category text,
    minio_bucket text DEFAULT 'heimdall-audio-library',
    minio_path text
);
CREATE TABLE IF NOT EXISTS heimdall.audio_chunks (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    audio_id uuid NOT NULL REFERENCES heimdall.audio_library(id) ON DELETE CASCADE,
    chunk_index int NOT NULL,
    minio_bucket varchar(255) DEFAULT 'heimdall-audio-chunks',
    minio_path varchar(512) NOT NULL,
    UNIQUE (audio_id, chunk_index)
);
CREATE TABLE IF NOT EXISTS heimdall.measurements (
    timestamp timestamptz NOT NULL,
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    recording_session_id uuid,
    iq_data_location varchar(512),
    PRIMARY KEY (timestamp, id)
);
"""

SYNTHETIC_BUCKET = "heimdall-synthetic-iq"
AUDIO_BUCKET = "heimdall-audio-chunks"
RAW_BUCKET = "heimdall-raw-iq"
PAYLOAD = b"\x93NUMPY" + b"\x00" * 250  # a stand-in .npy body


def create_schema(engine: Engine) -> None:
    with engine.begin() as connection:
        for statement in filter(str.strip, HEIMDALL_SCHEMA_SQL.split(";")):
            connection.execute(sa.text(statement))


def put(client: Minio, bucket: str, key: str, body: bytes = PAYLOAD) -> None:
    client.put_object(bucket, key, io.BytesIO(body), len(body))


@dataclass
class SeededWorld:
    """What the demo seeded, so the report can be checked against it."""

    referenced: dict[str, set[str]] = field(default_factory=dict)
    old_orphans: dict[str, set[str]] = field(default_factory=dict)
    young_orphans: dict[str, set[str]] = field(default_factory=dict)
    dangling: dict[str, set[str]] = field(default_factory=dict)

    def add(self, kind: str, bucket: str, key: str) -> None:
        getattr(self, kind).setdefault(bucket, set()).add(key)


def seed_old_objects(engine: Engine, client: Minio, world: SeededWorld) -> None:
    """Referenced objects in every reference format, old orphans, sidecars, a dangling row."""
    for bucket in (SYNTHETIC_BUCKET, AUDIO_BUCKET, RAW_BUCKET):
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)
    with engine.begin() as db:
        # Synthetic IQ: a current dataset, a legacy-layout dataset, and a deleted one.
        for layout in ("{id}", "dataset-{id}"):
            dataset_id = uuid.uuid4()
            db.execute(sa.text("INSERT INTO heimdall.synthetic_datasets (id, name, dataset_type) "
                               "VALUES (:id, :name, 'iq_raw')"), {"id": dataset_id, "name": layout})
            for sample in range(3):
                paths = {}
                for receiver in ("RX_001", "RX_004"):
                    key = f"synthetic/{layout.format(id=dataset_id)}/{sample}/{receiver}.npy"
                    put(client, SYNTHETIC_BUCKET, key)
                    paths[receiver] = key
                    world.add("referenced", SYNTHETIC_BUCKET, key)
                db.execute(sa.text("INSERT INTO heimdall.synthetic_iq_samples "
                                   "(dataset_id, sample_idx, iq_storage_paths) VALUES (:d, :i, :p)"),
                           {"d": dataset_id, "i": sample, "p": json.dumps(paths)})
        # A sample row whose object was never uploaded (dangling), and a broken path value.
        dangling_dataset = uuid.uuid4()
        db.execute(sa.text("INSERT INTO heimdall.synthetic_datasets (id, name, dataset_type) "
                           "VALUES (:id, 'dangling', 'iq_raw')"), {"id": dangling_dataset})
        missing = f"synthetic/{dangling_dataset}/0/RX_001.npy"
        db.execute(sa.text("INSERT INTO heimdall.synthetic_iq_samples (dataset_id, sample_idx, "
                           "iq_storage_paths) VALUES (:d, 0, :p)"),
                   {"d": dangling_dataset, "p": json.dumps({"RX_001": missing, "RX_002": "../escape.npy"})})
        world.add("dangling", SYNTHETIC_BUCKET, missing)
        deleted_dataset = uuid.uuid4()  # rows gone, objects left behind: the 244 GB bug
        for sample in range(4):
            for receiver in ("RX_001", "RX_004"):
                key = f"synthetic/{deleted_dataset}/{sample}/{receiver}.npy"
                put(client, SYNTHETIC_BUCKET, key, PAYLOAD * 4)
                world.add("old_orphans", SYNTHETIC_BUCKET, key)

        # Audio chunks: bare keys, imported s3:// URIs, a row naming another bucket.
        audio_id = uuid.uuid4()
        db.execute(sa.text("INSERT INTO heimdall.audio_library (id, filename, category) "
                           "VALUES (:id, 'beacon.wav', 'beacon')"), {"id": audio_id})
        for index in range(3):
            key = f"{audio_id}/chunk_{index:04d}.npy"
            put(client, AUDIO_BUCKET, key)
            world.add("referenced", AUDIO_BUCKET, key)
            db.execute(sa.text("INSERT INTO heimdall.audio_chunks (audio_id, chunk_index, minio_path) "
                               "VALUES (:a, :i, :p)"), {"a": audio_id, "i": index, "p": key})
        imported_id = uuid.uuid4()
        db.execute(sa.text("INSERT INTO heimdall.audio_library (id, filename, category) "
                           "VALUES (:id, 'import voice ü+1.wav', 'voice')"), {"id": imported_id})
        for index in range(2):
            key = f"imported/{imported_id}/{index:04d}.npy"
            put(client, AUDIO_BUCKET, key)
            world.add("referenced", AUDIO_BUCKET, key)
            db.execute(sa.text("INSERT INTO heimdall.audio_chunks (audio_id, chunk_index, minio_path) "
                               "VALUES (:a, :i, :p)"),
                       {"a": imported_id, "i": index, "p": f"s3://{AUDIO_BUCKET}/{key}"})
        db.execute(sa.text("INSERT INTO heimdall.audio_chunks (audio_id, chunk_index, minio_bucket, "
                           "minio_path) VALUES (:a, 9, 'heimdall-audio-library', 'elsewhere.npy')"),
                   {"a": imported_id})
        for index in range(5):
            key = f"{uuid.uuid4()}/chunk_{index:04d}.npy"
            put(client, AUDIO_BUCKET, key, PAYLOAD * 8)
            world.add("old_orphans", AUDIO_BUCKET, key)

        # Raw IQ: s3:// URIs, each recording with an unreferenced sidecar kept by the companion rule.
        task = uuid.uuid4()
        for websdr in range(4):
            stem = f"sessions/{task}/websdr_{websdr}"
            put(client, RAW_BUCKET, f"{stem}.npy", PAYLOAD * 2)
            put(client, RAW_BUCKET, f"{stem}_metadata.json", b"{}")
            world.add("referenced", RAW_BUCKET, f"{stem}.npy")
            world.add("referenced", RAW_BUCKET, f"{stem}_metadata.json")
            db.execute(sa.text("INSERT INTO heimdall.measurements (timestamp, recording_session_id, "
                               "iq_data_location) VALUES (now(), :s, :l)"),
                       {"s": task, "l": f"s3://{RAW_BUCKET}/{stem}.npy"})
        db.execute(sa.text("INSERT INTO heimdall.measurements (timestamp, iq_data_location) "
                           "VALUES (now(), NULL)"))
        lost_task = uuid.uuid4()
        for websdr in range(3):
            stem = f"sessions/{lost_task}/websdr_{websdr}"
            put(client, RAW_BUCKET, f"{stem}.npy", PAYLOAD * 16)
            put(client, RAW_BUCKET, f"{stem}_metadata.json", b"{}")
            world.add("old_orphans", RAW_BUCKET, f"{stem}.npy")
            world.add("old_orphans", RAW_BUCKET, f"{stem}_metadata.json")


def seed_young_objects(client: Minio, world: SeededWorld) -> None:
    """Fresh uploads no row names yet: orphans, but too young to delete."""
    for bucket, key in (
        (SYNTHETIC_BUCKET, f"synthetic/{uuid.uuid4()}/0/RX_001.npy"),
        (AUDIO_BUCKET, f"{uuid.uuid4()}/chunk_0000.npy"),
        (RAW_BUCKET, f"sessions/{uuid.uuid4()}/websdr_0.npy"),
    ):
        put(client, bucket, key)
        world.add("young_orphans", bucket, key)
