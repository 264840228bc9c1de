"""sentiment-client: score a file of texts as a bulk job, follow or cancel a job, predict a text.

Exit status: 0 done, 1 the service refused or failed (or the job did), 2 bad usage or input,
130 interrupted (a submitted job keeps running; the same command resumes it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from sentiment_client._version import __version__
from sentiment_client.api import JobStatus, SentimentClient, SentimentError

PROG = "sentiment-client"
DEFAULT_URL = "http://127.0.0.1:3000"
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} texts [{elapsed}{postfix}]"


class InputError(Exception):
    """The command line, the input file or the state file cannot be used as they are."""


def note(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


# --- input and output files -----------------------------------------------------------------


def read_texts(path: Path, plain: bool) -> list[str]:
    """The texts of a JSONL file (`{"text": ...}` a line, other keys ignored) or, with `plain`,
    of a text file (a line each); empty lines are skipped."""
    try:
        handle = path.open(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read it: {exc.strerror}") from None
    texts: list[str] = []
    number = 0
    with handle:
        try:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                if plain:
                    texts.append(line.rstrip("\r\n"))
                    continue
                try:
                    item = json.loads(line)
                except ValueError:
                    raise InputError(
                        f"{path}, line {number}: not valid JSON (for a file of plain text lines, use --plain)"
                    ) from None
                if not isinstance(item, dict) or not isinstance(item.get("text"), str):
                    raise InputError(f'{path}, line {number}: expected {{"text": "..."}}, got {line.strip()[:80]}')
                if not item["text"].strip():
                    raise InputError(f"{path}, line {number}: the text is blank")
                texts.append(item["text"])
        except UnicodeDecodeError:
            raise InputError(f"{path}, line {number + 1}: not UTF-8 text") from None
    if not texts:
        raise InputError(f"{path}: no texts in it")
    return texts


def fingerprint(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(json.dumps(text).encode() + b"\n")
    return digest.hexdigest()


def write_atomically(path: Path, write: Callable[[IO[str]], None], secret: bool = False) -> None:
    """`write` into a file beside `path` that replaces it only once complete and on disk;
    `secret`: readable by this user only (0600), as a file holding a job's token."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if not secret:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 is for secrets, not for results
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def state_file(out: Path) -> Path:
    """Where `score` keeps the id and token of the job it submitted, until the results are written."""
    return out.with_name(out.name + ".job")


def read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        state = None
    if not isinstance(state, dict) or not isinstance(state.get("job_id"), str):
        raise InputError(f"{path}: not a job state file of {PROG}; delete it to submit the input again")
    return state


# --- commands -------------------------------------------------------------------------------


def eta(status: JobStatus) -> str:
    return "?" if status.eta_seconds is None else tqdm.format_interval(status.eta_seconds)


def progress_label(status: JobStatus) -> str:
    return status.status if status.finished else f"{status.status}, eta {eta(status)}"


def follow(client: SentimentClient, first: JobStatus, poll: float, quiet: bool, token: str | None) -> JobStatus:
    """Poll the job until it finishes, with a progress bar of texts done and the service's ETA."""
    with tqdm(
        total=first.total,
        initial=first.done,
        desc=f"job {first.job_id[:8]}",
        bar_format=BAR_FORMAT,
        postfix=progress_label(first),
        disable=quiet,
        file=sys.stderr,
    ) as bar:
        if first.finished:
            return first

        def show(status: JobStatus) -> None:
            bar.n = status.done
            bar.set_postfix_str(progress_label(status), refresh=False)
            bar.refresh()

        time.sleep(poll)
        return client.wait(first.job_id, progress=show, poll=poll, token=token)


def download(client: SentimentClient, job_id: str, out: Path, total: int, token: str | None) -> int:
    """The job's results into `out`, a JSON line each in input order, written atomically."""
    count = 0

    def write(handle: IO[str]) -> None:
        nonlocal count
        for result in client.results(job_id, token):
            if result.index != count:
                raise SentimentError(None, f"job {job_id}: result {count} expected, index {result.index} came")
            handle.write(json.dumps(asdict(result), separators=(",", ":")) + "\n")
            count += 1
        if count != total:
            raise SentimentError(None, f"job {job_id}: the results ended after {count} of {total}")

    write_atomically(out, write)
    return count


def resume_hint(args: argparse.Namespace, job_id: str) -> str:
    """How to pick the job up again, and how to stop it."""
    again = [PROG, "score", *([args.input] if args.input else []), "--out", args.out, "--url", args.url]
    if args.plain:
        again.append("--plain")
    if args.job_id:
        again += ["--job-id", args.job_id]
    by_id = [PROG, "score", "--job-id", job_id, "--out", args.out, "--url", args.url]
    return (
        "To resume, run the same command again:\n"
        f"  {shlex.join(again)}\n"
        f"or follow the job by its id: {shlex.join(by_id)}\n"
        f"To stop it: {shlex.join([PROG, 'cancel', job_id, '--url', args.url])}\n"
        f"(both need the job's token, --token or $SENTIMENT_JOB_TOKEN: {state_file(Path(args.out))} holds the"
        " token of a job this command submitted)"
    )


