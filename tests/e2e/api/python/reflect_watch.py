"""A Python gRPC client that knows nothing of Capstan's .proto files: it learns the API through
server reflection, triggers a sequence and watches the run to its end, then prints JSON."""

import json
import sys

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor_pool import DescriptorPool
from google.protobuf.message_factory import GetMessageClass
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def main() -> None:
    address, token, project, sequence = sys.argv[1:5]
    channel = grpc.insecure_channel(address)
    pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    service = pool.FindServiceByName("capstan.v1.RunService")
    metadata = [("authorization", f"Bearer {token}")]

    def classes(name):
        method = service.FindMethodByName(name)
        return GetMessageClass(method.input_type), GetMessageClass(method.output_type)

    request_class, response_class = classes("Trigger")
    trigger = channel.unary_unary(
        "/capstan.v1.RunService/Trigger",
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    request = json_format.ParseDict(
        {"project": project, "stage": "dev", "sequence": sequence, "dataStruct": {"client": "python"}},
        request_class(),
    )
    run_id = trigger(request, metadata=metadata, timeout=30).run_id

    request_class, response_class = classes("Watch")
    watch = channel.unary_stream(
        "/capstan.v1.RunService/Watch",
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    events = watch(request_class(run_id=run_id, from_seq=1), metadata=metadata, timeout=60)
    kinds = [event.kind for event in events]
    print(json.dumps({"runId": run_id, "kinds": kinds}))


if __name__ == "__main__":
    main()
