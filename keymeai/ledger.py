"""The ledger's tables: API keys, usage records, daily roll-ups, quota reservations.

The schema itself is created and evolved by the scripts in `keymeai/migrations`; these
classes are how the code reads and writes it. Money is stored as integers of 1e-10 USD
(`cost_units`) so that sums are exact in SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import datetime as dt

from peewee import (
    AutoField,
    BigIntegerField,
    BooleanField,
    CharField,
    DateField,
    DateTimeField,
    ForeignKeyField,
    IntegerField,
    Model,
    TextField,
)

from .db import db


def utcnow() -> dt.datetime:
    """Naive UTC, the one time zone the ledger speaks."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class BaseModel(Model):
    id = AutoField()

    class Meta:
        database = db
        legacy_table_names = False


class ApiKey(BaseModel):
    """A customer key. Only its SHA-256 is kept; `prefix` is what operators see."""

    name = CharField(max_length=200)
    prefix = CharField(max_length=16, index=True)
    key_hash = CharField(max_length=64, unique=True)
    tier = CharField(max_length=64)
    request_limits = TextField(null=True)  # ";"-joined limit strings overriding the tier
    tokens_per_month = BigIntegerField(null=True)  # overrides the tier's quota
    allowed_models = TextField(null=True)  # ","-joined model ids; NULL means all
    spend_cap_units = BigIntegerField(null=True)  # monthly spend cap in 1e-10 USD
    created_at = DateTimeField(default=utcnow)
    expires_at = DateTimeField(null=True)
    revoked_at = DateTimeField(null=True)


class UsageRecord(BaseModel):
    """One request that reached an upstream: what billing and audits need, no bodies."""

    key = ForeignKeyField(ApiKey, backref="usage", on_delete="CASCADE", index=False)
    created_at = DateTimeField(default=utcnow)
    request_id = CharField(max_length=128)
    model = CharField(max_length=128)
    provider = CharField(max_length=64, null=True)
    upstream_model = CharField(max_length=128, null=True)
    stream = BooleanField(default=False)
    status = IntegerField()
    outcome = CharField(max_length=32)
    attempts = IntegerField(default=1)
    prompt_tokens = IntegerField(default=0)
    completion_tokens = IntegerField(default=0)
    total_tokens = IntegerField(default=0)
    cached_tokens = IntegerField(default=0)
    reasoning_tokens = IntegerField(default=0)
    estimated = BooleanField(default=False)
    latency_ms = IntegerField(default=0)
    cost_units = BigIntegerField(default=0)

    class Meta:
        indexes = ((("key", "created_at"), False),)


class UsageDaily(BaseModel):
    """Per key, model and UTC day sums, kept in step with UsageRecord.

    Quotas and monthly reports read these few rows instead of scanning every record.
    """

    key = ForeignKeyField(ApiKey, on_delete="CASCADE")
    day = DateField()
    model = CharField(max_length=128)
    requests = IntegerField(default=0)
    prompt_tokens = BigIntegerField(default=0)
    completion_tokens = BigIntegerField(default=0)
    cached_tokens = BigIntegerField(default=0)
    total_tokens = BigIntegerField(default=0)
    cost_units = BigIntegerField(default=0)

    class Meta:
        indexes = ((("key", "day", "model"), True), (("day",), False))


class QuotaReservation(BaseModel):
    """Tokens a request in flight may still use, held against its key's token quota."""

    key = ForeignKeyField(ApiKey, on_delete="CASCADE")
    tokens = BigIntegerField()
    expires_at = DateTimeField(index=True)


MODELS = [ApiKey, UsageRecord, UsageDaily, QuotaReservation]
