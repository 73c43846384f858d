package main

import (
	"context"
	"errors"
	"io"

	"connectrpc.com/connect/v2"
	"connectrpc.com/connect/v2/connecthttp"
	"connectrpc.com/connect/v2/connectproto"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	conformancev1 "github.com/connectlimit/connectlimit/internal/conformance/gen/connectrpc/conformance/v1"
	"github.com/connectlimit/connectlimit/internal/conformance/gen/connectrpc/conformance/v1/conformancev1connectv2"
	"github.com/connectlimit/connectlimit/internal/conformance/sut"
)

// service implements ConformanceService as service.proto asks, with
// connect-go v2's handler API: messages in and out, metadata on the call's
// connect.CallInfo. Unimplemented is left to the embedded handler, which
// answers unimplemented.
type service struct {
	conformancev1connectv2.UnimplementedConformanceServiceHandler
}

var _ conformancev1connectv2.ConformanceServiceHandler = service{}

func (service) Unary(ctx context.Context, req *conformancev1.UnaryRequest) (*conformancev1.UnaryResponse, error) {
	payload, err := unary(ctx, req, req.GetResponseDefinition())
	if err != nil {
		return nil, err
	}
	return &conformancev1.UnaryResponse{Payload: payload}, nil
}

func (service) IdempotentUnary(ctx context.Context, req *conformancev1.IdempotentUnaryRequest) (*conformancev1.IdempotentUnaryResponse, error) {
	payload, err := unary(ctx, req, req.GetResponseDefinition())
	if err != nil {
		return nil, err
	}
	return &conformancev1.IdempotentUnaryResponse{Payload: payload}, nil
}

// unary answers a call of Unary or IdempotentUnary whose message is req.
func unary(ctx context.Context, req proto.Message, def *conformancev1.UnaryResponseDefinition) (*conformancev1.ConformancePayload, error) {
	echo, err := sut.Any(req)
	if err != nil {
		return nil, internalError(err)
	}
	// HTTPGetQueryParams is nil unless the call is a Connect GET.
	httpInfo, _ := connecthttp.ServerInfoForContext(ctx)
	info := sut.RequestInfo(ctx, requestHeaders(ctx), httpInfo.HTTPGetQueryParams(), []*anypb.Any{echo})
	return reply(ctx, def, info)
}

func (service) ClientStream(ctx context.Context, stream conformancev1connectv2.ConformanceServiceClientStreamServerStream) (*conformancev1.ClientStreamResponse, error) {
	var (
		def  *conformancev1.UnaryResponseDefinition
		msgs []*anypb.Any
	)
	for {
		req, err := stream.Receive()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, err
		}
		if len(msgs) == 0 {
			def = req.GetResponseDefinition()
		}
		msg, err := sut.Any(req)
		if err != nil {
			return nil, internalError(err)
		}
		msgs = append(msgs, msg)
	}
	payload, err := reply(ctx, def, sut.RequestInfo(ctx, requestHeaders(ctx), nil, msgs))
	if err != nil {
		return nil, err
	}
	return &conformancev1.ClientStreamResponse{Payload: payload}, nil
}

// reply answers a unary or client-stream call as def asks: after its delay,
// the response data echoing info, or the requested error with info among its
// details; either way with the requested headers and trailers. A nil def
// asks for a payload holding only info.
func reply(ctx context.Context, def *conformancev1.UnaryResponseDefinition, info *conformancev1.ConformancePayload_RequestInfo) (*conformancev1.ConformancePayload, error) {
	if def.GetRawResponse() != nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, sut.ErrRawResponse.Error())
	}
	call, _ := connect.CallInfoForServerContext(ctx)
	sut.AddHeaders(def.GetResponseHeaders(), call.ResponseHeader().Add)
	sut.AddHeaders(def.GetResponseTrailers(), call.ResponseTrailer().Add)
	var rpcErr error
	if spec := def.GetError(); spec != nil {
		spec, err := sut.WithRequestInfo(spec, info)
		if err != nil {
			return nil, internalError(err)
		}
		rpcErr = newError(spec)
	}
	if err := sut.Sleep(ctx, def.GetResponseDelayMs()); err != nil {
		return nil, err
	}
	if rpcErr != nil {
		return nil, rpcErr
	}
	return &conformancev1.ConformancePayload{Data: def.GetResponseData(), RequestInfo: info}, nil
}

