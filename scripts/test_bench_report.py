"""Tests of scripts/bench_report.py: the statistics, the parsing of wrk's and pgbench's
output, and the report from a small results directory.

    python3 -m unittest scripts/test_bench_report.py
"""

import sys
import tempfile
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_report as br  # noqa: E402

WRK_OUTPUT = """\
Running 2s test @ http://127.0.0.1:24001
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     8.90ms    2.11ms  31.20ms   80.12%
    Req/Sec     3.58k   201.33     3.90k    70.00%
  7160 requests in 2.00s, 2.10MB read
Requests/sec:   3579.41
Transfer/sec:      1.05MB
WRK requests=7160 seconds=2.000 rps=3580.0 p50_ms=8.781 p99_ms=16.850 non2xx=2 socket_errors=1
"""

PGBENCH_OUTPUT = """\
pgbench (15.20 (Debian 15.20-0+deb12u1))
transaction type: bench/pgbench/transfer.sql
scaling factor: 1
query mode: prepared
number of clients: 8
number of threads: 1
maximum number of tries: 1
duration: 2 s
number of transactions actually processed: 12740
number of failed transactions: 3 (0.024%)
latency average = 1.255 ms
initial connection time = 10.123 ms
tps = 6373.213456 (without initial connection time)
"""


def row(group, side, clients, rep, rps, p99="10.0", svc="100", pg="200", client="30", **extra):
    """A results.tsv row with the fields the statistics read."""
    r = dict.fromkeys(br.RESULT_COLUMNS, "0")
    r.update(group=group, side=side, clients=str(clients), rep=str(rep), rps=str(rps),
             p99=str(p99), svc_us=str(svc), pg_us=str(pg), client_us=str(client))
    r.update(extra)
    return r


