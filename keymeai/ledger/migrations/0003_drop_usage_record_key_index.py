"""Drop the single-column index on usage_record(key_id).

The (key_id, created_at) index serves every query by key already; the extra index cost
about 7% of the ledger's size at 10 million records and slowed every insert.
"""


def up(migrator, db):
    migrator.migrate(migrator.drop_index("usage_record", "usage_record_key_id"))


def down(migrator, db):
    migrator.migrate(migrator.add_index("usage_record", ("key_id",)))
