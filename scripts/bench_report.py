#!/usr/bin/env python3
"""The benchmark's numbers: parsing, statistics, the report and the smoke checks.

scripts/bench.sh starts the cluster, the services and the load generators and writes
what they produce into a results directory; everything computed from those files is here.

    bench_report.py slice wrk|pgbench GROUP SIDE CLIENTS REP --output F --stmts F \\
                    --before S --after S --client-cpu F --clk-tck N [--conns N] [--rss KIB] \\
                    [--latency-log-dir D]
        one measured slice: prints its line of results.tsv, logs a summary to stderr
    bench_report.py report RESULTS-DIR
        summary.tsv, sweep.dat (the chart's data), the results section written into the
        report named in meta.tsv, and the tables on stdout
    bench_report.py check RESULTS-DIR
        the smoke run's checks; exits 1 if one fails

The results directory holds results.tsv (one line per slice, RESULT_COLUMNS), meta.tsv
(key<TAB>value: the run's settings and the machine), stmts/<tag>.tsv (calls<TAB>statement
from pg_stat_statements per slice) and, after a smoke run, run/commit-check.counts.

Python 3.11, standard library only. The formatting follows what awk printed when this
was shell, so that a report's numbers read the same as before.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation, localcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PGBENCH_SCRIPT = ROOT / "bench" / "pgbench" / "transfer.sql"

#: One line of results.tsv per slice, in this order.
RESULT_COLUMNS = (
    "group side clients rep rps p50 p99 errors rss conns stmts pings requests "
    "svc_us pg_us client_us foreign sys_us replica_share"
).split()
#: One line of summary.tsv per configuration (group, side, clients), in this order.
SUMMARY_COLUMNS = (
    "group side clients n rps rps_min rps_max p50 p99 errors rss conns stmts pings "
    "svc_us pg_us client_us foreign sys_us"
).split()

MISSING = "-"


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr)


# --- numbers ---------------------------------------------------------------------------


def number(text: str | None) -> float | None:
    """The value of a measured field, or None where it is missing ("-", empty, not a number)."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def awk_text(value: float) -> str:
    """A computed number as awk's `print` writes it: integers whole, others to 6 digits."""
    if value == int(value) and abs(value) < 1e16:
        return str(int(value))
    return f"{value:.6g}"


def median(values: list[float]) -> float | None:
    """The median; the mean of the middle two for an even count; None for no values."""
    if not values:
        return None
    return statistics.median(values)


def value_range(values: list[float]) -> tuple[float, float] | None:
    """(smallest, largest), or None for no values."""
    if not values:
        return None
    return min(values), max(values)