class Statistics(unittest.TestCase):
    def test_median_of_an_odd_count_is_the_middle_value(self):
        self.assertEqual(br.median([5.0, 1.0, 3.0]), 3.0)

    def test_median_of_an_even_count_is_the_mean_of_the_middle_two(self):
        self.assertEqual(br.median([4.0, 1.0, 3.0, 2.0]), 2.5)

    def test_median_of_nothing_is_none(self):
        self.assertIsNone(br.median([]))

    def test_range_is_smallest_and_largest(self):
        self.assertEqual(br.value_range([3.0, -1.0, 7.5]), (-1.0, 7.5))
        self.assertIsNone(br.value_range([]))

    def test_median_text_keeps_the_measured_field_for_an_odd_count(self):
        self.assertEqual(br.median_text(["7.000", "6.000", "8.000"]), "7.000")

    def test_median_text_computes_the_mean_for_an_even_count_as_awk_printed_it(self):
        self.assertEqual(br.median_text(["7.000", "7.000"]), "7")
        self.assertEqual(br.median_text(["1.5", "2.0"]), "1.75")

    def test_median_text_leaves_missing_fields_out(self):
        self.assertEqual(br.median_text(["-", "5", "", "9", "7"]), "7")
        self.assertEqual(br.median_text(["-", ""]), "-")

    def test_paired_ratio_is_taken_within_each_repetition_then_the_median(self):
        rows = [
            row("read", "session", 32, 1, 900), row("read", "baseline", 32, 1, 1000),
            row("read", "baseline", 32, 2, 500), row("read", "session", 32, 2, 475),
            row("read", "session", 32, 3, 1100), row("read", "baseline", 32, 3, 1000),
        ]
        spread = br.paired(rows, "read", "session", 32, "baseline", 32, "rps")
        self.assertAlmostEqual(spread.median, 0.95)
        self.assertAlmostEqual(spread.low, 0.90)
        self.assertAlmostEqual(spread.high, 1.10)
        # Unpaired, the slow second repetition would pull the ratio of medians elsewhere.
        self.assertAlmostEqual(br.ratio_of_medians([900, 475, 1100], [1000, 500, 1000]), 0.9)

    def test_paired_leaves_out_a_repetition_missing_on_either_side(self):
        rows = [
            row("read", "session", 32, 1, 900), row("read", "baseline", 32, 1, 1000),
            row("read", "session", 32, 2, 100),
            row("read", "session", 32, 3, "-"), row("read", "baseline", 32, 3, 1000),
        ]
        spread = br.paired(rows, "read", "session", 32, "baseline", 32, "rps")
        self.assertEqual((spread.median, spread.low, spread.high), (0.9, 0.9, 0.9))

    def test_paired_with_nothing_in_common_is_missing(self):
        rows = [row("read", "session", 32, 1, 900)]
        self.assertIsNone(br.paired(rows, "read", "session", 32, "baseline", 32, "rps"))
        self.assertEqual(br.spread_text(None), "- (- – -)")

    def test_ratio_of_medians_with_missing_data_is_none(self):
        self.assertIsNone(br.ratio_of_medians([], [1.0]))
        self.assertIsNone(br.ratio_of_medians([1.0], [0.0]))

    def test_capacity_is_the_other_sides_cpu_per_request_over_this_ones(self):
        rows = [
            row("transfer", "session", 32, 1, 1, svc=100, pg=300, client=100),
            row("transfer", "pgbench", 8, 1, 1, svc=0, pg=350, client=50),
        ]
        spread = br.paired(rows, "transfer", "session", 32, "pgbench", 8, "capacity")
        self.assertAlmostEqual(spread.median, 0.8)

    def test_layer_shares_the_cluster_and_client_cpu_of_the_pair(self):
        rows = [
            row("read", "session", 32, 1, 1, svc=60, pg=70, client=20),
            row("read", "baseline", 32, 1, 1, svc=50, pg=60, client=20),
        ]
        # rest = ((70 + 20) + (60 + 20)) / 2 = 85: (50 + 85) / (60 + 85)
        spread = br.paired(rows, "read", "session", 32, "baseline", 32, "layer")
        self.assertAlmostEqual(spread.median, 135 / 145)
        diff = br.paired(rows, "read", "session", 32, "baseline", 32, "svc_diff")
        self.assertEqual(diff.median, 10)

    def test_cluster_cpu_ratio_pairs_the_service_with_pgbench(self):
        rows = [
            row("pinned", "session", 32, 1, 900, svc=150, pg=300),
            row("pinned", "pgbench", 8, 1, 1000, svc=0, pg=250),
            row("pinned", "pgbench", 8, 2, 1000, svc=0, pg=200),
            row("pinned", "session", 32, 2, 850, svc=150, pg="-"),
        ]
        spread = br.paired(rows, "pinned", "session", 32, "pgbench", 8, "pg_us")
        self.assertEqual((spread.median, spread.low, spread.high), (1.2, 1.2, 1.2))

    def test_sweep_tail_is_the_last_level_over_the_same_repetitions_peak(self):
        rows = [
            row("sweep", "session", 1, 1, 1000), row("sweep", "session", 16, 1, 2000),
            row("sweep", "session", 512, 1, 1800),
            row("sweep", "session", 1, 2, 500), row("sweep", "session", 16, 2, 1000),
            row("sweep", "session", 512, 2, 1000),
        ]
        spread = br.sweep_tail(rows, "512")
        self.assertAlmostEqual(spread.median, 0.95)
        self.assertAlmostEqual(spread.low, 0.9)

    def test_summary_keeps_the_order_of_first_appearance_and_sums_errors(self):
        rows = [
            row("read", "session", 32, 1, 900, errors="1", rss="100"),
            row("read", "baseline", 32, 1, 1000),
            row("read", "session", 32, 2, 1100, errors="2", rss="-"),
        ]
        summary = br.summarize(rows)
        self.assertEqual([(s["side"], s["n"]) for s in summary], [("session", "2"), ("baseline", "1")])
        self.assertEqual(summary[0]["rps"], "1000")
        self.assertEqual((summary[0]["rps_min"], summary[0]["rps_max"]), ("900", "1100"))
        self.assertEqual(summary[0]["errors"], "3")
        self.assertEqual(summary[0]["rss"], "100")

    def test_table_figures_round_as_bashs_printf_did(self):
        # 74.455 is a tie in decimal; as a long double it lies above, as a double below.
        self.assertEqual(br.printf_fixed("74.455", 2), "74.46")
        self.assertEqual(br.printf_fixed("74.445", 2), "74.44")
        self.assertEqual(br.printf_fixed("1234.5", 0), "1234")
        self.assertEqual(br.printf_fixed("-", 2), "0.00")

    def test_verdict(self):
        self.assertEqual(br.verdict("0.980", ">=", 0.97), "met")
        self.assertEqual(br.verdict("0.960", ">=", 0.97), "**missed**")
        self.assertEqual(br.verdict("1.2", "<=", 1.10), "**missed**")
        self.assertEqual(br.verdict("-", ">=", 0.97), "n/a")
        self.assertEqual(br.verdict("", "<=", 1), "n/a")


