"""Shared fixtures: the real CodeAlpaca file from ../shared, tiny models, the SmolLM2 teacher."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from tiny_models import save_tiny

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CODEALPACA = SHARED_DATA / "codealpaca" / "code_alpaca_2k.json"
TINY_VOCAB = 512


@pytest.fixture(scope="session")
def codealpaca_path() -> Path:
    return CODEALPACA


@pytest.fixture(scope="session")
def codealpaca_rows() -> list[dict]:
    return json.loads(CODEALPACA.read_text())


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, codealpaca_rows) -> dict[str, Path]:
    """A tiny random GPTBigCode and Llama sharing one BPE tokenizer trained on CodeAlpaca."""
    texts = [r["instruction"] + "\n" + r["input"] + "\n" + r["output"] for r in codealpaca_rows]
    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny(arch, texts, root / arch, TINY_VOCAB)
            for arch in ("gpt_bigcode", "llama")}


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2 teacher, converted once into the repository's storage/ and reused."""
    from akd_cache.models.smollm2 import ensure_smollm2

    return ensure_smollm2(REPO / "storage" / "models" / "smollm2-135m-instruct")


S3_BUCKET = "bucket"
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint, moto's server, with one bucket; s3fs (and botocore, DVC, any child
    process) reach it through the standard AWS_* variables, AWS_ENDPOINT_URL among them."""
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {**FAKE_AWS, "AWS_ENDPOINT_URL": url}.items():
            mp.setenv(name, value)
        boto3.client("s3").create_bucket(Bucket=S3_BUCKET)
        yield url
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()
