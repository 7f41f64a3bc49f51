"""Models by name: the published models (download, verify, convert once), the user's own, the bundled demo.

* known.py   the list of downloadable models (name, Hub repository, description, sizes), written once here
* hub.py     the Hub through huggingface_hub: listing with hashes, download into its cache, verification
* roles.py   which listed file is the autoencoder and which the BiFlowNet
* convert.py two network files -> a safetensors bundle folder (safe loader, one network at a time)
* pull.py    plan (sizes before consent) and execute a download
* store.py   where models live, `models list`, and `--model NAME` -> folder
* manage.py  `models add` / `models remove`
"""
from __future__ import annotations

from .known import DEMO_MODEL_NAME, KNOWN_MODELS, KnownModel, known_model
from .manage import RemoveResult, add_model, remove_model
from .pull import PullEvent, PullPlan, execute_pull, plan_pull
from .sizes import human_bytes
from .store import MODELS_DIR_ENV, ModelEntry, list_models, model_entry, models_home, resolve_model

__all__ = [
    "DEMO_MODEL_NAME", "KNOWN_MODELS", "KnownModel", "known_model",
    "add_model", "remove_model", "RemoveResult",
    "PullEvent", "PullPlan", "execute_pull", "plan_pull", "human_bytes",
    "MODELS_DIR_ENV", "ModelEntry", "list_models", "model_entry", "models_home", "resolve_model",
]
