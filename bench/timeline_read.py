"""python-read of krisp-bench: reads one participation's whole timeline through
GetTimeline with grpcio, in chunks, and prints `<entries> <seconds>`: the time from the
call to its last entry, every entry decoded and looked at.

Usage: timeline_read.py <proto dir> <host:port> <participation id>
"""

import importlib
import pathlib
import sys
import tempfile
import time

import grpc
from grpc_tools import protoc


def stubs(proto_dir: pathlib.Path, out: pathlib.Path):
    files = [str(p) for p in sorted((proto_dir / "krisp/ingest/v1").glob("*.proto"))]
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    code = protoc.main(
        ["protoc", f"-I{proto_dir}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}", *files]
    )
    if code != 0:
        sys.exit(f"protoc failed ({code})")
    for package in ["krisp", "krisp/ingest", "krisp/ingest/v1"]:
        (out / package / "__init__.py").touch()
    sys.path.insert(0, str(out))
    messages = importlib.import_module("krisp.ingest.v1.ingest_service_pb2")
    services = importlib.import_module("krisp.ingest.v1.ingest_service_pb2_grpc")
    return messages, services


def main() -> None:
    proto_dir, address, participation_id = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    with tempfile.TemporaryDirectory() as out:
        messages, services = stubs(proto_dir, pathlib.Path(out))
        options = [("grpc.max_receive_message_length", 8 << 20)]
        with grpc.insecure_channel(address, options=options) as channel:
            grpc.channel_ready_future(channel).result(timeout=10)
            client = services.IngestServiceStub(channel)
            request = messages.GetTimelineRequest(participation_id=participation_id, chunked=True)
            started = time.perf_counter()
            entries = 0
            for message in client.GetTimeline(request):
                for entry in message.entries:
                    if entry.WhichOneof("entry") is not None:
                        entries += 1
            seconds = time.perf_counter() - started
    print(entries, f"{seconds:.6f}")


if __name__ == "__main__":
    main()
