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
	"google.golang.org/protobuf/types/dynamicpb"
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
	// ClientStreaming makes the method take a stream.
	ClientStreaming bool
	// Report makes the method take a test.v1.ReportRequest and return a
	// test.v1.ReportResponse instead of google.protobuf.StringValue.
	Report bool
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
		in, out := ".google.protobuf.StringValue", ".google.protobuf.StringValue"
		if m.Report {
			in, out = ".test.v1.ReportRequest", ".test.v1.ReportResponse"
		}
		md := &descriptorpb.MethodDescriptorProto{
			Name:            proto.String(m.Name),
			InputType:       proto.String(in),
			OutputType:      proto.String(out),
			ServerStreaming: proto.Bool(m.ServerStreaming),
			ClientStreaming: proto.Bool(m.ClientStreaming),
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
		MessageType: []*descriptorpb.DescriptorProto{
			message("ReportRequest", field("topic", 1, descriptorpb.FieldDescriptorProto_TYPE_STRING, ""), field("max_tokens", 2, descriptorpb.FieldDescriptorProto_TYPE_INT32, "")),
			message("ReportResponse", field("text", 1, descriptorpb.FieldDescriptorProto_TYPE_STRING, ""), field("tokens", 2, descriptorpb.FieldDescriptorProto_TYPE_INT32, ""), field("usage", 3, descriptorpb.FieldDescriptorProto_TYPE_MESSAGE, ".test.v1.Usage")),
			message("Usage", field("prompt_tokens", 1, descriptorpb.FieldDescriptorProto_TYPE_INT32, ""), field("completion_tokens", 2, descriptorpb.FieldDescriptorProto_TYPE_INT32, ""), field("total_tokens", 3, descriptorpb.FieldDescriptorProto_TYPE_INT32, "")),
		},
	}, protoregistry.GlobalFiles)
	if err != nil {
		tb.Fatal(err)
	}
	return fd.Services().Get(0)
}

// ReportRequest returns a test.v1.ReportRequest of the service's file.
func ReportRequest(sd protoreflect.ServiceDescriptor, topic string, maxTokens int32) *dynamicpb.Message {
	msg := dynamicpb.NewMessage(sd.ParentFile().Messages().ByName("ReportRequest"))
	fields := msg.Descriptor().Fields()
	msg.Set(fields.ByName("topic"), protoreflect.ValueOfString(topic))
	msg.Set(fields.ByName("max_tokens"), protoreflect.ValueOfInt32(maxTokens))
	return msg
}

// ReportResponse returns a test.v1.ReportResponse of the service's file
// with tokens set and, when total > 0, a usage with that total_tokens.
func ReportResponse(sd protoreflect.ServiceDescriptor, tokens, total int32) *dynamicpb.Message {
	msg := dynamicpb.NewMessage(sd.ParentFile().Messages().ByName("ReportResponse"))
	fields := msg.Descriptor().Fields()
	msg.Set(fields.ByName("tokens"), protoreflect.ValueOfInt32(tokens))
	if total > 0 {
		usage := msg.Mutable(fields.ByName("usage")).Message()
		usage.Set(usage.Descriptor().Fields().ByName("total_tokens"), protoreflect.ValueOfInt32(total))
	}
	return msg
}

func message(name string, fields ...*descriptorpb.FieldDescriptorProto) *descriptorpb.DescriptorProto {
	return &descriptorpb.DescriptorProto{Name: proto.String(name), Field: fields}
}

func field(name string, number int32, typ descriptorpb.FieldDescriptorProto_Type, typeName string) *descriptorpb.FieldDescriptorProto {
	f := &descriptorpb.FieldDescriptorProto{
		Name:     proto.String(name),
		JsonName: proto.String(name),
		Number:   proto.Int32(number),
		Label:    descriptorpb.FieldDescriptorProto_LABEL_OPTIONAL.Enum(),
		Type:     typ.Enum(),
	}
	if typeName != "" {
		f.TypeName = proto.String(typeName)
	}
	return f
}
