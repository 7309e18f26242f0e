"""Drives a KServe v2 gRPC server with the real ``tritonclient[grpc]`` and prints what it saw as JSON.

Runs in its own virtual environment (.venv-triton: tritonclient pins protobuf<7, this project's
stubs need 7), so it imports only tritonclient, numpy (its dependency) and the standard library.

    .venv-triton/bin/python tests/integration/kserve_client.py ADDRESS MODEL PROMPT MAX_TOKENS
"""

from __future__ import annotations

import json
import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

TIMEOUT_S = 30.0


def inputs(prompt: str, max_tokens: int, *, stream: bool) -> list:
    """The tensors of Triton's vLLM backend: a greedy request for ``max_tokens`` tokens."""
    def tensor(name, datatype, value):
        t = grpcclient.InferInput(name, [1], datatype)
        t.set_data_from_numpy(np.array([value], dtype=np.object_ if datatype == "BYTES" else np.bool_))
        return t

    sampling = json.dumps({"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    return [tensor("text_input", "BYTES", prompt.encode()), tensor("stream", "BOOL", stream),
            tensor("sampling_parameters", "BYTES", sampling.encode()),
            tensor("exclude_input_in_output", "BOOL", True)]


def text(result, name: str = "text_output") -> str:
    return result.as_numpy(name)[0].decode()


def error(call) -> dict:
    try:
        call()
    except InferenceServerException as err:
        return {"status": str(err.status()), "message": err.message()}
    return {"status": None}


def streamed(client, model: str, prompt: str, max_tokens: int) -> dict:
    """One ModelStreamInfer request: its chunks' texts and triton_final_response flags."""
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    client.async_stream_infer(model, inputs(prompt, max_tokens, stream=True), request_id="s1")
    chunks, finals, errors = [], [], []
    while not finals or not finals[-1]:
        result, err = answers.get(timeout=TIMEOUT_S)
        if err is not None:
            errors.append(str(err))
            break
        chunks.append(text(result))
        finals.append(result.get_response().parameters["triton_final_response"].bool_param)
    client.stop_stream()
    return {"chunks": chunks, "finals": finals, "errors": errors}


def main(address: str, model: str, prompt: str, max_tokens: int) -> dict:
    client = grpcclient.InferenceServerClient(url=address)
    result = client.infer(model, inputs(prompt, max_tokens, stream=False), client_timeout=TIMEOUT_S)
    metadata = client.get_model_metadata(model, as_json=True)
    return {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "inputs": [t["name"] for t in metadata["inputs"]],
        "outputs": [t["name"] for t in metadata["outputs"]],
        "decoupled": client.get_model_config(model, as_json=True)["config"]["model_transaction_policy"]["decoupled"],
        "infer": {"text": text(result), "finish_reason": text(result, "finish_reason"),
                  "num_input_tokens": int(result.as_numpy("num_input_tokens")[0]),
                  "num_output_tokens": int(result.as_numpy("num_output_tokens")[0])},
        "stream": streamed(client, model, prompt, max_tokens),
        "unknown_model": error(lambda: client.infer("no-such-model", inputs(prompt, 1, stream=False))),
        "bad_parameters": error(lambda: client.infer(model, inputs(prompt, 0, stream=False))),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))))
