package redisstore

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
)

// Logger sends go-redis's own log lines (reconnections, pool and push
// notification trouble) to a [slog.Logger] as warnings, instead of go-redis's
// default unstructured lines on standard error. Install it with
// redis.SetLogger(redisstore.NewLogger(l)); go-redis has one logger per
// process.
type Logger struct {
	logger *slog.Logger
}

// NewLogger returns a Logger writing to l.
func NewLogger(l *slog.Logger) *Logger { return &Logger{logger: l} }

// Printf implements go-redis's logging interface.
func (l *Logger) Printf(ctx context.Context, format string, v ...any) {
	l.logger.WarnContext(ctx, "go-redis: "+strings.TrimPrefix(fmt.Sprintf(format, v...), "redis: "))
}
