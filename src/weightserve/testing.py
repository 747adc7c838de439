"""Helpers for tests, benchmarks and the demo: small checkpoints and a server in a thread.

Never imported by the server, cache, sharding, loaders, storage or client code (an
import-linter contract keeps it so): it imports torch and the whole server.

- `write_llama_checkpoint` writes a deterministic tiny Llama directory (seeded
  values, so every run writes the same bytes; every file written atomically).
- `BackgroundServer` runs a real server on its own thread and event loop.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import math
import threading
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from types import TracebackType

import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from safetensors.torch import save_file

from weightserve.atomic import atomic_write
from weightserve.config import ServerConfig
from weightserve.server.build import build_server
from weightserve.server.process import Server


@dataclass(frozen=True)
class LlamaShape:
    """The config.json fields that decide a Llama checkpoint's tensor shapes."""

    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_hidden_layers: int = 8
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    vocab_size: int = 32000
    tie_word_embeddings: bool = False

    def config_json(self) -> dict[str, object]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **asdict(self),
            "head_dim": self.hidden_size // self.num_attention_heads,
            "rms_norm_eps": 1e-5,
            "torch_dtype": "bfloat16",
        }


def llama_tensor_shapes(shape: LlamaShape) -> dict[str, tuple[int, ...]]:
    """Hugging Face names and shapes of a Llama checkpoint, in layer order."""
    h, i, v = shape.hidden_size, shape.intermediate_size, shape.vocab_size
    kv = shape.num_key_value_heads * (h // shape.num_attention_heads)
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(shape.num_hidden_layers):
        p = f"model.layers.{layer}."
        out |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
    out["model.norm.weight"] = (h,)
    if not shape.tie_word_embeddings:
        out["lm_head.weight"] = (v, h)
    return out


def deterministic_tensors(
    shapes: dict[str, tuple[int, ...]], dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Seeded normal(0, 0.02) weights; norms are ones, as a fresh model has them."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, size in shapes.items():
        if name.endswith("norm.weight"):
            out[name] = torch.ones(size, dtype=dtype)
        else:
            out[name] = (torch.randn(size, generator=gen) * 0.02).to(dtype)
    return out


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path), {"format": "pt"})


def _write_json(obj: object, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2))


def write_sharded_safetensors(tensors: dict[str, torch.Tensor], out_dir: Path, num_files: int) -> list[Path]:
    """Split `tensors` over `num_files` safetensors files plus model.safetensors.index.json."""
    names = list(tensors)
    per_file = math.ceil(len(names) / num_files)
    weight_map: dict[str, str] = {}
    files = []
    for part in range(num_files):
        chunk = names[part * per_file : (part + 1) * per_file]
        filename = f"model-{part + 1:05d}-of-{num_files:05d}.safetensors"
        subset = {n: tensors[n].contiguous() for n in chunk}
        atomic_write(out_dir / filename, partial(_save_safetensors, subset))
        weight_map.update(dict.fromkeys(chunk, filename))
        files.append(out_dir / filename)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    atomic_write(out_dir / "model.safetensors.index.json", partial(_write_json, index))
    return files


def write_llama_checkpoint(out_dir: Path, shape: LlamaShape, num_files: int = 2, seed: int = 0) -> list[Path]:
    """A complete tiny Llama directory: sharded safetensors, index, config and tokenizer config."""
    tensors = deterministic_tensors(llama_tensor_shapes(shape), seed=seed)
    files = write_sharded_safetensors(tensors, out_dir, num_files)
    atomic_write(out_dir / "config.json", partial(_write_json, shape.config_json()))
    gen_config = {"bos_token_id": 1, "eos_token_id": 2}
    atomic_write(out_dir / "generation_config.json", partial(_write_json, gen_config))
    tok_config = {"model_max_length": 4096, "bos_token": "<s>", "eos_token": "</s>"}
    atomic_write(out_dir / "tokenizer_config.json", partial(_write_json, tok_config))
    return files


class BackgroundServer:
    """Runs `build_server(config)` on a daemon thread; `address` is ready on enter.

    Example:
        >>> with BackgroundServer(ServerConfig(model_roots=(root,), listen="127.0.0.1:0")) as s:  # doctest: +SKIP
        ...     WeightClient(s.address).list_models()
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.server: Server | None = None
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="weightserve-server", daemon=True)

    @property
    def address(self) -> str:
        assert self.server is not None
        if self.config.listen.startswith("unix:"):
            return self.config.listen
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.server.port}"

    @property
    def control_address(self) -> str:
        """Where ControlService, Prefetch and Evict answer: the control port, or `address` without one."""
        assert self.server is not None
        listen = self.config.control_listen
        if not listen:
            return self.address
        if listen.startswith("unix:"):
            return listen
        return f"{listen.rsplit(':', 1)[0]}:{self.server.control_port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self.server = build_server(self.config)
            self._loop.run_until_complete(self.server.start())
        except BaseException as e:  # reported to the thread that called start()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    def start(self) -> BackgroundServer:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def stop(self, grace: float | None = 0) -> None:
        """Drain for `grace` seconds, then stop the loop and join the thread."""
        if self.server is not None and self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self.server.stop(grace), self._loop).result()
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# --------------------------------------------------------------- TLS test certificates


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


@dataclass(frozen=True)
class Pair:
    """A test certificate and its key, as PEM (made with `cryptography`: make_ca, make_leaf)."""

    cert: bytes
    key: bytes
    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey

    def write(self, folder: Path, stem: str) -> tuple[Path, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        cert, key = folder / f"{stem}.crt", folder / f"{stem}.key"
        cert.write_bytes(self.cert)
        key.write_bytes(self.key)
        return cert, key


def _pair(certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pair:
    return Pair(
        certificate.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        certificate,
        key,
    )


def make_ca(name: str = "weightserve test CA") -> Pair:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(utc_now() - datetime.timedelta(days=1))
        .not_valid_after(utc_now() + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return _pair(certificate, key)


def make_leaf(
    ca: Pair,
    common_name: str,
    *,
    client: bool = False,
    also_client: bool = False,
    dns: tuple[str, ...] = ("localhost",),
    ips: tuple[str, ...] = ("127.0.0.1",),
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> Pair:
    """A server (or, with `client`, a client) certificate signed by `ca`.

    `also_client`: a server certificate that is a client's too (serverAuth and clientAuth), as a
    fleet replica's is under mTLS: it presents it when it fills from another replica.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [ExtendedKeyUsageOID.SERVER_AUTH]
    if also_client and not client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or utc_now() - datetime.timedelta(days=1))
        .not_valid_after(not_after or utc_now() + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca.private_key, hashes.SHA256())
    )
    return _pair(certificate, key)