func (service) ServerStream(ctx context.Context, req *conformancev1.ServerStreamRequest, stream conformancev1connectv2.ConformanceServiceServerStreamServerStream) error {
	def := req.GetResponseDefinition()
	if def.GetRawResponse() != nil {
		return connect.NewError(connect.CodeInvalidArgument, sut.ErrRawResponse.Error())
	}
	msg, err := sut.Any(req)
	if err != nil {
		return internalError(err)
	}
	info := sut.RequestInfo(ctx, requestHeaders(ctx), nil, []*anypb.Any{msg})
	call, _ := connect.CallInfoForServerContext(ctx)
	sut.AddHeaders(def.GetResponseHeaders(), call.ResponseHeader().Add)
	sut.AddHeaders(def.GetResponseTrailers(), call.ResponseTrailer().Add)
	if len(def.GetResponseData()) > 0 {
		// The client sees the headers before the first delay.
		if err := stream.SendHeaders(); err != nil {
			return err
		}
	}
	for i, data := range def.GetResponseData() {
		payload := &conformancev1.ConformancePayload{Data: data}
		if i == 0 {
			payload.RequestInfo = info
		}
		if err := sut.Sleep(ctx, def.GetResponseDelayMs()); err != nil {
			return err
		}
		if err := stream.Send(&conformancev1.ServerStreamResponse{Payload: payload}); err != nil {
			return err
		}
	}
	return streamError(def, len(def.GetResponseData()), info)
}

func (service) BidiStream(ctx context.Context, stream conformancev1connectv2.ConformanceServiceBidiStreamServerStream) error {
	var (
		def        *conformancev1.StreamResponseDefinition
		fullDuplex bool
		received   int          // request messages read
		pending    []*anypb.Any // received since the last response (full duplex) or all (half duplex)
		sent       int          // responses sent
	)
	info := func() *conformancev1.ConformancePayload_RequestInfo {
		if sent == 0 {
			return sut.RequestInfo(ctx, requestHeaders(ctx), nil, pending)
		}
		return &conformancev1.ConformancePayload_RequestInfo{Requests: pending}
	}
	send := func() error {
		payload := &conformancev1.ConformancePayload{Data: def.GetResponseData()[sent]}
		// Full duplex echoes in each response the requests read since the
		// previous one; half duplex echoes them all in the first.
		if fullDuplex || sent == 0 {
			payload.RequestInfo = info()
		}
		if err := sut.Sleep(ctx, def.GetResponseDelayMs()); err != nil {
			return err
		}
		if err := stream.Send(&conformancev1.BidiStreamResponse{Payload: payload}); err != nil {
			return err
		}
		sent++
		pending = nil
		return nil
	}
	call, _ := connect.CallInfoForServerContext(ctx)
	for {
		req, err := stream.Receive()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		if received == 0 {
			def, fullDuplex = req.GetResponseDefinition(), req.GetFullDuplex()
			if def.GetRawResponse() != nil {
				return connect.NewError(connect.CodeInvalidArgument, sut.ErrRawResponse.Error())
			}
			sut.AddHeaders(def.GetResponseHeaders(), call.ResponseHeader().Add)
			sut.AddHeaders(def.GetResponseTrailers(), call.ResponseTrailer().Add)
			if fullDuplex && len(def.GetResponseData()) > 0 {
				if err := stream.SendHeaders(); err != nil {
					return err
				}
			}
		}
		received++
		msg, err := sut.Any(req)
		if err != nil {
			return internalError(err)
		}
		pending = append(pending, msg)
		if !fullDuplex {
			continue
		}
		if sent == len(def.GetResponseData()) {
			// Nothing left to answer this request with: end with the
			// requested error, if any.
			break
		}
		if err := send(); err != nil {
			return err
		}
	}
	if !fullDuplex && len(def.GetResponseData()) > 0 {
		// The upload is over: the client sees the headers before the
		// first delay.
		if err := stream.SendHeaders(); err != nil {
			return err
		}
	}
	for sent < len(def.GetResponseData()) {
		if err := send(); err != nil {
			return err
		}
	}
	return streamError(def, sent, info())
}

// streamError returns the error def asks a stream to end with, or nil. An
// error raised before any response message carries info among its details.
func streamError(def *conformancev1.StreamResponseDefinition, sent int, info *conformancev1.ConformancePayload_RequestInfo) error {
	spec := def.GetError()
	if spec == nil {
		return nil
	}
	if sent == 0 {
		var err error
		if spec, err = sut.WithRequestInfo(spec, info); err != nil {
			return internalError(err)
		}
	}
	return newError(spec)
}

// newError returns the connect-go v2 error that spec describes.
func newError(spec *conformancev1.Error) *connect.Error {
	err := connect.NewError(connect.Code(spec.GetCode()), spec.GetMessage())
	for _, detail := range spec.GetDetails() {
		d, detailErr := connectproto.NewErrorDetail(detail)
		if detailErr != nil {
			return internalError(detailErr)
		}
		err = err.WithDetail(d)
	}
	return err
}

func internalError(err error) *connect.Error {
	return connect.NewError(connect.CodeInternal, err.Error()).WithCause(err)
}

// requestHeaders returns the call's request headers as the suite echoes
// them.
func requestHeaders(ctx context.Context) []*conformancev1.Header {
	call, _ := connect.CallInfoForServerContext(ctx)
	return sut.Headers(call.RequestHeader().All())
}
