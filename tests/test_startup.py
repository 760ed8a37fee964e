"""Start-up stays cheap: `import nibblora`, the torch-free packages and the tools' --help never import torch
(each checked in a fresh interpreter), and the lazy names resolve to the real objects."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import nibblora

# Packages a data pipeline, a run-store reader or the dashboard imports: none of them may pull torch in.
TORCH_FREE_MODULES = [
    "nibblora",
    "nibblora.errors",
    "nibblora.runs",
    "nibblora.memory",
    "nibblora.memory.cli",
    "nibblora.tui",
    "nibblora.tui.app",
    "nibblora.tui.text",
    "nibblora.models",
    "nibblora.models.config",
    "nibblora.lora",
    "nibblora.lora.config",
    "nibblora.lora.params",
    "nibblora.verify",
    "nibblora.compare",
    "nibblora.compare.cli",
    "nibblora.demo.tasks",
]


# Every `python -m` tool and the dashboard; --help must not import torch.
TOOLS = [
    "nibblora.tui",
    "nibblora.memory",
    "nibblora.prepare",
    "nibblora.quantize",
    "nibblora.merge",
    "nibblora.verify",
    "nibblora.train",
    "nibblora.serve",
    "nibblora.compare",
]

PROBE = textwrap.dedent("""
    import json, runpy, sys
    mode, target = sys.argv[1], sys.argv[2]
    code = None
    if mode == "import":
        __import__(target)
    else:
        sys.argv = [target, *sys.argv[3:]]
        try:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        except SystemExit as exit:
            code = exit.code
    print(json.dumps({"torch": "torch" in sys.modules, "code": code}))
""")


def _probe(mode: str, target: str, *args: str) -> dict:
    """Run the probe in a fresh interpreter with -X importtime; returns its verdict and, when torch was
    imported, the chain of modules that imported it."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", PROBE, mode, target, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_COLOR": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["chain"] = torch_import_chain(proc.stderr)
    return result


def torch_import_chain(importtime: str) -> list[str]:
    """From `-X importtime` output, the modules from the top-level import down to `torch` (outermost first).
    Lines are printed when an import finishes, children before their parent, indented by depth."""
    entries = []
    for line in importtime.splitlines():
        if not line.startswith("import time:") or "|" not in line or "cumulative" in line:
            continue
        name_field = line.rsplit("|", 1)[1]
        name = name_field.strip()
        depth = (len(name_field) - len(name_field.lstrip(" ")) - 1) // 2
        entries.append((depth, name))
    for i, (depth, name) in enumerate(entries):
        if name == "torch":
            chain = [name]
            for later_depth, later_name in entries[i + 1 :]:
                if later_depth < depth:
                    chain.append(later_name)
                    depth = later_depth
            return chain[::-1]
    return []


@pytest.mark.parametrize(
    "module", TORCH_FREE_MODULES + ["nibblora.data", "nibblora.quant.names", "nibblora.serve.registry"]
)
def test_importing_does_not_import_torch(module):
    result = _probe("import", module)
    assert not result["torch"], f"import {module} imported torch through {' -> '.join(result['chain'])}"


@pytest.mark.parametrize("tool", TOOLS)
def test_tool_help_does_not_import_torch(tool):
    result = _probe("run", tool, "--help")
    assert result["code"] == 0
    assert not result["torch"], f"python -m {tool} --help imported torch through {' -> '.join(result['chain'])}"


def test_tui_once_does_not_import_torch(tmp_path):
    """The plain-text summary of an empty runs folder, as a script would call it (no GPU driver needed)."""
    result = _probe("run", "nibblora.tui", "--once", str(tmp_path))
    assert result["code"] in (0, None)
    if not any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/dxg")):
        assert not result["torch"], " -> ".join(result["chain"])


def test_the_import_chain_parser_finds_who_imported_torch():
    # -X importtime prints children before parents; depth is the indentation after the second '|'.
    sample = "\n".join(
        [
            "import time: self [us] | cumulative | imported package",
            "import time:       100 |        100 |       torch._C",
            "import time:       200 |        300 |     torch",
            "import time:        50 |        350 |   nibblora.data.collate",
            "import time:        10 |        360 | nibblora.data",
        ]
    )
    assert torch_import_chain(sample) == ["nibblora.data", "nibblora.data.collate", "torch"]
    assert torch_import_chain("import time: 1 | 1 | json") == []


# --- the lazy names ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "package", ["nibblora", "nibblora.models", "nibblora.lora", "nibblora.memory", "nibblora.verify"]
)
def test_every_exported_name_resolves_to_the_defining_modules_object(package):
    import importlib

    module = importlib.import_module(package)
    for name in module.__all__:
        value = getattr(module, name)
        assert value is not None, name
        assert name in dir(module), name
    with pytest.raises(AttributeError, match=rf"module '{package}' has no attribute 'no_such_name'"):
        module.no_such_name  # noqa: B018


def test_top_level_names_are_the_library_objects():
    from nibblora.errors import CheckpointError
    from nibblora.lora.layers import LoRALinear
    from nibblora.models.llama import generate
    from nibblora.models.loading import load_model

    assert nibblora.CheckpointError is CheckpointError
    assert nibblora.LoRALinear is LoRALinear
    assert nibblora.load_model is load_model
    assert nibblora.generate is generate and nibblora.models.generate is generate
    from nibblora import LlamaForCausalLM, quantize_4bit  # noqa: F401  (from-import goes through __getattr__ too)


def test_version_comes_from_the_native_extension_else_from_the_installed_metadata(monkeypatch):
    from importlib import metadata

    from nibblora import _native

    monkeypatch.setattr(_native, "__version__", "9.8.7", raising=False)
    assert nibblora._read_version() == "9.8.7"
    monkeypatch.delattr(_native, "__version__")
    try:
        expected = metadata.version("nibblora")
    except metadata.PackageNotFoundError:
        expected = "0+unknown"
    assert nibblora._read_version() == expected
    assert isinstance(nibblora.__version__, str) and nibblora.__version__


def test_the_cuda_fallback_does_not_import_torch_on_a_linux_machine_without_nvidia_devices(monkeypatch):
    from nibblora.tui import hardware

    monkeypatch.setattr(hardware.glob, "glob", lambda pattern: [])
    assert not hardware.cuda_driver_may_exist("linux")
    assert hardware.cuda_driver_may_exist("darwin")  # elsewhere only torch can tell
    monkeypatch.setattr(hardware.glob, "glob", lambda pattern: ["/dev/dxg"] if pattern == "/dev/dxg" else [])
    assert hardware.cuda_driver_may_exist("linux")  # WSL2


def test_qlora_tui_names_the_missing_extra_instead_of_a_traceback(monkeypatch, capsys):
    from nibblora.tui import cli

    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None if name == "textual" else object())
    assert cli.main(["runs"]) == 2
    assert capsys.readouterr().err == (
        "qlora-tui: error: textual not installed; install the dashboard's extra: pip install 'nibblora[tui]'\n"
    )


def test_subpackages_are_attributes_of_a_bare_import_nibblora():
    """`import nibblora; nibblora.quant.quantize_4bit(...)` worked when the top level imported everything."""
    code = "import nibblora, sys; assert 'torch' not in sys.modules; print(nibblora.quant.quantize_4bit.__module__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "nibblora.quant.api"
    assert "quant" in dir(nibblora) and "runs" in dir(nibblora)
