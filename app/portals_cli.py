"""`hubline portals list|show|disconnect|rotate-secret`: the operator's view of the portals."""

from __future__ import annotations

import argparse
from datetime import timedelta
from typing import Any

from app import cli, db
from app.crypto import TokenCipher
from app.errors import HubSpotNotReached
from app.lifecycle import disconnect, portal_summaries
from app.main import check_keys_can_read
from app.portals import get_portal, rotate_secret


async def _summaries(portal_id: int | None = None) -> list[dict[str, Any]]:
    settings = cli.settings_from_environment()
    engine = db.create_engine(settings.database_url)
    try:
        async with db.session_factory(engine)() as session:
            return await portal_summaries(session=session, settings=settings, portal_id=portal_id)
    finally:
        await engine.dispose()


async def cmd_portals_list(args: argparse.Namespace) -> int:
    portals = await _summaries()
    if args.json:
        cli.print_json(portals)
        return 0
    if not portals:
        print("no portals installed yet")
        return 0
    print(f"{'PORTAL':>12}  {'STATUS':<13} {'GEN':>4}  {'INSTALLED':<20} DOMAIN")
    for p in portals:
        installed = p["installed_at"][:19].replace("T", " ")
        print(
            f"{p['portal_id']:>12}  {p['status']:<13} {p['install_generation']:>4}  "
            f"{installed:<20} {p['hub_domain']}"
        )
    for p in portals:
        if p["reauth_url"]:
            print(f"portal {p['portal_id']} needs re-consent: {p['reauth_url']}")
    return 0


async def cmd_portals_show(args: argparse.Namespace) -> int:
    portals = await _summaries(args.portal_id)
    if not portals:
        return cli.refuse(f"no portal {args.portal_id}")
    portal = portals[0]
    if args.json:
        cli.print_json(portal)
        return 0
    for key in ("portal_id", "status", "hub_domain", "install_generation", "installed_at"):
        print(f"{key}: {portal[key]}")
    if portal["uninstalled_at"]:
        print(f"uninstalled_at: {portal['uninstalled_at']}")
    print(f"scopes: {' '.join(portal['scopes'])}")
    print(f"webhook_url: {portal['webhook_url']}")
    if portal["reauth_url"]:
        print(f"re-consent link: {portal['reauth_url']}")
    for problem in portal["problems"]:
        print(f"problem [{problem['code']}]: {problem['message']}")
    return 0


async def cmd_portals_disconnect(args: argparse.Namespace) -> int:
    from app.main import close_services, open_services

    resources = await open_services(cli.settings_from_environment())
    try:
        result = await disconnect(resources, args.portal_id, force=args.force)
    except LookupError:
        return cli.refuse(f"no portal {args.portal_id}")
    except HubSpotNotReached as error:
        return cli.refuse(f"{error} (or disconnect here alone with --force)")
    finally:
        await close_services(resources)
    if result.already_uninstalled:
        print(f"portal {args.portal_id} is already uninstalled; nothing to do")
        return 0
    print(
        f"portal {args.portal_id}: app uninstalled on HubSpot: "
        f"{'yes' if result.uninstalled_on_hubspot else 'no'}; refresh token revoked: "
        f"{'yes' if result.revoked else 'no'}"
    )
    print(
        f"uninstall queued as event {result.event_id}; "
        "a worker deletes the tokens and parks its events"
    )
    return 0


async def cmd_portals_rotate_secret(args: argparse.Namespace) -> int:
    settings = cli.settings_from_environment()
    cipher = TokenCipher.from_setting(settings.token_encryption_keys.get_secret_value())
    engine = db.create_engine(settings.database_url)
    grace = timedelta(hours=settings.secret_rotation_grace_hours)
    try:
        # A shell with keys that predate a rotation would store the secret under a key the
        # deployment no longer holds, and no process of it could start again.
        await check_keys_can_read(engine, cipher)
        async with db.transaction(db.session_factory(engine)) as session:
            if await get_portal(args.portal_id, session=session) is None:
                return cli.refuse(f"no portal {args.portal_id}")
            secret = await rotate_secret(
                args.portal_id, session=session, cipher=cipher, grace=grace
            )
    finally:
        await engine.dispose()
    if args.json:
        cli.print_json(
            {
                "portal_id": args.portal_id,
                "secret": secret.reveal(),
                "grace_hours": grace.total_seconds() / 3600,
            }
        )
        return 0
    print(
        f"portal {args.portal_id}: new receptionist signing secret (the old one keeps working "
        f"for {settings.secret_rotation_grace_hours:g} hours):"
    )
    print(secret.reveal())
    return 0


def register(commands: Any) -> None:
    portals = commands.add_parser("portals", help="list, inspect and disconnect installed portals")
    actions = portals.add_subparsers(dest="portals_command", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="every portal with its status")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(run=cmd_portals_list, existing_database=True)
    show = actions.add_parser("show", help="one portal: status, scopes, webhook URL, problems")
    show.add_argument("portal_id", type=cli.row_id)
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(run=cmd_portals_show, existing_database=True)
    drop = actions.add_parser(
        "disconnect", help="uninstall the app from the portal on HubSpot and delete its tokens"
    )
    drop.add_argument("portal_id", type=cli.row_id)
    drop.add_argument(
        "--force",
        action="store_true",
        help="disconnect here even when HubSpot cannot be reached (the app then stays "
        "installed on HubSpot until the portal's admin uninstalls it there)",
    )
    drop.set_defaults(run=cmd_portals_disconnect, existing_database=True)
    rotate = actions.add_parser(
        "rotate-secret",
        help="new receptionist signing secret (the old one works for a grace period)",
    )
    rotate.add_argument("portal_id", type=cli.row_id)
    rotate.add_argument("--json", action="store_true", help="machine-readable output")
    rotate.set_defaults(run=cmd_portals_rotate_secret, existing_database=True)


cli.EXTENSIONS.append(register)
