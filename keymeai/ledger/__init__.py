"""The ledger: what is recorded, and what it adds up to.

The database and its schema (`db`, `models`, `migrations/`), API keys (`keys`), money
(`billing`), the usage journal and its writer (`journal`, `replay`), usage records
(`metering`), monthly quotas and spend caps (`quota`) and the reports read from them
(`reports`). Nothing here knows about HTTP requests.
"""
