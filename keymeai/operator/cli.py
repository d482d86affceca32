"""Operator commands: `flask --app app keys ...`, `usage report`, `db upgrade`, `info`."""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Sequence

import click
from flask import Flask
from flask.cli import AppGroup

from .. import gateway
from ..api.concurrency import MAX_CONCURRENT
from ..config import ConfigError, validate_limits
from ..ledger import db, keys, reports
from ..ledger.billing import format_usd, parse_usd
from ..ledger.models import ApiKey, utcnow
from ..ops.diagnostics import without_password
from . import invites

keys_cli = AppGroup("keys", help="Create, list and manage customer API keys.")
usage_cli = AppGroup("usage", help="Usage and cost reports.")
db_cli = AppGroup("db", help="Ledger schema.")
invites_cli = AppGroup("invites", help="Invite codes for sign-up at /signup.")
MAX_BIGINT = 2**63  # the ledger's BIGINT columns


def init_app(app: Flask) -> None:
    for group in (keys_cli, usage_cli, db_cli, invites_cli):
        app.cli.add_command(group)
    app.cli.add_command(info)


@click.command("info")
def info() -> None:
    """Say which config file, ledger and limiter storage the commands use, and which
    models have a provider key here."""
    config = gateway.current().config
    click.echo(f"config:  {config.source}")
    click.echo(f"ledger:  {without_password(config.database_url)}")
    click.echo(f"limits:  {without_password(config.ratelimit.storage_uri)}")
    click.echo(f"tiers:   {', '.join(config.tiers)}")
    for model in config.models.values():
        ready = [u for u in model.upstreams if config.providers[u.provider].api_key]
        where = ", ".join(f"{u.provider}/{u.model}" for u in model.upstreams)
        state = "ready" if ready else "no provider key set"
        click.echo(f"model:   {model.id} -> {where} ({state})")


def _tier_choice(value: str) -> str:
    tiers = gateway.current().config.tiers
    if value not in tiers:
        raise click.BadParameter(f"unknown tier {value!r} (configured: {', '.join(tiers)})")
    return value


def _key(ref: str) -> ApiKey:
    try:
        return keys.find_key(ref)
    except keys.UnknownKey as exc:
        raise click.ClickException(str(exc)) from None


def _name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """The admin API's rule for names (keys.check_name): a usage error, exit code 2."""
    try:
        return keys.check_name(value, "the name")
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _expiry(ctx: click.Context, param: click.Parameter, value: str | None) -> dt.datetime | None:
    """The admin API's rule for expiry (keys.parse_expiry): ISO 8601, in the future."""
    if value is None:
        return None
    try:
        return keys.parse_expiry(value, "the expiry")
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@keys_cli.command("create")
@click.option("--name", required=True, callback=_name, help="Who the key is for.")
@click.option("--tier", required=True, help="A tier of the config's tier table.")
@click.option(
    "--expires",
    callback=_expiry,
    metavar="WHEN",
    help="Expiry: ISO 8601, UTC unless an offset is given, e.g. 2027-01-31 or "
    "2027-01-31T12:00:00+08:00.",
)
def create_key(name: str, tier: str, expires: dt.datetime | None) -> None:
    """Create a key; the key itself is printed once, alone on the last line."""
    row, plain = keys.create_key(name, _tier_choice(tier), expires)
    click.echo(f"Created key {row.id} ({row.prefix}) for {row.name!r} on tier {tier}.", err=False)
    click.echo("Store it now: it cannot be shown again.")
    click.echo(plain)


@keys_cli.command("list")
def list_keys() -> None:
    """List keys (never the keys themselves: only their visible prefixes)."""
    rows = keys.list_keys()
    now = utcnow()
    table = [
        (
            "key_id",
            "prefix",
            "name",
            "tier",
            "status",
            "created",
            "expires",
            "limits",
            "models",
            "origin",
        )
    ]
    for row in rows:
        limits = row.request_limits or ""
        if row.tokens_per_month is not None:
            limits = f"{limits} {row.tokens_per_month} tokens/month".strip()
        if row.spend_cap_units is not None:
            limits = f"{limits} ${format_usd(row.spend_cap_units)}/month".strip()
        if row.max_concurrent is not None:
            limits = f"{limits} {row.max_concurrent} concurrent".strip()
        table.append(
            (
                str(row.id),
                row.prefix,
                row.name,
                row.tier,
                keys.key_status(row, now),
                f"{row.created_at:%Y-%m-%d %H:%M}",
                f"{row.expires_at:%Y-%m-%d %H:%M}" if row.expires_at else "",
                limits,
                row.allowed_models or "all",
                f"{row.origin} from {row.origin_address}" if row.origin else "operator",
            )
        )
    _print_table(table)