def run_score(client: SentimentClient, args: argparse.Namespace) -> int:
    out = Path(args.out)
    state = state_file(out)
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK | os.X_OK):
        raise InputError(f"{out.parent}: no folder this user can write the results into")
    texts = read_texts(Path(args.input), args.plain) if args.input else None
    job_id: str | None = args.job_id
    token: str | None = args.token
    saved: dict[str, Any] = {}
    if job_id is None and state.exists():
        saved = read_state(state)
        job_id = saved["job_id"]
        token = saved.get("token") or token
        if texts is not None and saved.get("texts_sha256") not in (None, fingerprint(texts)):
            raise InputError(f"{state} is the job of another input than {args.input}: delete it to submit this one")
        note(f"resuming job {job_id} (its id is in {state})")
    if job_id is None and texts is None:
        raise InputError("score needs an INPUT file to submit, or --job-id of a job to follow")
    try:
        if job_id is None:
            assert texts is not None
            job = client.submit(texts)
            job_id, token = job.job_id, job.token
            record = {"job_id": job_id, "token": token, "url": args.url, "input": args.input, "total": job.total}
            record["texts_sha256"] = fingerprint(texts)
            write_atomically(state, lambda handle: json.dump(record, handle), secret=True)
            note(
                f"submitted job {job_id}: {job.total} texts (its id and token are kept in {state}, mode 0600,"
                " until the results are written)"
            )
        try:
            first = client.status(job_id, token)
        except SentimentError as exc:
            if exc.status == 404 and saved:
                raise SentimentError(
                    404,
                    f"the service at {args.url} does not know job {job_id} (from {state}, submitted to "
                    f"{saved.get('url')}): it expired or was never there; delete {state} to submit the input again",
                ) from None
            raise
        if texts is not None and first.total != len(texts):
            raise InputError(f"job {job_id} holds {first.total} texts, {args.input} {len(texts)}: not its input")
        final = follow(client, first, args.poll, args.quiet, token)
        if final.status != "done":
            again = ""
            if state.exists() and not args.job_id:
                state.unlink()
                again = f"; {state} deleted, run again to submit the input anew"
            note(f"job {job_id} {final.status} after {final.done} of {final.total} texts: no results written{again}")
            return EXIT_FAILED
        count = download(client, job_id, out, final.total, token)
    except KeyboardInterrupt:
        if job_id is None:
            note("interrupted while submitting: no job id came back (the service may have created the job anyway)")
        else:
            note(f"interrupted: job {job_id} keeps running on the service. {resume_hint(args, job_id)}")
        return EXIT_INTERRUPTED
    except (SentimentError, OSError) as exc:
        if job_id is not None and getattr(exc, "status", None) != 404:
            # the service failed us, not necessarily the job: following it again may well work
            note(f"error: {exc}")
            note(f"job {job_id} may still be running on the service. {resume_hint(args, job_id)}")
            return EXIT_FAILED
        raise
    state.unlink(missing_ok=True)
    note(f"wrote {count} results to {out}")
    return 0


def run_status(client: SentimentClient, args: argparse.Namespace) -> int:
    s = client.status(args.job_id, args.token)
    share = 100 * s.done / s.total if s.total else 100.0
    finished = "-" if s.finished_at is None else s.finished_at.isoformat(timespec="seconds")
    print(
        f"{s.job_id}  {s.status}  {s.done}/{s.total} texts ({share:.0f}%)  eta {'-' if s.finished else eta(s)}  "
        f"model {s.model}  created {s.created_at.isoformat(timespec='seconds')}  finished {finished}"
    )
    return 0


def run_cancel(client: SentimentClient, args: argparse.Namespace) -> int:
    print(f"job {args.job_id} {client.cancel(args.job_id, args.token)}")
    return 0


def run_predict(client: SentimentClient, args: argparse.Namespace) -> int:
    p = client.predict(args.text)
    print(f"{p.label}  {p.score:.4f}  {p.model}{'  (cached)' if p.cached else ''}")
    return 0


def url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"{value!r} is not an http:// or https:// URL")
    return value


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        type=url,
        default=os.environ.get("SENTIMENT_URL", DEFAULT_URL),
        help=f"the service (default: $SENTIMENT_URL or {DEFAULT_URL})",
    )
    common.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for an answer (default 30)")
    common.add_argument(
        "--token",
        default=os.environ.get("SENTIMENT_JOB_TOKEN"),
        help="a job's token, for --job-id, status and cancel (default: $SENTIMENT_JOB_TOKEN; score reads its"
        " own job's from OUT.job; the admin key reaches every job)",
    )
    common.add_argument(
        "--retries", type=int, default=4, help="times a refusal with Retry-After is waited out and retried (default 4)"
    )
    top = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = top.add_subparsers(dest="name", required=True, metavar="COMMAND")

    score = commands.add_parser(
        "score", parents=[common], help="score a file as a bulk job and write the results (resumable)"
    )
    score.add_argument("input", nargs="?", help='JSONL file, a {"text": ...} object a line (plain lines: --plain)')
    score.add_argument("--out", required=True, help="results file: a JSON line per text, in input order")
    score.add_argument("--plain", action="store_true", help="INPUT holds one text a line, not JSON")
    score.add_argument("--job-id", help="follow this job instead of submitting (default: the one in OUT.job)")
    score.add_argument("--poll", type=float, default=1.0, help="seconds between progress checks (default 1)")
    score.add_argument("--quiet", action="store_true", help="no progress bar")
    score.set_defaults(run=run_score)

    status = commands.add_parser("status", parents=[common], help="a job's progress")
    status.add_argument("job_id")
    status.set_defaults(run=run_status)

    cancel = commands.add_parser("cancel", parents=[common], help="cancel a queued or running job")
    cancel.add_argument("job_id")
    cancel.set_defaults(run=run_cancel)

    predict = commands.add_parser("predict", parents=[common], help="the prediction for one text")
    predict.add_argument("text")
    predict.set_defaults(run=run_predict)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        with SentimentClient(args.url, timeout=args.timeout, retries=args.retries) as client:
            return int(args.run(client, args))
    except InputError as exc:
        note(str(exc))
        return EXIT_USAGE
    except (SentimentError, OSError) as exc:
        note(f"error: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        note("interrupted")
        return EXIT_INTERRUPTED
