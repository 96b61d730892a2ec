"""The layout keeps its design: no import cycle, no module importing a layer above its own (`layers.txt`), a light
`import vl_joint_encoder`, commands that parse before loading torch, remote-code files that import only each other."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("vl_joint_encoder", "conversion")
HEAVY = ("torch", "transformers", "faiss", "datasets", "accelerate", "ranx", "PIL", "h5py", "matplotlib", "numba")


def module_graph() -> dict[str, set[str]]:
    """Every import of a project module (also inside functions), as the shared `import_graph.py` counts them."""
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(parts)] = path
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name and not (path.name == "__init__.py" and target.startswith(name + ".")):
                    found.add(target)
        graph[name] = found
    return graph


def layer_of(module: str, layers: list[list[str]]) -> int:
    best = (-1, -1)
    for index, prefixes in enumerate(layers):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                best = max(best, (len(prefix), index))
    return best[1]


def test_no_import_cycle_and_layers_respected():
    graph = module_graph()
    layers = [line.split() for line in (ROOT / "layers.txt").read_text().splitlines() if line.strip() and not line.startswith("#")]
    unlisted = [m for m in graph if layer_of(m, layers) < 0]
    assert not unlisted, f"modules missing from layers.txt: {unlisted}"
    violations = [
        f"{m} (layer {layer_of(m, layers)}) imports {t} (layer {layer_of(t, layers)})"
        for m, targets in graph.items()
        for t in targets
        if layer_of(t, layers) > layer_of(m, layers)
    ]
    assert not violations, "\n".join(violations)
    # cycles: depth-first search for a back edge
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for target in graph[node]:
            if state.get(target) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(target):] + [target])}")
            if target not in state:
                visit(target, stack + [target])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_remote_code_files_import_only_each_other():
    """`save_pretrained` copies these files next to the weights: a relative import of any other module would break
    `AutoModel.from_pretrained(folder, trust_remote_code=True)` where the package is not installed."""
    remote = {"configuration_joint_encoder", "modeling_joint_encoder", "processing_joint_encoder", "images",
              "clip_resnet", "sentence_transformers_files", "sentence_transformers_joint_encoder"}
    graph = module_graph()
    for name in remote:
        targets = {t.removeprefix("vl_joint_encoder.") for t in graph[f"vl_joint_encoder.{name}"]}
        assert targets <= remote, f"{name} imports {targets - remote}"


def run_python(code: str) -> dict:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_is_light_and_still_registers_the_auto_classes():
    out = run_python(
        "import json, sys\n"
        "import vl_joint_encoder\n"
        f"light = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "from transformers import AutoConfig, AutoModel, AutoProcessor\n"
        "config = AutoConfig.for_model('vl_joint_encoder', d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,"
        " vocab_size=99, feat_dim=16)\n"
        "model = AutoModel.from_config(config)\n"
        "from transformers.models.auto.processing_auto import PROCESSOR_MAPPING\n"
        "print(json.dumps({'light': light, 'model': type(model).__name__,"
        " 'processor': PROCESSOR_MAPPING[type(config)].__name__, 'version': vl_joint_encoder.__version__}))"
    )
    assert out["light"] == [], f"import vl_joint_encoder loaded {out['light']}"
    assert out["model"] == "JointEncoderModel" and out["processor"] == "JointEncoderProcessor"


def test_registration_when_transformers_was_imported_first():
    out = run_python(
        "import json\n"
        "from transformers import AutoConfig, AutoModel\n"
        "import vl_joint_encoder\n"
        "config = AutoConfig.for_model('vl_joint_encoder', d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,"
        " vocab_size=99, feat_dim=16)\n"
        "print(json.dumps({'model': type(AutoModel.from_config(config)).__name__,"
        " 'exported': vl_joint_encoder.JointEncoderModel.__name__}))"
    )
    assert out == {"model": "JointEncoderModel", "exported": "JointEncoderModel"}


@pytest.mark.parametrize(
    "argv, code",
    [
        (["--help"], 0),
        (["encode", "--help"], 0),
        (["search", "--model", "m", "--no-such-option", "1"], 2),
        (["evaluate", "--run", "r.json"], 2),  # --qrels missing
        (["extract-features", "--model", "m", "--output", "o"], 2),  # neither --images nor --dataset
        (["index", "--embeddings", "e", "--output_dir", "o", "--kind", "lsh"], 2),
        (["encode", str(ROOT / "no-such-config.yaml")], 2),
    ],
)
def test_commands_parse_before_loading_torch(argv, code):
    """`--help` and argument errors come back before torch (or any heavy library) is imported."""
    out = run_python(
        "import json, sys\n"
        "from vl_joint_encoder.cli import main\n"
        "try:\n"
        f"    code = main({argv!r})\n"
        "except SystemExit as exit_:\n"
        "    code = exit_.code\n"
        f"print(json.dumps({{'code': code, 'loaded': [m for m in {HEAVY!r} if m in sys.modules]}}))"
    )
    assert out["code"] == code
    assert not {"torch", "datasets", "accelerate", "faiss", "ranx"} & set(out["loaded"]), out["loaded"]
