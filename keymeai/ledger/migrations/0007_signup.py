"""Self-service sign-up: invite codes, and how each key was made.

- `invite_code`: codes operators hand out; only the SHA-256 of a code is kept, with its
  visible prefix, tier, use count and bound, expiry and revocation.
- `api_key.origin`: "invite:<code id>", "open", or NULL for keys an operator made.
- `api_key.origin_address`: the client address the sign-up came from.
- `api_key.origin_email`: the address the key was mailed to, when sign-up asks for one.
"""

import datetime as dt

from peewee import CharField, DateTimeField, IntegerField, Model


def up(migrator, db):
    class InviteCode(Model):
        code_hash = CharField(max_length=64, unique=True)
        prefix = CharField(max_length=16)
        tier = CharField(max_length=64)
        max_uses = IntegerField(null=True)
        uses = IntegerField(default=0)
        note = CharField(max_length=200, default="")
        created_at = DateTimeField(default=dt.datetime.utcnow)
        expires_at = DateTimeField(null=True)
        revoked_at = DateTimeField(null=True)

        class Meta:
            database = db
            table_name = "invite_code"

    db.create_tables([InviteCode], safe=True)
    migrator.migrate(
        migrator.add_column("api_key", "origin", CharField(max_length=32, null=True)),
        migrator.add_column("api_key", "origin_address", CharField(max_length=64, null=True)),
        migrator.add_column("api_key", "origin_email", CharField(max_length=254, null=True)),
    )


def down(migrator, db):
    migrator.migrate(
        migrator.drop_column("api_key", "origin"),
        migrator.drop_column("api_key", "origin_address"),
        migrator.drop_column("api_key", "origin_email"),
    )
    db.execute_sql("DROP TABLE IF EXISTS invite_code")
