"""`cxr-appliance`: run, process, validate-config, schema, doctor, history, feedback, display, display-account,
usb-import, recalibrate.

User errors (UserError) print one plain message and exit 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from appliance import NOT_FOR_DIAGNOSTIC_USE, __version__
from appliance.config import AppConfig, config_json_schema, load_config
from appliance.errors import UserError
from appliance.logs import setup_logging

log = logging.getLogger("appliance")

DEFAULT_CONFIG = Path("/etc/cxr-appliance/config.yaml")


def _config_path(args: argparse.Namespace) -> Path | None:
    """--config, else /etc/cxr-appliance/config.yaml when it exists, else None (built-in defaults)."""
    path: Path | None = args.config
    return path if path is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)


def _config(args: argparse.Namespace) -> AppConfig:
    path = _config_path(args)
    return load_config(path) if path is not None else AppConfig()


def cmd_validate_config(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    print(
        f"{args.file}: valid (site {config.device.site}, device {config.device.device_id}, model {config.inference.model})"
    )
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from appliance.result import write_schemas

    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{args.out}: cannot create: {exc.strerror or exc}") from exc
    config_schema = args.out / "config.schema.json"
    config_schema.write_text(
        json.dumps(config_json_schema(), indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    for path in [config_schema, *write_schemas(args.out)]:
        print(path)
    return 0


def cmd_process(args: argparse.Namespace) -> int:
    from appliance.assemble import build_analyzer, job_for_file
    from appliance.result import Result

    config = _config(args)
    if args.model:
        config = config.model_copy(
            update={"inference": config.inference.model_copy(update={"model": args.model})}
        )
    # Without a config file (built-in defaults) nothing is written under /var/lib: a throw-away salt.
    analyzer = build_analyzer(config, salt_required=False, create_salt=_config_path(args) is not None)
    failures = 0
    batch = max(1, config.inference.max_batch)
    paths: list[Path] = args.files
    for start in range(0, len(paths), batch):
        jobs = [job_for_file(path, source="cli") for path in paths[start : start + batch]]
        for job, outcome in analyzer.analyze_each(jobs):
            # A bug on one file is that file's error result (traceback logged), not the end of the others.
            result = (
                outcome
                if isinstance(outcome, Result)
                else analyzer.failed(
                    job, "internal error", f"{job.path.name}: {type(outcome).__name__}: {outcome}"
                )
            )
            if not isinstance(outcome, Result):
                log.error("%s: internal error", job.path.name, exc_info=outcome)
            failures += result.status == "error"
            if args.json:
                print(result.to_json(), flush=True)
            else:
                print(
                    f"{result.image.image_id[:12]} {result.status:8} {result.triage or '-':8} {result.text}"
                )
    return 1 if failures else 0


def cmd_run(args: argparse.Namespace) -> int:
    from appliance.daemon import Daemon

    config = _config(args)
    return Daemon(config, config_path=_config_path(args)).run()


def cmd_doctor(args: argparse.Namespace) -> int:
    from appliance.doctor import run_doctor

    return run_doctor(args.config, _config)


def cmd_history(args: argparse.Namespace) -> int:
    from appliance.journal import Journal

    config = _config(args)
    if not config.journal.path.exists():
        raise UserError(f"{config.journal.path}: no journal yet (the daemon has not processed an image)")
    journal = Journal(config.journal.path, read_only=True)  # an engineer may not write it
    rows = journal.history(limit=args.limit, patient_key=args.patient)
    for row in rows:
        if args.json:
            print(json.dumps(row, default=str))
        else:
            print(
                f"{row.get('created_at', '')}  {row.get('location', ''):12} {row.get('status', ''):8}"
                f" {row.get('triage') or '-':8} {row.get('image_id', '')[:12]}  {row.get('text', '')}"
            )
    return 0


def cmd_feedback_export(args: argparse.Namespace) -> int:
    from appliance.feedback import write_csv
    from appliance.journal import Journal, to_timestamp

    config = _config(args)
    if not config.journal.path.exists():
        raise UserError(f"{config.journal.path}: no journal yet (the daemon has not processed an image)")
    if args.since is not None and to_timestamp(args.since) is None:
        raise UserError(f"--since {args.since!r} is not an ISO 8601 time")
    journal = Journal(config.journal.path, read_only=True)  # an engineer may not write it
    try:
        rows = journal.feedback(since=args.since)
    finally:
        journal.close()
    if args.out == "-":
        write_csv(rows, sys.stdout)
    else:
        try:
            out = open(args.out, "w", encoding="utf-8", newline="")  # noqa: SIM115 (closed below)
        except OSError as exc:
            raise UserError(f"{args.out}: cannot write: {exc.strerror or exc}") from exc
        with out:
            count = write_csv(rows, out)
        print(f"{args.out}: {count} acknowledgement(s)", file=sys.stderr)
    return 0


def cmd_display(args: argparse.Namespace) -> int:
    from appliance.display.server import serve
    from appliance.websecurity import server_context

    config = _config(args)
    display = config.display
    password = display.password()
    auth = display.auth
    serve(
        host=args.host or display.host,
        port=args.port or display.port,
        broker_ws_url=display.broker_ws_url,
        topic_prefix=config.mqtt.topic_prefix,
        site=display.site,
        username=display.username,
        # The page needs this password to connect, so anyone who can load the page can read it:
        # it must be the display account (read results, write acks only), never the cart's.
        password=password.get_secret_value() if password else None,
        display_name=display.name,
        allowed_hosts=display.allowed_hosts,
        tls=server_context(display.tls.cert_file, display.tls.key_file, "display") if display.tls else None,
        credentials=(auth.username, auth.password().get_secret_value()) if auth else None,
    )
    return 0


def cmd_display_account(args: argparse.Namespace) -> int:
    from appliance.display.accounts import main as accounts_main

    return accounts_main(args)


def cmd_usb_import(args: argparse.Namespace) -> int:
    from appliance.usb_import import main as usb_main

    return usb_main(args, _config(args))


def cmd_recalibrate(args: argparse.Namespace) -> int:
    from appliance.recalibrate import main as recalibrate_main

    return recalibrate_main(args, _config(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxr-appliance",
        description=f"Bedside chest X-ray appliance {__version__}. {NOT_FOR_DIAGNOSTIC_USE}.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("-c", "--config", type=Path, help=f"YAML config (default {DEFAULT_CONFIG} if present)")
        return p

    p = with_config(sub.add_parser("run", help="the daemon: watch folders, analyse, publish"))
    p.set_defaults(func=cmd_run)
    p = with_config(sub.add_parser("process", help="analyse files now, one JSON result per line; no broker"))
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--json", action="store_true", help="print full JSON results")
    p.add_argument("--model", type=Path, help="manifest to use instead of the configured one")
    p.set_defaults(func=cmd_process)
    p = sub.add_parser("validate-config", help="check a config file and exit")
    p.add_argument("file", type=Path)
    p.set_defaults(func=cmd_validate_config)
    p = sub.add_parser("schema", help="write the config and payload JSON Schemas")
    p.add_argument("--out", type=Path, default=Path("schemas"))
    p.set_defaults(func=cmd_schema)
    p = with_config(
        sub.add_parser("doctor", help="check config, model, decoders, folders, broker; say what is wrong")
    )
    p.set_defaults(func=cmd_doctor)
    p = with_config(sub.add_parser("history", help="recent results from the journal"))
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--patient", help="pseudonymous patient key")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_history)
    p = sub.add_parser("feedback", help="clinician feedback (acknowledgements with verdicts)")
    feedback = p.add_subparsers(dest="feedback_command", required=True)
    p = with_config(feedback.add_parser("export", help="write the feedback as CSV for audit"))
    p.add_argument("--since", help="only acks received at or after this ISO 8601 time")
    p.add_argument("--out", default="-", help="CSV file to write, or - for stdout (default)")
    p.set_defaults(func=cmd_feedback_export)
    p = with_config(sub.add_parser("display", help="serve the ward display page"))
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.set_defaults(func=cmd_display)
    p = sub.add_parser("display-account", help="add, revoke or list the broker account of one ward display")
    from appliance.display.accounts import add_arguments as account_arguments

    account_arguments(p)
    p.set_defaults(func=cmd_display_account)
    p = with_config(sub.add_parser("usb-import", help="import every image on a mounted USB stick"))
    p.add_argument("mount", type=Path)
    from appliance.usb_import import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_usb_import)
    p = with_config(
        sub.add_parser(
            "recalibrate", help="site operating points from local labels: writes an overlay + report"
        )
    )
    from appliance.recalibrate import add_arguments as recalibrate_arguments

    recalibrate_arguments(p)
    p.set_defaults(func=cmd_recalibrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # validate-config and schema have no config to read logging settings from
        level = "DEBUG" if args.verbose else None
        setup_logging(level=level, fmt=None)
        return int(args.func(args))
    except UserError as exc:
        print(f"cxr-appliance: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
