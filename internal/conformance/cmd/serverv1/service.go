package main

import (
	"context"
	"errors"
	"io"
	"maps"
	"net/http"
	"net/url"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	conformancev1 "github.com/connectlimit/connectlimit/internal/conformance/gen/connectrpc/conformance/v1"
	"github.com/connectlimit/connectlimit/internal/conformance/gen/connectrpc/conformance/v1/conformancev1connect"
	"github.com/connectlimit/connectlimit/internal/conformance/sut"
)

// service implements ConformanceService as service.proto asks, with
// connect-go v1's generic handler API. Unimplemented is left to the embedded
// handler, which answers unimplemented.
type service struct {
	conformancev1connect.UnimplementedConformanceServiceHandler
}

var _ conformancev1connect.ConformanceServiceHandler = service{}

func (service) Unary(ctx context.Context, req *connect.Request[conformancev1.UnaryRequest]) (*connect.Response[conformancev1.UnaryResponse], error) {
	return unary(ctx, req.Msg, req, func(p *conformancev1.ConformancePayload) *conformancev1.UnaryResponse {
		return &conformancev1.UnaryResponse{Payload: p}
	})
}

func (service) IdempotentUnary(ctx context.Context, req *connect.Request[conformancev1.IdempotentUnaryRequest]) (*connect.Response[conformancev1.IdempotentUnaryResponse], error) {
	return unary(ctx, req.Msg, req, func(p *conformancev1.ConformancePayload) *conformancev1.IdempotentUnaryResponse {
		return &conformancev1.IdempotentUnaryResponse{Payload: p}
	})
}

// unaryRequest is a request of Unary or IdempotentUnary.
type unaryRequest interface {
	proto.Message
	GetResponseDefinition() *conformancev1.UnaryResponseDefinition
}

// unary answers req, a call of Unary or IdempotentUnary whose message is
// msg.
func unary[Res any](ctx context.Context, msg unaryRequest, req connect.AnyRequest, wrap func(*conformancev1.ConformancePayload) *Res) (*connect.Response[Res], error) {
	echo, err := sut.Any(msg)
	if err != nil {
		return nil, internalError(err)
	}
	var query url.Values
	if req.HTTPMethod() == http.MethodGet {
		query = req.Peer().Query
	}
	info := sut.RequestInfo(ctx, headers(req.Header()), query, []*anypb.Any{echo})
	return reply(ctx, msg.GetResponseDefinition(), info, wrap)
}

func (service) ClientStream(ctx context.Context, stream *connect.ClientStream[conformancev1.ClientStreamRequest]) (*connect.Response[conformancev1.ClientStreamResponse], error) {
	var (
		def  *conformancev1.UnaryResponseDefinition
		msgs []*anypb.Any
	)
	for stream.Receive() {
		if len(msgs) == 0 {
			def = stream.Msg().GetResponseDefinition()
		}
		msg, err := sut.Any(stream.Msg())
		if err != nil {
			return nil, internalError(err)
		}
		msgs = append(msgs, msg)
	}
	if err := stream.Err(); err != nil {
		return nil, err
	}
	info := sut.RequestInfo(ctx, headers(stream.RequestHeader()), nil, msgs)
	return reply(ctx, def, info, func(p *conformancev1.ConformancePayload) *conformancev1.ClientStreamResponse {
		return &conformancev1.ClientStreamResponse{Payload: p}
	})
}

