"""Initial ledger schema.

A frozen copy of the tables as they were, independent of `keymeai.ledger.models`, so that this
script keeps creating the same schema after the models evolve (later scripts alter it).
"""

import datetime as dt

from peewee import (
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


def up(migrator, db):
    class Base(Model):
        class Meta:
            database = db
            legacy_table_names = False

    class ApiKey(Base):
        name = CharField(max_length=200)
        prefix = CharField(max_length=16, index=True)
        key_hash = CharField(max_length=64, unique=True)
        tier = CharField(max_length=64)
        request_limits = TextField(null=True)
        tokens_per_month = BigIntegerField(null=True)
        allowed_models = TextField(null=True)
        spend_cap_units = BigIntegerField(null=True)
        created_at = DateTimeField(default=dt.datetime.utcnow)
        expires_at = DateTimeField(null=True)
        revoked_at = DateTimeField(null=True)

    class UsageRecord(Base):
        key = ForeignKeyField(ApiKey, on_delete="CASCADE")
        created_at = DateTimeField()
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

    class UsageDaily(Base):
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
            indexes = ((("key", "day", "model"), True),)

    class QuotaReservation(Base):
        key = ForeignKeyField(ApiKey, on_delete="CASCADE")
        tokens = BigIntegerField()
        expires_at = DateTimeField(index=True)

    db.create_tables([ApiKey, UsageRecord, UsageDaily, QuotaReservation], safe=True)
