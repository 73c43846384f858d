package quota

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"unicode/utf8"
)

// This file parses the RateLimit, RateLimit-Policy and Connectlimit-Warning
// fields. They are Structured Field Lists (RFC 9651) whose members are quota
// items (draft-ietf-httpapi-ratelimit-headers-10): a String or Token naming
// the bucket, with parameters such as
//
//	"search";r=59;t=1, "all_ai_tokens";r=99;t=1
//
// The parser is strict, as RFC 9651 asks: a field that does not parse, a
// member that is an Inner List or names its bucket with another type, a
// bucket named twice, or a parameter the caller reads that is not a
// non-negative Integer makes the whole field invalid, and the quota state
// ignores it. Parameters the caller does not read may hold any valid value,
// so that servers can add new ones.

// errField is wrapped by every error parseField returns.
var errField = errors.New("quota: invalid structured field")

// maxFieldItems bounds how many members a field may have. A server charges
// at most 16 buckets a call (bucket.MaxCharges); the bound keeps a hostile
// field from growing the quota state.
const maxFieldItems = 64

// fieldItem is one member of a quota field: a bucket and the Integer
// parameters the caller asked for.
type fieldItem struct {
	bucket string
	// params holds the requested parameters present on the member.
	params map[string]int64
}

// parseLines parses the lines of a field in a header (the values of every
// line with its name), each on its own, and merges them: a bucket in a
// later line replaces the same bucket in an earlier one, and a line that
// does not parse is ignored. An error's metadata is the union of a
// response's headers and trailers, each of which may carry the field; the
// trailers, which come last, are the newer state. A list split over lines
// at its commas, as RFC 9651 allows, parses the same as when joined.
func parseLines(lines []string, required string, optional ...string) []fieldItem {
	var merged []fieldItem
	for _, line := range lines {
		items, err := parseField(line, required, optional...)
		if err != nil {
			continue
		}
		for _, item := range items {
			if i := slices.IndexFunc(merged, func(m fieldItem) bool { return m.bucket == item.bucket }); i >= 0 {
				merged[i] = item
			} else if len(merged) < maxFieldItems {
				merged = append(merged, item)
			}
		}
	}
	return merged
}

// parseField parses one line of a field into its members. Each member must
// carry the parameter required (when not empty); the optional ones may be
// absent. Both must be non-negative Integers when present. An empty line
// (or only spaces) has no members and is valid.
func parseField(line string, required string, optional ...string) ([]fieldItem, error) {
	p := sfParser{s: line}
	p.skipSP()
	var items []fieldItem
	if p.done() {
		return nil, nil
	}
	for {
		item, err := p.member(required, optional)
		if err != nil {
			return nil, fmt.Errorf("%w: %w at byte %d", errField, err, p.i)
		}
		if slices.ContainsFunc(items, func(other fieldItem) bool { return other.bucket == item.bucket }) {
			return nil, fmt.Errorf("%w: bucket %q is listed twice", errField, item.bucket)
		}
		if items = append(items, item); len(items) > maxFieldItems {
			return nil, fmt.Errorf("%w: more than %d members", errField, maxFieldItems)
		}
		p.skipOWS()
		if p.done() {
			return items, nil
		}
		if p.next() != ',' {
			return nil, fmt.Errorf("%w: expected a comma at byte %d", errField, p.i-1)
		}
		p.skipOWS()
		if p.done() {
			return nil, fmt.Errorf("%w: trailing comma", errField)
		}
	}
}

// formatField is the inverse of parseField: it writes items with their
// parameters in name order. The fuzz test checks that parsing its output
// gives the items back.
func formatField(items []fieldItem) string {
	var b strings.Builder
	for i, item := range items {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(quoteString(item.bucket))
		for _, k := range slices.Sorted(maps.Keys(item.params)) {
			fmt.Fprintf(&b, ";%s=%d", k, item.params[k])
		}
	}
	return b.String()
}

// quoteString writes s as a Structured Field String. s must hold only
// printable ASCII, as every parsed bucket name does.
func quoteString(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for i := range len(s) {
		if s[i] == '"' || s[i] == '\\' {
			b.WriteByte('\\')
		}
		b.WriteByte(s[i])
	}
	b.WriteByte('"')
	return b.String()
}

// sfParser reads RFC 9651 syntax from s, at byte i.
type sfParser struct {
	s string
	i int
}

func (p *sfParser) done() bool { return p.i >= len(p.s) }

// peek returns the next byte, or 0 at the end.
func (p *sfParser) peek() byte {
	if p.done() {
		return 0
	}
	return p.s[p.i]
}