// reply answers a unary or client-stream call as def asks: after its delay,
// the response data echoing info, or the requested error with info among its
// details; either way with the requested headers and trailers. A nil def
// asks for a payload holding only info.
func reply[Res any](ctx context.Context, def *conformancev1.UnaryResponseDefinition, info *conformancev1.ConformancePayload_RequestInfo, wrap func(*conformancev1.ConformancePayload) *Res) (*connect.Response[Res], error) {
	if def.GetRawResponse() != nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, sut.ErrRawResponse)
	}
	if spec := def.GetError(); spec != nil {
		spec, err := sut.WithRequestInfo(spec, info)
		if err != nil {
			return nil, internalError(err)
		}
		rpcErr := newError(spec)
		// A v1 handler's error carries its headers and trailers as one
		// set of metadata, which each protocol sends where it can.
		sut.AddHeaders(def.GetResponseHeaders(), rpcErr.Meta().Add)
		sut.AddHeaders(def.GetResponseTrailers(), rpcErr.Meta().Add)
		if err := sut.Sleep(ctx, def.GetResponseDelayMs()); err != nil {
			return nil, err
		}
		return nil, rpcErr
	}
	res := connect.NewResponse(wrap(&conformancev1.ConformancePayload{Data: def.GetResponseData(), RequestInfo: info}))
	sut.AddHeaders(def.GetResponseHeaders(), res.Header().Add)
	sut.AddHeaders(def.GetResponseTrailers(), res.Trailer().Add)
	if err := sut.Sleep(ctx, def.GetResponseDelayMs()); err != nil {
		return nil, err
	}
	return res, nil
}

func (service) ServerStream(ctx context.Context, req *connect.Request[conformancev1.ServerStreamRequest], stream *connect.ServerStream[conformancev1.ServerStreamResponse]) error {
	def := req.Msg.GetResponseDefinition()
	if def.GetRawResponse() != nil {
		return connect.NewError(connect.CodeInvalidArgument, sut.ErrRawResponse)
	}
	msg, err := sut.Any(req.Msg)
	if err != nil {
		return internalError(err)
	}
	info := sut.RequestInfo(ctx, headers(req.Header()), nil, []*anypb.Any{msg})
	sut.AddHeaders(def.GetResponseHeaders(), stream.ResponseHeader().Add)
	sut.AddHeaders(def.GetResponseTrailers(), stream.ResponseTrailer().Add)
	if len(def.GetResponseData()) > 0 {
		// Send(nil) sends the headers alone, so that the client sees them
		// before the first delay.
		if err := stream.Send(nil); err != nil {
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

func (service) BidiStream(ctx context.Context, stream *connect.BidiStream[conformancev1.BidiStreamRequest, conformancev1.BidiStreamResponse]) error {
	var (
		def        *conformancev1.StreamResponseDefinition
		fullDuplex bool
		received   int          // request messages read
		pending    []*anypb.Any // received since the last response (full duplex) or all (half duplex)
		sent       int          // responses sent
	)
	info := func() *conformancev1.ConformancePayload_RequestInfo {
		if sent == 0 {
			return sut.RequestInfo(ctx, headers(stream.RequestHeader()), nil, pending)
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
				return connect.NewError(connect.CodeInvalidArgument, sut.ErrRawResponse)
			}
			sut.AddHeaders(def.GetResponseHeaders(), stream.ResponseHeader().Add)
			sut.AddHeaders(def.GetResponseTrailers(), stream.ResponseTrailer().Add)
			if fullDuplex && len(def.GetResponseData()) > 0 {
				if err := stream.Send(nil); err != nil { // the headers alone
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
		if err := stream.Send(nil); err != nil { // the headers alone, before the first delay
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

// newError returns the connect-go v1 error that spec describes.
func newError(spec *conformancev1.Error) *connect.Error {
	err := connect.NewError(connect.Code(spec.GetCode()), errors.New(spec.GetMessage()))
	for _, detail := range spec.GetDetails() {
		d, detailErr := connect.NewErrorDetail(detail)
		if detailErr != nil {
			return internalError(detailErr)
		}
		err.AddDetail(d)
	}
	return err
}

func internalError(err error) *connect.Error {
	return connect.NewError(connect.CodeInternal, err)
}

// headers returns request headers as the suite echoes them.
func headers(h http.Header) []*conformancev1.Header {
	return sut.Headers(maps.All(h))
}
