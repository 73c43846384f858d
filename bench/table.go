package main

import (
	"fmt"
	"io"
	"math"
	"strconv"
	"strings"
	"time"
)

// row is one line of the table. Every figure is a float64, NaN when the
// row's section does not measure it; each is the median over the runs.
type row struct {
	section string
	peer    string
	// workload says what was measured, e.g. "many users" or "3 buckets/id".
	workload string
	// callers is the number of concurrent callers, 0 when not applicable.
	callers int

	opsPerSec    float64
	p50, p99     float64 // nanoseconds
	errs         float64
	clientCPU    float64 // microseconds of this process's CPU per decision
	redisCPU     float64 // microseconds of Redis CPU per decision
	redisCalls   float64 // commands sent to Redis per decision
	redisCmds    float64 // commands Redis ran per decision, in scripts too
	callsDenied  float64 // commands sent to Redis per denied call
	overAdmitted float64 // admitted beyond capacity + refill × elapsed
	deniedShare  float64 // fraction of decisions denied
	bytesPer     float64 // bytes per bucket
	allocs       float64 // heap allocations per decision

	// ratioOps, ratioP99 and ratioBytes compare connectlimit with this
	// row's peer on the same workload and callers: connectlimit's figure
	// divided by this row's. The end-to-end rows use them for "with the
	// interceptor ÷ without".
	ratioOps, ratioP99, ratioBytes float64
}

// newRow returns a row with every figure unmeasured.
func newRow(section, peer, workload string, callers int) row {
	nan := math.NaN()
	return row{
		section: section, peer: peer, workload: workload, callers: callers,
		opsPerSec: nan, p50: nan, p99: nan, errs: nan, clientCPU: nan, redisCPU: nan, redisCalls: nan, redisCmds: nan,
		callsDenied: nan, overAdmitted: nan, deniedShare: nan, bytesPer: nan, allocs: nan,
		ratioOps: nan, ratioP99: nan, ratioBytes: nan,
	}
}

// column is one column of the table: its heading and how to print a row's
// cell.
type column struct {
	heading string
	cell    func(r *row) string
}

// columns lists the table's columns, in order.
var columns = []column{
	{"section", func(r *row) string { return r.section }},
	{"peer", func(r *row) string { return r.peer }},
	{"workload", func(r *row) string { return r.workload }},
	{"callers", func(r *row) string {
		if r.callers == 0 {
			return ""
		}
		return fmt.Sprint(r.callers)
	}},
	{"decisions/s", func(r *row) string { return count(r.opsPerSec) }},
	{"p50", func(r *row) string { return latency(r.p50) }},
	{"p99", func(r *row) string { return latency(r.p99) }},
	{"errors", func(r *row) string { return count(r.errs) }},
	{"denied", func(r *row) string { return percent(r.deniedShare) }},
	{"client CPU µs/dec", func(r *row) string { return fixed(r.clientCPU, 2) }},
	{"Redis CPU µs/dec", func(r *row) string { return fixed(r.redisCPU, 2) }},
	{"Redis calls/dec", func(r *row) string { return fixed(r.redisCalls, 3) }},
	{"Redis cmds/dec", func(r *row) string { return fixed(r.redisCmds, 2) }},
	{"Redis calls/denied", func(r *row) string { return significant(r.callsDenied) }},
	{"over-admitted", func(r *row) string { return count(r.overAdmitted) }},
	{"B/bucket", func(r *row) string { return fixed(r.bytesPer, 1) }},
	{"allocs/dec", func(r *row) string { return fixed(r.allocs, 1) }},
	{"cl÷peer decisions/s", func(r *row) string { return ratio(r.ratioOps) }},
	{"cl÷peer p99", func(r *row) string { return ratio(r.ratioP99) }},
	{"cl÷peer B/bucket", func(r *row) string { return ratio(r.ratioBytes) }},
}

// count prints a count or rate without decimals.
func count(v float64) string {
	if math.IsNaN(v) {
		return ""
	}
	return fmt.Sprintf("%.0f", v)
}

// fixed prints v with prec decimals.
func fixed(v float64, prec int) string {
	if math.IsNaN(v) {
		return ""
	}
	return fmt.Sprintf("%.*f", prec, v)
}

// significant prints v with three significant digits, so that both 1.03
// and 4.2e-05 read.
func significant(v float64) string {
	if math.IsNaN(v) {
		return ""
	}
	return strconv.FormatFloat(v, 'g', 3, 64)
}

// percent prints a fraction as a percentage.
func percent(v float64) string {
	if math.IsNaN(v) {
		return ""
	}
	return fmt.Sprintf("%.1f%%", 100*v)
}

// ratio prints a ratio with a "×" suffix.
func ratio(v float64) string {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return ""
	}
	if math.Abs(v) < 0.1 {
		return fmt.Sprintf("%.3f×", v)
	}
	return fmt.Sprintf("%.2f×", v)
}

// latency prints nanoseconds in the unit that suits them.
func latency(ns float64) string {
	if math.IsNaN(ns) {
		return ""
	}
	d := time.Duration(ns)
	switch {
	case d < time.Microsecond:
		return fmt.Sprintf("%dns", d.Nanoseconds())
	case d < time.Millisecond:
		return fmt.Sprintf("%.1fµs", ns/1e3)
	default:
		return fmt.Sprintf("%.2fms", ns/1e6)
	}
}

// writeTable prints rows as one Markdown table, its columns padded so that
// it also reads as plain text. Columns empty in every row are left out.
func writeTable(w io.Writer, rows []row) error {
	cells := make([][]string, len(rows))
	var kept []int
	for c, col := range columns {
		used := false
		for i := range rows {
			s := col.cell(&rows[i])
			cells[i] = append(cells[i], s)
			used = used || s != ""
		}
		if used || c < 4 {
			kept = append(kept, c)
		}
	}
	widths := make([]int, len(columns))
	for _, c := range kept {
		widths[c] = len([]rune(columns[c].heading))
		for i := range rows {
			widths[c] = max(widths[c], len([]rune(cells[i][c])))
		}
	}
	var b strings.Builder
	line := func(get func(c int) string, numeric bool) {
		b.WriteString("|")
		for _, c := range kept {
			s := get(c)
			pad := strings.Repeat(" ", widths[c]-len([]rune(s)))
			if numeric && c >= 3 {
				b.WriteString(" " + pad + s + " |")
			} else {
				b.WriteString(" " + s + pad + " |")
			}
		}
		b.WriteString("\n")
	}
	line(func(c int) string { return columns[c].heading }, false)
	line(func(c int) string {
		if c >= 3 {
			return strings.Repeat("-", widths[c]-1) + ":"
		}
		return strings.Repeat("-", widths[c])
	}, false)
	for i := range rows {
		line(func(c int) string { return cells[i][c] }, true)
	}
	_, err := io.WriteString(w, b.String())
	return err
}