def median_text(texts: list[str]) -> str:
    """The median of measured fields, as the summary writes it: for an odd count the middle
    field as measured, for an even count the computed mean of the middle two. Missing
    fields are left out; none left gives "-"."""
    present = sorted((v, t) for t in texts if (v := number(t)) is not None)
    n = len(present)
    if n == 0:
        return MISSING
    if n % 2:
        return present[n // 2][1]
    return awk_text((present[n // 2 - 1][0] + present[n // 2][0]) / 2)


@dataclass(frozen=True)
class Spread:
    """The median and the range of a paired measure over the repetitions."""

    median: float
    low: float
    high: float

    @staticmethod
    def of(values: list[float]) -> Spread | None:
        if not values:
            return None
        return Spread(statistics.median(values), min(values), max(values))


def spread_text(spread: Spread | None, fmt: str = "%.3f") -> str:
    """`median (low – high)`, or `- (- – -)` when nothing was measured."""
    if spread is None:
        return f"{MISSING} ({MISSING} – {MISSING})"
    return f"{fmt % spread.median} ({fmt % spread.low} – {fmt % spread.high})"


def spread_median(spread: Spread | None, fmt: str = "%.3f") -> str:
    return MISSING if spread is None else fmt % spread.median


# --- results ---------------------------------------------------------------------------


Row = dict[str, str]


def read_results(path: Path) -> list[Row]:
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        fields = line.split("\t")
        fields += [""] * (len(RESULT_COLUMNS) - len(fields))
        rows.append(dict(zip(RESULT_COLUMNS, fields)))
    return rows


def summarize(rows: list[Row]) -> list[Row]:
    """One summary line per configuration, in order of first appearance."""
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row["group"], row["side"], row["clients"]), []).append(row)
    summary = []
    for (group, side, clients), rs in groups.items():

        def col(name: str) -> list[str]:
            return [r[name] for r in rs]

        def extreme(name: str, pick) -> str:
            present = [r[name] for r in rs if number(r[name]) is not None]
            return pick(present, key=float) if present else rs[0][name]

        errors = sum(number(r["errors"]) or 0 for r in rs)
        summary.append(
            {
                "group": group,
                "side": side,
                "clients": clients,
                "n": str(len(rs)),
                "rps": median_text(col("rps")),
                "rps_min": extreme("rps", min),
                "rps_max": extreme("rps", max),
                "p50": median_text(col("p50")),
                "p99": median_text(col("p99")),
                "errors": awk_text(errors),
                "rss": extreme("rss", max),
                "conns": extreme("conns", max),
                "stmts": median_text(col("stmts")),
                "pings": median_text(col("pings")),
                "svc_us": median_text(col("svc_us")),
                "pg_us": median_text(col("pg_us")),
                "client_us": median_text(col("client_us")),
                "foreign": median_text(col("foreign")),
                "sys_us": median_text(col("sys_us")),
            }
        )
    return summary


def lookup(summary: list[Row], group: str, side: str, clients, column: str) -> str:
    """A summary value, or "" when the configuration did not run."""
    for row in summary:
        if row["group"] == group and row["side"] == side and row["clients"] == str(clients):
            return row[column]
    return ""


def paired(rows: list[Row], group: str, a: str, ca, b: str, cb, measure: str) -> Spread | None:
    """Side A against side B within each repetition (adjacent slices), then the median and
    range over the repetitions.

    measure: `rps`, `p99` (A / B); `capacity` (B's total CPU per request over A's: the
    throughput ratio a machine with no other load would see if CPU is what limits);
    `layer` (the same for two sides that send the same statements: the cluster's and the
    client's CPU per request are the pair's mean, so that only the service's own CPU
    differs); `svc_diff` (A's service CPU per request minus B's, µs); `pg_us` (A's cluster
    CPU per request over B's). A repetition with a value missing on either side is left out.
    """

    def pick(group_side_clients) -> dict[str, tuple[float, float]]:
        g, s, c = group_side_clients
        out = {}
        for r in rows:
            if r["group"] != g or r["side"] != s or r["clients"] != str(c):
                continue
            svc = number(r["svc_us"])
            if measure == "rps":
                value = number(r["rps"])
            elif measure == "p99":
                value = number(r["p99"])
            elif measure == "svc_diff":
                value = svc
            elif measure == "pg_us":
                value = number(r["pg_us"])
            else:
                parts = [svc, number(r["pg_us"]), number(r["client_us"])]
                value = None if None in parts else sum(parts)
            if value is not None and (svc is not None or measure in ("rps", "p99", "pg_us")):
                out[r["rep"]] = (value, svc or 0.0)
        return out

    va, vb = pick((group, a, ca)), pick((group, b, cb))
    ratios = []
    for rep, (x, sx) in va.items():
        if rep not in vb:
            continue
        y, sy = vb[rep]
        if measure == "svc_diff":
            ratios.append(x - y)
        elif measure == "capacity":
            if x > 0:
                ratios.append(y / x)
        elif measure == "layer":
            rest = (x - sx + y - sy) / 2
            if sx + rest > 0:
                ratios.append((sy + rest) / (sx + rest))
        elif y > 0:
            ratios.append(x / y)
    return Spread.of(ratios)


def sweep_tail(rows: list[Row], last_level: str) -> Spread | None:
    """Within each sweep repetition, the last level's throughput over that repetition's
    peak; the median and range over the repetitions (the levels of one repetition run back
    to back, so a slow spell of the machine does not pit one's tail against another's peak)."""
    peak: dict[str, float] = {}
    tail: dict[str, float] = {}
    for r in rows:
        if r["group"] != "sweep" or (rps := number(r["rps"])) is None:
            continue
        peak[r["rep"]] = max(peak.get(r["rep"], 0.0), rps)
        if r["clients"] == last_level:
            tail[r["rep"]] = rps
    return Spread.of([tail[rep] / p for rep, p in peak.items() if p > 0 and rep in tail])


def ratio_of_medians(a: list[float], b: list[float]) -> float | None:
    """median(a) / median(b) (unpaired), None when either is empty or b's median is 0."""
    ma, mb = median(a), median(b)
    if ma is None or mb is None or mb == 0:
        return None
    return ma / mb


def verdict(value: str, op: str, target: float) -> str:
    v = number(value)
    if v is None:
        return "n/a"
    ok = v >= target if op == ">=" else v <= target if op == "<=" else v == target
    return "met" if ok else "**missed**"


# --- parsing one slice's output ----------------------------------------------------------


@dataclass(frozen=True)
class WrkSummary:
    rps: str
    p50: str
    p99: str
    errors: int
    requests: str


def parse_wrk(text: str) -> WrkSummary | None:
    """The last `WRK key=value ...` line that bench/wrk/report.lua writes."""
    lines = [line for line in text.splitlines() if line.startswith("WRK ")]
    if not lines:
        return None
    values = dict(field.split("=", 1) for field in lines[-1].split()[1:] if "=" in field)
    errors = int(number(values.get("non2xx")) or 0) + int(number(values.get("socket_errors")) or 0)
    return WrkSummary(
        values.get("rps", ""), values.get("p50_ms", ""), values.get("p99_ms", ""), errors,
        values.get("requests", "0"),
    )


@dataclass(frozen=True)
class PgbenchSummary:
    tps: str
    failed: str
    processed: str


def parse_pgbench(text: str) -> PgbenchSummary | None:
    """tps, failed and processed transactions from pgbench's summary; None without a tps."""

    def first(pattern: str) -> str | None:
        m = re.search(pattern, text, re.MULTILINE)
        return m.group(1) if m else None

    tps = first(r"^tps = ([0-9.]*) ")
    if not tps:
        return None
    return PgbenchSummary(
        tps,
        first(r"^number of failed transactions: ([0-9]*)") or "0",
        first(r"^number of transactions actually processed: ([0-9]*)") or "0",
    )


def latency_percentiles(latencies_us: list[float]) -> tuple[str, str]:
    """p50 and p99 in ms of pgbench's per-transaction latencies (µs): the value at rank
    int(n * p), counting from 1, at least the first."""
    v = sorted(latencies_us)

    def at(p: float) -> float:
        if not v:
            return 0.0
        return v[max(int(len(v) * p), 1) - 1]

    return f"{at(0.50) / 1000:.3f}", f"{at(0.99) / 1000:.3f}"


def read_pgbench_log(directory: Path) -> list[float]:
    """The latency column (third, µs) of pgbench's per-transaction logs."""
    out = []
    for f in sorted(directory.glob("log*")):
        for line in f.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3:
                out.append(float(fields[2]))
    return out


Statement = tuple[int, str]


def read_statements(path: Path) -> list[Statement]:
    out = []
    for line in path.read_text().splitlines():
        if "\t" in line:
            calls, query = line.split("\t", 1)
            out.append((int(float(calls)), query))
    return out


def write_statements(path: Path, statements: list[Statement]) -> None:
    path.write_text("".join(f"{c}\t{q}\n" for c, q in statements))


def pgbench_statements(statements: list[Statement]) -> list[Statement]:
    """PostgreSQL 15's pg_stat_statements counts a utility statement that pgbench prepared
    (BEGIN, COMMIT) only at its first execution on each connection; the script runs each
    once per transaction, so those two are counted from the transactions (the INSERT)
    instead, marked with `*`."""
    tx = next((c for c, q in statements if q.startswith('INSERT INTO "transfers"')), 0)
    return [
        (tx, q + " *") if q in ("BEGIN", "COMMIT") and c < tx else (c, q)
        for c, q in statements
    ]


@dataclass(frozen=True)
class PerRequest:
    requests: int
    stmts: str
    pings: str


READ_ANCHOR = re.compile(r'FROM "accounts" WHERE \("accounts"\."id" = \$1\)')


def per_request(statements: list[Statement]) -> PerRequest:
    """Requests, statements and pings per request. A request is anchored on the one
    statement each kind runs exactly once: the INSERT of a transfer, the single-account
    SELECT of a read."""
    total = sum(c for c, _ in statements)
    requests = sum(
        c for c, q in statements if q.startswith('INSERT INTO "transfers"') or READ_ANCHOR.search(q)
    )
    pings = sum(c for c, q in statements if q == "SELECT $1")
    if requests == 0:
        return PerRequest(0, MISSING, MISSING)
    return PerRequest(requests, f"{total / requests:.3f}", f"{pings / requests:.4f}")


METRIC_LINE = re.compile(r"^(\w+)\{([^}]*)\}\s+(\S+)")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def reads_by_target(metrics: str) -> dict[str, float]:
    """`db_reads_total` of a Prometheus text scrape, summed by its `target` label."""
    out: dict[str, float] = {}
    for line in metrics.splitlines():
        m = METRIC_LINE.match(line)
        if not m or m.group(1) != "db_reads_total":
            continue
        labels = dict(LABEL.findall(m.group(2)))
        target = labels.get("target", "")
        out[target] = out.get(target, 0.0) + (number(m.group(3)) or 0.0)
    return out


def replica_share(before: str, after: str) -> float | None:
    """The share of the reads between two scrapes that ran on a replica; None for none."""
    b, a = reads_by_target(before), reads_by_target(after)
    delta = {t: a.get(t, 0.0) - b.get(t, 0.0) for t in set(a) | set(b)}
    total = sum(delta.values())
    if total <= 0:
        return None
    return delta.get("replica", 0.0) / total


@dataclass(frozen=True)
class CpuPerRequest:
    svc_us: str
    pg_us: str
    client_us: str
    foreign_pct: str
    sys_us: str


def cpu_per_request(before: str, after: str, client_seconds: float, requests: float, clk_tck: int) -> CpuPerRequest:
    """From two snapshots "service_ticks service_sys_ticks cluster_ticks busy_ticks", the
    client's CPU seconds and the request count: µs per request of the service, the cluster
    and the client, and the share of the machine's busy time other processes took."""
    b = [float(x) for x in before.split()]
    a = [float(x) for x in after.split()]
    svc, sys_, pg, busy = ((a[i] - b[i]) / clk_tck for i in range(4))
    foreign = max(busy - svc - pg - client_seconds, 0.0)
    if requests == 0 or busy <= 0:
        return CpuPerRequest(*[MISSING] * 5)
    return CpuPerRequest(
        f"{svc * 1e6 / requests:.0f}", f"{pg * 1e6 / requests:.0f}",
        f"{client_seconds * 1e6 / requests:.0f}", f"{100 * foreign / busy:.0f}",
        f"{sys_ * 1e6 / requests:.0f}",
    )


def client_cpu_seconds(timed: str) -> float:
    """User + system seconds from bash's `time` (TIMEFORMAT='%3U %3S'): the last line; the
    command's own stderr may come before it."""
    lines = [line for line in timed.splitlines() if line.strip()]
    if not lines:
        return 0.0
    return sum(fnum(field) for field in lines[-1].split()[:2])


def printf_fixed(text: str, digits: int) -> str:
    """`printf '%.<digits>f'` as bash's builtin writes a measured field: bash reads it as a
    long double (x86-64: a 64-bit mantissa) and rounds that binary value, so a decimal tie
    such as 74.455 may round up where a double would round down. Kept so that the table's
    figures are the ones the shell report printed; missing counts as 0, as printf does."""
    try:
        x = Decimal(text)
    except InvalidOperation:
        x = Decimal(0)
    if not x.is_finite() or x == 0:
        return f"{0:.{digits}f}"
    with localcontext() as ctx:
        ctx.prec = 400
        magnitude = abs(x)
        e = math.floor(math.log2(float(magnitude))) - 63
        while magnitude / Decimal(2) ** e >= 2**64:
            e += 1
        while magnitude / Decimal(2) ** e < 2**63:
            e -= 1
        mantissa = (magnitude / Decimal(2) ** e).to_integral_value(ROUND_HALF_EVEN)
        value = mantissa * Decimal(2) ** e
        shown = value.quantize(Decimal(1).scaleb(-digits), ROUND_HALF_EVEN)
    return f"{'-' if x < 0 else ''}{shown:f}"


def fnum(text: str) -> float:
    """A field for a log line's `%f`: missing counts as 0, as printf does."""
    return number(text) or 0.0


def slice_command(args: argparse.Namespace) -> int:
    output = Path(args.output).read_text(errors="replace")
    stmts_path = Path(args.stmts)
    statements = read_statements(stmts_path)
    client_seconds = client_cpu_seconds(Path(args.client_cpu).read_text())
    if args.kind == "wrk":
        wrk = parse_wrk(output)
        if wrk is None:
            sys.stderr.write(output)
            log("no summary line from wrk")
            return 1
        rps, p50, p99, errors, requests = wrk.rps, wrk.p50, wrk.p99, str(wrk.errors), wrk.requests
        rss, conns = args.rss, args.conns
    else:
        pgb = parse_pgbench(output)
        if pgb is None:
            sys.stderr.write(output)
            log("no tps from pgbench")
            return 1
        statements = pgbench_statements(statements)
        write_statements(stmts_path, statements)
        rps, errors, requests = pgb.tps, pgb.failed, pgb.processed
        p50, p99 = latency_percentiles(read_pgbench_log(Path(args.latency_log_dir)))
        rss, conns = MISSING, args.clients
    share = MISSING
    if args.metrics_before and args.metrics_after:
        value = replica_share(Path(args.metrics_before).read_text(), Path(args.metrics_after).read_text())
        share = MISSING if value is None else f"{value:.4f}"
        if args.min_replica_share is not None and (value is None or value < args.min_replica_share):
            log(f"{args.group} {args.side} rep {args.rep}: {share} of the reads ran on the replica, "
                f"fewer than {args.min_replica_share:.0%} (db_reads_total in {args.metrics_after})")
            return 1
    counts = per_request(statements)
    cpu = cpu_per_request(args.before, args.after, client_seconds, number(requests) or 0, args.clk_tck)
    svc_us, sys_us = (cpu.svc_us, cpu.sys_us) if args.kind == "wrk" else ("0", "0")
    fields = [
        args.group, args.side, args.clients, args.rep, rps, p50, p99, errors, rss, conns,
        counts.stmts, counts.pings, str(counts.requests), svc_us, cpu.pg_us, cpu.client_us,
        cpu.foreign_pct, sys_us, share,
    ]
    print("\t".join(fields))
    head = f"{args.group:<8} {args.side:<8} c={args.clients:<4} rep {args.rep}: "
    if args.kind == "wrk":
        log(
            head + f"{fnum(rps):7.0f} req/s p50 {fnum(p50):6.2f} p99 {fnum(p99):7.2f} ms err {errors} "
            f"stmts {counts.stmts} RSS {rss} KiB conns {conns} CPU us/req svc {cpu.svc_us} "
            f"pg {cpu.pg_us} wrk {cpu.client_us} foreign {cpu.foreign_pct}%"
            + ("" if share == MISSING else f" on the replica {share}")
        )
    else:
        log(
            head + f"{fnum(rps):7.0f} tx/s  p50 {fnum(p50):6.2f} p99 {fnum(p99):7.2f} ms err {errors} "
            f"stmts {counts.stmts} CPU us/tx pg {cpu.pg_us} pgbench {cpu.client_us} "
            f"foreign {cpu.foreign_pct}%"
        )
    return 0


# --- the report --------------------------------------------------------------------------


def read_meta(out: Path) -> dict[str, str]:
    meta = {}
    path = out / "meta.tsv"
    if path.exists():
        for line in path.read_text().splitlines():
            key, _, value = line.partition("\t")
            meta[key] = value
    return meta


SIDE_LABELS = {
    "pgbench": "pgbench (no HTTP)",
    "session": "service (DbSession)",
    "baseline": "hand-written baseline",
    "nocache": "service, `DB_STATEMENT_CACHE=false`",
    "defaults": "service, defaults",
    "peer": "axum + sqlx + axum-sqlx-tx peer",
    "primary": "service, primary only",
    "replica": "service, one streaming replica",
}


def mib(kib: str) -> str:
    v = number(kib)
    return MISSING if v is None else f"{v / 1024:.1f}"


def spread_pct(low: str, high: str, med: str) -> str:
    m = fnum(med)
    if m == 0:
        return MISSING
    return f"±{50 * (fnum(high) - fnum(low)) / m:.1f} %"


def table(summary: list[Row]) -> list[str]:
    lines = [
        "| workload | side | HTTP clients | DB conns | req/s (median) | min – max | spread | p50 ms | p99 ms | non-2xx | peak RSS MiB | statements/req | pings/req | CPU µs/req: service | PostgreSQL | client | foreign CPU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary:
        clients, svc = r["clients"], r["svc_us"]
        if r["side"] == "pgbench":
            clients = svc = "–"
        label = SIDE_LABELS.get(r["side"], r["side"])
        lines.append(
            f"| {r['group']} | {label} | {clients} | {r['conns']} | {printf_fixed(r['rps'], 0)} | "
            f"{printf_fixed(r['rps_min'], 0)} – {printf_fixed(r['rps_max'], 0)} | "
            f"{spread_pct(r['rps_min'], r['rps_max'], r['rps'])} | {printf_fixed(r['p50'], 2)} | "
            f"{printf_fixed(r['p99'], 2)} | {r['errors']} | {mib(r['rss'])} | {r['stmts']} | {r['pings']} | "
            f"{svc} | {r['pg_us']} | {r['client_us']} | {r['foreign']} % |"
        )
    return lines


class Report:
    """The results section of BENCHMARKS.md from one results directory."""

    def __init__(self, out: Path):
        self.out = out
        self.meta = read_meta(out)
        self.rows = read_results(out / "results.tsv")
        self.summary = summarize(self.rows)
        m = self.meta
        self.clients = m.get("clients", "")
        self.conns = m.get("conns", "")
        self.reps = m.get("reps", "")
        self.sweep = m.get("sweep", "").split()
        self.cores = m.get("nproc", "")

    def get(self, group: str, side: str, clients, column: str) -> str:
        return lookup(self.summary, group, side, clients, column)

    def pair(self, group: str, a: str, b: str, measure: str, cb=None) -> Spread | None:
        return paired(self.rows, group, a, self.clients, b, self.clients if cb is None else cb, measure)

    def target_row(self, what: str, spread: Spread | None, op: str | None = None, goal: float | None = None, fmt="%.3f") -> str:
        if op is None:
            return f"| {what} | {spread_text(spread, fmt)} | | |"
        shown = f"{goal:.2f}"
        return f"| {what} | {spread_text(spread, fmt)} | {op.replace('>=', '≥').replace('<=', '≤')} {shown} | {verdict(spread_median(spread, fmt), op, goal)} |"

    def statement_counts(self) -> dict[str, str]:
        c, p = self.clients, self.conns
        return {
            "tx_s": self.get("transfer", "session", c, "stmts"),
            "tx_b": self.get("transfer", "baseline", c, "stmts"),
            "tx_p": self.get("transfer", "pgbench", p, "stmts"),
            "rd_s": self.get("read", "session", c, "stmts"),
            "rd_b": self.get("read", "baseline", c, "stmts"),
            "ping_rd_s": self.get("read", "session", c, "pings"),
            "ping_tx_s": self.get("transfer", "session", c, "pings"),
        }

    def targets(self) -> list[str]:
        c, p = self.clients, self.conns
        st = self.statement_counts()
        s, b = number(st["tx_s"]), number(st["tx_b"])
        tx_extra = MISSING if s is None or b is None else f"{s - b:.3f}"
        last = self.sweep[-1] if self.sweep else ""
        sweep_errors = sum(int(fnum(self.get("sweep", "session", level, "errors"))) for level in self.sweep)
        tail = sweep_tail(self.rows, last)
        tail_text = MISSING if tail is None else spread_text(tail)
        rss_last = f"{fnum(self.get('sweep', 'session', last, 'rss')) / 1024:.1f}"
        pair = self.pair
        return [
            f"| target | measured: median (range) over the {self.reps} repetitions | goal | |",
            "|---|---:|---:|---|",
            self.target_row("transfer req/s, session / baseline", pair("transfer", "session", "baseline", "rps"), ">=", 0.97),
            self.target_row("transfer p99, session / baseline", pair("transfer", "session", "baseline", "p99"), "<=", 1.10),
            self.target_row("read req/s, session / baseline", pair("read", "session", "baseline", "rps"), ">=", 0.97),
            self.target_row("read p99, session / baseline", pair("read", "session", "baseline", "p99"), "<=", 1.10),
            self.target_row("90/10 mix req/s, session / baseline", pair("mix", "session", "baseline", "rps"), ">=", 0.97),
            self.target_row("90/10 mix p99, session / baseline", pair("mix", "session", "baseline", "p99"), "<=", 1.10),
            self.target_row("transfer req/s, service / pgbench tx/s", pair("transfer", "session", "pgbench", "rps", p), ">=", 0.85),
            self.target_row("(for reference) transfer req/s, baseline / pgbench tx/s", pair("transfer", "baseline", "pgbench", "rps", p)),
            self.target_row("in CPU time (robust to other load): transfer capacity, session / baseline¹", pair("transfer", "session", "baseline", "layer"), ">=", 0.97),
            self.target_row("in CPU time: read capacity, session / baseline¹", pair("read", "session", "baseline", "layer"), ">=", 0.97),
            self.target_row("in CPU time: 90/10 mix capacity, session / baseline¹", pair("mix", "session", "baseline", "layer"), ">=", 0.97),
            self.target_row("in CPU time: transfer capacity, service / pgbench²", pair("transfer", "session", "pgbench", "capacity", p), ">=", 0.85),
            self.target_row("service CPU per request, session − baseline, µs: transfer", pair("transfer", "session", "baseline", "svc_diff"), fmt="%.0f"),
            self.target_row("service CPU per request, session − baseline, µs: read", pair("read", "session", "baseline", "svc_diff"), fmt="%.0f"),
            f"| statements per transfer, session − baseline (session {st['tx_s']}, baseline {st['tx_b']}, pgbench {st['tx_p']}): the transaction-id query pipelined with COMMIT, no round trip | {tx_extra} | ≤ 1 | {verdict(tx_extra, '<=', 1.005)} |",
            f"| pings per read inside a session | {st['ping_rd_s']} | 0 | {verdict(st['ping_rd_s'], '<=', 0.001)} |",
            f"| errors (non-2xx and socket) over the whole sweep | {sweep_errors} | 0 | {verdict(str(sweep_errors), '<=', 0)} |",
            f"| req/s at {last} clients / the peak of the same sweep repetition | {tail_text} | ≥ 0.90 | {verdict(spread_median(tail), '>=', 0.90)} |",
            f"| peak RSS at {last} clients (MiB) | {rss_last} | ≤ 50 | {verdict(rss_last, '<=', 50)} |",
            self.target_row("(the cost of PgBouncer's transaction mode) transfer req/s, `DB_STATEMENT_CACHE=false` / session", pair("transfer", "nocache", "session", "rps")),
            self.target_row("in CPU time: transfer capacity, `DB_STATEMENT_CACHE=false` / session²", pair("transfer", "nocache", "session", "capacity")),
            self.target_row("service CPU per transfer, `DB_STATEMENT_CACHE=false` − session, µs", pair("transfer", "nocache", "session", "svc_diff"), fmt="%.0f"),
            self.target_row("read req/s, `DB_STATEMENT_CACHE=false` / session", pair("read", "nocache", "session", "rps")),
            self.target_row("in CPU time: read capacity, `DB_STATEMENT_CACHE=false` / session²", pair("read", "nocache", "session", "capacity")),
            self.target_row("service CPU per read, `DB_STATEMENT_CACHE=false` − session, µs", pair("read", "nocache", "session", "svc_diff"), fmt="%.0f"),
            "",
            "¹ The throughput a machine with no other load would reach if CPU is what limits it: the total CPU per",
            "request of the baseline over the session's, where the cluster's and wrk's share is the pair's mean (both",
            "sides send the same statements, below), so that only the service's own CPU differs.",
            "² The same with every share as measured: (PostgreSQL + pgbench) over (PostgreSQL + service + wrk); for",
            "`DB_STATEMENT_CACHE=false`, (PostgreSQL + service + wrk) of the session over the same of that side: the",
            "server's extra work (a parse and a plan per statement) counts too.",
        ]

    def outside(self) -> list[str]:
        if not self.meta.get("outside_sides"):
            return ["(not measured in this run: a smoke run does not build the peer)"]
        lines = [
            f"| target | measured: median (range) over the {self.reps} repetitions | goal | |",
            "|---|---:|---:|---|",
        ]
        for group, what, goal in (
            ("transfer", "transfer (`POST /transfers`)", 1.10),
            ("read", "read (`GET /accounts/{id}`)", 1.30),
        ):
            lines.append(self.target_row(f"{what} req/s, service defaults / peer", self.pair(group, "defaults", "peer", "rps"), ">=", goal))
            lines.append(self.target_row(f"{what} p99, service defaults / peer", self.pair(group, "defaults", "peer", "p99"), "<=", 1.00))
        for group in ("transfer", "read"):
            lines.append(self.target_row(f"(for reference) {group} req/s, service as configured above / peer", self.pair(group, "session", "peer", "rps")))
        return lines

    def replica_shares(self) -> list[float | None]:
        return [number(r["replica_share"]) for r in self.rows if r["group"] == "replica" and r["side"] == "replica"]

    def replica(self) -> list[str]:
        """Reads with one streaming replica against the primary alone."""
        shares = self.replica_shares()
        if not shares:
            return ["(not measured in this run)"]
        present = [v for v in shares if v is not None]
        lowest = f"{100 * min(present):.1f} %" if len(present) == len(shares) else MISSING
        return [
            f"| measure | median (range) over the {self.reps} repetitions |",
            "|---|---:|",
            f"| read req/s, replica / primary | {spread_text(self.pair('replica', 'replica', 'primary', 'rps'))} |",
            f"| read p99, replica / primary | {spread_text(self.pair('replica', 'replica', 'primary', 'p99'))} |",
            f"| reads that ran on the replica, lowest slice | {lowest} |",
        ]

    def pinned(self) -> list[str]:
        """Close to the database's limit: the cluster on one CPU, the rest on the other."""
        c, p = self.clients, self.conns

        def side_values(side: str, clients) -> Spread | None:
            return Spread.of([v for r in self.rows
                              if r["group"] == "pinned" and r["side"] == side and r["clients"] == str(clients)
                              and (v := number(r["pg_us"])) is not None])

        if not any(r["group"] == "pinned" for r in self.rows):
            return ["(not measured in this run)"]
        return [
            f"| measure | median (range) over the {self.reps} repetitions |",
            "|---|---:|",
            f"| transfer req/s, service / pgbench tx/s | {spread_text(self.pair('pinned', 'session', 'pgbench', 'rps', p))} |",
            f"| PostgreSQL CPU per transfer, under the service / under pgbench | {spread_text(self.pair('pinned', 'session', 'pgbench', 'pg_us', p))} |",
            f"| PostgreSQL CPU µs per transfer under the service | {spread_text(side_values('session', c), '%.0f')} |",
            f"| PostgreSQL CPU µs per transfer under pgbench | {spread_text(side_values('pgbench', p), '%.0f')} |",
        ]

    def cpu_budget(self) -> list[str]:
        """The pgbench comparison in CPU time (medians, µs per transfer): what each side
        costs the machine, and what the service could spend for the 0.85 target."""
        c, p = self.clients, self.conns
        pp = number(self.get("transfer", "pgbench", p, "pg_us"))
        ps = number(self.get("transfer", "session", c, "pg_us"))
        if pp is None or ps is None:
            return ["(not measured in this run)"]
        cp = fnum(self.get("transfer", "pgbench", p, "client_us"))
        ss = fnum(self.get("transfer", "session", c, "svc_us"))
        ys = fnum(self.get("transfer", "session", c, "sys_us"))
        cs = fnum(self.get("transfer", "session", c, "client_us"))
        cores = fnum(self.cores)
        tp, ts = pp + cp, ps + ss + cs
        if tp <= 0 or ts <= 0:
            return ["(not measured in this run)"]
        budget = tp / 0.85 - ps - cs
        return [
            f"| per transfer, CPU µs (medians) | PostgreSQL | client side | total | capacity of {self.cores} cores |",
            "|---|---:|---:|---:|---:|",
            "| pgbench | %d | %d (pgbench) | %d | %.0f tx/s |" % (pp, cp, tp, cores * 1e6 / tp),
            "| service | %d | %d (service, %d of it in the kernel) + %d (wrk) | %d | %.0f req/s |"
            % (ps, ss, ys, cs, ts, cores * 1e6 / ts),
            "",
            "CPU-bound ratio: %.2f. For 0.85 the service could spend at most %d µs per transfer (%d µs / 0.85,"
            % (tp / ts, budget, tp),
            "minus PostgreSQL's and wrk's share); it spends %d µs, %d µs of them in the kernel alone (the HTTP" % (ss, ys),
            "socket and five PostgreSQL round trips). pgbench has neither HTTP, JSON nor a load generator of its own",
            "in front, and on this machine all three share the same cores with PostgreSQL.",
        ]

    def statements(self, tag: str, title: str) -> list[str]:
        """What the server received per request in the first repetition of a slice."""
        path = self.out / "stmts" / f"{tag}-r1.tsv"
        if not path.exists():
            return []
        statements = read_statements(path)
        n = per_request(statements).requests
        lines = [f"{title} ({n} requests):", "", "| per request | statement |", "|---:|---|"]
        for calls, query in statements:
            if len(query) > 160:
                query = query[:157] + "..."
            query = query.replace("|", "\\|")
            shown = f"{calls / n:.3f}" if n else MISSING
            lines.append(f"| {shown} | `{query}` |")
        lines.append("")
        return lines

    def chart_data(self) -> str:
        def g(level: str, column: str) -> str:
            return self.get("sweep", "session", level, column)

        return "".join(
            f"{level} {g(level, 'rps')} {g(level, 'rps_min')} {g(level, 'rps_max')} {g(level, 'p99')}\n"
            for level in self.sweep
        )

    def results_section(self) -> list[str]:
        m = self.meta
        c, p = self.clients, self.conns
        local = " (with local changes)" if m.get("local_changes") == "1" else ""
        mem_gib = f"{fnum(m.get('mem_mib', '')) / 1024:.0f} GiB RAM"
        lines = [
            "<!-- bench:results:begin (written by scripts/bench.sh; edit outside the markers) -->",
            f"Measured {m.get('measured_at', '')} on {self.cores} cores ({m.get('cpu_model', '')}),",
            f"{mem_gib}, {m.get('uname', '')}, PostgreSQL {m.get('pg_version', '')}, {m.get('wrk_version', '')},",
            f"commit `{m.get('commit', 'unknown')}`{local}.",
            f"Shared machine: load average {m.get('load_before', '')} before, {m.get('load_after', '')} after; the whole run took {m.get('elapsed', '')} s.",
            "",
            f"Service: `DB_POOL_SIZE={m.get('pool_size', '')} DB_MAX_OVERFLOW={m.get('max_overflow', '')}` ({p} connections), `HTTP_WORKERS={m.get('workers', '')}`,",
            f"`RUST_LOG={m.get('log_level', '')}` (access log on, to a file), release build with `--features bench`, a fresh process",
            f"for every slice. pgbench: `-M prepared -c {p} -j 1`, no HTTP. wrk: one thread, `HTTP clients` connections.",
            f"Comparisons: {self.reps} repetitions, each running every side for {m.get('duration', '')} s after a {m.get('warmup', '')} s warm-up, the order",
            f"flipping between repetitions (A B, B A, ...); the sweep: {m.get('sweep_reps', '')} repetitions. The table shows the median,",
            "the range and the spread (half the range over the median). `DB conns`: the most server connections the",
            "process held (pool and readiness probe); `peak RSS`: its VmHWM. `statements/req`: from",
            "pg_stat_statements, reset after the warm-up, divided by the requests the server saw; `pings/req`: of those,",
            "`SELECT 1` check-out pings. `CPU µs/req`: user and system time per request of the service process, of",
            "the whole cluster and of the load generator; `foreign CPU`: the share of the machine's busy time that",
            "went to other processes during the slice.",
            "",
            *table(self.summary),
            "",
            "### Targets",
            "",
            *self.targets(),
            "",
            "### Out of the box: the service against an axum + sqlx + axum-sqlx-tx peer",
            "",
            "`service, defaults`: the same binary with no `HTTP_WORKERS`, `DB_POOL_SIZE`, `DB_MAX_OVERFLOW` or",
            f"`RUST_LOG` set ({self.cores} workers here, 5 + 10 connections, access log on), as a user starts it. `peer`:",
            "bench/peer, the same routes and SQL on axum, sqlx and axum-sqlx-tx as their documentation shows (sqlx pool",
            "5 to 15 connections, Tokio's default runtime, no per-request logging), release build. Both run in the",
            "same interleaved slices as the sides above; the ratios are paired within each repetition.",
            "",
            *self.outside(),
            "",
            "### Reads from a streaming replica (`GET /accounts/{id}`)",
            "",
            "`service, one streaming replica`: the service as configured above with `DATABASE_REPLICA_URLS` naming",
            "one hot standby of the bench cluster (`scripts/pg.sh replica`: pg_basebackup, streaming, on the same",
            "machine); `service, primary only`: the same without it. Both run in the same interleaved slices; the",
            "ratios are paired within each repetition. The reads that ran on the replica are the slice's",
            "`db_reads_total{target=\"replica\"}` over all its reads (below 99 % the run fails); its statements",
            "in the table are the replica's, its `DB conns` those to the primary, and the replica's CPU counts as",
            "`foreign CPU`: the standby shares this machine's two cores with the primary, so the ratio says what a",
            "replica on the same host costs or gains, not what one on a host of its own would add.",
            "",
            *self.replica(),
            "",
            "### Close to the database's limit: the cluster on a CPU of its own",
            "",
            "The cluster pinned with `taskset` to CPU 0 (the postmaster and its children, the backends inherit it;",
            "the replica runs during the replica slices only),",
            "the service and its wrk, or pgbench, to CPU 1; `POST /transfers` through the service against the",
            f"transfer's SQL through pgbench (`-M prepared -c {p} -j 1`), the same {p} server connections, in",
            "interleaved slices (the `pinned` rows of the table). PostgreSQL has a core to itself whichever side",
            "drives it, so the ratio says how close the service comes to the database's own limit; the CPU the",
            "cluster spends per transfer (its processes' user and system time from `/proc`) says whether the",
            "service makes the server work harder per transfer than pgbench does.",
            "",
            *self.pinned(),
            "",
            "### The pgbench ratio in CPU time",
            "",
            *self.cpu_budget(),
            "",
            "### Round trips: what the server received (first run of each)",
            "",
            *self.statements(f"transfer-session-c{c}", "Transfer through the service (`POST /transfers`)"),
            *self.statements(f"transfer-baseline-c{c}", "Transfer through the hand-written baseline"),
            *self.statements(f"transfer-pgbench-c{p}", "Transfer through pgbench"),
            *self.statements(f"read-session-c{c}", "Read through the service (`GET /accounts/{id}`)"),
            *self.statements(f"read-baseline-c{c}", "Read through the hand-written baseline"),
            *self.statements(f"transfer-peer-c{c}", "Transfer through the peer"),
            *self.statements(f"read-peer-c{c}", "Read through the peer"),
            "\\* Counted from pgbench's transactions: PostgreSQL 15's pg_stat_statements counts a BEGIN or COMMIT",
            "that pgbench prepared only at its first execution on each connection.",
            "",
            "### Concurrency sweep (`POST /transfers`)",
            "",
            f"![throughput and p99 versus client connections]({m.get('chart_link', '')})",
            "<!-- bench:results:end -->",
        ]
        return lines


def merge_into(report: Path, section: str) -> None:
    """Replace the text between the report's markers, or start a report with the section."""
    if report.exists() and "<!-- bench:results:begin" in (text := report.read_text()):
        out, skip = [], False
        for line in text.splitlines(keepends=True):
            if "<!-- bench:results:begin" in line:
                out.append(section)
                skip = True
            elif "<!-- bench:results:end" in line:
                skip = False
            elif not skip:
                out.append(line)
        report.write_text("".join(out))
    else:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text("# Benchmarks\n\n" + section)


def summary_tsv(summary: list[Row]) -> str:
    return "".join("\t".join(r[c] for c in SUMMARY_COLUMNS) + "\n" for r in summary)


def report_command(args: argparse.Namespace) -> int:
    out = Path(args.results)
    report = Report(out)
    (out / "summary.tsv").write_text(summary_tsv(report.summary))
    (out / "sweep.dat").write_text(report.chart_data())
    section = "\n".join(report.results_section()) + "\n"
    (out / "results.md").write_text(section)
    target = report.meta.get("report")
    if target:
        merge_into(Path(target), section)
    print()
    print("\n".join(table(report.summary)))
    print()
    print("\n".join(report.targets()))
    print()
    print("\n".join(report.outside()))
    print()
    return 0


# --- the smoke checks ----------------------------------------------------------------------


def all_numbers(*values: str) -> list[float] | None:
    """The values as numbers if every one is a plain decimal, else None."""
    if all(re.fullmatch(r"-?[0-9]+([.][0-9]+)?", v or "") for v in values):
        return [float(v) for v in values]
    return None


def holds(condition, *values: str) -> bool:
    v = all_numbers(*values)
    return v is not None and bool(condition(*v))


def expected_transfer_statements(script: Path = PGBENCH_SCRIPT) -> int:
    """The pgbench script's statement count: the reference a transfer must not exceed."""
    return sum(
        1 for line in script.read_text().splitlines()
        if re.match(r"(BEGIN|SELECT|UPDATE|INSERT|COMMIT)", line)
    )


@dataclass(frozen=True)
class CommitCheck:
    """One-at-a-time requests of the smoke run and the statements they caused."""

    ok: str
    other: str
    commits: str
    rollbacks: str
    inserts: str
    transfers_ok: str


def commit_check(out: Path) -> CommitCheck:
    counts_path = out / "run" / "commit-check.counts"
    stmts_path = out / "stmts" / "commit-check.tsv"
    ok, other, transfers_ok = (counts_path.read_text().split() + ["", "", ""])[:3] if counts_path.exists() else ("", "", "")
    statements = read_statements(stmts_path) if stmts_path.exists() else []
    commits = sum(c for c, q in statements if q == "COMMIT")
    rollbacks = sum(c for c, q in statements if q == "ROLLBACK")
    inserts = sum(c for c, q in statements if q.startswith('INSERT INTO "transfers"'))
    return CommitCheck(ok, other, str(commits), str(rollbacks), str(inserts), transfers_ok)


def checks(out: Path) -> list[tuple[str, bool]]:
    report = Report(out)
    meta, rows = report.meta, report.rows
    st = report.statement_counts()
    expected = str(expected_transfer_statements())
    cc = commit_check(out)
    chart = Path(meta.get("chart", ""))
    report_path = Path(meta.get("report", ""))
    runs = meta.get("runs", "")
    return [
        (f"one result line per run ({runs})", holds(lambda a, b: a == b, str(len(rows)), runs)),
        ("every run parsed with throughput > 0",
         bool(rows) and all(fnum(r["rps"]) > 0 and r["p99"] != "" for r in rows)),
        ("no errors in any run", all(number(r["errors"]) == 0 for r in rows)),
        (f"pgbench runs {expected} statements per transfer ({st['tx_p']})",
         holds(lambda a, b: a == b, st["tx_p"], expected)),
        # The session adds one statement to every transaction: the transaction-id query
        # pipelined ahead of COMMIT (the session crate's session/commit.rs), which costs no
        # round trip.
        (f"a transfer through the session costs {expected} statements and the id query besides pings ({st['tx_s']}, pings {st['ping_tx_s']})",
         holds(lambda s, p, e: e + 0.999 < s - p < e + 1.001, st["tx_s"], st["ping_tx_s"], expected)),
        (f"every 2xx committed: COMMITs = 2xx ({cc.commits}, {cc.ok}); transfer INSERTs = 2xx transfers ({cc.inserts}, {cc.transfers_ok})",
         holds(lambda c, o, i, t: c == o and i == t and t > 0 and o > t, cc.commits, cc.ok, cc.inserts, cc.transfers_ok)),
        (f"every other answer rolled back: ROLLBACKs = non-2xx ({cc.rollbacks}, {cc.other})",
         holds(lambda r, o: r == o and o > 0, cc.rollbacks, cc.other)),
        (f"the baseline transfer costs one fewer: no id query ({st['tx_b']})",
         holds(lambda b, s: 0.95 < s - b < 1.05, st["tx_b"], st["tx_s"])),
        # A read runs read-only: no transaction id to learn, so no id query either.
        (f"a read costs BEGIN READ ONLY, SELECT, COMMIT and no ping, as the baseline (session {st['rd_s']}, pings {st['ping_rd_s']}; baseline {st['rd_b']})",
         holds(lambda s, p, b: 2.999 < s - p < 3.001 and p < 0.01 and b < 3.05, st["rd_s"], st["ping_rd_s"], st["rd_b"])),
        (f"the replica side ran, 99 % of its reads on the replica ({', '.join(MISSING if v is None else f'{v:.4f}' for v in report.replica_shares())})",
         bool(report.replica_shares()) and all(v is not None and v >= 0.99 for v in report.replica_shares())),
        ("the pinned group ran both sides",
         {r["side"] for r in rows if r["group"] == "pinned"} == {"session", "pgbench"}),
        ("the chart was drawn", chart.is_file() and chart.stat().st_size > 0 and "<svg" in chart.read_text(errors="replace")),
        ("the report and its tables were written",
         report_path.is_file() and "| transfer req/s, session / baseline |" in report_path.read_text()),
    ]


def check_command(args: argparse.Namespace) -> int:
    failed = False
    for description, ok in checks(Path(args.results)):
        log(("ok: " if ok else "FAILED: ") + description)
        failed |= not ok
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("slice", help="one slice's line of results.tsv")
    s.add_argument("kind", choices=("wrk", "pgbench"))
    for name in ("group", "side", "clients", "rep"):
        s.add_argument(name)
    s.add_argument("--output", required=True, help="wrk's or pgbench's output")
    s.add_argument("--stmts", required=True, help="calls<TAB>statement since the reset")
    s.add_argument("--before", required=True, help="CPU snapshot before (ticks)")
    s.add_argument("--after", required=True, help="CPU snapshot after (ticks)")
    s.add_argument("--client-cpu", required=True, help="file with the client's CPU seconds")
    s.add_argument("--clk-tck", type=int, required=True)
    s.add_argument("--conns", default="0", help="most server connections held")
    s.add_argument("--rss", default=MISSING, help="peak RSS, KiB")
    s.add_argument("--latency-log-dir", default=".", help="pgbench's per-transaction logs")
    s.add_argument("--metrics-before", help="the service's /metrics before the measurement")
    s.add_argument("--metrics-after", help="the service's /metrics after it")
    s.add_argument("--min-replica-share", type=float,
                   help="fail unless this share of the reads ran on the replica")
    s.set_defaults(run=slice_command)
    r = sub.add_parser("report", help="the report from a results directory")
    r.add_argument("results")
    r.set_defaults(run=report_command)
    c = sub.add_parser("check", help="the smoke run's checks")
    c.add_argument("results")
    c.set_defaults(run=check_command)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
