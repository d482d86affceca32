"""Index the daily roll-ups by day.

Monthly reports (`usage report`, all keys) select a month of `usage_daily` rows; the
unique (key, day, model) index only serves one key at a time, so without this the
report scans the whole table, which grows by a row per key, model and day forever.
"""


def up(migrator, db):
    migrator.migrate(migrator.add_index("usage_daily", ("day",)))


def down(migrator, db):
    migrator.migrate(migrator.drop_index("usage_daily", "usage_daily_day"))
