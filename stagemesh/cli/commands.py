"""`stagemesh` command line: generate, demo-model (and the mesh commands as they exist)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from stagemesh.cli import stream, up_command
from stagemesh.cli.connect import add_client_flags, connect_from_args
from stagemesh.cli.help_format import show_defaults
from stagemesh.cli.requests_io import add_sampling_flags, sampling_from_args
from stagemesh.deploy.hub import add_model_arguments, resolve_model
from stagemesh.errors import StagemeshError


def _generate_args(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    add_model_arguments(p, "run the in-process engine on this model", group=where)
    where.add_argument("--addr", help="HOST:PORT of a running mesh's gateway")
    p.add_argument("--prompt", help="text prompt (needs the model's tokenizer.json)")
    p.add_argument("--token-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--input", help='JSONL file: {"prompt": ...} or {"token_ids": [...]} per line, optional per-line sampling keys')
    add_sampling_flags(p.add_argument_group("sampling (the defaults of --input's per-line keys)"))
    p.add_argument("--json", action="store_true", help="one JSON object per input line, in input order")
    p.add_argument("--stream", action="store_true", help="print the text as its tokens come (one request)")
    local = p.add_argument_group("in-process engine (--model)")
    local.add_argument("--pp", type=int, default=1, help="pipeline stages, run in this process")
    local.add_argument("--device", default="cpu", help="torch device of every stage, e.g. cpu, cuda, cuda:1")
    local.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                       help="dtype of the weights and KV cache (default: the checkpoint's)")
    local.add_argument("--kv-blocks", type=int, default=None, help="KV-cache blocks per stage (default: from a memory budget)")
    local.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    local.add_argument("--max-batch-tokens", type=int, default=512, help="token budget of one step")
    add_client_flags(p)


def _cmd_generate(args: argparse.Namespace) -> int:
    from stagemesh.cli.requests_io import read_inputs, write_outcomes

    lines = read_inputs(args.prompt, args.token_ids, args.input, sampling_from_args(args))
    if args.model:
        from stagemesh.cli.inprocess import InProcessEngine

        engine = InProcessEngine(
            resolve_model(args.model, args.revision).path,
            pp=args.pp,
            device=args.device,
            dtype=args.dtype,
            num_kv_blocks=args.kv_blocks,
            block_size=args.block_size,
            max_num_batched_tokens=args.max_batch_tokens,
        )
        if args.stream:
            return _stream(engine.stream(stream.one_line(lines, args.json)))
        outcomes = asyncio.run(engine.run(lines))
    elif args.stream:
        return _stream(_remote_stream(args, stream.one_line(lines, args.json)))
    else:
        from stagemesh.cli.remote import run_remote

        outcomes = asyncio.run(run_remote(args.addr, lines, connect_from_args(args)))
    return write_outcomes(outcomes, args.json, sys.stdout, sys.stderr)


def _stream(pieces) -> int:
    from stagemesh.cli.stream import print_pieces

    asyncio.run(print_pieces(pieces, sys.stdout))
    return 0


async def _remote_stream(args: argparse.Namespace, line):
    from stagemesh.cli.stream import remote_pieces

    async with connect_from_args(args).client(args.addr) as client:
        async for piece in remote_pieces(client, line):
            yield piece


def _cmd_status(args: argparse.Namespace) -> int:
    import json

    from stagemesh.cli.remote import fetch_status, format_status

    doc = asyncio.run(fetch_status(args.addr, connect_from_args(args)))
    print(json.dumps(doc, indent=2) if args.json else format_status(doc))
    return 0


def _bench_args(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, "the mesh's model, for the compared systems and the figures")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages of the mesh brought up for the run")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per stage of that mesh")
    p.add_argument("--dp", type=int, default=1, help="data-parallel chains of that mesh")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the mesh and the compared systems compute")
    p.add_argument("--addr", default=None, help="HOST:PORT of a running mesh to benchmark instead of bringing one up")
    p.add_argument("--redis-url", default=None, help="with --addr: that mesh's Redis, for per-stage busy figures")
    p.add_argument("--requests", type=int, required=True, help="requests in the run")
    p.add_argument("--input-len", type=int, required=True, help="prompt tokens (the minimum with --input-len-max)")
    p.add_argument("--input-len-max", type=int, default=None, help="prompt lengths uniform in [--input-len, this]")
    p.add_argument("--output-len", type=int, required=True, help="generated tokens (the minimum with --output-len-max)")
    p.add_argument("--output-len-max", type=int, default=None, help="output lengths uniform in [--output-len, this]")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--concurrency", type=int, default=None, help="requests in flight at most (default: all at once)")
    pace.add_argument("--rate", type=float, default=None, help="Poisson arrivals, requests per second")
    p.add_argument("--compare", default="", help="also run the requests through: hf, inprocess (comma-separated)")
    p.add_argument("--no-mesh", action="store_true", help="run only the --compare systems")
    p.add_argument("--no-overlap", dest="overlap", action="store_false",
                   help="turn overlap scheduling off in the mesh brought up and the in-process engine")
    p.add_argument("--no-cpu-bind", dest="cpu_bind", action="store_false",
                   help="leave the workers of the mesh brought up unbound (by default each gets cores of its own when there are enough)")
    p.add_argument("--micro-batches", type=int, default=None,
                   help="micro-batches the mesh brought up keeps in flight a chain (default: as `stagemesh up` picks)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts, lengths and arrivals")
    p.add_argument("--calibrate-s", type=float, default=3.0, help="seconds of the roofline calibration at startup")
    p.add_argument("--log-dir", type=Path, default=None, help="where the mesh's worker logs go (default: a new temp dir)")
    p.add_argument("--json", action="store_true", help="one JSON document with every figure")
    p.add_argument("--insecure", action="store_true",
                   help="bring the mesh up without mTLS between its processes or a Redis password (run once with, "
                        "once without: what the mesh's TLS costs)")
    add_client_flags(p)


def _cmd_bench(args: argparse.Namespace) -> int:
    from stagemesh.cli.bench import BenchSpec, LoadShape, run

    shape = LoadShape(
        requests=args.requests,
        input_len=args.input_len,
        output_len=args.output_len,
        input_len_max=args.input_len_max,
        output_len_max=args.output_len_max,
        concurrency=args.concurrency,
        rate=args.rate,
        seed=args.seed,
    )
    spec = BenchSpec(
        model=resolve_model(args.model, args.revision).path,
        shape=shape,
        pp=args.pp,
        tp=args.tp,
        dp=args.dp,
        addr=args.addr,
        redis_url=args.redis_url,
        compare=tuple(s.strip() for s in args.compare.split(",") if s.strip()),
        mesh=not args.no_mesh,
        device=args.device,
        calibrate_s=args.calibrate_s,
        log_dir=args.log_dir,
        overlap=args.overlap,
        micro_batches=args.micro_batches,
        cpu_bind=args.cpu_bind,
        insecure=args.insecure,
        connect=connect_from_args(args),
    )
    return run(spec, args.json)


def _compose_args(sub) -> None:
    """`compose` prints a compose file; `topology` is its planner service; `health` its health check."""
    from stagemesh.deploy import compose

    cp = sub.add_parser("compose", help="print a docker compose file for a layout: a GPU-pinned service per worker")
    compose.add_compose_arguments(cp)
    cp.set_defaults(func=compose.run_compose)
    tp = sub.add_parser("topology", help="write a compose deployment's topology to its Redis and exit (the planner service)")
    compose.add_topology_arguments(tp)
    tp.set_defaults(func=compose.run_topology)
    from stagemesh.deploy import k8s

    rp = sub.add_parser("render", help="write Kubernetes manifests for a layout (a kustomize folder: kubectl apply -k DIR)")
    k8s.add_render_arguments(rp)
    rp.set_defaults(func=k8s.run_render)
    hc = sub.add_parser("health", help="exit 0 iff the gRPC server at --addr answers grpc.health.v1 SERVING")
    hc.add_argument("--addr", required=True, help="HOST:PORT of a worker or gateway")
    hc.add_argument("--alive", action="store_true",
                    help="exit 0 iff it answers at all, SERVING or NOT_SERVING (a liveness probe: a stage waiting on "
                         "its next stage is alive)")
    hc.add_argument("--service", default="", help="the service whose health is asked (default: the server's, \"\")")
    from stagemesh.runtime.tls import add_tls_args

    add_tls_args(hc, role=True)
    hc.set_defaults(func=_cmd_health)
    certs = sub.add_parser("certs", help="make a mesh's secrets: a CA, a certificate per role, mesh.key, a Redis password")
    certs.add_argument("dir", type=Path, help="the directory to create (0700); every process's --tls-dir")
    certs.add_argument("--force", action="store_true", help="replace the secrets of a directory that has some")
    certs.add_argument("--days", type=int, default=365, help="how long the certificates are valid")
    certs.set_defaults(func=_cmd_certs)


def _cmd_certs(args: argparse.Namespace) -> int:
    from stagemesh.deploy.certs import make_secrets

    written = make_secrets(args.dir, force=args.force, days=args.days)
    print(f"{len(written)} files in {args.dir} (0700): ca.pem (the mesh CA; ca.key issues more), a .pem/.key per role "
          "(gateway, frontend, stage, expert, admin), mesh.key, redis-password, redis.conf; give every process "
          f"--tls-dir {args.dir}")
    return 0


def _cmd_health(args: argparse.Namespace) -> int:
    from stagemesh.runtime.health import answers_sync, serving_sync
    from stagemesh.runtime.tls import tls_from_args

    if args.alive:
        alive = answers_sync(args.addr, tls=tls_from_args(args))
        print(f"{args.addr}: {'answers' if alive else 'does not answer'}")
        return 0 if alive else 1
    serving = serving_sync(args.addr, service=args.service, tls=tls_from_args(args))
    print(f"{args.addr}: {'SERVING' if serving else 'not serving'}")
    return 0 if serving else 1


def _cmd_demo_model(args: argparse.Namespace) -> int:
    from stagemesh.cli import demo

    return demo.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stagemesh", description="Serve LLMs as a gRPC mesh of pipeline stages and experts.")
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING, ...")
    parser.add_argument("--version", action="version", version=f"stagemesh {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate tokens in-process (--model) or from a mesh (--addr)")
    _generate_args(gen)
    gen.set_defaults(func=_cmd_generate)
    up = sub.add_parser("up", help="start a mesh (Redis, stage workers, gateway) on this machine")
    up_command.add_up_args(up)
    up.set_defaults(func=up_command.run)
    st = sub.add_parser("status", help="chains, workers and their load, from a mesh's gateway")
    st.add_argument("--addr", required=True, help="HOST:PORT of a running mesh's gateway")
    st.add_argument("--json", action="store_true", help="the whole status document as JSON")
    add_client_flags(st)
    st.set_defaults(func=_cmd_status)
    bench = sub.add_parser("bench", help="throughput, latency and roofline of a mesh, against transformers and the in-process engine")
    _bench_args(bench)
    bench.set_defaults(func=_cmd_bench)
    _compose_args(sub)
    from stagemesh.cli import demo

    dm = sub.add_parser("demo-model", help="write a small random MoE checkpoint with a tokenizer (no download)")
    demo.add_arguments(dm)
    dm.set_defaults(func=_cmd_demo_model)
    show_defaults(parser)  # last: every subcommand's --help, whoever added it
    return parser


def _version() -> str:
    from stagemesh import __version__

    return __version__


def _reader_gone() -> int:
    """stdout's reader left (``stagemesh status | head -1``): stop quietly, as Unix tools do."""
    # NOTE: Python flushes stdout once more at exit and would report the broken pipe there:
    # stdout goes to /dev/null from here on.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141  # 128 + SIGPIPE: what a shell reports for `cat` and friends in the same place


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
        code = args.func(args)
        sys.stdout.flush()  # a reader that left fails here, inside the try, not at exit
        return code
    except BrokenPipeError:
        return _reader_gone()
    except StagemeshError as e:
        print(f"error: {e.code}: {e.message}", file=sys.stderr)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - a CLI answers with one line, never a traceback
        logging.getLogger(__name__).debug("unexpected failure", exc_info=True)
        print(f"error: {type(e).__name__}: {e} (run with --log-level DEBUG for the traceback)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