class Parsing(unittest.TestCase):
    def test_wrk_summary_line(self):
        wrk = br.parse_wrk(WRK_OUTPUT)
        self.assertEqual((wrk.rps, wrk.p50, wrk.p99, wrk.requests), ("3580.0", "8.781", "16.850", "7160"))
        self.assertEqual(wrk.errors, 3)

    def test_wrk_without_a_summary_line(self):
        self.assertIsNone(br.parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n"))

    def test_pgbench_summary(self):
        pgb = br.parse_pgbench(PGBENCH_OUTPUT)
        self.assertEqual((pgb.tps, pgb.failed, pgb.processed), ("6373.213456", "3", "12740"))

    def test_pgbench_without_tps(self):
        self.assertIsNone(br.parse_pgbench("pgbench: error: connection refused\n"))

    def test_pgbench_latency_percentiles(self):
        self.assertEqual(br.latency_percentiles([float(us) for us in range(1000, 101000, 1000)]),
                         ("50.000", "99.000"))
        self.assertEqual(br.latency_percentiles([2500.0]), ("2.500", "2.500"))
        self.assertEqual(br.latency_percentiles([]), ("0.000", "0.000"))

    def test_pgbench_begin_and_commit_are_counted_from_the_transactions(self):
        statements = [(100, 'INSERT INTO "transfers" ("from_account_id") VALUES ($1)'),
                      (8, "BEGIN"), (8, "COMMIT"), (100, "SELECT pg_current_wal_insert_lsn()")]
        fixed = br.pgbench_statements(statements)
        self.assertEqual(fixed[1:3], [(100, "BEGIN *"), (100, "COMMIT *")])
        self.assertEqual(br.pgbench_statements(fixed), fixed)

    def test_statements_per_request_anchor_on_the_insert_or_the_read(self):
        transfer = [(10, "BEGIN"), (10, 'INSERT INTO "transfers" ("a") VALUES ($1)'),
                    (10, "COMMIT"), (1, "SELECT $1")]
        self.assertEqual(br.per_request(transfer), br.PerRequest(10, "3.100", "0.1000"))
        read = [(20, "BEGIN READ ONLY"),
                (20, 'SELECT "accounts"."id" FROM "accounts" WHERE ("accounts"."id" = $1) LIMIT $2'),
                (20, "COMMIT")]
        self.assertEqual(br.per_request(read), br.PerRequest(20, "3.000", "0.0000"))
        self.assertEqual(br.per_request([(3, "BEGIN")]), br.PerRequest(0, "-", "-"))

    def test_cpu_per_request(self):
        # 100 ticks/s: service 1 s (0.2 s kernel), cluster 2 s, machine 4 s busy, client 0.5 s.
        cpu = br.cpu_per_request("0 0 0 0", "100 20 200 400", 0.5, 1000, 100)
        self.assertEqual(cpu, br.CpuPerRequest("1000", "2000", "500", "12", "200"))
        self.assertEqual(br.cpu_per_request("0 0 0 0", "1 0 1 2", 0.0, 0, 100).svc_us, "-")

    def test_replica_share_is_taken_between_two_scrapes(self):
        before = ('# TYPE db_reads_total counter\n'
                  'db_reads_total{target="primary",reason="no_replica"} 5\n'
                  'db_reads_total{target="replica",reason="replica"} 10\n'
                  'db_pool_connections{state="idle"} 4\n')
        after = ('db_reads_total{target="primary",reason="no_replica"} 6\n'
                 'db_reads_total{reason="lagging",target="primary"} 1\n'
                 'db_reads_total{target="replica",reason="replica"} 108\n')
        self.assertEqual(br.reads_by_target(after), {"primary": 7.0, "replica": 108.0})
        self.assertEqual(br.replica_share(before, after), 0.98)
        self.assertIsNone(br.replica_share(before, before))

    def test_client_cpu_is_the_last_line_of_time(self):
        self.assertEqual(br.client_cpu_seconds("some warning\n0.310 0.120\n"), 0.43)
        self.assertEqual(br.client_cpu_seconds(""), 0.0)


class ReportFromResults(unittest.TestCase):
    def test_report_is_written_between_the_markers(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            rows = [row("transfer", "session", 32, 1, 3000, p50="8.5", stmts="7.000", pings="0.0000",
                        conns="9", rss="13312"),
                    row("transfer", "baseline", 32, 1, 3100, p50="8.1", stmts="6.000", pings="0.0000",
                        conns="9", rss="13312")]
            (out / "results.tsv").write_text(
                "".join("\t".join(r[c] for c in br.RESULT_COLUMNS) + "\n" for r in rows))
            report = out / "BENCHMARKS.md"
            report.write_text("# Benchmarks\n\nbefore\n<!-- bench:results:begin -->\nold\n"
                              "<!-- bench:results:end -->\nafter\n")
            (out / "meta.tsv").write_text(
                f"clients\t32\nconns\t8\nreps\t1\nsweep\t1 16\nreport\t{report}\nnproc\t2\n")
            with open(Path(tmp) / "stdout", "w") as sink:
                saved, sys.stdout = sys.stdout, sink
                try:
                    self.assertEqual(br.main(["report", str(out)]), 0)
                finally:
                    sys.stdout = saved
            text = report.read_text()
            self.assertTrue(text.startswith("# Benchmarks\n\nbefore\n<!-- bench:results:begin"))
            self.assertTrue(text.endswith("<!-- bench:results:end -->\nafter\n"))
            self.assertNotIn("\nold\n", text)
            self.assertIn("| transfer req/s, session / baseline | 0.968 (0.968 – 0.968) | ≥ 0.97 | **missed** |", text)
            self.assertIn("| transfer | service (DbSession) | 32 | 9 | 3000 | 3000 – 3000 | ±0.0 % |", text)
            self.assertIn("| read req/s, session / baseline | - (- – -) | ≥ 0.97 | n/a |", text)


if __name__ == "__main__":
    unittest.main()
