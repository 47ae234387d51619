"""Command-line overrides, checked before Hydra sees them: an unknown key names the allowed ones and a guess;
webdataset brace patterns are quoted so that Hydra's grammar reads them as strings."""

from __future__ import annotations

import difflib
import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, get_origin, get_type_hints

from kosmos_g.config import CONFIG_DIR, SAMPLE_KINDS, TINY_WORLD_COMMAND, ConfigError, TrainConfig

# Keys that were removed, and what to do instead (an override naming one gets this as its error).
_NO_WORLD = (f"train.py no longer writes the tiny world: write it first with "
             f"`{TINY_WORLD_COMMAND.format(root='<data.root>')} [--samples N]` (data.root: runs/<run_name>/data)")
REMOVED_KEYS = {"model.clip_max_tokens": "set model.aligner.num_queries (the U-Net condition length; the CLIP text "
                                         "length follows it)",
                "data.generate_tiny_world": _NO_WORLD, "data.tiny_world_samples": _NO_WORLD}


def schema_keys(node: Any = TrainConfig, prefix: str = "") -> list[str]:
    """All dotted keys the schema accepts (used to name the allowed keys in errors)."""
    keys = []
    hints = get_type_hints(node)
    for f in fields(node):
        key = f"{prefix}{f.name}"
        keys.append(key)
        if is_dataclass(hints[f.name]):
            keys += schema_keys(hints[f.name], key + ".")
    return keys


def _field_type(dotted: str) -> Any:
    node = TrainConfig
    for name in dotted.split("."):
        node = get_type_hints(node)[name]
    return node


def check_override_keys(overrides: list[str], config_dir: Path = CONFIG_DIR) -> None:
    """Fail early, with the allowed keys and a guess, on an override naming no schema key.

    Hydra also rejects such keys, but names neither the keys it would accept nor the likely typo.
    """
    allowed = schema_keys()
    for ov in overrides:
        if "=" not in ov or ov.startswith(("hydra", "+hydra", "~", "--")):
            continue
        key = ov.split("=", 1)[0].lstrip("+")
        if (config_dir / key).is_dir():  # a config group choice, e.g. recipe=paper/align
            continue
        free_form = [k for k in allowed if get_origin(_field_type(k)) is dict]  # e.g. data.shards.<kind>
        parent, _, kind = key.rpartition(".")
        if parent in ("data.shards", "data.vae_latent_caches") and kind not in SAMPLE_KINDS:
            guess = difflib.get_close_matches(kind, SAMPLE_KINDS, n=1)
            raise ConfigError(f"Unknown sample kind '{kind}' in override '{ov}'."
                              f"{f' Did you mean {parent}.{guess[0]}?' if guess else ''} "
                              f"Kinds: {', '.join(SAMPLE_KINDS)}.")
        if key in REMOVED_KEYS:
            raise ConfigError(f"'{key}' (in override '{ov}') is no longer a setting: {REMOVED_KEYS[key]}.")
        if "@" in key or key in allowed or any(key.startswith(k + ".") for k in free_form):
            continue
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        if parent not in allowed:  # the whole prefix is unknown: list the top-level keys
            parent = ""
        siblings = sorted(k for k in allowed if k.rsplit(".", 1)[0] == parent or (not parent and "." not in k))
        guess = difflib.get_close_matches(key, allowed, n=1)
        hint = f" Did you mean '{guess[0]}'?" if guess else ""
        raise ConfigError(
            f"Unknown config key '{key}' in override '{ov}'.{hint} "
            f"Allowed keys{' under ' + repr(parent) if parent else ''}: {', '.join(siblings)}. "
            "See `python train.py --cfg job` for the full config."
        )


def quote_braces(overrides: list[str]) -> list[str]:
    """Quote override values that hold a brace pattern (`data.shards.caption=/d/c-{000..041}.tar`) so Hydra
    reads them as strings: its grammar reserves `{` for dicts and `${` for interpolations."""
    out = []
    for ov in overrides:
        key, sep, value = ov.partition("=")
        if (sep and not key.startswith("-") and "{" in value and not value.startswith(("{", "[", "'", '"'))
                and "${" not in value):
            value = "'" + re.sub(r"(['\\])", r"\\\1", value) + "'"
        out.append(f"{key}{sep}{value}")
    return out
