"""`stored_response`: Responses API answers kept for the key that made them (`store`,
the default), so that `previous_response_id`, `GET` and `DELETE /v1/responses/{id}`
work; pruned after `[responses] retention_days`."""

import datetime as dt

from peewee import CharField, DateTimeField, IntegerField, Model, TextField


def up(migrator, db):
    class StoredResponse(Model):
        response_id = CharField(max_length=64, unique=True)
        key_id = IntegerField()
        created_at = DateTimeField(default=dt.datetime.utcnow, index=True)
        response = TextField()  # the Response object, as answered
        history = TextField()  # the chat messages of the conversation, the answer included

        class Meta:
            database = db
            table_name = "stored_response"

    db.create_tables([StoredResponse], safe=True)


def down(migrator, db):
    db.execute_sql("DROP TABLE IF EXISTS stored_response")
