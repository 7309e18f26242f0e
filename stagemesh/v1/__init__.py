"""Generated protobuf and gRPC stubs of the stagemesh.v1 API (protos/stagemesh/v1/).

Never edit the ``*_pb2*.py`` files by hand: change the .proto files and run
``python scripts/gen_protos.py``. Code outside ``stagemesh.codec`` and the servicers/clients
should not need these modules: ``stagemesh.codec`` converts them to domain types.
"""