// next consumes and returns the next byte, or 0 at the end.
func (p *sfParser) next() byte {
	c := p.peek()
	p.i++
	return c
}

func (p *sfParser) skipSP() {
	for p.peek() == ' ' {
		p.i++
	}
}

func (p *sfParser) skipOWS() {
	for c := p.peek(); c == ' ' || c == '\t'; c = p.peek() {
		p.i++
	}
}

// member parses one quota item and keeps the parameters asked for.
func (p *sfParser) member(required string, optional []string) (fieldItem, error) {
	if p.peek() == '(' {
		return fieldItem{}, errors.New("an inner list is not a quota item")
	}
	v, err := p.bareItem()
	if err != nil {
		return fieldItem{}, err
	}
	if v.kind != kindString && v.kind != kindToken {
		return fieldItem{}, fmt.Errorf("a bucket is named by a String or Token, got %v", v.kind)
	}
	params, err := p.parameters()
	if err != nil {
		return fieldItem{}, err
	}
	item := fieldItem{bucket: v.s, params: map[string]int64{}}
	for key, value := range params {
		if key != required && !slices.Contains(optional, key) {
			continue // not ours: any valid value goes
		}
		if value.kind != kindInteger || value.i < 0 {
			return fieldItem{}, fmt.Errorf("bucket %q: parameter %s must be a non-negative Integer", item.bucket, key)
		}
		item.params[key] = value.i
	}
	if _, ok := item.params[required]; required != "" && !ok {
		return fieldItem{}, fmt.Errorf("bucket %q: parameter %s is missing", item.bucket, required)
	}
	return item, nil
}

// parameters parses `*( ";" *SP key [ "=" bare-item ] )`. A key given twice
// keeps its last value, as RFC 9651 says.
func (p *sfParser) parameters() (map[string]sfValue, error) {
	params := map[string]sfValue{}
	for p.peek() == ';' {
		p.i++
		p.skipSP()
		key, err := p.key()
		if err != nil {
			return nil, err
		}
		value := sfValue{kind: kindBoolean, b: true}
		if p.peek() == '=' {
			p.i++
			if value, err = p.bareItem(); err != nil {
				return nil, err
			}
		}
		params[key] = value
	}
	return params, nil
}

// key parses `( lcalpha / "*" ) *( lcalpha / DIGIT / "_" / "-" / "." / "*" )`.
func (p *sfParser) key() (string, error) {
	start := p.i
	if c := p.peek(); !isLower(c) && c != '*' {
		return "", errors.New("a parameter key starts with a lowercase letter or *")
	}
	for c := p.peek(); isLower(c) || isDigit(c) || c == '_' || c == '-' || c == '.' || c == '*'; c = p.peek() {
		p.i++
	}
	return p.s[start:p.i], nil
}

// kind is the type of a bare item.
type kind uint8

const (
	kindInteger kind = iota
	kindDecimal
	kindString
	kindToken
	kindBinary
	kindBoolean
	kindDate
	kindDisplayString
)

// String names the type as RFC 9651 does.
func (k kind) String() string {
	return [...]string{"Integer", "Decimal", "String", "Token", "Byte Sequence", "Boolean", "Date", "Display String"}[k]
}

// sfValue is a bare item. Only what the parser's callers read is kept:
// an Integer's (or Date's) value, a String's or Token's text, a Boolean.
type sfValue struct {
	kind kind
	i    int64
	s    string
	b    bool
}

// bareItem parses any RFC 9651 bare item.
func (p *sfParser) bareItem() (sfValue, error) {
	switch c := p.peek(); {
	case c == '-' || isDigit(c):
		return p.number()
	case c == '"':
		s, err := p.string()
		return sfValue{kind: kindString, s: s}, err
	case c == '*' || isAlpha(c):
		return sfValue{kind: kindToken, s: p.token()}, nil
	case c == ':':
		return sfValue{kind: kindBinary}, p.binary()
	case c == '?':
		p.i++
		switch p.next() {
		case '0':
			return sfValue{kind: kindBoolean}, nil
		case '1':
			return sfValue{kind: kindBoolean, b: true}, nil
		}
		return sfValue{}, errors.New("a Boolean is ?0 or ?1")
	case c == '@':
		p.i++
		v, err := p.number()
		if err != nil || v.kind != kindInteger {
			return sfValue{}, errors.New("a Date is @ and an Integer")
		}
		return sfValue{kind: kindDate, i: v.i}, nil
	case c == '%':
		p.i++
		return sfValue{kind: kindDisplayString}, p.displayString()
	default:
		return sfValue{}, errors.New("expected an item")
	}
}

