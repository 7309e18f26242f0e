"""Generated protobuf and gRPC stubs of the KServe v2 / Triton inference protocol
(protos/inference/grpc_service.proto, package ``inference``).

Never edit the ``*_pb2*.py`` files by hand: change the .proto file and run
``python scripts/gen_protos.py inference``. Only ``frontend/kserve*.py`` uses them.
"""
