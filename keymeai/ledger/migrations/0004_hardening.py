"""Columns and a table for the hardening of the request path.

- `usage_record.record_id`: a unique id the gateway generates for every record, so a
  write retried after a lost acknowledgement stays exactly-once (`request_id` keeps the
  client's X-Request-Id, which may repeat). Rows written before this migration have none.
- `api_key.max_concurrent`: a key's own bound on requests in flight (overrides its tier).
- `quota_reservation.cost_units`: the worst-case cost a request in flight may still
  spend, held against its key's spend cap as `tokens` is held against its token quota.
- `dashboard_session`: signed-in dashboard sessions, so signing out ends one on the
  server and not only in the browser.
"""

import datetime as dt

from peewee import BigIntegerField, CharField, DateTimeField, IntegerField, Model


def up(migrator, db):
    class DashboardSession(Model):
        token_hash = CharField(max_length=64, unique=True)
        created_at = DateTimeField(default=dt.datetime.utcnow)
        last_seen_at = DateTimeField(default=dt.datetime.utcnow)

        class Meta:
            database = db
            table_name = "dashboard_session"

    migrator.migrate(
        migrator.add_column("usage_record", "record_id", CharField(max_length=32, null=True)),
        migrator.add_index("usage_record", ("record_id",), unique=True),
        migrator.add_column("api_key", "max_concurrent", IntegerField(null=True)),
        migrator.add_column("quota_reservation", "cost_units", BigIntegerField(default=0)),
    )
    db.create_tables([DashboardSession], safe=True)


def down(migrator, db):
    db.execute_sql("DROP TABLE IF EXISTS dashboard_session")
    migrator.migrate(
        migrator.drop_index("usage_record", "usage_record_record_id"),
        migrator.drop_column("usage_record", "record_id"),
        migrator.drop_column("api_key", "max_concurrent"),
        migrator.drop_column("quota_reservation", "cost_units"),
    )
