package costmap

import (
	"errors"
	"fmt"

	"cel.dev/cel-go/cel"
	"cel.dev/cel-go/common/types"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/connectlimit/connectlimit/bucket"
)

// exprCostLimit bounds the work one expression may do per evaluation, so a
// costly expression fed a large message cannot stall a call.
const exprCostLimit = 100_000

// EvalError reports that a cost expression could not be evaluated for a
// message: a field it reads is unset in a way it does not handle, it
// overflowed, or it produced a negative or non-finite cost. The interceptor
// answers such calls with CodeInvalidArgument.
type EvalError struct {
	// Procedure is the procedure the expression belongs to.
	Procedure string
	// Bucket is the bucket the expression prices.
	Bucket string
	// Expression is the expression's source.
	Expression string
	// Err is what went wrong.
	Err error
}

// Error names the procedure, bucket and expression, then what went wrong.
func (e *EvalError) Error() string {
	return fmt.Sprintf("costmap: procedure %s: bucket %q: cost expression %q: %v", e.Procedure, e.Bucket, e.Expression, e.Err)
}

// Unwrap returns Err.
func (e *EvalError) Unwrap() error { return e.Err }

// expr is one compiled cost expression.
type expr struct {
	source string
	// variable is "request" or "response".
	variable string
	program  cel.Program
}

// compileExpr compiles source with one variable of message type msg. Only
// expressions of type int, uint or double (or dyn, checked when evaluated)
// are accepted.
func compileExpr(source, variable string, msg protoreflect.MessageDescriptor) (*expr, error) {
	env, err := cel.NewEnv(
		cel.TypeDescs(msg.ParentFile()),
		cel.Variable(variable, cel.ObjectType(string(msg.FullName()))),
	)
	if err != nil {
		return nil, fmt.Errorf("building the CEL environment for %s: %w", msg.FullName(), err)
	}
	ast, iss := env.Compile(source)
	if iss.Err() != nil {
		return nil, iss.Err()
	}
	switch out := ast.OutputType(); {
	case out.IsExactType(types.IntType), out.IsExactType(types.UintType),
		out.IsExactType(types.DoubleType), out.IsExactType(types.DynType):
	default:
		return nil, fmt.Errorf("has type %s, want int, uint or double", out)
	}
	prg, err := env.Program(ast, cel.CostLimit(exprCostLimit))
	if err != nil {
		return nil, err
	}
	return &expr{source: source, variable: variable, program: prg}, nil
}

// eval returns the expression's value for msg: a finite number >= 0.
func (e *expr) eval(msg proto.Message) (float64, error) {
	val, _, err := e.program.Eval(map[string]any{e.variable: msg})
	if err != nil {
		return 0, err
	}
	var f float64
	switch v := val.Value().(type) {
	case int64:
		f = float64(v)
	case uint64:
		f = float64(v)
	case float64:
		f = v
	default:
		return 0, fmt.Errorf("evaluated to %v of type %s, want a number", val, val.Type())
	}
	if !(f >= 0 && f <= bucket.MaxTokens) {
		return 0, fmt.Errorf("evaluated to %v, want a number from 0 to %g", f, bucket.MaxTokens)
	}
	return f, nil
}

var errNoDescriptor = errors.New("the method's descriptor is needed to compile cost expressions; pass its service to costmap.New or serve it with connect.WithSchema")
