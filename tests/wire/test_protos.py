"""The committed stubs in stagemesh/v1/ are what protoc makes of protos/stagemesh/v1/*.proto.

Fails when someone edits a .proto without running ``python scripts/gen_protos.py``.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

grpc_tools = pytest.importorskip("grpc_tools", reason="grpcio-tools (test extra) compiles the .proto files")
from grpc_tools import protoc  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "protos" / "stagemesh" / "v1"
STUB_DIR = ROOT / "stagemesh" / "v1"
PROTOS = sorted(p.stem for p in PROTO_DIR.glob("*.proto"))
SERVICES = {"gateway": ["Gateway"], "scheduling": ["Scheduling"], "stage": ["Stage"], "expert": ["Expert"],
            "admin": ["Admin"]}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """Every .proto compiled now, by file name (``stagemesh/v1/x.proto``)."""
    out = tmp_path_factory.mktemp("protos") / "set.pb"
    wkt = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto shipped with grpcio-tools
    args = ["protoc", f"-I{ROOT / 'protos'}", f"-I{wkt}", f"--descriptor_set_out={out}"]
    rc = protoc.main(args + [str(PROTO_DIR / f"{name}.proto") for name in PROTOS])
    assert rc == 0, "protoc failed on protos/stagemesh/v1/*.proto"
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return {f.name: f for f in fds.file}


def test_every_proto_has_a_stub_and_every_stub_a_proto():
    assert set(PROTOS) == {"tensor", "sampling", "gateway", "scheduling", "stage", "expert", "admin"}
    stubs = {p.name.removesuffix("_pb2.py") for p in STUB_DIR.glob("*_pb2.py")}
    assert stubs == set(PROTOS), "run python scripts/gen_protos.py"


def _json_name(field_name: str) -> str:
    """protoc's default JSON name: snake_case to lowerCamelCase."""
    head, *rest = field_name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _normalized(fd: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """``fd`` without default json_names: protoc writes them, the Python generator drops them."""
    fd = descriptor_pb2.FileDescriptorProto.FromString(fd.SerializeToString())
    pending = list(fd.message_type)
    while pending:
        message = pending.pop()
        pending.extend(message.nested_type)
        for field in [*message.field, *message.extension]:
            if field.json_name == _json_name(field.name):
                field.ClearField("json_name")
    return fd


@pytest.mark.parametrize("name", PROTOS)
def test_committed_stub_matches_proto(name, compiled):
    module = importlib.import_module(f"stagemesh.v1.{name}_pb2")
    committed = _normalized(descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb))
    fresh = _normalized(compiled[f"stagemesh/v1/{name}.proto"])
    assert committed == fresh, f"stagemesh/v1/{name}_pb2.py is stale: run python scripts/gen_protos.py"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_grpc_module_exposes_every_method(name, compiled):
    grpc_module = importlib.import_module(f"stagemesh.v1.{name}_pb2_grpc")
    services = {s.name: s for s in compiled[f"stagemesh/v1/{name}.proto"].service}
    assert sorted(services) == SERVICES[name]
    for service_name, service in services.items():
        servicer = getattr(grpc_module, f"{service_name}Servicer")
        assert callable(getattr(grpc_module, f"add_{service_name}Servicer_to_server"))
        stub_class = getattr(grpc_module, f"{service_name}Stub")
        for method in service.method:
            assert callable(getattr(servicer, method.name)), f"{service_name}Servicer lacks {method.name}"
            assert method.name in stub_class.__init__.__code__.co_names, f"{service_name}Stub lacks {method.name}"


def test_streaming_shapes_of_the_rpcs(compiled):
    def shape(file: str, service: str, method: str) -> tuple[bool, bool]:
        svc = next(s for s in compiled[f"stagemesh/v1/{file}.proto"].service if s.name == service)
        m = next(m for m in svc.method if m.name == method)
        return m.client_streaming, m.server_streaming

    assert shape("gateway", "Gateway", "Generate") == (False, True)
    assert shape("gateway", "Gateway", "Status") == (False, False)
    assert shape("scheduling", "Scheduling", "Connect") == (True, True)
    assert shape("stage", "Stage", "Forward") == (True, True)
    assert shape("expert", "Expert", "Run") == (True, True)


def test_seed_keeps_presence():
    from stagemesh.v1 import sampling_pb2

    msg = sampling_pb2.SamplingParams()
    assert not msg.HasField("seed")
    msg.seed = 0
    assert msg.HasField("seed")


INFERENCE_DIR = ROOT / "protos" / "inference"
INFERENCE_RPCS = {"ServerLive": (False, False), "ServerReady": (False, False), "ModelReady": (False, False),
                  "ServerMetadata": (False, False), "ModelMetadata": (False, False), "ModelInfer": (False, False),
                  "ModelStreamInfer": (True, True), "ModelConfig": (False, False)}


@pytest.fixture(scope="module")
def inference(tmp_path_factory) -> descriptor_pb2.FileDescriptorProto:
    """protos/inference/grpc_service.proto compiled now, under the virtual path gen_protos.py uses."""
    out = tmp_path_factory.mktemp("inference") / "set.pb"
    rc = protoc.main(["protoc", f"-Istagemesh/inference={INFERENCE_DIR}", f"--descriptor_set_out={out}",
                      str(INFERENCE_DIR / "grpc_service.proto")])
    assert rc == 0, "protoc failed on protos/inference/grpc_service.proto"
    (fd,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    return fd


def test_the_kserve_stub_matches_its_proto(inference):
    from stagemesh.inference import grpc_service_pb2

    committed = _normalized(descriptor_pb2.FileDescriptorProto.FromString(grpc_service_pb2.DESCRIPTOR.serialized_pb))
    assert committed == _normalized(inference), "stale: run python scripts/gen_protos.py inference"


def test_the_kserve_service_keeps_its_public_names(inference):
    from stagemesh.inference import grpc_service_pb2_grpc

    assert inference.package == "inference"  # what clients call: /inference.GRPCInferenceService/<Method>
    (service,) = inference.service
    assert service.name == "GRPCInferenceService"
    assert {m.name: (m.client_streaming, m.server_streaming) for m in service.method} == INFERENCE_RPCS
    assert callable(grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server)