@keys_cli.command("revoke")
@click.argument("key")
def revoke_key(key: str) -> None:
    """Revoke KEY (its id or prefix); every instance refuses it within seconds."""
    row = keys.revoke_key(_key(key))
    click.echo(f"Revoked key {row.id} ({row.prefix}).")


@keys_cli.command("set-tier")
@click.argument("key")
@click.argument("tier")
def set_tier(key: str, tier: str) -> None:
    """Move KEY (its id or prefix) to TIER."""
    row = keys.update_key(_key(key), tier=_tier_choice(tier))
    click.echo(f"Key {row.id} ({row.prefix}) is now on tier {row.tier}.")


def _spend_cap(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """A USD amount as exact cost units (1e-10 USD): "25.00" -> 250_000_000_000."""
    if value is None:
        return None
    try:
        return parse_usd(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _limits_text(row: ApiKey) -> str:
    requests = row.request_limits or "from tier"
    tokens = row.tokens_per_month if row.tokens_per_month is not None else "from tier"
    cap = f"${format_usd(row.spend_cap_units)}" if row.spend_cap_units is not None else "none"
    concurrent = row.max_concurrent if row.max_concurrent is not None else "from tier"
    return (
        f"requests {requests}, tokens/month {tokens}, spend cap/month {cap}, "
        f"concurrent {concurrent}"
    )


@keys_cli.command("set-limits")
@click.argument("key")
@click.option(
    "--requests",
    "request_limits",
    multiple=True,
    help='A request limit such as "500 per minute" (repeatable). Overrides the tier.',
)
@click.option(
    "--tokens-per-month",
    type=click.IntRange(min=1, max=MAX_BIGINT - 1),
    help="Monthly token quota (prompt + completion). Overrides the tier.",
)
@click.option(
    "--spend-cap",
    callback=_spend_cap,
    metavar="USD",
    help="Monthly spend cap in USD (e.g. 25.00): once reached, requests get 429.",
)
@click.option(
    "--max-concurrent",
    type=click.IntRange(min=1, max=MAX_CONCURRENT),
    help="Requests of the key in flight at once; beyond it 429. Overrides the tier.",
)
@click.option("--clear", is_flag=True, help="Drop the key's own limits and spend cap.")
def set_limits(
    key: str,
    request_limits: tuple[str, ...],
    tokens_per_month: int | None,
    spend_cap: int | None,
    max_concurrent: int | None,
    clear: bool,
) -> None:
    """Give KEY its own limits (the Scale tier's custom limits) or a spend cap."""
    row = _key(key)
    if clear:
        row = keys.update_key(
            row,
            request_limits=None,
            tokens_per_month=None,
            spend_cap_units=None,
            max_concurrent=None,
        )
    else:
        changes: dict[str, object] = {}
        if request_limits:
            try:
                limits = validate_limits(list(request_limits), "--requests")
                changes["request_limits"] = ";".join(limits)
            except ConfigError as exc:
                raise click.BadParameter(str(exc)) from None
        if tokens_per_month is not None:
            changes["tokens_per_month"] = tokens_per_month
        if spend_cap is not None:
            changes["spend_cap_units"] = spend_cap
        if max_concurrent is not None:
            changes["max_concurrent"] = max_concurrent
        if not changes:
            raise click.UsageError(
                "give --requests, --tokens-per-month, --spend-cap, --max-concurrent or --clear"
            )
        row = keys.update_key(row, **changes)
    click.echo(f"Key {row.id} ({row.prefix}): {_limits_text(row)}.")


@keys_cli.command("set-models")
@click.argument("key")
@click.argument("models", required=False)
@click.option("--all", "all_models", is_flag=True, help="Allow every model again.")
def set_models(key: str, models: str | None, all_models: bool) -> None:
    """Allow KEY only MODELS (comma-separated model ids), or every model with --all."""
    if (models is None) == (not all_models):
        raise click.UsageError("give MODELS (e.g. deepseek-chat,qwen-plus) or --all, not both")
    allowed = None
    if models is not None:
        try:
            allowed = keys.check_models(models.split(","), gateway.current().config.models)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="MODELS") from None
    row = keys.update_key(_key(key), allowed_models=keys.join_models(allowed))
    click.echo(f"Key {row.id} ({row.prefix}) may use: {row.allowed_models or 'every model'}.")


@usage_cli.command("report")
@click.option("--month", help="YYYY-MM (default: this month, UTC).")
@click.option("--key", "key_ref", help="Only this key (its id or prefix).")
@click.option(
    "--by",
    type=click.Choice(reports.GROUPINGS),
    default="model",
    show_default=True,
    help="One row per key and model, or per day, key and model.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
)
def usage_report(month: str | None, key_ref: str | None, by: str, fmt: str) -> None:
    """Requests, tokens and cost per key and model for a month (UTC).

    Table and CSV end with a "total" line; JSON is the list of rows alone.
    """
    try:
        first = reports.parse_month(month) if month else utcnow().date().replace(day=1)
    except ValueError:
        raise click.BadParameter("expected YYYY-MM", param_hint="--month") from None
    key_id = _key(key_ref).id if key_ref else None
    rows = reports.monthly_usage(first, key_id, by)
    if fmt == "json":
        click.echo(reports.to_json(rows, by))
    elif fmt == "csv":
        click.echo(reports.to_csv(rows, by), nl=False)
    else:
        _print_table(reports.to_text_rows(rows, by))


def _note(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return invites.check_note(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@invites_cli.command("create")
@click.option("--tier", required=True, help="The tier of the keys the code makes.")
@click.option(
    "--uses",
    type=click.IntRange(min=1, max=invites.MAX_USES),
    help="How many keys the code makes at most (default: no bound).",
)
@click.option("--expires", callback=_expiry, metavar="WHEN", help="Expiry: ISO 8601, UTC.")
@click.option("--note", default="", callback=_note, help="Whom the code is for.")
def create_invite(tier: str, uses: int | None, expires: dt.datetime | None, note: str) -> None:
    """Make an invite code; the code itself is printed once, alone on the last line."""
    row, plain = invites.create(_tier_choice(tier), uses, expires, note)
    bound = f"{uses} uses" if uses else "unbounded uses"
    click.echo(f"Created invite {row.id} ({row.prefix}) for tier {tier}, {bound}.")
    click.echo("Store it now: it cannot be shown again.")
    click.echo(plain)


@invites_cli.command("list")
def list_invites() -> None:
    """List invite codes (never the codes themselves: only their prefixes)."""
    now = utcnow()
    table = [("id", "prefix", "tier", "uses", "status", "created", "expires", "note")]
    for row in invites.list_all():
        table.append(
            (
                str(row.id),
                row.prefix,
                row.tier,
                f"{row.uses}/{row.max_uses}" if row.max_uses else str(row.uses),
                invites.status(row, now),
                f"{row.created_at:%Y-%m-%d %H:%M}",
                f"{row.expires_at:%Y-%m-%d %H:%M}" if row.expires_at else "",
                row.note,
            )
        )
    _print_table(table)


@invites_cli.command("revoke")
@click.argument("code")
def revoke_invite(code: str) -> None:
    """Revoke CODE (its id, prefix or the code): it makes no more keys."""
    try:
        row = invites.revoke(invites.find(code))
    except invites.UnknownInvite as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"Revoked invite {row.id} ({row.prefix}); keys it made stay valid.")


@db_cli.command("upgrade")
def upgrade() -> None:
    """Apply pending schema migrations (idempotent; safe to run concurrently)."""
    applied = db.upgrade()
    click.echo(f"Applied {', '.join(applied)}." if applied else "Schema is up to date.")


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        line = "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
        sys.stdout.write(line.rstrip() + "\n")
