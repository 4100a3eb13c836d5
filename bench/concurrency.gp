# Throughput and p99 of POST /transfers versus client connections (scripts/bench.sh).
# Variables: datafile (clients rps_median rps_min rps_max p99_ms), outfile, conns, cores.
set terminal svg size 760,420 dynamic font "sans,12" background "white"
set output outfile
set title sprintf("POST /transfers: %d pooled connections, %d cores", conns, cores)
set logscale x 2
set xlabel "concurrent HTTP client connections"
set ylabel "requests per second (median, min–max)"
set y2label "p99 latency, ms (median, log scale)"
set yrange [0:*]
set logscale y2 10
set y2range [1:*]
set ytics nomirror
set y2tics
set grid xtics ytics
set key bottom right box opaque
set style data linespoints
plot datafile using 1:2:3:4 with yerrorlines lw 2 pt 7 lc rgb "#1f77b4" title "throughput", \
     datafile using 1:5 axes x1y2 with linespoints lw 2 pt 5 dt 2 lc rgb "#d62728" title "p99 latency"
