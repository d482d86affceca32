"""The ledger's tables: API keys, usage records, daily roll-ups, quota reservations.

The schema itself is created and evolved by the scripts in `keymeai/migrations`; these
classes are how the code reads and writes it. Money is stored as integers of 1e-10 USD
(`cost_units`) so that sums are exact in SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import datetime as dt
import time

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

_EPOCH = dt.datetime(1970, 1, 1)


def utcnow() -> dt.datetime:
    """Naive UTC, the one time zone the ledger speaks: the epoch plus the clock, a third
    cheaper than an aware `now` made naive (a request takes it two or three times;
    `datetime.utcnow` is deprecated)."""
    return _EPOCH + dt.timedelta(seconds=time.time())


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
    max_concurrent = IntegerField(null=True)  # requests in flight at once; overrides the tier
    created_at = DateTimeField(default=utcnow)
    expires_at = DateTimeField(null=True)
    revoked_at = DateTimeField(null=True)
    origin = CharField(max_length=32, null=True)  # "invite:<id>", "open"; NULL: an operator's
    origin_address = CharField(max_length=64, null=True)  # the sign-up's client address
    origin_email = CharField(max_length=254, null=True)  # where sign-up mailed the key


class UsageRecord(BaseModel):
    """One request that reached an upstream: what billing and audits need, no bodies."""

    key = ForeignKeyField(ApiKey, backref="usage", on_delete="CASCADE", index=False)
    created_at = DateTimeField(default=utcnow)
    record_id = CharField(max_length=32, null=True, unique=True)  # the gateway's own id
    request_id = CharField(max_length=128)  # the client's X-Request-Id (may repeat), or ours
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
    """Tokens and cost a request in flight may still use, held against its key's token
    quota and spend cap. Released by id, so an id is never given twice (AUTOINCREMENT on
    SQLite, migration 0005): a release applied again must not free a later hold."""

    key = ForeignKeyField(ApiKey, on_delete="CASCADE")
    tokens = BigIntegerField()
    cost_units = BigIntegerField(default=0)
    expires_at = DateTimeField(index=True)


class DashboardSession(BaseModel):
    """A signed-in dashboard session; the cookie carries the token whose hash is here.
    Signing out deletes the row, so a copied cookie stops working at once."""

    token_hash = CharField(max_length=64, unique=True)
    created_at = DateTimeField(default=utcnow)
    last_seen_at = DateTimeField(default=utcnow)


class InviteCode(BaseModel):
    """A sign-up invite: only its SHA-256 is kept; `prefix` is what operators see."""

    code_hash = CharField(max_length=64, unique=True)
    prefix = CharField(max_length=16)
    tier = CharField(max_length=64)
    max_uses = IntegerField(null=True)  # NULL: no bound
    uses = IntegerField(default=0)
    note = CharField(max_length=200, default="")
    created_at = DateTimeField(default=utcnow)
    expires_at = DateTimeField(null=True)
    revoked_at = DateTimeField(null=True)