// number parses an Integer (at most 15 digits) or a Decimal (at most 12
// digits, a dot, 1 to 3 digits).
func (p *sfParser) number() (sfValue, error) {
	start := p.i
	if p.peek() == '-' {
		p.i++
	}
	digits := p.i
	for isDigit(p.peek()) {
		p.i++
	}
	intDigits := p.i - digits
	if intDigits == 0 {
		return sfValue{}, errors.New("a number needs a digit")
	}
	if p.peek() != '.' {
		if intDigits > 15 {
			return sfValue{}, errors.New("an Integer has at most 15 digits")
		}
		i, err := strconv.ParseInt(p.s[start:p.i], 10, 64)
		return sfValue{kind: kindInteger, i: i}, err
	}
	p.i++
	frac := p.i
	for isDigit(p.peek()) {
		p.i++
	}
	if intDigits > 12 || p.i-frac < 1 || p.i-frac > 3 {
		return sfValue{}, errors.New("a Decimal has at most 12 digits, a dot and 1 to 3 digits")
	}
	return sfValue{kind: kindDecimal}, nil
}

// string parses a String: printable ASCII between quotes, with \" and \\
// the only escapes.
func (p *sfParser) string() (string, error) {
	p.i++ // the opening quote
	var b strings.Builder
	for !p.done() {
		c := p.next()
		switch {
		case c == '"':
			return b.String(), nil
		case c == '\\':
			if e := p.next(); e == '"' || e == '\\' {
				b.WriteByte(e)
				continue
			}
			return "", errors.New(`a String escapes only " and \`)
		case c < 0x20 || c > 0x7e:
			return "", errors.New("a String holds printable ASCII only")
		default:
			b.WriteByte(c)
		}
	}
	return "", errors.New("a String is not closed")
}

// token parses a Token: ALPHA or *, then tchar, : and /.
func (p *sfParser) token() string {
	start := p.i
	p.i++
	for c := p.peek(); isTChar(c) || c == ':' || c == '/'; c = p.peek() {
		p.i++
	}
	return p.s[start:p.i]
}

// binary parses a Byte Sequence: base64 between colons.
func (p *sfParser) binary() error {
	p.i++
	end := strings.IndexByte(p.s[p.i:], ':')
	if end < 0 {
		return errors.New("a Byte Sequence is not closed")
	}
	text := p.s[p.i : p.i+end]
	p.i += end + 1
	// *( ALPHA / DIGIT / "+" / "/" ) *"=": RFC 9651 asks parsers to
	// accept missing padding and non-zero pad bits.
	body := strings.TrimRight(text, "=")
	for i := range len(body) {
		if c := body[i]; !isAlpha(c) && !isDigit(c) && c != '+' && c != '/' {
			return errors.New("a Byte Sequence holds base64")
		}
	}
	return nil
}

// displayString parses the rest of a Display String: %"...", printable
// ASCII with lowercase %xx escapes that decode to UTF-8.
func (p *sfParser) displayString() error {
	if p.next() != '"' {
		return errors.New(`a Display String starts with %"`)
	}
	var decoded []byte
	for !p.done() {
		c := p.next()
		switch {
		case c == '"':
			if !utf8.Valid(decoded) {
				return errors.New("a Display String decodes to UTF-8")
			}
			return nil
		case c == '%':
			if p.i+2 > len(p.s) || !isLowerHex(p.s[p.i]) || !isLowerHex(p.s[p.i+1]) {
				return errors.New("a Display String escapes with two lowercase hex digits")
			}
			n, _ := strconv.ParseUint(p.s[p.i:p.i+2], 16, 8)
			decoded = append(decoded, byte(n))
			p.i += 2
		case c < 0x20 || c > 0x7e:
			return errors.New("a Display String holds printable ASCII only")
		default:
			decoded = append(decoded, c)
		}
	}
	return errors.New("a Display String is not closed")
}

func isLower(c byte) bool    { return c >= 'a' && c <= 'z' }
func isDigit(c byte) bool    { return c >= '0' && c <= '9' }
func isAlpha(c byte) bool    { return isLower(c) || (c >= 'A' && c <= 'Z') }
func isLowerHex(c byte) bool { return isDigit(c) || (c >= 'a' && c <= 'f') }

// isTChar reports whether c is an RFC 9110 tchar.
func isTChar(c byte) bool {
	return isAlpha(c) || isDigit(c) || strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0
}
