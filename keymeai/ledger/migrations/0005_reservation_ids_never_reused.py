"""Reservation ids are never handed out twice (SQLite only).

A finished request's journal line releases its reservation by id, and a line may be
applied twice (its writer and a reader catching up). SQLite gives a new row the highest
rowid plus one, so the id of a reservation just released went to the next one, and the
second application freed a request still in flight: its key could be admitted past its
quota. AUTOINCREMENT never reuses an id; SQLite cannot add it to a table, so the table is
rebuilt with its rows. PostgreSQL's sequences never reuse ids: nothing to do there.
"""

from peewee import SqliteDatabase

COLUMNS = "id, key_id, tokens, expires_at, cost_units"


def _rebuild(db, autoincrement):
    db.execute_sql(
        'CREATE TABLE "quota_reservation_new" ('
        f'"id" INTEGER NOT NULL PRIMARY KEY{" AUTOINCREMENT" if autoincrement else ""}, '
        '"key_id" INTEGER NOT NULL, "tokens" INTEGER NOT NULL, '
        '"expires_at" DATETIME NOT NULL, "cost_units" INTEGER NOT NULL DEFAULT 0, '
        'FOREIGN KEY ("key_id") REFERENCES "api_key" ("id") ON DELETE CASCADE)'
    )
    db.execute_sql(
        f"INSERT INTO quota_reservation_new ({COLUMNS}) SELECT {COLUMNS} FROM quota_reservation"
    )
    db.execute_sql("DROP TABLE quota_reservation")
    db.execute_sql("ALTER TABLE quota_reservation_new RENAME TO quota_reservation")
    db.execute_sql(
        'CREATE INDEX "quota_reservation_expires_at" ON "quota_reservation" ("expires_at")'
    )
    db.execute_sql('CREATE INDEX "quota_reservation_key_id" ON "quota_reservation" ("key_id")')


def up(migrator, db):
    if isinstance(db, SqliteDatabase):
        _rebuild(db, autoincrement=True)


def down(migrator, db):
    if isinstance(db, SqliteDatabase):
        _rebuild(db, autoincrement=False)
