// Package prototest builds annotated protobuf service descriptors for tests,
// the way protoc-gen-go registers generated ones, without generating code.
package prototest

import (
	"testing"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"
	_ "google.golang.org/protobuf/types/known/wrapperspb" // registers wrappers.proto

	connectlimitv1 "github.com/connectlimit/connectlimit/proto/connectlimit/v1"
)

// Method is one method of a test service.
type Method struct {
	// Name is the method's name, e.g. "Search".
	Name string
	// Limit is its connectlimit.v1.limit annotation; nil for none.
	Limit *connectlimitv1.Limit
	// ServerStreaming makes the method return a stream.
	ServerStreaming bool
}

// Limit returns an annotation for bucketName; a nil cost leaves it unset.
func Limit(bucketName string, cost *float64) *connectlimitv1.Limit {
	return &connectlimitv1.Limit{Bucket: bucketName, Cost: cost}
}

// NewService returns the descriptor of service test.v1.TestService with the
// given methods. Requests and responses are google.protobuf.StringValue.
func NewService(tb testing.TB, methods ...Method) protoreflect.ServiceDescriptor {
	tb.Helper()
	svc := &descriptorpb.ServiceDescriptorProto{Name: proto.String("TestService")}
	for _, m := range methods {
		md := &descriptorpb.MethodDescriptorProto{
			Name:            proto.String(m.Name),
			InputType:       proto.String(".google.protobuf.StringValue"),
			OutputType:      proto.String(".google.protobuf.StringValue"),
			ServerStreaming: proto.Bool(m.ServerStreaming),
		}
		if m.Limit != nil {
			md.Options = &descriptorpb.MethodOptions{}
			proto.SetExtension(md.Options, connectlimitv1.E_Limit, m.Limit)
		}
		svc.Method = append(svc.Method, md)
	}
	fd, err := protodesc.NewFile(&descriptorpb.FileDescriptorProto{
		Name:       proto.String("test/v1/test.proto"),
		Package:    proto.String("test.v1"),
		Syntax:     proto.String("proto3"),
		Dependency: []string{"google/protobuf/wrappers.proto"},
		Service:    []*descriptorpb.ServiceDescriptorProto{svc},
	}, protoregistry.GlobalFiles)
	if err != nil {
		tb.Fatal(err)
	}
	return fd.Services().Get(0)
}
