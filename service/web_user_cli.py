"""`voxarc web-user NAME [--role viewer|admin]`: a new token for a named user of the admin page
and DICOMweb, and the ``http_users`` line that lets it in (the node keeps only its SHA-256).
The token is printed once; give it to the user, not to the settings file."""

from __future__ import annotations

from service.web_auth import ROLES, new_token, parse_users, token_digest


def register(subparsers) -> None:
    """Add ``web-user`` to the ``voxarc`` parser."""
    p = subparsers.add_parser("web-user", help="make a token for a named user of the admin "
                              "page and DICOMweb")
    p.add_argument("name", help="the user's name, as the access trail will show it")
    p.add_argument("--role", choices=ROLES, default="viewer",
                   help="viewer: reads only (default); admin: also sends, uploads, STOW-RS")
    p.set_defaults(func=web_user)


def web_user(args) -> int:
    """Print a new token and its settings line; exit 2 for a name the settings cannot hold."""
    token = new_token()
    line = {args.name: f"{args.role}:{token_digest(token)}"}
    try:
        parse_users(line)
    except ValueError as exc:
        print(exc)
        return 2
    print(f"token for {args.name} ({args.role}), shown once: {token}")
    print("add to the node's settings file, then send the node SIGHUP (or restart it):")
    print("[http_users]")
    print(f'{args.name} = "{line[args.name]}"')
    return 0
