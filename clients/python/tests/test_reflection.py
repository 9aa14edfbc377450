"""A client with no .proto files at hand: it learns the API from server reflection, as
grpcurl does, then makes a unary call and a streaming call with dynamic messages."""

from __future__ import annotations

import uuid
from typing import Any

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def test_reflection_alone_is_enough_to_call_the_service(server: str) -> None:
    with grpc.insecure_channel(server) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = database.get_services()
        assert "krisp.ingest.v1.IngestService" in services
        assert "grpc.health.v1.Health" in services
        pool = descriptor_pool.DescriptorPool(database)
        service = pool.FindServiceByName("krisp.ingest.v1.IngestService")
        methods = {m.name: m for m in service.methods}
        assert "StreamSentiments" in methods and "GetTimeline" in methods

        def message(name: str) -> Any:
            return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))

        def call(method: str, request: Any, streaming: bool = False) -> Any:
            rpc = methods[method]
            response_class = message_factory.GetMessageClass(rpc.output_type)
            path = f"/krisp.ingest.v1.IngestService/{method}"
            def serialize(m: Any) -> bytes:
                return bytes(m.SerializeToString())

            if streaming:
                return channel.stream_unary(
                    path, request_serializer=serialize,
                    response_deserializer=response_class.FromString)(request)
            return channel.unary_unary(
                path, request_serializer=serialize,
                response_deserializer=response_class.FromString)(request)

        # Describe a message, as `grpcurl describe` would.
        fields = [f.name for f in pool.FindMessageTypeByName("krisp.ingest.v1.NewSentiment").fields]
        assert fields == ["started_at", "ended_at", "label", "score"]

        user = call("CreateUser", message("krisp.ingest.v1.CreateUserRequest")(external_id=f"r-{uuid.uuid4()}")).user
        assert user.id

        # A client stream with dynamic messages: header and trailer only, zero items.
        request = message("krisp.ingest.v1.StreamSentimentsRequest")
        header = request()
        header.header.stream_id = str(uuid.uuid4())
        header.header.participation_id = str(uuid.uuid4())
        trailer = request()
        trailer.trailer.item_count = 0
        try:
            call("StreamSentiments", iter([header, trailer]), streaming=True)
            raise AssertionError("an unknown participation was accepted")
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND
